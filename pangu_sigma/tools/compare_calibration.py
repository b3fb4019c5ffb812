"""compare_routers, calibration stage: equal drops (the smallest remote capacity meeting a drop-rate
target, from a pilot run's routed counts) and LocMoE against the goals."""
import os

import numpy as np

from locmoe.errors import ConfigError
from pangu_sigma.tools.compare_evaluation import _mean

def pilot_units(cfg, routing):
    """[dp, E] the tier-2 units the pilot's layers used (eval's routing 'remote_units' by token group,
    one group per dp rank in cluster scope), or None (one unit per remote expert)."""
    units = routing.get("remote_units")
    if units is None or (routing.get("remote_quanta") or 1) == 1 and max(max(r) for r in units) <= 1:
        return None
    if routing.get("scope") != "cluster":
        raise ConfigError("parallel.virtual_scope", routing.get("scope"), "cluster (equal drops with tier-2 units)")
    return np.asarray(units, np.int64)


def predicted_inter_node_bytes(cfg, local_capacity, remote_capacity, units=None):
    """The cluster's inter-node MoE bytes per step of the two-tier exchange at these capacities
    (remote_capacity: rows per tier-2 unit; units [dp, E], None: one per remote expert), from the
    byte model the training log uses (locmoe.exchange.register_tiered_exchange_bytes)."""
    from locmoe.comm import CommCounter
    from locmoe.exchange import register_tiered_exchange_bytes
    from locmoe.tiers import unit_table
    from pangu_sigma.build import single_process_topology

    topology = single_process_topology(cfg)
    counter = register_tiered_exchange_bytes(CommCounter(topology), topology, cfg.num_experts, local_capacity,
                                             remote_capacity, cfg.model.hidden_size, cfg.compute_dtype,
                                             cfg.parallel.groupwise_a2a, cfg.model.moe_layer_num,
                                             None if units is None else unit_table(topology, units))
    return counter.world_totals()["inter"] * cfg.train.gradient_accumulation_steps


# The fields of a calibration that set (and predict from) the seeded runs' capacities; a check round's
# recalibration replaces these and keeps the pilot's figures.
CAPACITY_FIELDS = ("local_capacity", "capacity_factor", "remote_capacity", "remote_capacity_factor",
                   "expert_rows_per_group", "predicted_drop_percent", "predicted_local_drop_percent",
                   "predicted_remote_drop_percent", "predicted_inter_node_bytes_per_step")


def measured_drop_percent(figures):
    """A run's measured drop rate on the valid split in % (mean over MoE layers), from run_figures' dict."""
    return 100 * _mean([L["drop_rate"] for L in figures["valid"]["layers"]])


def capacity_overrides(calibration):
    """The config overrides that give a run the calibrated capacities of both tiers."""
    return [f"moe.capacity_factor={calibration['capacity_factor']!r}",
            f"moe.remote_capacity_factor={calibration['remote_capacity_factor']!r}"]


def recalibrated(calibration, cfg, runs, counts, target_percent):
    """One round's record: `runs` (every seed, trained at `calibration`'s capacities; cfg: one of their configs)
    and their own routed counts [M, N, G, E] each -> (the calibration with CAPACITY_FIELDS sized from the
    counts pooled over the seeds, the round's record). The counts of runs at their own capacities give their
    drops there exactly (first come, first served; each layer's input already carries the drops below it),
    so the pooled prediction at the round's capacities is the seeds' mean measured drop rate, but for the
    filler samples of a short last batch, which the counts include and eval does not count."""
    pooled = np.concatenate([np.asarray(c, np.int64) for c in counts], 1)  # [M, seeds * N, G, E]
    again = calibrate(cfg, runs[0], pooled, target_percent)
    record = {"run_dirs": [r["run_dir"] for r in runs], "local_capacity": calibration["local_capacity"],
              "remote_capacity": calibration["remote_capacity"],
              "expert_rows_per_group": calibration["expert_rows_per_group"],
              "measured_drop_percent": _mean([measured_drop_percent(r) for r in runs]),
              "predicted_drop_percent": again["pilot_predicted_drop_percent"],
              "next_local_capacity": again["local_capacity"], "next_remote_capacity": again["remote_capacity"],
              "next_expert_rows_per_group": again["expert_rows_per_group"],
              "next_predicted_drop_percent": again["predicted_drop_percent"]}
    return dict(calibration, **{k: again[k] for k in CAPACITY_FIELDS}), record


def same_capacities(a, b):
    return a["local_capacity"] == b["local_capacity"] and a["remote_capacity"] == b["remote_capacity"]


def seed_rounds(calibration, seed_config, train_and_evaluate, seeds, target_percent, check_rounds, log=print):
    """The seeded runs at equal drops, checked (compare_routers --check-rounds): round 0 trains every seed at
    the pilot's calibration; each round then sizes the tiers again from its seeds' own routed counts, pooled
    (recalibrated), and while that changes the capacities and rounds are left, round k + 1 trains every seed
    at the new ones. seed_config(k, seed, calibration) -> a run's config; train_and_evaluate(cfg, counts) ->
    run_figures' dict, its counts appended to the list counts. -> (the calibration of the returned runs, with
    'check_rounds' (one record per round), 'checked' (True: the last round kept its capacities, so the
    seeds' mean measured drops meet the target) and 'reported_round', the returned runs). A round that keeps
    its capacities is returned. When the rounds run out first (a learned router's split can move with its
    capacities, so that the rounds alternate about the target), the round with the fewest expert rows among
    those whose measured drops meet the target is returned (the later on a tie), else the last."""
    rounds, trained = [], []
    for k in range(check_rounds + 1):
        runs, counts = [], []
        for seed in seeds:
            run = train_and_evaluate(seed_config(k, seed, calibration), counts)
            np.save(os.path.join(run["run_dir"], "valid_pair_counts.npy"), counts[-1])  # [M, N, G, E]
            runs.append(run)
        again, record = recalibrated(calibration, seed_config(k, seeds[0], calibration), runs, counts,
                                     target_percent)
        rounds.append(record)
        trained.append((calibration, runs))
        log(f"[compare] round {k}: at local capacity {record['local_capacity']}, remote capacity "
            f"{record['remote_capacity']} the seeds dropped {record['measured_drop_percent']:.2f}% (target "
            f"{target_percent:g}%); their routed counts call for local {again['local_capacity']}, remote "
            f"{again['remote_capacity']}")
        if same_capacities(again, calibration):
            return dict(calibration, check_rounds=rounds, checked=True, reported_round=k), runs
        if k < check_rounds:
            calibration = again
    reported = reported_round(rounds, target_percent)
    calibration, runs = trained[reported]
    if reported != len(rounds) - 1:
        log(f"[compare] rounds used up: reporting round {reported}, the fewest rows among the rounds at <= "
            f"{target_percent:g}% measured drops")
    return dict(calibration, check_rounds=rounds, checked=False, reported_round=reported), runs


def reported_round(rounds, target_percent):
    """The round to report when the check rounds ran out: the fewest expert rows per group among the rounds
    whose measured drops meet the target (the later on a tie), else the last round."""
    meeting = [k for k, r in enumerate(rounds) if r["measured_drop_percent"] <= target_percent]
    if not meeting:
        return len(rounds) - 1
    return min(meeting, key=lambda k: (rounds[k]["expert_rows_per_group"], -k))


def calibrate(cfg, pilot, counts, target_percent):
    """Both tiers at equal drops: the (node-local capacity, remote unit) with the fewest expert rows per token
    group at which the pilot's routed counts (valid split, [M, N, G, E]) drop <= target_percent % of the
    tokens (mean over MoE layers; equal_drops.smallest_tier_capacities), their factors and bytes."""
    from pangu_sigma.build import single_process_groups, single_process_topology
    from pangu_sigma.tools.equal_drops import (drop_rates, factor_for_capacity, remote_spread,
                                               smallest_tier_capacities)

    topology = single_process_topology(cfg)
    groups, group_ranks, _ = single_process_groups(cfg, topology)
    mask = np.array([topology.local_expert_mask(r) for r in (group_ranks or [topology.rank] * groups)])  # [G, E]
    routing = pilot["valid"]["routing"]
    tokens, local_capacity = routing["tokens_per_group"], routing["capacity"]
    units, quanta = routing.get("remote_units"), routing.get("remote_quanta") or 1  # [G, E] tier-2 units per pair
    multiple = topology.tp if cfg.parallel.groupwise_a2a and topology.tp > 1 else 1
    reroute = cfg.moe.reroute_overflow  # overflow fills free node-local slots (equal_drops.rerouted_drop_rates)
    at_pilot = drop_rates(counts, mask, local_capacity, routing["remote_capacity"], units, reroute)[0]  # [M]
    found = smallest_tier_capacities(counts, mask, target_percent / 100, multiple, units, reroute=reroute)
    if found["capacity"] is None:
        raise ConfigError("--equal-drops", target_percent, f"a target above the predicted drop rate of the tokens "
                          f"routed to pairs without tier-2 units (router {cfg.moe.router})")
    capacity, pilot_local_capacity, local_capacity = found["capacity"], local_capacity, found["local_capacity"]
    return {"target_percent": target_percent, "pilot_run_dir": pilot["run_dir"],
            "pilot_remote_capacity": routing["remote_capacity"],
            "pilot_remote_capacity_factor": routing["remote_capacity_factor"],
            "pilot_valid_perplexity": pilot["valid"]["perplexity"],
            "pilot_drop_percent": measured_drop_percent(pilot),
            "pilot_predicted_drop_percent": 100 * float(at_pilot.mean()), "reroute_overflow": reroute,
            "pilot_inter_node_bytes_per_step": pilot["moe_inter_node_bytes_per_step"],
            "tokens_per_group": tokens, "pilot_local_capacity": pilot_local_capacity,
            "local_capacity": local_capacity, "capacity_factor": factor_for_capacity(local_capacity, tokens,
                                                                                     cfg.num_experts),
            "remote_capacity": capacity, "remote_quanta": quanta, "expert_rows_per_group": found["rows"],
            "remote_capacity_factor": factor_for_capacity(capacity, tokens, cfg.num_experts * quanta),
            "predicted_drop_percent": 100 * found["drop_rate"],
            "predicted_local_drop_percent": 100 * found["local_drop_rate"],
            "predicted_remote_drop_percent": 100 * found["remote_drop_rate"],
            "predicted_inter_node_bytes_per_step": predicted_inter_node_bytes(cfg, local_capacity, capacity,
                                                                              pilot_units(cfg, routing)),
            "pilot_remote_spread": remote_spread(counts, mask)}


def goals(results, target_percent=None):
    """LocMoE against the goals of the equal-drops comparison (means over seeds): inter-node bytes <= 0.6x and
    expert rows per rank <= 0.85x Switch's and Hash's, valid perplexity within 2 % of the better of Switch and
    Hash. Byte and row ratios, drop difference in points, ppl difference in %; with target_percent, under
    'drops over target' every router whose mean measured drop % exceeds it (the comparison is then not at
    equal drops for it: a capacity that drops more holds fewer rows)."""
    def mean(router, column):
        return results[router]["summary"][column]["mean"]
    over = {} if target_percent is None else {
        r: mean(r, "drop %") for r in results if "drop %" in results[r]["summary"]
        and results[r]["summary"]["drop %"]["n"] and mean(r, "drop %") > target_percent}
    if "locmoe" not in results:
        return {"drops over target": over} if over else {}
    columns = ("inter-node MoE MiB/step", "drop %", "valid ppl", "expert rows per rank")
    loc = {c: mean("locmoe", c) for c in columns if c in results["locmoe"]["summary"]}
    bases = [b for b in ("switch", "hash") if b in results]
    out = {"drops over target": over} if target_percent is not None else {}
    for base in bases:
        out[f"bytes locmoe/{base}"] = loc["inter-node MoE MiB/step"] / mean(base, "inter-node MoE MiB/step")
        if "expert rows per rank" in loc and "expert rows per rank" in results[base]["summary"]:
            out[f"rows locmoe/{base}"] = loc["expert rows per rank"] / mean(base, "expert rows per rank")
        out[f"drop points locmoe-{base}"] = loc["drop %"] - mean(base, "drop %")
    if bases:
        best = min(bases, key=lambda r: mean(r, "valid ppl"))
        out["best baseline ppl"] = best
        out["ppl locmoe vs best %"] = 100 * (loc["valid ppl"] / mean(best, "valid ppl") - 1)
    return out
