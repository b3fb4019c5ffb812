"""Causal multi-head attention (self-attention and PanGu-alpha's top-query attention).

One cell serves both: `construct(query_states, kv_states)` projects queries
from `query_states` and keys/values from `kv_states`. A decoder block passes
the same tensor twice; the top query layer passes the top-query position
embeddings as `query_states`. Position t attends to positions <= t.

Precision: projections and the two attention matmuls run in compute_dtype;
scores, the causal mask and the softmax run in float32. Every float16 op of
the model (MatMul, BatchMatMul, Gather, GeLU, Cast, Add) has a CPU kernel in
MindSpore 2.10 (checked, forward and backward, PYNATIVE and GRAPH), so no op
falls back to float32 on CPU.
"""
import functools
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import Normal, initializer

from pangu_sigma.parallel.dropout import HashDropout
from pangu_sigma.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear, tp_size

MASKED_SCORE = -1e9  # added to scores of future positions; exp() underflows to exactly 0 in float32


class Linear(nn.Cell):
    """y = x @ weight + bias, computed in compute_dtype.

    `weight` [in, out] ~ N(0, init_std) and `bias` [out] = 0 are float32 masters,
    cast to compute_dtype on use. Returns compute_dtype.
    """

    def __init__(self, in_features, out_features, init_std, compute_dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = Parameter(
            initializer(Normal(init_std), [in_features, out_features], ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", [out_features], ms.float32), name="bias")
        self.compute_dtype = compute_dtype

    def construct(self, x):
        lead_shape = x.shape[:-1]
        flat = ops.cast(x.reshape(-1, self.in_features), self.compute_dtype)  # [N, in]
        y = ops.matmul(flat, ops.cast(self.weight, self.compute_dtype))  # [N, out]
        y = y + ops.cast(self.bias, self.compute_dtype)
        return y.reshape(lead_shape + (self.out_features,))  # [..., out]


@functools.lru_cache(maxsize=None)
def causal_mask(seq_length):
    """Additive float32 mask [S, S]: 0 where key <= query, MASKED_SCORE above the diagonal.

    Cached, so every attention layer of a model shares one constant tensor.
    """
    future = np.triu(np.ones((seq_length, seq_length), dtype=bool), k=1)
    return Tensor(np.where(future, MASKED_SCORE, 0.0).astype(np.float32))


class CausalAttention(nn.Cell):
    """Multi-head causal attention: q_proj [d, d], kv_proj [d, 2d] (fused k|v), out_proj [d, d].

    out_proj is initialised with std out_init_std (the caller passes the
    GPT-2 residual scaling init_std / sqrt(2 * num_layers)).

    Tensor parallelism (`parallel` with tp > 1): this rank computes num_heads/tp
    heads. q_proj and kv_proj are column-parallel (kv_proj's fused k|v axis is
    split block-wise, so the rank holds its heads' k and v), out_proj is
    row-parallel (AllReduce over TP). Inputs and output stay replicated.
    """

    def __init__(self, hidden_size, num_heads, seq_length, init_std, out_init_std, dropout_rate,
                 compute_dtype=ms.float32, parallel=None):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
        tp = tp_size(parallel)
        if num_heads % tp != 0:
            raise ValueError(f"num_heads={num_heads} must be a multiple of tp={tp}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // tp  # heads computed by this rank
        self.local_width = self.local_heads * self.head_dim
        self.compute_dtype = compute_dtype
        if tp > 1:
            self.q_proj = ColumnParallelLinear(hidden_size, hidden_size, init_std, compute_dtype, parallel)
            self.kv_proj = ColumnParallelLinear(hidden_size, 2 * hidden_size, init_std, compute_dtype, parallel,
                                                parts=2)
            self.out_proj = RowParallelLinear(hidden_size, hidden_size, out_init_std, compute_dtype, parallel)
        else:
            self.q_proj = Linear(hidden_size, hidden_size, init_std, compute_dtype)
            self.kv_proj = Linear(hidden_size, 2 * hidden_size, init_std, compute_dtype)
            self.out_proj = Linear(hidden_size, hidden_size, out_init_std, compute_dtype)
        # probabilities [B, H, T, K] of this rank's heads: the mask of global heads tp_rank * H ..
        self.prob_dropout = HashDropout(dropout_rate, (parallel.tp_rank if tp > 1 else 0) * self.local_heads, tp)
        self.query_scale = 1.0 / math.sqrt(self.head_dim)
        self.mask = causal_mask(seq_length)  # [S_max, S_max], shared across layers
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)

    def construct(self, query_states, kv_states):
        """query_states, kv_states [B, S, d] at positions 0..S-1 -> [B, S, d] (compute_dtype)."""
        seq = query_states.shape[1]
        query = self._split_queries(query_states)  # [B, H, S, dh]
        key, value = self._split_keys_values(kv_states)  # [B, H, S, dh] each
        return self._attend(query, key, value, self.mask[:seq, :seq])

    def forward_with_cache(self, query_states, kv_states, past_key, past_value, start_pos):
        """Incremental decoding (PYNATIVE): T new positions start_pos..start_pos+T-1.

        query_states, kv_states [B, T, d]; past_key, past_value [B, H, P, dh] with
        P == start_pos (None when P == 0). Returns (out [B, T, d], key, value) where
        key/value [B, H, P+T, dh] are the cache for the next call (H = this rank's heads).
        """
        seq = query_states.shape[1]
        query = self._split_queries(query_states)  # [B, H, T, dh]
        key, value = self._split_keys_values(kv_states)  # [B, H, T, dh] each
        if past_key is not None:
            if past_key.shape[2] != start_pos:
                raise ValueError(f"cache holds {past_key.shape[2]} positions but start_pos={start_pos}")
            key = ops.concat((past_key, key), axis=2)  # [B, H, P+T, dh]
            value = ops.concat((past_value, value), axis=2)  # [B, H, P+T, dh]
        end = start_pos + seq
        out = self._attend(query, key, value, self.mask[start_pos:end, :end])
        return out, key, value

    def _split_heads(self, x):
        batch, seq, _ = x.shape
        x = x.reshape(batch, seq, self.local_heads, self.head_dim)  # [B, S, H, dh]
        return x.transpose(0, 2, 1, 3)  # [B, H, S, dh]

    def _split_queries(self, query_states):
        query = self.q_proj(query_states) * self.query_scale  # [B, S, d/tp], scaled before the matmul
        return self._split_heads(query)  # [B, H, S, dh]

    def _split_keys_values(self, kv_states):
        key_value = self.kv_proj(kv_states)  # [B, S, 2d/tp]: my heads' k | my heads' v
        key, value = ops.split(key_value, self.local_width, axis=-1)  # [B, S, d/tp] each
        return self._split_heads(key), self._split_heads(value)  # [B, H, S, dh] each

    def _attend(self, query, key, value, mask):
        """query [B, H, T, dh], key/value [B, H, K, dh], mask [T, K] additive -> [B, T, d]."""
        scores = ops.cast(self.scores_matmul(query, key), ms.float32)  # [B, H, T, K]
        probs = ops.softmax(scores + mask, axis=-1)  # [B, H, T, K] float32
        probs = self.prob_dropout(probs)
        context = ops.matmul(ops.cast(probs, self.compute_dtype), value)  # [B, H, T, dh]
        batch, _, seq, _ = context.shape
        context = context.transpose(0, 2, 1, 3).reshape(batch, seq, self.local_width)  # [B, T, d/tp]
        return self.out_proj(context)  # [B, T, d]
