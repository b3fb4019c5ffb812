"""A run's identity: its stored config and dataset, and which differences change results.

A resume, eval or generate compares the config and dataset a checkpoint was written with against the
current ones (check_compatible); the fields below say which differences matter where.
"""
import hashlib
import os

from locmoe.errors import ConfigError

# Fields that may differ between a run and its resume without changing results: the
# layout (resharded), the run length and bookkeeping. The global batch is checked apart.
LAYOUT_FIELDS = ("parallel.", "train.output_dir", "train.train_steps", "train.init_checkpoint", "train.sink_size",
                 "train.batch_size", "train.global_batch_size", "checkpoint.", "logging.", "data.dataset_dir",
                 "data.verify_checksums",
                 "moe.expert_num_per_dp_dim")
# Fields added after runs were written, with the value that gives those runs' behaviour: a stored config
# without the field is read with it (a run from before gradient accumulation resumes without a change).
ADDED_FIELDS = {"train.gradient_accumulation_steps": 1, "moe.locality_bias": False, "moe.iid_level1": "blocks",
                "moe.reroute_overflow": False, "moe.locality_bias_rate": 1.0}
# eval / generate: only what shapes the model and its tokens matters.
INFERENCE_FIELDS = ("model.", "moe.router", "moe.num_domain_groups", "moe.gate_bias", "moe.locality_bias",
                    "moe.locality_bias_rate",
                    "moe.iid_level1", "moe.table_seed",
                    "moe.capacity_factor", "num_experts")


def dataset_identity(cfg):
    """The dataset's tokenizer hash and the meta fields that define its samples."""
    from pangu_sigma.data.dataset import read_meta as read_data_meta

    meta = read_data_meta(cfg.data.dataset_dir)
    identity = {k: meta.get(k) for k in ("vocab_size", "seq_length", "domains", "train_samples", "valid_samples")}
    tokenizer = os.path.join(cfg.data.dataset_dir, meta.get("tokenizer") or "tokenizer.model")
    if meta.get("tokenizer_sha256"):  # prepare records it (and the data checks hold the file to it)
        identity["tokenizer_sha256"] = meta["tokenizer_sha256"]
    elif os.path.isfile(tokenizer):
        with open(tokenizer, "rb") as handle:
            identity["tokenizer_sha256"] = hashlib.sha256(handle.read()).hexdigest()
    return identity


def _flatten(config):
    flat = {f"{section}.{key}": value for section, fields in config.items() if isinstance(fields, dict)
            for key, value in fields.items()}
    moe, par = config.get("moe", {}), config.get("parallel", {})
    if "expert_num_per_dp_dim" in moe and "expert_parallel" in par:
        flat["num_experts"] = moe["expert_num_per_dp_dim"] * par["expert_parallel"]
    return flat


def _flatten_stored(stored, current):
    """_flatten of a stored config, with ADDED_FIELDS it lacks (and the current config has) filled in."""
    flat, now = _flatten(stored), _flatten(current)
    for key, value in ADDED_FIELDS.items():
        if key in now and key.split(".")[0] in stored:
            flat.setdefault(key, value)
    return flat


def config_differences(stored, current, stored_data, current_data, fields=None, ignore=LAYOUT_FIELDS):
    """Names (section.key / data.<identity key>) whose values differ and change results."""
    a, b = _flatten_stored(stored, current), _flatten(current)
    names = []
    for key in sorted(set(a) | set(b)):
        if fields is not None:
            if not any(key == f or (f.endswith(".") and key.startswith(f)) for f in fields):
                continue
        elif any(key == f or (f.endswith(".") and key.startswith(f)) for f in ignore):
            continue
        if a.get(key) != b.get(key):
            names.append(key)
    if stored_data is not None and current_data is not None:
        for key in sorted(set(stored_data) | set(current_data)):
            if stored_data.get(key) != current_data.get(key):
                names.append(f"data.{key}")
    return names


def split_fields(values):
    """--allow-config-change values (repeatable, comma-separated) -> a tuple of field names."""
    return tuple(f.strip() for value in values for f in value.split(",") if f.strip())


def check_compatible(stored, current, stored_data, current_data, fields=None, allowed=(), what="the run"):
    """Raise one ConfigError naming every result-changing difference not listed in `allowed`."""
    diffs = config_differences(stored, current, stored_data, current_data, fields)
    refused = [d for d in diffs if not any(d == a or d.startswith(a.rstrip(".") + ".") for a in allowed)
               and "all" not in allowed]
    if refused:
        a, b = _flatten_stored(stored, current), _flatten(current)
        shown = ", ".join(f"{d} ({a.get(d, (stored_data or {}).get(d[5:]))!r} -> "
                          f"{b.get(d, (current_data or {}).get(d[5:]))!r})" for d in refused[:6])
        raise ConfigError("--allow-config-change", ",".join(allowed) or "(none)",
                          f"the names of deliberate changes: the config or dataset differs from {what} in "
                          f"{shown}")
    return diffs
