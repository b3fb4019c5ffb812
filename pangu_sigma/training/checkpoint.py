"""Checkpoints: atomic per-rank save, keep the last K, find the latest, load with clear errors.

Layout: <output_dir>/checkpoints/rank_<r>/step_<N>.ckpt with a step_<N>.json
beside it (step, batches consumed, loss scale, config). Both are written to a
temporary name and renamed, the JSON last, so a checkpoint counts only once
it is complete; a crash mid-save leaves the previous ones intact.
"""
import json
import os
import re

import mindspore as ms

from locmoe.errors import ConfigError
from pangu_sigma.training.train_step import BUFFER_PREFIX

_NAME = re.compile(r"^step_(\d{8})\.json$")


def rank_dir(output_dir, rank=0):
    return os.path.join(output_dir, "checkpoints", f"rank_{rank}")


def write_json_atomic(path, payload):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


def save(cell, directory, step, meta, keep_last):
    """Save every non-buffer parameter of cell as step_<step>.ckpt (+ .json); prune to keep_last."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, f"step_{step:08d}")
    tmp_ckpt = os.path.join(directory, f".tmp{os.getpid()}_step_{step:08d}.ckpt")
    ms.save_checkpoint(cell, tmp_ckpt, choice_func=lambda name: not name.startswith(BUFFER_PREFIX))
    os.replace(tmp_ckpt, base + ".ckpt")
    write_json_atomic(base + ".json", dict(meta, step=step, checkpoint=os.path.basename(base + ".ckpt")))
    for old_step in list_steps(directory)[:-keep_last]:
        for ext in (".json", ".ckpt"):  # json first: the pair stops counting before the weights go
            path = os.path.join(directory, f"step_{old_step:08d}{ext}")
            if os.path.exists(path):
                os.remove(path)
    return base + ".ckpt"


def list_steps(directory):
    """Steps with a complete checkpoint (json + ckpt), ascending."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match and os.path.isfile(os.path.join(directory, name[:-5] + ".ckpt")):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest(directory):
    """(ckpt path, meta dict) of the newest complete checkpoint, or None."""
    steps = list_steps(directory)
    if not steps:
        return None
    base = os.path.join(directory, f"step_{steps[-1]:08d}")
    return base + ".ckpt", read_meta(base + ".json")


def read_meta(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError("checkpoint", path, f"a readable checkpoint description ({err})") from None


def resolve(path):
    """A checkpoint given as a .ckpt file or a run/checkpoint folder -> .ckpt path."""
    if os.path.isdir(path):
        for candidate in (path, rank_dir(path, 0)):
            found = latest(candidate)
            if found:
                return found[0]
        raise ConfigError("--checkpoint", path, "a .ckpt file or a folder holding step_<N>.ckpt/.json pairs")
    if not os.path.isfile(path):
        raise ConfigError("--checkpoint", path, "an existing .ckpt file or checkpoint folder")
    return path


def load_into(cell, path, strict=True):
    """Load a checkpoint into cell. strict: every parameter of cell except buffers must be present."""
    path = resolve(path)
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("--checkpoint", path, f"a MindSpore checkpoint this build can read ({first})") from None
    own = {p.name: p for p in cell.get_parameters() if not p.name.startswith(BUFFER_PREFIX)}
    for name, param in params.items():
        if name in own and tuple(own[name].shape) != tuple(param.shape):
            raise ConfigError("--checkpoint", path,
                              f"parameter {name} of shape {tuple(own[name].shape)} (the file has "
                              f"{tuple(param.shape)}): the config does not match the checkpoint")
    missing = sorted(set(own) - set(params))
    if strict and missing:
        raise ConfigError("--checkpoint", path, f"a checkpoint of this model; it lacks {len(missing)} "
                          f"parameters, e.g. {missing[:3]}")
    ms.load_param_into_net(cell, {k: v for k, v in params.items() if k in own}, strict_load=False)
    return path


def save_model(net, path):
    """The model's parameters alone (no optimizer state), atomically."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp{os.getpid()}_{os.path.basename(path)}")
    ms.save_checkpoint(net, tmp)
    os.replace(tmp, path)
    return path


def load_resharded(net, path, topology=None):
    """Load a model checkpoint written in any TP/EP layout's full form (a single-process
    run) into net, slicing every parameter to this rank's shard (topology None: as is)."""
    from pangu_sigma.parallel.reshard import shard_full_params

    path = resolve(path)
    try:
        full = {name: p.asnumpy() for name, p in ms.load_checkpoint(path).items()}
    except (ValueError, RuntimeError, OSError) as err:
        raise ConfigError("train.init_checkpoint", path, f"a MindSpore checkpoint ({str(err).splitlines()[0]})") \
            from None
    wanted = {p.name for p in net.get_parameters()}
    missing = sorted(wanted - set(full))
    if missing:
        raise ConfigError("train.init_checkpoint", path, f"a checkpoint of this model; it lacks {missing[:3]}")
    full = {k: v for k, v in full.items() if k in wanted}
    try:
        values = shard_full_params(full, net, topology) if topology is not None else full
    except ValueError as err:
        raise ConfigError("train.init_checkpoint", path, f"a full-layout checkpoint of this model ({err})") from None
    for param in net.get_parameters():
        param.set_data(ms.Tensor(values[param.name]))
