"""MoELayer: route -> dispatch -> (All-to-All) -> experts -> (All-to-All) -> combine.

Tokens are handled in G token groups [G, T, d]. A group is what one device
routes: capacity, the aux loss and the locality loss are per group. On a
cluster each rank has G = 1; a single process may hold G > 1 groups posing
as G ranks (each with its own node-local experts), which reproduces the
distributed run exactly on one CPU.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Tensor

from locmoe.capacity import expert_capacity
from locmoe.dispatch import (assign_slots, assign_tiered_slots, combine, dispatch, expert_rows_index, gather_rows,
                             reroute_to_local, tier_layout, token_of_slot)
from locmoe.exchange import TieredExchange, TokenExchange
from locmoe.tiers import tier_chunks, unit_table
from locmoe.experts import BatchedExperts
from locmoe.routers import build_router, tie_order


class MoELayer(nn.Cell):
    """Sparse FFN. construct(x [B,S,d], token_ids [B,S], domain_ids [B]) ->
    (y [B,S,d] MoE branch only, aux_loss, loc_loss,
     (expert_load [E], dropped, local, dropped_remote, local_by_rank [P], rerouted)).
    dropped_remote: the dropped tokens that were bound for experts on another node (the
    remote tier in two-tier mode). rerouted: the tokens kept at a node-local expert other than
    their routed one (moe.reroute_overflow; 0 without it). local_by_rank: node-local tokens of each token group,
    by the data-parallel rank it is (distributed: P = dp, this rank's slot filled, the
    others summed in by the metrics AllReduce) or poses as (one process: P = G, in group
    order); every group routes the same number of tokens.

    token_groups: G, the number of groups the B*S tokens are split into (contiguous).
    group_ranks: the rank each group poses as (locality); default: topology.rank for all.
    token_counts: token frequencies for the hash router's balanced table.
    domain_experts: [D, E] level-1 mask from a domain-affine placement (locmoe.placement);
        None: level 1 from the config (domain_to_group / num_domain_groups).
    remote_units, remote_quanta: two tiers only: [dp, E] each (data-parallel rank, remote expert)
        pair's capacity in units of 1/remote_quanta of a uniform pair's (locmoe.placement.
        DomainPlacement.remote_units: its expected share under level 1; 0: never sent to; a token
        routed there is dropped). None: one unit per remote expert (remote_quanta 1).
    parallel: a locmoe.parallel_context.ParallelContext; when it is distributed with
        EP or TP > 1, this rank holds num_experts/ep experts (inner width ffn/tp) and
        the dispatch buffer goes through the TokenExchange (All-to-All) around them.
    In group-wise mode capacity is rounded up to a multiple of TP (from the topology,
    virtual or real, so both runs drop the same tokens); overlap chunks are cut on
    multiples of it and the overlap degree never changes which tokens are dropped.
    Two tiers (moe remote_capacity_factor > 0): each group's buffer holds its node's
    experts at capacity C_l (capacity_factor) and the other experts at their tier-2 units
    of u rows (remote_capacity_factor, locmoe.tiers); drops are counted per tier;
    distributed, the TieredExchange sends only those rows across nodes. moe.reroute_overflow: a token
    over its pair's slots takes a free slot of its best node-local expert instead (locmoe.dispatch.
    reroute_to_local); the counts stay the router's decisions (load, local), drops are those left after it.
    """

    def __init__(self, moe_config, hidden_size, ffn_hidden_size, topology, param_init_std=0.02,
                 compute_dtype=ms.float32, token_groups=1, group_ranks=None, token_counts=None,
                 out_init_std=None, parallel=None, domain_experts=None, remote_units=None, remote_quanta=1):
        super().__init__()
        cfg = moe_config
        self.num_experts = cfg.num_experts
        self.capacity_factor = cfg.capacity_factor
        self.overlap_degree = cfg.comm_overlap_degree
        self.token_groups = token_groups
        self.compute_dtype = compute_dtype
        group_ranks = [topology.rank] * token_groups if group_ranks is None else list(group_ranks)
        local_mask = np.array([topology.local_expert_mask(r) for r in group_ranks], np.float32)  # [G, E]
        self.local_mask = Tensor(local_mask)
        distributed = parallel is not None and parallel.distributed
        if distributed and token_groups == 1:  # one slot per DP rank, mine filled
            slots = np.eye(topology.dp, dtype=np.float32)[topology.dp_rank():topology.dp_rank() + 1]  # [1, dp]
        else:
            slots = np.eye(token_groups, dtype=np.float32)  # [G, G]
        self.rank_slots = Tensor(slots)  # [G, P]
        self.num_rank_slots = slots.shape[1]
        self.two_tier = cfg.remote_capacity_factor > 0
        self.reroute = self.two_tier and cfg.reroute_overflow
        self.remote_capacity_factor = cfg.remote_capacity_factor
        self.num_local = int(local_mask[0].sum())
        self.remote_quanta = int(remote_quanta) if remote_units is not None else 1
        self.units = self.group_units = None  # two tiers only
        if self.two_tier:
            self.units = unit_table(topology, remote_units)  # [dp, E] tier-2 units, 0 on the rank's node
            group_units = np.stack([self.units[topology.dp_rank(r)] for r in group_ranks])  # [G, E]
            self.group_units = Tensor(group_units.astype(np.float32))  # [G, E]
            self.max_units = int(group_units.sum(1).max())  # R: the most units of any group
            self.max_pair_units = int(group_units.max(initial=1))  # the most units of one (group, expert) pair
        if self.two_tier and not (local_mask.sum(1) == self.num_local).all():
            raise ValueError("two-tier capacity needs the same number of node-local experts for every group")
        self.router = build_router(cfg, hidden_size, token_counts=token_counts, init_std=param_init_std,
                                   domain_experts=domain_experts)
        groupwise = cfg.groupwise_a2a and topology.tp > 1
        self.capacity_multiple = topology.tp if groupwise else 1
        self.exchange = None
        local_experts, local_ffn = cfg.num_experts, ffn_hidden_size
        if parallel is not None and parallel.distributed and (topology.ep > 1 or topology.tp > 1):
            if token_groups != 1:
                raise ValueError("a distributed MoELayer routes one token group per rank (token_groups=1)")
            if ffn_hidden_size % topology.tp:
                raise ValueError(f"ffn_hidden_size={ffn_hidden_size} must divide by tp={topology.tp}")
            exchange = TieredExchange if self.two_tier else TokenExchange
            extra = {"units": self.units} if self.two_tier else {}
            self.exchange = exchange(topology, cfg.num_experts, parallel.backend, cfg.groupwise_a2a,
                                     a2a_group=cfg.a2a_group, **extra)
            local_experts, local_ffn = cfg.num_experts // topology.ep, ffn_hidden_size // topology.tp
        self.experts = BatchedExperts(local_experts, hidden_size, local_ffn, param_init_std, out_init_std,
                                      compute_dtype)

    def capacity(self, tokens_per_group):
        """Slots per (group, expert): eq. ec rounded up to capacity_multiple."""
        raw = expert_capacity(tokens_per_group, self.capacity_factor, self.num_experts)
        return (raw + self.capacity_multiple - 1) // self.capacity_multiple * self.capacity_multiple

    def remote_capacity(self, tokens_per_group):
        """Two tiers: u, the rows of one tier-2 unit, ceil(T f_r / (Q E)) rounded like capacity(); a
        (group, remote expert) pair has units * u slots (one unit per pair without a placement)."""
        raw = expert_capacity(tokens_per_group, self.remote_capacity_factor, self.num_experts * self.remote_quanta)
        return (raw + self.capacity_multiple - 1) // self.capacity_multiple * self.capacity_multiple

    def buffer_rows(self, tokens_per_group):
        """Expert rows one token group's dispatch buffer holds (what the experts compute for it):
        E * C with one tier, n_l * C_l + R * u with two (R: the busiest group's tier-2 units)."""
        if self.two_tier:
            return self._tier_slots(tokens_per_group)[4]
        return self.num_experts * self.capacity(tokens_per_group)

    def route(self, x, token_ids, domain_ids):
        """x [B, S, d] -> (expert_index [G, T], keep [G, T]): construct's token grouping, router and slot
        assignment, without the experts (the per-token view of eval and the routing report)."""
        batch, seq, hidden = x.shape
        groups = self.token_groups
        per_group = batch * seq // groups
        x_groups = x.reshape(groups, per_group, hidden).astype(ms.float32)  # [G, T, d]
        id_groups = token_ids.reshape(groups, per_group)  # [G, T]
        domains = ops.broadcast_to(domain_ids.expand_dims(1), (batch, seq)).reshape(groups, per_group)  # [G, T]
        out = self.router(x_groups, id_groups, domains, self.local_mask)
        expert_index = out[0]  # [G, T]
        return expert_index, self.kept(expert_index, per_group, out[5], id_groups)

    def kept(self, expert_index, per_group, gate_probs=None, token_ids=None):
        """expert_index [G, T] -> keep [G, T] (1: the token got a slot), exactly as construct assigns
        slots (one tier, or two tiers with their own capacities, rerouted with moe.reroute_overflow: then
        gate_probs [G, T, E] and token_ids [G, T] are needed); for eval's per-token view."""
        if self.two_tier:
            _, _, capacity, offset, slots = self._tier_slots(per_group)
            slot, keep, onehot = assign_tiered_slots(expert_index, capacity, offset, slots)
            if self.reroute:
                keep = self._reroute(slot, keep, onehot, gate_probs, token_ids, capacity, offset, slots)[1]
            return keep
        return assign_slots(expert_index, self.num_experts, self.capacity(per_group))[1]

    def _reroute(self, slot, keep, onehot, gate_probs, token_ids, capacity, offset, slots):
        """reroute_to_local with the layer's local experts, n_l passes and LocMoE's tie order."""
        ties = tie_order(token_ids, self.num_experts)  # [G, T, E]
        return reroute_to_local(slot, keep, onehot, gate_probs, ties, self.local_mask, capacity, offset, slots,
                                self.num_local)

    def _tier_slots(self, per_group):
        """Two tiers: (C_l, u, capacity [G, E], offset [G, E], S slots per group): n_l * C_l local
        rows, then the group's units of u rows (the busiest group's R units set S)."""
        local_capacity, unit = self.capacity(per_group), self.remote_capacity(per_group)
        capacity, offset = tier_layout(self.local_mask, local_capacity, unit, self.group_units)  # [G, E] each
        return local_capacity, unit, capacity, offset, self.num_local * local_capacity + self.max_units * unit

    def _tiered_expert_stage(self, flat, capacity, offset, slots, local_capacity, unit):
        """flat [G*S, d] two-tier buffer -> expert outputs, same layout."""
        groups = self.token_groups
        hidden = flat.shape[-1]
        if self.exchange is not None:  # one group: [n_l*C_l | R*u] rows
            split = self.num_local * local_capacity
            local = flat[:split].reshape(self.num_local, local_capacity, hidden)  # [n_l, C_l, d]
            remote = None
            if split < flat.shape[0]:
                remote = flat[split:].reshape(self.max_units, unit, hidden)  # [R, u, d]
            outs_l, outs_r = [], []
            for (l0, l1), (r0, r1) in tier_chunks(local_capacity, unit, self.overlap_degree, self.capacity_multiple):
                part_r = None if remote is None else remote[:, r0:r1]  # [R, u_k, d]
                rows = self.exchange.to_experts(local[:, l0:l1], part_r, r1 - r0)  # [E/ep, m*C_lk + W*u_k, d]
                back_l, back_r = self.exchange.from_experts(self.experts(rows), l1 - l0, r1 - r0)
                outs_l.append(back_l)  # [n_l, C_lk, d]
                outs_r.append(back_r)  # [R, u_k, d] or None (R = 0)
            back_l = outs_l[0] if len(outs_l) == 1 else ops.concat(outs_l, 1)  # [n_l, C_l, d]
            if remote is None:
                return back_l.reshape(-1, hidden)
            back_r = outs_r[0] if len(outs_r) == 1 else ops.concat(outs_r, 1)  # [R, u, d]
            return ops.concat((back_l.reshape(-1, hidden), back_r.reshape(-1, hidden)), 0)  # [S, d]
        widest = max(local_capacity, unit * self.max_pair_units)
        index = expert_rows_index(capacity, offset, slots, widest)  # [E*G*Cm]
        inverse = token_of_slot(index, groups * slots, index.shape[0])  # [G*S]
        rows = gather_rows(flat, index, inverse).reshape(self.num_experts, groups * widest, hidden)  # [E, G*Cm, d]
        out = self.experts(rows).reshape(-1, hidden)  # [E*G*Cm, d]
        return gather_rows(out, inverse, index)  # [G*S, d]

    def _tiered(self, x_groups, expert_index, expert_prob, per_group, gate_probs, token_ids):
        """Two-tier dispatch -> experts -> combine. -> (y [G, T, d], keep, onehot, remote drops, rerouted)."""
        groups, _, hidden = x_groups.shape
        local_capacity, unit, capacity, offset, slots = self._tier_slots(per_group)
        slot, keep, onehot = assign_tiered_slots(expert_index, capacity, offset, slots)
        rerouted = ops.zeros((), ms.float32)
        if self.reroute:  # a rerouted token's R is its new expert's gate probability (eq. 3)
            slot, keep, destination = self._reroute(slot, keep, onehot, gate_probs, token_ids, capacity, offset,
                                                    slots)
            expert_prob = ops.gather_elements(gate_probs, -1, destination.expand_dims(-1)).squeeze(-1)  # [G, T]
            rerouted = (keep * (destination != expert_index).astype(ms.float32)).sum()
        source = token_of_slot(slot, groups * slots, groups * per_group)  # [G*S]
        flat = gather_rows(x_groups.astype(self.compute_dtype).reshape(-1, hidden), source, slot)  # [G*S, d]
        out = self._tiered_expert_stage(flat, capacity, offset, slots, local_capacity, unit)
        weight = (expert_prob * keep).reshape(-1, 1).astype(out.dtype)  # [G*T, 1]
        y = (gather_rows(out, slot, source) * weight).reshape(groups, per_group, hidden)  # [G, T, d]
        remote_tokens = (onehot * (1.0 - self.local_mask).expand_dims(1)).sum(-1)  # [G, T]
        return y, keep, onehot, ((1.0 - keep) * remote_tokens).sum(), rerouted

    def _expert_stage(self, buffer):
        """buffer [G, E, C, d] -> expert outputs, same shape; capacity split into overlap chunks
        (each chunk's exchange can run while another chunk computes)."""
        groups, num_experts, capacity, hidden = buffer.shape
        if self.overlap_degree == 1:
            return self._experts_on(buffer)
        step = self.capacity_multiple
        chunk = ((capacity + self.overlap_degree - 1) // self.overlap_degree + step - 1) // step * step
        outputs = []
        for start in range(0, capacity, chunk):
            outputs.append(self._experts_on(buffer[:, :, start:start + chunk]))  # [G, E, c, d]
        return ops.concat(outputs, 2)

    def _experts_on(self, part):
        """[G, E, c, d] -> [G, E, c, d] through each expert's FFN (across ranks when distributed)."""
        groups, num_experts, width, hidden = part.shape
        if self.exchange is not None:
            tokens = self.exchange.to_experts(part.reshape(num_experts, width, hidden))  # [E_local, ep*c, d]
            return self.exchange.from_experts(self.experts(tokens)).reshape(part.shape)  # [1, E, c, d]
        if groups == 1:
            return self.experts(part.reshape(num_experts, width, hidden)).reshape(part.shape)  # [1, E, c, d]
        tokens = part.transpose(1, 0, 2, 3).reshape(num_experts, groups * width, hidden)  # [E, G*c, d]
        out = self.experts(tokens).reshape(num_experts, groups, width, hidden)  # [E, G, c, d]
        return out.transpose(1, 0, 2, 3)  # [G, E, c, d]

    def construct(self, x, token_ids, domain_ids):
        batch, seq, hidden = x.shape
        groups = self.token_groups
        per_group = batch * seq // groups
        x_groups = x.reshape(groups, per_group, hidden)  # [G, T, d]
        token_groups = token_ids.reshape(groups, per_group)  # [G, T]
        domains = ops.broadcast_to(domain_ids.expand_dims(1), (batch, seq)).reshape(groups, per_group)  # [G, T]

        expert_index, expert_prob, _, aux_loss, loc_loss, gate_probs = self.router(
            x_groups.astype(ms.float32), token_groups, domains, self.local_mask)
        if self.two_tier:
            y, keep, onehot, dropped_remote, rerouted = self._tiered(x_groups, expert_index, expert_prob,
                                                                     per_group, gate_probs, token_groups)
            expert_load = onehot.sum(1).sum(0)  # [E]
            local_groups = (onehot * self.local_mask.expand_dims(1)).sum(-1).sum(-1)  # [G]
            return (y.reshape(batch, seq, hidden).astype(x.dtype), aux_loss, loc_loss,
                    (expert_load, (1.0 - keep).sum(), local_groups.sum(), dropped_remote,
                     self._by_rank(local_groups), rerouted))
        capacity = self.capacity(per_group)
        slot, keep, onehot = assign_slots(expert_index, self.num_experts, capacity)
        source = token_of_slot(slot, groups * self.num_experts * capacity, groups * per_group)  # [G*E*C]
        buffer = dispatch(x_groups.astype(self.compute_dtype), slot, self.num_experts, capacity,
                          source)  # [G, E, C, d]
        expert_out = self._expert_stage(buffer)  # [G, E, C, d]
        y = combine(expert_out, slot, expert_prob * keep, source)  # [G, T, d]

        expert_load = onehot.sum(1).sum(0)  # [E]
        dropped = (1.0 - keep).sum()
        local_groups = (onehot * self.local_mask.expand_dims(1)).sum(-1).sum(-1)  # [G]
        remote_tokens = (onehot * (1.0 - self.local_mask).expand_dims(1)).sum(-1)  # [G, T]
        dropped_remote = ((1.0 - keep) * remote_tokens).sum()
        return (y.reshape(batch, seq, hidden).astype(x.dtype), aux_loss, loc_loss,
                (expert_load, dropped, local_groups.sum(), dropped_remote, self._by_rank(local_groups),
                 ops.zeros((), ms.float32)))

    def _by_rank(self, per_group):
        """[G] per token group -> [P] per (posed) data-parallel rank slot."""
        return (per_group.expand_dims(1) * self.rank_slots).sum(0)  # [P]
