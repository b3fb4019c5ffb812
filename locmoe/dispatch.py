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
