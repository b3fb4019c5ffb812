"""Full (single-process) parameters <-> one rank's shards of a parallel model.

Layouts are data-driven:
- TP-sharded parameters: the TPShard recorded by their layer (`tp_shard_specs(net)`).
- Experts: names containing `experts.w_in` ([E, d, h]) or `experts.w_out` ([E, h, d]):
  axis 0 is split by ep_rank into E/ep experts (Topology.experts_of_rank), and the
  inner axis h (axis 2 of w_in, axis 1 of w_out) by tp_rank into h/tp when the
  parallel model's shape says so.
- Everything else is replicated (copied).
Arrays are numpy; names are the parameters' current names (a model wrapped in
PanguSigmaWithLoss has the prefix "model.", so build both sides alike).
"""
import numpy as np

from pangu_sigma.parallel.tp_layers import TPShard, tp_shard_specs

EXPERT_INNER_AXIS = {"experts.w_in": 2, "experts.w_out": 1}


def _expert_kind(name):
    for key, axis in EXPERT_INNER_AXIS.items():
        if key in name:
            return key, axis
    return None, None


def _expert_layout(name, local_shape, full_shape, topology):
    """(ep_split, tp_split) for an expert parameter, checked against the shapes."""
    _, inner = _expert_kind(name)
    if tuple(local_shape) == tuple(full_shape) and (len(full_shape) != 3 or topology.ep == 1):
        return False, False  # nothing split (e.g. a dense stand-in named like the experts)
    if len(full_shape) != 3 or len(local_shape) != 3:
        raise ValueError(f"{name}: expert parameters must be [E, d, h] / [E, h, d]; got full shape "
                         f"{tuple(full_shape)}, parallel shape {tuple(local_shape)}")
    experts, h = full_shape[0], full_shape[inner]
    if experts % topology.ep or local_shape[0] != experts // topology.ep:
        raise ValueError(f"{name}: the parallel model holds {local_shape[0]} experts; expected "
                         f"num_experts/ep = {experts}/{topology.ep}")
    if local_shape[inner] == h:
        tp_split = False
    elif topology.tp > 1 and h % topology.tp == 0 and local_shape[inner] == h // topology.tp:
        tp_split = True
    else:
        raise ValueError(f"{name}: inner width {local_shape[inner]} of the parallel model is neither "
                         f"the full {h} nor {h}/tp (tp={topology.tp})")
    other = [a for a in range(3) if a not in (0, inner)][0]
    if local_shape[other] != full_shape[other]:
        raise ValueError(f"{name}: axis {other} differs: parallel {local_shape[other]}, full {full_shape[other]}")
    return topology.ep > 1, tp_split


def _expert_slice(name, full, ep_split, tp_split, topology):
    _, inner = _expert_kind(name)
    out = full
    if ep_split:
        out = np.split(out, topology.ep, axis=0)[topology.ep_rank()]
    if tp_split:
        out = np.split(out, topology.tp, axis=inner)[topology.tp_rank()]
    return out


def _net_shapes(net):
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


def shard_full_params(full, net, topology):
    """{name: full numpy array} -> {name: numpy array} for rank `topology.rank` of `net`.

    `net` is the parallel model (parameters with shard shapes) built for this
    topology. Raises ValueError on missing/unexpected names or wrong shapes.
    """
    shapes = _net_shapes(net)
    specs = tp_shard_specs(net)
    missing, extra = sorted(set(shapes) - set(full)), sorted(set(full) - set(shapes))
    if missing or extra:
        raise ValueError(f"parameter names differ: missing from the full dict {missing[:5]}, "
                         f"not in the parallel model {extra[:5]}")
    out = {}
    for name, want in shapes.items():
        array = np.asarray(full[name])
        if name in specs:
            spec = specs[name]
            expected = spec.local_shape(array.shape, topology.tp)
            if expected != want:
                raise ValueError(f"{name}: full shape {array.shape} split by {spec} over tp={topology.tp} "
                                 f"gives {expected}, but the parallel model has {want}")
            piece = spec.shard(array, topology.tp, topology.tp_rank())
        elif _expert_kind(name)[0] is not None:
            ep_split, tp_split = _expert_layout(name, want, array.shape, topology)
            piece = _expert_slice(name, array, ep_split, tp_split, topology)
        else:
            if array.shape != want:
                raise ValueError(f"{name}: replicated parameter has full shape {array.shape} but the "
                                 f"parallel model has {want} (is the model built for tp={topology.tp}?)")
            piece = array
        out[name] = np.ascontiguousarray(piece)
    return out


def _specs_of(specs):
    if isinstance(specs, dict):
        return specs
    return tp_shard_specs(specs)  # a Cell


def _check_topologies(per_rank, topologies):
    if len(per_rank) != len(topologies):
        raise ValueError(f"{len(per_rank)} parameter dicts but {len(topologies)} topologies")
    if not topologies:
        raise ValueError("no ranks given")
    first = topologies[0]
    for t in topologies:
        if (t.world_size, t.tp, t.ep, t.num_experts) != (first.world_size, first.tp, first.ep, first.num_experts):
            raise ValueError(f"topologies disagree: {t} vs {first}")
    return first


def _rank_with(topologies, **coords):
    """Index of the first topology whose tp_rank/ep_rank match `coords`."""
    for i, t in enumerate(topologies):
        if all(getattr(t, f"{k}_rank")() == v for k, v in coords.items()):
            return i
    raise ValueError(f"no rank given with {coords}")


def gather_full_params(per_rank, topologies, specs, full_shapes=None, replica_atol=None):
    """Inverse of shard_full_params: per-rank {name: array} dicts -> {name: full array}.

    per_rank[i] belongs to the rank topologies[i].rank (one TP group per EP rank
    at least must be present). specs: the TP layouts, a dict from tp_shard_specs
    or the parallel net itself. full_shapes: optional {name: shape}; decides
    whether expert inner axes are TP-split (default: split iff tp > 1, the
    MoELayer layout) and checks the result. replica_atol: if given, replicated
    parameters must agree across ranks within it (else the first rank's copy is used).
    """
    topo = _check_topologies(per_rank, topologies)
    specs = _specs_of(specs)
    names = list(per_rank[0])
    for i, d in enumerate(per_rank):
        if set(d) != set(names):
            raise ValueError(f"rank {topologies[i].rank} has different parameter names than rank "
                             f"{topologies[0].rank}")
    out = {}
    for name in names:
        if name in specs:
            pieces = [per_rank[_rank_with(topologies, tp=t)][name] for t in range(topo.tp)]
            full = specs[name].unshard([np.asarray(p) for p in pieces])
        elif _expert_kind(name)[0] is not None:
            local_shape = np.shape(per_rank[0][name])
            _, inner = _expert_kind(name)
            if full_shapes is not None:
                ep_split, tp_split = _expert_layout(name, local_shape, full_shapes[name], topo)
            elif len(local_shape) == 3:
                ep_split, tp_split = topo.ep > 1, topo.tp > 1
            else:
                ep_split = tp_split = False
            tps = range(topo.tp) if tp_split else [None]
            eps = range(topo.ep) if ep_split else [None]
            rows = []
            for e in eps:
                parts = []
                for t in tps:
                    coords = {k: v for k, v in (("ep", e), ("tp", t)) if v is not None}
                    parts.append(np.asarray(per_rank[_rank_with(topologies, **coords)][name]))
                rows.append(np.concatenate(parts, axis=inner) if tp_split else parts[0])
            full = np.concatenate(rows, axis=0) if ep_split else rows[0]
        else:
            full = np.asarray(per_rank[0][name])
            if replica_atol is not None:
                for i, d in enumerate(per_rank):
                    if not np.allclose(d[name], full, rtol=0, atol=replica_atol):
                        diff = np.abs(np.asarray(d[name]) - full).max()
                        raise ValueError(f"{name}: replica on rank {topologies[i].rank} differs from rank "
                                         f"{topologies[0].rank} by {diff:.3g} > {replica_atol}")
        if full_shapes is not None and tuple(full.shape) != tuple(full_shapes[name]):
            raise ValueError(f"{name}: gathered shape {full.shape} != expected {tuple(full_shapes[name])}")
        out[name] = full
    return out


__all__ = ["TPShard", "gather_full_params", "shard_full_params", "tp_shard_specs"]


# ---- one parameter at a time, by name (checkpoint conversion) ---------------------
# The TP layers' layouts by parameter name (the TPShard each layer lists in its
# tp_param_specs; tests/workers/checkpoint_worker.py checks this table against
# tp_shard_specs of a real TP model). Dense FFN weights end in ".weight"/".bias";
# the experts' (experts.w_in / experts.w_out) are handled by the expert rule.
TP_SPECS_BY_SUFFIX = {
    "embedding.token_table": TPShard(0),
    "attn.q_proj.weight": TPShard(1), "attn.q_proj.bias": TPShard(0),
    "attn.kv_proj.weight": TPShard(1, 2), "attn.kv_proj.bias": TPShard(0, 2),
    "attn.out_proj.weight": TPShard(0),
    "ffn.w_in.weight": TPShard(1), "ffn.w_in.bias": TPShard(0),
    "ffn.w_out.weight": TPShard(0),
}
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")  # AdamWeightDecay moments: laid out like their parameter
# ZeRO-1 moments (pangu_sigma.parallel.zero): each rank's flat 1/R slice of its shard's moment
SHARDED_MOMENT_PREFIXES = ("zero_m.", "zero_v.")


def model_name_of(name):
    """The model parameter a state entry follows (a moment's parameter, or its ZeRO-1 slice's), or name itself."""
    for prefix in OPTIMIZER_PREFIXES + SHARDED_MOMENT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def tp_spec_of(name):
    """TPShard of a (model or moment) parameter name under TP > 1, or None (not TP-sharded)."""
    base = model_name_of(name)
    for suffix, spec in TP_SPECS_BY_SUFFIX.items():
        if base.endswith(suffix):
            return spec
    return None


def layout_topology(layout, rank):
    """The Topology of rank `rank` of a layout dict."""
    from locmoe.topology import Topology

    return Topology(world_size=layout["world_size"], tp=layout["tp"], ep=layout["ep"],
                    num_experts=layout["num_experts"], devices_per_node=layout.get("devices_per_node", 1), rank=rank)


def _expert_axes(name, layout):
    """(ep_split, tp_split, inner axis) of an expert tensor (moments too) in layout."""
    _, inner = _expert_kind(model_name_of(name))
    return layout["ep"] > 1, layout["tp"] > 1, inner


def shard_one(name, full, layout, rank):
    """The piece of full numpy array `full` that rank `rank` of layout holds."""
    if layout["world_size"] == 1:
        return full
    topology = layout_topology(layout, rank)
    spec = tp_spec_of(name) if layout["tp"] > 1 else None
    if spec is not None:
        return np.ascontiguousarray(spec.shard(full, layout["tp"], topology.tp_rank()))
    if _expert_kind(model_name_of(name))[0] is not None and np.ndim(full) == 3:
        ep_split, tp_split, inner = _expert_axes(name, layout)
        if full.shape[0] % layout["ep"] or (tp_split and full.shape[inner] % layout["tp"]):
            raise ValueError(f"{name}: shape {full.shape} does not split over ep={layout['ep']} experts axis "
                             f"and tp={layout['tp']} inner axis")
        return np.ascontiguousarray(_expert_slice(model_name_of(name), full, ep_split, tp_split, topology))
    return full


def holders(name, layout):
    """The ranks whose pieces make the full array, in the order gather_one takes them."""
    spec = tp_spec_of(name) if layout["tp"] > 1 else None
    is_expert = _expert_kind(model_name_of(name))[0] is not None
    topologies = [layout_topology(layout, r) for r in range(layout["world_size"])]
    if spec is not None:
        return [_rank_with(topologies, tp=t) for t in range(layout["tp"])]
    if is_expert:
        tps = range(layout["tp"]) if layout["tp"] > 1 else [None]
        eps = range(layout["ep"]) if layout["ep"] > 1 else [None]
        return [_rank_with(topologies, **{k: v for k, v in (("ep", e), ("tp", t)) if v is not None})
                for e in eps for t in tps]
    return [0]


def gather_one(name, pieces, layout):
    """Inverse of shard_one: pieces[i] is the array of rank holders(name, layout)[i] -> full array."""
    spec = tp_spec_of(name) if layout["tp"] > 1 else None
    if spec is not None:
        return spec.unshard([np.asarray(p) for p in pieces])
    if _expert_kind(model_name_of(name))[0] is not None and np.ndim(pieces[0]) == 3:
        ep_split, tp_split, inner = _expert_axes(name, layout)
        per_ep = layout["tp"] if tp_split else 1
        rows = [np.concatenate(pieces[i:i + per_ep], axis=inner) if tp_split else pieces[i]
                for i in range(0, len(pieces), per_ep)]
        return np.concatenate(rows, axis=0) if ep_split else rows[0]
    return np.asarray(pieces[0])
