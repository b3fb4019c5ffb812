"""Estimate one training step of a config on an Ascend 910A cluster: compute, communication, overlap, idle.

    python -m pangu_sigma.tools.simulate --config FILE (--world-size N | --rank-table F)
        [--devices-per-node N] [--routing-stats FILE] [--dispatch padded|routed]
        [--efficiency X] [--peak-tflops X] [--hccs-gbytes X] ... [--json] [--set a.b=c ...]

The cluster comes from `pangu_sigma.cluster.plan.resolve_cluster` (--rank-table, else
--world-size with devices_per_node, else parallel.virtual_world_size; the
config alone does not fix the device count). FLOPs and the link model are in
`pangu_sigma.tools.cost_model` (every constant is a flag below).

What one step does on every device (N = micro-batch * seq_length tokens per
data-parallel rank, replicated over its TP group; C = expert capacity =
ceil(N c_f / E); L blocks, M of them sparse; t = TP). With gradient accumulation
(train.gradient_accumulation_steps = a, micro-batch = batch_size / a) everything
below but the gradient AllReduces happens a times per step, once per micro-batch:

- compute: 3 x forward FLOPs (cost_model) at peak * efficiency. Expert work on
  a device = the rows its experts receive (see dispatch below) x 4 d f / t.
- Megatron TP AllReduce of [N, d] activations: forward + backward of every
  attention sublayer (L + 1), every dense FFN (L - M + 1), and the embedding /
  head (2): 2 x (L + 1 + L - M + 1 + 1) ring AllReduces inside the TP group.
- MoE layer, forward (group-wise All-to-All, parallel.groupwise_a2a, TP > 1, EP > 1):
  each TP rank sends its 1/t slice of the tokens for every expert through the
  EP All-to-All (dispatch); an AllGather in the destination's TP group
  restores all slices; the TP-split experts compute; a ReduceScatter in the TP
  group sums the partial outputs and keeps this rank's slice; the combine
  All-to-All returns it; an AllGather in the source's TP group restores the
  full combine buffer. Backward repeats each with the same bytes (All-to-All
  -> All-to-All, AllGather <-> ReduceScatter). Without group-wise: full
  buffers through EP, and a TP AllReduce of the expert outputs. Two tiers with
  one EP member per node: tier 1 is the identity and goes unsliced (no dispatch
  AllGather for the node-local rows; their partial outputs are summed by a TP
  AllReduce, the bytes of the ReduceScatter + AllGather it replaces).
- gradients: a ring AllReduce of the dense parameters' gradients over the DP
  group and of the experts' over the expert-data-parallel group (size DP/EP),
  not overlapped with the backward (exposed).

Dispatch (--dispatch):
- padded (default; what MoELayer really sends): every (source, expert) pair
  sends and computes its capacity in rows, whatever the routing. One tier: C
  rows for every pair. Two tiers (moe.remote_capacity_factor > 0, locmoe.exchange
  TieredExchange): C rows for the experts on the source's node (an intra-node
  All-to-All) and, for the others, the pair's tier-2 units of u rows (locmoe.tiers:
  one unit of C_r rows per remote expert, or under a domain-affine placement with
  level 1 units in proportion to the pair's expected share and none where its
  domains never go; the EP AllToAllV sends nothing to same-node members). The
  router changes the bytes only through the capacities of the config and the
  placement; the routing counts set the drop rates (per tier).
- routed: NOT an exchange this repository performs. Only the tokens routed to an
  expert and kept within capacity, min(count[src, e], capacity), are sent and
  computed, as an All-to-AllV would; a what-if, labelled as such in the output.

Routing: uniform (N / E tokens per expert from every rank) unless
--routing-stats gives per-rank counts (format in
`pangu_sigma.tools.routing_stats`, which builds them from a cluster-scope eval:
each target rank takes one measured rank's pattern, mapped by node). Under the
padded exchange the routing sets only the drop rates (per tier): rows sent and
computed are the capacities, so the step time does not depend on it.

Overlap (parallel.comm_overlap_degree = k): the MoE layer splits the capacity
dimension into k chunks (two tiers: min(k, C_l / TP, u / TP), both tiers in
every chunk, locmoe.tiers.tier_chunks) and issues chunk i+1's communication
while chunk i computes. With communication time A of the layer's collectives (All-to-Alls
and TP AllGather / ReduceScatter, forward) and expert compute X, the k-chunk
pipeline hides (k - 1)/k * min(A, X) in forward and (k - 1)/k * min(A, 2X) in
backward: with X >= A only A/k stays exposed; with k = 1 nothing is hidden.
Each collective then pays its latency k times.

Time categories (the paper's fig. 10), from an average device's view:
    computation    its compute not overlapped with communication
    communication  collective time not overlapped with compute
    overlapped     time in which both run
    idle           waiting for the slowest device: the expert compute of the
                   most loaded device sets the pace of every All-to-All
    step = computation + communication + overlapped + idle
           = dense compute + sum over MoE layers of 3 X_max + communication
             - hidden communication (of the slowest device)
Collective times are already the slowest device's (a collective ends when its
last member ends); imbalance in communication is counted as communication.
"""
import sys
from dataclasses import fields

import numpy as np

from locmoe.capacity import expert_capacity
from locmoe.errors import ConfigError
from locmoe.placement import tier_units, units_follow_placement
from locmoe.tiers import node_members, tier_chunks, unit_table
from pangu_sigma.cluster import param_count
from pangu_sigma.tools import cost_model
from pangu_sigma.tools._cli import OneLineParser, dumps, fail
from pangu_sigma.tools.cost_model import Hardware, LinkMap

DISPATCH = ("routed", "padded")


def _layer_moe(cfg, topo, links, hw, counts_layer, dispatch, chunks, flops, units=None, quanta=1):
    """One MoE layer, forward: collective times, expert compute per device, byte and load statistics.
    units [dp, E], quanta: the remote tier's units (locmoe.placement.tier_units; None: one per pair)."""
    d = cfg.model.hidden_size
    tp, ep, experts = topo.tp, topo.ep, topo.num_experts
    world = topo.world_size
    n = param_count.tokens_per_rank(cfg)  # one micro-batch
    groupwise = bool(cfg.parallel.groupwise_a2a and tp > 1 and ep > 1)
    # capacities as MoELayer sets them: rounded up to a multiple of TP in group-wise mode; with
    # two tiers (moe.remote_capacity_factor > 0) experts off the rank's node get units * u
    multiple = tp if (cfg.parallel.groupwise_a2a and tp > 1) else 1
    capacity = -(-expert_capacity(n, cfg.moe.capacity_factor, experts) // multiple) * multiple
    two_tier = cfg.moe.remote_capacity_factor > 0
    remote_capacity = (-(-expert_capacity(n, cfg.moe.remote_capacity_factor, experts * quanta) // multiple)
                       * multiple if two_tier else capacity)  # rows per tier-2 unit
    if two_tier:  # the layer's chunks (locmoe.tiers.tier_chunks: both tiers in every chunk)
        chunks = len(tier_chunks(capacity, remote_capacity, chunks, multiple))
    # two tiers with one EP member per node: tier 1 is the identity, sent unsliced (no dispatch AllGather)
    whole_tier1 = two_tier and groupwise and all(len(node_members(topo, r)) == 1 for r in range(world))
    local = np.array([[e in topo.local_experts(dp * tp) for e in range(experts)] for dp in range(topo.dp)])  # [DP, E]
    table = unit_table(topo, units) if two_tier else np.ones(local.shape, np.int64)  # [DP, E]
    pair_capacity = np.where(local, float(capacity), table * float(remote_capacity))  # [DP, E]
    # per data-parallel rank: tokens routed to each expert (TP ranks of a DP group hold the same tokens)
    routed = counts_layer.reshape(topo.dp, tp, experts).mean(1)  # [DP, E]
    if dispatch == "padded":
        kept = pair_capacity
        slice_rows = pair_capacity / tp if groupwise else pair_capacity
    else:
        kept = np.minimum(routed, pair_capacity)  # [DP, E]
        slice_rows = kept / tp if groupwise else kept
    over = routed - np.minimum(routed, pair_capacity)  # [DP, E]
    dropped = float(over.sum() / max(routed.sum(), 1e-300))
    dropped_remote = float((over * ~local).sum() / max(routed.sum(), 1e-300))
    experts_of = [topo.experts_of_rank(r) for r in range(world)]
    row_bytes = d * hw.act_bytes
    dispatch_traffic = {}
    recv_rows = np.zeros(world)  # rows this device receives through EP (its slice)
    gathered_rows = np.zeros(world)  # of those, the rows the dispatch AllGather over TP completes
    self_bytes = 0.0  # rows whose expert is on the sending device itself: they never touch a link
    for s in range(world):
        ds = topo.dp_rank(s)
        sends = {}
        for r in topo.ep_group(s):
            rows = float(slice_rows[ds, experts_of[r]].sum())
            recv_rows[r] += rows
            gathered_rows[r] += 0.0 if (whole_tier1 and r == s) else rows
            if r != s:
                sends[r] = rows * row_bytes
            else:
                self_bytes += rows * row_bytes
        dispatch_traffic[s] = sends
    combine_traffic = {}
    for s, sends in dispatch_traffic.items():
        for r, nbytes in sends.items():
            combine_traffic.setdefault(r, {})[s] = nbytes
    parts = {}
    a2a_links = links if hw.a2a_bandwidth_scale == 1 else LinkMap(topo, hw.for_all_to_all())
    t, tiers = cost_model.p2p_collective_time(a2a_links, dispatch_traffic, chunks)
    parts["a2a_dispatch"] = t
    parts["a2a_combine"], _ = cost_model.p2p_collective_time(a2a_links, combine_traffic, chunks)
    a2a_bytes = dict(tiers)
    if groupwise:
        expert_rows = recv_rows * tp  # the AllGather brings the TP peers' slices (same sources)
        dest_ag = {r: {p: recv_rows[r] * row_bytes for p in topo.tp_group(r) if p != r} for r in range(world)}
        only_sliced = {r: {p: gathered_rows[r] * row_bytes for p in topo.tp_group(r) if p != r} for r in range(world)}
        own_slice = np.array([slice_rows[topo.dp_rank(s)].sum() for s in range(world)])
        src_ag = {s: {p: own_slice[s] * row_bytes for p in topo.tp_group(s) if p != s} for s in range(world)}
        t_dest, _ = cost_model.p2p_collective_time(links, dest_ag, chunks)
        parts["tp_allgather_dispatch"], _ = cost_model.p2p_collective_time(links, only_sliced, chunks)
        # the ReduceScatter + combine AllGather of all rows (tier 1 unsliced: a ring AllReduce, the same bytes)
        parts["tp_reducescatter_experts"] = t_dest  # same per-destination bytes as the full AllGather
        parts["tp_allgather_combine"], _ = cost_model.p2p_collective_time(links, src_ag, chunks)
    else:
        expert_rows = recv_rows
        if tp > 1:
            worst = 0.0
            for r in range(0, world, tp):
                time, _ = cost_model.ring_allreduce_time(links, topo.tp_group(r), expert_rows[r] * row_bytes, chunks)
                worst = max(worst, time)
            parts["tp_allreduce_experts"] = worst
    compute = expert_rows * flops["expert_per_row"] / hw.flops_per_s  # [W] seconds, forward
    a2a_bytes["self"] = self_bytes
    inter_by_device = [sum(b for r, b in dispatch_traffic[s].items() if links.tier(s, r) == "roce")
                       for s in range(world)]  # dispatch, forward: bytes each device sends to other nodes
    local_bytes = sum(v for k, v in a2a_bytes.items() if k != "roce")
    return {
        "capacity": capacity,
        "remote_capacity": remote_capacity,
        "chunks": chunks,
        "remote_quanta": quanta,
        "drop_rate_remote": dropped_remote,
        "comm": parts,
        "comm_time": sum(parts.values()),
        "a2a_time": parts["a2a_dispatch"] + parts["a2a_combine"],
        "expert_compute_max": float(compute.max()),
        "expert_compute_mean": float(compute.mean()),
        "expert_rows_max": float(expert_rows.max()),
        "expert_rows_mean": float(expert_rows.mean()),
        "drop_rate": dropped,
        "a2a_bytes_by_tier": a2a_bytes,  # dispatch, summed over devices; "self": kept on the device
        "a2a_node_local_fraction": local_bytes / max(sum(a2a_bytes.values()), 1e-300),
        "a2a_inter_node_bytes_by_device": inter_by_device,
    }


def simulate_step(cfg, topology, hw, vocab_size, counts=None, dispatch="padded", overlap_degree=None,
                  placement=None):
    """One training step; see the module docstring. counts: [M, W, E] tokens per step, or None (uniform)
    (only the shares matter: each row is scaled to the N tokens of one micro-batch). placement: the
    domain-affine DomainPlacement of this cluster (its tier-2 units), or None.

    Returns a dict: step_time, breakdown (computation, communication, overlapped, idle),
    compute and communication parts, and per-layer details.
    """
    from pangu_sigma.cluster import param_count
    from pangu_sigma.tools.routing_stats import uniform_counts

    if dispatch not in DISPATCH:
        raise ConfigError("--dispatch", dispatch, f"one of {list(DISPATCH)}")
    hw.validate()
    m = cfg.model
    tp, world, experts = topology.tp, topology.world_size, topology.num_experts
    n = param_count.tokens_per_rank(cfg)  # one micro-batch
    micro = param_count.accumulation_steps(cfg)  # micro-batches per step
    k = overlap_degree or cfg.parallel.comm_overlap_degree
    links = LinkMap(topology, hw)
    flops = cost_model.forward_flops(cfg, vocab_size, tp)
    rate = hw.flops_per_s
    compute_parts = {name: micro * 3 * flops[name] / rate for name in ("attention", "dense_ffn", "head", "router")}
    dense_compute = sum(compute_parts.values())

    moe = m.moe_layer_num
    routing = "uniform" if counts is None else "given"
    if moe:
        if counts is None:
            counts = uniform_counts(moe, world, experts, n)
        counts = np.asarray(counts, np.float64)
        if counts.shape != (moe, world, experts):
            raise ConfigError("--routing-stats", list(counts.shape),
                              f"counts of shape [moe_layer_num {moe}, world size {world}, experts {experts}]")
        sums = counts.sum(-1, keepdims=True)
        counts = np.where(sums > 0, counts * n / np.maximum(sums, 1e-300), n / experts)  # rows sum to N
    multiple = topology.tp if cfg.parallel.groupwise_a2a and topology.tp > 1 else 1  # MoELayer.capacity_multiple
    units, quanta = tier_units(cfg.moe, placement, n, multiple)
    layers = [_layer_moe(cfg, topology, links, hw, counts[j], dispatch, k, flops, units, quanta) for j in range(moe)]

    row_bytes = n * m.hidden_size * hw.act_bytes
    tp_ar_calls = 2 * ((m.num_layers + 1) + (m.num_layers - moe + 1) + 1)
    tp_ar_one, _ = cost_model.ring_allreduce_time(links, topology.tp_group(0), row_bytes)
    expert_params = moe * topology.experts_per_rank * 2 * m.hidden_size * -(-m.ffn_hidden_size // tp)
    dense_params = param_count.params_per_device(cfg, tp, topology.ep, vocab_size) - expert_params
    grad_dense, _ = cost_model.ring_allreduce_time(links, topology.dp_group(0), dense_params * hw.grad_bytes)
    grad_expert, _ = cost_model.ring_allreduce_time(links, topology.expert_dp_group(0),
                                                    expert_params * hw.grad_bytes)
    comm_parts = {"tp_allreduce": micro * tp_ar_calls * tp_ar_one,
                  "moe_all_to_all": micro * sum(2 * L["a2a_time"] for L in layers),
                  "moe_tp_collectives": micro * sum(2 * (L["comm_time"] - L["a2a_time"]) for L in layers),
                  "grad_allreduce_dense": grad_dense, "grad_allreduce_experts": grad_expert}
    comm_total = sum(comm_parts.values())

    hidden_slow = hidden_mean = 0.0
    expert_max = expert_mean = 0.0
    for L in layers:
        hide = (L["chunks"] - 1) / L["chunks"]  # k, or fewer two-tier chunks (locmoe.tiers.tier_chunks)
        a, x_max, x_mean = L["comm_time"], L["expert_compute_max"], L["expert_compute_mean"]
        hidden_slow += micro * hide * (min(a, x_max) + min(a, 2 * x_max))
        hidden_mean += micro * hide * (min(a, x_mean) + min(a, 2 * x_mean))
        expert_max += micro * 3 * x_max
        expert_mean += micro * 3 * x_mean
    step = dense_compute + expert_max + comm_total - hidden_slow
    compute_mean = dense_compute + expert_mean
    breakdown = {"computation": compute_mean - hidden_mean, "communication": comm_total - hidden_mean,
                 "overlapped": hidden_mean}
    idle = step - sum(breakdown.values())
    breakdown["idle"] = 0.0 if abs(idle) <= 1e-12 * max(step, 1e-300) else idle  # float noise of a balanced load
    tiers = {t: sum(L["a2a_bytes_by_tier"][t] for L in layers) * 4 * micro  # 4 All-to-Alls per layer, micro-batch
             for t in cost_model.TIERS + ("self",)}
    return {
        "world_size": world, "nodes": topology.nodes, "tp": tp, "dp": topology.dp, "ep": topology.ep,
        "experts": experts, "router": cfg.moe.router, "tokens_per_rank": n, "micro_batches": micro,
        "dispatch": dispatch,
        "overlap_degree": k, "groupwise_a2a": bool(cfg.parallel.groupwise_a2a and tp > 1 and topology.ep > 1),
        "routing": routing,
        "step_time": step,
        "tokens_per_s": micro * n * topology.dp / step,
        "breakdown": breakdown,
        "compute": dict(compute_parts, experts_mean=expert_mean, experts_slowest=expert_max),
        "communication": comm_parts,
        "a2a_fraction": comm_parts["moe_all_to_all"] / step,
        "a2a_bytes_per_step_world": tiers,
        "a2a_node_local_fraction": (tiers["hccs"] + tiers["pcie"] + tiers["self"]) / max(sum(tiers.values()), 1e-300),
        "layers": [{k2: v for k2, v in L.items() if k2 != "a2a_bytes_by_tier"} for L in layers],
        "hardware": {f.name: getattr(hw, f.name) for f in fields(hw)},
    }


def build_cluster(cfg, world_size=None, rank_table=None, devices_per_node=None):
    """(Topology, vocab size) for the config on the given cluster (plan.py's rules and checks)."""
    from pangu_sigma.cluster import plan
    world, node_of_rank, dpn, _ = plan.resolve_cluster(cfg, rank_table, world_size, devices_per_node)
    plan.check_layout(cfg, world, dpn)
    return plan.build_topology(cfg, world, node_of_rank, dpn), plan.vocab_size_of(cfg)


def run(cfg, world_size=None, rank_table=None, devices_per_node=None, routing_stats=None, dispatch="padded",
        hw=None, overlap_degree=None, vocab_size=None, domain_sizes=None):
    """simulate_step for a config and a cluster; routing_stats: a path, a loaded dict, or None;
    domain_sizes: samples per domain for a domain-affine placement (default: the dataset's)."""
    from pangu_sigma.cluster.plan import domain_placement
    from pangu_sigma.tools.routing_stats import load_stats
    topo, vocab = build_cluster(cfg, world_size, rank_table, devices_per_node)
    placement, missing = domain_placement(cfg, topo, domain_sizes)
    if placement is None and missing is not None and units_follow_placement(cfg.moe):
        raise ConfigError("--domain-sizes", None, f"samples per domain (the remote tier's units follow the "
                          f"domain-affine placement): {missing}")
    counts = None
    if routing_stats is not None:
        stats = load_stats(routing_stats) if isinstance(routing_stats, str) else routing_stats
        counts = np.asarray(stats["counts"], np.float64)
        if stats["world_size"] != topo.world_size or stats["num_experts"] != topo.num_experts:
            raise ConfigError("--routing-stats", f"{stats['world_size']} ranks x {stats['num_experts']} experts",
                              f"stats for this cluster: {topo.world_size} ranks x {topo.num_experts} experts "
                              "(convert the log for this config with pangu_sigma.tools.routing_stats)")
    out = simulate_step(cfg, topo, hw or Hardware(), vocab_size or vocab, counts, dispatch, overlap_degree,
                        placement)
    if routing_stats is not None:
        out["routing"] = routing_stats if isinstance(routing_stats, str) else "given"
    return out


def _ms(seconds):
    return f"{seconds * 1e3:9.2f} ms"


def render(result):
    r = result
    lines = [f"simulated step: {r['router']} router, {r['world_size']} devices = {r['nodes']} nodes; tp {r['tp']}, "
             f"dp {r['dp']}, ep {r['ep']}, {r['experts']} experts; {r['micro_batches']} x {r['tokens_per_rank']:,} "
             f"tokens per rank (micro-batches x tokens); "
             f"routing {r['routing']}, {r['dispatch']} dispatch"
             + (" (WHAT-IF: an All-to-AllV exchange MoELayer does not perform)" if r["dispatch"] == "routed" else
                " (the shapes MoELayer sends)")
             + f", overlap degree {r['overlap_degree']}",
             f"step time {_ms(r['step_time'])}   ({r['tokens_per_s']:,.0f} tokens/s over the cluster)"]
    step = r["step_time"]
    for name, value in r["breakdown"].items():
        lines.append(f"  {name:<14}{_ms(value)}  {100 * value / step:5.1f} %")
    lines.append("compute (fwd+bwd, per device)")
    for name, value in r["compute"].items():
        lines.append(f"  {name:<24}{_ms(value)}")
    lines.append("communication (per step)")
    for name, value in r["communication"].items():
        lines.append(f"  {name:<24}{_ms(value)}")
    tiers = r["a2a_bytes_per_step_world"]
    lines.append(f"all-to-all: {100 * r['a2a_fraction']:.1f} % of the step; bytes over the cluster per step "
                 f"hccs {tiers['hccs'] / 2**30:.2f} GiB, pcie {tiers['pcie'] / 2**30:.2f} GiB, roce "
                 f"{tiers['roce'] / 2**30:.2f} GiB, kept on the device {tiers['self'] / 2**30:.2f} GiB "
                 f"(node-local {100 * r['a2a_node_local_fraction']:.1f} %)")
    if r["layers"]:
        lines.append("MoE layers: expert rows per device max/mean, drop rate, node-local share of A2A rows")
        for j, L in enumerate(r["layers"]):
            lines.append(f"  layer {j}: {L['expert_rows_max']:,.0f} / {L['expert_rows_mean']:,.0f} "
                         f"(x{L['expert_rows_max'] / max(L['expert_rows_mean'], 1e-9):.2f}), drop "
                         f"{100 * L['drop_rate']:.1f} % (remote tier {100 * L['drop_rate_remote']:.1f} %), node-local {100 * L['a2a_node_local_fraction']:.1f} %")
    return "\n".join(lines)


HW_HELP = {
    "peak_tflops": "peak fp16 TFLOPS per NPU (910A: 320)",
    "efficiency": "achieved fraction of peak (default 0.4)",
    "hccs_group": "NPUs per HCCS mesh (4)",
    "hccs_gbytes": "GB/s per HCCS link (30)",
    "hccs_links": "HCCS links per NPU (3)",
    "hccs_latency_us": "HCCS latency per message, us (5)",
    "pcie_gbytes": "GB/s between the two 4-NPU groups of a server (PCIe 4.0 x16: 32)",
    "pcie_latency_us": "PCIe latency per message, us (10)",
    "roce_gbits": "RoCE Gb/s per NPU (100)",
    "roce_latency_us": "RoCE latency per message, us (10)",
    "act_bytes": "bytes per activation element on the wire (2, fp16)",
    "grad_bytes": "bytes per gradient element (4, fp32)",
    "a2a_bandwidth_scale": "the MoE All-to-All's effective bandwidth as a multiple of the links' (1)",
}


def add_hardware_args(parser):
    for f in fields(Hardware):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=HW_HELP.get(f.name))


def hardware_from_args(args):
    return Hardware(**{f.name: getattr(args, f.name) for f in fields(Hardware)}).validate()


def main(argv=None):
    parser = OneLineParser(prog="python -m pangu_sigma.tools.simulate",
                           description="Estimate one training step (compute, communication, overlap, idle) of a "
                                       "config on an Ascend 910A cluster.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--world-size", type=int, help="devices (else --rank-table or parallel.virtual_world_size)")
    parser.add_argument("--rank-table", help="HCCL rank table: world size and nodes")
    parser.add_argument("--devices-per-node", type=int, help="default: parallel.devices_per_node")
    parser.add_argument("--routing-stats", help="per-rank routing counts (pangu_sigma.tools.routing_stats format)")
    parser.add_argument("--dispatch", default="padded", choices=DISPATCH,
                        help="padded: the exchange MoELayer performs (default); routed: an All-to-AllV what-if")
    parser.add_argument("--overlap-degree", type=int, help="default: parallel.comm_overlap_degree")
    parser.add_argument("--vocab-size", type=int, help="default: model.vocab_size or the dataset's")
    parser.add_argument("--domain-sizes", help="N,N,...: samples per domain (domain-affine placement; default: "
                                               "the dataset's meta.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_hardware_args(parser)
    args = parser.parse_args(argv)
    try:
        from pangu_sigma.config import load_config
        if args.overlap_degree is not None and args.overlap_degree < 1:
            raise ConfigError("--overlap-degree", args.overlap_degree, "an integer >= 1")
        if args.vocab_size is not None and args.vocab_size < 1:
            raise ConfigError("--vocab-size", args.vocab_size, "an integer >= 1")
        cfg = load_config(args.config, args.set)
        from pangu_sigma.cluster.plan import parse_domain_sizes
        sizes = None if args.domain_sizes is None else parse_domain_sizes(args.domain_sizes)
        result = run(cfg, args.world_size, args.rank_table, args.devices_per_node, args.routing_stats,
                     args.dispatch, hardware_from_args(args), args.overlap_degree, args.vocab_size, sizes)
    except ConfigError as err:
        return fail(err)
    print(dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
