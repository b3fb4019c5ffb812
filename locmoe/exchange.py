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
"""
from mindspore import nn

from locmoe.comm import AllGather, AllReduce, AllToAll, ReduceScatter


class TokenExchange(nn.Cell):
    """EP (+TP) exchange for one MoE layer; collectives from locmoe.comm with `backend`."""

    def __init__(self, topology, num_experts, backend, groupwise, name="moe"):
        super().__init__()
        self.ep = topology.ep
        self.tp = topology.tp
        self.tp_rank = topology.tp_rank()
        self.local_experts = num_experts // self.ep
        self.groupwise = bool(groupwise) and self.tp > 1
        self.topology_ref = topology
        ep_group, tp_group = topology.ep_group(), topology.tp_group()
        self.a2a_in = AllToAll(ep_group, 0, 0, backend, topology, f"{name}_a2a_dispatch")
        self.a2a_out = AllToAll(ep_group, 0, 0, backend, topology, f"{name}_a2a_combine")
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
