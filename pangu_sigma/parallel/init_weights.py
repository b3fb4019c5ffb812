"""Layout-independent initialisation: the same seed gives the same full model for any TP / EP / DP.

MindSpore's initializers draw from the global numpy RNG, so under tensor
parallelism every TP rank drew the *same* values for its own shard: the full
matrix was its first shard repeated (docs/parallelism.md asks for the
opposite). Here every random parameter is redrawn from a counter-based
generator keyed by (seed, parameter name) and indexed by the element's
position in the *full* tensor: a rank computes only the elements of its own
slice (no rank materialises a full tensor, let alone the model), and the
single-process model from the same seed holds exactly the gathered slices.

Element i of a tensor with key k: two 64-bit words splitmix64(k + (2i+1)g),
splitmix64(k + (2i+2)g) (g the 64-bit golden ratio) give two uniforms in
(0, 1]; Box-Muller turns them into one standard normal z; the value is
std * z in float32. Which std: `init_std_of` (the model's own initialisers:
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
CHUNK = 1 << 22  # elements drawn per step (bounds the temporaries)

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


def _splitmix64(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_normal(key, flat_index):
    """Standard normals (float64) for elements `flat_index` (uint64 array) of the tensor with `key`."""
    with np.errstate(over="ignore"):
        i = flat_index.astype(np.uint64) * np.uint64(2)
        a = _splitmix64(key + (i + np.uint64(1)) * GOLDEN)
        b = _splitmix64(key + (i + np.uint64(2)) * GOLDEN)
    u1 = ((a >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]
    u2 = (b >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # [0, 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


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
    strides = np.cumprod((full_shape[1:] + (1,))[::-1])[::-1].astype(np.int64)  # row-major, in elements
    key = tensor_key(seed, name)
    size = int(np.prod(local_shape, dtype=np.int64))
    out = np.empty(size, np.float32)
    for start in range(0, size, CHUNK):
        local = np.unravel_index(np.arange(start, min(start + CHUNK, size), dtype=np.int64), local_shape)
        flat = np.zeros(len(local[0]), np.int64)
        for axis, positions in enumerate(local):
            flat += axes[axis][positions] * strides[axis]
        out[start:start + len(flat)] = (std * counter_normal(key, flat.astype(np.uint64))).astype(np.float32)
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
