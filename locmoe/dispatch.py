"""Index-based dispatch and combine (no dense [T, E, C] one-hot tensors).

Tokens are placed into a [G, E, C, d] buffer by position within their
expert, first come first served inside each token group; a token whose
position is >= C is dropped: it gets no buffer slot and contributes zero from
the MoE branch (the residual connection carries it). Both directions are
row gathers. Every token occupies at most one slot, so each gather reads a
source row at most once and its exact gradient is the gather by the inverse
map (a custom bprop) instead of the generic scatter-add.
"""
import mindspore as ms
from mindspore import nn, ops, Tensor

from locmoe.selection import top1_index


def assign_slots(expert_index, num_experts, capacity):
    """Buffer slot of every token.

    expert_index [G, T] int32 -> (slot [G*T] int32 into the flattened
    [G, E, C] buffer, or G*E*C for a dropped token; keep [G, T] float32;
    onehot [G, T, E] float32).
    """
    groups, tokens = expert_index.shape
    onehot = ops.one_hot(expert_index, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))  # [G, T, E]
    position = ((ops.cumsum(onehot, 1) - 1.0) * onehot).sum(-1)  # [G, T], rank of the token in its expert's queue
    keep = (position < capacity).astype(ms.float32)  # [G, T]
    group_base = (ops.arange(groups, dtype=ms.int32) * (num_experts * capacity)).expand_dims(1)  # [G, 1]
    slot = group_base + expert_index * capacity + position.astype(ms.int32)  # [G, T]
    dropped_slot = groups * num_experts * capacity
    slot = ops.select(keep > 0, slot, ops.full_like(slot, dropped_slot))  # [G, T]
    return slot.reshape(-1), keep, onehot


def token_of_slot(slot, num_slots, num_tokens):
    """Inverse map: for each of num_slots buffer slots the token in it, or num_tokens (a zero row) if empty."""
    token_ids_plus_one = ops.arange(1, num_tokens + 1, dtype=ms.int32)  # [N]
    filled = ops.scatter_nd(slot.expand_dims(-1), token_ids_plus_one, (num_slots + 1,))[:num_slots]  # [G*E*C]
    filled = ops.stop_gradient(filled)
    return ops.select(filled > 0, filled - 1, ops.full_like(filled, num_tokens))


def _with_zero_row(rows):
    return ops.concat((rows, ops.zeros((1, rows.shape[1]), rows.dtype)), 0)  # [N + 1, d], last row = zeros


class _InjectiveGather(nn.Cell):
    """out = [src; 0][index]. index reads each src row at most once and inverse is its
    inverse map (inverse[i] = the out row reading src row i, or len(out) if none), so
    d src = [d out; 0][inverse] exactly."""

    def construct(self, src, index, inverse):
        return ops.gather(_with_zero_row(src), index, 0)

    def bprop(self, src, index, inverse, out, dout):
        return ops.gather(_with_zero_row(dout), inverse, 0), ops.zeros_like(index), ops.zeros_like(inverse)


_GATHER = _InjectiveGather()


def dispatch(x, slot, num_experts, capacity, source=None):
    """x [G, T, d] -> buffer [G, E, C, d]; empty slots are zero.

    source: token_of_slot(slot, ...) if the caller already has it (it is shared with combine)."""
    groups, tokens, hidden = x.shape
    num_slots = groups * num_experts * capacity
    if source is None:
        source = token_of_slot(slot, num_slots, groups * tokens)  # [G*E*C]
    buffer = _GATHER(x.reshape(groups * tokens, hidden), source, slot)  # [G*E*C, d]
    return buffer.reshape(groups, num_experts, capacity, hidden)  # [G, E, C, d]


def combine(buffer, slot, weight, source=None):
    """buffer [G, E, C, d], weight [G, T] (gate prob * keep) -> y [G, T, d] = weight * buffer[slot]."""
    groups, num_experts, capacity, hidden = buffer.shape
    tokens = weight.shape[1]
    num_slots = groups * num_experts * capacity
    if source is None:
        source = token_of_slot(slot, num_slots, groups * tokens)  # [G*E*C]
    gathered = _GATHER(buffer.reshape(num_slots, hidden), slot, source)  # [G*T, d], dropped -> zeros
    return gathered.reshape(groups, tokens, hidden) * weight.expand_dims(-1).astype(buffer.dtype)  # [G, T, d]


# ---- two tiers (node-local experts, remote experts) ---------------------------------
def gather_rows(src, index, inverse):
    """[src; 0][index] with the exact inverse-map gradient (index reads each row at most once)."""
    return _GATHER(src, index, inverse)


def tier_layout(local_mask, local_capacity, unit, units):
    """Capacity and offset of every (group, expert) pair in the group's flat buffer.

    local_mask [G, E] (1 = expert on the group's node); units [G, E] tier-2 units of each pair
    (locmoe.tiers.unit_table: 0 on the group's node and for experts it never sends to). A group's
    buffer holds its node-local experts first (by id, local_capacity rows each), then its remote
    experts' units (by id, unit rows each). -> (capacity [G, E], offset [G, E]) float32.
    """
    capacity = local_mask * local_capacity + units * unit  # [G, E]
    local_before = ops.cumsum(local_mask, 1) - local_mask  # [G, E] local experts with a lower id
    units_before = ops.cumsum(units, 1) - units  # [G, E] remote units of lower ids
    num_local = local_mask.sum(1, keepdims=True)  # [G, 1]
    offset = local_mask * local_before * local_capacity + (1.0 - local_mask) * (num_local * local_capacity
                                                                                + units_before * unit)
    return capacity, offset


def assign_tiered_slots(expert_index, capacity, offset, slots_per_group):
    """Like assign_slots, with a capacity and buffer offset per (group, expert) pair.

    expert_index [G, T]; capacity, offset [G, E] (tier_layout) -> (slot [G*T] into the
    flattened [G, S] buffer, or G*S for a dropped token; keep [G, T]; onehot [G, T, E]).
    """
    groups, tokens = expert_index.shape
    num_experts = capacity.shape[1]
    onehot = ops.one_hot(expert_index, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))  # [G, T, E]
    position = ((ops.cumsum(onehot, 1) - 1.0) * onehot).sum(-1)  # [G, T]
    token_capacity = (onehot * capacity.expand_dims(1)).sum(-1)  # [G, T]
    token_offset = (onehot * offset.expand_dims(1)).sum(-1)  # [G, T]
    keep = (position < token_capacity).astype(ms.float32)  # [G, T]
    group_base = (ops.arange(groups, dtype=ms.int32) * slots_per_group).expand_dims(1)  # [G, 1]
    slot = group_base + (token_offset + position).astype(ms.int32)  # [G, T]
    slot = ops.select(keep > 0, slot, ops.full_like(slot, groups * slots_per_group))
    return slot.reshape(-1), keep, onehot


def expert_rows_index(capacity, offset, slots_per_group, max_capacity):
    """For the single-process expert stage: row r of expert e's [G * max_capacity] input is
    flat slot g * S + offset[g, e] + j (r = g * max_capacity + j) when j < capacity[g, e],
    else the zero row G * S. -> index [E * G * max_capacity] int32."""
    groups, num_experts = capacity.shape
    j = ops.arange(max_capacity, dtype=ms.float32).reshape(1, 1, max_capacity)  # [1, 1, Cm]
    base = (ops.arange(groups, dtype=ms.float32) * slots_per_group).reshape(groups, 1, 1)  # [G, 1, 1]
    index = base + offset.expand_dims(-1) + j  # [G, E, Cm]
    valid = j < capacity.expand_dims(-1)  # [G, E, Cm]
    index = ops.select(valid, index, ops.full_like(index, groups * slots_per_group))
    return index.transpose(1, 0, 2).reshape(-1).astype(ms.int32)  # [E*G*Cm]


def reroute_to_local(slot, keep, onehot, preference, tie_break, local_mask, capacity, offset, slots_per_group,
                     passes):
    """Beyond the paper (moe.reroute_overflow): the tokens assign_tiered_slots dropped try their node-local
    experts, best first, instead of being dropped.

    Pass k (k < passes = n_l): every token still without a slot picks, among the node-local experts it has not
    tried and is allowed (preference > 0; its routed expert excluded), the one of largest preference (ties:
    largest tie_break), and gets the next free slot of that expert in token order, if one is left. A pass's
    tokens queue behind the slots already filled, so a token routed to a local expert never loses its slot to
    a rerouted one. After n_l passes a token is dropped only if every local expert it may use is full.

    slot [G*T], keep [G, T], onehot [G, T, E] (assign_tiered_slots); preference [G, T, E] (the gate
    probabilities, 0 where level 1 forbids); tie_break [G, T, E]; local_mask [G, E]; capacity, offset [G, E]
    (tier_layout). -> (slot [G*T], keep [G, T], destination [G, T] int32: the expert whose slot the token holds,
    its routed expert if it kept or lost that one)."""
    groups, tokens, num_experts = onehot.shape
    occupancy = ops.minimum(onehot.sum(1), capacity)  # [G, E] slots filled by the routed tokens
    candidates = local_mask.expand_dims(1) * (preference > 0).astype(ms.float32) * (1.0 - onehot)  # [G, T, E]
    destination = ops.argmax(onehot, -1).astype(ms.int32)  # [G, T]
    group_base = (ops.arange(groups, dtype=ms.int32) * slots_per_group).expand_dims(1)  # [G, 1]
    slot = slot.reshape(groups, tokens)  # [G, T]
    for _ in range(passes):
        open_ = candidates * (1.0 - keep).expand_dims(-1)  # [G, T, E] untried local experts of waiting tokens
        pick = top1_index(preference, tie_break, open_ > 0)  # [G, T] the best untried local expert
        trying = (open_.sum(-1) > 0).astype(ms.float32)  # [G, T]
        chosen = ops.one_hot(pick, num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32)) \
            * trying.expand_dims(-1)  # [G, T, E]
        queue = ((ops.cumsum(chosen, 1) - 1.0) * chosen).sum(-1)  # [G, T] place among this pass's tokens
        position = queue + (chosen * occupancy.expand_dims(1)).sum(-1)  # [G, T]
        got = trying * (position < (chosen * capacity.expand_dims(1)).sum(-1)).astype(ms.float32)  # [G, T]
        new_slot = group_base + ((chosen * offset.expand_dims(1)).sum(-1) + position).astype(ms.int32)  # [G, T]
        slot = ops.select(got > 0, new_slot, slot)
        destination = ops.select(got > 0, pick, destination)
        keep = keep + got
        occupancy = occupancy + (chosen * got.expand_dims(-1)).sum(1)  # [G, E]
        candidates = candidates * (1.0 - chosen)  # tried
    return slot.reshape(-1), keep, destination
