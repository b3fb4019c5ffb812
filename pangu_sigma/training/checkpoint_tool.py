"""Merge and convert checkpoints between layouts, one parameter at a time.

    python -m pangu_sigma.training.checkpoint_tool merge SRC --output FILE.ckpt [--with-optimizer]
    python -m pangu_sigma.training.checkpoint_tool convert SRC --output RUN_DIR --world-size N --tp T
        (--ep E | --experts-per-rank K) [--devices-per-node D] [--with-optimizer [--optimizer-shard]]
    python -m pangu_sigma.training.checkpoint_tool info SRC

SRC: a .ckpt file (single-process, or a merged one) or a run folder (its newest
complete step, or --step N). merge writes one full checkpoint FILE.ckpt and its
description FILE.json (config, dataset, step, layout). convert writes a run-shaped
folder (checkpoints/rank_<r>/step_<N>.ckpt + .json, the completion marker and
run.json) that `train --resume` (with train.output_dir=RUN_DIR) and eval read.
--with-optimizer keeps the Adam moments, the optimizer step (the learning-rate
position), the train step and the loss scale; without it only the model's
parameters are written. Moments of a run with parallel.optimizer_shard (each rank's
ZeRO-1 slice) are gathered into full moments; merge writes them, and convert writes
them as the target's pieces (adam_m./adam_v., which a run with or without
optimizer_shard resumes from) or, with --optimizer-shard, as the target ranks'
ZeRO-1 slices (zero_m./zero_v.). Every full parameter is read, split and written before
the next is read, so the tool never holds the model twice; every output file is
written under a temporary name and renamed.
"""
import os
import sys

from locmoe.errors import ConfigError, OneLineArgumentParser, ctrl_c_deferred, run_cli
from locmoe.topology import Topology
from pangu_sigma.data.output_folder import check_creatable
from pangu_sigma.parallel import reshard, zero_layout
from pangu_sigma.training import checkpoint
from pangu_sigma.training.ckpt_stream import CheckpointWriter
from pangu_sigma.training.run_paths import remove_run_files


def num_experts_of(source):
    """Total expert count: from the source layout, else from an expert tensor's first axis."""
    if source.layout.get("num_experts"):
        return source.layout["num_experts"]
    for name in source.names(False):
        if "experts.w_in" in name:
            return int(source.full_shape(name)[0])
    return 1  # a dense model: no expert axis to split


def target_layout(world_size, tp, ep, experts_per_rank, devices_per_node, num_experts):
    """The layout dict of the conversion target, validated like a cluster topology."""
    if ep is None and experts_per_rank is None:
        raise ConfigError("--ep", None, "an expert-parallel degree (or --experts-per-rank)")
    if experts_per_rank is not None:
        if experts_per_rank < 1 or num_experts % experts_per_rank:
            raise ConfigError("--experts-per-rank", experts_per_rank, f"a divisor of the {num_experts} experts")
        derived = num_experts // experts_per_rank
        if ep is not None and ep != derived:
            raise ConfigError("--ep", ep, f"{derived} (= {num_experts} experts / --experts-per-rank "
                                          f"{experts_per_rank}) or omitted")
        ep = derived
    for field, value in (("--world-size", world_size), ("--tp", tp), ("--ep", ep),
                         ("--devices-per-node", devices_per_node)):
        if value < 1:
            raise ConfigError(field, value, "an integer >= 1")
    if num_experts % ep:
        raise ConfigError("--ep", ep, f"a divisor of the {num_experts} experts")
    try:
        Topology(world_size=world_size, tp=tp, ep=ep, num_experts=num_experts,
                 devices_per_node=min(devices_per_node, world_size), rank=0)
    except ConfigError as err:
        flag = {"op_level_model_parallel_num": "--tp", "expert_parallel": "--ep",
                "devices_per_node": "--devices-per-node"}.get(err.field, "--world-size")
        raise ConfigError(flag, err.value, err.valid) from None
    return {"world_size": world_size, "tp": tp, "ep": ep, "num_experts": num_experts,
            "devices_per_node": min(devices_per_node, world_size)}


def check_optimizer_state(source, with_optimizer):
    """--with-optimizer needs moments to keep: a model-only source has none."""
    if with_optimizer and not any(map(checkpoint.is_optimizer_state, source.names())):
        raise ConfigError("--with-optimizer", True, f"a source with optimizer state; {source.where} holds the "
                                                    "model's parameters only (leave the flag out)")


def merge(source, output, with_optimizer=False, log=print):
    """One full checkpoint (+ .json description) from any source; never replaces an existing file."""
    if not output.endswith(".ckpt"):
        raise ConfigError("--output", output, "a file name ending in .ckpt")
    for path in (output, output[:-5] + ".json"):
        if os.path.lexists(path):
            raise ConfigError("--output", output, f"a checkpoint that does not exist yet ({path} exists; merge "
                                                  "never replaces a file: remove it or choose another name)")
    check_creatable(os.path.dirname(os.path.abspath(output)), "--output")
    check_optimizer_state(source, with_optimizer)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    names = source.names(with_optimizer)
    with CheckpointWriter(output) as writer:
        for name in names:
            writer.write(name, source.full(name))
    layout = dict(checkpoint.FULL_LAYOUT, num_experts=num_experts_of(source))
    meta = dict(source.meta, layout=layout, merged_from=source.where, with_optimizer=with_optimizer)
    checkpoint.write_json_atomic(output[:-5] + ".json", meta)
    log(f"[checkpoint_tool] merged {len(names)} tensors of {source.where} into {output}")
    return output


def convert(source, output_dir, layout, with_optimizer=False, log=print, optimizer_shard=False):
    """A run-shaped folder holding source's state in `layout` (complete: marker written last).

    optimizer_shard: write the Adam moments as each rank's ZeRO-1 slice (parallel.optimizer_shard).
    """
    if optimizer_shard and not with_optimizer:
        raise ConfigError("--optimizer-shard", True, "together with --with-optimizer (it lays out the moments)")
    if optimizer_shard and layout["world_size"] == 1:
        raise ConfigError("--optimizer-shard", True, "a target of --world-size > 1 (one process keeps whole moments)")
    if checkpoint.holds_run(output_dir):
        raise ConfigError("--output", output_dir, "a folder without a run in it (it holds one)")
    check_optimizer_state(source, with_optimizer)
    existed = os.path.isdir(output_dir)
    checkpoint.check_writable(output_dir, "--output")
    try:
        return write_converted(source, output_dir, layout, with_optimizer, log, optimizer_shard)
    except BaseException:
        with ctrl_c_deferred():  # a failed conversion leaves nothing that looks like a run
            remove_run_files(output_dir, remove_folder=not existed)
        raise


def write_converted(source, output_dir, layout, with_optimizer, log, optimizer_shard):
    step = int(source.meta.get("step", 0))
    names = source.names(with_optimizer)
    ranks = range(layout["world_size"])
    writers = [CheckpointWriter(checkpoint.step_base(output_dir, r, step) + ".ckpt") for r in ranks]
    for writer in writers:
        writer.__enter__()
    try:
        for name in names:
            full = source.full(name)
            for r, writer in zip(ranks, writers):
                piece = reshard.shard_one(name, full, layout, r)
                if optimizer_shard and name.startswith(reshard.OPTIMIZER_PREFIXES):
                    writer.write(zero_layout.zero_name(name), zero_layout.slice_of(name, piece, layout, r))
                else:
                    writer.write(name, piece)
    except BaseException as err:
        for writer in writers:
            writer.__exit__(type(err), err, None)
        if isinstance(err, ValueError) and not isinstance(err, ConfigError):
            raise ConfigError("--tp", layout["tp"], f"a layout this model splits into ({err})") from None
        raise
    for writer in writers:
        writer.__exit__(None, None, None)
    meta = {k: v for k, v in source.meta.items() if k not in ("rank", "checkpoint", "layout")}
    for r in ranks:
        checkpoint.write_json_atomic(checkpoint.step_base(output_dir, r, step) + ".json",
                                     dict(meta, step=step, rank=r, layout=layout, converted_from=source.where,
                                          checkpoint=f"step_{step:08d}.ckpt"))
    if "config" in meta:
        checkpoint.write_run_file(output_dir, meta["config"], meta.get("dataset"))
    marker = {k: meta[k] for k in ("global_batch", "samples_consumed") if k in meta}
    checkpoint.mark_complete(output_dir, step, layout, marker)
    log(f"[checkpoint_tool] wrote step {step} of {source.where} as {layout['world_size']} ranks "
        f"(tp={layout['tp']}, ep={layout['ep']}, {layout['num_experts'] // layout['ep']} experts per rank"
        f"{', moments as ZeRO-1 slices' if optimizer_shard else ''}) into {output_dir}")
    return output_dir


def info(source, log=print):
    layout = source.layout
    log(f"[checkpoint_tool] {source.where}: layout world_size={layout['world_size']} tp={layout.get('tp')} "
        f"ep={layout.get('ep')} experts={layout.get('num_experts')}; step {source.meta.get('step')}; "
        f"{len(source.names(False))} model tensors, {len(source.names()) - len(source.names(False))} "
        f"optimizer/loop tensors")


def parse_args(argv):
    parser = OneLineArgumentParser(prog="python -m pangu_sigma.training.checkpoint_tool",
                                   description="Merge per-rank checkpoints; convert between TP/EP/DP layouts.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("merge", "convert", "info"):
        cmd = sub.add_parser(name)
        cmd.add_argument("source", help=".ckpt file or run folder")
        cmd.add_argument("--step", type=int, default=None, help="a complete step of a run folder (default: newest)")
        if name == "info":
            continue
        cmd.add_argument("--output", required=True)
        cmd.add_argument("--with-optimizer", action="store_true",
                         help="keep Adam moments, optimizer step (lr position), train step and loss scale")
        if name == "convert":
            cmd.add_argument("--world-size", type=int, required=True)
            cmd.add_argument("--tp", type=int, default=1)
            cmd.add_argument("--ep", type=int, default=None)
            cmd.add_argument("--experts-per-rank", type=int, default=None)
            cmd.add_argument("--devices-per-node", type=int, default=8)
            cmd.add_argument("--optimizer-shard", action="store_true",
                             help="write the moments as ZeRO-1 slices (parallel.optimizer_shard) of the target")
    return parser.parse_args(argv)


def main(argv=None, log=print):
    args = parse_args(argv)

    def run():
        source = checkpoint.open_source(args.source, "source", args.step)
        if args.command == "info":
            return info(source, log)
        if args.command == "merge":
            return merge(source, args.output, args.with_optimizer, log)
        layout = target_layout(args.world_size, args.tp, args.ep, args.experts_per_rank, args.devices_per_node,
                               num_experts_of(source))
        return convert(source, args.output, layout, args.with_optimizer, log, args.optimizer_shard)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
