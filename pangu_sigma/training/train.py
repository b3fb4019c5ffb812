"""Train PanGu-Sigma: python -m pangu_sigma.training.train --config FILE [--set a.b=c ...] [--resume].

GRAPH mode; AdamWeightDecay with warm-up + cosine; global-norm clipping;
float32 on CPU, float16 with dynamic loss scaling on Ascend. sink_size steps
run per device loop (data sinking on Ascend, a host loop on CPU, where
MindSpore has no data sinking); each step is logged from the metrics buffers.
--resume continues from the newest checkpoint with the data position,
optimizer state and loss scale restored: the losses logged after a resume
equal those of an uninterrupted run (bitwise on CPU; stochastic layers,
dropout and Switch jitter, draw from MindSpore's op RNG, which a checkpoint
does not hold, so keep them at 0 when that matters).
"""
import os
import sys
import time

import numpy as np
import mindspore as ms

from locmoe.errors import OneLineArgumentParser, run_cli
from pangu_sigma.training import checkpoint
from locmoe.comm import AllReduce, CommCounter
from locmoe.exchange import register_exchange_bytes
from locmoe.layer import MoELayer
from pangu_sigma.build import build_model, dataset_meta, parallel_context, set_device, single_process_groups
from pangu_sigma.training.callbacks import JsonlLog, expert_table, step_line
from pangu_sigma.config import load_config
from pangu_sigma.data.dataset import create_dataset
from pangu_sigma.training.lr_schedule import WarmupCosineLR
from pangu_sigma.model.recompute import apply_recompute
from pangu_sigma.parallel.grad_reduce import GradReducer
from pangu_sigma.parallel.zero import sharded_optimizer
from pangu_sigma.parallel.tp_layers import tp_shard_specs
from pangu_sigma.training.train_step import METRIC_NAMES, TrainStep, build_optimizer


def build_train_step(cfg, meta, ctx, token_groups=1, group_ranks=None):
    """(TrainStep cell, loss network) for this config and ParallelContext."""
    topology = ctx.topology
    net = build_model(cfg, meta, topology, parallel=ctx if ctx.distributed else None, token_groups=token_groups,
                      group_ranks=group_ranks)
    decay_steps = cfg.optim.decay_steps or cfg.train.train_steps
    schedule = WarmupCosineLR(cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, decay_steps)
    apply_recompute(net.model, cfg.train.recompute)
    optimizer = build_optimizer(net, cfg.optim, schedule)
    use_loss_scale = cfg.compute_dtype == "float16"
    reducer = metrics = None
    if ctx.distributed and topology.world_size > 1:
        specs = tp_shard_specs(net)
        if cfg.parallel.optimizer_shard:
            optimizer = sharded_optimizer(net, cfg.optim, schedule, topology, ctx.backend, lambda p: p.name in specs)
        reducer = GradReducer(optimizer.parameters, topology, ctx.backend, lambda p: p.name in specs)
        metrics = AllReduce(list(range(topology.world_size)), ctx.backend, topology, "metrics_allreduce")
    step = TrainStep(net, optimizer, schedule, cfg.optim.grad_clip, use_loss_scale, cfg.train.loss_scale_init,
                     cfg.train.loss_scale_window, cfg.train.sink_size, cfg.model.moe_layer_num, cfg.num_experts,
                     reducer, metrics, topology.world_size, topology.tp)
    return step, net


def comm_summary(cfg, net, topology):
    """One line: MoE communication bytes per step of this (possibly virtual) rank."""
    layers = [cell for _, cell in net.cells_and_names() if isinstance(cell, MoELayer)]
    if not layers or topology.world_size == 1:
        return "[train] MoE communication per step: none (a single rank holds every expert)"
    capacity = layers[0].capacity(cfg.train.batch_size * cfg.model.seq_length)
    counter = register_exchange_bytes(CommCounter(topology), topology, cfg.num_experts, capacity,
                                      cfg.model.hidden_size, cfg.compute_dtype, cfg.parallel.groupwise_a2a,
                                      len(layers))
    totals = counter.totals()
    return (f"[train] MoE communication per step of rank {topology.rank} (of {topology.world_size}, "
            f"{topology.nodes} nodes): intra-node {totals['intra'] / 2**20:.2f} MiB, "
            f"inter-node {totals['inter'] / 2**20:.2f} MiB")


def sink_runner(cfg, step_cell, dataset):
    """A function running sink_size steps per call. Ascend: one data-sink call;
    CPU (MindSpore has no data sinking there): a host loop over the dataset."""
    if cfg.parallel.device_target == "Ascend":
        return ms.data_sink(step_cell, dataset, sink_size=cfg.train.sink_size)
    iterator = dataset.create_tuple_iterator(num_epochs=1)

    def run_host_loop():
        for _ in range(cfg.train.sink_size):
            ids, domains = next(iterator)
            step_cell(ids, domains)
    return run_host_loop


def train(cfg, resume=False, log=print, stop_after=None):
    """Run training; returns a summary dict (steps, losses per step, tokens/s, wall time).

    stop_after: end the run after this step (a multiple of sink_size) as if the
    job were killed there, without touching the schedule (tests, preemption drills).
    """
    set_device(cfg)
    ms.set_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    meta = dataset_meta(cfg)
    ctx = parallel_context(cfg)
    topology = ctx.topology
    rank = topology.rank if ctx.distributed else 0
    dp_size, dp_rank = (topology.dp, topology.dp_rank()) if ctx.distributed else (1, 0)
    groups, group_ranks, batch_multiplier = (1, None, 1) if ctx.distributed else single_process_groups(cfg, topology)
    batch_size = cfg.train.batch_size * batch_multiplier
    step_cell, net = build_train_step(cfg, meta, ctx, groups, group_ranks)
    output_dir = cfg.train.output_dir
    os.makedirs(output_dir, exist_ok=True)
    ckpt_dir = checkpoint.rank_dir(output_dir, rank)
    start_step = 0
    if resume:
        found = checkpoint.latest(ckpt_dir)
        if found is None:
            log(f"[train] --resume: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            path, ckpt_meta = found
            checkpoint.load_into(step_cell, path)
            start_step = int(ckpt_meta["step"])
            log(f"[train] resumed from {path} at step {start_step}")
    if start_step == 0 and cfg.train.init_checkpoint:
        checkpoint.load_resharded(net, cfg.train.init_checkpoint, topology if ctx.distributed else None)
        log(f"[train] initial weights from {cfg.train.init_checkpoint}")
    if start_step == 0 and not ctx.distributed:
        checkpoint.save_model(net, os.path.join(output_dir, "initial_weights.ckpt"))
    log(comm_summary(cfg, net, topology))
    if start_step >= cfg.train.train_steps:
        log(f"[train] nothing to do: step {start_step} >= train.train_steps={cfg.train.train_steps}")
        return {"steps": start_step, "losses": {}, "tokens_per_s": 0.0, "seconds": 0.0}

    dataset = create_dataset(cfg.data.dataset_dir, "train", batch_size, dp_size, dp_rank,
                             shuffle=cfg.data.shuffle, seed=cfg.data.seed, start_batch=start_step, repeat=True)
    run_sink = sink_runner(cfg, step_cell, dataset)
    tokens_per_step = batch_size * dp_size * cfg.model.seq_length
    jsonl = JsonlLog(os.path.join(output_dir, f"train_log_rank{rank}.jsonl"), fresh=not resume)
    show_scale = cfg.compute_dtype == "float16"
    sink = cfg.train.sink_size
    losses = {}
    stats_since = None
    started = time.time()
    timed_tokens, timed_seconds = 0, 0.0
    log(f"[train] {cfg.moe.router} router, {cfg.num_experts} experts, {cfg.model.moe_layer_num}/"
        f"{cfg.model.num_layers} sparse layers, {sum(p.size for p in net.trainable_params()):,} parameters, "
        f"{cfg.compute_dtype}, steps {start_step}..{cfg.train.train_steps}, {tokens_per_step} tokens/step")
    end_step = cfg.train.train_steps if stop_after is None else min(stop_after, cfg.train.train_steps)
    for first in range(start_step, end_step, sink):
        tic = time.time()
        run_sink()
        scalars = step_cell.metrics_scalars.asnumpy()  # [sink, K]
        load = step_cell.metrics_load.asnumpy()  # [sink, M, E]
        dropped = step_cell.metrics_dropped.asnumpy()  # [sink, M]
        local = step_cell.metrics_local.asnumpy()  # [sink, M]
        elapsed = time.time() - tic
        if first > start_step:  # the first sink includes graph compilation
            timed_tokens += tokens_per_step * sink
            timed_seconds += elapsed
        tokens_per_s = tokens_per_step * sink / max(elapsed, 1e-9)
        for i in range(sink):
            step = first + i + 1
            metrics = dict(zip(METRIC_NAMES, (float(v) for v in scalars[i])))
            losses[step] = metrics["loss"]
            if stats_since is None:
                stats_since = [np.zeros_like(load[i]), np.zeros_like(dropped[i]), np.zeros_like(local[i])]
            stats_since[0] += load[i]
            stats_since[1] += dropped[i]
            stats_since[2] += local[i]
            if step % cfg.logging.log_steps == 0 or step == cfg.train.train_steps:
                log(step_line(step, cfg.train.train_steps, metrics, tokens_per_s, show_scale))
            jsonl.write(dict(metrics, step=step, tokens_per_s=tokens_per_s, expert_load=load[i].tolist(),
                             dropped=dropped[i].tolist(), local=local[i].tolist()))
            if step % cfg.logging.expert_stats_steps == 0 or step == cfg.train.train_steps:
                log(expert_table(*stats_since, first_layer=cfg.model.num_layers - cfg.model.moe_layer_num,
                                 title=f"expert load, steps up to {step}"))
                stats_since = None
        last = first + sink
        if (cfg.checkpoint.save_steps and last % cfg.checkpoint.save_steps == 0) or last == cfg.train.train_steps:
            path = checkpoint.save(step_cell, ckpt_dir, last, {"batches_consumed": last,
                                   "router": cfg.moe.router, "config": cfg.to_dict()}, cfg.checkpoint.keep_last)
            log(f"[train] checkpoint {path}")
    seconds = time.time() - started
    rate = timed_tokens / timed_seconds if timed_seconds else tokens_per_step * len(losses) / max(seconds, 1e-9)
    log(f"[train] done: {len(losses)} steps in {seconds:.1f} s, {rate:,.0f} tokens/s after compilation, "
        f"final loss {losses[max(losses)]:.4f}")
    return {"steps": end_step, "losses": losses, "tokens_per_s": rate, "seconds": seconds}


def parse_args(argv):
    parser = OneLineArgumentParser(description="Train PanGu-Sigma with a LocMoE/Switch/Hash/RRE router.")
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config field (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    def run():
        cfg = load_config(args.config, args.set)
        train(cfg, resume=args.resume)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
