"""FLOPs per device and an alpha-beta link model of an Ascend 910A cluster (pure Python + numpy).

Used by `pangu_sigma.tools.simulate`; every constant is a field of `Hardware`
and a flag of the simulator.

Compute
-------
Matmul FLOPs only (2 per multiply-add), per device, forward; forward+backward
= 3 x forward (the backward computes two matmuls per forward matmul: the input
gradient and the weight gradient). N = micro-batch * seq_length tokens per
data-parallel rank (replicated over its TP group; micro-batch = train.batch_size /
train.gradient_accumulation_steps, a step runs that many), d hidden, f ffn, S seq, V
vocab, E experts, t = TP. Attention and the dense FFN are split by TP
(Megatron: heads and the ffn dimension); so are the experts (their f dimension
is split over the TP group, locmoe/experts.py) and the LM head (vocab-parallel):

    attention sublayer (L blocks + the query layer)  8 N d^2 / t   q, kv, out projections
                                                   + 4 N S d / t   scores and context (full S x S,
                                                                   the causal mask does not skip work)
    dense FFN (L - M blocks + the query layer)       4 N d f / t
    LM head (tied embedding)                         2 N d V / t
    router per MoE layer (not split: every TP rank routes its replicated tokens)
        locmoe  N d        the GrAP mean pools d features into E scores (eq. 4)
        switch  2 N d E    the dense gate
        hash, rre  0       a table lookup
    experts per MoE layer on a device                4 d f / t per row it receives

Achieved throughput = peak_flops * efficiency. Peak: 320 TFLOPS fp16 for the
910A (the paper, sec. 2). efficiency default 0.4: large Transformer training
typically reaches 30-50 % of peak matmul throughput (model FLOPs utilisation)
once memory-bound ops (LayerNorm, softmax, GeLU, casts, optimizer) and kernel
launch gaps are included; 0.4 is a middle value, not a measurement on a 910A.
Override it with --efficiency.

Links (an Atlas 800 training server holds 8 NPUs on one board in two groups of
4; the paper sec. 2 and fig. 1)
-----
    hccs  between NPUs of the same 4-NPU group: a full mesh, 3 HCCS links per
          NPU (one to each peer), 30 GB/s per link and direction
    pcie  between the two 4-NPU groups of one server: the NPU's PCIe 4.0 x16
          port, 32 GB/s nominal per direction (shared by all its cross-group peers)
    roce  between servers: one 100 Gb/s RoCE v2 port per NPU (12.5 GB/s per
          direction), a non-blocking two-tier fat tree (fig. 1) is assumed, so
          only the NPU's own port limits it
The paper's fig. 2 shows HCCL algorithm bandwidths per operator but the text
gives no link figures; the numbers above are the public 910A / Atlas 800
figures (HCCS 30 GB/s per link, 3 links in the 4-NPU mesh; 100 GE RoCE per NPU;
PCIe 4.0 x16). Latencies (alpha, per message) are assumptions of the usual
order of HCCL/NCCL per-step overheads, not measurements: 5 us HCCS, 10 us
PCIe, 10 us RoCE. All are overridable.

Alpha-beta model
----------------
Point-to-point style collectives (All-to-All, AllGather, ReduceScatter): a
device's traffic is split by the tier of each peer. Per tier:
    hccs: alpha * ceil(peers / links) + max(largest per-peer bytes / link_bw,
          total / (links * link_bw))       (peers on dedicated links, in parallel)
    pcie, roce: alpha * peers + total / bw (one port, peers one after another)
The tiers are separate hardware and run concurrently: a device's time is the
max over tiers, of the max of its send and its receive side (full duplex). A
collective ends when its slowest device ends (max over devices).
AllReduce: a ring over the group, 2 (g - 1) steps of nbytes / g each, paced by
the slowest hop of the ring: 2 (g - 1) alpha + 2 (g - 1) / g * nbytes / bw.
(HCCL's hierarchical algorithms would do better across servers; the ring is
what locmoe.comm's byte accounting assumes too.)
With k overlap chunks, a collective is issued k times on 1/k of the data: its
latency term is paid k times.
"""
from dataclasses import dataclass, fields, replace

TIERS = ("hccs", "pcie", "roce")


@dataclass
class Hardware:
    peak_tflops: float = 320.0       # Ascend 910A fp16 (paper sec. 2)
    efficiency: float = 0.4          # achieved fraction of peak (see the module docstring)
    hccs_group: int = 4              # NPUs per HCCS full mesh (two groups per 8-NPU board)
    hccs_gbytes: float = 30.0        # GB/s per HCCS link and direction
    hccs_links: int = 3              # HCCS links per NPU (one per mesh peer)
    hccs_latency_us: float = 5.0
    pcie_gbytes: float = 32.0        # PCIe 4.0 x16, GB/s per direction, between the board's two groups
    pcie_latency_us: float = 10.0
    roce_gbits: float = 100.0        # RoCE port per NPU, Gb/s per direction
    roce_latency_us: float = 10.0
    act_bytes: int = 2               # bytes per activation element on the wire (fp16 on the 910A)
    grad_bytes: int = 4              # bytes per gradient element (float32 parameters -> float32 grads)
    a2a_bandwidth_scale: float = 1.0  # the MoE All-to-All's effective bandwidth on every tier, x the links'
                                      # (a sensitivity knob: HCCL's All-to-All reaches less than the link
                                      # rate; the paper measures its share of the step, not its bandwidth)

    def validate(self):
        from locmoe.errors import ConfigError
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"--{f.name.replace('_', '-')}", value, "a number > 0")
        if self.efficiency > 1:
            raise ConfigError("--efficiency", self.efficiency, "a fraction of peak in (0, 1]")
        for name in ("hccs_group", "hccs_links", "act_bytes", "grad_bytes"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')}", getattr(self, name), "an integer >= 1")
        return self

    @property
    def flops_per_s(self):
        return self.peak_tflops * 1e12 * self.efficiency

    def bandwidth(self, tier):
        """Bytes/s of one link of the tier (per direction)."""
        return {"hccs": self.hccs_gbytes * 1e9, "pcie": self.pcie_gbytes * 1e9,
                "roce": self.roce_gbits * 1e9 / 8}[tier]

    def for_all_to_all(self):
        """This hardware with every link bandwidth scaled by a2a_bandwidth_scale (the MoE All-to-All's links)."""
        if self.a2a_bandwidth_scale == 1:
            return self
        k = self.a2a_bandwidth_scale
        return replace(self, hccs_gbytes=self.hccs_gbytes * k, pcie_gbytes=self.pcie_gbytes * k,
                       roce_gbits=self.roce_gbits * k, a2a_bandwidth_scale=1.0)

    def latency(self, tier):
        return {"hccs": self.hccs_latency_us, "pcie": self.pcie_latency_us,
                "roce": self.roce_latency_us}[tier] * 1e-6


# ---------------------------------------------------------------- FLOPs
def router_flops(router, tokens, hidden, experts):
    """Forward FLOPs of one router on `tokens` tokens."""
    if router == "locmoe":
        return tokens * hidden
    if router == "switch":
        return 2 * tokens * hidden * experts
    return 0


def forward_flops(cfg, vocab_size, tp):
    """Forward matmul FLOPs per device, excluding the experts (see the module docstring).

    Returns {'attention', 'dense_ffn', 'head', 'router', 'expert_per_row'}: the first four
    per micro-batch (per step without accumulation), 'expert_per_row' the FLOPs of one
    expert row (token) on this device.
    """
    from pangu_sigma.cluster.param_count import tokens_per_rank
    m = cfg.model
    n = tokens_per_rank(cfg)
    d, f, s, layers, moe = m.hidden_size, m.ffn_hidden_size, m.seq_length, m.num_layers, m.moe_layer_num
    return {
        "attention": (layers + 1) * (8 * n * d * d + 4 * n * s * d) / tp,
        "dense_ffn": (layers - moe + 1) * 4 * n * d * f / tp,
        "head": 2 * n * d * vocab_size / tp,
        "router": moe * router_flops(cfg.moe.router, n, d, cfg.num_experts),
        "expert_per_row": 4 * d * f / tp,
    }


# ---------------------------------------------------------------- links
class LinkMap:
    """Tier of every (src, dst) pair of a locmoe Topology under a Hardware description."""

    def __init__(self, topology, hw):
        self.topology = topology
        self.hw = hw
        position, seen = {}, {}
        for r in range(topology.world_size):  # index of r among the ranks of its node
            node = topology.node_of_rank[r]
            position[r] = seen.get(node, 0)
            seen[node] = position[r] + 1
        self.position = position

    def tier(self, src, dst):
        if not self.topology.is_intra_node(src, dst):
            return "roce"
        group = self.hw.hccs_group
        return "hccs" if self.position[src] // group == self.position[dst] // group else "pcie"


def tier_time(hw, tier, peer_bytes, chunks=1):
    """Time one device needs to move `peer_bytes` (a list, one entry per peer) over one tier."""
    peer_bytes = [b for b in peer_bytes if b > 0]
    if not peer_bytes:
        return 0.0
    bw, alpha = hw.bandwidth(tier), hw.latency(tier)
    if tier == "hccs":
        links = int(hw.hccs_links)
        rounds = -(-len(peer_bytes) // links)
        return alpha * rounds * chunks + max(max(peer_bytes) / bw, sum(peer_bytes) / (links * bw))
    return alpha * len(peer_bytes) * chunks + sum(peer_bytes) / bw


def device_time(links, rank, sends, recvs, chunks=1):
    """max over tiers and directions; sends/recvs: {peer: bytes} of one device."""
    worst = 0.0
    for side in (sends, recvs):
        by_tier = {t: [] for t in TIERS}
        for peer, nbytes in side.items():
            if peer != rank and nbytes > 0:
                by_tier[links.tier(rank, peer)].append(nbytes)
        for tier, peer_bytes in by_tier.items():
            worst = max(worst, tier_time(links.hw, tier, peer_bytes, chunks))
    return worst


def p2p_collective_time(links, traffic, chunks=1):
    """Time of a collective given as traffic {src: {dst: bytes}} (every device's sends).

    Returns (time = max over devices, {'hccs','pcie','roce'} bytes summed over all devices).
    """
    recvs = {}
    totals = {t: 0 for t in TIERS}
    for src, dsts in traffic.items():
        for dst, nbytes in dsts.items():
            if dst == src or nbytes <= 0:
                continue
            recvs.setdefault(dst, {})[src] = nbytes
            totals[links.tier(src, dst)] += nbytes
    ranks = set(traffic) | set(recvs)
    time = max((device_time(links, r, traffic.get(r, {}), recvs.get(r, {}), chunks) for r in ranks), default=0.0)
    return time, totals


def ring_allreduce_time(links, group, nbytes, chunks=1):
    """Ring AllReduce of nbytes per device over `group` (global ranks): (time, bytes each device sends)."""
    g = len(group)
    if g <= 1 or nbytes <= 0:
        return 0.0, 0
    hops = [links.tier(group[i], group[(i + 1) % g]) for i in range(g)]
    slowest = min(hops, key=links.hw.bandwidth)
    alpha = max(links.hw.latency(t) for t in hops)
    sent = 2 * (g - 1) * nbytes / g
    return 2 * (g - 1) * alpha * chunks + sent / links.hw.bandwidth(slowest), sent


def uniform_traffic(kind, group, nbytes):
    """{src: {dst: bytes}} of one call of a uniform collective over `group`, with locmoe.comm's rules:
    all_to_all / reduce_scatter send nbytes/g to every other member, all_gather sends all nbytes."""
    g = len(group)
    per_dst = nbytes if kind == "all_gather" else nbytes / g
    return {s: {d: per_dst for d in group if d != s} for s in group}
