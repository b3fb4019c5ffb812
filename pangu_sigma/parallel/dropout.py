"""Counter-based dropout: the keep mask is a hash of (seed, draw counter, site, global element position).

Why not nn.Dropout: its masks come from each device's RNG stream, so the TP ranks holding a replicated
tensor (the embedding output, every branch after a row-parallel AllReduce or the MoE combine) draw
different masks, their residual streams and router inputs diverge, and the group-wise exchange then
mixes slices of different dispatch buffers. (On Ascend, MindSpore's dropout seeds are documented to
have no effect either.) Here the mask of an element is a pure function of
  seed     train.seed,
  counter  the draw counter the train step holds (step * micro_batches + micro-batch; not a
           checkpointed value of its own: it is derived from the checkpointed `train_step`),
  site     crc32 of the dropout cell's name in the model (the same on every layout),
  position the element's coordinates in the GLOBAL tensor: its row (the row-major index over all
           axes but the last, with sample = dp_rank * local batch + b and, for the attention
           probabilities, head = tp_rank * local heads + h) and its column (the last axis).
So every TP rank draws the same mask for a replicated tensor, any TP/EP/DP layout draws the single
process's mask for the same token, and a recomputed forward draws the forward's mask.

The hash works on two 16-bit lanes (a, b) held in int32, with Feistel rounds
    (a, b) -> (b, (a + F((b + k_i) mod 2^16)) mod 2^16),
    F(x) = (w div 2^16 + w) mod 2^16,  w = hi * (lo mod 2^15) + lo,  hi, lo = (x * M) div, mod 2^16
(the product hi * lo makes F nonlinear), M < 2^15, so every intermediate is an integer below 2^31:
exact in int32 on any backend, with only Add, Mul, FloorDiv and FloorMod (no bitwise ops, no reliance
on int32 overflow wrapping). A value v in [0, 2^31) is absorbed as a += v mod 2^16, b += v div 2^16
(mod 2^16), then 4 rounds (one per ROUND_KEYS). The seed and site are absorbed on the host, the
counter in the graph (a scalar), then the row index (over [..., 1]) and the column: only these last
4 rounds (~50 int32 elementwise ops) run over the whole tensor. The element is kept when
a * 2^15 + b div 2 (31 bits) >= rate * 2^31; kept values are scaled by 1 / (1 - rate).
"""
import zlib

import mindspore as ms
from mindspore import nn, ops

LANE = 1 << 16
MULTIPLIER = 0x6D2B  # odd and < 2^15: a lane (< 2^16) times it stays below 2^31
ROUND_KEYS = (0x3C6E, 0x7F4A, 0x1B87, 0x5A31)
UNIT = 1 << 31  # the 31-bit output range


def _round_f(x):
    """F(x): x in [0, 2^16) (int or int32 tensor) -> [0, 2^16)."""
    product = x * MULTIPLIER  # < 2^31
    high, low = product // LANE, product % LANE  # < 2^15, < 2^16
    mixed = high * (low % (LANE // 2)) + low  # < 2^30 + 2^16
    return (mixed // LANE + mixed) % LANE


def absorb(state, value):
    """Absorb value in [0, 2^31) (int, or int32 tensor broadcasting against the lanes) into state (a, b)."""
    a, b = state
    a = (a + value % LANE) % LANE
    b = (b + value // LANE) % LANE
    for key in ROUND_KEYS:
        a, b = b, (a + _round_f((b + key) % LANE)) % LANE
    return a, b


def site_id(name):
    """A dropout site's id: crc32 of its cell name in the model, in [0, 2^31)."""
    return zlib.crc32(name.encode("utf-8")) % UNIT


def keep_threshold(rate):
    """Elements whose 31-bit hash is below this are dropped: P(drop) = rate (to 2^-31)."""
    return int(round(rate * UNIT))


def _coordinate(shape, axis, offset):
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return ops.arange(offset, offset + shape[axis], dtype=ms.int32).reshape(tuple(view))  # [1, .., n_axis, .., 1]


def keep_mask(shape, offsets, global_shape, counter, host_state, threshold):
    """bool [shape]: the keep mask of a tensor whose element i sits at offsets + i of a global tensor
    of global_shape (static ints; global_shape[0] may be just the extent this rank reaches: it only
    bounds the row index, which must stay below 2^31).

    counter: int32 scalar tensor (the draw counter); host_state: (a, b) after absorbing seed and site."""
    rows = 1
    for size in global_shape[:-1]:
        rows *= size
    if rows >= UNIT or global_shape[-1] >= UNIT:
        raise ValueError(f"dropout over a global tensor {global_shape}: more than 2^31 rows or columns")
    state = absorb(host_state, ops.cast(counter, ms.int32))  # scalars
    row, stride = 0, 1
    for axis in range(len(shape) - 2, -1, -1):  # row-major index over the leading axes, [.., 1]
        row = row + _coordinate(shape, axis, offsets[axis]) * stride
        stride *= global_shape[axis]
    a, b = absorb(absorb(state, row), _coordinate(shape, len(shape) - 1, offsets[-1]))  # [shape]
    return a * (LANE // 2) + b // 2 >= threshold  # [shape]


class HashDropout(nn.Cell):
    """Dropout whose mask is keep_mask(...) (see the module docstring); identity in eval mode or at rate 0.

    head_offset, head_parts: the global index of this rank's first entry on axis 1 and how many ranks
    split that axis (the attention probabilities' heads: tp_rank * local heads, tp); 0, 1 for the
    replicated [B, S, d] tensors. x has at least 2 axes. The seed, the draw
    counter and the site are set by `attach_draw_counter` (the train step), the data-parallel rank by
    `set_data_parallel_rank` (the model); training with rate > 0 without a counter raises.
    """

    def __init__(self, rate, head_offset=0, head_parts=1):
        super().__init__()
        self.rate = float(rate)
        self.threshold = keep_threshold(self.rate)
        self.scale = 1.0 / (1.0 - self.rate)
        self.head_offset = int(head_offset)
        self.head_parts = int(head_parts)
        self.dp_rank = 0
        self.host_state = (0, 0)
        # Not registered as this cell's parameter: the counter belongs to the train step (the top cell),
        # so the model's parameters (and checkpoint names) stay those of the model.
        object.__setattr__(self, "counter", None)

    def bind(self, counter, seed, site):
        object.__setattr__(self, "counter", counter)
        self.host_state = absorb(absorb((0, 0), seed % UNIT), site)

    def construct(self, x):
        if not self.training or self.rate == 0.0:
            return x
        if self.counter is None:
            raise RuntimeError("HashDropout in training mode has no draw counter: build the model's train step "
                               "(pangu_sigma.training.train_step.TrainStep) or call attach_draw_counter")
        shape = x.shape
        offsets = (self.dp_rank * shape[0], self.head_offset) + (0,) * (len(shape) - 2)
        global_shape = (shape[0] * (self.dp_rank + 1), shape[1] * self.head_parts) + shape[2:]
        keep = keep_mask(shape, offsets, global_shape, self.counter, self.host_state, self.threshold)
        # select: its backward keeps the 1-byte bool mask (plan's D = 1 B per element), not a float copy
        return ops.select(keep, x * self.scale, ops.zeros_like(x))


def set_data_parallel_rank(net, parallel):
    """Give every HashDropout under `net` this process's data-parallel rank (0 in one process)."""
    dp_rank = parallel.topology.dp_rank() if parallel is not None and parallel.distributed else 0
    for _, cell in net.cells_and_names():
        if isinstance(cell, HashDropout):
            cell.dp_rank = dp_rank


def attach_draw_counter(net, counter, seed):
    """Bind every HashDropout under `net` to the train step's int32 draw counter Parameter, the seed and
    its site (crc32 of the cell's name under `net`). Returns the {site name: id} map; a crc32
    collision between two sites raises."""
    sites = {}
    for name, cell in net.cells_and_names():
        if isinstance(cell, HashDropout):
            sites[name] = site_id(name)
            cell.bind(counter, seed, sites[name])
    if len(set(sites.values())) != len(sites):
        raise RuntimeError(f"two dropout sites hash to the same id: {sites}")
    return sites
