"""ZeRO-1 moment slices <-> a rank's TP/EP piece of an Adam moment, by name and layout (checkpoint conversion).

parallel.optimizer_shard (pangu_sigma.parallel.zero) keeps on rank r only slice k of the moments
of r's TP/EP piece of each parameter, k = r's position in the parameter's sorted replica group
(grad_reduce.replica_group: every rank for replicated parameters, the DP group for TP-sharded
dense ones, the expert-DP group for experts). They are saved as zero_m.<name> / zero_v.<name>
(float32 [c], c = ceil(piece size / R), zero padding at the end of the last slices); the
unsharded optimizer saves the piece itself as adam_m.<name> / adam_v.<name>, the name every
full-layout checkpoint uses. Which parameters are TP-sharded is read from their names
(reshard.tp_spec_of), as for the parameters themselves.
"""
from pangu_sigma.parallel import reshard
from pangu_sigma.parallel.grad_reduce import replica_group
from pangu_sigma.parallel.zero import shard_moment, slice_layout, unshard_moment

TO_ADAM = dict(zip(reshard.SHARDED_MOMENT_PREFIXES, reshard.OPTIMIZER_PREFIXES))
TO_ZERO = dict(zip(reshard.OPTIMIZER_PREFIXES, reshard.SHARDED_MOMENT_PREFIXES))


def is_sharded_moment(name):
    return name.startswith(reshard.SHARDED_MOMENT_PREFIXES)


def adam_name(name):
    """zero_m.X -> adam_m.X (the full-layout name of a moment); any other name unchanged."""
    for prefix, other in TO_ADAM.items():
        if name.startswith(prefix):
            return other + name[len(prefix):]
    return name


def zero_name(name):
    """adam_m.X -> zero_m.X (the ZeRO-1 slice's name); any other name unchanged."""
    for prefix, other in TO_ZERO.items():
        if name.startswith(prefix):
            return other + name[len(prefix):]
    return name


def group_of(name, layout, rank):
    """The sorted replica group over which rank `rank` of layout shares the moments of `name`'s parameter."""
    base = reshard.model_name_of(name)
    topology = reshard.layout_topology(layout, rank)
    return sorted(replica_group(base, topology, layout["tp"] > 1 and reshard.tp_spec_of(base) is not None))


def slice_of(name, piece, layout, rank):
    """Rank `rank`'s ZeRO-1 slice [c] of its TP/EP piece `piece` of a moment (numpy)."""
    group = group_of(name, layout, rank)
    return shard_moment(piece, len(group), group.index(rank))


def piece_from_slices(name, read, shape, layout, holder):
    """The TP/EP piece (of `shape`) of a moment held by rank `holder`, from the slices of its replica group.

    read(rank) -> that rank's stored slice. Raises ValueError when a slice's length is not the
    ceil(size / R) the layout gives (a checkpoint of another layout or model).
    """
    group = group_of(name, layout, holder)
    size = 1
    for extent in shape:
        size *= int(extent)
    length = slice_layout(size, len(group), 0)[0]
    slices = []
    for rank in group:
        piece = read(rank)
        if piece.ndim != 1 or piece.shape[0] != length:
            raise ValueError(f"{zero_name(name)} of rank {rank} has shape {tuple(piece.shape)}; the layout gives "
                             f"slices of ({length},) for a piece of shape {tuple(shape)} over {len(group)} ranks")
        slices.append(piece)
    return unshard_moment(slices, tuple(shape))
