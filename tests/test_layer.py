"""MoELayer end to end against a numpy reference of the whole layer written here."""
import math
import os

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.special  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import nn, Tensor  # noqa: E402

from locmoe.config import MoEConfig  # noqa: E402
from locmoe.layer import MoELayer  # noqa: E402
from locmoe.topology import Topology  # noqa: E402
from np_reference import eq4_weight, np_softmax  # noqa: E402


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


B, S, D, H, E = 4, 8, 16, 32, 4
# rank r holds expert r; node 0 = ranks {0, 1} -> experts {0, 1}; node 1 -> {2, 3}
TOPO = Topology(world_size=4, tp=1, ep=4, num_experts=E, devices_per_node=2, rank=0)
GROUP_RANKS = {1: [0], 2: [0, 2]}
BIAS = np.array([0.6, 0.25, 0.0, -0.1], np.float32)  # skews LocMoE routing so that capacity overflows


# ---------------------------------------------------------------- numpy reference


def np_gelu(v):
    """Eq. 1's exact GeLU, x * Phi(x)."""
    return 0.5 * v * (1.0 + scipy.special.erf(v / math.sqrt(2.0)))


def np_layer(layer, router, x, groups, local_mask, cf, alpha, mu, eps, remote_cf=0.0, token_ids=None,
             reroute=False, locality_bias=0.0):
    """Route, capacity, first-come-first-served drop, expert FFN, combine; plus losses and stats.
    remote_cf > 0: two tiers, experts off the group's node get ceil(tokens * remote_cf / E) slots.
    reroute: a token over its slots tries its node-local experts, best gate probability first, one pass
    per local expert in token order; its R is then the new expert's probability (moe.reroute_overflow).
    locality_bias: LocMoE's b on the local experts' scores (no level 1: centred on the mean of the mask),
    for the routing decision and eqs. 5-6 only."""
    x = x.astype(np.float64)
    batch, seq, d = x.shape
    tokens = batch * seq // groups
    capacity = max(1, math.ceil(tokens * cf / E))
    remote_capacity = max(1, math.ceil(tokens * remote_cf / E)) if remote_cf else capacity
    xg = x.reshape(groups, tokens, d)
    if router == "locmoe":
        pre = xg @ eq4_weight(E, d).T + layer.router.gate.bias.asnumpy()
        scores = np.maximum(pre, 0.0)
    else:
        scores = pre = xg @ layer.router.gate.weight.asnumpy().astype(np.float64).T
    gate = np_softmax(scores)  # R of eq. 3
    mask = np.asarray(local_mask, np.float64)[:, None, :]  # [G, 1, E]
    probs = np_softmax(scores + locality_bias * (mask - mask.mean(-1, keepdims=True)))  # routing, eqs. 5-6
    idx = probs.argmax(-1)  # Switch: ties go to the first index
    order = None
    if token_ids is not None:  # ties: the token id's order (locmoe.routers.tie_order), written out
        factor = (np.asarray(token_ids, np.int64).reshape(groups, tokens, 1) * 61 + 1) % 1021  # [G, T, 1]
        order = factor * (np.arange(E) * 97 + 13) % 1021  # [G, T, E]
    if router == "locmoe":
        idx = np.where(probs == probs.max(-1, keepdims=True), order, -np.inf).argmax(-1)  # [G, T]
    srt = np.sort(probs, -1)
    gap = srt[..., -1] - srt[..., -2]
    assert np.all((gap > 1e-5) | (gap == 0)), "near-tie in the test data"
    w_in = layer.experts.w_in.asnumpy().astype(np.float64)
    w_out = layer.experts.w_out.asnumpy().astype(np.float64)
    y = np.zeros_like(xg)
    dropped = 0
    np_layer.dropped_remote = 0
    ffn = lambda g, t, e: gate[g, t, e] * (np_gelu(xg[g, t] @ w_in[e]) @ w_out[e])
    np_layer.rerouted = 0
    for g in range(groups):
        fill = np.zeros(E, int)
        limit = [capacity if local_mask[g][e] else remote_capacity for e in range(E)]
        waiting = []
        for t in range(tokens):
            e = idx[g, t]
            if fill[e] < limit[e]:
                y[g, t] = ffn(g, t, e)
                fill[e] += 1
            else:
                waiting.append(t)
        tried = {t: {idx[g, t]} for t in waiting}
        for _ in range(int(sum(local_mask[g])) if reroute else 0):
            for t in list(waiting):
                options = [e for e in range(E) if local_mask[g][e] and e not in tried[t]]
                if not options:
                    continue
                e = max(options, key=lambda e: (gate[g, t, e], order[g, t, e]))
                tried[t].add(e)
                if fill[e] < limit[e]:
                    y[g, t] = ffn(g, t, e)
                    fill[e] += 1
                    waiting.remove(t)
                    np_layer.rerouted += 1
        dropped += len(waiting)
        np_layer.dropped_remote += sum(int(not local_mask[g][idx[g, t]]) for t in waiting)
    aux = np.mean([alpha * E * np.sum(np.bincount(idx[g], minlength=E) / tokens * probs[g].mean(0))
                   for g in range(groups)])
    loc = 0.0
    if router == "locmoe":
        kls = []
        for g in range(groups):
            dc = probs[g].mean(0)
            dl = (1 - eps) * local_mask[g] / local_mask[g].sum() + eps / E
            kls.append(np.sum(dc * np.log(dc / dl)))
        loc = mu * np.mean(kls)
    load = np.bincount(idx.ravel(), minlength=E)
    local = sum(local_mask[g][idx[g]].sum() for g in range(groups))
    np_layer.local_by_group = [local_mask[g][idx[g]].sum() for g in range(groups)]
    return y.reshape(batch, seq, d), aux, loc, (load, dropped, local), capacity


def make_layer(router, groups, overlap=1, cf=1.0, seed=0, remote_cf=0.0, reroute=False):
    cfg = MoEConfig(num_experts=E, router=router, capacity_factor=cf, aux_loss_coef=0.01,
                    locality_loss_coef=0.05, locality_smoothing=1e-3, expert_parallel=1,
                    comm_overlap_degree=overlap, remote_capacity_factor=remote_cf, reroute_overflow=reroute)
    ms.set_seed(seed)
    layer = MoELayer(cfg, D, H, TOPO, param_init_std=0.5 if router == "switch" else 0.2,
                     token_groups=groups, group_ranks=GROUP_RANKS[groups])
    if router == "locmoe":
        layer.router.gate.bias.set_data(Tensor(BIAS))
    return layer, cfg


def copy_params(dst, src):
    for name, p in src.parameters_dict().items():
        dst.parameters_dict()[name].set_data(Tensor(p.asnumpy()))


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, S, D)).astype(np.float32)
    token_ids = rng.integers(0, 100, size=(B, S)).astype(np.int32)
    domain_ids = np.arange(B, dtype=np.int32)
    return x, token_ids, domain_ids


def run(layer, x, token_ids, domain_ids):
    y, aux, loc, stats = layer(Tensor(x), Tensor(token_ids), Tensor(domain_ids))
    load, dropped, local, dropped_remote, local_by_rank, rerouted = stats
    run.dropped_remote, run.local_by_rank = float(dropped_remote.asnumpy()), local_by_rank.asnumpy()
    run.rerouted = float(rerouted.asnumpy())
    return y.asnumpy(), float(aux.asnumpy()), float(loc.asnumpy()), (load.asnumpy(), float(dropped.asnumpy()),
                                                                      float(local.asnumpy()))


@pytest.mark.parametrize("router", ["locmoe", "switch"])
@pytest.mark.parametrize("groups", [1, 2])
def test_layer_matches_numpy(router, groups):
    layer, cfg = make_layer(router, groups)
    x, tok, dom = inputs(seed=groups)
    local_mask = np.array([TOPO.local_expert_mask(r) for r in GROUP_RANKS[groups]], np.float64)
    ref_y, ref_aux, ref_loc, (ref_load, ref_drop, ref_local), cap = np_layer(
        layer, router, x, groups, local_mask, cfg.capacity_factor, cfg.aux_loss_coef,
        cfg.locality_loss_coef, cfg.locality_smoothing, token_ids=tok)
    assert ref_drop > 0, "the case should overflow some expert"
    assert cap == B * S // groups // E

    y, aux, loc, (load, dropped, local) = run(layer, x, tok, dom)
    assert y.shape == (B, S, D) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-6)
    dropped_rows = np.all(ref_y == 0, -1)
    assert np.all(y[dropped_rows] == 0)  # dropped tokens: exactly zero from the MoE branch
    np.testing.assert_allclose(aux, ref_aux, rtol=1e-5)
    np.testing.assert_allclose(loc, ref_loc, rtol=1e-4, atol=1e-8)
    np.testing.assert_array_equal(load, ref_load)
    assert dropped == ref_drop and local == ref_local
    assert run.dropped_remote == np_layer.dropped_remote  # one tier: drops of tokens bound for other nodes
    np.testing.assert_array_equal(run.local_by_rank, np_layer.local_by_group)
    assert load.sum() == B * S


@pytest.mark.parametrize("router", ["locmoe", "switch"])
@pytest.mark.parametrize("groups", [1, 2])
def test_overlap_degree_does_not_change_output(router, groups):
    a, _ = make_layer(router, groups, overlap=1)
    b, _ = make_layer(router, groups, overlap=3, seed=1)
    copy_params(b, a)
    x, tok, dom = inputs(seed=5)
    ya, auxa, loca, sa = run(a, x, tok, dom)
    yb, auxb, locb, sb = run(b, x, tok, dom)
    np.testing.assert_allclose(yb, ya, rtol=1e-6, atol=1e-7)
    # the router is untouched by the overlap degree; CPU reductions may differ in the last bit
    np.testing.assert_allclose([auxb, locb], [auxa, loca], rtol=1e-6)
    np.testing.assert_array_equal(sa[0], sb[0])
    assert sa[1:] == sb[1:]


def test_capacity_factor_large_drops_nothing():
    layer, _ = make_layer("locmoe", 2, cf=float(E))
    x, tok, dom = inputs(seed=3)
    local_mask = np.array([TOPO.local_expert_mask(r) for r in GROUP_RANKS[2]], np.float64)
    ref_y, _, _, (_, ref_drop, _), _ = np_layer(layer, "locmoe", x, 2, local_mask, float(E), 0.01, 0.05, 1e-3,
                                                 token_ids=tok)
    y, _, _, (_, dropped, _) = run(layer, x, tok, dom)
    assert ref_drop == 0 and dropped == 0
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-6)


class _LossNet(nn.Cell):
    def __init__(self, layer, cot):
        super().__init__()
        self.layer = layer
        self.cot = cot

    def construct(self, x, token_ids, domain_ids):
        y, aux, loc, _ = self.layer(x, token_ids, domain_ids)
        return (y * self.cot).sum() + aux + loc


def _forward_backward(net, x, tok, dom):
    grad_fn = ms.value_and_grad(net, grad_position=0, weights=net.trainable_params())
    loss, (gx, gw) = grad_fn(Tensor(x), Tensor(tok), Tensor(dom))
    return float(loss.asnumpy()), gx.asnumpy(), [g.asnumpy() for g in gw]


def test_graph_mode_matches_pynative():
    x, tok, dom = inputs(seed=4)
    cot = Tensor(np.random.default_rng(6).normal(size=(B, S, D)).astype(np.float32))
    layer_p, _ = make_layer("locmoe", 2)
    layer_g, _ = make_layer("locmoe", 2, seed=2)
    copy_params(layer_g, layer_p)
    net_p, net_g = _LossNet(layer_p, cot), _LossNet(layer_g, cot)
    names = [p.name for p in net_p.trainable_params()]
    assert names == [p.name for p in net_g.trainable_params()]
    assert any("bias" in n for n in names) and any("w_in" in n for n in names)

    loss_p, gx_p, gw_p = _forward_backward(net_p, x, tok, dom)
    ms.set_context(mode=ms.GRAPH_MODE)
    loss_g, gx_g, gw_g = _forward_backward(net_g, x, tok, dom)
    ms.set_context(mode=ms.PYNATIVE_MODE)

    np.testing.assert_allclose(loss_g, loss_p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_g, gx_p, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(names, gw_g, gw_p):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(gx_p).max() > 0 and all(np.abs(g).max() > 0 for g in gw_p)


@pytest.mark.parametrize("groups, router, reroute, bias", [(1, "locmoe", False, 0.0), (2, "locmoe", False, 0.0),
                                                            (2, "locmoe", True, 0.3), (2, "switch", True, 0.0)])
def test_two_tier_layer_matches_numpy(groups, router, reroute, bias):
    """Node-local experts at capacity_factor, the others at remote_capacity_factor; drops per tier; with
    reroute_overflow the dropped tokens take free node-local slots (a learned locality bias b moving the
    routing, R from the unbiased gate), and the eval view (route) keeps the same tokens."""
    layer, cfg = make_layer(router, groups, cf=1.5 if router == "locmoe" else 1.0, remote_cf=0.5, reroute=reroute)
    if bias:
        layer.router.locality.bias.set_data(Tensor(np.array([bias], np.float32)))
    x, tok, dom = inputs(seed=groups + 5)
    local_mask = np.array([TOPO.local_expert_mask(r) for r in GROUP_RANKS[groups]], np.float64)
    ref_y, _, _, (ref_load, ref_drop, ref_local), _ = np_layer(
        layer, router, x, groups, local_mask, cfg.capacity_factor, cfg.aux_loss_coef,
        cfg.locality_loss_coef, cfg.locality_smoothing, remote_cf=0.5, token_ids=tok, reroute=reroute,
        locality_bias=bias)
    ref_remote = np_layer.dropped_remote
    if reroute:  # some rerouted, some still dropped (every local slot full)
        assert np_layer.rerouted > 0 and ref_drop > 0, "the case should reroute and still drop"
    else:
        assert ref_remote > 0 and ref_drop > ref_remote, "the case should drop in both tiers"
    y, aux, loc, stats = layer(Tensor(x), Tensor(tok), Tensor(dom))
    load, dropped, local, dropped_remote, local_by_rank, rerouted = (v.asnumpy() for v in stats)
    np.testing.assert_allclose(y.asnumpy(), ref_y, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(load, ref_load)
    assert float(dropped) == ref_drop and float(dropped_remote) == ref_remote and float(local) == ref_local
    assert float(rerouted) == (np_layer.rerouted if reroute else 0)  # the training log's count
    np.testing.assert_array_equal(local_by_rank, np_layer.local_by_group)  # one slot per group (posed rank)
    index, keep = (t.asnumpy() for t in layer.route(Tensor(x), Tensor(tok), Tensor(dom)))  # [G, T] each
    assert (1 - keep).sum() == ref_drop
    if reroute:  # eval's count of rerouted tokens, from the routed experts and the pairs' slots alone
        from pangu_sigma.evaluation.domain_stats import rerouted_tokens
        tokens = B * S // groups
        slots = np.where(local_mask > 0, math.ceil(tokens * cfg.capacity_factor / E), math.ceil(tokens * 0.5 / E))
        assert rerouted_tokens(index, keep > 0.5, slots).sum() == np_layer.rerouted


def test_two_tier_gradients_equal_one_tier_when_nothing_drops():
    """With capacities that drop nothing, two tiers change only the buffer layout: same y and gradients."""
    x, tok, dom = inputs(seed=3)
    one, _ = make_layer("switch", 2, cf=4.0)
    two, _ = make_layer("switch", 2, cf=4.0, remote_cf=4.0)
    copy_params(two, one)
    grads = []
    for layer in (one, two):
        net = nn.ForwardValueAndGrad(_Sum(layer), weights=layer.trainable_params(), get_all=True, get_by_list=True)
        value, (dx, dw) = net(Tensor(x), Tensor(tok), Tensor(dom))
        grads.append((value.asnumpy(), dx[0].asnumpy(), [g.asnumpy() for g in dw]))
    np.testing.assert_allclose(grads[1][0], grads[0][0], rtol=1e-6)
    np.testing.assert_allclose(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-7)
    for a, b in zip(grads[1][2], grads[0][2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # other row batching in the bmm


class _Sum(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, tok, dom):
        y, aux, loc, _ = self.layer(x, tok, dom)
        return (y * y).sum() + aux + loc
