"""The static geometry of the two-tier exchange (pure Python; docs/parallelism.md).

Tier 1 carries a rank's tokens for the experts on its own node, C_l rows per (rank, expert).
Tier 2 carries the rest across nodes in *units* of u rows: the pair (rank r, remote expert e)
gets units[r][e] of them, a static table:
  - uniform (no placement): 1 unit per remote expert, u = C_r = ceil(T f_r / E);
  - domain-affine placement with level 1 (locmoe.placement.DomainPlacement.remote_units):
    ceil(Q E share[r, e]) units of u = ceil(T f_r / (Q E)) rows, share = the pair's expected
    share of r's tokens; 0 for the experts r's domains never use (nothing is sent there).
So the rows a rank sends across nodes follow where its domains' tokens can go, and
remote_capacity_factor f_r scales the expected flow of every pair alike.
"""
import numpy as np

from locmoe.errors import ConfigError


def node_members(topology, rank=None):
    """The members of rank's EP group on rank's node, sorted (the intra-node tier's group)."""
    me = topology.rank if rank is None else rank
    return [r for r in topology.ep_group(me) if topology.node(r) == topology.node(me)]


def alltoall_groups(topology, two_tier, a2a_group="ep"):
    """[(label, ranks)]: the communicators the MoE exchange runs AlltoAll / AlltoAllV over (groups of 1 skipped).
    One tier (locmoe.exchange.TokenExchange): the EP groups. Two tiers (TieredExchange): tier 1's
    node-local EP members, and tier 2's EP groups where an EP group leaves its node. a2a_group
    "servers": the server groups (server_group) in place of the EP groups."""
    servers = a2a_group == "servers"
    kind = "server group" if servers else "EP group"
    wide = topology.distinct_groups(lambda r: server_group(topology, r)) if servers else topology.all_groups("ep")
    if not two_tier:
        return [(f"{kind} (one-tier exchange, {'AlltoAllV' if servers else 'AlltoAll'})", g)
                for g in wide if len(g) > 1]
    local = topology.distinct_groups(lambda r: node_members(topology, r))
    found = [("tier-1 group (two-tier exchange, intra-node AlltoAll)", g) for g in local if len(g) > 1]
    return found + [(f"{kind} (tier 2 of the two-tier exchange, AlltoAllV)", g) for g in wide
                    if len({topology.node(r) for r in g}) > 1]  # on one node: tier 1 only


def check_tiers(topology):
    """Two tiers need a node's local experts to be exactly those its EP-group members hold
    (true when EP groups lie within a node or each node holds ranks of one EP group only)."""
    for r in range(topology.world_size):
        members = node_members(topology, r)
        held = sorted(e for m in members for e in topology.experts_of_rank(m))
        if held != topology.local_experts(r):
            raise ValueError(f"two-tier exchange: rank {r}'s node-local experts {topology.local_experts(r)} are not "
                             f"those of its EP-group members on the node {held}; use remote_capacity_factor=0")


def unit_table(topology, remote_units=None):
    """[dp, E] int64: tier-2 units of every (data-parallel rank, expert) pair, 0 for the experts on
    the rank's own node (tier 1). remote_units [dp, E] from a placement, or None: 1 per remote expert."""
    dp, experts = topology.dp, topology.num_experts
    units = np.ones((dp, experts), np.int64) if remote_units is None else np.asarray(remote_units, np.int64)
    if units.shape != (dp, experts) or (units < 0).any():
        raise ConfigError("remote_units", units.shape, f"a [dp={dp}, E={experts}] table of unit counts >= 0")
    units = units.copy()
    for d in range(dp):
        units[d, topology.local_experts(d * topology.tp)] = 0
    return units


def remote_blocks(topology, units, rank=None):
    """Tier 2's block matrix for rank's EP group (units: unit_table): blocks[i][j] = the units member
    i sends member j (for j's experts; 0 when both are on one node); blocks[i][i] = 1, the placeholder
    every AllToAllV member sends itself (locmoe.comm.AllToAllV)."""
    group = topology.ep_group(rank)
    return [[1 if dst == src else 0 if topology.is_intra_node(src, dst)
             else int(sum(units[topology.dp_rank(src)][e] for e in topology.experts_of_rank(dst)))
             for dst in group] for src in group]


def server_group(topology, rank=None):
    """Every rank on the servers of rank's EP group, sorted: the communicator of whole servers that
    parallel.a2a_group "servers" runs the EP exchange's inter-node AlltoAll(V) over. Its servers must
    hold whole EP groups only (else two EP groups' server sets overlap without being equal)."""
    nodes = {topology.node(r) for r in topology.ep_group(rank)}
    ranks = [r for r in range(topology.world_size) if topology.node(r) in nodes]
    for r in ranks:
        if {topology.node(q) for q in topology.ep_group(r)} != nodes:
            raise ConfigError("parallel.a2a_group", "servers",
                              f"'ep' for this layout: EP group {_ranks(topology.ep_group(r))} and "
                              f"{_ranks(topology.ep_group(rank))} share servers but not all of them "
                              f"(servers needs each EP group's servers to hold whole EP groups)")
    return ranks


def _ranks(ranks):
    return str(ranks) if len(ranks) <= 8 else f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}]"


def embed_blocks(topology, servers, blocks_of):
    """[S, S] counts over the server group `servers`: each EP group inside it keeps its own matrix
    blocks_of(ep_group) between its members, 0 between ranks of different EP groups (nothing sent)."""
    where = {r: i for i, r in enumerate(servers)}
    matrix = [[0] * len(servers) for _ in servers]
    for group in topology.distinct_groups(lambda r: topology.ep_group(r) if r in where else None):
        if group is None:
            continue
        for i, (src, row) in enumerate(zip(group, blocks_of(group))):
            for dst, count in zip(group, row):
                matrix[where[src]][where[dst]] = int(count)
    return matrix


class RemotePlan:
    """Static indices of tier 2 for one rank. My remote buffer holds my units by expert id, R of them.

    blocks: remote_blocks of my EP group.
    send [n_send]: the units in the order AllToAllV sends them (by destination member, each one's
      experts by id); index R (the zero unit) is the placeholder to myself.
    width: W, the units of the busiest of my experts: expert k's input is W units,
      place[k * W + s] = the received unit in slot s (index n_recv: zero, a free slot).
    recv [n_recv]: the way back, the slot each received unit came from (index E/ep * W: zero,
      the placeholder).
    unsend [R]: the way back, where each of my units is among the returned ones.
    """

    def __init__(self, topology, units, rank=None):
        me = topology.rank if rank is None else rank
        group = topology.ep_group(me)
        mine = units[topology.dp_rank(me)]
        remote_ids = [e for e in range(topology.num_experts) if mine[e] > 0]
        first = dict(zip(remote_ids, np.cumsum([0] + [int(mine[e]) for e in remote_ids])))  # expert -> first unit
        self.units = int(sum(mine))
        self.blocks = remote_blocks(topology, units, me)
        self.send = []
        for dst in group:
            if dst == me:
                self.send.append(self.units)
                continue
            for e in topology.experts_of_rank(dst):
                self.send += list(range(first[e], first[e] + int(mine[e]))) if mine[e] > 0 else []
        held = topology.experts_of_rank(me)
        filled = [0] * len(held)  # slots used so far by each of my experts
        slots = []  # per received unit: k * W + s before W is known, as (k, s); None: the placeholder
        for src in group:
            if src == me:
                slots.append(None)
                continue
            theirs = units[topology.dp_rank(src)]
            for k, e in enumerate(held):
                for _ in range(int(theirs[e])):
                    slots.append((k, filled[k]))
                    filled[k] += 1
        self.width = max(filled + [1])
        self.num_recv, self.num_send = len(slots), len(self.send)
        position = [None if s is None else s[0] * self.width + s[1] for s in slots]
        where = {p: n for n, p in enumerate(position) if p is not None}
        self.place = [where.get(p, self.num_recv) for p in range(len(held) * self.width)]
        self.recv = [len(held) * self.width if p is None else p for p in position]
        back = {u: n for n, u in enumerate(self.send) if u < self.units}
        self.unsend = [back[u] for u in range(self.units)]


def tier_chunks(local_capacity, unit, degree, step):
    """Overlap chunks of the two-tier exchange: ((l0, l1), (r0, r1)) per chunk, slices of the C_l rows of
    every local pair and of the u rows of every tier-2 unit, both cut on multiples of `step` (TP in
    group-wise mode). min(degree, C_l / step, u / step) chunks, so that every chunk carries both tiers;
    each chunk's exchange is independent of the others' expert compute (rows are independent)."""
    count = min(degree, local_capacity // step, unit // step)
    bounds = []
    for size in (local_capacity, unit):
        blocks, start, cuts = size // step, 0, []
        for i in range(count):
            stop = start + step * (blocks // count + (1 if i < blocks % count else 0))
            cuts.append((start, stop))
            start = stop
        bounds.append(cuts)
    return list(zip(bounds[0], bounds[1]))
