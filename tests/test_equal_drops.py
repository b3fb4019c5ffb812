"""Equal-drops calibration (pangu_sigma.tools.equal_drops): the arithmetic against a hand-worked
example, and first-come-first-served drops against the layer's own slot assignment."""
import numpy as np
import pytest

from locmoe.capacity import expert_capacity
from pangu_sigma.evaluation.domain_stats import pair_counts_of
from pangu_sigma.tools.equal_drops import (drops_at, factor_for_capacity, smallest_remote_capacity,
                                           tier_drop_rates)

# 2 token groups x 4 experts; group 0's node holds experts {0, 1}, group 1's {2, 3}.
MASK = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
# one MoE layer, two batches of 8 tokens per group: routed tokens per (batch, group, expert)
COUNTS = np.array([[[[4, 1, 3, 0], [0, 2, 4, 2]],
                    [[2, 2, 0, 4], [3, 0, 4, 1]]]])  # [M=1, N=2, G=2, E=4], 32 tokens


def test_hand_worked_drops_per_tier():
    # local pairs at C_l = 3: 4->1, 1, 4->1, 2 | 2, 2, 4->1, 1: 3 dropped
    # remote pairs (3, 0, 0, 2 | 0, 4, 3, 0): C_r=1: 2+1+3+2 = 8; C_r=2: 1+2+1 = 4; C_r=3: 1; C_r=4: 0
    for remote_capacity, remote_drops in ((1, 8), (2, 4), (3, 1), (4, 0)):
        local, remote = tier_drop_rates(COUNTS, MASK, 3, remote_capacity)
        assert local.tolist() == [3 / 32] and remote.tolist() == [remote_drops / 32]


@pytest.mark.parametrize("target, multiple, expected", [
    (0.15, 1, 3),       # 3 -> (3 + 1) / 32 = 12.5% <= 15%; 2 -> 7/32 = 21.9%
    (0.20, 1, 3),
    (0.25, 1, 2),       # 21.9% <= 25%
    (3 / 32, 1, 4),     # only C_r = 4 leaves just the local tier's 3 drops
    (0.15, 2, 4),       # multiples of 2: 2 -> 21.9%, 4 -> 9.4%
])
def test_hand_worked_smallest_remote_capacity(target, multiple, expected):
    found = smallest_remote_capacity(COUNTS, MASK, 3, target, multiple)
    assert found["capacity"] == expected
    assert found["drop_rate"] <= target and found["local_drop_rate"] == 3 / 32


def test_the_local_tier_alone_over_the_target_gives_no_capacity():
    assert smallest_remote_capacity(COUNTS, MASK, 3, 0.09)["capacity"] is None


def test_the_target_is_on_the_mean_over_layers():
    no_drops = np.array([[[[1, 1, 0, 0], [0, 0, 1, 1]]] * 2])  # a second layer that drops nothing
    both = np.concatenate([COUNTS, no_drops])  # [2, 2, 2, 4]
    # layer 1 at C_r = 3: 12.5%, layer 2: 0 -> mean 6.25% <= 7%; C_r = 2: (21.9 + 0) / 2 = 10.9%
    assert smallest_remote_capacity(both, MASK, 3, 0.07)["capacity"] == 3
    assert smallest_remote_capacity(both, MASK, 3, 0.10)["capacity"] == 3
    assert smallest_remote_capacity(both, MASK, 3, 0.11)["capacity"] == 2


def test_factor_gives_the_capacity_back():
    for tokens, experts in ((128, 8), (96, 7), (1000, 64), (17, 3)):
        for capacity in range(1, 3 * tokens // experts):
            assert expert_capacity(tokens, factor_for_capacity(capacity, tokens, experts), experts) == capacity


def test_first_come_first_served_drops_match_the_layers_slots():
    """drops_at on pair counts == the tokens assign_tiered_slots (the layer's two-tier slot
    assignment) leaves without a slot, for random routing at several capacities."""
    from mindspore import Tensor
    from locmoe.dispatch import assign_tiered_slots, tier_layout

    rng = np.random.default_rng(0)
    expert_index = rng.choice(4, size=(2, 40), p=[0.4, 0.3, 0.2, 0.1]).astype(np.int32)  # [G, T]
    counts = pair_counts_of(expert_index, 4)  # [G, E]
    assert counts.tolist() == [[int((expert_index[g] == e).sum()) for e in range(4)] for g in range(2)]
    mask = Tensor(MASK.astype(np.float32))
    for local_capacity, remote_capacity in ((5, 2), (12, 6), (3, 9), (20, 20)):
        capacity, offset = tier_layout(mask, local_capacity, remote_capacity)
        slots = 2 * local_capacity + 2 * remote_capacity
        _, keep, _ = assign_tiered_slots(Tensor(expert_index), capacity, offset, slots)
        layer_drops = int(round(float((1 - keep.asnumpy()).sum())))
        predicted = drops_at(counts, capacity.asnumpy().astype(np.int64))
        local, remote = tier_drop_rates(counts[None, None], MASK, local_capacity, remote_capacity)
        assert layer_drops == predicted == round(80 * (local[0] + remote[0]))
