"""Pre-LayerNorm decoder blocks (dense and sparse) and PanGu-alpha's top query layer.

Every block: x = x + Attn(LN(x)); x = x + FFN(LN(x)). The residual stream is
float32; LayerNorm runs in float32; the branches run in compute_dtype and are
cast back to float32 before the residual add.

`parallel` (a ParallelContext, optional): with tp > 1 attention heads and the
dense FFN's inner width are split over the TP group (Megatron-style); the
residual stream, LayerNorms and the top-query table stay replicated.
"""
import math

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import Normal, initializer

from pangu_sigma.model.attention import CausalAttention, Linear
from pangu_sigma.parallel.dropout import HashDropout
from pangu_sigma.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear, tp_size


def layer_norm(hidden_size, eps):
    """float32 LayerNorm over the last axis; gamma = 1, beta = 0."""
    return nn.LayerNorm((hidden_size,), begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)


def residual_init_std(cfg):
    """GPT-2 init of the projections that write into the residual stream: std / sqrt(2 * num_layers)."""
    return cfg.param_init_std / math.sqrt(2.0 * cfg.num_layers)


class DenseFFN(nn.Cell):
    """w_out(GeLU(w_in(x))): d -> ffn_hidden_size -> d; exact (erf) GeLU as in the paper's eq. 1.

    With tp > 1: w_in column-parallel (inner width ffn/tp), w_out row-parallel.
    """

    def __init__(self, cfg, compute_dtype, parallel=None):
        super().__init__()
        if tp_size(parallel) > 1:
            self.w_in = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, cfg.param_init_std,
                                             compute_dtype, parallel)
            self.w_out = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, residual_init_std(cfg),
                                           compute_dtype, parallel)
        else:
            self.w_in = Linear(cfg.hidden_size, cfg.ffn_hidden_size, cfg.param_init_std, compute_dtype)
            self.w_out = Linear(cfg.ffn_hidden_size, cfg.hidden_size, residual_init_std(cfg), compute_dtype)

    def construct(self, x):
        return self.w_out(ops.gelu(self.w_in(x), approximate="none"))  # [B, S, d]


class _AttentionSublayer(nn.Cell):
    """Holds ln_attn, attn, ln_ffn and the two branch dropouts (attention, FFN) shared by every block kind."""

    def __init__(self, cfg, compute_dtype, parallel=None):
        super().__init__()
        self.ln_attn = layer_norm(cfg.hidden_size, cfg.layernorm_eps)
        self.attn = CausalAttention(cfg.hidden_size, cfg.num_heads, cfg.seq_length, cfg.param_init_std,
                                    residual_init_std(cfg), cfg.dropout_rate, compute_dtype, parallel)
        self.ln_ffn = layer_norm(cfg.hidden_size, cfg.layernorm_eps)
        self.attn_dropout = HashDropout(cfg.dropout_rate)  # replicated over TP: one mask on every rank
        self.ffn_dropout = HashDropout(cfg.dropout_rate)

    def add_branch(self, x, branch, dropout):
        """x [B, S, d] float32 + dropout(branch) cast to float32."""
        return x + dropout(ops.cast(branch, ms.float32))

    def self_attention(self, x):
        normed = self.ln_attn(x)  # [B, S, d] float32
        return self.add_branch(x, self.attn(normed, normed), self.attn_dropout)

    def self_attention_with_cache(self, x, past_key, past_value, start_pos):
        normed = self.ln_attn(x)  # [B, T, d] float32
        out, key, value = self.attn.forward_with_cache(normed, normed, past_key, past_value, start_pos)
        return self.add_branch(x, out, self.attn_dropout), key, value


class DenseBlock(_AttentionSublayer):
    """Decoder block with a dense GeLU FFN (`ffn.w_in`, `ffn.w_out`)."""

    def __init__(self, cfg, compute_dtype, parallel=None):
        super().__init__(cfg, compute_dtype, parallel)
        self.ffn = DenseFFN(cfg, compute_dtype, parallel)

    def construct(self, x):
        """x [B, S, d] float32 -> [B, S, d] float32."""
        x = self.self_attention(x)
        return self.add_branch(x, self.ffn(self.ln_ffn(x)), self.ffn_dropout)

    def forward_with_cache(self, x, token_ids, domain_ids, past_key, past_value, start_pos):
        """Incremental decoding (PYNATIVE); token_ids/domain_ids unused. Returns (x, key, value)."""
        x, key, value = self.self_attention_with_cache(x, past_key, past_value, start_pos)
        return self.add_branch(x, self.ffn(self.ln_ffn(x)), self.ffn_dropout), key, value


class SparseBlock(_AttentionSublayer):
    """Decoder block whose FFN is a MoE layer (`ffn`, built by moe_layer_factory).

    The MoE layer sees the float32 LayerNorm output (router-facing tensors stay
    float32) with the token ids and the sample domain ids.
    """

    def __init__(self, cfg, compute_dtype, moe_layer, parallel=None):
        super().__init__(cfg, compute_dtype, parallel)
        self.ffn = moe_layer

    def construct(self, x, token_ids, domain_ids):
        """x [B, S, d] float32, token_ids [B, S] int32, domain_ids [B] int32 ->
        (x [B, S, d] float32, aux_loss, loc_loss, (expert_load [E], dropped, local))."""
        x = self.self_attention(x)
        moe_out, aux_loss, loc_loss, stats = self.ffn(self.ln_ffn(x), token_ids, domain_ids)
        return self.add_branch(x, moe_out, self.ffn_dropout), aux_loss, loc_loss, stats

    def forward_with_cache(self, x, token_ids, domain_ids, past_key, past_value, start_pos):
        """Incremental decoding (PYNATIVE). Returns (x, key, value); the MoE losses are dropped."""
        x, key, value = self.self_attention_with_cache(x, past_key, past_value, start_pos)
        moe_out, _, _, _ = self.ffn(self.ln_ffn(x), token_ids, domain_ids)
        return self.add_branch(x, moe_out, self.ffn_dropout), key, value


class TopQueryLayer(_AttentionSublayer):
    """PanGu-alpha's query layer: a dense block whose attention query at position t is
    q_proj(top_query_table[t]) (a learned [S, d] table, not the hidden state);
    keys and values come from LN(x). Causal like every block.
    """

    def __init__(self, cfg, compute_dtype, parallel=None):
        super().__init__(cfg, compute_dtype, parallel)
        self.top_query_table = Parameter(
            initializer(Normal(cfg.param_init_std), [cfg.seq_length, cfg.hidden_size], ms.float32),
            name="top_query_table")  # replicated over TP
        self.ffn = DenseFFN(cfg, compute_dtype, parallel)

    def _queries(self, batch, start_pos, seq):
        queries = self.top_query_table[start_pos:start_pos + seq]  # [T, d]
        return ops.broadcast_to(queries.expand_dims(0), (batch, seq, queries.shape[-1]))  # [B, T, d]

    def construct(self, x):
        """x [B, S, d] float32 -> [B, S, d] float32."""
        batch, seq, _ = x.shape
        x = self.add_branch(x, self.attn(self._queries(batch, 0, seq), self.ln_attn(x)), self.attn_dropout)
        return self.add_branch(x, self.ffn(self.ln_ffn(x)), self.ffn_dropout)

    def forward_with_cache(self, x, past_key, past_value, start_pos):
        """Incremental decoding (PYNATIVE). Returns (x, key, value)."""
        batch, seq, _ = x.shape
        out, key, value = self.attn.forward_with_cache(
            self._queries(batch, start_pos, seq), self.ln_attn(x), past_key, past_value, start_pos)
        x = self.add_branch(x, out, self.attn_dropout)
        return self.add_branch(x, self.ffn(self.ln_ffn(x)), self.ffn_dropout), key, value
