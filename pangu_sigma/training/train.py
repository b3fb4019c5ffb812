"""Train PanGu-Sigma: python -m pangu_sigma.training.train --config FILE [--set a.b=c ...] [--resume].

GRAPH mode; AdamWeightDecay with warm-up + cosine; global-norm clipping;
float32 on CPU, float16 with dynamic loss scaling on Ascend. sink_size steps
run per device loop (data sinking on Ascend, a host loop on CPU, where
MindSpore has no data sinking); each step is logged from the metrics buffers.
--resume continues from the newest complete checkpoint with the data position,
optimizer state and loss scale restored: the losses logged after a resume
equal those of an uninterrupted run (bitwise on CPU; dropout masks are a hash
of the restored step, but Switch jitter draws from MindSpore's op RNG, which a
checkpoint does not hold, so keep it at 0 when that matters). The parallel settings
may change between runs (weights and optimizer state are resharded); the
global batch may change only with --allow-batch-change, any other
result-changing config or dataset field only when named in --allow-config-change.
An existing run folder is never trained into without --resume or --overwrite
(which moves the old run aside as a whole).
"""
import os
import sys
import time

import numpy as np
import mindspore as ms

from mindspore import nn

from locmoe.errors import ConfigError, OneLineArgumentParser, ctrl_c_deferred, note_for_interrupt, run_cli
from pangu_sigma.training import checkpoint, run_identity
from locmoe.comm import AllReduce, CommCounter
from locmoe.exchange import register_exchange_bytes, register_tiered_exchange_bytes
from locmoe.layer import MoELayer
from pangu_sigma.build import (build_model, dataset_meta, domain_placement, parallel_context,
                               placement_sample_order, set_device, single_process_groups)
from pangu_sigma.training.callbacks import JsonlLog, expert_table, step_line
from pangu_sigma.config import load_config
from pangu_sigma.data.dataset import create_dataset
from pangu_sigma.data.verify import verify_on_one_rank
from pangu_sigma.data.output_folder import check_creatable
from pangu_sigma.training.lr_schedule import WarmupCosineLR
from pangu_sigma.model.recompute import apply_recompute
from pangu_sigma.parallel.grad_reduce import GradReducer
from pangu_sigma.parallel.init_weights import initialise as initialise_weights
from pangu_sigma.parallel.zero import sharded_optimizer
from pangu_sigma.parallel.tp_layers import tp_shard_specs
from pangu_sigma.training.run_paths import remove_run_files, resolve_paths
from pangu_sigma.training.placement_check import MARKER_KEY, check_resume_placement, placement_map
from pangu_sigma.training.shared_folder import check_shared_folder
from pangu_sigma.training.overflow import OverflowCheck, overflow_check_mode
from pangu_sigma.training.train_step import METRIC_NAMES, AccumulatingTrainStep, TrainStep, build_optimizer


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
            optimizer = sharded_optimizer(net, cfg.optim, schedule, topology, ctx.backend, lambda p: p.name in specs,
                                          cfg.parallel.grad_bucket_mb)
        reducer = GradReducer(optimizer.parameters, topology, ctx.backend, lambda p: p.name in specs,
                              cfg.parallel.grad_bucket_mb)
        metrics = AllReduce(list(range(topology.world_size)), ctx.backend, topology, "metrics_allreduce")
    mode = overflow_check_mode(cfg.parallel.device_target) if use_loss_scale else "isfinite"
    overflow_reduce = None
    if mode == "npu_float_status" and ctx.distributed and topology.world_size > 1:
        overflow_reduce = AllReduce(list(range(topology.world_size)), ctx.backend, topology, "overflow_allreduce")
    moe_layers = [cell for _, cell in net.cells_and_names() if isinstance(cell, MoELayer)]
    step = TrainStep(net, optimizer, schedule, cfg.optim.grad_clip, use_loss_scale, cfg.train.loss_scale_init,
                     cfg.train.loss_scale_window, cfg.train.sink_size, cfg.model.moe_layer_num, cfg.num_experts,
                     reducer, metrics, topology.world_size, topology.tp, OverflowCheck(mode, overflow_reduce),
                     rank_slots=moe_layers[0].num_rank_slots if moe_layers else 1, dropout_seed=cfg.train.seed)
    if cfg.train.gradient_accumulation_steps > 1:
        step = AccumulatingTrainStep(step, cfg.train.gradient_accumulation_steps)
    return step, net


def moe_bytes(cfg, net, topology):
    """CommCounter of one micro-batch's MoE exchange as the layers send it (None: no exchange);
    a step sends train.gradient_accumulation_steps of them."""
    layers = [cell for _, cell in net.cells_and_names() if isinstance(cell, MoELayer)]
    if not layers or topology.world_size == 1:
        return None
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    capacity = layers[0].capacity(tokens)
    if layers[0].two_tier:  # the shapes the two-tier exchange sends
        counter = register_tiered_exchange_bytes(CommCounter(topology), topology, cfg.num_experts, capacity,
                                                 layers[0].remote_capacity(tokens), cfg.model.hidden_size,
                                                 cfg.compute_dtype, cfg.parallel.groupwise_a2a, len(layers),
                                                 layers[0].units)
    else:
        counter = register_exchange_bytes(CommCounter(topology), topology, cfg.num_experts, capacity,
                                          cfg.model.hidden_size, cfg.compute_dtype, cfg.parallel.groupwise_a2a,
                                          len(layers))
    return counter


def comm_summary(cfg, net, topology):
    """One line: MoE communication bytes per step of this (possibly virtual) rank and of the cluster."""
    counter = moe_bytes(cfg, net, topology)
    if counter is None:
        return "[train] MoE communication per step: none (a single rank holds every expert)"
    k = cfg.train.gradient_accumulation_steps
    totals = {key: value * k for key, value in counter.totals().items()}
    world = {key: value * k for key, value in counter.world_totals().items()}
    return (f"[train] MoE communication per step of rank {topology.rank} (of {topology.world_size}, "
            f"{topology.nodes} nodes): intra-node {totals['intra'] / 2**20:.2f} MiB, "
            f"inter-node {totals['inter'] / 2**20:.2f} MiB; all ranks: inter-node {world['inter'] / 2**20:.2f} MiB")


def sink_jit_config():
    """The jit_config that makes ms.data_sink one device loop of sink_size steps on Ascend 910A.

    mindspore/train/data_sink.py (data_sink): without a jit_config the dataset is
    sent with loop 1 and the returned function launches the step sink_size times
    from the host; with one, the queue is built for sink_size steps and, in
    GRAPH mode on 910A with jit_level "" (or with jit_level "O2"), one call runs
    all sink_size steps on the device. On 910B with jit_level "" the jitted step
    is still called sink_size times from the host. exc_mode "sink" loads the
    whole graph on the device (mindspore/graph/jit_config.py).
    """
    return ms.JitConfig(jit_level="", exc_mode="sink")


def sink_runner(cfg, step_cell, dataset):
    """A function running sink_size steps per call. Ascend: one data-sink call (see
    sink_jit_config); CPU (MindSpore has no data sinking there): a host loop over the
    dataset. Either way every step's metrics land in the step cell's ring buffers.

    With gradient accumulation (an AccumulatingTrainStep; the dataset yields micro-batches)
    each step is k calls of step_cell.micro and one of step_cell.apply_update: on Ascend the k
    micro-batches are one data-sink loop of `micro` (sink_size k), then `apply_update` runs from
    the host, so a device loop is one step's micro-batches instead of sink_size steps."""
    k = getattr(step_cell, "accumulation_steps", 1)
    if k > 1:
        if cfg.parallel.device_target == "Ascend":
            micro_sink = ms.data_sink(step_cell.micro, dataset, sink_size=k, jit_config=sink_jit_config())

            def run_accumulating_sink():
                for _ in range(cfg.train.sink_size):
                    micro_sink()
                    step_cell.apply_update()
            return run_accumulating_sink
        micro_iterator = dataset.create_tuple_iterator(num_epochs=1)

        def run_accumulating_host_loop():
            for _ in range(cfg.train.sink_size):
                step_cell.run_step(next(micro_iterator) for _ in range(k))
        return run_accumulating_host_loop
    if cfg.parallel.device_target == "Ascend":
        return ms.data_sink(step_cell, dataset, sink_size=cfg.train.sink_size, jit_config=sink_jit_config())
    iterator = dataset.create_tuple_iterator(num_epochs=1)

    def run_host_loop():
        for _ in range(cfg.train.sink_size):
            ids, domains = next(iterator)
            step_cell(ids, domains)
    return run_host_loop


class Barrier(nn.Cell):
    """Every rank waits here until all have arrived (an AllReduce over the world group)."""

    def __init__(self, topology, backend):
        super().__init__()
        self.reduce = AllReduce(list(range(topology.world_size)), backend, topology, "checkpoint_barrier")

    def construct(self, x):
        return self.reduce(x)


def make_barrier(ctx):
    """A function that blocks until every rank called it (nothing to wait for in one process) and returns
    the sum over ranks of the values they passed (float32: exact for integers below 2**24)."""
    if not ctx.distributed or ctx.topology.world_size == 1:
        return lambda value=1.0: float(value)
    cell = Barrier(ctx.topology, ctx.backend)
    return lambda value=1.0: float(cell(ms.Tensor(np.full(1, value, np.float32))).asnumpy()[0])


def prepare_run_folder(cfg, identity, resume, overwrite, allow_changes, rank, barrier, log):
    """Refuse to train into an existing run unless --resume / --overwrite; check the stored config
    and dataset on --resume and that the folder can be created. Before any model is built; writes
    nothing: returns the function that creates the folder (create_run_folder)."""
    output_dir = cfg.train.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError("train.output_dir", output_dir, "a folder (a file of that name exists)")
    exists = checkpoint.holds_run(output_dir)
    if exists and not resume and not overwrite:
        raise ConfigError("train.output_dir", output_dir, "a folder without an earlier run: it holds one; pass "
                                                          "--resume to continue it or --overwrite to move it aside")
    if resume and overwrite:
        raise ConfigError("--overwrite", True, "not together with --resume")
    stored = checkpoint.read_run_file(output_dir) if resume else None
    if stored is not None:
        run_identity.check_compatible(stored["config"], cfg.to_dict(), stored.get("dataset"), identity,
                                    allowed=allow_changes, what=f"the run in {output_dir}")
    check_creatable(output_dir, "train.output_dir")
    return lambda: create_run_folder(cfg, identity, exists and overwrite, stored is None or bool(allow_changes),
                                     rank, barrier, log)


def create_run_folder(cfg, identity, move_aside, write_config, rank, barrier, log):
    """The writes prepare_run_folder checked, once everything that can fail before step 1 has passed
    (the model built, the checkpoint to resume or start from loaded). Returns the earlier run's new
    place when --overwrite moved it aside (undo_fresh_start moves it back), else None."""
    output_dir, moved = cfg.train.output_dir, None
    barrier()  # every rank has looked at the folder before rank 0 changes it
    if rank == 0:
        if move_aside:
            moved = checkpoint.move_aside(output_dir)
            log(f"[train] --overwrite: the earlier run moved to {moved}")
        checkpoint.check_writable(output_dir, "train.output_dir")
        if write_config:
            checkpoint.write_run_file(output_dir, cfg.to_dict(), identity)
    barrier()
    check_shared_folder(output_dir, rank, barrier)  # every rank sees what rank 0 writes there
    checkpoint.check_writable(checkpoint.rank_dir(output_dir, rank), "train.output_dir")
    return moved


def resume_state(cfg, step_cell, ctx, rank, global_batch, allow_batch_change, log):
    """Load the newest complete checkpoint (any layout) into step_cell -> (step, samples consumed)."""
    output_dir = cfg.train.output_dir
    found = checkpoint.latest_complete(output_dir)
    if found is None:
        log(f"[train] --resume: no complete checkpoint in {checkpoint.checkpoints_dir(output_dir)}; "
            "starting from step 0")
        return 0, 0
    step, marker = found
    stored_batch = marker.get("global_batch")
    if stored_batch is not None and stored_batch != global_batch and not allow_batch_change:
        raise ConfigError("train.batch_size", cfg.train.batch_size,
                          f"a per-rank batch giving the run's global batch {stored_batch} (now {global_batch}); "
                          "pass --allow-batch-change to change it deliberately")
    source = checkpoint.open_source(output_dir, "--resume", step)
    layout = checkpoint.layout_of(ctx.topology, ctx.distributed)
    checkpoint.load_state(step_cell, source, layout, rank, "--resume")
    samples = marker.get("samples_consumed", step * global_batch if stored_batch is None else step * stored_batch)
    moved = "" if checkpoint.same_layout(source.layout, layout) else \
        f" (resharded from tp={source.layout['tp']} ep={source.layout['ep']} on {source.layout['world_size']} ranks)"
    log(f"[train] resumed from {source.where} at step {step}{moved}")
    return step, samples


def kept_note(step, where, resume_command):
    """What an interrupt leaves: the last complete checkpoint and the command that continues from it."""
    return f"last complete checkpoint: step {step} ({where}); resume with: {resume_command}"


def train(cfg, resume=False, log=print, stop_after=None, overwrite=False, allow_changes=(),
          allow_batch_change=False, resume_command="the same command with --resume"):
    """Run training; returns a summary dict (steps, losses per step, tokens/s, wall time).

    stop_after: end the run after this step (a multiple of sink_size) as if the
    job were killed there, without touching the schedule (tests, preemption drills).
    overwrite: move an earlier run in train.output_dir aside first. allow_changes:
    config/dataset fields (section.key, data.<key>, 'all') that may differ from the
    run's on --resume. allow_batch_change: the global batch may differ on --resume. resume_command:
    what an interrupt names as the command that continues the run.
    """
    set_device(cfg)
    ms.set_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    meta = dataset_meta(cfg, checksums=False)  # sizes on every process; sha256 on one rank below
    identity = run_identity.dataset_identity(cfg)
    ctx = parallel_context(cfg)
    topology = ctx.topology
    rank = topology.rank if ctx.distributed else 0
    barrier = make_barrier(ctx)
    verify_on_one_rank(cfg.data.dataset_dir, rank, barrier, cfg.data.verify_checksums)
    for flag, given in (("--allow-batch-change", allow_batch_change), ("--allow-config-change", allow_changes)):
        if given and not resume:
            log(f"[train] note: {flag} has no effect without --resume (nothing is compared with an earlier run)")
    if cfg.parallel.optimizer_shard and not (ctx.distributed and topology.world_size > 1):
        log("[train] note: parallel.optimizer_shard has no effect in a single process (it keeps whole Adam moments)")
    create_folder = prepare_run_folder(cfg, identity, resume, overwrite, allow_changes, rank, barrier, log)
    if resume:  # before anything is built: a resume that moves domains to other experts is refused or said
        check_resume_placement(cfg.train.output_dir, domain_placement(cfg, meta, topology), allow_changes, log)
    existed = os.path.isdir(cfg.train.output_dir)
    try:
        return train_steps(cfg, ctx, meta, identity, resume, log, stop_after, allow_batch_change, barrier,
                           create_folder, resume_command)
    except BaseException:
        with ctrl_c_deferred():
            if rank == 0 and not resume and not checkpoint.complete_steps(cfg.train.output_dir):
                undo_fresh_start(cfg.train.output_dir, existed)
        raise


def undo_fresh_start(output_dir, existed):
    """A new run that ended before its first checkpoint leaves nothing that looks like a run: the files this
    process created go, the folder too if it made it, and an earlier run --overwrite moved aside comes back."""
    if output_dir not in _created_runs:  # failed before creating anything: nothing to undo
        return
    moved = _created_runs.pop(output_dir)
    if os.path.isdir(output_dir):
        remove_run_files(output_dir, remove_folder=not existed or moved is not None)
    if moved is not None:
        os.rename(moved, output_dir)
    state = "holds its earlier run again" if moved else "is as it was" if existed else "was removed"
    note_for_interrupt(f"no step was completed, nothing kept ({output_dir} {state})")


_created_runs = {}  # output_dir -> where --overwrite moved its earlier run (or None), until the first checkpoint


def train_steps(cfg, ctx, meta, identity, resume, log, stop_after, allow_batch_change, barrier, create_folder,
                resume_command):
    """train() once the run folder is checked: build, load, create the folder, run the steps."""
    topology = ctx.topology
    rank = topology.rank if ctx.distributed else 0
    output_dir = cfg.train.output_dir
    dp_size, dp_rank = (topology.dp, topology.dp_rank()) if ctx.distributed else (1, 0)
    groups, group_ranks, batch_multiplier = (1, None, 1) if ctx.distributed else single_process_groups(cfg, topology)
    batch_size = cfg.train.batch_size * batch_multiplier
    global_batch = batch_size * dp_size
    step_cell, net = build_train_step(cfg, meta, ctx, groups, group_ranks)
    layout = checkpoint.layout_of(topology, ctx.distributed)
    start_step = samples = 0
    note_for_interrupt("no step was completed; nothing was written")
    if resume:
        start_step, samples = resume_state(cfg, step_cell, ctx, rank, global_batch, allow_batch_change, log)
        if start_step:
            note_for_interrupt(kept_note(start_step, output_dir, resume_command))
    if start_step == 0:  # the same full model from the seed whatever the layout (docs/parallelism.md)
        initialise_weights(net, cfg.train.seed, cfg.model, topology if ctx.distributed else None)
    if start_step == 0 and cfg.train.init_checkpoint:
        checkpoint.load_resharded(net, cfg.train.init_checkpoint, topology if ctx.distributed else None)
        log(f"[train] initial weights from {cfg.train.init_checkpoint}")
    _created_runs[output_dir] = create_folder()
    if start_step == 0 and not ctx.distributed:
        checkpoint.save_model(net, os.path.join(output_dir, "initial_weights.ckpt"))
    log(comm_summary(cfg, net, topology))
    counter = moe_bytes(cfg, net, topology)
    micro_steps = cfg.train.gradient_accumulation_steps
    inter_bytes = {"rank": counter.totals()["inter"] * micro_steps,
                   "cluster": counter.world_totals()["inter"] * micro_steps} \
        if counter is not None else {"rank": 0, "cluster": 0}  # per step (k micro-batches), as the exchange sends them
    if start_step >= cfg.train.train_steps:
        log(f"[train] nothing to do: step {start_step} >= train.train_steps={cfg.train.train_steps}")
        return {"steps": start_step, "losses": {}, "tokens_per_s": 0.0, "seconds": 0.0}

    start_batch = samples // global_batch  # = start_step while the global batch is unchanged
    if samples % global_batch:
        log(f"[train] the global batch changed: {samples} samples were consumed; continuing at batch "
            f"{start_batch} of {global_batch} samples")
    if ctx.distributed:
        read_ranks = [dp_rank]
    else:
        read_ranks = list(range(topology.dp)) if groups > 1 else [topology.dp_rank()]
    placement = domain_placement(cfg, meta, topology)
    sample_order = placement_sample_order(cfg, placement, read_ranks)
    dataset = create_dataset(cfg.data.dataset_dir, "train", batch_size, dp_size, dp_rank,
                             shuffle=cfg.data.shuffle, seed=cfg.data.seed, start_batch=start_batch, repeat=True,
                             sample_order=sample_order, micro_batches=cfg.train.gradient_accumulation_steps,
                             groups=groups)
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
        f"{cfg.compute_dtype}, steps {start_step}..{cfg.train.train_steps}, {tokens_per_step} tokens/step"
        + (f" in {cfg.train.gradient_accumulation_steps} micro-batches of {cfg.train.micro_batch_size} sequences "
           f"per data-parallel rank" if cfg.train.gradient_accumulation_steps > 1 else ""))
    if cfg.train.recompute == "attention":
        log("[train] note: train.recompute=attention saves no memory in MindSpore 2.10 with this model's linears "
            "(the copies run in the forward; pangu_sigma/model/recompute.py); block does")
    end_step = cfg.train.train_steps if stop_after is None else min(stop_after, cfg.train.train_steps)
    for first in range(start_step, end_step, sink):
        tic = time.time()
        # Ctrl-C and SIGTERM wait for the end of the sink: in the first one, a KeyboardInterrupt inside graph
        # compilation would print MindSpore's compile trace; later, MindSpore's own SIGINT handler would end
        # the process without a word (ctrl_c_deferred)
        with ctrl_c_deferred():
            run_sink()
            scalars = step_cell.metrics_scalars.asnumpy()  # [sink, K]
            load = step_cell.metrics_load.asnumpy()  # [sink, M, E]
            dropped = step_cell.metrics_dropped.asnumpy()  # [sink, M, 3]: drops (node-local, remote tier), rerouted
            local = step_cell.metrics_local.asnumpy()  # [sink, M, P]: per data-parallel rank
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
                             dropped=dropped[i][:, :2].sum(-1).tolist(), local=local[i].sum(-1).tolist(),
                             dropped_remote=dropped[i][:, 1].tolist(), local_by_rank=local[i].tolist(),
                             moe_inter_node_bytes=inter_bytes["rank"],
                             moe_inter_node_bytes_cluster=inter_bytes["cluster"],
                             **({"rerouted": dropped[i][:, 2].tolist()} if cfg.moe.reroute_overflow else {})))
            if step % cfg.logging.expert_stats_steps == 0 or step == cfg.train.train_steps:
                shown = stats_since[1] if cfg.moe.reroute_overflow else stats_since[1][:, :2]  # [M, 3 | 2]
                log(expert_table(stats_since[0], shown, stats_since[2],
                                 first_layer=cfg.model.num_layers - cfg.model.moe_layer_num,
                                 title=f"expert load, steps up to {step}"))
                stats_since = None
        last = first + sink
        if (cfg.checkpoint.save_steps and last % cfg.checkpoint.save_steps == 0) or last == cfg.train.train_steps:
            consumed = samples + (last - start_step) * global_batch
            with ctrl_c_deferred():  # a save is finished, not cut (no temporaries left; the line names it)
                path = checkpoint.save_rank(step_cell, output_dir, rank, last, {
                    "batches_consumed": last, "router": cfg.moe.router, "config": cfg.to_dict(),
                    "dataset": identity, "layout": layout})
                barrier()  # every rank's files are written
                if rank == 0:
                    checkpoint.mark_complete(output_dir, last, layout, {"global_batch": global_batch,
                                                                        "samples_consumed": consumed,
                                                                        MARKER_KEY: placement_map(placement)})
                barrier()  # the marker exists before anyone prunes
                checkpoint.prune(output_dir, rank, cfg.checkpoint.keep_last, layout["world_size"])
                _created_runs.pop(output_dir, None)
                note_for_interrupt(kept_note(last, path, resume_command))
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
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint "
                        "(the parallel layout may differ: weights and optimizer state are resharded)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train.output_dir holds a run: move it aside as a whole (to <dir>.old-<N>) first")
    parser.add_argument("--allow-config-change", action="append", default=[], metavar="FIELD[,FIELD]",
                        help="with --resume: config or dataset fields allowed to differ from the run's "
                             "(e.g. optim.lr; data.tokenizer_sha256; 'all')")
    parser.add_argument("--allow-batch-change", action="store_true",
                        help="with --resume: the global batch (batch_size x dp) may differ from the run's")
    parser.add_argument("--paths-from", metavar="DIR",
                        help="resolve relative data/output/checkpoint paths of the config against DIR "
                             "(the launch scripts pass the folder they were started from)")
    return parser.parse_args(argv)


def resume_command(argv):
    """This command line with --resume instead of --overwrite (shell-quoted)."""
    import shlex

    argv = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--overwrite"]
    return shlex.join(["python", "-m", "pangu_sigma.training.train"] + argv +
                      ([] if "--resume" in argv else ["--resume"]))


def main(argv=None):
    args = parse_args(argv)
    def run():
        cfg = load_config(args.config, args.set)
        if args.paths_from:
            cfg = resolve_paths(cfg, args.paths_from)
        train(cfg, resume=args.resume, overwrite=args.overwrite,
              allow_changes=run_identity.split_fields(args.allow_config_change),
              allow_batch_change=args.allow_batch_change, resume_command=resume_command(argv))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
