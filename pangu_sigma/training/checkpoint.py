"""Checkpoints of a run: per-rank atomic saves, completion markers, any-layout loading.

Run folder layout:
  <run>/run.json                                  the run's config and dataset identity
  <run>/checkpoints/rank_<r>/step_<N>.ckpt (+.json) rank r's parameters and optimizer state
  <run>/checkpoints/step_<N>.complete             written by rank 0 after every rank saved N
A step counts only once its marker exists (a crash between ranks' writes leaves
the previous complete step the latest). Every file is written under a temporary
name and renamed; temporaries of interrupted saves are removed at the next save.

A "layout" is {world_size, tp, ep, num_experts, devices_per_node}; the single
process layout (world_size 1) holds full parameters. `StateSource` reads any
run folder or .ckpt one full parameter at a time (gathering per-rank pieces), so
eval, generate, the checkpoint tool and a resume on another layout share one path.
"""
import json
import os
import re
import shutil
import sys

import mindspore as ms

from locmoe.errors import ConfigError
from pangu_sigma.parallel import reshard, zero_layout
from pangu_sigma.training.ckpt_stream import CheckpointReader, CheckpointWriter, remove_stale_temporaries
from pangu_sigma.training.run_identity import INFERENCE_FIELDS, check_compatible, dataset_identity
from pangu_sigma.training.train_step import TRANSIENT_PREFIXES

_NAME = re.compile(r"^step_(\d{8})\.json$")
_MARKER = re.compile(r"^step_(\d{8})\.complete$")
RUN_FILE = "run.json"
FULL_LAYOUT = {"world_size": 1, "tp": 1, "ep": 1, "devices_per_node": 1}
LAYOUT_KEYS = ("world_size", "tp", "ep", "num_experts", "devices_per_node")
# State entries that are not the model's parameters (optimizer and training-loop state).
LOOP_STATE = ("global_step", "train_step", "loss_scale", "loss_scale_good_steps")


# ---- names and folders ------------------------------------------------------------
def checkpoints_dir(output_dir):
    return os.path.join(output_dir, "checkpoints")


def rank_dir(output_dir, rank=0):
    return os.path.join(checkpoints_dir(output_dir), f"rank_{rank}")


def step_base(output_dir, rank, step):
    return os.path.join(rank_dir(output_dir, rank), f"step_{step:08d}")


def marker_path(output_dir, step):
    return os.path.join(checkpoints_dir(output_dir), f"step_{step:08d}.complete")


def is_optimizer_state(name):
    return name.startswith(reshard.OPTIMIZER_PREFIXES + reshard.SHARDED_MOMENT_PREFIXES) or name in LOOP_STATE


def write_json_atomic(path, payload):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_meta(path, field="--checkpoint"):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(field, path, f"a readable checkpoint description ({err})") from None


def layout_of(topology, distributed):
    """The layout this process's parameters are stored in."""
    if not distributed or topology.world_size == 1:
        return dict(FULL_LAYOUT, num_experts=topology.num_experts)
    return {"world_size": topology.world_size, "tp": topology.tp, "ep": topology.ep,
            "num_experts": topology.num_experts, "devices_per_node": topology.devices_per_node}


def same_layout(a, b):
    return all(a.get(k) == b.get(k) for k in ("world_size", "tp", "ep", "num_experts"))


# ---- saving (one rank) ----------------------------------------------------------------
def save_rank(cell, output_dir, rank, step, meta):
    """Write this rank's state as step_<step>.ckpt + .json (not yet counted: see mark_complete)."""
    directory = rank_dir(output_dir, rank)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(directory)
    base = step_base(output_dir, rank, step)
    with CheckpointWriter(base + ".ckpt") as writer:
        for param in cell.get_parameters():
            if not param.name.startswith(TRANSIENT_PREFIXES):
                writer.write(param.name, param.asnumpy())
    write_json_atomic(base + ".json", dict(meta, step=step, rank=rank, checkpoint=os.path.basename(base + ".ckpt")))
    return base + ".ckpt"


def mark_complete(output_dir, step, layout, extra=None):
    """Rank 0, after a barrier following every rank's save_rank: step counts from now on."""
    remove_stale_temporaries(checkpoints_dir(output_dir))
    write_json_atomic(marker_path(output_dir, step), dict(extra or {}, step=step, layout=layout))


def prune(output_dir, rank, keep_last, world_size):
    """Keep the newest keep_last complete steps (and anything newer); this rank's older files go.

    Rank 0 also removes the old markers (first: a step stops counting before its files go) and the
    old files of ranks beyond world_size (left by a run on a larger layout before a resume).
    """
    complete = complete_steps(output_dir)
    if len(complete) <= keep_last:
        return
    oldest_kept = complete[-keep_last]
    ranks = [rank]
    if rank == 0:
        for step in complete:
            if step < oldest_kept:
                os.remove(marker_path(output_dir, step))
        extra = 0
        while os.path.isdir(rank_dir(output_dir, world_size + extra)):
            ranks.append(world_size + extra)
            extra += 1
    for r in ranks:
        directory = rank_dir(output_dir, r)
        for step in list_steps(directory):
            if step < oldest_kept:
                for ext in (".json", ".ckpt"):
                    path = os.path.join(directory, f"step_{step:08d}{ext}")
                    if os.path.exists(path):
                        os.remove(path)


# ---- finding checkpoints -------------------------------------------------------------
def list_steps(directory):
    """Steps with a json + ckpt pair in one rank folder, ascending."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(directory, name[:-5] + ".ckpt")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def complete_steps(output_dir):
    """Steps with a completion marker, ascending."""
    folder = checkpoints_dir(output_dir)
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for m in map(_MARKER.match, os.listdir(folder)) if m)


def latest_complete(output_dir):
    """(step, marker dict) of the newest step every rank finished, or None.

    A folder of an earlier version (rank_0 pairs, no markers) counts as single-process.
    """
    for step in reversed(complete_steps(output_dir)):
        marker = read_meta(marker_path(output_dir, step))
        ranks = range(marker["layout"]["world_size"])
        if all(os.path.isfile(step_base(output_dir, r, step) + ".ckpt") for r in ranks):
            return step, marker
    if not complete_steps(output_dir) and not os.path.isdir(rank_dir(output_dir, 1)):
        steps = list_steps(rank_dir(output_dir, 0))
        if steps:
            meta = read_meta(step_base(output_dir, 0, steps[-1]) + ".json")
            layout = dict(FULL_LAYOUT, num_experts=None)
            return steps[-1], {"step": steps[-1], "layout": layout, "batches_consumed": meta.get("batches_consumed")}
    return None


def is_run_folder(path):
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, RUN_FILE))
                                    or os.path.isdir(checkpoints_dir(path)))


# ---- reading any layout one parameter at a time ----------------------------------------
class StateSource:
    """Full parameters (and optimizer state) of a checkpoint in any layout, one at a time.

    files: {rank: .ckpt path}; layout: how they are split; meta: the step's description.
    Adam moments go by their full-layout names (adam_m./adam_v.): a run with
    parallel.optimizer_shard stores each rank's ZeRO-1 slice (zero_m./zero_v.), which `full`
    gathers over the parameter's replica group into the rank's piece before the TP/EP gather.
    """

    def __init__(self, files, layout, meta, where):
        self.layout = layout
        self.meta = meta
        self.where = where
        self.readers = {rank: CheckpointReader(path) for rank, path in files.items()}
        self._first = self.readers[min(self.readers)]
        self._names = [zero_layout.adam_name(n) for n in self._first.names()]
        self._known = set(self._names)

    def names(self, with_optimizer=True):
        return [n for n in self._names if with_optimizer or not is_optimizer_state(n)]

    def __contains__(self, name):
        return zero_layout.adam_name(name) in self._known

    def full(self, name):
        """The full (single-process) array of one state entry (a moment by either name)."""
        name = zero_layout.adam_name(name)
        if name not in self._first and zero_layout.zero_name(name) in self._first:
            return self._gather_sharded_moment(name)
        if self.layout["world_size"] == 1:
            return self.readers[0].read(name)
        ranks = reshard.holders(name, self.layout)
        return reshard.gather_one(name, [self.readers[r].read(name) for r in ranks], self.layout)

    def _gather_sharded_moment(self, name):
        """ZeRO-1 slices -> each TP/EP holder's piece (over its replica group) -> the full moment."""
        stored, param = zero_layout.zero_name(name), reshard.model_name_of(name)
        ranks = reshard.holders(name, self.layout) if self.layout["world_size"] > 1 else [0]
        pieces = []
        for holder in ranks:
            missing = [r for r in zero_layout.group_of(name, self.layout, holder) if r not in self.readers]
            if missing or param not in self.readers[holder]:
                raise ConfigError("checkpoint", self.where, f"every rank's file of the run: {stored} needs ranks "
                                                            f"{missing} and the parameter {param} of rank {holder}")
            try:
                pieces.append(zero_layout.piece_from_slices(name, lambda r: self.readers[r].read(stored),
                                                            self.readers[holder].shape(param), self.layout, holder))
            except ValueError as err:
                raise ConfigError("checkpoint", self.where, f"ZeRO-1 slices of its recorded layout ({err})") from None
        return reshard.gather_one(name, pieces, self.layout)

    def full_shape(self, name):
        return self.full(name).shape


def open_source(path, field="--checkpoint", step=None):
    """A .ckpt file, a run folder, or its checkpoints/ or rank_<r>/ folder -> StateSource of the newest
    complete step (or `step`)."""
    if not os.path.exists(path):
        raise ConfigError(field, path, "an existing .ckpt file or run folder")
    if os.path.isfile(path):
        sidecar = path[:-5] + ".json" if path.endswith(".ckpt") else None
        meta = read_meta(sidecar, field) if sidecar and os.path.isfile(sidecar) else {}
        layout = meta.get("layout") or dict(FULL_LAYOUT, num_experts=None)
        if layout["world_size"] > 1:  # one rank's file of a distributed run: its folder has the rest
            return open_source(os.path.dirname(os.path.dirname(os.path.dirname(path))), field, meta["step"])
        return StateSource({0: path}, layout, meta, path)
    run = path
    if os.path.basename(os.path.normpath(path)).startswith("rank_"):
        run = os.path.dirname(os.path.dirname(os.path.normpath(path)))
    elif os.path.basename(os.path.normpath(path)) == "checkpoints":
        run = os.path.dirname(os.path.normpath(path))
    if step is None:
        found = latest_complete(run)
        if found is None and complete_steps(run):  # marked complete, a rank's file missing: named below
            step = complete_steps(run)[-1]
            found = step, read_meta(marker_path(run, step), field)
        if found is None:
            raise ConfigError(field, path, "a .ckpt file or a run folder with a complete checkpoint "
                                           "(checkpoints/step_<N>.complete)")
        step, marker = found
    else:
        marker = read_meta(marker_path(run, step), field) if os.path.isfile(marker_path(run, step)) else None
        if marker is None:
            raise ConfigError(field, path, f"a run whose step {step} is complete (no {marker_path(run, step)})")
    layout = marker["layout"]
    files = {r: step_base(run, r, step) + ".ckpt" for r in range(layout["world_size"])}
    missing = [r for r, file in files.items() if not os.path.isfile(file)]
    if missing:
        raise ConfigError(field, path, f"a run folder holding every rank's file of step {step}; rank(s) {missing} "
                                       f"have none (no {files[missing[0]]})")
    meta = read_meta(step_base(run, 0, step) + ".json", field)
    meta.update({k: v for k, v in marker.items() if k != "layout"})
    source = StateSource(files, layout, meta, f"{run} step {step}")
    source.skipped = [s for s in list_steps(rank_dir(run, 0)) if s > step]  # newer, not complete
    return source


# ---- loading into a network ------------------------------------------------------------------
def load_state(cell, source, layout, rank, field="--checkpoint", strict=True, with_optimizer=True):
    """Copy every (non-buffer) parameter of cell from source, resharded to `rank` of `layout`.

    Shapes are checked for every parameter before any is set (one-line ConfigError).
    strict: every parameter of cell must be in the source (optimizer state only if with_optimizer).
    """
    own = [p for p in cell.get_parameters() if not p.name.startswith(TRANSIENT_PREFIXES)
           and (with_optimizer or not is_optimizer_state(p.name))]
    missing = [p.name for p in own if p.name not in source]
    if strict and missing:
        raise ConfigError(field, source.where, f"a checkpoint of this model; it lacks {len(missing)} "
                                               f"parameters, e.g. {missing[:3]}")
    values = {}
    same = same_layout(source.layout, layout) and rank in source.readers
    for param in own:
        if param.name not in source:
            continue
        try:
            if same and param.name in source.readers[rank]:  # this rank's own file, as written
                piece = source.readers[rank].read(param.name)
            else:  # resharded: the full array, this rank's TP/EP piece, (ZeRO-1) this rank's slice of it
                piece = reshard.shard_one(param.name, source.full(param.name), layout, rank)
                if zero_layout.is_sharded_moment(param.name):
                    piece = zero_layout.slice_of(param.name, piece, layout, rank)
        except ValueError as err:
            raise ConfigError(field, source.where, f"a checkpoint of this model ({err})") from None
        if tuple(piece.shape) != tuple(param.shape):
            raise ConfigError(field, source.where, f"a checkpoint of this model: parameter {param.name} has shape "
                                                   f"{tuple(param.shape)} here but the checkpoint gives "
                                                   f"{tuple(piece.shape)}; the config does not match the checkpoint")
        values[param.name] = piece
    for param in own:
        if param.name in values:
            param.set_data(ms.Tensor(values[param.name].astype(ms.dtype_to_nptype(param.dtype), copy=False)))
    return source.where


def load_into(cell, path, strict=True, field="--checkpoint"):
    """Load a .ckpt file or a run folder (any layout, merged on the fly) into a single-process cell."""
    source = open_source(path, field)
    load_state(cell, source, dict(FULL_LAYOUT, num_experts=None), 0, field, strict)
    return source.where


def load_model_for_inference(net, cfg, path, overrides=(), field="--checkpoint", check=True, topology=None):
    """eval / generate / routing_report: check the stored config and dataset against cfg (unless
    check is False), then load the model's parameters from a .ckpt or a (distributed) run folder,
    merged on the fly, into the single-process net (topology: a launched rank's, into its shards).
    overrides: fields allowed to differ."""
    source = open_source(path, field)
    stored = source.meta.get("config")
    if stored is not None and check:
        check_compatible(stored, cfg.to_dict(), source.meta.get("dataset"), dataset_identity(cfg),
                         INFERENCE_FIELDS, overrides, what=f"the checkpoint {source.where}")
    load_state(net, source, *_target_layout(topology), field, strict=True, with_optimizer=False)
    if hasattr(source, "skipped"):  # a run folder: say which of its steps was read
        print(f"[checkpoint] read {source.where}" + (f" (its newest complete step; step(s) {source.skipped} are "
              "incomplete)" if source.skipped else ""), file=sys.stderr)
    return source.where


def _target_layout(topology):
    """(layout, rank) a model is loaded into: the full model in one process, else this rank's shards."""
    if topology is None or topology.world_size == 1:
        return dict(FULL_LAYOUT, num_experts=None), 0
    return layout_of(topology, True), topology.rank


def save_model(net, path):
    """The model's parameters alone (no optimizer state), atomically."""
    with CheckpointWriter(path) as writer:
        for param in net.get_parameters():
            writer.write(param.name, param.asnumpy())
    return path


def load_resharded(net, path, topology=None):
    """train.init_checkpoint: a model checkpoint of any layout -> this rank's shards of net.

    Every shape is checked before the first step (one-line ConfigError naming train.init_checkpoint).
    """
    source = open_source(path, "train.init_checkpoint")
    load_state(net, source, *_target_layout(topology), "train.init_checkpoint", strict=True, with_optimizer=False)
    return source.where


# ---- run folder protection and start-up checks ------------------------------------------
def is_run_entry(name):
    """Whether a name in a run folder is one a run writes (its run.json, logs, checkpoints)."""
    return name in (RUN_FILE, "checkpoints", "initial_weights.ckpt") or name.startswith("train_log_rank")


def holds_run(output_dir):
    """True when output_dir already holds a run (its run.json, logs or checkpoints)."""
    return os.path.isdir(output_dir) and any(map(is_run_entry, os.listdir(output_dir)))


def check_writable(path, field):
    """Create folder path (and parents) and prove a file can be written there; one-line errors."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(field, path, "a folder (a file of that name exists)")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".tmp{os.getpid()}_write_test")
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(field, path, f"a writable folder ({err.strerror or err})") from None


def move_aside(output_dir):
    """--overwrite: move an earlier run as a whole to <output_dir>.old-<N> (nothing mixed, nothing lost)."""
    index = 1
    while os.path.exists(f"{output_dir}.old-{index}"):
        index += 1
    target = f"{output_dir}.old-{index}"
    shutil.move(output_dir, target)
    return target


def write_run_file(output_dir, config, dataset):
    write_json_atomic(os.path.join(output_dir, RUN_FILE), {"config": config, "dataset": dataset})


def read_run_file(output_dir):
    path = os.path.join(output_dir, RUN_FILE)
    return read_meta(path, "train.output_dir") if os.path.isfile(path) else None
