"""Token exchange between the ranks of an expert-parallel group (paper 3.2, last part).

to_experts:   dispatch buffer [E, c, d] of this rank -> tokens for my E/ep local
              experts from every EP source, [E_local, ep * c, d].
from_experts: the experts' outputs back to the ranks that own the tokens, [E, c, d].

EP All-to-All over the EP group moves expert slices between ranks. With tensor
parallelism (TP > 1) every TP rank of a group holds the same tokens. Plain
mode: each TP rank sends the whole buffer through the EP All-to-All; the
TP-sharded experts' partial outputs are summed by an AllReduce over TP.
Group-wise mode (`groupwise_a2a`): each TP rank sends only its 1/TP slice of
the capacity dimension through the (inter-node) EP All-to-All, and an
(intra-node) AllGather over TP restores the full buffer; on the way back a
ReduceScatter over TP sums the partial outputs and leaves each TP rank its
slice, which goes back through the EP All-to-All and is AllGathered over TP.
a2a_group "servers" (HCCL's AlltoAll rule, locmoe.hccl_rules): the inter-node All-to-All(V) runs
over every rank of the EP group's servers instead, with the same blocks between EP-group members and
none to the others (same bytes, same results; native and emulated alike, locmoe.comm.AllToAllV).
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from locmoe.comm import AllGather, AllReduce, AllToAll, AllToAllV, ReduceScatter, take_rows
from locmoe.tiers import RemotePlan, check_tiers, embed_blocks, node_members, remote_blocks, server_group, unit_table


def wide_group(topology, a2a_group):
    """The server group (locmoe.tiers.server_group) when a2a_group is "servers" and the EP group leaves its
    server, else None (the EP group itself: one server is not constrained by HCCL's AlltoAll rule)."""
    if a2a_group not in ("ep", "servers"):
        raise ValueError(f"a2a_group={a2a_group!r}: one of 'ep', 'servers'")
    if a2a_group == "ep" or len({topology.node(r) for r in topology.ep_group()}) == 1:
        return None
    # native: ops.AlltoAllV takes per-peer element counts (send_numel_list / recv_numel_list,
    # mindspore/ops/operations/comm_ops.py:1962-1965), 0 for the ranks of other EP groups (locmoe.comm.AllToAllV)
    return server_group(topology)


class TokenExchange(nn.Cell):
    """EP (+TP) exchange for one MoE layer; collectives from locmoe.comm with `backend`."""

    def __init__(self, topology, num_experts, backend, groupwise, name="moe", a2a_group="ep"):
        super().__init__()
        self.ep = topology.ep
        self.tp = topology.tp
        self.tp_rank = topology.tp_rank()
        self.local_experts = num_experts // self.ep
        self.groupwise = bool(groupwise) and self.tp > 1
        self.topology_ref = topology
        ep_group, tp_group = topology.ep_group(), topology.tp_group()
        servers = wide_group(topology, a2a_group)
        if servers is None:
            self.a2a_in = AllToAll(ep_group, 0, 0, backend, topology, f"{name}_a2a_dispatch")
            self.a2a_out = AllToAll(ep_group, 0, 0, backend, topology, f"{name}_a2a_combine")
        else:  # the same blocks as an AllToAll over the EP group ([ep, ...] in, [ep, ...] out), none to other ranks
            ones = embed_blocks(topology, servers, lambda group: [[1] * len(group) for _ in group])
            self.a2a_in = AllToAllV(servers, ones, backend, topology, f"{name}_a2a_dispatch")
            self.a2a_out = AllToAllV(servers, ones, backend, topology, f"{name}_a2a_combine")
        self.tp_gather_in = AllGather(tp_group, 2, backend, topology, f"{name}_tp_gather_dispatch")
        self.tp_gather_out = AllGather(tp_group, 1, backend, topology, f"{name}_tp_gather_combine")
        self.tp_reduce_scatter = ReduceScatter(tp_group, 2, backend, topology, f"{name}_tp_reduce_scatter")
        self.tp_all_reduce = AllReduce(tp_group, backend, topology, f"{name}_tp_all_reduce")

    def to_experts(self, buffer):
        """[E, c, d] -> [E_local, ep * c, d] (c must divide by tp in group-wise mode)."""
        num_experts, capacity, hidden = buffer.shape
        if self.groupwise:
            width = capacity // self.tp
            buffer = buffer[:, self.tp_rank * width:(self.tp_rank + 1) * width]  # [E, c/tp, d]
        part = buffer.shape[1]
        chunks = buffer.reshape(self.ep, self.local_experts, part, hidden)  # [ep(dst), E_local, c', d]
        received = self.a2a_in(chunks)  # [ep(src), E_local, c', d]
        if self.groupwise:
            received = self.tp_gather_in(received)  # [ep(src), E_local, c, d]
        width = received.shape[2]
        tokens = received.transpose(1, 0, 2, 3)  # [E_local, ep(src), c, d]
        return tokens.reshape(self.local_experts, self.ep * width, hidden)  # [E_local, ep*c, d]

    def from_experts(self, outputs):
        """[E_local, ep * c, d] partial (TP-sharded) expert outputs -> [E, c, d] summed outputs."""
        local, tokens, hidden = outputs.shape
        width = tokens // self.ep
        per_source = outputs.reshape(local, self.ep, width, hidden).transpose(1, 0, 2, 3)  # [ep(src), E_local, c, d]
        if self.groupwise:
            per_source = self.tp_reduce_scatter(per_source)  # [ep(src), E_local, c/tp, d], summed over TP
        else:
            per_source = self.tp_all_reduce(per_source)  # summed over TP (identity when tp == 1)
        returned = self.a2a_out(per_source)  # [ep(owner), E_local, c', d]: rows for my tokens
        part = returned.shape[2]
        buffer = returned.reshape(self.ep * self.local_experts, part, hidden)  # [E, c', d]
        if self.groupwise:
            buffer = self.tp_gather_out(buffer)  # [E, c, d]
        return buffer

    def register_bytes(self, counter, num_experts, capacity, hidden, dtype, layers=1):
        """Count this layer's collectives per step into a locmoe.comm.CommCounter."""
        register_exchange_bytes(counter, self.topology_ref, num_experts, capacity, hidden, dtype,
                                self.groupwise, layers)


def register_exchange_bytes(counter, topology, num_experts, capacity, hidden, dtype, groupwise, layers=1):
    """Bytes of one step of `layers` MoE layers, per collective, as TokenExchange moves them.

    Forward: EP All-to-All out and back; group-wise: TP AllGather of the received
    slices, TP ReduceScatter of the partial expert outputs, TP AllGather of the
    returned slices; plain TP > 1: one TP AllReduce of the partial outputs. The
    backward pass moves the same bytes again (the adjoint of an All-to-All is an
    All-to-All, of an AllGather a ReduceScatter of the same size, and vice versa).
    capacity: the layer's (rounded) capacity. Pure Python: no communication needed.
    """
    ep, tp = topology.ep, topology.tp
    groupwise = bool(groupwise) and tp > 1
    local = num_experts // ep
    part = capacity // tp if groupwise else capacity
    calls = 2 * layers
    ep_family, tp_family = topology.all_groups("ep"), topology.all_groups("tp")
    ep_shape = (ep, local, part, hidden)  # [ep, E_local, c', d]
    full_shape = (ep, local, capacity, hidden)  # [ep, E_local, c, d]
    for name in ("a2a_dispatch", "a2a_combine"):
        counter.register(name, "all_to_all", topology.ep_group(), ep_shape, dtype, calls, ep_family)
    if groupwise:
        counter.register("tp_gather_dispatch", "all_gather", topology.tp_group(), ep_shape, dtype, calls, tp_family)
        counter.register("tp_reduce_scatter", "reduce_scatter", topology.tp_group(), full_shape, dtype, calls,
                         tp_family)
        counter.register("tp_gather_combine", "all_gather", topology.tp_group(), (num_experts, part, hidden), dtype,
                         calls, tp_family)
    elif tp > 1:
        counter.register("tp_all_reduce", "all_reduce", topology.tp_group(), full_shape, dtype, calls, tp_family)
    return counter


# ---- two tiers: node-local rows never enter the inter-node exchange ------------------
def placeholder_rows(local, unit):
    """local [n, c, d] -> [1, unit, d], copies of its first row: the tier-2 placeholder of a rank with no
    units. Built from data, not ops.zeros: with a constant input GRAPH-mode autodiff drops the
    AllToAllV's backward on this rank only (its peers would wait in theirs)."""
    hidden = local.shape[-1]
    first = ops.zeros((unit,), ms.int32)  # [u]: row 0, u times
    return ops.gather(local.reshape(-1, hidden), first, 0).reshape(1, unit, hidden)  # [1, u, d]


def skip_rows(kept, unused):
    """kept [n, c, d] unchanged, but computed from (kept; unused) by a gather that never reads `unused`:
    `unused`'s collectives stay in the graph (forward and backward; its gradient is zero)."""
    hidden = kept.shape[-1]
    rows = kept.shape[0] * kept.shape[1]
    both = ops.concat((kept.reshape(-1, hidden), unused.reshape(-1, hidden)), 0)  # [n*c + m, d]
    return ops.gather(both, ops.arange(0, rows, 1, dtype=ms.int32), 0).reshape(kept.shape)  # [n, c, d]


class TieredExchange(nn.Cell):
    """The two-tier exchange (docs/parallelism.md: locality saves bytes only if fewer rows cross nodes).

    A rank's flat dispatch buffer holds its node's n_l local experts (C_l rows each) then its
    R tier-2 units (u rows each, by expert id; locmoe.tiers, locmoe.dispatch.tier_layout).
    Tier 1 (intra-node): All-to-All over the EP-group members on this node (m ranks),
      [m, E/ep, C_l, d]; never leaves the node.
    Tier 2 (inter-node): AllToAllV over the whole EP group carrying each (rank, remote expert)
      pair's units (units: locmoe.tiers.unit_table, static, so GRAPH mode compiles it); a rank
      reading one domain sends only to the remote experts of that domain, in proportion to
      their expected share. Both backends (native AlltoAllV, emulated) send the same blocks;
      nothing goes to my own node's members (tier 1 serves them).
    With TP > 1 and group-wise mode each TP rank sends 1/TP of each tier's rows and an
    AllGather over TP restores them (C_l, u are multiples of TP), as TokenExchange; except
    tier 1 when the node holds one EP member (m = 1): its All-to-All is the identity, so the
    TP slice + AllGather would only rebuild what every TP rank holds; the full rows go to the
    experts and one TP AllReduce sums their partial outputs (same bytes as the ReduceScatter +
    AllGather it replaces, and no dispatch AllGather).
    The expert sees [E/ep, m * C_l + W * u, d] rows (W: RemotePlan.width; zeros in free slots).

    Every member of an EP group issues the same collectives in the same order, whatever its
    units (R = 0 too): a rank with no units sends tier 2 a placeholder built from its local rows
    (never a constant, so autodiff keeps the AllToAllV's backward: a constant input would
    prune it in GRAPH mode while the peers wait in theirs), and its returned placeholder is
    folded into the tier-1 result by a gather that never reads it (so the combine AllToAllV and
    its backward are not eliminated as unused). Both carry zero gradient; values are unchanged.
    """

    def __init__(self, topology, num_experts, backend, groupwise, name="moe", units=None, a2a_group="ep"):
        super().__init__()
        check_tiers(topology)
        self.ep, self.tp, self.tp_rank = topology.ep, topology.tp, topology.tp_rank()
        self.rank_experts = num_experts // self.ep
        self.groupwise = bool(groupwise) and self.tp > 1
        self.topology_ref = topology
        self.units = unit_table(topology) if units is None else units  # [dp, E]
        ep_group, tp_group = topology.ep_group(), topology.tp_group()
        members = node_members(topology)
        self.members = len(members)
        self.num_local = self.members * self.rank_experts
        self.has_remote = self.members < self.ep  # else the whole EP group is on this node: tier 1 only
        self.slice_local = self.groupwise and self.members > 1  # m = 1: tier 1 is the identity, no TP slicing
        plan = RemotePlan(topology, self.units)
        self.plan = plan
        self.width = plan.width
        self.send_index = Tensor(np.array(plan.send, np.int32))  # [n_send]
        self.place_index = Tensor(np.array(plan.place, np.int32))  # [E/ep * W]
        self.recv_index = Tensor(np.array(plan.recv, np.int32))  # [n_recv]
        self.unsend_index = Tensor(np.array(plan.unsend or [0], np.int32))  # [R] (unused when R = 0)
        servers = wide_group(topology, a2a_group)  # None: tier 2 over the EP group
        if servers is None:
            wide, blocks = ep_group, plan.blocks
        else:  # the same blocks, over whole servers: 0 to the ranks of other EP groups
            wide = servers
            blocks = embed_blocks(topology, servers, lambda group: remote_blocks(topology, self.units, group[0]))
        back = [list(col) for col in zip(*blocks)]  # the way back: the transposed matrix
        self.a2a_local_in = AllToAll(members, 0, 0, backend, topology, f"{name}_a2a_local_dispatch")
        self.a2a_local_out = AllToAll(members, 0, 0, backend, topology, f"{name}_a2a_local_combine")
        self.a2a_remote_in = AllToAllV(wide, blocks, backend, topology, f"{name}_a2a_remote_dispatch")
        self.a2a_remote_out = AllToAllV(wide, back, backend, topology, f"{name}_a2a_remote_combine")
        self.gather_local_in = AllGather(tp_group, 2, backend, topology, f"{name}_tp_gather_local_dispatch")
        self.gather_remote_in = AllGather(tp_group, 1, backend, topology, f"{name}_tp_gather_remote_dispatch")
        self.gather_local_out = AllGather(tp_group, 1, backend, topology, f"{name}_tp_gather_local_combine")
        self.gather_remote_out = AllGather(tp_group, 1, backend, topology, f"{name}_tp_gather_remote_combine")
        self.rs_local = ReduceScatter(tp_group, 2, backend, topology, f"{name}_tp_reduce_scatter_local")
        self.rs_remote = ReduceScatter(tp_group, 1, backend, topology, f"{name}_tp_reduce_scatter_remote")
        self.ar_local = AllReduce(tp_group, backend, topology, f"{name}_tp_all_reduce_local")
        self.ar_remote = AllReduce(tp_group, backend, topology, f"{name}_tp_all_reduce_remote")

    def _slice(self, rows, sliced=True):
        if not (self.groupwise and sliced):
            return rows
        width = rows.shape[1] // self.tp
        return rows[:, self.tp_rank * width:(self.tp_rank + 1) * width]  # [n, c/tp, d]

    def to_experts(self, local, remote, unit):
        """local [n_l, C_l, d], remote [R, u, d] (my units; None when R = 0) -> [E/ep, m * C_l + W * u, d]."""
        hidden = local.shape[-1]
        sent_l = self._slice(local, self.slice_local)
        part_l = sent_l.shape[1]
        got_l = self.a2a_local_in(sent_l.reshape(self.members, self.rank_experts, part_l, hidden))  # [m, E/ep, c_l', d]
        if self.slice_local:
            got_l = self.gather_local_in(got_l)  # [m, E/ep, C_l, d]
        rows_l = got_l.transpose(1, 0, 2, 3).reshape(self.rank_experts, -1, hidden)  # [E/ep, m*C_l, d]
        if not self.has_remote:
            return rows_l
        if remote is None:  # I send nothing across nodes, but take part (and may receive)
            remote = placeholder_rows(local, unit)  # [1, u, d]: read by nobody, built from data
        remote = self._slice(remote)  # [R, u', d]
        got_r = self.a2a_remote_in(take_rows(remote, self.send_index))  # [n_recv, u', d]
        if self.groupwise:
            got_r = self.gather_remote_in(got_r)  # [n_recv, u, d]
        rows_r = take_rows(got_r, self.place_index).reshape(self.rank_experts, -1, hidden)  # [E/ep, W*u, d]
        return ops.concat((rows_l, rows_r), 1)  # [E/ep, m*C_l + W*u, d]

    def from_experts(self, outputs, local_capacity, unit):
        """[E/ep, m * C_l + W * u, d] partial outputs -> (local [n_l, C_l, d], remote [R, u, d]; None when R = 0)."""
        hidden = outputs.shape[-1]
        split = self.members * local_capacity
        out_l = outputs[:, :split].reshape(self.rank_experts, self.members, local_capacity, hidden)
        out_l = out_l.transpose(1, 0, 2, 3)  # [m, E/ep, C_l, d]
        out_l = self.rs_local(out_l) if self.slice_local else self.ar_local(out_l)  # summed over TP
        back_l = self.a2a_local_out(out_l)  # [m, E/ep, c_l', d]
        back_l = back_l.reshape(self.num_local, back_l.shape[2], hidden)  # [n_l, c_l', d]
        if self.slice_local:
            back_l = self.gather_local_out(back_l)  # [n_l, C_l, d]
        if not self.has_remote:
            return back_l, None
        out_r = outputs[:, split:].reshape(self.rank_experts * self.width, unit, hidden)  # [E/ep*W, u, d]
        out_r = take_rows(out_r, self.recv_index)  # [n_recv, u, d]: the units that came in
        out_r = self.rs_remote(out_r) if self.groupwise else self.ar_remote(out_r)  # summed over TP, [n_recv, u', d]
        back_r = self.a2a_remote_out(out_r)  # [n_send, u', d]
        if self.groupwise:
            back_r = self.gather_remote_out(back_r)  # [n_send, u, d]
        if not self.plan.units:  # R = 0: back_r is my placeholder; consumed, never read
            return skip_rows(back_l, back_r), None
        return back_l, ops.gather(back_r, self.unsend_index, 0)  # [R, u, d]

    def register_bytes(self, counter, num_experts, local_capacity, unit, hidden, dtype, layers=1):
        register_tiered_exchange_bytes(counter, self.topology_ref, num_experts, local_capacity, unit,
                                       hidden, dtype, self.groupwise, layers, self.units)


def register_tiered_exchange_bytes(counter, topology, num_experts, local_capacity, unit, hidden, dtype,
                                   groupwise, layers=1, units=None):
    """Bytes of one step of `layers` MoE layers as TieredExchange moves them (forward and
    backward alike): tier 1 over this node's EP members, tier 2's AllToAllV over the EP group
    (units [dp, E]: locmoe.tiers.unit_table, None: one per remote expert; u rows each).
    Tier 1 of a node holding one EP member is unsliced: one TP AllReduce of its partial outputs,
    no AllGathers. Overlap chunks (locmoe.tiers.tier_chunks) split the rows, not the bytes."""
    ep, tp = topology.ep, topology.tp
    groupwise = bool(groupwise) and tp > 1
    units = unit_table(topology) if units is None else units
    rank_experts = num_experts // ep
    members = node_members(topology)
    sliced_l = groupwise and len(members) > 1  # one member per node: tier 1 unsliced (TieredExchange.slice_local)
    part_l = local_capacity // tp if sliced_l else local_capacity
    part_r = unit // tp if groupwise else unit
    calls = 2 * layers
    node_family = topology.distinct_groups(lambda r: node_members(topology, r))
    tp_family = topology.all_groups("tp")
    local_shape = (len(members), rank_experts, part_l, hidden)  # [m, E/ep, c_l', d]
    for name in ("a2a_local_dispatch", "a2a_local_combine"):
        counter.register(name, "all_to_all", members, local_shape, dtype, calls, node_family)
    tp_group = topology.tp_group()
    num_local = len(members) * rank_experts
    _register_tp(counter, "local", tp_group, tp_family, [local_shape] * len(tp_family), local_capacity, part_l,
                 [num_local] * len(tp_family), hidden, dtype, calls, sliced_l, tp)
    if len(members) == ep:  # the whole EP group on one node: tier 1 only
        return counter
    forward = [(group, remote_blocks(topology, units, group[0])) for group in topology.all_groups("ep")]
    backward = [(group, [list(col) for col in zip(*blocks)]) for group, blocks in forward]
    counter.register_v("a2a_remote_dispatch", forward, (part_r, hidden), dtype, calls)
    counter.register_v("a2a_remote_combine", backward, (part_r, hidden), dtype, calls)
    received, sent = {}, {}  # units per rank
    for group, blocks in forward:
        for i, r in enumerate(group):
            received[r], sent[r] = sum(row[i] for row in blocks), sum(blocks[i])
    _register_tp(counter, "remote", tp_group, tp_family, [(received[g[0]], part_r, hidden) for g in tp_family],
                 unit, part_r, [sent[g[0]] for g in tp_family], hidden, dtype, calls, groupwise, tp)
    return counter


def _register_tp(counter, tier, tp_group, tp_family, shapes, capacity, part, returned, hidden, dtype, calls,
                 groupwise, tp):
    """A tier's TP collectives: per TP group of the family, the shape sent to the experts' TP ranks
    (its capacity dimension second to last) and the blocks returned to it."""
    mine = tp_family.index(tp_group)
    full = [s[:-2] + (capacity, hidden) for s in shapes]
    back = [(n, part, hidden) for n in returned]
    if groupwise:
        counter.register(f"tp_gather_{tier}_dispatch", "all_gather", tp_group, shapes[mine], dtype, calls, tp_family,
                         shapes)
        counter.register(f"tp_reduce_scatter_{tier}", "reduce_scatter", tp_group, full[mine], dtype, calls,
                         tp_family, full)
        counter.register(f"tp_gather_{tier}_combine", "all_gather", tp_group, back[mine], dtype, calls, tp_family,
                         back)
    elif tp > 1:
        counter.register(f"tp_all_reduce_{tier}", "all_reduce", tp_group, full[mine], dtype, calls, tp_family, full)
