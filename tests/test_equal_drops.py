"""Equal-drops calibration (pangu_sigma.tools.equal_drops): the arithmetic against a hand-worked
example, and first-come-first-served drops against the layer's own slot assignment."""
import numpy as np
import pytest

from locmoe.capacity import expert_capacity
from pangu_sigma.evaluation.domain_stats import pair_counts_of
from pangu_sigma.tools.equal_drops import (drops_at, factor_for_capacity, smallest_remote_capacity,
                                           smallest_tier_capacities, tier_drop_rates)

# 2 token groups x 4 experts; group 0's node holds experts {0, 1}, group 1's {2, 3}.
MASK = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
# one MoE layer, two batches of 8 tokens per group: routed tokens per (batch, group, expert)
COUNTS = np.array([[[[4, 1, 3, 0], [0, 2, 4, 2]],
                    [[2, 2, 0, 4], [3, 0, 4, 1]]]])  # [M=1, N=2, G=2, E=4], 32 tokens


# tier-2 units per (group, expert) pair (0 on the group's node): group 0 sends expert 2 two units, 3 one;
# group 1 sends expert 0 one, expert 1 three
UNITS = np.array([[0, 0, 2, 1], [1, 3, 0, 0]])


def test_hand_worked_smallest_unit_with_units_per_pair():
    # remote counts (g0: e2, e3 | g1: e0, e1): batch 1 (3, 0 | 0, 2), batch 2 (0, 4 | 3, 0); slots u * units
    # u=1: 1 + 3 + 2 = 6 dropped; u=2: 2 + 1 = 3; u=3: 1; u=4: 0. The local tier drops 3 (C_l = 3).
    for unit, remote_drops in ((1, 6), (2, 3), (3, 1), (4, 0)):
        assert tier_drop_rates(COUNTS, MASK, 3, unit, UNITS)[1].tolist() == [remote_drops / 32]
    assert smallest_remote_capacity(COUNTS, MASK, 3, 0.15, units=UNITS)["capacity"] == 3  # 4/32; u=2: 6/32
    assert smallest_remote_capacity(COUNTS, MASK, 3, 0.19, units=UNITS)["capacity"] == 2
    # a pair without units drops all it gets (group 0's 4 tokens to expert 3): no u reaches 3/32 + 4/32
    no_e3 = np.array([[0, 0, 2, 0], [1, 3, 0, 0]])
    assert smallest_remote_capacity(COUNTS, MASK, 3, 0.2, units=no_e3)["capacity"] is None
    assert smallest_remote_capacity(COUNTS, MASK, 3, 0.25, units=no_e3)["capacity"] == 2  # (3 + 4 + 1) / 32


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


@pytest.mark.parametrize("target, multiple, local, unit, rows", [
    # local drops at C_l = 1, 2, 3, 4: 12, 6, 3, 0; remote at u = 1, 2, 3, 4: 8, 4, 1, 0 (by hand above)
    (0.25, 1, 2, 3, 10),   # <= 8 drops: (2, 3) 6 + 1, (3, 2) 3 + 4, (4, 1) 0 + 8: all 10 rows; the smaller C_l
    (0.15, 1, 3, 3, 12),   # <= 4: (3, 3) 3 + 1 and (4, 2) 0 + 4, 12 rows each
    (0.25, 2, 2, 4, 12),   # multiples of 2: (2, 2) drops 10; (2, 4) 6 and (4, 2) 4, 12 rows each
])
def test_hand_worked_both_tiers(target, multiple, local, unit, rows):
    found = smallest_tier_capacities(COUNTS, MASK, target, multiple)
    assert (found["local_capacity"], found["capacity"], found["rows"]) == (local, unit, rows)
    # brute force over every (C_l, u), drops counted pair by pair with plain loops
    best = None
    for c_l in range(multiple, 5, multiple):
        for u in range(multiple, 5, multiple):
            dropped = sum(max(0, int(n) - (c_l if MASK[g, e] else u))
                          for batch in COUNTS[0] for g, row in enumerate(batch) for e, n in enumerate(row))
            if dropped <= target * 32 and (best is None or 2 * c_l + 2 * u < best[0]):
                best = (2 * c_l + 2 * u, c_l, u)
    assert best == (rows, local, unit)


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
    for units in (None, UNITS):
        table = (1 - MASK) if units is None else units  # [G, E] tier-2 units per pair
        for local_capacity, remote_capacity in ((5, 2), (12, 6), (3, 9), (20, 20)):
            capacity, offset = tier_layout(mask, local_capacity, remote_capacity, Tensor(table.astype(np.float32)))
            slots = 2 * local_capacity + int(table.sum(1).max()) * remote_capacity
            _, keep, _ = assign_tiered_slots(Tensor(expert_index), capacity, offset, slots)
            layer_drops = int(round(float((1 - keep.asnumpy()).sum())))
            predicted = drops_at(counts, capacity.asnumpy().astype(np.int64))
            local, remote = tier_drop_rates(counts[None, None], MASK, local_capacity, remote_capacity, units)
            assert layer_drops == predicted == round(80 * (local[0] + remote[0]))


def test_rerouted_drops_from_counts_match_the_layers_rerouting():
    """With reroute_overflow, max(0, L + O - n_l C_l) per group from the pair counts alone
    (equal_drops.rerouted_drop_rates) == the tokens the layer's assign_tiered_slots + reroute_to_local leave
    without a slot, for random routing and gate orders (no level 1: every token may use every local expert),
    with and without units; and never more than without rerouting."""
    from mindspore import Tensor
    from locmoe.dispatch import assign_tiered_slots, reroute_to_local, tier_layout
    from pangu_sigma.tools.equal_drops import rerouted_drop_rates

    rng = np.random.default_rng(4)
    expert_index = rng.choice(4, size=(2, 40), p=[0.2, 0.2, 0.45, 0.15]).astype(np.int32)  # [G, T]
    gate = rng.dirichlet(np.ones(4), size=(2, 40)).astype(np.float32)  # [G, T, E]
    ties = rng.integers(0, 1000, size=(2, 40, 4)).astype(np.float32)
    counts = pair_counts_of(expert_index, 4)  # [G, E]
    mask = Tensor(MASK.astype(np.float32))
    seen_partial = False
    for units in (None, UNITS):
        table = (1 - MASK) if units is None else units  # [G, E]
        for local_capacity, remote_capacity in ((5, 2), (12, 3), (9, 1), (3, 9), (20, 20)):
            capacity, offset = tier_layout(mask, local_capacity, remote_capacity, Tensor(table.astype(np.float32)))
            slots = 2 * local_capacity + int(table.sum(1).max()) * remote_capacity
            slot, keep, onehot = assign_tiered_slots(Tensor(expert_index), capacity, offset, slots)
            first = int(round(float((1 - keep.asnumpy()).sum())))
            slot, keep, _ = reroute_to_local(slot, keep, onehot, Tensor(gate), Tensor(ties), mask, capacity, offset,
                                             slots, 2)
            layer_drops = int(round(float((1 - keep.asnumpy()).sum())))
            predicted = rerouted_drop_rates(counts[None, None], MASK, local_capacity, remote_capacity, units)
            assert layer_drops == round(80 * predicted[0]) and layer_drops <= first
            seen_partial |= 0 < layer_drops < first
            kept_slots = slot.asnumpy()[keep.asnumpy().reshape(-1) > 0]
            assert len(set(kept_slots.tolist())) == len(kept_slots)  # no slot holds two tokens
    assert seen_partial  # some case rerouted part of its overflow and dropped the rest


def test_goals_and_the_equal_drops_section_from_given_results():
    from pangu_sigma.tools import compare_routers as cr

    def router(ppl, drop, mib, rows=100):
        summary = {"valid ppl": cr.spread([ppl]), "drop %": cr.spread([drop]),
                   "inter-node MoE MiB/step": cr.spread([mib]), "expert rows per rank": cr.spread([rows])}
        calibration = {"pilot_remote_capacity": 80, "pilot_drop_percent": 0.5, "pilot_predicted_drop_percent": 0.5,
                       "pilot_inter_node_bytes_per_step": 15 * 2**20, "local_capacity": 80, "remote_capacity": 20,
                       "remote_capacity_factor": 1.25, "predicted_drop_percent": 4.5,
                       "predicted_local_drop_percent": 0.5, "predicted_remote_drop_percent": 4.0,
                       "predicted_inter_node_bytes_per_step": mib * 2**20,
                       "pilot_remote_spread": {"remote_tokens": 64.0, "remote_pairs": 6, "used_pairs": 2.0,
                                               "tokens_per_used_pair": 32.0, "busiest_pair": 36.5}}
        return {"summary": summary, "calibration": calibration}

    results = {"locmoe": router(101.0, 4.0, 3.0, 80), "switch": router(100.0, 3.5, 4.0),
               "hash": router(110.0, 5.0, 6.0, 160), "rre": router(90.0, 5.0, 6.0)}  # ppl: Switch's and Hash's
    g = cr.goals(results)
    assert g["rows locmoe/switch"] == pytest.approx(0.8) and g["rows locmoe/hash"] == pytest.approx(0.5)
    assert g["bytes locmoe/switch"] == pytest.approx(0.75) and g["bytes locmoe/hash"] == pytest.approx(0.5)
    assert g["drop points locmoe-switch"] == pytest.approx(0.5) and g["drop points locmoe-hash"] == pytest.approx(-1)
    assert g["best baseline ppl"] == "switch" and g["ppl locmoe vs best %"] == pytest.approx(1.0)
    text = "\n".join(cr.render_calibration(results, {"equal_drops_percent": 5.0, "seeds": [1234],
                                                     "pilot_remote_capacity_factor": 5.0, "goals": g}))
    assert ("| locmoe | 80 | 0.50 (0.50) | 15.00 | 80 | 20 | 1.25 | 4.50 (0.50 + 4.00) | 3.00 | 4.00 | 3.00 | "
            "64.0, 2.00 / 6, 32.0, 36.5 |") in text
    assert "bytes LocMoE/switch: 0.750; expert rows LocMoE/switch: 0.800" in text and "(switch): +1.00%" in text
    assert cr.render_calibration(results, {"equal_drops_percent": None}) == []
    over = cr.goals(results, 4.5)  # Hash and RRE measured 5 % against a 4.5 % target
    assert over["drops over target"] == {"hash": 5.0, "rre": 5.0} and cr.goals(results, 5.0)["drops over target"] == {}
    text = "\n".join(cr.render_calibration(results, {"equal_drops_percent": 4.5, "seeds": [1234],
                                                     "pilot_remote_capacity_factor": 5.0, "goals": over}))
    assert "**Not at equal drops:** the measured drops of hash (5.00%), rre (5.00%) exceed the 4.5% target" in text
    assert cr.goals({"hash": results["hash"]}, 4.5) == {"drops over target": {"hash": 5.0}}


def test_check_rounds_stop_when_a_round_keeps_the_capacities(monkeypatch, tmp_path):
    """seed_rounds: every round trains every seed at the current capacities and recalibrates from their
    counts; the first round whose counts keep the capacities is the result; without one, the round with the
    fewest rows among those at <= the target's measured drops comes back with the capacities it was trained
    at (else the last round)."""
    from pangu_sigma.tools import compare_calibration as cc
    plan = []  # per round: (local, remote) its counts call for, its measured drop %
    trained, pooled = [], []

    def fake_recalibrated(calibration, cfg, runs, counts, target):
        pooled.append(len(counts))
        (local, remote), measured = plan[len(pooled) - 1]
        record = {"local_capacity": calibration["local_capacity"], "remote_capacity": calibration["remote_capacity"],
                  "measured_drop_percent": measured,
                  "expert_rows_per_group": 2 * calibration["local_capacity"] + 6 * calibration["remote_capacity"]}
        return dict(calibration, local_capacity=local, remote_capacity=remote), record

    def train_and_evaluate(cfg, counts):
        trained.append(cfg)
        counts.append(np.zeros((1, 1, 1, 1), np.int64))
        return {"run_dir": str(tmp_path), "cfg": cfg}

    def rounds(first, check_rounds, calls):
        plan[:] = calls
        trained.clear(), pooled.clear()
        return cc.seed_rounds(first, config, train_and_evaluate, [1, 2], 5.0, check_rounds, log=lambda *_: None)

    monkeypatch.setattr(cc, "recalibrated", fake_recalibrated)
    first = {"local_capacity": 64, "remote_capacity": 4}
    config = lambda k, seed, c: (k, seed, c["local_capacity"])  # noqa: E731
    # 64 -> 70 -> 66 -> 66 (kept)
    calibration, runs = rounds(first, 3, [((70, 4), 4.0), ((66, 4), 4.0), ((66, 4), 4.0)])
    assert trained == [(0, 1, 64), (0, 2, 64), (1, 1, 70), (1, 2, 70), (2, 1, 66), (2, 2, 66)]
    assert [r["cfg"] for r in runs] == [(2, 1, 66), (2, 2, 66)] and pooled == [2, 2, 2]
    assert calibration["checked"] is True and calibration["local_capacity"] == 66
    assert calibration["reported_round"] == 2
    assert [r["local_capacity"] for r in calibration["check_rounds"]] == [64, 70, 66]
    # round 1's counts call for 66 and no round is left: of 64 (152 rows) and 70 (164 rows), both at 4 %, 64
    calibration, runs = rounds(first, 1, [((70, 4), 4.0), ((66, 4), 4.0)])
    assert [r["cfg"] for r in runs] == [(0, 1, 64), (0, 2, 64)]
    assert calibration["checked"] is False and calibration["local_capacity"] == 64
    assert calibration["reported_round"] == 0 and len(calibration["check_rounds"]) == 2
    # alternating about the target (as Switch on the four-domain corpus): 64 at 4.0 %, 61 at 5.5 %, 62 at 4.3 %
    calibration, runs = rounds(first, 2, [((61, 4), 4.0), ((62, 4), 5.5), ((61, 4), 4.3)])
    assert calibration["reported_round"] == 2 and calibration["local_capacity"] == 62
    assert [r["cfg"] for r in runs] == [(2, 1, 62), (2, 2, 62)]
    # no round meets the target: the last
    calibration, runs = rounds(first, 1, [((61, 4), 5.2), ((62, 4), 5.1)])
    assert calibration["reported_round"] == 1 and calibration["local_capacity"] == 61


def test_the_check_rounds_table_marks_the_reported_round():
    from pangu_sigma.tools.compare_report import render_check_rounds
    record = {"local_capacity": 64, "remote_capacity": 4, "expert_rows_per_group": 152, "measured_drop_percent": 4.0,
              "predicted_drop_percent": 4.0, "next_local_capacity": 70, "next_remote_capacity": 4,
              "next_expert_rows_per_group": 164, "next_predicted_drop_percent": 4.9}
    calibration = {"check_rounds": [record, dict(record, local_capacity=70, measured_drop_percent=4.5)],
                   "checked": False, "reported_round": 0}
    lines = [line for line in render_check_rounds({"switch": {"calibration": calibration}}, 5.0)
             if line.startswith("| switch")]
    assert [line.rstrip(" |").split("| ")[-1] for line in lines] == ["reported", "no: rounds used up"]
