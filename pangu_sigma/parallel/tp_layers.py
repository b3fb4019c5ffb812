"""Megatron-style tensor-parallel (TP) layers, built from plain sub-group AllReduce.

Layers (the repo's Linear convention: weight [in, out], y = x @ weight + bias):
- ColumnParallelLinear: weight [in, out/tp], bias [out/tp]; input replicated,
  output sharded on the last axis. With `parts` > 1 the output axis is `parts`
  fused blocks (e.g. k|v) and each block is split over TP separately, so a rank
  gets its slice of every block (its heads' k AND v).
- RowParallelLinear: weight [in/tp, out], replicated bias [out]; input sharded on
  the last axis, output = AllReduce_TP(x @ weight) + bias.
- VocabParallelEmbedding: token table [V/tp, d] (rows vocab_start..vocab_start+V/tp);
  ids outside the shard give zero rows, then AllReduce over TP; the replicated
  position table is added after. Its table is also the tied LM head, giving
  vocab-sharded logits [B, S, V/tp].
- vocab_parallel_cross_entropy / VocabParallelCrossEntropy: the exact mean token
  cross-entropy over the vocab-sharded logits.

Gradient semantics. No Megatron 'f'/'g' conjugate operators: AllReduce's bprop is
AllReduce(dout), so autodiff on every rank gives the exact derivative of
J = sum over ranks of each rank's loss, each rank's copy of a replicated tensor
being an independent variable. Every TP rank computes the same loss L, so for a
TP-sharded parameter dJ/dw = tp * dL/dw, and for a replicated parameter the sum
over its TP replicas of dJ/dp_r = tp * dL/dp. The gradient reducer sums each
parameter's gradient over the ranks holding a replica and divides by the world
size, which gives dL/dw (the data-parallel mean with DP > 1).

Layouts: every TP layer lists its sharded parameters in `tp_param_specs`
({attribute: TPShard}); `tp_shard_specs(net)` maps the current parameter names
of any cell tree to those specs (used by pangu_sigma.parallel.reshard).
"""
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import Normal, initializer

from locmoe import comm
from locmoe.errors import ConfigError
from pangu_sigma.parallel.dropout import HashDropout


# ---- layouts ------------------------------------------------------------------
@dataclass(frozen=True)
class TPShard:
    """Axis `dim` of a parameter is split over the TP group (tp_rank r holds piece r).

    parts > 1: the axis is `parts` equal fused blocks (e.g. k|v of kv_proj); each
    block is split into tp pieces and rank r holds [block_0 piece r | block_1 piece r | ...].
    """
    dim: int
    parts: int = 1

    def local_shape(self, full_shape, tp):
        shape = list(full_shape)
        size = shape[self.dim]
        if size % (self.parts * tp):
            raise ValueError(f"axis {self.dim} of shape {tuple(full_shape)} does not split into "
                             f"{self.parts} part(s) x tp={tp} pieces")
        shape[self.dim] = size // tp
        return tuple(shape)

    def shard(self, full, tp, tp_rank):
        """The piece of numpy array `full` held by `tp_rank`."""
        self.local_shape(full.shape, tp)  # checks divisibility
        blocks = np.split(full, self.parts, axis=self.dim)
        return np.concatenate([np.split(b, tp, axis=self.dim)[tp_rank] for b in blocks], axis=self.dim)

    def unshard(self, pieces):
        """Inverse of `shard`: pieces[r] is tp_rank r's array."""
        tp = len(pieces)
        per_rank = [np.split(p, self.parts, axis=self.dim) for p in pieces]  # [rank][part]
        blocks = [np.concatenate([per_rank[r][k] for r in range(tp)], axis=self.dim) for k in range(self.parts)]
        return np.concatenate(blocks, axis=self.dim)


def tp_shard_specs(net):
    """{parameter name: TPShard} for every TP-sharded parameter under `net` (current names)."""
    specs = {}
    for _, cell in net.cells_and_names():
        for attr, spec in getattr(cell, "tp_param_specs", {}).items():
            specs[getattr(cell, attr).name] = spec
    return specs


def tp_size(parallel):
    """TP degree of a ParallelContext (1 for None or a non-distributed context)."""
    return 1 if parallel is None else parallel.tp


def _tp_all_reduce(parallel, name):
    topo = parallel.topology
    return comm.AllReduce(topo.tp_group(), backend=parallel.backend, topology=topo, name=name)


def _divide(value, tp, field):
    if value % tp:
        raise ConfigError(field, value, f"a multiple of the tensor parallel size tp={tp}")
    return value // tp


# ---- linear layers ----------------------------------------------------------------
class ColumnParallelLinear(nn.Cell):
    """y_shard = x @ weight + bias with weight [in, out/tp], bias [out/tp] (compute_dtype out).

    x is replicated over the TP group; y stays sharded on its last axis. The
    weight is initialised N(0, init_std) per rank (shards of a full init are
    loaded with pangu_sigma.parallel.reshard when exact equivalence matters).
    """

    def __init__(self, in_features, out_features, init_std, compute_dtype, parallel, parts=1):
        super().__init__()
        self.tp = tp_size(parallel)
        _divide(out_features, parts * self.tp, "out_features")
        self.in_features = in_features
        self.out_features = out_features // self.tp  # local width
        self.weight = Parameter(
            initializer(Normal(init_std), [in_features, self.out_features], ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", [self.out_features], ms.float32), name="bias")
        self.compute_dtype = compute_dtype
        self.tp_param_specs = {"weight": TPShard(1, parts), "bias": TPShard(0, parts)}

    def construct(self, x):
        lead_shape = x.shape[:-1]
        flat = ops.cast(x.reshape(-1, self.in_features), self.compute_dtype)  # [N, in]
        y = ops.matmul(flat, ops.cast(self.weight, self.compute_dtype))  # [N, out/tp]
        y = y + ops.cast(self.bias, self.compute_dtype)
        return y.reshape(lead_shape + (self.out_features,))  # [..., out/tp]


class RowParallelLinear(nn.Cell):
    """y = AllReduce_TP(x_shard @ weight) + bias with weight [in/tp, out], bias [out] replicated."""

    def __init__(self, in_features, out_features, init_std, compute_dtype, parallel):
        super().__init__()
        self.tp = tp_size(parallel)
        self.in_features = _divide(in_features, self.tp, "in_features")  # local width
        self.out_features = out_features
        self.weight = Parameter(
            initializer(Normal(init_std), [self.in_features, out_features], ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", [out_features], ms.float32), name="bias")
        self.compute_dtype = compute_dtype
        self.all_reduce = _tp_all_reduce(parallel, "tp_row_linear")
        self.tp_param_specs = {"weight": TPShard(0)}

    def construct(self, x):
        lead_shape = x.shape[:-1]
        flat = ops.cast(x.reshape(-1, self.in_features), self.compute_dtype)  # [N, in/tp]
        partial = ops.matmul(flat, ops.cast(self.weight, self.compute_dtype))  # [N, out], partial sum
        y = self.all_reduce(partial) + ops.cast(self.bias, self.compute_dtype)  # [N, out]
        return y.reshape(lead_shape + (self.out_features,))  # [..., out]


# ---- embedding / LM head ------------------------------------------------------------
class VocabParallelEmbedding(nn.Cell):
    """Vocab-parallel twin of pangu_sigma.model.embedding.Embedding (same parameter names).

    token_table [V/tp, d] holds ids vocab_start .. vocab_start + V/tp - 1 of this
    TP rank; position_table [S_max, d] is replicated. `logits` is the tied LM
    head on the shard: [B, T, V/tp] float32.
    """

    def __init__(self, vocab_size, seq_length, hidden_size, init_std, dropout_rate, compute_dtype, parallel):
        super().__init__()
        self.tp = tp_size(parallel)
        self.vocab_size = vocab_size
        self.vocab_per_rank = _divide(vocab_size, self.tp, "model.vocab_size")
        self.vocab_start = parallel.tp_rank * self.vocab_per_rank
        self.token_table = Parameter(
            initializer(Normal(init_std), [self.vocab_per_rank, hidden_size], ms.float32), name="token_table")
        self.position_table = Parameter(
            initializer(Normal(init_std), [seq_length, hidden_size], ms.float32), name="position_table")
        self.compute_dtype = compute_dtype
        self.dropout = HashDropout(dropout_rate)  # replicated output: the same mask on every TP rank
        self.matmul_transpose_b = ops.MatMul(transpose_b=True)
        self.all_reduce = _tp_all_reduce(parallel, "tp_vocab_embedding")
        self.tp_param_specs = {"token_table": TPShard(0)}

    def construct(self, input_ids):
        """input_ids [B, S] int32 (global ids) -> [B, S, d] float32, replicated over TP."""
        return self.embed(input_ids, 0)

    def embed(self, input_ids, start_pos):
        seq = input_ids.shape[1]
        local_ids = input_ids - self.vocab_start  # [B, T]
        mine = ops.logical_and(local_ids >= 0, local_ids < self.vocab_per_rank)  # [B, T]
        local_ids = ops.where(mine, local_ids, ops.zeros_like(local_ids))
        rows = ops.cast(ops.gather(self.token_table, local_ids, 0), self.compute_dtype)  # [B, T, d], fp32 gather
        rows = rows * ops.cast(mine, self.compute_dtype).expand_dims(-1)  # zero rows for other shards' ids
        tokens = self.all_reduce(rows)  # [B, T, d]: exactly one rank contributed each row
        positions = ops.cast(self.position_table[start_pos:start_pos + seq], self.compute_dtype)  # [T, d]
        return self.dropout(ops.cast(tokens + positions, ms.float32))

    def logits(self, hidden):
        """Tied LM head: hidden [B, T, d] float32 (replicated) -> [B, T, V/tp] float32 (my vocab shard)."""
        batch, seq, width = hidden.shape
        flat = ops.cast(hidden.reshape(batch * seq, width), self.compute_dtype)  # [B*T, d]
        scores = self.matmul_transpose_b(flat, ops.cast(self.token_table, self.compute_dtype))  # [B*T, V/tp]
        return ops.cast(scores, ms.float32).reshape(batch, seq, -1)  # [B, T, V/tp]


# ---- cross-entropy ------------------------------------------------------------------------
def vocab_parallel_cross_entropy(logits_shard, labels, vocab_start, all_reduce, all_gather):
    """Mean token cross-entropy of vocab-sharded logits, identical on every TP rank (see vocab_parallel_token_nll)."""
    return vocab_parallel_token_nll(logits_shard, labels, vocab_start, all_reduce, all_gather).mean()


def vocab_parallel_token_nll(logits_shard, labels, vocab_start, all_reduce, all_gather):
    """Per-token cross-entropy of vocab-sharded logits, identical on every TP rank.

    logits_shard [B, S, V/tp] (ids vocab_start.. of this rank), labels [B, S] int32
    (global ids) -> [B*S] float32. all_reduce: TP AllReduce(sum) cell; all_gather: TP
    AllGather cell on the last axis (only used, under stop-gradient, for the max).

    log p(y) = (z_y - M) - log sum_v exp(z_v - M), with M the global row max
    (gathered per-rank maxima: exact, no AllReduce(MAX) needed), sum_v exp via
    AllReduce(sum) of per-shard sums, z_y - M from the owning shard via AllReduce(sum).
    """
    vocab_local = logits_shard.shape[-1]
    flat = ops.cast(logits_shard, ms.float32).reshape(-1, vocab_local)  # [N, V/tp]
    local_max = ops.stop_gradient(flat.max(axis=-1, keepdims=True))  # [N, 1]
    global_max = ops.stop_gradient(all_gather(local_max).max(axis=-1, keepdims=True))  # [N, tp] -> [N, 1]
    shifted = flat - global_max  # [N, V/tp]
    sum_exp = all_reduce(ops.exp(shifted).sum(axis=-1, keepdims=True))  # [N, 1], over the full vocab
    local_labels = labels.reshape(-1, 1) - vocab_start  # [N, 1]
    mine = ops.logical_and(local_labels >= 0, local_labels < vocab_local)  # [N, 1]
    local_labels = ops.where(mine, local_labels, ops.zeros_like(local_labels))
    picked = ops.gather_elements(shifted, 1, local_labels) * ops.cast(mine, ms.float32)  # [N, 1]
    target = all_reduce(picked)  # [N, 1]: z_y - M from the shard that owns y
    return (ops.log(sum_exp) - target).reshape(-1)  # [N]


class VocabParallelCrossEntropy(nn.Cell):
    """construct(logits_shard [B, S, V/tp], labels [B, S]) -> mean token CE (see vocab_parallel_cross_entropy)."""

    def __init__(self, vocab_start, parallel):
        super().__init__()
        topo = parallel.topology
        self.vocab_start = vocab_start
        self.all_reduce = _tp_all_reduce(parallel, "tp_vocab_ce")
        self.all_gather = comm.AllGather(topo.tp_group(), dim=-1, backend=parallel.backend, topology=topo,
                                         name="tp_vocab_ce_max")

    def construct(self, logits_shard, labels):
        return vocab_parallel_cross_entropy(logits_shard, labels, self.vocab_start, self.all_reduce,
                                            self.all_gather)
