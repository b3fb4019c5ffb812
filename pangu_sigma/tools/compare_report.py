"""compare_routers, report stage: report.md from the results (router, domain, layer, calibration and
simulated-step tables)."""
from pangu_sigma.tools.compare_evaluation import DOMAIN_COLUMNS, _mib, columns, spread

def _cell(fmt, s, kind):
    if not s["n"]:
        return "n/a"
    if kind == "range":
        return f"{fmt.format(s['min'])}-{fmt.format(s['max'])}"
    return f"{fmt.format(s['mean'])} ± {fmt.format(s['sd'])}" if s["n"] > 1 else fmt.format(s["mean"])


def _n_label(stats):
    """The seed count behind a row: one number when every measured column has it, else min-max
    (a column no run measured, shown n/a, does not count)."""
    counts = sorted({s["n"] for s in stats.values() if s["n"]}) or [0]
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def render(results, clusters, meta):
    seeds = meta["seeds"]
    routing = meta["eval_routing"]
    lines = ["# Router comparison", "",
             f"Config `{meta['config']}` with {meta['overrides'] or 'no overrides'}"
             + "".join(f", {r} also {v}" for r, v in (meta.get("router_overrides") or {}).items()) + "; "
             f"{meta['steps']} steps of "
             f"{meta['tokens_per_step']:,} tokens ({meta['samples_per_step']} sequences of {meta['seq_length']}; "
             f"{meta['scope']} scope, {meta['token_groups']} token group(s)) for every router, same data order "
             f"(data.seed={meta['data_seed']}), over {len(seeds)} seed(s) train.seed = {seeds} (model "
             f"initialisation and op RNG). Each cell is the mean ± sample standard deviation over the seeds; the "
             f"column `seeds` says how many runs stand behind every number of the row (the min-max table below "
             f"gives the range). Layer statistics are on the valid split with the final weights, routed as in "
             f"training: {routing['token_groups']} token group(s) of {routing['tokens_per_group']} tokens, "
             f"batches in training's order, capacity factor {routing['capacity_factor']:g} "
             f"({routing['capacity_factor_source']}). Locality = share of tokens routed to experts on the node of "
             f"their token group's (virtual) rank (mean over token groups), {meta['virtual_world_size'] or 1} "
             f"devices, {meta['devices_per_node']} per node. Step times: `pangu_sigma.tools.simulate` "
             f"({meta['dispatch']} dispatch, efficiency {meta['efficiency']}) with each run's routing statistics "
             f"scaled to the cluster.", ""]
    cols = columns(meta["domains"], clusters)
    for kind, title in (("mean", "mean ± sd"), ("range", "min-max")):
        lines += [f"## Routers ({title} over seeds)", ""]
        header = ["router", "seeds"] + [name for name, _, _ in cols]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for router, r in results.items():
            row = [router, _n_label(r["summary"])] + [_cell(fmt, r["summary"][name], kind) for name, fmt, _ in cols]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["Load columns: mean over MoE layers of max/mean, the smallest share over layers, mean drop and "
              "locality over layers; drops per tier (local: bound for an expert on the token group's node, remote: "
              "on another node), % of tokens; rank local % min/max: the least and most local data-parallel rank; "
              "remote C: slots per (rank, remote expert) pair; inter-node MiB/step: the cluster's MoE bytes per "
              "step across nodes as the exchange sends them (training log).", ""]
    lines += render_calibration(results, meta)
    lines += ["", "## Per domain (valid split, mean ± sd over seeds)", ""]
    header = ["router", "domain", "seeds"] + [name for name, _, _ in DOMAIN_COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for router, r in results.items():
        for domain, stats in r["domains"].items():
            lines.append("| " + " | ".join([router, domain, _n_label(stats)] + [
                _cell(fmt, stats[name], "mean") for name, fmt, _ in DOMAIN_COLUMNS]) + " |")
    lines += ["", "## Per layer (valid split, mean ± sd over seeds)", "",
              "| router | block | seeds | max/mean load | smallest share | drop % | local % |",
              "|---|---|---|---|---|---|---|"]
    for router, r in results.items():
        for m, block in enumerate(r["blocks"]):
            layers = [run["valid"]["layers"][m] for run in r["runs"]]
            cells = [_cell(fmt, spread([scale * L[key] for L in layers]), "mean")
                     for key, fmt, scale in (("max_over_mean", "{:.3f}", 1), ("min_share", "{:.4f}", 1),
                                             ("drop_rate", "{:.2f}", 100), ("local_fraction", "{:.2f}", 100))]
            lines.append(f"| {router} | {block} | {len(layers)} | " + " | ".join(cells) + " |")
    lines += ["", f"## Simulated step (ms) of the seed {seeds[0]} run: computation / communication / overlapped / "
                  "idle; A2A share", "",
              "| router | cluster | routing | step | computation | communication | overlapped | idle | A2A % "
              "| A2A node-local % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for router, r in results.items():
        first = r["runs"][0]
        for n in clusters:
            sim = first["simulated"].get(n, {})
            if "error" in sim:
                lines.append(f"| {router} | {n}N | - | {sim['error']} | | | | | | |")
                continue
            for kind in ("routed", "uniform"):
                s = sim[kind]
                b = s["breakdown"]
                lines.append(f"| {router} | {n}N | {'measured' if kind == 'routed' else 'uniform'} | "
                             f"{1e3 * s['step_time']:,.1f} | {1e3 * b['computation']:,.1f} | "
                             f"{1e3 * b['communication']:,.1f} | {1e3 * b['overlapped']:,.1f} | "
                             f"{1e3 * b['idle']:,.1f} | {100 * s['a2a_fraction']:.2f} | "
                             f"{100 * s['a2a_node_local_fraction']:.1f} |")
    return "\n".join(lines) + "\n"


def render_calibration(results, meta):
    """The equal-drops section (calibration per router, then LocMoE against the goals); [] without it."""
    target = meta.get("equal_drops_percent")
    if target is None:
        return []
    lines = ["## Equal drops: remote capacity per router", "",
             f"Target: drop rate <= {target:g}% of the valid split's tokens (mean over MoE layers). Per router a pilot "
             f"run (seed {meta['seeds'][0]}, moe.remote_capacity_factor {meta['pilot_remote_capacity_factor']:g}) is "
             f"evaluated; from its routed tokens per (batch, token group, expert) before capacity, the drops at a "
             f"remote capacity C (rows per tier-2 unit; a pair's slots are its units x C, locmoe.tiers) are "
             f"sum(max(0, n - slots)) (first come, first served) plus the local tier's at its configured capacity; "
             f"the smallest C meeting the target is used for the seeded runs above, whose drops and bytes are "
             f"measured, not predicted. The last column (means over layer, batch and token group of the pilot) "
             f"shows how the remote tokens spread: every pair gets its units whatever it receives, so C follows "
             f"the busiest pairs relative to their units, not the remote tokens' total.", "",
             "| router | pilot remote C | pilot drop % (from counts) | pilot MiB/step | local C | remote C | "
             "remote_capacity_factor | predicted drop % (local + remote) | predicted MiB/step | runs: drop % | "
             "runs: MiB/step | pilot: remote tokens per group, used / remote pairs, tokens per used pair, "
             "busiest pair |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for router, r in results.items():
        c = r.get("calibration")
        if not c:
            continue
        lines.append(f"| {router} | {c['pilot_remote_capacity']} | {c['pilot_drop_percent']:.2f} "
                     f"({c['pilot_predicted_drop_percent']:.2f}) | "
                     f"{_mib(c['pilot_inter_node_bytes_per_step']):.2f} | {c['local_capacity']} | "
                     f"{c['remote_capacity']} | {c['remote_capacity_factor']:.6g} | "
                     + (f"{c['predicted_drop_percent']:.2f} (rerouted to free local slots) | "
                        if c.get("reroute_overflow") else
                        f"{c['predicted_drop_percent']:.2f} ({c['predicted_local_drop_percent']:.2f} + "
                        f"{c['predicted_remote_drop_percent']:.2f}) | ")
                     + f"{_mib(c['predicted_inter_node_bytes_per_step']):.2f} | "
                     f"{_cell('{:.2f}', r['summary']['drop %'], 'mean')} | "
                     f"{_cell('{:.2f}', r['summary']['inter-node MoE MiB/step'], 'mean')} | "
                     + (lambda p: f"{p['remote_tokens']:.1f}, {p['used_pairs']:.2f} / {p['remote_pairs']}, "
                        f"{p['tokens_per_used_pair']:.1f}, {p['busiest_pair']:.1f} |")(c["pilot_remote_spread"]))
    lines += render_check_rounds(results, target)
    g = meta.get("goals") or {}
    over = g.get("drops over target") or {}
    if over:
        lines += ["", "**Not at equal drops:** the measured drops of " + ", ".join(
            f"{r} ({d:.2f}%)" for r, d in over.items()) + f" exceed the {target:g}% target, so their rows and "
            "bytes are those of a capacity that drops more than the others may."]
    if any(k != "drops over target" for k in g):
        lines += ["", "## LocMoE against the goals (means over seeds)", "",
                  "Goals at equal drops: inter-node bytes <= 0.6x and expert rows per rank <= 0.85x Switch's and "
                  "Hash's, valid perplexity within 2% of the better of Switch and Hash.", ""]
        for base in ("switch", "hash"):
            if f"bytes locmoe/{base}" in g:
                rows = g.get(f"rows locmoe/{base}")
                lines.append(f"- bytes LocMoE/{base}: {g[f'bytes locmoe/{base}']:.3f}"
                             + (f"; expert rows LocMoE/{base}: {rows:.3f}" if rows is not None else "")
                             + f"; drop LocMoE - {base}: {g[f'drop points locmoe-{base}']:+.2f} points")
        if "best baseline ppl" in g:
            lines.append(f"- valid ppl LocMoE vs the better of Switch and Hash ({g['best baseline ppl']}): "
                         f"{g['ppl locmoe vs best %']:+.2f}%")
    return lines + [""]


def render_check_rounds(results, target):
    """The check rounds of each router's calibration (compare_calibration.seed_rounds); [] without any."""
    rows = [(router, k, c, rnd) for router, r in results.items() for c in [r.get("calibration") or {}]
            for k, rnd in enumerate(c.get("check_rounds") or [])]
    if not rows:
        return []
    lines = ["", "### Check rounds", "",
             f"Round 0 trains every seed at the pilot's calibration; the seeds' own routed counts, pooled, size "
             f"the tiers again (target {target:g}%), and a round that changes them is followed by one at the new "
             f"capacities. The table above shows the reported round's: the last, or, when the rounds ran out "
             f"first, the one with the fewest rows among those that met the target. Measured drops are the "
             f"seeds' mean; in brackets "
             f"the prediction from their counts at their own capacities, which also count the filler samples of "
             f"a short last batch (eval routes them, but does not count them).", "",
             "| router | round | local C | remote C | rows per group | measured drop % | their counts call for: "
             "local C | remote C | rows | predicted drop % | converged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for router, k, c, rnd in rows:
        last = k == len(c["check_rounds"]) - 1
        verdict = ("yes" if c.get("checked") else "no: rounds used up") if last else ""
        if k == c.get("reported_round", len(c["check_rounds"]) - 1):
            verdict = f"{verdict}; reported" if verdict else "reported"
        lines.append(f"| {router} | {k} | {rnd['local_capacity']} | {rnd['remote_capacity']} | "
                     f"{rnd['expert_rows_per_group']} | {rnd['measured_drop_percent']:.2f} "
                     f"({rnd['predicted_drop_percent']:.2f}) | {rnd['next_local_capacity']} | "
                     f"{rnd['next_remote_capacity']} | {rnd['next_expert_rows_per_group']} | "
                     f"{rnd['next_predicted_drop_percent']:.2f} | {verdict} |")
    return lines
