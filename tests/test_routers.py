"""The four routers against numpy re-implementations written here (eqs. 2-6 of the LocMoE paper)."""
import os

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from locmoe.config import MoEConfig  # noqa: E402
from locmoe.routers import (build_router, LocMoERouter, SwitchRouter, HashRouter, RRERouter,  # noqa: E402
                            balanced_hash_table)
from locmoe.topology import Topology  # noqa: E402
from np_reference import eq4_weight, np_softmax  # noqa: E402


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")


# ---------------------------------------------------------------- numpy references


def np_group_allowed(domains, num_experts, num_groups):
    """[G, T, E] bool: expert e is in the level-1 group of the token's domain."""
    per = num_experts // num_groups
    return (np.arange(num_experts) // per)[None, None, :] == (domains % num_groups)[..., None]


def np_tie_order(token_ids, n):
    """LocMoE's tie order, written out: ((61 t + 1) mod 1021) * (97 e + 13) mod 1021."""
    factor = (np.asarray(token_ids, np.int64)[..., None] * 61 + 1) % 1021  # [G, T, 1]
    return factor * (np.arange(n) * 97 + 13) % 1021  # [G, T, E]


def np_route(scores, domains=None, num_groups=1, ties=None):
    """softmax over the allowed experts, argmax, its probability. Ties: the largest `ties` (LocMoE's
    tie order) among the tied experts, then the first index."""
    if num_groups > 1:
        allowed = np_group_allowed(domains, scores.shape[-1], num_groups)
        scores = np.where(allowed, scores, -np.inf)
    probs = np_softmax(scores)
    idx = probs.argmax(-1)  # numpy argmax: first maximal index
    if ties is not None:
        idx = np.where(probs == probs.max(-1, keepdims=True), ties, -np.inf).argmax(-1)
    return idx, np.take_along_axis(probs, idx[..., None], -1)[..., 0], probs


def np_aux(probs, idx, alpha):
    """alpha * n * sum_i f_i P_i per token group, averaged over groups."""
    groups, tokens, n = probs.shape
    vals = []
    for g in range(groups):
        f = np.bincount(idx[g], minlength=n) / tokens
        p = probs[g].mean(0)
        vals.append(alpha * n * np.sum(f * p))
    return float(np.mean(vals))


def np_loc(probs, mask, mu, eps):
    """mu * KL(D_c || D_l), D_c mean probs per group, D_l = (1-eps) mask/|local| + eps/E, averaged over groups."""
    n = probs.shape[-1]
    vals = []
    for g in range(probs.shape[0]):
        dc = probs[g].mean(0)
        dl = (1 - eps) * mask[g] / mask[g].sum() + eps / n
        terms = np.where(dc > 0, dc * np.log(np.where(dc > 0, dc, 1) / dl), 0.0)
        vals.append(mu * terms.sum())
    return float(np.mean(vals))


def assert_no_near_ties(probs, idx, tol=1e-5):
    """The reference argmax must be unambiguous unless it is an exact tie (then: first index)."""
    top = np.take_along_axis(probs, idx[..., None], -1)[..., 0]
    others = probs.copy()
    np.put_along_axis(others, idx[..., None], -1.0, -1)
    gap = top - others.max(-1)
    assert np.all((gap > tol) | (gap == 0)), "test data has a near-tie; pick another seed"


def call(router, x, token_ids=None, domains=None, mask=None):
    groups, tokens = x.shape[:2]
    n = router.num_experts
    token_ids = np.zeros((groups, tokens), np.int32) if token_ids is None else token_ids
    domains = np.zeros((groups, tokens), np.int32) if domains is None else domains
    mask = np.ones((groups, n), np.float32) if mask is None else mask
    out = router(Tensor(x.astype(np.float32)), Tensor(token_ids.astype(np.int32)),
                 Tensor(domains.astype(np.int32)), Tensor(mask.astype(np.float32)))
    return [o.asnumpy() for o in out[:5]]  # gate_probs, out[5]: test_locality_bias_routes_by_biased_scores_...


# world 4, 2 devices per node, ep 4, 4 experts: rank r holds expert r; node 0 = ranks {0, 1} -> experts {0, 1}
TOPO = Topology(world_size=4, tp=1, ep=4, num_experts=4, devices_per_node=2, rank=0)


def test_topology_fixture_local_experts():
    assert TOPO.local_experts(0) == [0, 1] and TOPO.local_experts(2) == [2, 3]
    assert TOPO.local_expert_mask(0) == [1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------- LocMoE
def _locmoe(n=4, d=16, alpha=0.01, mu=0.05, eps=1e-3, groups=1, bias=None, rate=1.0):
    cfg = MoEConfig(num_experts=n, router="locmoe", aux_loss_coef=alpha, locality_loss_coef=mu,
                    locality_smoothing=eps, num_domain_groups=groups, locality_bias_rate=rate)
    r = build_router(cfg, d)
    assert isinstance(r, LocMoERouter)
    if bias is not None:
        r.gate.bias.set_data(Tensor(np.asarray(bias, np.float32)))
    return r


def test_locmoe_matches_numpy():
    n, d, G, T = 4, 16, 2, 24
    rng = np.random.default_rng(0)
    b = np.array([0.3, -0.2, 0.1, 0.0], np.float32)
    alpha, mu, eps = 0.01, 0.05, 1e-3
    r = _locmoe(n, d, alpha, mu, eps, bias=b)
    x = rng.normal(size=(G, T, d)).astype(np.float32)
    mask = np.array([TOPO.local_expert_mask(0), TOPO.local_expert_mask(2)], np.float32)
    idx, prob, probs, aux, loc = call(r, x, mask=mask)

    pre = x.astype(np.float64) @ eq4_weight(n, d).T + b
    ref_idx, ref_prob, ref_probs = np_route(np.maximum(pre, 0.0), ties=np_tie_order(np.zeros((G, T)), n))
    assert_no_near_ties(ref_probs, ref_idx)
    assert idx.dtype == np.int32 and idx.shape == (G, T)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(prob, ref_prob, rtol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux, np_aux(ref_probs, ref_idx, alpha), rtol=1e-5)
    np.testing.assert_allclose(loc, np_loc(ref_probs, mask, mu, eps), rtol=1e-4)
    assert len(set(ref_idx.ravel())) > 1  # the case is not degenerate


def test_locmoe_ties_are_spread_by_token_id():
    n, d, T = 4, 16, 400
    r = _locmoe(n, d, bias=np.zeros(n))
    x = np.zeros((1, T, d), np.float32)
    x[0, :] = -1.0                      # every score ReLU'd to 0: all four experts tied
    x[0, 0, 8:12] = 1.0                 # token 0: block 2 alone, no tie
    ids = np.arange(T, dtype=np.int32)[None]  # [1, T] token ids 0..T-1
    idx, prob, probs, _, _ = call(r, x, token_ids=ids, mask=np.array([[0, 1, 0, 1]], np.float32))
    assert idx[0, 0] == 2
    share = np.bincount(idx[0, 1:], minlength=n) / (T - 1)
    assert share.min() > 0.15, share  # spread by the token id, not the first index; the local mask plays no part
    # token 5 by hand: factor (61*5 + 1) % 1021 = 306; experts 0..3: 306 * (13, 110, 207, 304) % 1021
    # = 915, 988, 40, 113 -> expert 1
    assert idx[0, 5] == 1
    np.testing.assert_allclose(prob[0, 1:], 0.25, rtol=1e-6)


def test_locmoe_ties_under_level1_match_numpy():
    # a negative bias puts many tokens' allowed scores all at ReLU's 0; argmax alone would send every such
    # token to its domain's lowest expert, which the aux loss cannot undo (no gradient through the ReLU)
    n, d, G, T = 8, 32, 2, 64
    rng = np.random.default_rng(4)
    b = np.full(n, -0.3, np.float32)
    cfg = MoEConfig(num_experts=n, router="locmoe", num_domain_groups=2, gate_bias=True)
    placed = np.zeros((2, n), np.float32)
    placed[0, [0, 1, 2, 3]] = 1
    placed[1, [2, 5, 6]] = 1
    r = build_router(cfg, d, domain_experts=placed)
    r.gate.bias.set_data(Tensor(b))
    x = rng.normal(size=(G, T, d)).astype(np.float32)
    domains = rng.integers(0, 2, size=(G, T)).astype(np.int32)
    ids = rng.integers(0, 5000, size=(G, T)).astype(np.int32)
    idx = call(r, x, token_ids=ids, domains=domains)[0]
    pre = x.astype(np.float64) @ eq4_weight(n, d).T + b  # [G, T, E]
    allowed = placed[domains] > 0
    probs = np_softmax(np.where(allowed, np.maximum(pre, 0), -np.inf))
    tied = allowed & (probs >= probs.max(-1, keepdims=True) * (1 - 1e-6))
    ref = np.where(tied, np_tie_order(ids, n), -np.inf).argmax(-1)
    assert (np.where(allowed, pre, -np.inf).max(-1) <= 0).mean() > 0.3  # many all-zero ties
    np.testing.assert_array_equal(idx, ref)
    for dom, members in ((0, [0, 1, 2, 3]), (1, [2, 5, 6])):  # ties spread over the domain's experts
        assert set(idx[domains == dom].tolist()) == set(members)


def test_locmoe_loss_values_with_skewed_probs():
    # group 0 puts (almost) all mass off-node, group 1 on-node: the smoothed KL is large but finite
    n, d, T = 4, 8, 6
    mu, eps = 1.0, 1e-4
    r = _locmoe(n, d, alpha=0.5, mu=mu, eps=eps, bias=np.zeros(n))
    x = np.zeros((2, T, d), np.float32)
    x[0, :, 4:6] = 20.0      # expert 2 (off-node for rank 0)
    x[1, :, 0:2] = 20.0      # expert 0 (on-node for rank 0)
    mask = np.array([TOPO.local_expert_mask(0)] * 2, np.float32)
    idx, _, probs, aux, loc = call(r, x, mask=mask)
    scores = np.maximum(x.astype(np.float64) @ eq4_weight(n, d).T, 0)
    ref_idx, _, ref_probs = np_route(scores)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(aux, np_aux(ref_probs, ref_idx, 0.5), rtol=1e-5)
    np.testing.assert_allclose(loc, np_loc(ref_probs, mask, mu, eps), rtol=1e-4)
    assert np.isfinite(loc) and loc > 5


def test_locality_gradient_step_moves_mass_to_local_experts():
    n, d, T = 4, 16, 32
    mu = 1.0
    r = _locmoe(n, d, alpha=0.0, mu=mu, eps=1e-3, bias=np.zeros(n))
    rng = np.random.default_rng(1)
    x0 = (np.abs(rng.normal(size=(1, T, d))) + 0.1).astype(np.float32)  # all GrAP scores > 0: ReLU active
    ids = np.zeros((1, T), np.int32)
    mask = np.array([TOPO.local_expert_mask(0)], np.float32)  # experts {0, 1}
    t_ids, t_dom, t_mask = Tensor(ids), Tensor(ids), Tensor(mask)

    def loc_loss(xt):
        return r(xt, t_ids, t_dom, t_mask)[4]

    grad = ms.grad(loc_loss)(Tensor(x0)).asnumpy()

    # gradient against central differences of the numpy reference (float64)
    w = eq4_weight(n, d)

    def ref_loss(xx):
        return np_loc(np_softmax(np.maximum(xx @ w.T, 0)), mask, mu, 1e-3)

    h = 1e-4
    x64 = x0.astype(np.float64)
    for (t, j) in [(0, 0), (3, 5), (10, 9), (31, 15), (17, 12)]:
        xp, xm = x64.copy(), x64.copy()
        xp[0, t, j] += h
        xm[0, t, j] -= h
        fd = (ref_loss(xp) - ref_loss(xm)) / (2 * h)
        np.testing.assert_allclose(grad[0, t, j], fd, rtol=2e-3, atol=1e-6)

    def local_mass(xx):
        return np_softmax(np.maximum(xx.astype(np.float64) @ w.T, 0))[..., :2].sum(-1).mean()

    before = local_mass(x0)
    x1 = x0 - 1.0 * grad
    after = local_mass(x1)
    assert after > before + 1e-3, (before, after)
    # the router itself agrees, and the loss went down
    p1 = call(r, x1, mask=mask)[2]
    assert p1[..., :2].sum(-1).mean() > before
    assert float(loc_loss(Tensor(x1)).asnumpy()) < float(loc_loss(Tensor(x0)).asnumpy())


def test_locmoe_domain_groups_stay_in_group():
    n, d, G, T, groups = 8, 16, 2, 64, 4
    r = _locmoe(n, d, groups=groups, bias=np.linspace(-0.2, 0.3, n))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(G, T, d)).astype(np.float32)
    x[:, ::3, 0:2] += 10.0  # a strong pull to expert 0 for every third token
    domains = rng.integers(0, 11, size=(G, T)).astype(np.int32)
    idx, prob, probs, aux, _ = call(r, x, domains=domains)
    per = n // groups
    np.testing.assert_array_equal(idx // per, domains % groups)
    allowed = np_group_allowed(domains, n, groups)
    assert np.all(probs[~allowed] == 0)
    pre = x.astype(np.float64) @ eq4_weight(n, d).T + r.gate.bias.asnumpy()
    ref_idx, ref_prob, ref_probs = np_route(np.maximum(pre, 0), domains, groups,
                                            ties=np_tie_order(np.zeros((G, T)), n))
    assert_no_near_ties(ref_probs, ref_idx)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(prob, ref_prob, rtol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux, np_aux(ref_probs, ref_idx, 0.01), rtol=1e-5)


# ---------------------------------------------------------------- Switch
def _switch(n=4, d=16, alpha=0.01, jitter=0.0, groups=1):
    cfg = MoEConfig(num_experts=n, router="switch", aux_loss_coef=alpha, switch_jitter=jitter,
                    num_domain_groups=groups)
    r = build_router(cfg, d, init_std=0.5)
    assert isinstance(r, SwitchRouter)
    return r


def test_switch_matches_numpy():
    n, d, G, T = 4, 16, 2, 24
    r = _switch(n, d, alpha=0.02)
    w = r.gate.weight.asnumpy().astype(np.float64)
    assert w.shape == (n, d)
    x = np.random.default_rng(3).normal(size=(G, T, d)).astype(np.float32)
    idx, prob, probs, aux, loc = call(r, x)
    ref_idx, ref_prob, ref_probs = np_route(x.astype(np.float64) @ w.T)
    assert_no_near_ties(ref_probs, ref_idx)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(prob, ref_prob, rtol=1e-5)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux, np_aux(ref_probs, ref_idx, 0.02), rtol=1e-5)
    assert loc == 0


def test_switch_tie_first_index_and_domain_groups():
    n, d = 4, 8
    r = _switch(n, d, groups=2)
    w = np.random.default_rng(4).normal(size=(n, d)).astype(np.float32)
    w[3] = w[2]  # experts 2 and 3 always tie
    w[1] = w[0]  # experts 0 and 1 always tie
    r.gate.weight.set_data(Tensor(w))
    x = np.random.default_rng(5).normal(size=(1, 10, d)).astype(np.float32)
    domains = np.array([[0, 1] * 5], np.int32)
    idx, _, probs, _, _ = call(r, x, domains=domains)
    np.testing.assert_array_equal(idx[0], [0, 2] * 5)
    np.testing.assert_allclose(probs[0, np.arange(10), idx[0]], 0.5, rtol=1e-6)      # chosen expert
    np.testing.assert_allclose(probs[0, np.arange(10), idx[0] + 1], 0.5, rtol=1e-6)  # its tied twin
    np.testing.assert_allclose(probs[0].sum(-1), 1.0, rtol=1e-6)


def test_switch_jitter_off_in_eval():
    n, d = 4, 16
    r = _switch(n, d, jitter=0.5)
    w = r.gate.weight.asnumpy().astype(np.float64)
    x = np.random.default_rng(6).normal(size=(2, 16, d)).astype(np.float32)
    ref_idx, ref_prob, ref_probs = np_route(x.astype(np.float64) @ w.T)
    r.set_train(False)
    for _ in range(2):
        idx, prob, probs, _, _ = call(r, x)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
    # sanity: in training the jitter does perturb the probabilities
    r.set_train(True)
    train_probs = call(r, x)[2]
    assert np.abs(train_probs - ref_probs).max() > 1e-4
    r.set_train(False)


# ---------------------------------------------------------------- Hash
def _zipf_stream(vocab, exponent, tokens, seed):
    rng = np.random.default_rng(seed)
    p = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    p /= p.sum()
    ids = rng.permutation(vocab)  # frequency rank -> token id, so ids are not sorted by frequency
    return ids[rng.choice(vocab, size=tokens, p=p)].astype(np.int32)


def _hash_loads(stream, vocab, n):
    counts = np.bincount(stream, minlength=vocab)
    cfg = MoEConfig(num_experts=n, router="hash", vocab_size=vocab)
    r = build_router(cfg, 4, token_counts=counts)
    assert isinstance(r, HashRouter)
    x = np.zeros((1, len(stream), 1), np.float32)
    idx, prob, probs, aux, loc = call(r, x, token_ids=stream[None, :])
    assert np.all(prob == 1) and aux == 0 and loc == 0
    np.testing.assert_array_equal(probs[0], np.eye(n)[idx[0]])
    return counts, np.bincount(idx[0], minlength=n)


def test_hash_balanced_on_zipf_stream():
    # exponent 1.0: the most frequent token is 10.5% of the stream, below 1.05/8 -> 1.05 is reachable
    vocab, n = 8000, 8
    stream = _zipf_stream(vocab, 1.0, 100_000, seed=7)
    counts, load = _hash_loads(stream, vocab, n)
    assert counts.max() * n < 1.05 * len(stream)
    assert load.sum() == len(stream)
    assert load.max() / load.mean() <= 1.05, load


def test_hash_zipf_1_1_at_the_single_token_bound():
    # exponent 1.1 over 8000 ids: the top token alone is ~15% of the stream (> 1/8), so no token -> expert
    # table can reach max/mean <= 1.05; the best possible is max(mean, top count). Check we are within 5% of it.
    vocab, n = 8000, 8
    stream = _zipf_stream(vocab, 1.1, 100_000, seed=8)
    counts, load = _hash_loads(stream, vocab, n)
    best = max(load.mean(), counts.max())
    assert load.max() <= 1.05 * best, (load, counts.max())
    # and the experts not holding the top token share the rest evenly
    top_expert = load.argmax()
    rest = np.delete(load, top_expert)
    assert rest.max() / rest.mean() <= 1.05, load


def test_hash_table_is_a_frozen_parameter(tmp_path):
    cfg = MoEConfig(num_experts=4, router="hash", vocab_size=50)
    r = build_router(cfg, 8, token_counts=np.arange(50))
    params = r.parameters_dict()
    assert "table" in params
    table = params["table"]
    assert isinstance(table, ms.Parameter) and not table.requires_grad
    assert table.shape == (50,) and table.dtype == ms.int32
    assert len(r.trainable_params()) == 0
    path = str(tmp_path / "hash.ckpt")
    ms.save_checkpoint(r, path)
    saved = ms.load_checkpoint(path)
    assert "table" in saved
    np.testing.assert_array_equal(saved["table"].asnumpy(), table.asnumpy())


def test_hash_unseen_ids_spread_evenly():
    counts = np.zeros(40, np.int64)
    counts[0] = 100  # one frequent id; 39 ids never seen
    table = balanced_hash_table(counts, 4)
    unseen = np.bincount(table[counts == 0], minlength=4)
    assert unseen.max() - unseen.min() <= 1, unseen


# ---------------------------------------------------------------- RRE
def test_rre_stays_in_domain_group_and_uses_all_experts():
    n, groups, vocab = 8, 4, 1000
    cfg = MoEConfig(num_experts=n, router="rre", num_domain_groups=groups, vocab_size=vocab, table_seed=11)
    r = build_router(cfg, 4)
    assert isinstance(r, RRERouter)
    rng = np.random.default_rng(9)
    G, T = 4, 500
    tokens = rng.integers(0, vocab, size=(G, T)).astype(np.int32)
    domains = rng.integers(0, 37, size=(G, T)).astype(np.int32)
    idx, prob, probs, aux, loc = call(r, np.zeros((G, T, 1), np.float32), token_ids=tokens, domains=domains)
    per = n // groups
    np.testing.assert_array_equal(idx // per, domains % groups)
    assert np.all(prob == 1) and aux == 0 and loc == 0
    np.testing.assert_array_equal(probs, np.eye(n)[idx])
    for g in range(groups):
        used = set(idx[domains % groups == g].tolist())
        assert used == set(range(g * per, (g + 1) * per)), (g, used)
    # level 2 depends on the token only: the same token in two domains of one group -> the same expert
    same = call(r, np.zeros((1, 2, 1), np.float32), token_ids=np.array([[5, 5]]), domains=np.array([[1, 5]]))[0]
    assert same[0, 0] == same[0, 1]
    assert len(r.trainable_params()) == 0 and "table" in r.parameters_dict()


# ---------------------------------------------------------------- level 1: explicit map and placement masks
def test_level1_explicit_map_and_placement_mask():
    from locmoe.routers import level1_domain_experts, random_table

    n, vocab = 8, 300
    cfg = MoEConfig(num_experts=n, router="rre", num_domain_groups=4, domain_to_group=(2, 0, 3), vocab_size=vocab,
                    table_seed=5)
    mask = level1_domain_experts(cfg)
    assert mask.shape == (3, n) and np.nonzero(mask[0])[0].tolist() == [4, 5]  # domain 0 -> group 2
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, vocab, size=(2, 200)).astype(np.int32)
    domains = rng.integers(0, 3, size=(2, 200)).astype(np.int32)
    idx = call(build_router(cfg, 4), np.zeros((2, 200, 1), np.float32), token_ids=tokens, domains=domains)[0]
    raw = random_table(vocab, 2, 5)
    np.testing.assert_array_equal(idx, np.array([2, 0, 3])[domains] * 2 + raw[tokens])
    # a placement's unequal, overlapping groups: member (table mod size) of the domain's experts
    placed = np.zeros((2, n), np.float32)
    placed[0, [0, 1, 2]] = 1
    placed[1, [2, 6]] = 1
    idx = call(build_router(cfg, 4, domain_experts=placed), np.zeros((2, 200, 1), np.float32), token_ids=tokens,
               domains=domains % 2)[0]
    raw = random_table(vocab, 6, 5)  # lcm(3, 2)
    members = [[0, 1, 2], [2, 6]]
    expected = np.array([[members[d][raw[t] % len(members[d])] for t, d in zip(rt, rd)]
                         for rt, rd in zip(tokens, domains % 2)])
    np.testing.assert_array_equal(idx, expected)
    # learned routers stay inside the mask
    lcfg = MoEConfig(num_experts=n, router="locmoe", num_domain_groups=2)
    x = rng.normal(size=(2, 200, 16)).astype(np.float32)
    idx = call(build_router(lcfg, 16, domain_experts=placed), x, token_ids=tokens, domains=domains % 2)[0]
    for d in range(2):
        assert set(idx[domains % 2 == d].tolist()) <= set(members[d])


# ---------------------------------------------------------------- LocMoE's learned locality bias
def np_locality_bias_grad(pre, masks, b, alpha, mu, eps):
    """d(aux + loc)/db by the derivation of docs/routing.md (not by differencing): per group g and token t,
    p = softmax(relu(pre) + b m_g), pi_t = sum_j p_tj m_gj, dp_ti/db = p_ti (m_gi - pi_t); eq. 5 gives
    alpha E sum_i f_i mean_t dp_ti/db, eq. 6 gives mu sum_i (log(D_c,i / D_l,i) + 1) mean_t dp_ti/db;
    both averaged over the groups."""
    groups, tokens, n = pre.shape
    total = 0.0
    for g in range(groups):
        p = np_softmax(np.maximum(pre[g], 0) + b * masks[g])  # [T, E]
        pi = (p * masks[g]).sum(-1, keepdims=True)  # [T, 1]
        dp = (p * (masks[g] - pi)).mean(0)  # [E] d(mean_t p_ti)/db
        f = np.bincount(p.argmax(-1), minlength=n) / tokens
        dc = p.mean(0)
        dl = (1 - eps) * masks[g] / masks[g].sum() + eps / n
        total += alpha * n * (f * dp).sum() + mu * ((np.log(dc / dl) + 1) * dp).sum()
    return total / groups


def test_locality_bias_routes_by_biased_scores_and_gates_by_unbiased():
    n, d, G, T = 4, 16, 2, 48
    alpha, mu, eps, b = 0.01, 0.05, 1e-3, 0.3
    r = _locmoe(n, d, alpha, mu, eps, bias=np.array([0.2, -0.1, 0.1, 0.05], np.float32))
    r.locality.bias.set_data(Tensor(np.array([b], np.float32)))
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(G, T, d)) + 0.3).astype(np.float32)
    mask = np.array([TOPO.local_expert_mask(0), TOPO.local_expert_mask(2)], np.float32)  # {0,1} and {2,3}
    idx, prob, probs, aux, loc = call(r, x, mask=mask)
    gate_probs = r(Tensor(x), Tensor(np.zeros((G, T), np.int32)), Tensor(np.zeros((G, T), np.int32)),
                   Tensor(mask))[5].asnumpy()  # the sixth field: what a rerouted token's R is read from
    scores = np.maximum(x.astype(np.float64) @ eq4_weight(n, d).T + r.gate.bias.asnumpy(), 0)  # [G, T, E]
    np.testing.assert_allclose(gate_probs, np_softmax(scores), rtol=1e-5, atol=1e-7)
    biased = scores + b * mask[:, None, :]
    ref_idx, _, ref_probs = np_route(biased, ties=np_tie_order(np.zeros((G, T)), n))
    assert_no_near_ties(ref_probs, ref_idx)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-7)
    gate = np_softmax(scores)  # eq. 3's R: the unbiased distribution
    np.testing.assert_allclose(prob, np.take_along_axis(gate, ref_idx[..., None], -1)[..., 0], rtol=1e-5)
    np.testing.assert_allclose(aux, np_aux(ref_probs, ref_idx, alpha), rtol=1e-5)
    np.testing.assert_allclose(loc, np_loc(ref_probs, mask, mu, eps), rtol=1e-4)
    unbiased_idx = np_route(scores, ties=np_tie_order(np.zeros((G, T)), n))[0]
    local_of = np.take_along_axis(np.broadcast_to(mask[:, None, :], (G, T, n)), idx[..., None], -1)
    local_unbiased = np.take_along_axis(np.broadcast_to(mask[:, None, :], (G, T, n)), unbiased_idx[..., None], -1)
    assert local_of.mean() > local_unbiased.mean()  # the bias moved tokens onto their group's node


@pytest.mark.parametrize("rate", [1.0, 2.5])
def test_locality_bias_gradient_summed_over_ranks_matches_numpy(rate):
    # two groups on different nodes see the same tokens: with a replicated gate their locality pulls cancel
    # on the gate, but not on b, whose effect on each group goes through that group's own mask. rate: the
    # stored theta is b / rate, and its gradient is b's (moe.locality_bias_rate)
    n, d, T = 8, 16, 40
    alpha, mu, eps = 0.01, 0.01, 1e-4
    r = _locmoe(n, d, alpha, mu, eps, bias=np.zeros(n), rate=rate)
    rng = np.random.default_rng(3)
    one = (rng.normal(size=(1, T, d)) + 0.2).astype(np.float32)
    x = np.concatenate([one, one], 0)  # [2, T, d] identical token groups
    mask = np.zeros((2, n), np.float32)
    mask[0, [0, 1]] = 1
    mask[1, [6, 7]] = 1
    ids, t_mask = Tensor(np.zeros((2, T), np.int32)), Tensor(mask)
    for b in (0.0, 0.4):
        r.locality.bias.set_data(Tensor(np.array([b / rate], np.float32)))

        def losses(xt):
            out = r(xt, ids, ids, t_mask)
            return out[3] + out[4]

        grad_b = ms.grad(losses, grad_position=None, weights=[r.locality.bias])(Tensor(x))[0].asnumpy()[0]
        pre = x.astype(np.float64) @ eq4_weight(n, d).T
        ref = np_locality_bias_grad(pre, mask, b, alpha, mu, eps)
        np.testing.assert_allclose(grad_b, ref, rtol=2e-3, atol=1e-7)
        assert grad_b < 0  # descent raises b: more mass on each group's own node
    # the independent check of the derivation: central differences of the numpy losses
    h = 1e-5

    def np_losses(b):
        pre = x.astype(np.float64) @ eq4_weight(n, d).T
        probs = np_softmax(np.maximum(pre, 0) + b * mask[:, None, :])
        return np_aux(probs, probs.argmax(-1), alpha) + np_loc(probs, mask, mu, eps)

    pre = x.astype(np.float64) @ eq4_weight(n, d).T
    np.testing.assert_allclose(np_locality_bias_grad(pre, mask, 0.4, alpha, mu, eps),
                               (np_losses(0.4 + h) - np_losses(0.4 - h)) / (2 * h), rtol=1e-3)


def test_locality_bias_exists_only_when_eq6_can_train_it():
    assert _locmoe(mu=0.0).locality is None  # mu = 0: the router decides from the token (and level 1) alone
    cfg = MoEConfig(num_experts=4, router="locmoe", locality_loss_coef=0.01, locality_bias=False)
    assert build_router(cfg, 16).locality is None
    r = _locmoe(mu=0.01)
    assert r.locality is not None and float(r.locality.bias.asnumpy()[0]) == 0.0
    assert [p.name for p in r.trainable_params()] == ["gate.bias", "locality.bias"]


def test_striped_level1_groups_by_hand():
    from locmoe.placement import striped_level1_groups

    # 4 nodes x 2 devices, 8 experts one per rank: node k holds {2k, 2k+1}; order by (index in node, node)
    # = 0 2 4 6 1 3 5 7, cut in two: group 0 = {0, 2, 4, 6}, group 1 = {1, 3, 5, 7}: one of each per node
    topo = Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2, rank=0)
    mask = striped_level1_groups(2, topo)
    np.testing.assert_array_equal(mask, [[1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 1, 0, 1]])
    # 16 experts on 2 nodes (8 each), 4 groups: node 0 holds 0-7, node 1 8-15; order 0 8 1 9 2 10 ...
    topo = Topology(world_size=4, tp=1, ep=4, num_experts=16, devices_per_node=2, rank=0)
    mask = striped_level1_groups(4, topo)
    assert [list(np.nonzero(row)[0]) for row in mask] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13],
                                                         [6, 7, 14, 15]]


def test_locality_bias_gradient_is_exactly_zero_when_every_allowed_expert_is_local():
    # level 1 puts domain 0 on experts {0, 1}, both on group 0's node: b cannot move anything there, and its
    # gradient must be 0, not rounding noise (Adam turns any nonzero gradient into a step of about lr)
    n, d, T = 4, 16, 24
    cfg = MoEConfig(num_experts=n, router="locmoe", aux_loss_coef=0.01, locality_loss_coef=0.05,
                    num_domain_groups=2)
    r = build_router(cfg, d, domain_experts=np.array([[1, 1, 0, 0], [0, 0, 1, 1]], np.float32))
    r.locality.bias.set_data(Tensor(np.array([0.3], np.float32)))
    x = Tensor((np.random.default_rng(5).normal(size=(1, T, d)) + 0.2).astype(np.float32))
    ids = Tensor(np.zeros((1, T), np.int32))
    mask = Tensor(np.array([[1, 1, 0, 0]], np.float32))

    def losses(xt):
        out = r(xt, ids, ids, mask)
        return out[3] + out[4]

    assert ms.grad(losses, grad_position=None, weights=[r.locality.bias])(x)[0].asnumpy()[0] == 0.0
