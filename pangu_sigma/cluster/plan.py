"""Plan a run: validate a config against a cluster and print its layout, size and traffic.

    python -m pangu_sigma.cluster.plan --config FILE [--rank-table FILE]
                               [--world-size N] [--devices-per-node N] [--set a.b=c ...] [--json]

Needs no hardware and initialises no communication (MindSpore is imported
only for locmoe.comm's byte accounting).

The cluster, in this order of precedence:
1. --rank-table FILE: world size = its device count, nodes = its servers
   (rank -> server from the table, so uneven servers are handled);
   --world-size, if also given, must agree.
2. --world-size N: nodes are consecutive blocks of devices per node,
   taken from --devices-per-node or else parallel.devices_per_node.
3. parallel.virtual_world_size if > 0 (the cluster a CPU process poses as).
Otherwise it is an error: the config alone does not say how many devices
there are (at 256 NPUs, TP 8 x EP 16 leaves a factor 2 of expert data
parallelism that no config field records).

Layout (locmoe.topology): rank = dp_rank * tp + tp_rank; ep_rank = dp_rank % ep;
expert e lives on every rank with ep_rank == e // (E / ep), split over its TP
group on the ffn dimension; a node's local experts are those of its ranks.

Batch: train.batch_size sequences per data-parallel rank per optimizer step
(global batch = batch_size x dp), run as train.gradient_accumulation_steps = k
micro-batches of batch_size / k; each micro-batch is routed on its own.

All-to-All bytes per step (locmoe.comm byte accounting, compute dtype):
tokens per rank N = micro-batch x model.seq_length (all TP ranks of a
data-parallel group hold the same N tokens), capacity C =
locmoe.capacity.expert_capacity(N, moe.capacity_factor, E), buffer [E, C, d].
Per MoE layer per micro-batch there are 4 All-to-Alls: forward dispatch and combine,
and the same two again in backward (the gradient of an All-to-All is an
All-to-All of the same size); a step has k micro-batches.
The collectives are exactly those of locmoe.exchange.TokenExchange, counted by
locmoe.exchange.register_exchange_bytes (C rounded up to a multiple of TP in
group-wise mode, as the layer does):
- TP = 1, or parallel.groupwise_a2a false: each rank sends its whole
  [E, C, d] buffer through its EP group (out and back); with TP > 1 the
  TP-sharded experts' partial outputs are summed by an AllReduce over TP.
- group-wise (TP > 1, groupwise_a2a true): each TP rank sends its [E, C/TP, d]
  slice through its EP group, an AllGather over the TP group (inside the
  node) restores the full buffer, a ReduceScatter over TP sums the partial
  outputs back into slices, and an AllGather restores the combined buffer.
Every forward collective moves the same bytes again in backward.
Reported: `a2a_bytes_per_step` = what one device (rank 0) sends;
`a2a_bytes_per_step_world` = summed over all devices.

Data placement (data.placement): iid, or domain_affine (locmoe.placement): the
map domain -> the nodes whose ranks read it and the level-1 experts serving it,
computed from the domain sizes (samples per domain of the train split, from
data.dataset_dir/meta.json, or --domain-sizes N,N,... without a dataset).

Errors are one line, `error: ...`, exit status 2.
"""
import json
import os
import sys

from locmoe.capacity import expert_capacity
from locmoe.placement import units_follow_placement
from locmoe.tiers import server_group
from locmoe.errors import ConfigError
from pangu_sigma.cluster import param_count
from pangu_sigma.config import check_cluster

ASCEND_910A_HBM_GIB = 32  # HBM per Ascend 910A NPU


# ---- cluster ----------------------------------------------------------------------
def resolve_cluster(cfg, rank_table=None, world_size=None, devices_per_node=None):
    """(world_size, node_of_rank or None, devices_per_node, source) from the precedence above."""
    if world_size is not None and (not isinstance(world_size, int) or world_size < 1):
        raise ConfigError("--world-size", world_size, "an integer >= 1")
    if devices_per_node is not None and (not isinstance(devices_per_node, int) or devices_per_node < 1):
        raise ConfigError("--devices-per-node", devices_per_node, "an integer >= 1")
    if rank_table is not None:
        from pangu_sigma.cluster.ranktable import load_rank_table
        table = load_rank_table(rank_table)
        if world_size is not None and world_size != table.world_size:
            raise ConfigError("--world-size", world_size,
                              f"{table.world_size}, the device count of {rank_table} (or leave it out)")
        if devices_per_node is not None:
            raise ConfigError("--devices-per-node", devices_per_node,
                              f"left out with --rank-table: {rank_table} says which rank is on which server")
        return table.world_size, table.node_of_rank, table.devices_per_node, f"rank table {rank_table}"
    dpn = devices_per_node if devices_per_node is not None else cfg.parallel.devices_per_node
    if world_size is not None:
        return world_size, None, dpn, "--world-size"
    if cfg.parallel.virtual_world_size > 0:
        return cfg.parallel.virtual_world_size, None, dpn, "parallel.virtual_world_size"
    raise ConfigError("--world-size", None,
                      "needed without --rank-table (or set parallel.virtual_world_size > 0): the config "
                      "alone does not fix the device count")


def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


def check_layout(cfg, world, devices_per_node):
    """Divisibility checks with the numbers spelled out (raises ConfigError)."""
    par, m = cfg.parallel, cfg.model
    tp, ep, experts = par.op_level_model_parallel_num, par.expert_parallel, cfg.num_experts
    if world % tp:
        raise ConfigError("parallel.op_level_model_parallel_num", tp,
                          f"a divisor of the world size {world} ({world} % {tp} = {world % tp})")
    if tp > devices_per_node:
        raise ConfigError("parallel.op_level_model_parallel_num", tp,
                          f"at most {devices_per_node} devices per node: a TP group must stay inside one node")
    dp = world // tp
    if dp % ep:
        keep = [e for e in _divisors(dp) if experts % e == 0]
        hint = (f"; with dp = {dp} use expert_parallel in {keep}" if keep else "")
        if keep and keep[-1] != ep:
            hint += (f" (e.g. expert_parallel {keep[-1]} x expert_num_per_dp_dim "
                     f"{experts // keep[-1]} keeps {experts} experts)")
        raise ConfigError("parallel.expert_parallel", ep,
                          f"a divisor of the data-parallel size dp = world {world} / tp {tp} = {dp} "
                          f"({dp} % {ep} = {dp % ep}): the {experts} experts (expert_num_per_dp_dim "
                          f"{cfg.moe.expert_num_per_dp_dim} x expert_parallel {ep}) need EP groups of {ep} "
                          f"data-parallel ranks{hint}")
    for name, value in (("num_heads", m.num_heads), ("hidden_size", m.hidden_size),
                        ("ffn_hidden_size", m.ffn_hidden_size)):
        if value % tp:
            raise ConfigError(f"model.{name}", value,
                              f"a multiple of op_level_model_parallel_num {tp} (tensor parallelism splits it; "
                              f"{value} % {tp} = {value % tp})")
    if cfg.moe.router == "locmoe" and m.moe_layer_num > 0 and m.hidden_size % experts:
        raise ConfigError("model.hidden_size", m.hidden_size,
                          f"a multiple of the {experts} experts (GrAP gate, eq. 4; "
                          f"{m.hidden_size} % {experts} = {m.hidden_size % experts})")


def build_topology(cfg, world, node_of_rank, devices_per_node):
    from locmoe.topology import Topology
    par = cfg.parallel
    try:
        return Topology(world_size=world, tp=par.op_level_model_parallel_num, ep=par.expert_parallel,
                        num_experts=cfg.num_experts, devices_per_node=devices_per_node, rank=0,
                        node_of_rank=node_of_rank)
    except ConfigError as err:  # name the config section
        name = err.field if "." in err.field or err.field in ("world_size", "rank", "node_of_rank") \
            else f"parallel.{err.field}"
        raise ConfigError(name, err.value, err.valid) from None


def vocab_size_of(cfg):
    """model.vocab_size, or (if 0) the prepared dataset's from data.dataset_dir/meta.json."""
    if cfg.model.vocab_size > 0:
        return cfg.model.vocab_size
    path = os.path.join(cfg.data.dataset_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return int(json.load(handle)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError("model.vocab_size", 0,
                          f"the vocabulary size: 0 takes it from {path}, which is missing or unreadable") from None


def hccl_check(cfg, topology, rank_table=None):
    """On Ascend: every group against HCCL's 910A rules (locmoe.hccl_rules) and the longest group name.

    Device ids come from the rank table when given, else a rank's position on its node.
    Returns {"checked", "groups", "max_name_bytes"} (+ on Ascend "alltoall_groups" and "alltoall_violations":
    the exchange's AlltoAll(V) groups against HCCL's AlltoAll rule, a note, not an error: see alltoall_note);
    raises ConfigError naming the first group breaking the group rules.
    """
    from locmoe.comm import group_name
    from locmoe.hccl_rules import (MAX_GROUP_NAME_BYTES, alltoall_violations, check_group, check_group_name,
                                   default_device_of_rank)
    from locmoe.tiers import alltoall_groups
    groups = [g for kind in ("tp", "dp", "ep", "edp") for g in topology.all_groups(kind) if len(g) > 1]
    wide = (topology.distinct_groups(lambda r: server_group(topology, r))
            if cfg.parallel.a2a_group == "servers" and cfg.model.moe_layer_num else [])  # parallel.a2a_group
    groups += [g for g in wide if len(g) > 1 and g != list(range(topology.world_size))]
    names = {group_name(g, topology.world_size) for g in groups}
    longest = max((len(n.encode("utf-8")) for n in names), default=0)
    if cfg.parallel.device_target != "Ascend":
        return {"checked": False, "groups": len(names), "max_name_bytes": longest}
    devices = None
    if rank_table is not None:
        from pangu_sigma.cluster.ranktable import load_rank_table
        devices = load_rank_table(rank_table).device_id_of_rank
    topology.check_hccl(devices)
    for name in names:
        check_group_name(name)
    devices = devices or default_device_of_rank(topology.node_of_rank)
    for ranks in wide:
        check_group(f"server group {ranks[:4]}... (parallel.a2a_group: servers)", ranks, topology.node_of_rank,
                    devices)
    exchange = (alltoall_groups(topology, cfg.moe.remote_capacity_factor > 0, cfg.parallel.a2a_group)
                if cfg.model.moe_layer_num else [])
    return {"checked": True, "groups": len(names), "max_name_bytes": longest, "limit": MAX_GROUP_NAME_BYTES,
            "alltoall_groups": len(exchange),
            "alltoall_violations": alltoall_violations(exchange, topology.node_of_rank, devices)}


def alltoall_note(cfg, topology, hccl):
    """The note naming the first group that breaks HCCL's AlltoAll(V) rule (locmoe.hccl_rules), and the fix."""
    bad = hccl.get("alltoall_violations")
    if not bad:
        return None
    label, ranks, why = bad[0]
    per_server = cfg.parallel.devices_per_node // topology.tp
    return (f"HCCL AlltoAll rule broken ({len(bad)} of {hccl['alltoall_groups']} exchange groups): the {label} of "
            f"ranks {ranks[:8]}{' ...' if len(ranks) > 8 else ''}: {why}; HCCL on Atlas training (CANN "
            f"HcclAlltoAll/HcclAlltoAllV constraints) needs a communicator spanning servers to take whole 4-device "
            f"clusters (HCCS halves 0-3, 4-7), the same on every server, so the MoE exchange may fail on the cluster. "
            f"Fix: parallel.a2a_group: servers (the exchange's inter-node AlltoAll(V) over every rank of the EP "
            f"group's servers, zero blocks to the other EP groups: same bytes), or keep each EP group on one server "
            f"(parallel.expert_parallel <= {max(per_server, 1)} with op_level_model_parallel_num {topology.tp}), or "
            f"op_level_model_parallel_num 1 with expert_parallel a multiple of {cfg.parallel.devices_per_node}")


# ---- traffic ----------------------------------------------------------------------
def a2a_traffic(cfg, topology, placement=None):
    """MoE-layer communication bytes per step; see the module docstring. placement: the
    domain-affine DomainPlacement (its tier-2 units set the remote rows, locmoe.tiers)."""
    from locmoe.comm import CommCounter
    from locmoe.exchange import register_exchange_bytes, register_tiered_exchange_bytes
    from locmoe.placement import tier_units
    from locmoe.tiers import unit_table
    from pangu_sigma.model.recompute import resent_calls
    m = cfg.model
    experts, tp = cfg.num_experts, topology.tp
    tokens = param_count.tokens_per_rank(cfg)
    groupwise = bool(cfg.parallel.groupwise_a2a and tp > 1)
    multiple = tp if groupwise else 1  # locmoe.layer.MoELayer.capacity rounds the same way
    capacity = -(-expert_capacity(tokens, cfg.moe.capacity_factor, experts) // multiple) * multiple
    rows = capacity // tp if groupwise else capacity
    two_tier = cfg.moe.remote_capacity_factor > 0
    units, quanta = tier_units(cfg.moe, placement, tokens, multiple)
    remote = (-(-expert_capacity(tokens, cfg.moe.remote_capacity_factor, experts * quanta) // multiple) * multiple
              if two_tier else capacity)  # rows per tier-2 unit (MoELayer.remote_capacity)
    counter = CommCounter(topology)
    if m.moe_layer_num and two_tier:
        register_tiered_exchange_bytes(counter, topology, experts, capacity, remote, m.hidden_size,
                                       cfg.compute_dtype, groupwise, m.moe_layer_num,
                                       None if units is None else unit_table(topology, units))
    elif m.moe_layer_num:
        register_exchange_bytes(counter, topology, experts, capacity, m.hidden_size, cfg.compute_dtype,
                                groupwise, m.moe_layer_num)
    k = param_count.accumulation_steps(cfg)  # micro-batches per step, each with its own exchanges
    by_name = {name: {"intra": a * k, "inter": e * k} for name, (a, e) in counter.by_name().items()}
    resent = CommCounter(topology)  # what train.recompute sends again (pangu_sigma.model.recompute)
    for name, calls in resent_calls(cfg.train.recompute, m.num_layers, m.moe_layer_num).items():
        if calls and name == "tp_row_linear":
            resent.register(name, "all_reduce", topology.tp_group(), (tokens, m.hidden_size), cfg.compute_dtype,
                            calls * k)
    itemsize = param_count.ITEMSIZE[cfg.compute_dtype]
    return {
        "tokens_per_rank": tokens,
        "capacity": capacity,
        "remote_capacity": remote,
        "remote_quanta": quanta,
        "two_tier": two_tier,
        "groupwise": groupwise,
        "rows_per_rank": rows,
        "buffer_bytes": experts * capacity * m.hidden_size * itemsize,
        "sent_bytes_per_call": experts * rows * m.hidden_size * itemsize,
        "calls_per_step": 4 * m.moe_layer_num * k,
        "per_device": {key: value * k for key, value in counter.totals().items()},
        "world": {key: value * k for key, value in counter.world_totals().items()},
        "by_collective": by_name,
        "recompute_resent": resent.totals(),
    }


# ---- data placement ---------------------------------------------------------------
def parse_domain_sizes(text):
    """--domain-sizes N,N,... -> [int] (ConfigError naming the flag)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError("--domain-sizes", text, "comma-separated integers, e.g. 500,300,200") from None


def domain_placement(cfg, topology, domain_sizes=None):
    """(DomainPlacement, domain names) under domain_affine, from domain_sizes or the dataset's
    meta.json; (None, None) under i.i.d.; (None, one-line request) when the sizes are unknown."""
    if cfg.data.placement != "domain_affine":
        return None, None
    from locmoe.placement import plan_placement

    names, path = None, os.path.join(cfg.data.dataset_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
        names = list(meta["domains"])
        dataset_sizes = [int(meta["domain_samples"][n]["train"]) for n in names]
    except (OSError, ValueError, KeyError, TypeError):
        if domain_sizes is None:
            return None, (f"map not computed: it needs the domain sizes, from {path} (missing or unreadable) "
                          "or --domain-sizes N,N,...")
    if domain_sizes is None:
        return plan_placement(dataset_sizes, topology, cfg.train.batch_size), names
    if names is not None and len(domain_sizes) != len(names):
        raise ConfigError("--domain-sizes", ",".join(map(str, domain_sizes)),
                          f"{len(names)} sizes, one per domain of {cfg.data.dataset_dir} ({', '.join(names)})")
    return plan_placement(domain_sizes, topology, cfg.train.batch_size), None


def domain_map(placement, names):
    """The domain-affine map as text lines (None under i.i.d. placement, or the one-line request for
    the domain sizes when there is no dataset); see locmoe.placement."""
    if placement is None:
        return None if names is None else [names]
    imposed = placement.expected_expert_load()
    return placement.lines(names) + [f"placement-imposed expert load (even split over each domain's level-1 "
                                     f"experts): max/mean {imposed.max():.2f}, min/mean {imposed.min():.2f}"]


# ---- the plan ---------------------------------------------------------------------
def local_capacity_note(cfg, topo):
    """With two tiers: a note when a rank's node-local slots (node-local experts x ec) exceed all its
    tokens per micro-batch (e.g. capacity_factor 12 of one local expert per node left with 4), else None."""
    if not (cfg.model.moe_layer_num and cfg.moe.remote_capacity_factor > 0):
        return None
    local = len(topo.experts_of_node(topo.node(0)))
    tokens = param_count.tokens_per_rank(cfg)
    slots = local * expert_capacity(tokens, cfg.moe.capacity_factor, cfg.num_experts)
    if slots <= tokens:
        return None
    fitting = 1.25 * 0.625 * cfg.num_experts / local
    return (f"moe.capacity_factor {cfg.moe.capacity_factor:g} gives a rank's {local} node-local experts {slots} "
            f"slots for its {tokens} tokens per micro-batch ({slots / tokens:.2f}x: the excess is padding sent "
            f"through the intra-node All-to-All); size it for the node-local share s you expect at the "
            f"baselines' 1.25 headroom, capacity_factor = 1.25 x s x {cfg.num_experts} experts / {local} "
            f"(s = 0.625, the 128N config's: {fitting:g}; docs/cluster-guide.md)")


def make_plan(cfg, rank_table=None, world_size=None, devices_per_node=None, domain_sizes=None):
    """Everything `plan` prints, as a dict with stable keys (raises ConfigError)."""
    world, node_of_rank, dpn, source = resolve_cluster(cfg, rank_table, world_size, devices_per_node)
    check_layout(cfg, world, dpn)
    topo = build_topology(cfg, world, node_of_rank, dpn)
    hccl = hccl_check(cfg, topo, rank_table)
    check_cluster(cfg, world, source)  # after the layout's own errors: the config is for another cluster
    vocab = vocab_size_of(cfg)
    nodes = sorted(set(topo.node_of_rank))
    experts_of_node = [topo.experts_of_node(n) for n in nodes]
    counts = param_count.count_params(cfg, vocab)
    wide = [server_group(topo)] if cfg.parallel.a2a_group == "servers" and cfg.model.moe_layer_num else []
    comm_groups = len({tuple(g) for g in [list(range(world)), topo.tp_group(), topo.dp_group(), topo.ep_group(),
                                          topo.expert_dp_group()] + wide if len(g) > 1})
    memory = param_count.memory_breakdown(cfg, topo.tp, topo.ep, topo.dp, vocab, comm_groups=comm_groups)
    placement, names = domain_placement(cfg, topo, domain_sizes)
    traffic = a2a_traffic(cfg, topo, placement)
    notes = []
    if node_of_rank is not None and dpn != cfg.parallel.devices_per_node:
        notes.append(f"the rank table has up to {dpn} devices per server; parallel.devices_per_node says "
                     f"{cfg.parallel.devices_per_node} (the table wins)")
    if node_of_rank is None and world % dpn:
        notes.append(f"{dpn} devices per node do not divide the world size {world}: the last node holds "
                     f"{world % dpn} (ragged nodes)")
    replicas = topo.dp // topo.ep
    if cfg.model.moe_layer_num and replicas > 1:
        notes.append(f"each expert is held by {replicas} data-parallel replicas (expert-data-parallel groups "
                     f"of {replicas}); {len(nodes)} nodes share {cfg.num_experts} experts")
    if placement is None and names is not None and cfg.model.moe_layer_num and units_follow_placement(cfg.moe):
        notes.append("the remote tier's bytes above give every (rank, remote expert) pair one unit of C_r: under the "
                     "domain-affine placement each pair gets units by its expected share instead (none where its "
                     "domains never go), which needs the domain sizes: --domain-sizes N,N,... or a dataset")
    a2a_note = alltoall_note(cfg, topo, hccl)
    if a2a_note:
        notes.append(a2a_note)
    local_note = local_capacity_note(cfg, topo)
    if local_note:
        notes.append(local_note)
    if cfg.train.recompute == "attention":
        notes.append("train.recompute: attention saves no memory in MindSpore 2.10 with this model's linears (the "
                     "recompute pass finds no gradient to make the copies wait for, so they run in the forward; "
                     "measured on CPU, pangu_sigma/model/recompute.py): the memory above assumes it works; use block")
    if cfg.parallel.device_target == "Ascend" and memory["total"] > param_count.BUDGET_GIB - param_count.MARGIN_GIB:
        hints = []
        if cfg.train.recompute != "block":
            hints.append("train.recompute: block")
        if not cfg.parallel.optimizer_shard:
            hints.append("parallel.optimizer_shard: true")
        hints.append("more train.gradient_accumulation_steps (activations grow with the micro-batch)")
        hints.append("smaller parallel.grad_bucket_mb or parallel.hccl_buffsize_mb")
        notes.append(f"{memory['total']:.2f} GiB per device leaves less than {param_count.MARGIN_GIB} GiB of the "
                     f"{param_count.BUDGET_GIB} GiB budget of an Ascend 910A ({ASCEND_910A_HBM_GIB} GiB HBM less "
                     f"{param_count.RUNTIME_RESERVE_GIB} GiB for the runtime) for what is not modelled: try "
                     f"{', '.join(hints)}")
    return {
        "source": source,
        "world_size": world,
        "nodes": len(nodes),
        "devices_per_node": dpn,
        "tp": topo.tp,
        "dp": topo.dp,
        "ep": topo.ep,
        "edp": replicas,
        "num_experts": cfg.num_experts,
        "experts_per_rank": topo.experts_per_rank,
        "local_experts_per_node": min(len(e) for e in experts_of_node),
        "experts_of_node": experts_of_node,
        "ranks_of_node": [[r for r in range(world) if topo.node_of_rank[r] == n] for n in nodes],
        "experts_of_rank": [topo.experts_of_rank(r) for r in range(world)],
        "groups": {kind: topo.all_groups(kind) for kind in ("tp", "dp", "ep", "edp")},
        "router": cfg.moe.router,
        "moe_layer_num": cfg.model.moe_layer_num,
        "vocab_size": vocab,
        "compute_dtype": cfg.compute_dtype,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_non_trainable": counts["non_trainable"],
        "params_per_device": param_count.params_per_device(cfg, topo.tp, topo.ep, vocab),
        "memory_per_device_gib": memory["total"],
        "memory_breakdown_gib": {k: v for k, v in memory.items() if k not in ("total", "activation_parts")},
        "activation_parts_gib": memory["activation_parts"],
        "memory_budget_gib": param_count.BUDGET_GIB,
        "memory_fits": memory["total"] <= param_count.BUDGET_GIB,
        "memory_margin_gib": param_count.BUDGET_GIB - memory["total"],
        "recompute": cfg.train.recompute,
        "optimizer_shard": cfg.parallel.optimizer_shard,
        "hccl_groups": comm_groups,
        "hccl_buffsize_mb": cfg.parallel.hccl_buffsize_mb,
        "batch_per_dp_rank": cfg.train.batch_size,
        "micro_batch_per_dp_rank": param_count.micro_batch_size(cfg),
        "gradient_accumulation_steps": param_count.accumulation_steps(cfg),
        "tokens_per_rank": traffic["tokens_per_rank"],
        "global_batch": cfg.train.batch_size * topo.dp,
        "global_batch_tokens": cfg.train.batch_size * topo.dp * cfg.model.seq_length,
        "expert_capacity": traffic["capacity"],
        "remote_capacity": traffic["remote_capacity"],
        "remote_quanta": traffic["remote_quanta"],
        "a2a_bytes_per_step": traffic["per_device"],
        "a2a_bytes_per_step_world": traffic["world"],
        "a2a_detail": {k: traffic[k] for k in ("groupwise", "two_tier", "rows_per_rank", "buffer_bytes", "sent_bytes_per_call",
                                               "calls_per_step", "by_collective", "recompute_resent")},
        "hccl": hccl,
        "placement": cfg.data.placement,
        "domain_map": domain_map(placement, names),
        "notes": notes,
    }


# ---- CLI --------------------------------------------------------------------------
def main(argv=None):
    from pangu_sigma.cluster.plan_text import format_text
    from pangu_sigma.cluster.ranktable import OneLineArgumentParser
    parser = OneLineArgumentParser(prog="python -m pangu_sigma.cluster.plan",
                                   description="Validate a config against a cluster; print layout, "
                                               "parameters, memory and All-to-All bytes per step.")
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--rank-table", help="HCCL rank table (JSON, format 1.0): world size and nodes")
    parser.add_argument("--world-size", type=int, help="devices in the cluster, without a rank table")
    parser.add_argument("--devices-per-node", type=int,
                        help="devices per node without a rank table (default: parallel.devices_per_node)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--domain-sizes", help="train samples per domain, comma-separated, for "
                        "data.placement=domain_affine without a prepared dataset")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        from pangu_sigma.config import load_config
        cfg = load_config(args.config, args.set, world_size=None if args.rank_table else args.world_size)
        sizes = parse_domain_sizes(args.domain_sizes) if args.domain_sizes else None
        plan = make_plan(cfg, args.rank_table, args.world_size, args.devices_per_node, sizes)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan, sort_keys=True))
    else:
        print(format_text(plan, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
