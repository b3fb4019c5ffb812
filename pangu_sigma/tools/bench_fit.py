"""Benchmark (not a test): the per-step cost of activation recomputation and of optimizer-state
sharding on CPU, as ratios to the plain step, timed in one interleaved run. One JSON line per case.

    python -m pangu_sigma.tools.bench_fit recompute [--rounds 5] [--set a.b=c ...]
    python -m pangu_sigma.tools.bench_fit zero --workers 2 [--rounds 5]      # launches msrun
    python -m pangu_sigma.tools.bench_fit accumulation [--rounds 5]

recompute: one process builds the same train step at every train.recompute level
(GRAPH mode), compiles each, then times round after round one step of each level
in turn (interleaved, so machine load hits every level alike); the median per level
and its ratio to `none`.
accumulation: gradient accumulation over k = 1, 2, 4 micro-batches of one batch, as
AccumulatingTrainStep runs it (a host loop over two compiled graphs: k micro-batch calls,
one update) and as one graph with the k micro-batches unrolled in it (the alternative);
compile seconds (the first step) and the median step, interleaved.
zero: msrun with N CPU workers (data parallel, emulated collectives); each worker
builds the step with parallel.optimizer_shard false and true and times them
interleaved the same way; rank 0 prints the lines.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from locmoe.errors import OneLineArgumentParser, end_quiet_start, run_cli

BASE = ["model.vocab_size=1000", "model.seq_length=128", "model.hidden_size=256", "model.num_heads=8",
        "model.ffn_hidden_size=1024", "model.num_layers=4", "model.moe_layer_num=2", "model.dropout_rate=0.0",
        "train.batch_size=8", "parallel.virtual_world_size=0", "parallel.expert_parallel=1",
        "moe.expert_num_per_dp_dim=4"]
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "configs", "cpu_tiny.yaml")


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def _batch(cfg, rows):
    import numpy as np
    import mindspore as ms
    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.model.vocab_size, (rows, cfg.model.seq_length + 1)).astype(np.int32)  # [B, S+1]
    return ms.Tensor(ids), ms.Tensor(np.zeros(rows, np.int32))


def _interleaved(cells, inputs, rounds):
    """{name: [seconds per step]}: one warm-up step each, then `rounds` rounds of one step of each."""
    for cell in cells.values():
        cell(*inputs)
    times = {name: [] for name in cells}
    for _ in range(rounds):
        for name, cell in cells.items():
            tic = time.perf_counter()
            cell(*inputs)
            cell.metrics_scalars.asnumpy()  # wait for the step
            times[name].append(time.perf_counter() - tic)
    return times


def _report(times, plain, extra):
    base = _median(times[plain])
    for name, values in times.items():
        print(json.dumps(dict(extra, case=name, median_ms=round(_median(values) * 1e3, 2),
                              ratio_to_plain=round(_median(values) / base, 3), rounds=len(values))), flush=True)


def bench_recompute(rounds, overrides):
    import mindspore as ms
    from locmoe.parallel_context import ParallelContext
    from pangu_sigma.build import single_process_topology
    from pangu_sigma.config import load_config
    from pangu_sigma.training.train import build_train_step

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    cells = {}
    for level in ("none", "attention", "block"):
        cfg = load_config(CONFIG, BASE + list(overrides) + [f"train.recompute={level}"])
        ms.set_seed(1)
        ctx = ParallelContext(single_process_topology(cfg), "emulated", distributed=False)
        cells[f"recompute_{level}"], _ = build_train_step(cfg, {"vocab_size": cfg.model.vocab_size,
                                                                "seq_length": cfg.model.seq_length}, ctx)
    times = _interleaved(cells, _batch(cfg, cfg.train.batch_size), rounds)
    _report(times, "recompute_none", {"bench": "recompute", "tokens": cfg.train.batch_size * cfg.model.seq_length})


def bench_accumulation(rounds, overrides):
    import mindspore as ms
    from mindspore import nn
    from locmoe.parallel_context import ParallelContext
    from pangu_sigma.build import single_process_topology
    from pangu_sigma.config import load_config
    from pangu_sigma.training.train import build_train_step

    class InGraph(nn.Cell):
        """The k micro-batches and the update unrolled in one graph."""

        def __init__(self, step, k):
            super().__init__(auto_prefix=False)
            self.step, self.k = step, k

        def construct(self, ids, domains):
            m = ids.shape[0] // self.k
            for j in range(self.k):
                self.step.micro(ids[j * m:(j + 1) * m], domains[j * m:(j + 1) * m])  # [m, S+1]
            return self.step.apply_update()

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    runners = {}
    for k in (1, 2, 4):
        cfg = load_config(CONFIG, BASE + ["data.placement=iid"] + list(overrides)
                          + [f"train.gradient_accumulation_steps={k}"])
        meta = {"vocab_size": cfg.model.vocab_size, "seq_length": cfg.model.seq_length}
        ids, domains = _batch(cfg, cfg.train.batch_size)
        m = cfg.train.batch_size // k
        for mode in (("host_loop", "in_graph") if k > 1 else ("plain",)):
            ms.set_seed(1)
            ctx = ParallelContext(single_process_topology(cfg), "emulated", distributed=False)
            step, _ = build_train_step(cfg, meta, ctx)
            if mode == "plain":
                run = (lambda s: lambda: s(ids, domains))(step)
            elif mode == "host_loop":
                micro = [(ids[j * m:(j + 1) * m], domains[j * m:(j + 1) * m]) for j in range(k)]
                run = (lambda s, b: lambda: s.run_step(b))(step, micro)
            else:
                run = (lambda c: lambda: c(ids, domains))(InGraph(step, k))
            runners[f"k{k}_{mode}"] = (run, step)
    compile_s = {}
    for name, (run, step) in runners.items():
        tic = time.perf_counter()
        run()
        step.metrics_scalars.asnumpy()
        compile_s[name] = time.perf_counter() - tic
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (run, step) in runners.items():
            tic = time.perf_counter()
            run()
            step.metrics_scalars.asnumpy()  # wait for the step
            times[name].append(time.perf_counter() - tic)
    base = _median(times["k1_plain"])
    for name, values in times.items():
        print(json.dumps({"bench": "accumulation", "case": name, "first_step_s": round(compile_s[name], 2),
                          "median_ms": round(_median(values) * 1e3, 2),
                          "ratio_to_plain": round(_median(values) / base, 3), "rounds": len(values),
                          "tokens_per_step": cfg.train.batch_size * cfg.model.seq_length}), flush=True)


def zero_worker(rounds, overrides):
    """Runs under msrun: data parallel over all workers, optimizer sharding off vs on."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    from locmoe.comm import create_topology_groups
    from locmoe.parallel_context import ParallelContext
    from locmoe.topology import Topology
    from pangu_sigma.config import load_config
    from pangu_sigma.training.train import build_train_step

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    init()
    rank, world = get_rank(), get_group_size()
    cells = {}
    for shard in (False, True):
        cfg = load_config(CONFIG, BASE + list(overrides) + [f"parallel.optimizer_shard={str(shard).lower()}",
                                                            f"parallel.devices_per_node={world}"])
        topology = Topology(world_size=world, tp=1, ep=1, num_experts=cfg.num_experts, devices_per_node=world,
                            rank=rank)
        create_topology_groups(topology)
        ms.set_seed(1)
        ctx = ParallelContext(topology, "emulated", distributed=True)
        cells[f"optimizer_shard_{str(shard).lower()}"], net = build_train_step(
            cfg, {"vocab_size": cfg.model.vocab_size, "seq_length": cfg.model.seq_length}, ctx)
    times = _interleaved(cells, _batch(cfg, cfg.train.batch_size), rounds)
    if rank == 0:
        params = sum(p.size for p in net.trainable_params())
        _report(times, "optimizer_shard_false", {"bench": "optimizer_shard", "workers": world, "params": params})
    import mindspore.ops as ops
    import numpy as np
    ops.AllReduce()(ms.Tensor(np.ones(1, np.float32))).asnumpy()  # leave together


def bench_zero(workers, rounds, overrides):
    bindir = os.path.dirname(sys.executable)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as logs:
        cmd = [os.path.join(bindir, "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
               f"--master_port={port}", f"--log_dir={logs}", "--join=True", os.path.abspath(__file__),
               "zero-worker", "--rounds", str(rounds)] + [a for o in overrides for a in ("--set", o)]
        env = dict(os.environ, GLOG_v="3", PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        with open(os.path.join(logs, "worker_0.log"), encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("{"):
                    print(line.strip(), flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"msrun exited {proc.returncode}: {proc.stderr.strip()[-300:]}")


def main(argv=None):
    parser = OneLineArgumentParser(description="Per-step cost of recomputation, optimizer sharding and gradient "
                                                       "accumulation (CPU).")
    parser.add_argument("what", choices=["recompute", "zero", "zero-worker", "accumulation"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    if args.what == "zero-worker":  # an msrun worker of bench_zero: no run_cli, so the start-up's hold ends here
        end_quiet_start()
        zero_worker(args.rounds, args.set)
        sys.stdout.flush()
        os._exit(0)  # see tests/workers/equivalence_worker.py: skip MindSpore's CPU finalizer
    if args.what == "accumulation":
        return run_cli(lambda: bench_accumulation(args.rounds, args.set))
    return run_cli(lambda: bench_recompute(args.rounds, args.set) if args.what == "recompute"
                   else bench_zero(args.workers, args.rounds, args.set))


if __name__ == "__main__":
    sys.exit(main())
