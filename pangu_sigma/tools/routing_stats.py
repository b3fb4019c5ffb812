"""Routing statistics for the simulator: the file format, and a converter from a training log.

Format (JSON, one object):

    {
      "format": "pangu_sigma.routing_stats/1",
      "world_size": W,            # devices of the cluster the counts describe
      "num_experts": E,
      "tokens_per_rank": N,       # tokens each device routes per step (batch_size * seq_length)
      "counts": [                 # one entry per MoE layer, bottom to top
        [[c_0, ..., c_{E-1}],     # source rank 0: tokens it routes to each expert per step,
         ...],                    #   before capacity drops; one row per global rank (W rows);
        ...                       #   the TP ranks of one data-parallel group hold the same tokens
      ],                          #   and should have equal rows (the simulator averages them)
      "source": {...}             # free-form provenance
    }

Counts may be fractional (expected tokens). The simulator rescales each row to
its config's tokens per rank, so only the distribution over experts matters.

Converter: python -m pangu_sigma.tools.routing_stats --train-log LOG.jsonl
    --train-config RUN.yaml --config CLUSTER.yaml [--world-size N | --rank-table F]
    [--placement auto|same|relative] [--last-steps K] --output STATS.json

A single-process run with a virtual topology measures one rank: the
`expert_load` [M, E] of the training log (train_log_rank0.jsonl, one record per
step) summed over the last K logged steps (default: the last half) gives that
rank's distribution p over its E_m experts per layer. It is scaled to every
rank of the target cluster in one of two ways:

- same: every rank routes with p (resampled to the target's E experts). Right
  for routers whose decision does not depend on where a rank sits: Switch (one
  gate shared by all ranks), Hash and RRE (one table). Load imbalance is then
  global: a hot expert is hot for every rank.
- relative (node-relative): LocMoE's locality loss pulls each rank towards the
  experts of its own node, so a rank's distribution is defined relative to its
  node. The measurement gives the local fraction lambda on the k_m experts local
  to the virtual rank; it is turned into a per-expert odds ratio
  w = (lambda / k_m) / ((1 - lambda) / (E_m - k_m)) (a constant logit bias on
  local experts, which is what the locality term adds) and applied on the
  target: a rank with k_t local experts of E puts
  lambda_t = k_t w / (k_t w + E - k_t) on them. Within the local and within the
  remote experts the measured profile is kept (resampled; remote experts are
  taken cyclically from the one after the node's block, so different nodes'
  hot remote experts differ).
  This is an extrapolation from one rank's pose (rank scope), which overstates
  locality: with i.i.d. data the cluster-wide local fraction of a router that
  decides from the token alone is the placement baseline (docs/routing.md).
  Use it only as a labelled what-if.
- auto (default): same for every router.

From a cluster-scope measurement (preferred; issue 9 item 5): python -m
    pangu_sigma.tools.routing_stats --eval-json EVAL.json --train-config RUN.yaml
    --config CLUSTER.yaml [--world-size N | --rank-table F] --output STATS.json

EVAL.json is what `python -m pangu_sigma.evaluation.eval --json` writes for a run
with parallel.virtual_scope=cluster: `load_by_rank` [M, G, E_m], the tokens each
token group (= data-parallel rank of the virtual cluster, with its own node and,
under domain-affine placement, its own domains) routed to each expert. Each rank
of the target takes the pattern of one measured rank, by a fixed rule: target
data-parallel rank r on node n, the q-th data-parallel rank of its node, takes
measured rank g = the (q mod k)-th of the k measured ranks on measured node
n mod N_m (N_m measured nodes). Its row p_g is mapped with `relative_row`: the
local mass of g (its share on its own node's experts) becomes an odds ratio on
the target node's local experts, and the remote profile is laid on the target's
remote experts in node order starting after the rank's node, so experts are
relabelled by node, not by index. Nothing is scaled from one rank: the spread
between ranks (which domains they read, how local each is) is the measured one.

Resampling p from E_m to E experts keeps the order and the mass: the
cumulative distribution is interpolated linearly at e / E (so with E a
multiple of E_m each measured expert is split evenly). Layers: target layer j
uses measured layer floor(j * M_m / M).
"""
import os
import sys

import numpy as np

from locmoe.errors import ConfigError
from pangu_sigma.tools._cli import OneLineParser, fail, write_json

FORMAT = "pangu_sigma.routing_stats/1"
PLACEMENTS = ("auto", "same", "relative")


# ---------------------------------------------------------------- file format
def make_stats(counts, tokens_per_rank, source=None):
    """The JSON-ready dict for counts [M, W, E]."""
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 3:
        raise ConfigError("counts", counts.shape, "shape [moe layers, world size, experts]")
    return {"format": FORMAT, "world_size": int(counts.shape[1]), "num_experts": int(counts.shape[2]),
            "tokens_per_rank": int(tokens_per_rank), "counts": counts.tolist(), "source": source or {}}


def load_stats(path):
    """Read and check a routing-stats file: the dict with counts as a float array [M, W, E]."""
    import json
    if not os.path.isfile(path):
        raise ConfigError("--routing-stats", path, "an existing JSON file")
    try:
        with open(path, encoding="utf-8") as handle:
            stats = json.load(handle)
    except (OSError, ValueError) as err:
        raise ConfigError("--routing-stats", path, f"a readable JSON file ({err})") from None
    if not isinstance(stats, dict) or stats.get("format") != FORMAT:
        raise ConfigError("--routing-stats", path, f"a JSON object with \"format\": \"{FORMAT}\"")
    try:
        counts = np.asarray(stats["counts"], np.float64)
        world, experts = int(stats["world_size"]), int(stats["num_experts"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError("--routing-stats", path, f"counts, world_size and num_experts fields ({err})") from None
    if counts.ndim != 3 or counts.shape[1:] != (world, experts):
        raise ConfigError("--routing-stats", path, f"counts of shape [layers, world_size {world}, num_experts "
                          f"{experts}]; found {list(counts.shape)}")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ConfigError("--routing-stats", path, "non-negative finite counts")
    stats["counts"] = counts
    return stats


def uniform_counts(layers, world, experts, tokens_per_rank):
    """Every rank routes tokens_per_rank / E tokens to each expert. [M, W, E]"""
    return np.full((layers, world, experts), tokens_per_rank / experts, np.float64)


# ---------------------------------------------------------------- from a training log
def measured_loads(records, last_steps=None):
    """Sum of expert_load [M, E] over the last `last_steps` logged steps (default: the last half)."""
    loads = [np.asarray(r["expert_load"], np.float64) for r in records if r.get("expert_load")]
    if not loads:
        raise ConfigError("--train-log", "expert_load", "a training log with per-step expert_load records "
                          "(a model with MoE layers)")
    if last_steps is None:
        last_steps = max(1, len(loads) // 2)
    if not (isinstance(last_steps, int) and last_steps >= 1):
        raise ConfigError("--last-steps", last_steps, "an integer >= 1")
    return np.sum(loads[-last_steps:], axis=0), min(last_steps, len(loads))


def resample(p, n):
    """Order- and mass-preserving resampling of a distribution p [E_m] onto n bins (CDF interpolation)."""
    p = np.asarray(p, np.float64)
    if len(p) == n:
        return p.copy()
    cdf = np.concatenate([[0.0], np.cumsum(p)])
    grid = np.linspace(0.0, 1.0, len(p) + 1)
    at = np.interp(np.linspace(0.0, 1.0, n + 1), grid, cdf)
    return np.diff(at)


def _normalised(p):
    p = np.asarray(p, np.float64)
    total = p.sum()
    return p / total if total > 0 else np.full(len(p), 1.0 / max(1, len(p)))


def _cyclic_after(indices, first, size):
    """indices sorted cyclically starting at `first` (mod size)."""
    return sorted(indices, key=lambda e: (e - first) % size)


def relative_row(p, local_m, local_t, num_experts):
    """A target rank's distribution [E] from the measured p [E_m] and local masks (see the module docstring).

    Returns None when the measurement carries no locality (no or all measured experts local).
    """
    e_m = len(p)
    loc_m = [e for e in range(e_m) if local_m[e]]
    rem_m = [e for e in range(e_m) if not local_m[e]]
    if not loc_m or not rem_m:
        return None
    lam = float(np.clip(p[loc_m].sum() / max(p.sum(), 1e-300), 1e-6, 1 - 1e-6))
    odds = (lam / len(loc_m)) / ((1 - lam) / len(rem_m))
    loc_t = sorted(local_t)
    rem_t = [e for e in range(num_experts) if e not in set(loc_t)]
    row = np.zeros(num_experts)
    if not rem_t:
        row[loc_t] = resample(_normalised(p[loc_m]), len(loc_t))
        return row
    lam_t = len(loc_t) * odds / (len(loc_t) * odds + len(rem_t)) if loc_t else 0.0
    if loc_t:
        row[loc_t] = lam_t * resample(_normalised(p[loc_m]), len(loc_t))
    rem_m_order = _cyclic_after(rem_m, max(loc_m) + 1, e_m)
    rem_t_order = _cyclic_after(rem_t, (max(loc_t) + 1) if loc_t else 0, num_experts)
    row[rem_t_order] = (1 - lam_t) * resample(_normalised(p[rem_m_order]), len(rem_t))
    return row


def convert(loads, measured_local, target_topology, tokens_per_rank, moe_layers, placement, router):
    """counts [M, W, E] for the target from measured loads [M_m, E_m] and the virtual rank's local mask."""
    if placement not in PLACEMENTS:
        raise ConfigError("--placement", placement, f"one of {list(PLACEMENTS)}")
    mode = "same" if placement == "auto" else placement  # relative: an explicit, labelled extrapolation
    loads = np.asarray(loads, np.float64)
    layers_m = loads.shape[0]
    world, experts = target_topology.world_size, target_topology.num_experts
    local_m = np.asarray(measured_local, bool)
    counts = np.zeros((moe_layers, world, experts))
    used = mode
    for j in range(moe_layers):
        p = _normalised(loads[min(layers_m - 1, j * layers_m // moe_layers)])
        same = resample(p, experts)
        for r in range(world):
            row = None
            if mode == "relative":
                row = relative_row(p, local_m, target_topology.local_experts(r), experts)
                if row is None:
                    used = "same (the measurement has no local/remote split)"
            counts[j, r] = tokens_per_rank * (same if row is None else row)
    return counts, used


def from_train_log(log_path, train_cfg, target_cfg, world_size=None, rank_table=None, devices_per_node=None,
                   placement="auto", last_steps=None):
    """Routing-stats dict for the target cluster from a single-process training log."""
    from pangu_sigma.cluster import plan
    from pangu_sigma.build import single_process_topology
    from pangu_sigma.training.callbacks import read_jsonl

    if not os.path.isfile(log_path):
        raise ConfigError("--train-log", log_path, "an existing train_log_rank<r>.jsonl")
    try:
        records = read_jsonl(log_path)
    except (OSError, ValueError) as err:
        raise ConfigError("--train-log", log_path, f"a JSON-lines training log ({err})") from None
    loads, steps = measured_loads(records, last_steps)
    measured_topo = single_process_topology(train_cfg)
    if loads.shape[1] != train_cfg.num_experts:
        raise ConfigError("--train-log", log_path, f"expert_load over the {train_cfg.num_experts} experts of "
                          f"--train-config; it has {loads.shape[1]}")
    local = measured_topo.local_expert_mask(measured_topo.rank)
    world, node_of_rank, dpn, _ = plan.resolve_cluster(target_cfg, rank_table, world_size, devices_per_node)
    plan.check_layout(target_cfg, world, dpn)
    topo = plan.build_topology(target_cfg, world, node_of_rank, dpn)
    tokens = target_cfg.train.batch_size * target_cfg.model.seq_length
    counts, used = convert(loads, local, topo, tokens, target_cfg.model.moe_layer_num, placement,
                           train_cfg.moe.router)
    shares = loads / np.maximum(loads.sum(1, keepdims=True), 1e-300)
    source = {"train_log": os.path.abspath(log_path), "router": train_cfg.moe.router, "steps_used": steps,
              "measured_experts": int(loads.shape[1]), "measured_layers": int(loads.shape[0]),
              "measured_local_experts": [e for e, v in enumerate(local) if v],
              "measured_local_fraction": [float(s[np.asarray(local, bool)].sum()) for s in shares],
              "measured_shares": shares.tolist(), "placement": used}
    return make_stats(counts, tokens, source)


def cluster_counts(load_by_rank, measured_topology, target_topology, tokens_per_rank, moe_layers):
    """counts [M, W, E] for the target from a cluster-scope measurement load_by_rank [M_m, G, E_m]
    (one row per data-parallel rank of measured_topology); the mapping rule is in the module docstring."""
    loads = np.asarray(load_by_rank, np.float64)
    if loads.ndim != 3 or loads.shape[1] != measured_topology.dp or loads.shape[2] != measured_topology.num_experts:
        raise ConfigError("load_by_rank", list(loads.shape), f"[moe layers, {measured_topology.dp} data-parallel "
                          f"ranks, {measured_topology.num_experts} experts] of the measured cluster")
    tp_m = measured_topology.tp
    measured_nodes = sorted({measured_topology.node(g * tp_m) for g in range(measured_topology.dp)})
    ranks_of = {n: [g for g in range(measured_topology.dp) if measured_topology.node(g * tp_m) == n]
                for n in measured_nodes}
    tp = target_topology.tp
    target_nodes = sorted({target_topology.node(d * tp) for d in range(target_topology.dp)})
    target_ranks_of = {n: [d for d in range(target_topology.dp) if target_topology.node(d * tp) == n]
                       for n in target_nodes}
    experts = target_topology.num_experts
    counts = np.zeros((moe_layers, target_topology.world_size, experts))
    source = {}
    for r in range(target_topology.world_size):
        d = target_topology.dp_rank(r)
        node = target_topology.node(r)
        node_index = target_nodes.index(node)
        measured_node = measured_nodes[node_index % len(measured_nodes)]
        group = ranks_of[measured_node][target_ranks_of[node].index(d) % len(ranks_of[measured_node])]
        source[r] = group
        local_m = measured_topology.local_expert_mask(group * tp_m)
        for j in range(moe_layers):
            p = _normalised(loads[min(len(loads) - 1, j * len(loads) // moe_layers), group])
            row = relative_row(p, local_m, target_topology.local_experts(r), experts)
            counts[j, r] = tokens_per_rank * (resample(p, experts) if row is None else row)
    return counts, source


def from_cluster_eval(eval_path, train_cfg, target_cfg, world_size=None, rank_table=None, devices_per_node=None):
    """Routing-stats dict for the target cluster from a cluster-scope eval JSON (load_by_rank)."""
    import json
    from pangu_sigma.cluster import plan
    from pangu_sigma.build import single_process_topology

    try:
        with open(eval_path, encoding="utf-8") as handle:
            result = json.load(handle)
        loads = np.asarray(result["load_by_rank"], np.float64)
        scope = result["routing"]["scope"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError("--eval-json", eval_path, f"an eval --json file with load_by_rank ({err})") from None
    if scope != "cluster":
        raise ConfigError("--eval-json", eval_path, f"an eval of a cluster-scope run (parallel.virtual_scope="
                          f"cluster); it was routed in {scope} scope")
    measured_topo = single_process_topology(train_cfg)
    world, node_of_rank, dpn, _ = plan.resolve_cluster(target_cfg, rank_table, world_size, devices_per_node)
    plan.check_layout(target_cfg, world, dpn)
    topo = plan.build_topology(target_cfg, world, node_of_rank, dpn)
    tokens = target_cfg.train.batch_size * target_cfg.model.seq_length
    counts, groups = cluster_counts(loads, measured_topo, topo, tokens, target_cfg.model.moe_layer_num)
    shares = loads / np.maximum(loads.sum(2, keepdims=True), 1e-300)  # [M, G, E]
    local = np.array([measured_topo.local_expert_mask(g * measured_topo.tp) for g in range(measured_topo.dp)])
    source = {"eval_json": os.path.abspath(eval_path), "router": train_cfg.moe.router, "scope": "cluster",
              "measured_ranks": int(loads.shape[1]), "measured_experts": int(loads.shape[2]),
              "measured_local_fraction_by_rank": (shares * local[None]).sum(2).tolist(),
              "measured_rank_of_target_rank": [groups[r] for r in range(world)],
              "placement": "cluster (measured rank per target rank, node-relative)"}
    return make_stats(counts, tokens, source)


def main(argv=None):
    parser = OneLineParser(prog="python -m pangu_sigma.tools.routing_stats",
                           description="Convert a single-process training log's expert_load into routing "
                                       "statistics of a target cluster for the simulator.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train-log", help="train_log_rank0.jsonl of the measured run (one distribution, scaled)")
    source.add_argument("--eval-json", help="eval --json of a cluster-scope run: per-rank routing (preferred)")
    parser.add_argument("--train-config", required=True, help="config of the measured run (virtual topology)")
    parser.add_argument("--config", required=True, help="config of the cluster to simulate")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field of --config")
    parser.add_argument("--world-size", type=int)
    parser.add_argument("--rank-table")
    parser.add_argument("--devices-per-node", type=int)
    parser.add_argument("--placement", default="auto", choices=PLACEMENTS)
    parser.add_argument("--last-steps", type=int, help="logged steps to average (default: the last half)")
    parser.add_argument("--output", required=True, help="routing-stats JSON to write")
    args = parser.parse_args(argv)
    try:
        from pangu_sigma.config import load_config
        train_cfg = load_config(args.train_config)
        target_cfg = load_config(args.config, args.set)
        if args.eval_json:
            stats = from_cluster_eval(args.eval_json, train_cfg, target_cfg, args.world_size, args.rank_table,
                                      args.devices_per_node)
        else:
            stats = from_train_log(args.train_log, train_cfg, target_cfg, args.world_size, args.rank_table,
                                   args.devices_per_node, args.placement, args.last_steps)
    except ConfigError as err:
        return fail(err)
    write_json(args.output, stats)
    src = stats["source"]
    measured = f"{src['steps_used']} logged steps" if "steps_used" in src else f"{src['measured_ranks']} measured ranks"
    print(f"wrote {args.output}: {len(stats['counts'])} layers x {stats['world_size']} ranks x "
          f"{stats['num_experts']} experts from {measured} ({src['placement']} placement)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
