"""msrun worker: run the named parallel cases on this rank and save losses and parameters.

argv: OUT_DIR CASE [CASE ...]; expects OUT_DIR/<case>_initial.npz (full initial parameters), except for
the seed cases (pc.SEED_CASES), which initialise from the seed and also save 'init/<name>' (initial shards).
Writes OUT_DIR/<case>_rank<r>.npz with 'losses', 'param/<name>' arrays (this rank's shards)
and 'spec/<name>' = [dim, parts] for every TP-sharded parameter.
"""
import os
import sys
import time

import numpy as np
import mindspore as ms
from mindspore.communication import get_rank, init

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parallel_cases as pc  # noqa: E402

from locmoe.comm import create_topology_groups  # noqa: E402
from locmoe.parallel_context import ParallelContext  # noqa: E402
from pangu_sigma.parallel.init_weights import initialise  # noqa: E402
from pangu_sigma.parallel.reshard import shard_full_params, tp_shard_specs  # noqa: E402


def resume_check(name, step_cell, out_dir, rank, ids, domains):
    """Save the sharded state after the steps, run one more step; then a fresh cell loads the
    checkpoint and runs the same step. -> arrays for the test (both runs' loss and parameters,
    and this rank's moment slices)."""
    from pangu_sigma.training import checkpoint

    topology = pc.topology_of(name, rank)
    layout = checkpoint.layout_of(topology, True)
    path = checkpoint.save_rank(step_cell, os.path.join(out_dir, f"{name}_ckpt"), rank, pc.STEPS, {"case": name})
    arrays = {f"moment/{p.name}": p.asnumpy() for p in step_cell.get_parameters() if p.name.startswith("zero_")}
    pc.run_one(step_cell, ids, domains)
    arrays["continued_loss"] = step_cell.metrics_scalars.asnumpy()[0, 0]
    arrays.update({f"continued/{p.name}": p.asnumpy() for p in step_cell.get_parameters()
                   if not p.name.startswith("metrics_")})
    fresh, _ = pc.build(name, ParallelContext(topology, "emulated", distributed=True),
                        os.path.join(out_dir, f"{name}_resumed{rank}"))
    # the way --resume loads on the layout that wrote the checkpoint: this rank's own file
    checkpoint.load_state(fresh, checkpoint.StateSource({rank: path}, layout, {}, path), layout, rank)
    pc.run_one(fresh, ids, domains)
    arrays["resumed_loss"] = fresh.metrics_scalars.asnumpy()[0, 0]
    arrays.update({f"resumed/{p.name}": p.asnumpy() for p in fresh.get_parameters()
                   if not p.name.startswith("metrics_")})
    return arrays


def main():
    out_dir, names = sys.argv[1], sys.argv[2:]
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    init()
    rank = get_rank()
    for name in names:
        started = time.time()
        topology = pc.topology_of(name, rank)
        create_topology_groups(topology)
        ctx = ParallelContext(topology, "emulated", distributed=True)
        step_cell, net = pc.build(name, ctx, os.path.join(out_dir, f"{name}_run{rank}"))
        arrays = {}
        if name in pc.SEED_CASES:  # from the seed alone: each rank draws its own slices
            initialise(net, pc.SEED_CASES[name], pc.case_config(name, out_dir).model, topology)
            arrays.update({f"init/{k}": v for k, v in pc.params_of(net).items()})
        else:
            full = dict(np.load(os.path.join(out_dir, f"{name}_initial.npz")))
            pc.load_params(net, shard_full_params(full, net, topology))
        ids, domains = pc.global_batch(name)
        per_rank = ids.shape[0] // topology.dp
        rows = slice(topology.dp_rank() * per_rank, (topology.dp_rank() + 1) * per_rank)
        losses, stats = pc.run_steps(step_cell, ids[rows], domains[rows])
        arrays.update({f"param/{k}": v for k, v in pc.params_of(net).items()})
        arrays.update({f"stats/{k}": v for k, v in stats.items()})
        arrays.update({f"spec/{k}": np.array([v.dim, v.parts]) for k, v in tp_shard_specs(net).items()})
        if pc.OPTIONS.get(name, {}).get("parallel", {}).get("optimizer_shard"):
            arrays.update(resume_check(name, step_cell, out_dir, rank, ids[rows], domains[rows]))
        np.savez(os.path.join(out_dir, f"{name}_rank{rank}.npz"), losses=np.array(losses), **arrays)
        print(f"[worker {rank}] {name}: losses {losses} ({time.time() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
