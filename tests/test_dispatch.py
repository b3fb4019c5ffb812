"""Index-based dispatch/combine against hand-worked slots and a numpy first-come-first-served reference."""
import os

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from locmoe.dispatch import assign_slots, dispatch, combine, token_of_slot  # noqa: E402


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")


# Two token groups, 6 tokens each, 2 experts, capacity 2 per (group, expert).
# group 0: experts [0,1,0,0,1,0] -> expert 0 keeps tokens 0,2; expert 1 keeps 1,4; tokens 3,5 dropped
# group 1: experts [1,1,1,1,0,1] -> expert 1 keeps 0,1; expert 0 keeps 4 (one slot left empty);
#          tokens 2,3,5 dropped. Group 0 filling its buffers does not consume group 1's capacity.
E, C = 2, 2
EXPERTS = np.array([[0, 1, 0, 0, 1, 0],
                    [1, 1, 1, 1, 0, 1]], np.int32)
G, T = EXPERTS.shape
DROP = G * E * C  # 8
# slot = g*E*C + e*C + position
SLOTS = np.array([[0, 2, 1, DROP, 3, DROP],
                  [6, 7, DROP, DROP, 4, DROP]], np.int32)
KEEP = np.array([[1, 1, 1, 0, 1, 0],
                 [1, 1, 0, 0, 1, 0]], np.float32)
# buffer[g, e, c] holds token (g, t) or None
BUFFER_TOKENS = {(0, 0, 0): 0, (0, 0, 1): 2, (0, 1, 0): 1, (0, 1, 1): 4,
                 (1, 0, 0): 4, (1, 0, 1): None, (1, 1, 0): 0, (1, 1, 1): 1}


def _x(hidden=3, seed=0):
    return np.random.default_rng(seed).normal(size=(G, T, hidden)).astype(np.float32) + 0.5


def test_assign_slots_hand_worked():
    slot, keep, onehot = assign_slots(Tensor(EXPERTS), E, C)
    np.testing.assert_array_equal(slot.asnumpy(), SLOTS.reshape(-1))
    np.testing.assert_array_equal(keep.asnumpy(), KEEP)
    np.testing.assert_array_equal(onehot.asnumpy(), np.eye(E, dtype=np.float32)[EXPERTS])


def test_capacity_is_per_group():
    # same routing for a single group on its own: its slots are those of group 0 above
    slot, keep, _ = assign_slots(Tensor(EXPERTS[1:]), E, C)
    np.testing.assert_array_equal(keep.asnumpy(), KEEP[1:])
    np.testing.assert_array_equal(slot.asnumpy(), np.where(SLOTS[1] == DROP, E * C, SLOTS[1] - E * C))


def test_dispatch_buffer_rows_hand_worked():
    x = _x()
    slot, _, _ = assign_slots(Tensor(EXPERTS), E, C)
    buf = dispatch(Tensor(x), slot, E, C).asnumpy()
    assert buf.shape == (G, E, C, x.shape[-1])
    for (g, e, c), t in BUFFER_TOKENS.items():
        expected = np.zeros(x.shape[-1], np.float32) if t is None else x[g, t]
        np.testing.assert_array_equal(buf[g, e, c], expected, err_msg=str((g, e, c)))


def test_token_of_slot_inverse():
    slot, _, _ = assign_slots(Tensor(EXPERTS), E, C)
    src = token_of_slot(slot, G * E * C, G * T).asnumpy()
    expected = [G * T if t is None else g * T + t
                for (g, e, c), t in sorted(BUFFER_TOKENS.items())]
    np.testing.assert_array_equal(src, expected)


@pytest.mark.parametrize("mask_weight", [True, False])
def test_identity_experts_roundtrip(mask_weight):
    x = _x(hidden=4, seed=1)
    prob = np.random.default_rng(2).uniform(0.2, 1.0, size=(G, T)).astype(np.float32)
    slot, keep, _ = assign_slots(Tensor(EXPERTS), E, C)
    weight = Tensor(prob) * keep if mask_weight else Tensor(prob)
    y = combine(dispatch(Tensor(x), slot, E, C), slot, weight).asnumpy()
    expected = prob[..., None] * x * KEEP[..., None]  # dropped tokens: 0 even with an unmasked weight
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=0)
    assert np.all(y[KEEP == 0] == 0)


def test_roundtrip_gradient():
    x = _x(hidden=4, seed=3)
    prob = np.random.default_rng(4).uniform(0.2, 1.0, size=(G, T)).astype(np.float32)
    cot = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    slot, keep, _ = assign_slots(Tensor(EXPERTS), E, C)
    w = Tensor(prob) * keep

    def f_sum(xt):
        return combine(dispatch(xt, slot, E, C), slot, w).sum()

    def f_cot(xt, wt):
        return (combine(dispatch(xt, slot, E, C), slot, wt) * Tensor(cot)).sum()

    g = ms.grad(f_sum)(Tensor(x)).asnumpy()
    np.testing.assert_allclose(g, np.broadcast_to((prob * KEEP)[..., None], x.shape), rtol=1e-6)
    gx, gw = ms.grad(f_cot, grad_position=(0, 1))(Tensor(x), w)
    np.testing.assert_allclose(gx.asnumpy(), (prob * KEEP)[..., None] * cot, rtol=1e-6, atol=1e-7)
    # d/dweight: the expert output row seen by the token (x itself), 0 for a dropped token
    np.testing.assert_allclose(gw.asnumpy(), (x * cot).sum(-1) * KEEP, rtol=1e-5, atol=1e-6)


def _np_fcfs(experts, num_experts, capacity):
    groups, tokens = experts.shape
    slot = np.full((groups, tokens), groups * num_experts * capacity, np.int64)
    for g in range(groups):
        fill = [0] * num_experts
        for t in range(tokens):
            e = experts[g, t]
            if fill[e] < capacity:
                slot[g, t] = g * num_experts * capacity + e * capacity + fill[e]
            fill[e] += 1
    return slot


@pytest.mark.parametrize("groups,tokens,num_experts,capacity", [(3, 20, 4, 3), (1, 7, 3, 1), (2, 9, 5, 9)])
def test_random_against_numpy(groups, tokens, num_experts, capacity):
    rng = np.random.default_rng(groups * 100 + tokens)
    experts = rng.integers(0, num_experts, size=(groups, tokens)).astype(np.int32)
    hidden = 3
    x = rng.normal(size=(groups, tokens, hidden)).astype(np.float32)
    prob = rng.uniform(0.1, 1, size=(groups, tokens)).astype(np.float32)
    ref_slot = _np_fcfs(experts, num_experts, capacity)
    drop = groups * num_experts * capacity
    ref_keep = (ref_slot < drop).astype(np.float32)

    slot, keep, _ = assign_slots(Tensor(experts), num_experts, capacity)
    np.testing.assert_array_equal(slot.asnumpy(), ref_slot.reshape(-1))
    np.testing.assert_array_equal(keep.asnumpy(), ref_keep)

    ref_buf = np.zeros((drop + 1, hidden), np.float32)
    ref_buf[ref_slot.reshape(-1)] = x.reshape(-1, hidden)
    ref_buf[drop] = 0
    buf = dispatch(Tensor(x), slot, num_experts, capacity).asnumpy()
    np.testing.assert_array_equal(buf.reshape(-1, hidden), ref_buf[:drop])

    y = combine(Tensor(buf * 2.0), slot, Tensor(prob) * keep).asnumpy()
    np.testing.assert_allclose(y, 2.0 * x * (prob * ref_keep)[..., None], rtol=1e-6)


def test_top1_index_ties_and_allowed_match_a_loop():
    """locmoe.selection.top1_index (routing's and rerouting's rule) against a plain loop: the largest score
    among the allowed entries, ties to the largest tie order; scores drawn from 3 values so ties are common."""
    from locmoe.selection import top1_index
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 3, (4, 9, 5)).astype(np.float32)  # [G, T, E]
    ties = np.stack([rng.permutation(5) for _ in range(36)]).reshape(4, 9, 5).astype(np.float32)
    allowed = rng.random((4, 9, 5)) < 0.6
    allowed[..., 0] |= ~allowed.any(-1)  # every row has an allowed entry
    got_plain = top1_index(Tensor(scores)).asnumpy()
    got_ties = top1_index(Tensor(scores), Tensor(ties)).asnumpy()
    got_allowed = top1_index(Tensor(scores), Tensor(ties), Tensor(allowed)).asnumpy()
    for g, t in np.ndindex(4, 9):
        s, o, a = scores[g, t], ties[g, t], allowed[g, t]
        assert got_plain[g, t] == int(np.argmax(s))  # no tie order: the lowest index among the maxima
        best = [e for e in range(5) if s[e] == s.max()]
        assert got_ties[g, t] == max(best, key=lambda e: o[e])
        best = [e for e in range(5) if a[e] and s[e] == s[a].max()]
        assert got_allowed[g, t] == max(best, key=lambda e: o[e])
