"""PanGu-Sigma model: shapes, causality, loss, tied head, kv cache, fp16, GRAPH-mode training."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import Normal, initializer

from locmoe.config import MoEConfig
from locmoe.topology import single_process
from pangu_sigma.model import (DenseBlock, ModelConfig, PanguSigmaModel, PanguSigmaWithLoss,
                               TopQueryLayer)
from pangu_sigma.parallel.dropout import HashDropout, attach_draw_counter, site_id
from np_reference import hash_dropout_keep

VOCAB, SEQ, HIDDEN, HEADS, FFN, EXPERTS, BATCH = 64, 8, 32, 2, 64, 4, 2


class DenseMoEDouble(nn.Cell):
    """Stands in for locmoe.layer.MoELayer (same constructor and outputs): a dense GeLU FFN
    whose losses and statistics are simple, position-wise functions of its inputs."""

    def __init__(self, moe_config, hidden_size, ffn_hidden_size, topology, param_init_std=0.02,
                 compute_dtype=ms.float32):
        super().__init__()
        self.experts = nn.Cell()
        self.experts.w_in = Parameter(
            initializer(Normal(param_init_std), [hidden_size, ffn_hidden_size], ms.float32), name="w_in")
        self.experts.w_out = Parameter(
            initializer(Normal(param_init_std), [ffn_hidden_size, hidden_size], ms.float32), name="w_out")
        self.num_experts = moe_config.num_experts
        self.compute_dtype = compute_dtype

    def construct(self, x, token_ids, domain_ids):
        batch, seq, hidden = x.shape
        flat = ops.cast(x.reshape(batch * seq, hidden), self.compute_dtype)  # [N, d]
        inner = ops.gelu(ops.matmul(flat, ops.cast(self.experts.w_in, self.compute_dtype)))  # [N, ffn]
        out = ops.matmul(inner, ops.cast(self.experts.w_out, self.compute_dtype))  # [N, d]
        y = ops.cast(out, ms.float32).reshape(batch, seq, hidden)  # [B, S, d]
        aux_loss = 0.01 * (ops.cast(x, ms.float32) ** 2).mean()
        loc_loss = 0.02 * ops.abs(y).mean()
        load = ops.one_hot(token_ids.reshape(-1) % self.num_experts, self.num_experts,
                           Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)).sum(0)  # [E]
        dropped = ops.zeros((), ms.float32)
        local = load[: self.num_experts // 2].sum()
        return y, aux_loss, loc_loss, (load, dropped, local)


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def model_config(**overrides):
    values = dict(vocab_size=VOCAB, seq_length=SEQ, hidden_size=HIDDEN, num_layers=2, num_heads=HEADS,
                  ffn_hidden_size=FFN, moe_layer_num=1, dropout_rate=0.0)
    values.update(overrides)
    return ModelConfig(**values)


def build(seed=0, factory=DenseMoEDouble, moe_cfg=None, **overrides):
    ms.set_seed(seed)
    cfg = model_config(**overrides)
    moe_cfg = moe_cfg or MoEConfig(num_experts=EXPERTS, vocab_size=VOCAB)
    return PanguSigmaModel(cfg, moe_cfg, single_process(moe_cfg.num_experts), moe_layer_factory=factory)


def random_ids(seed, shape):
    return Tensor(np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32))


DOMAINS = Tensor(np.array([0, 1], np.int32))


def test_output_shapes_and_parameter_names():
    for moe_layers in (0, 1):
        model = build(moe_layer_num=moe_layers)
        logits, aux, loc, load, dropped, local = model(random_ids(0, (BATCH, SEQ)), DOMAINS)
        assert logits.shape == (BATCH, SEQ, VOCAB) and logits.dtype == ms.float32
        assert aux.shape == () and loc.shape == ()
        assert load.shape == (moe_layers, EXPERTS) and dropped.shape == (moe_layers, 3) and local.shape == (moe_layers, 1)
        if moe_layers == 0:
            assert float(aux) == 0.0 and float(loc) == 0.0
    names = [p.name for p in model.get_parameters()]
    assert len(names) == len(set(names))
    for name in ("embedding.token_table", "embedding.position_table", "blocks.0.attn.q_proj.weight",
                 "blocks.0.ffn.w_in.weight", "blocks.1.ffn.experts.w_in", "blocks.1.ln_ffn.gamma",
                 "query_layer.top_query_table", "query_layer.attn.kv_proj.weight", "final_ln.beta"):
        assert name in names
    # expert load counts every token of the batch once
    assert float(load.sum()) == BATCH * SEQ


def test_init_statistics():
    model = build(moe_layer_num=0, num_layers=8, hidden_size=64, ffn_hidden_size=256)
    params = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert abs(params["blocks.0.ffn.w_in.weight"].std() - 0.02) < 0.002
    assert abs(params["blocks.0.ffn.w_out.weight"].std() - 0.02 / math.sqrt(16)) < 0.0007
    assert abs(params["blocks.0.attn.out_proj.weight"].std() - 0.02 / math.sqrt(16)) < 0.0007
    assert (params["blocks.0.ln_attn.gamma"] == 1).all() and (params["blocks.0.ln_attn.beta"] == 0).all()


def test_model_is_causal():
    model = build()
    ids = random_ids(1, (BATCH, SEQ)).asnumpy()
    base = model(Tensor(ids), DOMAINS)[0].asnumpy()
    for t in (0, 3, SEQ - 2):
        changed = ids.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 7) % VOCAB
        out = model(Tensor(changed), DOMAINS)[0].asnumpy()
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4


@pytest.mark.parametrize("cell_kind", ["decoder_block", "top_query_layer"])
def test_blocks_are_causal(cell_kind):
    ms.set_seed(0)
    cfg = model_config()
    cell = DenseBlock(cfg, ms.float32) if cell_kind == "decoder_block" else TopQueryLayer(cfg, ms.float32)
    x = np.random.RandomState(2).randn(BATCH, SEQ, HIDDEN).astype(np.float32)
    base = cell(Tensor(x)).asnumpy()
    for t in (0, 4, SEQ - 2):
        changed = x.copy()
        changed[:, t + 1:] += 1.0
        out = cell(Tensor(changed)).asnumpy()
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-4


def numpy_cross_entropy(logits, labels):
    z = logits.astype(np.float64).reshape(-1, logits.shape[-1])
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(z.shape[0]), labels.reshape(-1)].mean()


def test_cross_entropy_and_total_loss():
    model = build(moe_layer_num=2)
    net = PanguSigmaWithLoss(model)
    ids = random_ids(3, (BATCH, SEQ + 1))
    total, ce, aux, loc, load, dropped, local = net(ids, DOMAINS)
    logits, model_aux, model_loc = model(ids[:, :-1], DOMAINS)[:3]
    expected = numpy_cross_entropy(logits.asnumpy(), ids.asnumpy()[:, 1:])
    assert abs(float(ce) - expected) < 1e-5
    assert float(aux) > 0 and float(loc) > 0
    assert abs(float(total) - (float(ce) + float(aux) + float(loc))) < 1e-6
    assert abs(float(aux) - float(model_aux)) < 1e-7 and abs(float(loc) - float(model_loc)) < 1e-7
    assert load.shape == (2, EXPERTS) and dropped.shape == (2, 3) and local.shape == (2, 1)


def test_tied_head_shares_one_parameter():
    model = build(moe_layer_num=0)
    tables = [p for p in model.trainable_params()
              if p.shape == (VOCAB, HIDDEN) and not p.name.startswith(("blocks.", "query_layer."))]
    assert [p.name for p in tables] == ["embedding.token_table"]
    table = tables[0]
    net = PanguSigmaWithLoss(model)
    ids = random_ids(4, (BATCH, SEQ + 1))
    grad_fn = ms.value_and_grad(lambda i, d: net(i, d)[0], None, [table])
    loss, (grad,) = grad_fn(ids, DOMAINS)
    grad = grad.asnumpy()
    inputs = np.unique(ids.asnumpy()[:, :-1])
    unused = np.setdiff1d(np.arange(VOCAB), ids.asnumpy())
    # rows never looked up still get a gradient: the head uses the table
    assert np.abs(grad[unused]).max() > 1e-6
    # along a direction on looked-up rows, the gradient matches a central difference:
    # both uses (lookup and head) are accounted for
    direction = np.zeros((VOCAB, HIDDEN), np.float32)
    direction[inputs] = np.random.RandomState(5).randn(len(inputs), HIDDEN)
    direction /= np.linalg.norm(direction)
    original = table.asnumpy()
    eps = 1e-2
    losses = []
    for sign in (1, -1):
        table.set_data(Tensor(original + sign * eps * direction))
        losses.append(float(net(ids, DOMAINS)[0]))
    table.set_data(Tensor(original))
    numeric = (losses[0] - losses[1]) / (2 * eps)
    analytic = float((grad * direction).sum())
    assert abs(numeric - analytic) < 0.02 * abs(analytic) + 1e-4


def test_kv_cache_greedy_decoding_matches_full_forward():
    model = build(moe_layer_num=1)
    model.set_train(False)
    prompt_len, new_tokens = 3, 4
    ids = random_ids(6, (BATCH, prompt_len)).asnumpy()
    logits, cache = model.forward_with_cache(Tensor(ids), DOMAINS)
    full = model(Tensor(ids), DOMAINS)[0].asnumpy()
    np.testing.assert_allclose(logits.asnumpy(), full, rtol=0, atol=1e-5)
    for step in range(new_tokens):
        next_ids = logits.asnumpy()[:, -1].argmax(-1).astype(np.int32)[:, None]  # [B, 1]
        start = ids.shape[1]
        ids = np.concatenate([ids, next_ids], axis=1)
        logits, cache = model.forward_with_cache(Tensor(next_ids), DOMAINS, cache, start_pos=start)
        assert cache[0][0].shape == (BATCH, HEADS, start + 1, HIDDEN // HEADS)
        full = model(Tensor(ids), DOMAINS)[0].asnumpy()
        np.testing.assert_allclose(logits.asnumpy()[:, 0], full[:, -1], rtol=0, atol=1e-5)


def test_dropout_only_in_training():
    """Eval mode: no dropout. Training: the masks follow the draw counter (another counter, other masks;
    the same counter, the same masks: test_hash_dropout_matches_numpy_reference); without a counter,
    training with dropout raises."""
    model = build(dropout_rate=0.3)
    ids = random_ids(7, (BATCH, SEQ))
    model.set_train(False)
    a, b = model(ids, DOMAINS)[0].asnumpy(), model(ids, DOMAINS)[0].asnumpy()
    np.testing.assert_array_equal(a, b)
    model.set_train(True)
    with pytest.raises(RuntimeError, match="draw counter"):
        model(ids, DOMAINS)
    counter = Parameter(Tensor(0, ms.int32), name="dropout_draw", requires_grad=False)
    sites = attach_draw_counter(model, counter, seed=5)
    assert len(sites) == 1 + 3 * 3 and "embedding.dropout" in sites  # embedding; 2 blocks + query layer x 3
    c = model(ids, DOMAINS)[0].asnumpy()
    counter.set_data(Tensor(1, ms.int32))
    d = model(ids, DOMAINS)[0].asnumpy()
    assert np.abs(c - a).max() > 1e-4 and np.abs(d - c).max() > 1e-4


@pytest.mark.parametrize("shape, rate", [((3, 5, 16), 0.1), ((2, 4, 6, 6), 0.3)])
def test_hash_dropout_matches_numpy_reference(shape, rate):
    """HashDropout's mask = the numpy definition over the global tensor, rows dp_rank * B .. for a
    data-parallel rank; kept values scaled by 1 / (1 - rate)."""
    counter = Parameter(Tensor(7, ms.int32), name="dropout_draw", requires_grad=False)
    full = hash_dropout_keep((2 * shape[0],) + shape[1:], rate, seed=1234, site=site_id("blocks.0.attn_dropout"),
                             counter=7)
    assert abs(full.mean() - (1 - rate)) < 4 * math.sqrt(rate * (1 - rate) / full.size)  # 4 sigma
    x = np.random.RandomState(0).uniform(1.0, 2.0, shape).astype(np.float32)
    for dp_rank in (0, 1):
        cell = HashDropout(rate)
        cell.bind(counter, 1234, site_id("blocks.0.attn_dropout"))
        cell.dp_rank = dp_rank
        cell.set_train(True)
        keep = full[dp_rank * shape[0]:(dp_rank + 1) * shape[0]]
        np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), np.where(keep, x / (1 - rate), 0.0), rtol=1e-6)


def loss_and_grads(net, ids):
    params = net.trainable_params()
    grad_fn = ms.value_and_grad(net, None, params, has_aux=True)
    outputs, grads = grad_fn(ids, DOMAINS)
    return float(outputs[0]), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def test_float16_compute_runs_and_matches_float32():
    fp32_model = build(moe_layer_num=1)
    fp16_model = build(moe_layer_num=1, compute_dtype="float16")
    ms.load_param_into_net(fp16_model, {p.name: Parameter(p.value(), p.name) for p in fp32_model.get_parameters()},
                           strict_load=True)
    ids = random_ids(8, (BATCH, SEQ + 1))
    loss32, grads32 = loss_and_grads(PanguSigmaWithLoss(fp32_model), ids)
    loss16, grads16 = loss_and_grads(PanguSigmaWithLoss(fp16_model), ids)
    assert math.isfinite(loss16) and abs(loss16 - loss32) < 1e-2
    for name, grad in grads16.items():
        assert grad.dtype == np.float32 and np.isfinite(grad).all(), name
        scale = np.abs(grads32[name]).max() + 1e-6
        assert np.abs(grad - grads32[name]).max() < 0.05 * scale + 1e-4, name


class TrainStep(nn.Cell):
    """One optimizer step on the total loss; returns the loss before the step."""

    def __init__(self, net, optimizer):
        super().__init__()
        self.optimizer = optimizer
        self.grad_fn = ms.value_and_grad(net, None, optimizer.parameters, has_aux=True)

    def construct(self, ids, domain_ids):
        outputs, grads = self.grad_fn(ids, domain_ids)
        self.optimizer(grads)
        return outputs[0]


def test_graph_mode_forward_backward_with_sparse_layers():
    net = PanguSigmaWithLoss(build(moe_layer_num=1))
    ids = random_ids(9, (BATCH, SEQ + 1))
    pynative_loss, pynative_grads = loss_and_grads(net, ids)
    ms.set_context(mode=ms.GRAPH_MODE)
    graph_loss, graph_grads = loss_and_grads(net, ids)
    assert abs(graph_loss - pynative_loss) < 1e-5
    for name, grad in graph_grads.items():
        np.testing.assert_allclose(grad, pynative_grads[name], rtol=1e-3, atol=1e-6, err_msg=name)


def test_graph_mode_training_lowers_loss():
    ms.set_context(mode=ms.GRAPH_MODE)
    net = PanguSigmaWithLoss(build(moe_layer_num=0))
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=3e-3, weight_decay=0.01, eps=1e-6)
    step = TrainStep(net, optimizer)
    step.set_train(True)
    ids = random_ids(10, (BATCH, SEQ + 1))
    losses = [float(step(ids, DOMAINS)) for _ in range(10)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_real_moe_layer_forward_backward_and_cache():
    """Against locmoe.layer.MoELayer (the default factory); capacity_factor = num_experts
    so no token is dropped and incremental decoding must match the full forward."""
    moe_cfg = MoEConfig(num_experts=EXPERTS, capacity_factor=float(EXPERTS), vocab_size=VOCAB)
    model = build(moe_layer_num=1, factory=None, moe_cfg=moe_cfg)
    assert "blocks.1.ffn.experts.w_in" in [p.name for p in model.get_parameters()]
    net = PanguSigmaWithLoss(model)
    ids = random_ids(11, (BATCH, SEQ + 1))
    loss, grads = loss_and_grads(net, ids)
    total, ce, aux, loc, load, dropped, local = net(ids, DOMAINS)
    assert math.isfinite(loss) and abs(float(total) - (float(ce) + float(aux) + float(loc))) < 1e-6
    assert load.shape == (1, EXPERTS) and float(load.sum()) == BATCH * SEQ and float(dropped.asnumpy()[0].sum()) == 0.0
    assert all(np.isfinite(g).all() for g in grads.values())
    model.set_train(False)
    prompt = ids.asnumpy()[:, :4]
    logits, cache = model.forward_with_cache(Tensor(prompt), DOMAINS)
    next_ids = logits.asnumpy()[:, -1].argmax(-1).astype(np.int32)[:, None]  # [B, 1]
    step_logits, _ = model.forward_with_cache(Tensor(next_ids), DOMAINS, cache, start_pos=4)
    full = model(Tensor(np.concatenate([prompt, next_ids], 1)), DOMAINS)[0].asnumpy()
    np.testing.assert_allclose(step_logits.asnumpy()[:, 0], full[:, -1], rtol=0, atol=1e-5)
