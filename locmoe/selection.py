"""The top-1 choice with a tie order, shared by routing (eq. 2, locmoe.routers) and by rerouting a
full pair's overflow to a node-local expert (locmoe.dispatch.reroute_to_local)."""
import mindspore as ms
from mindspore import ops

MASKED = -1e9  # below every score and tie order


def top1_index(scores, tie_break=None, allowed=None):
    """The index of the largest score along the last axis: scores [..., E] -> [...] int32.

    tie_break [..., E]: among the entries sharing the largest score, the one with the largest tie_break
    wins (argmax alone would always pick the lowest index). allowed [..., E] bool: only these entries
    compete (a row with none allowed gets an arbitrary index; the caller masks it)."""
    if allowed is not None:
        scores = ops.select(allowed, scores, ops.full_like(scores, MASKED))
    if tie_break is None:
        return ops.argmax(scores, -1).astype(ms.int32)
    tied = scores >= scores.max(-1, keepdims=True)  # [..., E] the maxima (masked entries only where none is allowed)
    return ops.argmax(ops.select(tied, tie_break, ops.full_like(tie_break, MASKED)), -1).astype(ms.int32)
