"""Train and compare routers on the same data and budget over several seeds; simulate their step time on 64N/128N/256N.

    python -m pangu_sigma.tools.compare_routers --config FILE --routers locmoe,switch,hash,rre
        --steps N --output DIR [--seeds K] [--set a.b=c ...] [--clusters 64,128,256]
        [--cluster-config-dir configs] [--dispatch padded|routed] [--efficiency X] [--overwrite] [--quiet]
        [--equal-drops PERCENT [--pilot-remote-capacity-factor X]] [--lock FILE] [--reuse]

For every router R and seed s in train.seed, train.seed + 1, ... (K seeds):
`pangu_sigma.training.train.train` with moe.router=R, train.seed=s,
train.output_dir=DIR/R/seed<s> and train.train_steps=N (data, data order, batch
and steps identical), then `pangu_sigma.evaluation.eval.evaluate` on the valid
split (routed as in training: token groups, batch order, eval capacity factor).
Then DIR/report.md and DIR/report.json, every column as mean, sample standard
deviation, min, max and n (the seeds behind it) over the seeds:

- tokens/s: training throughput after compilation (this machine)
- valid perplexity of the final checkpoint, overall and per domain
- per MoE layer on the valid split (the final model): max/mean expert load,
  the smallest expert's share of the tokens, drop rate, and the locality
  fraction (tokens routed to experts on the node of their token group's
  (virtual) rank; in cluster scope the mean over the dp token groups)
- per domain: tokens, perplexity, max/mean load, drop rate, locality
- the simulator's step time for each cluster size, from that run's routing
  statistics: the training log's expert_load over the last half of the
  steps, scaled to every rank of the cluster by
  `pangu_sigma.tools.routing_stats` (the same distribution on every rank), with the cluster's config
  configs/<R>_<n>n.yaml, else configs/locmoe_<n>n.yaml with moe.router=R.
  The same with uniform routing is in report.json for reference.
- with --equal-drops P: the routers at equal drops (the static two-tier exchange's
  inter-node bytes are set by the remote capacity, so a router is charged the
  smallest remote capacity that keeps its valid drop rate <= P %): per router a
  pilot run at a generous remote capacity, the calibration from its routed counts
  (`calibrate`, pangu_sigma.tools.equal_drops), then the seeded runs at that
  capacity (the pilot's counts [M, N, G, E] are kept in its folder as
  valid_pair_counts.npy); report.md gives the calibration and LocMoE's byte ratios against
  Switch and Hash, drop difference and perplexity against the best other router.
Columns are named entries of RUN_COLUMNS / DOMAIN_COLUMNS (one line each).
"""
import contextlib
import copy
import fcntl
import math
import os
import shutil
import sys

import numpy as np
import yaml

from locmoe.config import ROUTERS
from locmoe.errors import ConfigError
from pangu_sigma.tools._cli import OneLineParser, fail, write_json
from pangu_sigma.tools.cost_model import Hardware

DEFAULT_CLUSTERS = (64, 128, 256)


def default_config_dir():
    """configs/ of the working directory if present, else the repository's."""
    if os.path.isdir("configs"):
        return "configs"
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def cluster_config(router, size, config_dir):
    """(path, overrides) of the cluster config for a router and a size, or (None, None)."""
    own = os.path.join(config_dir, f"{router}_{size}n.yaml")
    if os.path.isfile(own):
        return own, []
    base = os.path.join(config_dir, f"locmoe_{size}n.yaml")
    if os.path.isfile(base):
        return base, [f"moe.router={router}"]
    return None, None


def layer_table(load, dropped, local):
    """Per-layer statistics from summed counts load [M, E], dropped [M], local [M]."""
    from pangu_sigma.evaluation.domain_stats import layer_figures
    return layer_figures(load, dropped, local)


def train_log_table(log_path):
    """layer_table over the last half of the logged steps."""
    from pangu_sigma.training.callbacks import read_jsonl
    rows = [r for r in read_jsonl(log_path) if r.get("expert_load")]
    if not rows:
        return []
    rows = rows[-max(1, len(rows) // 2):]
    return layer_table(np.sum([r["expert_load"] for r in rows], 0), np.sum([r["dropped"] for r in rows], 0),
                       np.sum([r["local"] for r in rows], 0))


def _last_logged(log_path, key):
    """The last value of `key` in a training log (None if absent)."""
    from pangu_sigma.training.callbacks import read_jsonl
    values = [r[key] for r in read_jsonl(log_path) if key in r]
    return values[-1] if values else None


def simulate_router(router, train_cfg, log_path, clusters, config_dir, dispatch, hw):
    """{size: {...}} step time with the run's routing statistics and with uniform routing."""
    from pangu_sigma.build import dataset_meta, domain_sizes
    from pangu_sigma.config import load_config
    from pangu_sigma.tools.routing_stats import from_train_log
    from pangu_sigma.tools.simulate import run

    out = {}
    for size in clusters:
        path, overrides = cluster_config(router, size, config_dir)
        if path is None:
            out[size] = {"error": f"no {router}_{size}n.yaml or locmoe_{size}n.yaml in {config_dir}"}
            continue
        try:
            cluster_cfg = load_config(path, overrides)
            stats = from_train_log(log_path, train_cfg, cluster_cfg, world_size=size) \
                if train_cfg.model.moe_layer_num else None
            sizes = domain_sizes(dataset_meta(train_cfg))  # the placement of the corpus the routing came from
            routed = run(cluster_cfg, world_size=size, routing_stats=stats, dispatch=dispatch, hw=hw,
                         domain_sizes=sizes)
            uniform = run(cluster_cfg, world_size=size, dispatch=dispatch, hw=hw, domain_sizes=sizes)
        except ConfigError as err:
            out[size] = {"error": str(err)}
            continue
        keep = ("step_time", "breakdown", "a2a_fraction", "a2a_node_local_fraction", "communication", "compute")
        out[size] = {"config": path, "overrides": overrides,
                     "placement": stats["source"]["placement"] if stats else None,
                     "routed": {k: routed[k] for k in keep},
                     "uniform": {k: uniform[k] for k in keep},
                     "expert_rows_max_over_mean": [L["expert_rows_max"] / max(L["expert_rows_mean"], 1e-9)
                                                   for L in routed["layers"]]}
    return out


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _remote_drop_percent(valid):
    """Tokens bound for experts on other nodes that were dropped, % of tokens (mean over MoE layers)."""
    if "dropped_remote" not in valid:
        return float("nan")
    return 100 * _mean(valid["dropped_remote"]) / max(valid["tokens"], 1)


def _local_drop_percent(valid):
    """Tokens bound for experts on their group's node that were dropped, % of tokens (mean over layers)."""
    if "dropped_remote" not in valid:
        return float("nan")
    return 100 * _mean(np.subtract(valid["dropped"], valid["dropped_remote"])) / max(valid["tokens"], 1)


def _rank_local_percent(valid, pick):
    """min or max over data-parallel ranks (token groups) of the rank's local fraction, % (mean over layers)."""
    by_rank = np.asarray(valid.get("local_by_rank") or [], np.float64)  # [M, G]
    if by_rank.size == 0:
        return float("nan")
    per_group = valid["tokens"] / by_rank.shape[1]
    return float(pick(100 * by_rank.mean(0) / max(per_group, 1)))


def _routing(run, key):
    value = run["valid"].get("routing", {}).get(key)
    return float("nan") if value is None else float(value)


def _mib(count):
    return float("nan") if count is None else count / 2**20


def _min(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.min(values)) if values else float("nan")


# Columns of the router table: (name, format, value of one run). A run is the dict
# `run_figures` returns; adding a column is one line here (per-domain and step-time
# columns are added by `columns`).
RUN_COLUMNS = [
    ("tokens/s", "{:,.0f}", lambda r: r["tokens_per_s"]),
    ("valid ppl", "{:.3f}", lambda r: r["valid"]["perplexity"]),
    ("max/mean load", "{:.3f}", lambda r: _mean([L["max_over_mean"] for L in r["valid"]["layers"]])),
    ("smallest share", "{:.4f}", lambda r: _min([L["min_share"] for L in r["valid"]["layers"]])),
    ("drop %", "{:.2f}", lambda r: 100 * _mean([L["drop_rate"] for L in r["valid"]["layers"]])),
    ("local %", "{:.2f}", lambda r: 100 * _mean([L["local_fraction"] for L in r["valid"]["layers"]])),
    ("local-tier drop %", "{:.2f}", lambda r: _local_drop_percent(r["valid"])),
    ("remote-tier drop %", "{:.2f}", lambda r: _remote_drop_percent(r["valid"])),
    ("rank local % min", "{:.2f}", lambda r: _rank_local_percent(r["valid"], np.min)),
    ("rank local % max", "{:.2f}", lambda r: _rank_local_percent(r["valid"], np.max)),
    ("remote C", "{:.0f}", lambda r: _routing(r, "remote_capacity")),
    ("inter-node MoE MiB/step", "{:.2f}", lambda r: _mib(r.get("moe_inter_node_bytes_per_step"))),
]

# Columns of the per-domain table: (name, format, value of one domain's eval figures).
DOMAIN_COLUMNS = [
    ("tokens", "{:,.0f}", lambda d: d["tokens"]),
    ("ppl", "{:.3f}", lambda d: d["perplexity"]),
    ("max/mean load", "{:.3f}", lambda d: _mean([L["max_over_mean"] for L in d["layers"]])),
    ("drop %", "{:.2f}", lambda d: 100 * _mean([L["drop_rate"] for L in d["layers"]])),
    ("local %", "{:.2f}", lambda d: 100 * _mean([L["local_fraction"] for L in d["layers"]])),
]


def _step_ms(size):
    def value(run):
        sim = run["simulated"].get(size, {})
        return 1e3 * sim["routed"]["step_time"] if "routed" in sim else float("nan")
    return value


def columns(domains, clusters):
    """The router table's columns: RUN_COLUMNS, then each domain's valid ppl, then simulated step times."""
    cols = list(RUN_COLUMNS)
    cols += [(f"ppl {d}", "{:.3f}", lambda r, d=d: r["valid"]["domains"][d]["perplexity"]
              if d in r["valid"]["domains"] else float("nan")) for d in domains]
    cols += [(f"step {n}N (ms)", "{:,.1f}", _step_ms(n)) for n in clusters]
    return cols


def spread(values):
    """Mean, sample standard deviation (0 for one value), min, max and n over the finite values."""
    values = np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if not values.size:
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "n": int(values.size)}


def summarize(runs, cols):
    """{column: spread over the runs} for (name, format, value) columns."""
    return {name: spread([value(r) for r in runs]) for name, _, value in cols}


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
                     f"{c['predicted_drop_percent']:.2f} ({c['predicted_local_drop_percent']:.2f} + "
                     f"{c['predicted_remote_drop_percent']:.2f}) | "
                     f"{_mib(c['predicted_inter_node_bytes_per_step']):.2f} | "
                     f"{_cell('{:.2f}', r['summary']['drop %'], 'mean')} | "
                     f"{_cell('{:.2f}', r['summary']['inter-node MoE MiB/step'], 'mean')} | "
                     + (lambda p: f"{p['remote_tokens']:.1f}, {p['used_pairs']:.2f} / {p['remote_pairs']}, "
                        f"{p['tokens_per_used_pair']:.1f}, {p['busiest_pair']:.1f} |")(c["pilot_remote_spread"]))
    g = meta.get("goals") or {}
    if g:
        lines += ["", "## LocMoE against the goals (means over seeds)", "",
                  "Goal: inter-node bytes <= 0.7x Switch's and Hash's, drop rate <= 1 point above theirs, valid "
                  "perplexity within 2% of the best other router.", ""]
        for base in ("switch", "hash"):
            if f"bytes locmoe/{base}" in g:
                lines.append(f"- bytes LocMoE/{base}: {g[f'bytes locmoe/{base}']:.3f}; drop LocMoE - {base}: "
                             f"{g[f'drop points locmoe-{base}']:+.2f} points")
        if "best baseline ppl" in g:
            lines.append(f"- valid ppl LocMoE vs the best other router ({g['best baseline ppl']}): "
                         f"{g['ppl locmoe vs best %']:+.2f}%")
    return lines + [""]


def tokens_per_step(cfg):
    """(tokens, sequences) one training step of a single process consumes: the whole virtual cluster's
    batch in cluster scope (train.batch_size per data-parallel rank times dp)."""
    from pangu_sigma.build import single_process_groups, single_process_topology

    _, _, multiplier = single_process_groups(cfg, single_process_topology(cfg))
    samples = cfg.train.batch_size * multiplier
    return samples * cfg.model.seq_length, samples


@contextlib.contextmanager
def held(lock_path, log):
    """An exclusive flock(2) on lock_path for the duration (the lock flock(1) takes); no-op without a path."""
    if not lock_path:
        yield
        return
    with open(lock_path, "a") as handle:
        log(f"[compare] waiting for the lock {lock_path}")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def finished_training(run_dir, steps):
    """train()'s summary of a run folder whose training reached `steps` (from its log), else None."""
    from pangu_sigma.training.callbacks import read_jsonl
    log_path = os.path.join(run_dir, "train_log_rank0.jsonl")
    marker = os.path.join(run_dir, "checkpoints", f"step_{steps:08d}.complete")
    if not (os.path.isfile(log_path) and os.path.exists(marker)):
        return None
    rows = [r for r in read_jsonl(log_path) if "step" in r]
    if not rows or rows[-1]["step"] != steps:
        return None
    return {"steps": steps, "losses": {steps: rows[-1]["loss"]}, "tokens_per_s": rows[-1]["tokens_per_s"]}


def run_figures(cfg, router, clusters, config_dir, dispatch, hw, log, lock=None, counts=None, reuse=False):
    """Train one (router, seed) run, evaluate it, simulate it: the run's dict. lock: a file to hold
    an exclusive lock on while training and evaluating. counts: a list to receive eval's routed
    tokens per (layer, batch, token group, expert) on the valid split (pilot runs). reuse: a run folder
    whose training already reached train.train_steps is evaluated (without the lock), not trained again."""
    from pangu_sigma.evaluation.eval import evaluate
    from pangu_sigma.training.train import train

    run_dir = cfg.train.output_dir
    summary = finished_training(run_dir, cfg.train.train_steps) if reuse else None
    if summary is None and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    with held(lock if summary is None else None, log):  # evaluating a finished run alone is light
        if summary is None:
            log(f"[compare] training {router}, seed {cfg.train.seed}: {cfg.train.train_steps} steps -> {run_dir}")
            summary = train(cfg, log=log)
        else:  # eval checks that the run's stored config is this one
            log(f"[compare] {router}, seed {cfg.train.seed}: reusing the finished training in {run_dir}")
        ev = evaluate(cfg, checkpoint_path=run_dir, log=log, pair_counts=counts is not None)
    if counts is not None:
        counts.append(ev.pop("pair_counts"))
    log_path = os.path.join(run_dir, "train_log_rank0.jsonl")
    valid = {key: ev[key] for key in ("tokens", "ce", "perplexity", "expert_load", "dropped", "local", "layers",
                                      "domains", "routing", "dropped_remote", "local_by_rank")}
    run = {"run_dir": run_dir, "seed": cfg.train.seed, "tokens_per_s": summary["tokens_per_s"],
           "final_train_loss": summary["losses"][max(summary["losses"])], "valid": valid,
           "train_log_layers": train_log_table(log_path),
           # the cluster's MoE bytes per step across nodes, as the exchange sends them (training log)
           "moe_inter_node_bytes_per_step": _last_logged(log_path, "moe_inter_node_bytes_cluster"),
           "simulated": simulate_router(router, cfg, log_path, clusters, config_dir, dispatch, hw)}
    log(f"[compare] {router} seed {cfg.train.seed}: valid ppl {ev['perplexity']:.3f} "
        + " ".join(f"{d} {f['perplexity']:.3f}" for d, f in ev["domains"].items()))
    return run


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


def calibrate(cfg, pilot, counts, target_percent):
    """The smallest remote capacity at which the pilot's routed counts (valid split, [M, N, G, E]) drop
    <= target_percent % of the tokens (mean over MoE layers; equal_drops), its factor and bytes."""
    from pangu_sigma.build import single_process_groups, single_process_topology
    from pangu_sigma.tools.equal_drops import (factor_for_capacity, remote_spread, smallest_remote_capacity,
                                               tier_drop_rates)

    topology = single_process_topology(cfg)
    groups, group_ranks, _ = single_process_groups(cfg, topology)
    mask = np.array([topology.local_expert_mask(r) for r in (group_ranks or [topology.rank] * groups)])  # [G, E]
    routing = pilot["valid"]["routing"]
    tokens, local_capacity = routing["tokens_per_group"], routing["capacity"]
    units, quanta = routing.get("remote_units"), routing.get("remote_quanta") or 1  # [G, E] tier-2 units per pair
    multiple = topology.tp if cfg.parallel.groupwise_a2a and topology.tp > 1 else 1
    found = smallest_remote_capacity(counts, mask, local_capacity, target_percent / 100, multiple, units)
    at_pilot = tier_drop_rates(counts, mask, local_capacity, routing["remote_capacity"], units)  # check: = measured
    if found["capacity"] is None:
        raise ConfigError("--equal-drops", target_percent, f"a target above the local tier's predicted drop rate "
                          f"{100 * found['local_drop_rate']:.2f}% (router {cfg.moe.router}; or raise "
                          f"moe.capacity_factor)")
    capacity = found["capacity"]
    return {"target_percent": target_percent, "pilot_run_dir": pilot["run_dir"],
            "pilot_remote_capacity": routing["remote_capacity"],
            "pilot_remote_capacity_factor": routing["remote_capacity_factor"],
            "pilot_valid_perplexity": pilot["valid"]["perplexity"],
            "pilot_drop_percent": 100 * _mean([L["drop_rate"] for L in pilot["valid"]["layers"]]),
            "pilot_predicted_drop_percent": 100 * float((at_pilot[0] + at_pilot[1]).mean()),
            "pilot_inter_node_bytes_per_step": pilot["moe_inter_node_bytes_per_step"],
            "tokens_per_group": tokens, "local_capacity": local_capacity, "remote_capacity": capacity,
            "remote_quanta": quanta,
            "remote_capacity_factor": factor_for_capacity(capacity, tokens, cfg.num_experts * quanta),
            "predicted_drop_percent": 100 * found["drop_rate"],
            "predicted_local_drop_percent": 100 * found["local_drop_rate"],
            "predicted_remote_drop_percent": 100 * found["remote_drop_rate"],
            "predicted_inter_node_bytes_per_step": predicted_inter_node_bytes(cfg, local_capacity, capacity,
                                                                              pilot_units(cfg, routing)),
            "pilot_remote_spread": remote_spread(counts, mask)}


def goals(results):
    """LocMoE against the baselines (Switch, Hash; ppl against the best other router): byte ratios,
    drop difference in points, ppl difference in % (means over seeds)."""
    if "locmoe" not in results:
        return {}
    def mean(router, column):
        return results[router]["summary"][column]["mean"]
    loc = {c: mean("locmoe", c) for c in ("inter-node MoE MiB/step", "drop %", "valid ppl")}
    others = [r for r in results if r != "locmoe"]
    out = {}
    for base in ("switch", "hash"):
        if base in results:
            out[f"bytes locmoe/{base}"] = loc["inter-node MoE MiB/step"] / mean(base, "inter-node MoE MiB/step")
            out[f"drop points locmoe-{base}"] = loc["drop %"] - mean(base, "drop %")
    if others:
        best = min(others, key=lambda r: mean(r, "valid ppl"))
        out["best baseline ppl"] = best
        out["ppl locmoe vs best %"] = 100 * (loc["valid ppl"] / mean(best, "valid ppl") - 1)
    return out


def compare(config_path, routers, steps, output, overrides=(), clusters=DEFAULT_CLUSTERS, config_dir=None,
            dispatch="padded", hw=None, overwrite=False, log=print, seeds=1, equal_drops=None,
            pilot_remote_factor=None, lock=None, reuse=False, router_overrides=None):
    """Train, evaluate and simulate every router over `seeds` seeds (train.seed, train.seed + 1, ...);
    write report.md and report.json; return {'meta': ..., 'results': {router: ...}}.

    equal_drops (a percentage): per router, first a pilot run (seed train.seed) with
    moe.remote_capacity_factor = pilot_remote_factor (default moe.capacity_factor), then the
    smallest remote capacity whose predicted valid drop rate (mean over MoE layers, from the
    pilot's routed counts) is <= equal_drops % (`calibrate`), and the seeded runs at it.
    lock: a file held (flock) while each run trains and evaluates. reuse: finished runs in `output`
    (an interrupted comparison) are evaluated again instead of trained. router_overrides: {router:
    [SECTION.KEY=VALUE, ...]} applied after `overrides` to that router's runs only (e.g. Switch
    without level 1, as its cluster configs)."""
    from pangu_sigma.config import config_from_dict, load_config
    from pangu_sigma.build import dataset_meta

    hw = (hw or Hardware()).validate()
    config_dir = config_dir or default_config_dir()
    if not routers:
        raise ConfigError("--routers", "", f"a comma-separated list from {list(ROUTERS)}")
    for router in routers:
        if router not in ROUTERS:
            raise ConfigError("--routers", router, f"a comma-separated list from {list(ROUTERS)}")
    if len(set(routers)) != len(routers):
        raise ConfigError("--routers", ",".join(routers), "each router at most once")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError("--steps", steps, "an integer >= 1")
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ConfigError("--seeds", seeds, "an integer >= 1")
    base = load_config(config_path, list(overrides))
    if equal_drops is not None:
        if not (isinstance(equal_drops, (int, float)) and 0 <= equal_drops < 100):
            raise ConfigError("--equal-drops", equal_drops, "a drop rate in percent, 0 <= x < 100")
        if base.moe.remote_capacity_factor <= 0:
            raise ConfigError("moe.remote_capacity_factor", base.moe.remote_capacity_factor,
                              "> 0 with --equal-drops (the two-tier exchange, whose remote capacity is calibrated)")
        pilot_remote_factor = base.moe.capacity_factor if pilot_remote_factor is None else pilot_remote_factor
    seed_values = [base.train.seed + k for k in range(seeds)]
    cfgs, pilots = {}, {}

    with open(config_path, encoding="utf-8") as handle:  # read once: runs that start later (after a pilot)
        raw = yaml.safe_load(handle)                       # do not see later edits of the file

    router_overrides = router_overrides or {}
    for router in router_overrides:
        if router not in routers:
            raise ConfigError("--router-set", router, f"one of the compared routers {list(routers)}")

    def router_config(router, run_dir, seed, extra=()):
        return config_from_dict(copy.deepcopy(raw), list(overrides) + router_overrides.get(router, []) + [
            f"moe.router={router}", f"train.output_dir={run_dir}", f"train.train_steps={steps}",
            f"train.seed={seed}"] + list(extra))

    for router in routers:  # validate everything before training anything
        if equal_drops is not None:
            pilots[router] = router_config(router, os.path.join(output, router, "pilot"), seed_values[0],
                                           [f"moe.remote_capacity_factor={pilot_remote_factor!r}"])
        for seed in seed_values:
            cfgs[router, seed] = router_config(router, os.path.join(output, router, f"seed{seed}"), seed)
        if os.path.isdir(os.path.join(output, router)) and os.listdir(os.path.join(output, router)) \
                and not (overwrite or reuse):
            raise ConfigError("--output", output, f"a folder without a previous run in {os.path.join(output, router)} "
                              "(pass --overwrite to replace it)")
    cfg0 = cfgs[routers[0], seed_values[0]]
    domains = list(dataset_meta(cfg0).get("domains", []))
    os.makedirs(output, exist_ok=True)
    results = {}
    for router in routers:
        calibration = None
        if equal_drops is not None:
            counts = []
            pilot = run_figures(pilots[router], router, (), config_dir, dispatch, hw, log, lock, counts, reuse)
            np.save(os.path.join(pilot["run_dir"], "valid_pair_counts.npy"), counts[0])  # [M, N, G, E]
            calibration = calibrate(pilots[router], pilot, counts[0], equal_drops)
            log(f"[compare] {router}: remote capacity {calibration['remote_capacity']} "
                f"(moe.remote_capacity_factor={calibration['remote_capacity_factor']!r}) predicted to drop "
                f"{calibration['predicted_drop_percent']:.2f}% <= {equal_drops:g}% on the valid split "
                f"(pilot at {calibration['pilot_remote_capacity']}: {calibration['pilot_drop_percent']:.2f}%)")
            for seed in seed_values:
                cfgs[router, seed] = router_config(
                    router, os.path.join(output, router, f"seed{seed}"), seed,
                    [f"moe.remote_capacity_factor={calibration['remote_capacity_factor']!r}"])
        runs = [run_figures(cfgs[router, seed], router, clusters, config_dir, dispatch, hw, log, lock, reuse=reuse)
                for seed in seed_values]
        first = cfg0.model.num_layers - cfg0.model.moe_layer_num
        results[router] = {
            "calibration": calibration,
            "seeds": seed_values, "runs": runs, "blocks": list(range(first, cfg0.model.num_layers)),
            "summary": summarize(runs, columns(domains, clusters)),
            "domains": {d: summarize([r["valid"]["domains"][d] for r in runs if d in r["valid"]["domains"]],
                                     DOMAIN_COLUMNS) for d in domains},
        }
    tokens, samples = tokens_per_step(cfg0)
    layout = results[routers[0]]["runs"][0]["valid"]["routing"]
    meta = {"config": config_path, "overrides": list(overrides), "router_overrides": router_overrides,
            "steps": steps, "routers": list(routers),
            "seeds": seed_values, "tokens_per_step": tokens, "samples_per_step": samples,
            "seq_length": cfg0.model.seq_length, "scope": layout["scope"], "token_groups": layout["token_groups"],
            "eval_routing": layout, "data_seed": cfg0.data.seed, "domains": domains, "clusters": list(clusters),
            "columns": [name for name, _, _ in columns(domains, clusters)],
            "domain_columns": [name for name, _, _ in DOMAIN_COLUMNS],
            "dispatch": dispatch, "efficiency": hw.efficiency, "config_dir": config_dir,
            "virtual_world_size": cfg0.parallel.virtual_world_size, "virtual_rank": cfg0.parallel.virtual_rank,
            "devices_per_node": cfg0.parallel.devices_per_node, "equal_drops_percent": equal_drops,
            "pilot_remote_capacity_factor": pilot_remote_factor if equal_drops is not None else None,
            "goals": goals(results)}
    write_json(os.path.join(output, "report.json"), {"meta": meta, "results": results})
    text = render(results, clusters, meta)
    tmp = os.path.join(output, f"report.md.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, os.path.join(output, "report.md"))
    log(f"[compare] wrote {os.path.join(output, 'report.md')} and report.json")
    return {"meta": meta, "results": results}


def parse_list(text, name, cast=str):
    try:
        return [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(name, text, "a comma-separated list") from None


def parse_router_sets(items):
    """['switch:moe.num_domain_groups=1', ...] -> {'switch': ['moe.num_domain_groups=1', ...]}."""
    out = {}
    for item in items:
        router, sep, setting = item.partition(":")
        section, dot, key = setting.partition("=")[0].strip().partition(".")
        if not sep or "=" not in setting or not (section and dot and key) or "." in key:
            raise ConfigError("--router-set", item, "ROUTER:SECTION.KEY=VALUE, e.g. switch:moe.num_domain_groups=1")
        out.setdefault(router.strip(), []).append(setting.strip())
    return out


def main(argv=None):
    parser = OneLineParser(prog="python -m pangu_sigma.tools.compare_routers",
                           description="Train every router on the same budget; compare perplexity, load, "
                                       "locality and simulated cluster step time.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--routers", default="locmoe,switch,hash,rre")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seeds", type=int, default=1, help="runs per router: train.seed, train.seed + 1, ...")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--router-set", action="append", default=[], metavar="ROUTER:SECTION.KEY=VALUE",
                        help="a config override for one router's runs only (after --set)")
    parser.add_argument("--clusters", default="64,128,256", help="cluster sizes to simulate (devices)")
    parser.add_argument("--cluster-config-dir", help="folder of <router>_<n>n.yaml (default: configs/)")
    parser.add_argument("--dispatch", default="padded", choices=("padded", "routed"),
                        help="padded: the shapes MoELayer sends (default); routed: an All-to-AllV what-if")
    parser.add_argument("--efficiency", type=float, default=Hardware.efficiency)
    parser.add_argument("--overwrite", action="store_true", help="replace previous runs in --output")
    parser.add_argument("--quiet", action="store_true", help="only the [compare] lines")
    parser.add_argument("--equal-drops", type=float, metavar="PERCENT",
                        help="compare at equal drops: per router a pilot run, then the smallest remote capacity "
                             "whose valid drop rate is <= PERCENT (mean over MoE layers) for the seeded runs")
    parser.add_argument("--pilot-remote-capacity-factor", type=float,
                        help="the pilot runs' moe.remote_capacity_factor (default moe.capacity_factor)")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate runs in --output whose training finished instead of training them again")
    parser.add_argument("--lock", help="a file to hold an exclusive flock on while each run trains and evaluates "
                                       "(runs interleave with other heavy jobs on a shared machine)")
    args = parser.parse_args(argv)

    def log(line):
        if not args.quiet or line.startswith("[compare]"):
            print(line, flush=True)

    try:
        clusters = parse_list(args.clusters, "--clusters", int)
        if any(n < 1 for n in clusters):
            raise ConfigError("--clusters", args.clusters, "positive device counts")
        compare(args.config, parse_list(args.routers, "--routers"), args.steps, args.output, args.set, clusters,
                args.cluster_config_dir, args.dispatch, Hardware(efficiency=args.efficiency), args.overwrite, log,
                args.seeds, args.equal_drops, args.pilot_remote_capacity_factor, args.lock, args.reuse,
                parse_router_sets(args.router_set))
    except ConfigError as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
