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
                                     weight is fixed, not a parameter) + the
                                     locality bias [1] (moe.locality_bias, mu > 0)
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

Memory per device (GiB = 2^30 bytes), no pipeline parallelism (`memory_breakdown`
adds activation recomputation, optimizer sharding and the communication buffers):
    parameters   4 B/param: the model keeps float32 Parameters (the "master
                 weights") and casts them to the compute dtype on use
                 (pangu_sigma/model/attention.py Linear), so fp16 training
                 adds no persistent fp16 weight copy and no separate master copy.
    gradients    4 B/param: gradients of float32 Parameters are float32.
    optimizer    8 B/param: AdamWeightDecay's two float32 moments (m, v).
    activations  what is live at the step's peak: what the backward pass keeps,
                 summed over all layers, plus the loss's backward (see
                 `activation_bytes`). This assumes freed memory is reused within
                 the step, as Ascend's GRAPH-mode runtime does (SOMAS); the CPU
                 runtime's default keeps every intermediate of the step instead
                 (pangu_sigma.tools.memory_check measures both: the model is
                 checked against MindSpore's live-set peak, SOMAS's lower bound).
    grad_accumulation  with train.gradient_accumulation_steps > 1: the float32
                 buffer the micro-batches' gradients are summed into, 4 B/param
                 (pangu_sigma/training/train_step.py AccumulatingTrainStep);
                 activations are then those of one micro-batch.
    grad_buckets the gradient AllReduce's packed buckets
                 (pangu_sigma.parallel.grad_reduce): packed input + reduced
                 output of one bucket, 2 * min(parallel.grad_bucket_mb MiB,
                 the device's gradient bytes); an upper bound (a gradient
                 bigger than a bucket is reduced unpacked, with no copy).
"""
import math

from locmoe.capacity import expert_capacity
from locmoe.config import builds_locality_bias

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


def router_params(router, hidden_size, num_experts, gate_bias=True, locality_bias=False):
    """Trainable parameters of one router (locality_bias: LocMoE's learned locality term is built)."""
    if router == "locmoe":
        return (num_experts if gate_bias else 0) + (1 if locality_bias else 0)
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
        "router": moe * router_params(cfg.moe.router, d, experts, cfg.moe.gate_bias, builds_locality_bias(cfg.moe)),
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
    return sum(params_per_device_parts(cfg, tp, ep, vocab_size).values())


def params_per_device_parts(cfg, tp, ep, vocab_size=None):
    """{'tp_split', 'replicated', 'experts'}: one device's parameters by replica group
    (pangu_sigma.parallel.grad_reduce.replica_group: the data-parallel group, every rank,
    the expert-data-parallel group)."""
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
                  + moe * router_params(cfg.moe.router, d, experts, cfg.moe.gate_bias, builds_locality_bias(cfg.moe)))
    experts_here = moe * _ceil_div(experts, ep) * 2 * d * _ceil_div(f, tp)
    if tp == 1:  # nothing is TP-split: those parameters are replicated on every rank
        return {"tp_split": 0, "replicated": split + replicated, "experts": experts_here}
    return {"tp_split": split, "replicated": replicated, "experts": experts_here}


def tokens_per_rank(cfg):
    """Tokens one rank routes at once: one micro-batch of its data-parallel batch (replicated over TP),
    train.batch_size / train.gradient_accumulation_steps sequences. Activations and the All-to-All
    buffers are those of one micro-batch; a step runs gradient_accumulation_steps of them."""
    return micro_batch_size(cfg) * cfg.model.seq_length


def micro_batch_size(cfg):
    """Sequences per data-parallel rank in one micro-batch (train.batch_size without accumulation)."""
    return cfg.train.batch_size // accumulation_steps(cfg)


def accumulation_steps(cfg):
    """train.gradient_accumulation_steps (1 for config objects without it)."""
    return getattr(cfg.train, "gradient_accumulation_steps", 1)


def buffer_rows(cfg, tokens, tp, ep):
    """Rows of one rank's dispatch buffer: E * C with one tier; with two tiers (moe.remote_capacity_factor
    > 0) the node-local experts get C rows each and the others C_r (locmoe.layer.MoELayer._tiered): one
    tier-2 unit per remote expert, which a domain-affine placement's units (locmoe.tiers) stay under
    up to one unit's rounding per pair.
    Node-local experts: E/EP per EP rank on the node (devices_per_node / TP data-parallel ranks, at most EP)."""
    experts = cfg.num_experts
    capacity = expert_capacity(tokens, cfg.moe.capacity_factor, experts)
    if not cfg.moe.remote_capacity_factor:
        return experts * capacity
    local = experts // ep * max(1, min(ep, cfg.parallel.devices_per_node // tp))
    return local * capacity + (experts - local) * expert_capacity(tokens, cfg.moe.remote_capacity_factor, experts)


def activation_bytes(cfg, tp, ep, vocab_size=None):
    """Activation bytes live at the peak of one step (no recomputation): what the backward
    pass keeps, summed over all layers, plus the loss's backward, where the step peaks.

    N = batch_size * seq_length tokens per rank (every TP rank of a data-parallel
    group holds the same N tokens), s = seq_length, a = num_heads, t = TP,
    p = bytes of the compute dtype (2 for float16, 4 for float32), D = 1 if
    dropout_rate > 0 else 0 (a 1-byte mask), K = E * C rows of the expert
    buffer on one rank (C = expert_capacity(N, capacity_factor, E); a rank
    holds E/EP experts and receives C rows per expert from each of EP ranks).
    Residual stream, LayerNorms and softmax run in float32 (4 bytes), as in
    pangu_sigma/model. Per layer:

        attention (L blocks + query layer)
            N*d*(4 + p + D) + 8*N   LN input fp32, its compute-dtype cast (q/kv input), branch dropout
                                    mask; the LN's mean and 1/std per token (float32)
          + N*d*4p / t              q, k, v, context (out_proj input)
          + N*a*s*(4 + p + D) / t   softmax output fp32, its cast (PV matmul input), dropout mask
        dense FFN (L-M blocks + query layer)
            N*d*(4 + p + D) + 8*N   LN input, cast, branch dropout mask; LN mean and 1/std
          + 2*N*f*p / t             w_in output (GeLU input), GeLU output (w_out input)
        sparse FFN (M blocks)
            N*d*(4 + 4 + D) + 8*N   LN input, router input fp32, dropout mask; LN mean and 1/std
          + 4*N*E                   router probabilities
          + 2*K*d*p                 expert input buffer, expert output buffer
          + 2*K*f*p / t             expert hidden (GeLU input and output)
        head (once, at the loss's backward: the step's peak)
            N*d*4 + 8*N             final LN input, its mean and 1/std
          + 4 * 4*N*V / t           four float32 [N, V/t] tensors live at once in the backward of the
                                    cross-entropy (pangu_sigma/model/pangu_sigma.py token_cross_entropy,
                                    tp_layers.vocab_parallel_cross_entropy): exp(z - max z) kept from
                                    the forward, the gradient of the gathered log-probabilities
                                    (scattered to [N, V/t]), the broadcast gradient of sum(exp), and
                                    their product (the gradient through exp)

    Measured against MindSpore's live-set peak of the compiled CPU train step
    (pangu_sigma.tools.memory_check, SOMAS lower bound and its tensor list): a
    larger vocabulary adds exactly 16 B per token per vocabulary entry (the four
    [N, V] float32 tensors above; the first version counted two, logits and
    log-probabilities, which are not what the backward holds), more heads exactly
    (4 + p) B per N*a*s per layer (p = 4 there), and the LayerNorm statistics
    8 B per token per LayerNorm.

    Check: with t = 1, p = 2, D = 1 and f = 4d a dense block keeps
    38*N*d + 7*N*a*s bytes (+16*N); Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", fp16 softmax and LayerNorm
    inputs) give 34*N*d + 5*N*a*s for the same block: the float32 LayerNorm
    inputs and softmax here cost a little more. Returns {part: bytes}.
    """
    _, _, _, _, layers, moe = _dims(cfg, vocab_size)
    one = _layer_activations(cfg, tp, ep, vocab_size)
    out = {
        "attention": (layers + 1) * one["attention"],
        "dense_ffn": (layers - moe + 1) * one["dense_ffn"],
        "sparse_ffn": moe * one["sparse_ffn"],
        "head": one["head"],
    }
    return {k: int(math.ceil(v)) for k, v in out.items()}


LN_STATS_BYTES = 8    # a LayerNorm keeps its mean and 1/std per token, float32, for the backward
LOSS_BACKWARD_VOCAB_TENSORS = 4   # float32 [N, V/t] tensors live at once in the cross-entropy's backward


def _layer_activations(cfg, tp, ep, vocab_size=None):
    """Per-layer activation bytes without recomputation: {'attention', 'dense_ffn', 'sparse_ffn', 'head'}
    of ONE layer (see activation_bytes for the terms), plus the pieces recomputation keeps."""
    vocab, seq, d, f, layers, moe = _dims(cfg, vocab_size)
    p = ITEMSIZE[cfg.compute_dtype]
    drop = 1 if cfg.model.dropout_rate > 0 else 0
    n = tokens_per_rank(cfg)
    heads = cfg.model.num_heads
    experts = cfg.num_experts if moe > 0 else 0
    rows = buffer_rows(cfg, n, tp, ep) if moe > 0 else 0
    ln = n * LN_STATS_BYTES
    return {
        "attention": (n * d * (4 + p + drop) + ln + n * d * 4 * p / tp
                      + n * heads * seq * (4 + p + drop) / tp),
        # attention recomputed: its float32 input (the LayerNorm output) is kept instead of its insides
        # (the LayerNorm is outside the recomputed cell: its input and statistics stay too)
        "attention_recomputed": n * d * (4 + 4 + drop) + ln,
        "dense_ffn": n * d * (4 + p + drop) + ln + 2 * n * f * p / tp,
        "sparse_ffn": (n * d * (8 + drop) + ln + 4 * n * experts + 2 * rows * d * p + 2 * rows * f * p / tp)
        if moe else 0,
        "expert_buffers": 2 * rows * d * p,   # the All-to-All outputs a recomputed sparse block keeps
        "head": n * d * 4 + ln + LOSS_BACKWARD_VOCAB_TENSORS * 4 * n * vocab / tp,
        "block_input": n * d * 4,             # the float32 residual stream entering a block
    }


def activation_bytes_recompute(cfg, tp, ep, level, vocab_size=None):
    """Activation bytes kept for the backward pass at a train.recompute level -> {part: bytes}.

    none       activation_bytes (every layer keeps everything).
    attention  every attention keeps only its float32 input (N*d*4 on top of the
               LayerNorm input and the dropout mask) instead of q, k, v, context
               and the softmax terms; +1 layer's attention insides while its
               backward runs.
    block      every block (and the query layer) keeps its float32 input N*d*4,
               sparse blocks also the expert buffers (their All-to-All outputs are
               not recomputed; TP AllReduces are recomputed); +1 layer's
               full activations while its backward runs.
    The head (final LayerNorm input, logits, log-probabilities) is never recomputed,
    but its tensors are consumed by the head's backward, which runs before any layer
    is recomputed: the head and the recomputed layer are never live together, so
    the step peaks at the kept set plus the larger of the two (`backward_peak` =
    max(head, one recomputed layer)).
    Measured against MindSpore's live-set peak on CPU (pangu_sigma.tools.memory_check):
    summing both over-predicted block recomputation by 23%.
    """
    if level == "none":
        return activation_bytes(cfg, tp, ep, vocab_size)
    _, _, _, _, layers, moe = _dims(cfg, vocab_size)
    one = _layer_activations(cfg, tp, ep, vocab_size)
    blocks = layers + 1
    if level == "attention":
        out = {
            "attention": blocks * one["attention_recomputed"],
            "dense_ffn": (layers - moe + 1) * one["dense_ffn"],
            "sparse_ffn": moe * one["sparse_ffn"],
            "backward_peak": max(one["head"], one["attention"]),
        }
    elif level == "block":
        out = {
            "attention": 0,
            "dense_ffn": 0,
            "sparse_ffn": 0,
            "block_inputs": blocks * one["block_input"] + moe * one["expert_buffers"],
            "backward_peak": max(one["head"], one["attention"] + max(one["dense_ffn"], one["sparse_ffn"])),
        }
    else:
        raise ValueError(f"recompute level {level!r}")
    return {k: int(math.ceil(v)) for k, v in out.items()}


# ---- the per-device memory model ----------------------------------------------------------
# Stated constants (not measured here):
HCCL_BUFFERS_PER_GROUP = 2         # every communication group holds 2 x HCCL_BUFFSIZE (parallel.hccl_buffsize_mb,
                                   # CANN env var docs; send + receive), exclusive to HCCL
RUNTIME_RESERVE_GIB = 4            # left to the runtime / framework on a 32 GiB 910A: budget 28 GiB
BUDGET_GIB = 28
MARGIN_GIB = 1                     # kept free below the budget for what the model leaves out (UNMODELLED)
UNMODELLED = ("operator workspaces", "allocator fragmentation", "fp16 copies of the weights outside "
              "recomputed blocks", "kernel and graph binaries")


def optimizer_replicas(tp, dp, ep):
    """Replica-group size of each parameter kind (the optimizer-state sharding factor)."""
    return {"tp_split": dp, "replicated": tp * dp, "experts": max(dp // ep, 1)}


def memory_breakdown(cfg, tp, ep, dp, vocab_size=None, comm_groups=5, recompute=None, optimizer_shard=None,
                     grad_bucket_mib=None):
    """Per-device memory {item: GiB} of a run config, and 'total'.

    Persistent: parameters (float32 masters), gradients (float32, one buffer per
    parameter, kept until the update), Adam moments (8 B/param, divided by the
    replica-group size R of each parameter kind when parallel.optimizer_shard).
    Step peak = persistent + the larger of two phases:
      forward/backward  activations (at train.recompute) + the MoE All-to-All
                        buffers in flight (send + receive of one layer's
                        [E, C, d] buffer, compute dtype) + the gradient-reduction
                        bucket (the flat concat and its reduced copy, 2 x bucket)
      optimizer step    with sharding: one gather bucket (pangu_sigma.parallel.zero:
                        the [R, sum c] float32 buffer, at most the bucket size,
                        plus my concatenated slices, 1/R of it; no single
                        parameter of the shipped configs exceeds the bucket)
    HCCL workspace: comm_groups x 2 x parallel.hccl_buffsize_mb (Ascend only; 0 on CPU).
    Gradient accumulation: activations and All-to-All buffers of one micro-batch
    (tokens_per_rank); the float32 accumulation buffer (4 B/param) is persistent.
    """
    recompute = cfg.train.recompute if recompute is None else recompute
    shard = cfg.parallel.optimizer_shard if optimizer_shard is None else optimizer_shard
    grad_bucket_mib = cfg.parallel.grad_bucket_mb if grad_bucket_mib is None else grad_bucket_mib
    parts = params_per_device_parts(cfg, tp, ep, vocab_size)
    params = sum(parts.values())
    replicas = optimizer_replicas(tp, dp, ep)
    moments = sum(count * OPTIMIZER_BYTES / (replicas[kind] if shard else 1) for kind, count in parts.items())
    acts = activation_bytes_recompute(cfg, tp, ep, recompute, vocab_size)
    _, _, d, _, _, moe = _dims(cfg, vocab_size)
    n = tokens_per_rank(cfg)
    experts = cfg.num_experts if moe > 0 else 0
    a2a = 2 * buffer_rows(cfg, n, tp, ep) * d * ITEMSIZE[cfg.compute_dtype] if moe else 0
    largest_group = max(parts.values()) * PARAM_BYTES
    bucket = 2 * min(grad_bucket_mib * 2 ** 20, largest_group)
    gather_bucket = min(grad_bucket_mib * 2 ** 20, largest_group)
    gather = gather_bucket * (1 + 1 / max(replicas[max(parts, key=parts.get)], 1)) if shard else 0
    ascend = cfg.parallel.device_target == "Ascend"
    hccl = comm_groups * HCCL_BUFFERS_PER_GROUP * cfg.parallel.hccl_buffsize_mb * 2 ** 20 if ascend else 0
    out = {
        "parameters": params * PARAM_BYTES,
        "gradients": params * GRAD_BYTES,
        "grad_accumulation": params * GRAD_BYTES if accumulation_steps(cfg) > 1 else 0,
        "optimizer": moments,
        "activations": sum(acts.values()),
        "a2a_buffers": a2a,
        "grad_bucket": bucket,
        "zero_gather": gather,
        "hccl_workspace": hccl,
    }
    out = {k: v / GIB for k, v in out.items()}
    persistent = (out["parameters"] + out["gradients"] + out["grad_accumulation"] + out["optimizer"]
                  + out["hccl_workspace"])
    backward = out["activations"] + out["a2a_buffers"] + out["grad_bucket"]
    out["total"] = persistent + max(backward, out["zero_gather"])
    out["activation_parts"] = {k: v / GIB for k, v in acts.items()}
    return out


def memory_per_device(cfg, tp, ep, vocab_size=None, dp=1):
    """{'parameters', 'gradients', 'optimizer', 'activations', 'total'} in GiB (memory_breakdown, summarised)."""
    full = memory_breakdown(cfg, tp, ep, dp, vocab_size)
    return {k: full[k] for k in ("parameters", "gradients", "optimizer", "activations", "total")}
