"""PanGu-Sigma: embeddings, dense then sparse decoder blocks, top query layer, tied LM head."""
import mindspore as ms
from mindspore import nn, ops

from locmoe.errors import ConfigError
from pangu_sigma.model.blocks import DenseBlock, SparseBlock, TopQueryLayer, layer_norm
from pangu_sigma.model.embedding import Embedding
from pangu_sigma.parallel import tp_layers
from pangu_sigma.parallel.dropout import set_data_parallel_rank

COMPUTE_DTYPES = {"float32": ms.float32, "float16": ms.float16}


def _default_moe_layer_factory():
    from locmoe.layer import MoELayer  # imported lazily: only sparse models need it
    return MoELayer


def _validate(cfg, moe_cfg):
    def need(ok, name, valid):
        if not ok:
            raise ConfigError(f"model.{name}", getattr(cfg, name), valid)

    need(cfg.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"one of {list(COMPUTE_DTYPES)}")
    need(cfg.num_layers >= 1, "num_layers", "an integer >= 1")
    need(0 <= cfg.moe_layer_num <= cfg.num_layers, "moe_layer_num", f"an integer in [0, {cfg.num_layers}]")
    need(cfg.num_heads >= 1 and cfg.hidden_size % cfg.num_heads == 0, "num_heads",
         f"a divisor of hidden_size={cfg.hidden_size}")
    need(0.0 <= cfg.dropout_rate < 1.0, "dropout_rate", "a number in [0, 1)")
    if cfg.moe_layer_num > 0 and moe_cfg is None:
        raise ConfigError("moe", None, f"a MoEConfig (model.moe_layer_num={cfg.moe_layer_num} > 0)")


def _validate_tp(cfg, tp):
    """Tensor parallelism splits heads, the dense FFN width and the vocabulary over tp ranks."""
    for name in ("num_heads", "vocab_size", "ffn_hidden_size"):
        if getattr(cfg, name) % tp:
            raise ConfigError(f"model.{name}", getattr(cfg, name),
                              f"a multiple of the tensor parallel size tp={tp}")


class PanguSigmaModel(nn.Cell):
    """PanGu-Sigma language model.

    Layout: embedding -> blocks[0 .. L-M-1] dense -> blocks[L-M .. L-1] sparse
    (MoE FFN) -> query_layer (PanGu-alpha top query layer) -> final_ln ->
    logits = hidden @ embedding.token_table^T (tied). L = num_layers,
    M = moe_layer_num. Unlike PanGu-alpha (final LayerNorm *before* its query
    layer), the query layer here is one more pre-LN block and final_ln sits
    just before the head, as in a standard pre-LN GPT.

    construct(input_ids [B, S] int32, domain_ids [B] int32) ->
        (logits [B, S, V] float32 ([B, S, V/tp] with tensor parallelism), aux_loss [] float32, loc_loss [] float32,
         expert_load [M, E] float32, dropped [M, 3] float32, local [M, P] float32)
    dropped: tokens per layer dropped bound for node-local experts, dropped bound for experts on other
    nodes, and rerouted to a node-local expert (moe.reroute_overflow); local: node-local tokens per layer and token group (P: the layer's
    local_by_rank slots, one per data-parallel rank; a layer whose stats hold only
    (load, dropped, local) gives P = 1 and no remote drops or rerouting).
    aux_loss / loc_loss are summed over the sparse layers. With M = 0 the losses
    are 0.0 and the statistics are empty tensors of shape [0, E], [0, 3], [0, 1]
    (E = moe_cfg.num_experts, or 0 when moe_cfg is None); these compile and run
    in GRAPH mode.

    moe_layer_factory(moe_cfg, hidden_size, ffn_hidden_size, topology,
    param_init_std=..., compute_dtype=...[, parallel=...]) builds each MoE layer;
    default locmoe.layer.MoELayer. `parallel` is passed only when given here.

    parallel: an optional locmoe.parallel_context.ParallelContext. With
    parallel.tp > 1 (a distributed run) the dense parts are tensor-parallel
    (pangu_sigma.parallel.tp_layers): attention heads, the dense FFN width and
    the vocabulary are split over the TP group, and `logits` are this rank's
    vocabulary shard [B, S, V/tp] (ids tp_rank*V/tp ..). Position embeddings,
    LayerNorms and the top-query table are replicated. Parameter names are those
    of the single-process model; `tp_shard_specs` gives the sharded ones' layouts.
    """

    def __init__(self, model_cfg, moe_cfg, topology, moe_layer_factory=None, parallel=None):
        super().__init__()
        _validate(model_cfg, moe_cfg)
        self.tp = tp_layers.tp_size(parallel)
        _validate_tp(model_cfg, self.tp)
        self.parallel = parallel
        self.cfg = model_cfg
        compute_dtype = COMPUTE_DTYPES[model_cfg.compute_dtype]
        if self.tp > 1:
            self.embedding = tp_layers.VocabParallelEmbedding(
                model_cfg.vocab_size, model_cfg.seq_length, model_cfg.hidden_size, model_cfg.param_init_std,
                model_cfg.dropout_rate, compute_dtype, parallel)
        else:
            self.embedding = Embedding(model_cfg.vocab_size, model_cfg.seq_length, model_cfg.hidden_size,
                                       model_cfg.param_init_std, model_cfg.dropout_rate, compute_dtype)
        self.dense_layer_num = model_cfg.dense_layer_num
        self.moe_layer_num = model_cfg.moe_layer_num
        self.num_experts = moe_cfg.num_experts if moe_cfg is not None else 0
        blocks = [DenseBlock(model_cfg, compute_dtype, parallel) for _ in range(self.dense_layer_num)]
        if self.moe_layer_num > 0:
            factory = moe_layer_factory or _default_moe_layer_factory()
            extra = {} if parallel is None else {"parallel": parallel}
            for _ in range(self.moe_layer_num):
                moe_layer = factory(moe_cfg, model_cfg.hidden_size, model_cfg.ffn_hidden_size, topology,
                                    param_init_std=model_cfg.param_init_std, compute_dtype=compute_dtype, **extra)
                blocks.append(SparseBlock(model_cfg, compute_dtype, moe_layer, parallel))
        self.blocks = nn.CellList(blocks)
        self.query_layer = TopQueryLayer(model_cfg, compute_dtype, parallel)
        self.final_ln = layer_norm(model_cfg.hidden_size, model_cfg.layernorm_eps)
        set_data_parallel_rank(self, parallel)  # dropout masks at the global sample index

    @property
    def tp_shard_specs(self):
        """{parameter name: TPShard} of the tensor-parallel parameters (empty when tp == 1)."""
        return tp_layers.tp_shard_specs(self)

    def construct(self, input_ids, domain_ids):
        x = self.embedding(input_ids)  # [B, S, d] float32
        for i in range(self.dense_layer_num):
            x = self.blocks[i](x)
        aux_loss = ops.zeros((), ms.float32)
        loc_loss = ops.zeros((), ms.float32)
        loads, drops, locals_ = (), (), ()
        for i in range(self.dense_layer_num, self.dense_layer_num + self.moe_layer_num):
            x, layer_aux, layer_loc, stats = self.blocks[i](x, input_ids, domain_ids)
            aux_loss = aux_loss + ops.cast(layer_aux, ms.float32)
            loc_loss = loc_loss + ops.cast(layer_loc, ms.float32)
            loads = loads + (ops.cast(stats[0], ms.float32),)
            dropped, remote = ops.cast(stats[1], ms.float32), ops.zeros((), ms.float32)
            by_rank = ops.cast(stats[2], ms.float32).reshape(1)  # [1]
            rerouted = ops.zeros((), ms.float32)
            if len(stats) > 3:
                remote = ops.cast(stats[3], ms.float32)
                by_rank = ops.cast(stats[4], ms.float32)  # [P]
            if len(stats) > 5:
                rerouted = ops.cast(stats[5], ms.float32)
            drops = drops + (ops.stack((dropped - remote, remote, rerouted)),)  # [3]
            locals_ = locals_ + (by_rank,)
        x = self.final_ln(self.query_layer(x))
        logits = self.embedding.logits(x)  # [B, S, V] float32
        expert_load, dropped, local = self._stack_stats(loads, drops, locals_)
        return logits, aux_loss, loc_loss, expert_load, dropped, local

    def forward_routes(self, input_ids, domain_ids):
        """construct's blocks, keeping each sparse block's routing instead of its statistics:
        (x [B, S, d] after the last block, per sparse block (router input [B, S, d],
        expert_index [G, T] int32, keep [G, T])), the routing from MoELayer.route (the layer's own
        grouping, router and slot assignment). For evaluation and the routing capture."""
        x = self.embedding(input_ids)  # [B, S, d] float32
        for i in range(self.dense_layer_num):
            x = self.blocks[i](x)
        routes = ()
        for i in range(self.dense_layer_num, self.dense_layer_num + self.moe_layer_num):
            block = self.blocks[i]
            x = block.self_attention(x)
            normed = block.ln_ffn(x)  # [B, S, d]: what the MoE layer and its router receive
            expert_index, keep = block.ffn.route(normed, input_ids, domain_ids)  # [G, T] each
            moe_out, _, _, _ = block.ffn(normed, input_ids, domain_ids)
            x = block.add_branch(x, moe_out, block.ffn_dropout)
            routes = routes + ((normed, expert_index, keep),)
        return x, routes

    def _stack_stats(self, loads, drops, locals_):
        if self.moe_layer_num == 0:
            return (ops.zeros((0, self.num_experts), ms.float32), ops.zeros((0, 3), ms.float32),
                    ops.zeros((0, 1), ms.float32))
        return ops.stack(loads), ops.stack(drops), ops.stack(locals_)  # [M, E], [M, 3], [M, P]

    def forward_with_cache(self, input_ids, domain_ids, cache=None, start_pos=0):
        """Incremental decoding, PYNATIVE mode only (Python control flow over the cache).

        input_ids [B, T] int32 are the tokens at positions start_pos..start_pos+T-1;
        cache is None (start_pos == 0) or the tuple returned by the previous call:
        one (key, value) pair [B, H, start_pos, dh] per block, then one for the
        query layer. Returns (logits [B, T, V] float32, new cache).
        With MoE layers, each call routes only its own T*B tokens, so capacity
        (and hence token dropping) differs from a full forward unless the
        capacity is large enough that nothing is dropped.
        Only for tp == 1 (NotImplementedError with tensor parallelism).
        """
        if self.tp > 1:
            raise NotImplementedError(f"incremental decoding with tensor parallelism (tp={self.tp}) is not "
                                      "implemented; generate with a tp=1 model")
        if start_pos + input_ids.shape[1] > self.cfg.seq_length:
            raise ValueError(f"positions up to {start_pos + input_ids.shape[1]} exceed "
                             f"seq_length={self.cfg.seq_length}")
        num_caches = len(self.blocks) + 1
        past = cache if cache is not None else ((None, None),) * num_caches
        if len(past) != num_caches:
            raise ValueError(f"cache has {len(past)} entries, expected {num_caches}")
        x = self.embedding.embed(input_ids, start_pos)  # [B, T, d] float32
        new_cache = []
        for block, (past_key, past_value) in zip(self.blocks, past[:-1]):
            x, key, value = block.forward_with_cache(x, input_ids, domain_ids, past_key, past_value, start_pos)
            new_cache.append((key, value))
        x, key, value = self.query_layer.forward_with_cache(x, past[-1][0], past[-1][1], start_pos)
        new_cache.append((key, value))
        logits = self.embedding.logits(self.final_ln(x))  # [B, T, V] float32
        return logits, tuple(new_cache)


def token_cross_entropy(logits, labels):
    """Mean token cross-entropy: logits [B, S, V] float, labels [B, S] int32 -> [] float32.

    Numerically stable log-softmax in float32: log p = (z - max z) - log sum exp(z - max z).
    """
    vocab = logits.shape[-1]
    flat = ops.cast(logits, ms.float32).reshape(-1, vocab)  # [B*S, V]
    shifted = flat - ops.stop_gradient(flat.max(axis=-1, keepdims=True))  # [B*S, V]
    log_probs = shifted - ops.log(ops.exp(shifted).sum(axis=-1, keepdims=True))  # [B*S, V]
    picked = ops.gather_elements(log_probs, 1, labels.reshape(-1, 1))  # [B*S, 1]
    return -picked.mean()


class _TokenCrossEntropy(nn.Cell):
    def construct(self, logits, labels):
        return token_cross_entropy(logits, labels)


class PanguSigmaWithLoss(nn.Cell):
    """Training loss (the paper's eq. 7): total = CE + sum_layers aux + sum_layers loc.

    construct(ids [B, S+1] int32, domain_ids [B] int32) ->
        (total_loss, ce_loss, aux_loss, loc_loss, expert_load [M, E], dropped [M, 3], local [M, P])
    with inputs = ids[:, :-1], labels = ids[:, 1:]; every loss is a float32 scalar.
    With a tensor-parallel model (model.tp > 1) the CE is the vocab-parallel
    cross-entropy of the sharded logits: the same value on every TP rank.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        if getattr(model, "tp", 1) > 1:
            self.cross_entropy = tp_layers.VocabParallelCrossEntropy(model.embedding.vocab_start, model.parallel)
        else:
            self.cross_entropy = _TokenCrossEntropy()

    def construct(self, ids, domain_ids):
        inputs = ids[:, :-1]  # [B, S]
        labels = ids[:, 1:]  # [B, S]
        logits, aux_loss, loc_loss, expert_load, dropped, local = self.model(inputs, domain_ids)
        ce_loss = self.cross_entropy(logits, labels)
        total_loss = ce_loss + aux_loss + loc_loss
        return total_loss, ce_loss, aux_loss, loc_loss, expert_load, dropped, local
