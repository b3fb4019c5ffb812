"""Train and compare routers on the same data, seed and budget; simulate their step time on 64N/128N/256N.

    python -m pangu_sigma.tools.compare_routers --config FILE --routers locmoe,switch,hash,rre
        --steps N --output DIR [--set a.b=c ...] [--clusters 64,128,256] [--cluster-config-dir configs]
        [--dispatch padded|routed] [--efficiency X] [--overwrite] [--quiet]

For every router R: `pangu_sigma.training.train.train` with moe.router=R,
train.output_dir=DIR/R and train.train_steps=N (everything else, data, seed,
batch and steps, identical), then `pangu_sigma.evaluation.eval.evaluate` on the valid
split. Then one table, DIR/report.md and DIR/report.json:

- tokens/s: training throughput after compilation (this machine)
- valid perplexity of the final checkpoint
- per MoE layer on the valid split (the final model): max/mean expert load,
  the smallest expert's share of the tokens, drop rate, and the locality
  fraction (tokens routed to experts on the node of the (virtual) rank the
  process poses as: parallel.virtual_world_size / devices_per_node)
- the simulator's step time for each cluster size, from that run's routing
  statistics: the training log's expert_load over the last half of the
  steps, scaled to every rank of the cluster by
  `pangu_sigma.tools.routing_stats` (the same distribution on every rank), with the cluster's config
  configs/<R>_<n>n.yaml, else configs/locmoe_<n>n.yaml with moe.router=R.
  The same with uniform routing is in report.json for reference.
"""
import os
import shutil
import sys

import numpy as np

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
    load = np.asarray(load, np.float64)
    out = []
    for m in range(load.shape[0]):
        routed = max(load[m].sum(), 1e-300)
        share = load[m] / routed
        out.append({"max_over_mean": float(share.max() * load.shape[1]), "min_share": float(share.min()),
                    "drop_rate": float(dropped[m] / routed), "local_fraction": float(local[m] / routed)})
    return out


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
            routed = run(cluster_cfg, world_size=size, routing_stats=stats, dispatch=dispatch, hw=hw)
            uniform = run(cluster_cfg, world_size=size, dispatch=dispatch, hw=hw)
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
    return float(np.mean(values)) if values else float("nan")


def render(results, clusters, meta):
    lines = ["# Router comparison", "",
             f"Config `{meta['config']}` with {meta['overrides'] or 'no overrides'}; {meta['steps']} steps of "
             f"{meta['tokens_per_step']:,} tokens for every router (same data, seed and budget). Layer statistics "
             f"are on the valid split with the final weights; locality = share of tokens routed to experts on the "
             f"node of the (virtual) rank {meta['virtual_rank']} of {meta['virtual_world_size'] or 1} devices, "
             f"{meta['devices_per_node']} per node. Step times: `pangu_sigma.tools.simulate` "
             f"({meta['dispatch']} dispatch, efficiency {meta['efficiency']}) with each run's routing statistics "
             f"scaled to the cluster.", ""]
    header = ["router", "tokens/s", "valid ppl", "max/mean load", "smallest share", "drop %", "local %"]
    header += [f"step {n}N (ms)" for n in clusters]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for router, r in results.items():
        layers = r["valid_layers"]
        row = [router, f"{r['tokens_per_s']:,.0f}", f"{r['valid_perplexity']:.3f}",
               f"{_mean([L['max_over_mean'] for L in layers]):.3f}",
               f"{min([L['min_share'] for L in layers], default=float('nan')):.4f}",
               f"{100 * _mean([L['drop_rate'] for L in layers]):.2f}",
               f"{100 * _mean([L['local_fraction'] for L in layers]):.2f}"]
        for n in clusters:
            sim = r["simulated"].get(n, {})
            row.append(f"{1e3 * sim['routed']['step_time']:,.1f}" if "routed" in sim else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Load columns: mean over MoE layers of max/mean, the smallest share over layers, mean drop and "
                  "locality over layers.", "", "## Per layer (valid split)", "",
              "| router | block | max/mean load | smallest share | drop % | local % |", "|---|---|---|---|---|---|"]
    for router, r in results.items():
        for block, L in zip(r["blocks"], r["valid_layers"]):
            lines.append(f"| {router} | {block} | {L['max_over_mean']:.3f} | {L['min_share']:.4f} | "
                         f"{100 * L['drop_rate']:.2f} | {100 * L['local_fraction']:.2f} |")
    lines += ["", "## Simulated step (ms): computation / communication / overlapped / idle; A2A share", "",
              "| router | cluster | routing | step | computation | communication | overlapped | idle | A2A % "
              "| A2A node-local % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for router, r in results.items():
        for n in clusters:
            sim = r["simulated"].get(n, {})
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


def compare(config_path, routers, steps, output, overrides=(), clusters=DEFAULT_CLUSTERS, config_dir=None,
            dispatch="padded", hw=None, overwrite=False, log=print):
    """Train, evaluate and simulate every router; write report.md and report.json; return the results dict."""
    from pangu_sigma.config import load_config
    from pangu_sigma.evaluation.eval import evaluate
    from pangu_sigma.training.train import train

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
    cfgs = {}
    for router in routers:  # validate everything before training anything
        run_dir = os.path.join(output, router)
        cfgs[router] = load_config(config_path, list(overrides) + [f"moe.router={router}",
                                                                    f"train.output_dir={run_dir}",
                                                                    f"train.train_steps={steps}"])
        if os.path.isdir(run_dir) and os.listdir(run_dir) and not overwrite:
            raise ConfigError("--output", output, f"a folder without a previous run in {run_dir} "
                              "(pass --overwrite to replace it)")
    os.makedirs(output, exist_ok=True)
    results = {}
    for router in routers:
        cfg = cfgs[router]
        run_dir = cfg.train.output_dir
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        log(f"[compare] training {router}: {steps} steps -> {run_dir}")
        summary = train(cfg, log=log)
        ev = evaluate(cfg, checkpoint_path=run_dir, log=log)
        log_path = os.path.join(run_dir, "train_log_rank0.jsonl")
        first = cfg.model.num_layers - cfg.model.moe_layer_num
        results[router] = {
            "run_dir": run_dir,
            "tokens_per_s": summary["tokens_per_s"],
            "final_train_loss": summary["losses"][max(summary["losses"])],
            "valid_perplexity": ev["perplexity"],
            "valid_ce": ev["ce"],
            "blocks": list(range(first, cfg.model.num_layers)),
            "valid_layers": layer_table(ev["expert_load"], ev["dropped"], ev["local"]),
            "train_log_layers": train_log_table(log_path),
            # by tier and by rank (valid split), and the MoE bytes per step as the exchange sends them
            "valid_dropped_remote": ev.get("dropped_remote"), "valid_local_by_rank": ev.get("local_by_rank"),
            "moe_inter_node_bytes_per_step": _last_logged(log_path, "moe_inter_node_bytes_cluster"),
            "simulated": simulate_router(router, cfg, log_path, clusters, config_dir, dispatch, hw),
        }
    cfg0 = cfgs[routers[0]]
    meta = {"config": config_path, "overrides": list(overrides), "steps": steps, "routers": list(routers),
            "tokens_per_step": cfg0.train.batch_size * cfg0.model.seq_length, "clusters": list(clusters),
            "dispatch": dispatch, "efficiency": hw.efficiency, "config_dir": config_dir,
            "virtual_world_size": cfg0.parallel.virtual_world_size, "virtual_rank": cfg0.parallel.virtual_rank,
            "devices_per_node": cfg0.parallel.devices_per_node}
    write_json(os.path.join(output, "report.json"), {"meta": meta, "results": results})
    with open(os.path.join(output, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(render(results, clusters, meta))
    log(f"[compare] wrote {os.path.join(output, 'report.md')} and report.json")
    return {"meta": meta, "results": results}


def parse_list(text, name, cast=str):
    try:
        return [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(name, text, "a comma-separated list") from None


def main(argv=None):
    parser = OneLineParser(prog="python -m pangu_sigma.tools.compare_routers",
                           description="Train every router on the same budget; compare perplexity, load, "
                                       "locality and simulated cluster step time.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--routers", default="locmoe,switch,hash,rre")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--clusters", default="64,128,256", help="cluster sizes to simulate (devices)")
    parser.add_argument("--cluster-config-dir", help="folder of <router>_<n>n.yaml (default: configs/)")
    parser.add_argument("--dispatch", default="padded", choices=("padded", "routed"),
                        help="padded: the shapes MoELayer sends (default); routed: an All-to-AllV what-if")
    parser.add_argument("--efficiency", type=float, default=Hardware.efficiency)
    parser.add_argument("--overwrite", action="store_true", help="replace previous runs in --output")
    parser.add_argument("--quiet", action="store_true", help="only the [compare] lines")
    args = parser.parse_args(argv)

    def log(line):
        if not args.quiet or line.startswith("[compare]"):
            print(line, flush=True)

    try:
        clusters = parse_list(args.clusters, "--clusters", int)
        if any(n < 1 for n in clusters):
            raise ConfigError("--clusters", args.clusters, "positive device counts")
        compare(args.config, parse_list(args.routers, "--routers"), args.steps, args.output, args.set, clusters,
                args.cluster_config_dir, args.dispatch, Hardware(efficiency=args.efficiency), args.overwrite, log)
    except ConfigError as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
