"""Train and compare routers on the same data and budget over several seeds; simulate their step time on 64N/128N/256N.

    python -m pangu_sigma.tools.compare_routers --config FILE --routers locmoe,switch,hash,rre
        --steps N --output DIR [--seeds K] [--set a.b=c ...] [--clusters 64,128,256]
        [--cluster-config-dir configs] [--dispatch padded|routed] [--efficiency X] [--overwrite] [--quiet]
        [--equal-drops PERCENT [--pilot-remote-capacity-factor X] [--check-rounds K]] [--lock FILE] [--reuse]

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
  valid_pair_counts.npy). A learned router trained at that tight capacity routes
  otherwise than its pilot, and its seeds split a node's tokens differently, so the
  measured drops can overshoot the prediction: up to K check rounds (--check-rounds,
  default 2) size the tiers again from the seeds' own routed counts, pooled, and train
  every seed at the new capacities (DIR/R/round<k>/seed<s>), until a round keeps them;
  report.md lists the rounds and flags a router whose measured
  drops exceed the target. report.md gives the calibration and LocMoE's byte ratios against
  Switch and Hash, drop difference and perplexity against the best other router.
Columns are named entries of RUN_COLUMNS / DOMAIN_COLUMNS (one line each).
The stages live in compare_runs, compare_evaluation, compare_calibration, compare_simulation and
compare_report; this module is the command line and the loop over routers and seeds.
"""
import copy
import os
import sys

import numpy as np

from locmoe.config import ROUTERS
from locmoe.errors import ConfigError
from pangu_sigma.tools._cli import OneLineParser, fail, write_json
from pangu_sigma.tools.cost_model import Hardware
from pangu_sigma.tools.compare_calibration import (calibrate, capacity_overrides, goals,  # noqa: F401 (goals:
                                                   seed_rounds)                        # this CLI's API)
from pangu_sigma.tools.compare_evaluation import DOMAIN_COLUMNS, RUN_COLUMNS, columns, spread, summarize  # noqa: F401
from pangu_sigma.tools.compare_report import _cell, _n_label, render, render_calibration  # noqa: F401
from pangu_sigma.tools.compare_runs import run_figures, tokens_per_step
from pangu_sigma.tools.compare_simulation import DEFAULT_CLUSTERS, default_config_dir


def compare(config_path, routers, steps, output, overrides=(), clusters=DEFAULT_CLUSTERS, config_dir=None,
            dispatch="padded", hw=None, overwrite=False, log=print, seeds=1, equal_drops=None,
            pilot_remote_factor=None, lock=None, reuse=False, router_overrides=None, check_rounds=2):
    """Train, evaluate and simulate every router over `seeds` seeds (train.seed, train.seed + 1, ...);
    write report.md and report.json; return {'meta': ..., 'results': {router: ...}}.

    equal_drops (a percentage): per router, first a pilot run (seed train.seed) with
    moe.remote_capacity_factor = pilot_remote_factor (default moe.capacity_factor), then the
    smallest remote capacity whose predicted valid drop rate (mean over MoE layers, from the
    pilot's routed counts) is <= equal_drops % (`calibrate`), and the seeded runs at it.
    check_rounds: up to this many check rounds after the first (compare_calibration.seed_rounds): the tiers
    sized again from the seeds' own routed counts, pooled, and every seed trained at the new capacities,
    until a round keeps them (0: the pilot's calibration as it is; its record still says what the seeds'
    counts call for).
    lock: a file held (flock) while each run trains and evaluates. reuse: finished runs in `output`
    (an interrupted comparison) are evaluated again instead of trained. router_overrides: {router:
    [SECTION.KEY=VALUE, ...]} applied after `overrides` to that router's runs only (e.g. Switch
    without level 1, as its cluster configs)."""
    from pangu_sigma.config import config_from_dict, load_config, read_yaml
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
        if not (isinstance(check_rounds, int) and check_rounds >= 0):
            raise ConfigError("--check-rounds", check_rounds, "an integer >= 0")
    seed_values = [base.train.seed + k for k in range(seeds)]
    cfgs, pilots = {}, {}

    with open(config_path, encoding="utf-8") as handle:  # read once: runs that start later (after a pilot)
        raw = read_yaml(handle)                             # do not see later edits of the file

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
            log(f"[compare] {router}: local capacity {calibration['local_capacity']} (moe.capacity_factor="
                f"{calibration['capacity_factor']!r}), remote capacity {calibration['remote_capacity']} "
                f"(moe.remote_capacity_factor={calibration['remote_capacity_factor']!r}) predicted to drop "
                f"{calibration['predicted_drop_percent']:.2f}% <= {equal_drops:g}% on the valid split "
                f"(pilot at {calibration['pilot_remote_capacity']}: {calibration['pilot_drop_percent']:.2f}%)")

            def seed_config(k, seed, c):
                folder = os.path.join(output, router, *([f"round{k}"] if k else []), f"seed{seed}")
                cfgs[router, seed] = router_config(router, folder, seed, capacity_overrides(c))
                return cfgs[router, seed]

            calibration, runs = seed_rounds(
                calibration, seed_config, lambda cfg, counts: run_figures(
                    cfg, router, clusters, config_dir, dispatch, hw, log, lock, counts, reuse),
                seed_values, equal_drops, check_rounds, log)
        else:
            runs = [run_figures(cfgs[router, seed], router, clusters, config_dir, dispatch, hw, log, lock,
                                reuse=reuse) for seed in seed_values]
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
            "goals": goals(results, equal_drops)}
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
    parser.add_argument("--check-rounds", type=int, default=2, metavar="K",
                        help="with --equal-drops: up to K more rounds of every seed, the tiers sized again from "
                             "the seeds' own routed counts until the capacities hold (default 2)")
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
                parse_router_sets(args.router_set), args.check_rounds)
    except ConfigError as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
