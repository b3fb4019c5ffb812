"""compare_routers, run stage: train one (router, seed) run (or reuse a finished one), evaluate it,
simulate it; the training log's layer table and last values; the flock that serialises runs."""
import contextlib
import fcntl
import os
import shutil

import numpy as np

from pangu_sigma.tools.compare_simulation import simulate_router

def layer_table(load, dropped, local):
    """Per-layer statistics from summed counts load [M, E], dropped [M], local [M]."""
    from pangu_sigma.evaluation.domain_stats import layer_figures
    return layer_figures(load, dropped, local)


def train_log_table(log_path):
    """layer_table over the last half of the logged steps."""
    from pangu_sigma.training.callbacks import read_jsonl
    rows = [r for r in read_jsonl(log_path) if r.get("expert_load")]
    if not rows:
        return []
    rows = rows[-max(1, len(rows) // 2):]
    return layer_table(np.sum([r["expert_load"] for r in rows], 0), np.sum([r["dropped"] for r in rows], 0),
                       np.sum([r["local"] for r in rows], 0))


def _last_logged(log_path, key):
    """The last value of `key` in a training log (None if absent)."""
    from pangu_sigma.training.callbacks import read_jsonl
    values = [r[key] for r in read_jsonl(log_path) if key in r]
    return values[-1] if values else None

def tokens_per_step(cfg):
    """(tokens, sequences) one training step of a single process consumes: the whole virtual cluster's
    batch in cluster scope (train.batch_size per data-parallel rank times dp)."""
    from pangu_sigma.build import single_process_groups, single_process_topology

    _, _, multiplier = single_process_groups(cfg, single_process_topology(cfg))
    samples = cfg.train.batch_size * multiplier
    return samples * cfg.model.seq_length, samples


@contextlib.contextmanager
def held(lock_path, log):
    """An exclusive flock(2) on lock_path for the duration (the lock flock(1) takes); no-op without a path."""
    if not lock_path:
        yield
        return
    with open(lock_path, "a") as handle:
        log(f"[compare] waiting for the lock {lock_path}")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stored_config_differences(run_dir, cfg):
    """The result-changing fields in which the config a run folder was trained with (its run.json) differs
    from cfg (pangu_sigma.training.run_identity.config_differences); ['run.json'] without one."""
    from pangu_sigma.training.checkpoint import read_run_file
    from pangu_sigma.training.run_identity import config_differences
    stored = read_run_file(run_dir)
    if not stored or "config" not in stored:
        return ["run.json"]
    return config_differences(stored["config"], cfg.to_dict(), None, None)


def finished_training(run_dir, steps, cfg=None):
    """train()'s summary of a run folder whose training reached `steps` (from its log), else None; with cfg,
    also None when the folder was trained with another config (e.g. other capacities: a calibration that
    changed between two invocations of --reuse)."""
    from pangu_sigma.training.callbacks import read_jsonl
    log_path = os.path.join(run_dir, "train_log_rank0.jsonl")
    marker = os.path.join(run_dir, "checkpoints", f"step_{steps:08d}.complete")
    if not (os.path.isfile(log_path) and os.path.exists(marker)):
        return None
    if cfg is not None and stored_config_differences(run_dir, cfg):
        return None
    rows = [r for r in read_jsonl(log_path) if "step" in r]
    if not rows or rows[-1]["step"] != steps:
        return None
    return {"steps": steps, "losses": {steps: rows[-1]["loss"]}, "tokens_per_s": rows[-1]["tokens_per_s"]}


def run_figures(cfg, router, clusters, config_dir, dispatch, hw, log, lock=None, counts=None, reuse=False):
    """Train one (router, seed) run, evaluate it, simulate it: the run's dict. lock: a file to hold
    an exclusive lock on while training and evaluating. counts: a list to receive eval's routed
    tokens per (layer, batch, token group, expert) on the valid split (pilot runs). reuse: a run folder
    whose training already reached train.train_steps is evaluated (without the lock), not trained again."""
    from pangu_sigma.evaluation.eval import evaluate
    from pangu_sigma.training.train import train

    run_dir = cfg.train.output_dir
    summary = finished_training(run_dir, cfg.train.train_steps, cfg) if reuse else None
    if reuse and summary is None and finished_training(run_dir, cfg.train.train_steps) is not None:
        log(f"[compare] {run_dir} was trained with another config ("
            + ", ".join(stored_config_differences(run_dir, cfg)[:4]) + "): training it again")
    if summary is None and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    with held(lock if summary is None else None, log):  # evaluating a finished run alone is light
        if summary is None:
            log(f"[compare] training {router}, seed {cfg.train.seed}: {cfg.train.train_steps} steps -> {run_dir}")
            summary = train(cfg, log=log)
        else:  # eval checks that the run's stored config is this one
            log(f"[compare] {router}, seed {cfg.train.seed}: reusing the finished training in {run_dir}")
        ev = evaluate(cfg, checkpoint_path=run_dir, log=log, pair_counts=counts is not None)
    if counts is not None:
        counts.append(ev.pop("pair_counts"))
    log_path = os.path.join(run_dir, "train_log_rank0.jsonl")
    valid = {key: ev[key] for key in ("tokens", "ce", "perplexity", "expert_load", "dropped", "local", "layers",
                                      "domains", "routing", "dropped_remote", "local_by_rank",
                                      "tokens_by_rank", "rerouted")}
    run = {"run_dir": run_dir, "seed": cfg.train.seed, "tokens_per_s": summary["tokens_per_s"],
           "final_train_loss": summary["losses"][max(summary["losses"])], "valid": valid,
           "train_log_layers": train_log_table(log_path),
           # the cluster's MoE bytes per step across nodes, as the exchange sends them (training log)
           "moe_inter_node_bytes_per_step": _last_logged(log_path, "moe_inter_node_bytes_cluster"),
           "simulated": simulate_router(router, cfg, log_path, clusters, config_dir, dispatch, hw)}
    log(f"[compare] {router} seed {cfg.train.seed}: valid ppl {ev['perplexity']:.3f} "
        + " ".join(f"{d} {f['perplexity']:.3f}" for d, f in ev["domains"].items()))
    return run
