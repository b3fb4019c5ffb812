"""Tensor parallelism for the dense parts of PanGu-Sigma, and resharding of parameters."""
from pangu_sigma.parallel.reshard import gather_full_params, shard_full_params
from pangu_sigma.parallel.tp_layers import (ColumnParallelLinear, RowParallelLinear, TPShard,
                                            VocabParallelCrossEntropy, VocabParallelEmbedding, tp_shard_specs,
                                            tp_size, vocab_parallel_cross_entropy)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "TPShard", "VocabParallelCrossEntropy", "VocabParallelEmbedding",
    "gather_full_params", "shard_full_params", "tp_shard_specs", "tp_size", "vocab_parallel_cross_entropy",
]
