"""Layout-independent initialisation: the same seed gives the same full model for any TP / EP / DP.

MindSpore's initializers draw from the global numpy RNG, so under tensor
parallelism every TP rank drew the *same* values for its own shard: the full
matrix was its first shard repeated (docs/parallelism.md asks for the
opposite). Here every random parameter is redrawn from a counter-based
generator keyed by (seed, parameter name) and indexed by the element's
position in the *full* tensor: a rank computes only the elements of its own
slice (no rank materialises a full tensor, let alone the model), and the
single-process model from the same seed holds exactly the gathered slices.

Elements 2p and 2p+1 of a tensor with key k: one 64-bit word
w = splitmix64(k + (p+1)g) (g the 64-bit golden ratio); its top 24 bits give
u1 in (0, 1], its bottom 24 bits u2 in [0, 1); Box-Muller in float32 gives
the pair's two normals sqrt(-2 ln u1) (cos, sin)(2 pi u2) (|z| <= 5.8), and
the values are std * z. Vectorised over a slice in cache-sized
chunks, in-place numpy operations (tools/bench_init.py measures it: ~1.6 B
values per 128N rank); values depend only on (seed, name, full index), so they
are the same on every layout. float32 log/cos are numpy's vectorised kernels:
ranks on one kind of CPU agree bitwise, other CPUs may differ in the last bit. Which std: `init_std_of` (the model's own initialisers:
model.param_init_std, and param_init_std / sqrt(2 * num_layers) for the
projections that write into the residual stream, pangu_sigma/model/blocks.py
residual_init_std). Constant parameters (LayerNorm gamma/beta, biases) and
non-trainable tables (hash / RRE routers) are already the same everywhere and
are left as they are; any other parameter is an error naming it.

Slices (pangu_sigma.parallel.reshard's layouts): TP-sharded parameters by their
TPShard (`tp_shard_specs`), expert tensors [E, d, h] / [E, h, d] by ep_rank on
axis 0 and tp_rank on the inner axis (h).
"""
import hashlib
import math

import numpy as np
import mindspore as ms

from pangu_sigma.parallel.reshard import EXPERT_INNER_AXIS
from pangu_sigma.parallel.tp_layers import tp_shard_specs

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1, MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finaliser
CHUNK = 1 << 14  # elements drawn per step: the uint64 / float32 temporaries stay in the CPU cache
BITS24 = np.uint64(0xFFFFFF)
TWO_PI_2_24 = np.float32(2.0 * math.pi * 2.0 ** -24)  # 2 pi u2 from the 24-bit integer

BASE_STD_SUFFIXES = ("embedding.token_table", "embedding.position_table", "top_query_table", "q_proj.weight",
                     "kv_proj.weight", "w_in.weight", "gate.weight", "experts.w_in")
RESIDUAL_STD_SUFFIXES = ("out_proj.weight", "w_out.weight", "experts.w_out")
CONSTANT_SUFFIXES = (".gamma", ".beta", ".bias")


def init_std_of(name, model_cfg):
    """Normal std of parameter `name`, or None for a constant-initialised one; ValueError if unknown."""
    if name.endswith(CONSTANT_SUFFIXES):
        return None
    if name.endswith(RESIDUAL_STD_SUFFIXES):
        return model_cfg.param_init_std / math.sqrt(2.0 * model_cfg.num_layers)
    if name.endswith(BASE_STD_SUFFIXES):
        return model_cfg.param_init_std
    raise ValueError(f"{name}: no layout-independent initialisation rule; add it to "
                     "pangu_sigma/parallel/init_weights.py (init_std_of)")


def tensor_key(seed, name):
    """64-bit key of one parameter: stable across processes and platforms."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode("utf-8")).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def pair_normals(key, pair_index, std=1.0):
    """(std z_cos, std z_sin) float32 for the element pairs `pair_index` (integer array): Box-Muller on the
    two 24-bit halves of splitmix64(key + (p+1) g); elements 2p and 2p+1 of the tensor take them."""
    word = np.array(pair_index, dtype=np.uint64)  # a fresh array, mixed in place below
    scratch = np.empty_like(word)
    word += np.uint64(1)
    word *= GOLDEN
    word += key
    for shift, factor in ((30, MIX1), (27, MIX2), (31, None)):  # splitmix64's finaliser
        np.right_shift(word, np.uint64(shift), out=scratch)
        word ^= scratch
        if factor is not None:
            word *= factor
    np.right_shift(word, np.uint64(40), out=scratch)
    radius = scratch.view(np.int64).astype(np.float32)  # top 24 bits (int64 converts faster than uint64)
    radius += np.float32(1.0)
    radius *= np.float32(2.0 ** -24)  # u1 in (0, 1]
    np.log(radius, out=radius)
    radius *= np.float32(-2.0 * std * std)
    np.sqrt(radius, out=radius)  # std sqrt(-2 ln u1)
    word &= BITS24
    angle = word.view(np.int64).astype(np.float32)
    angle *= TWO_PI_2_24  # 2 pi u2
    cos_part = np.cos(angle)
    cos_part *= radius
    np.sin(angle, out=angle)
    angle *= radius
    return cos_part, angle


def counter_normal(key, flat_index, std=1.0):
    """float32 std * standard normals for elements `flat_index` (integer array) of the tensor with `key`."""
    flat = np.asarray(flat_index, dtype=np.int64)
    cos_part, sin_part = pair_normals(key, flat >> 1, std)
    return np.where(flat & 1, sin_part, cos_part)


def _whole_pairs(rows, inner):
    """True when every local row holds whole element pairs (2p, 2p+1) side by side: then draw_slice draws
    each pair once (half the hashing, log and sqrt)."""
    return (len(inner) % 2 == 0 and not (rows % 2).any() and not (inner[0::2] % 2).any()
            and np.array_equal(inner[1::2], inner[0::2] + 1))


def _tp_axis_map(spec, local_size, tp, tp_rank):
    """Full indices of the local positions 0..local_size-1 of a TPShard axis."""
    piece = local_size // spec.parts  # per fused block on this rank
    block = piece * tp  # one fused block in the full tensor
    j = np.arange(local_size, dtype=np.int64)
    return (j // piece) * block + tp_rank * piece + j % piece


def slice_layout(name, local_shape, specs, topology):
    """(full_shape, [per-axis index arrays]) of this rank's slice of parameter `name`."""
    axes = [np.arange(n, dtype=np.int64) for n in local_shape]
    full = list(local_shape)
    if topology is None:
        return tuple(full), axes
    tp, tp_rank = topology.tp, topology.tp_rank()
    if name in specs:
        spec = specs[name]
        axes[spec.dim] = _tp_axis_map(spec, local_shape[spec.dim], tp, tp_rank)
        full[spec.dim] = local_shape[spec.dim] * tp
        return tuple(full), axes
    inner = next((axis for key, axis in EXPERT_INNER_AXIS.items() if key in name), None)
    if inner is not None and len(local_shape) == 3:
        if topology.ep > 1:
            if local_shape[0] * topology.ep != topology.num_experts:
                raise ValueError(f"{name}: {local_shape[0]} local experts x ep {topology.ep} != "
                                 f"{topology.num_experts} experts")
            axes[0] = axes[0] + topology.ep_rank() * local_shape[0]
            full[0] = topology.num_experts
        if tp > 1:  # locmoe.layer.MoELayer splits the expert inner width over TP
            axes[inner] = axes[inner] + tp_rank * local_shape[inner]
            full[inner] = local_shape[inner] * tp
    return tuple(full), axes


def draw_slice(seed, name, std, full_shape, axes):
    """float32 array of the local slice: std * z at each element's full-tensor position."""
    local_shape = tuple(len(a) for a in axes)
    strides = np.cumprod((tuple(full_shape[1:]) + (1,))[::-1])[::-1].astype(np.int64)  # row-major, in elements
    key = tensor_key(seed, name)
    rows = np.zeros(1, np.int64)  # full offset of each local row (all axes but the last) # [R]
    for axis, stride in zip(axes[:-1], strides[:-1]):
        rows = (rows[:, None] + np.asarray(axis, np.int64)[None, :] * stride).reshape(-1)
    inner = np.asarray(axes[-1], np.int64) * strides[-1]  # [W]
    out = np.empty((len(rows), len(inner)), np.float32)  # [R, W]
    if _whole_pairs(rows, inner):
        pairs, targets = (inner[0::2] >> 1), (out[:, 0::2], out[:, 1::2])  # [W/2]; [R, W/2] views of out
        rows = rows >> 1
    else:
        pairs, targets = inner, (out,)
    width = len(pairs)
    step_rows, step_cols = max(1, CHUNK // max(width, 1)), min(width, CHUNK) or 1
    for r0 in range(0, len(rows), step_rows):
        for c0 in range(0, width, step_cols):
            index = rows[r0:r0 + step_rows, None] + pairs[None, c0:c0 + step_cols]  # [r, w]
            block = (slice(r0, r0 + step_rows), slice(c0, c0 + step_cols))
            if len(targets) == 2:
                targets[0][block], targets[1][block] = pair_normals(key, index, std)
            else:
                out[block] = counter_normal(key, index, std)
    return out.reshape(local_shape)


def initialise(net, seed, model_cfg, topology=None):
    """Redraw every random parameter of `net` (this rank's slices) from `seed`; returns the names redrawn.

    topology: the Topology of a distributed run (None for a single process holding
    full tensors). `net` may be the model or PanguSigmaWithLoss (names differ by the
    "model." prefix, which the key includes, so build both sides alike).
    """
    specs = tp_shard_specs(net) if topology is not None else {}
    redrawn = []
    for param in net.get_parameters():
        if not param.requires_grad:
            continue  # router tables: fixed functions of the data / table_seed, identical on every rank
        std = init_std_of(param.name, model_cfg)
        if std is None:
            continue
        full_shape, axes = slice_layout(param.name, tuple(param.shape), specs, topology)
        values = draw_slice(seed, param.name, std, full_shape, axes)
        param.set_data(ms.Tensor(values, param.dtype))
        redrawn.append(param.name)
    return redrawn
