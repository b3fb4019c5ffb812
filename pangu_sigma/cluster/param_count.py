"""Parameter counts and memory per device of a PanGu-Sigma run config (pure Python).

No MindSpore import: `cfg` is any object shaped like pangu_sigma.config.RunConfig
(sections .model, .moe, .parallel, .train and the derived .num_experts,
.compute_dtype), so this runs anywhere, e.g. inside `python -m pangu_sigma.cluster.plan`.

Parameters (mirrors pangu_sigma/model and locmoe; d hidden, f ffn, V vocab,
S seq_length, L num_layers decoder blocks, M moe_layer_num of them sparse,
E experts):
    embedding        token_table [V, d] (tied LM head) + position_table [S, d]
    every block      ln_attn, ln_ffn (gamma, beta [d] each)          4d
    (L blocks + the  q_proj [d, d] + bias [d]                         d^2 + d
    query layer)     kv_proj [d, 2d] + bias [2d]                      2d^2 + 2d
                     out_proj [d, d] + bias [d]                       d^2 + d
    dense FFN        w_in [d, f] + bias [f], w_out [f, d] + bias [d]  2df + f + d
    (L-M blocks + the query layer)
    sparse FFN       experts w_in [E, d, f], w_out [E, f, d] (no bias) 2dfE
    (M blocks)       router: locmoe  GrAP bias [E] (if moe.gate_bias; the GrAP
                                     weight is fixed, not a parameter)
                             switch  dense gate [E, d]
                             hash, rre  none trainable (a fixed [V] int32 table,
                                     a non-trainable Parameter, counted apart)
    query layer      + top_query_table [S, d]
    final_ln         2d
`total` counts trainable parameters. `active` (per token) is total minus the
E-1 experts a token does not visit in each sparse layer (top-1 routing): the
router and everything dense stay in.

Per device, with TP = op_level_model_parallel_num and EP = expert_parallel
(Megatron-style tensor parallelism; what is split is an assumption about the
TP layers, stated here):
    split by TP      token_table (vocab-parallel), q/kv/w_in weights and biases
                     (column-parallel), out_proj / w_out weights (row-parallel)
    replicated       LayerNorms, out_proj / w_out biases, position_table,
                     top_query_table, router
    experts          E/EP experts per rank, each with its f dimension split by TP
Non-divisible splits round up (the largest shard).

Memory per device (GiB = 2^30 bytes), no activation recomputation, no
optimizer sharding, no pipeline parallelism:
    parameters   4 B/param: the model keeps float32 Parameters (the "master
                 weights") and casts them to the compute dtype on use
                 (pangu_sigma/model/attention.py Linear), so fp16 training
                 adds no persistent fp16 weight copy and no separate master copy.
    gradients    4 B/param: gradients of float32 Parameters are float32.
    optimizer    8 B/param: AdamWeightDecay's two float32 moments (m, v).
    activations  what the backward pass keeps, summed over all layers (see
                 `activation_bytes`).
    grad_buckets the gradient AllReduce's packed buckets
                 (pangu_sigma.parallel.grad_reduce): packed input + reduced
                 output of one bucket, 2 * min(parallel.grad_bucket_mb MiB,
                 the device's gradient bytes); an upper bound (a gradient
                 bigger than a bucket is reduced unpacked, with no copy).
"""
import math

from locmoe.capacity import expert_capacity

GIB = 1024 ** 3
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
PARAM_BYTES = 4       # float32 parameters
GRAD_BYTES = 4        # float32 gradients
OPTIMIZER_BYTES = 8   # AdamWeightDecay: m and v, float32


def _ceil_div(a, b):
    return -(-a // b)


def _dims(cfg, vocab_size=None):
    m = cfg.model
    vocab = m.vocab_size if vocab_size is None else vocab_size
    return vocab, m.seq_length, m.hidden_size, m.ffn_hidden_size, m.num_layers, m.moe_layer_num


def router_params(router, hidden_size, num_experts, gate_bias=True):
    """Trainable parameters of one router."""
    if router == "locmoe":
        return num_experts if gate_bias else 0
    if router == "switch":
        return num_experts * hidden_size
    return 0  # hash, rre: fixed tables


def parameter_parts(cfg, vocab_size=None):
    """{part: trainable parameter count} of the whole model (every expert included)."""
    vocab, seq, d, f, layers, moe = _dims(cfg, vocab_size)
    experts = cfg.num_experts if moe > 0 else 0
    attention = 4 * d * d + 4 * d          # q, kv, out weights + biases
    norms = 4 * d                          # ln_attn + ln_ffn
    dense_ffn = 2 * d * f + f + d
    return {
        "embedding": vocab * d + seq * d,
        "attention": (layers + 1) * attention,
        "layernorm": (layers + 1) * norms + 2 * d,
        "dense_ffn": (layers - moe + 1) * dense_ffn,
        "experts": moe * experts * 2 * d * f,
        "router": moe * router_params(cfg.moe.router, d, experts, cfg.moe.gate_bias),
        "top_query": seq * d,
    }


def count_params(cfg, vocab_size=None):
    """{'total', 'active', 'non_trainable'} parameter counts.

    active: per token, the dense parts + one expert per sparse layer + the routers.
    non_trainable: the hash / RRE token tables (one [V] int32 table per sparse layer).
    """
    parts = parameter_parts(cfg, vocab_size)
    total = sum(parts.values())
    vocab, _, d, f, _, moe = _dims(cfg, vocab_size)
    experts = cfg.num_experts if moe > 0 else 0
    active = total - moe * max(experts - 1, 0) * 2 * d * f
    tables = moe * vocab if cfg.moe.router in ("hash", "rre") else 0
    return {"total": total, "active": active, "non_trainable": tables}


def params_per_device(cfg, tp, ep, vocab_size=None):
    """Trainable parameters held by one device under TP (dense and experts) and EP (experts)."""
    vocab, seq, d, f, layers, moe = _dims(cfg, vocab_size)
    experts = cfg.num_experts if moe > 0 else 0
    blocks = layers + 1
    split = (_ceil_div(vocab * d, tp)                                   # token_table
             + blocks * (_ceil_div(d * d + d, tp) + _ceil_div(2 * d * d + 2 * d, tp)   # q, kv
                         + _ceil_div(d * d, tp))                        # out_proj weight
             + (layers - moe + 1) * (_ceil_div(d * f + f, tp) + _ceil_div(f * d, tp)))  # w_in, w_out
    replicated = (seq * d + seq * d                                     # position, top_query tables
                  + blocks * (4 * d + d)                                # LayerNorms, out_proj bias
                  + (layers - moe + 1) * d                              # w_out bias
                  + 2 * d                                               # final_ln
                  + moe * router_params(cfg.moe.router, d, experts, cfg.moe.gate_bias))
    experts_here = moe * _ceil_div(experts, ep) * 2 * d * _ceil_div(f, tp)
    return split + replicated + experts_here


def tokens_per_rank(cfg):
    """Tokens one rank routes per step: its data-parallel batch (replicated over TP)."""
    return cfg.train.batch_size * cfg.model.seq_length


def activation_bytes(cfg, tp, ep, vocab_size=None):
    """Activation bytes one device keeps for the backward pass of one step.

    N = batch_size * seq_length tokens per rank (every TP rank of a data-parallel
    group holds the same N tokens), s = seq_length, a = num_heads, t = TP,
    p = bytes of the compute dtype (2 for float16, 4 for float32), D = 1 if
    dropout_rate > 0 else 0 (a 1-byte mask), K = E * C rows of the expert
    buffer on one rank (C = expert_capacity(N, capacity_factor, E); a rank
    holds E/EP experts and receives C rows per expert from each of EP ranks).
    Residual stream, LayerNorms and softmax run in float32 (4 bytes), as in
    pangu_sigma/model. Per layer:

        attention (L blocks + query layer)
            N*d*(4 + p + D)         LN input fp32, its compute-dtype cast (q/kv input), branch dropout mask
          + N*d*4p / t              q, k, v, context (out_proj input)
          + N*a*s*(4 + p + D) / t   softmax output fp32, its cast (PV matmul input), dropout mask
        dense FFN (L-M blocks + query layer)
            N*d*(4 + p + D)         LN input, cast, branch dropout mask
          + 2*N*f*p / t             w_in output (GeLU input), GeLU output (w_out input)
        sparse FFN (M blocks)
            N*d*(4 + 4 + D) + 4*N*E LN input, router input fp32, dropout mask; router probabilities
          + 2*K*d*p                 expert input buffer, expert output buffer
          + 2*K*f*p / t             expert hidden (GeLU input and output)
        head (once)
            N*d*4 + 2*4*N*V / t     final LN input; fp32 logits and log-probabilities (vocab-parallel)

    Check: with t = 1, p = 2, D = 1 and f = 4d a dense block keeps
    38*N*d + 7*N*a*s bytes; Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", fp16 softmax and LayerNorm
    inputs) give 34*N*d + 5*N*a*s for the same block: the float32 LayerNorm
    inputs and softmax here cost a little more. Returns {part: bytes}.
    """
    vocab, seq, d, f, layers, moe = _dims(cfg, vocab_size)
    p = ITEMSIZE[cfg.compute_dtype]
    drop = 1 if cfg.model.dropout_rate > 0 else 0
    heads = cfg.model.num_heads
    n = tokens_per_rank(cfg)
    experts = cfg.num_experts if moe > 0 else 0
    attention = n * d * (4 + p + drop) + n * d * 4 * p / tp + n * heads * seq * (4 + p + drop) / tp
    dense_ffn = n * d * (4 + p + drop) + 2 * n * f * p / tp
    out = {
        "attention": (layers + 1) * attention,
        "dense_ffn": (layers - moe + 1) * dense_ffn,
        "sparse_ffn": 0.0,
        "head": n * d * 4 + 2 * 4 * n * vocab / tp,
    }
    if moe > 0:
        rows = experts * expert_capacity(n, cfg.moe.capacity_factor, experts)
        sparse = n * d * (8 + drop) + 4 * n * experts + 2 * rows * d * p + 2 * rows * f * p / tp
        out["sparse_ffn"] = moe * sparse
    return {k: int(math.ceil(v)) for k, v in out.items()}


def grad_bucket_bytes(cfg, params_on_device):
    """Bytes of the gradient AllReduce buckets in flight: 2 * min(bucket, all gradients of the device)."""
    bucket = int(cfg.parallel.grad_bucket_mb * 2 ** 20)
    return 2 * min(bucket, params_on_device * GRAD_BYTES)


def memory_per_device(cfg, tp, ep, vocab_size=None):
    """{'parameters', 'gradients', 'optimizer', 'activations', 'grad_buckets', 'total'} in GiB for one device."""
    params = params_per_device(cfg, tp, ep, vocab_size)
    acts = sum(activation_bytes(cfg, tp, ep, vocab_size).values())
    out = {"parameters": params * PARAM_BYTES / GIB, "gradients": params * GRAD_BYTES / GIB,
           "optimizer": params * OPTIMIZER_BYTES / GIB, "activations": acts / GIB,
           "grad_buckets": grad_bucket_bytes(cfg, params) / GIB}
    out["total"] = sum(out.values())
    return out
