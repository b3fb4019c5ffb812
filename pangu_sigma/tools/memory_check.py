"""Check plan's activation model (pangu_sigma.cluster.param_count) against measured CPU memory.

    python -m pangu_sigma.tools.memory_check [--batches 4 8 16] [--levels none block]
                                             [--modes graph pynative] [--set a.b=c ...]

Method. MindSpore keeps no allocator statistics on CPU (mindspore/runtime/memory.py:
memory_stats() returns an empty dict and max_memory_allocated() 0 for the CPU backend),
so each case runs in a fresh process and reads the kernel's counters
(/proc/self/status VmRSS, VmHWM): the train step is built (and, in GRAPH mode,
compiled), VmHWM is reset to the current RSS (/proc/self/clear_refs, "5"), one
optimizer step runs, and `step growth` = VmHWM after it - VmRSS before it.
The step growth holds the activations plus batch-independent allocations made
during the first step (gradients, workspaces, the optimizer's temporaries), so
the activation part is the step growth minus the batch-independent intercept of
a least-squares line through the growths of the batch sizes (one line per
recompute level and mode). Predicted: param_count.activation_bytes_recompute
for the same config (float32 on CPU, tp = ep = 1).

The model is a statement about what autodiff keeps for the backward pass, with
freed memory reused (as MindSpore's memory reuse does on Ascend). Measured on
MindSpore 2.10 CPU (d 256, seq 256, 4 blocks + query layer, batch 4/8/16):
GRAPH mode grows by about 4.5x the predicted kept set and block recomputation
RAISES the step memory by ~23% (the recomputed forward adds buffers; freed
intermediates are evidently not reused within the step, and
runtime.set_memory(optimize_level="O1") and jit_level O1 change nothing), so
the CPU GRAPH runtime cannot check the model. PyNative frees tensors by
reference count: there the activation part is 1.6x the prediction without
recomputation and 2.8x with block recomputation, which lowers the step memory
by 1.4-1.7x against the 3.2x predicted. Both modes are printed.

Prints one JSON line per case and a table.
"""
import json
import os
import subprocess
import sys

from locmoe.errors import OneLineArgumentParser, run_cli

BASE = ["model.vocab_size=1000", "model.seq_length=256", "model.hidden_size=256", "model.num_heads=8",
        "model.ffn_hidden_size=1024", "model.num_layers=4", "model.moe_layer_num=2", "model.dropout_rate=0.0",
        "parallel.virtual_world_size=0", "parallel.expert_parallel=1", "moe.expert_num_per_dp_dim=4",
        # one token group, one tier, i.i.d. data: the memory of the model itself, not of the locality settings
        "moe.capacity_factor=1.25", "moe.remote_capacity_factor=0", "moe.num_domain_groups=1",
        "moe.domain_to_group=[]", "data.placement=iid"]
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "configs", "cpu_tiny.yaml")


def _status():
    out = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak():
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def measure_here(overrides, mode):
    """In this process: build, (compile,) reset the peak, one step -> {'before', 'peak'} bytes."""
    import numpy as np
    import mindspore as ms
    from locmoe.parallel_context import ParallelContext
    from pangu_sigma.build import single_process_topology
    from pangu_sigma.config import load_config
    from pangu_sigma.training.train import build_train_step

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    cfg = load_config(CONFIG, list(BASE) + list(overrides))
    ms.set_seed(1)
    ctx = ParallelContext(single_process_topology(cfg), "emulated", distributed=False)
    vocab, seq, batch = cfg.model.vocab_size, cfg.model.seq_length, cfg.train.batch_size
    step, _ = build_train_step(cfg, {"vocab_size": vocab, "seq_length": seq}, ctx)
    rng = np.random.RandomState(0)
    ids = ms.Tensor(rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32))  # [B, S+1]
    domains = ms.Tensor(np.zeros(batch, np.int32))  # [B]
    if mode == "graph":
        step.compile(ids, domains)
    _reset_peak()
    before = _status()["VmRSS"]
    step(ids, domains)
    float(step.metrics_scalars.asnumpy()[0, 0])
    return {"before": before, "peak": _status()["VmHWM"]}


def predicted_activations(overrides):
    """param_count's activation bytes (kept for backward) of the same config."""
    from pangu_sigma.cluster import param_count
    from pangu_sigma.config import load_config

    cfg = load_config(CONFIG, list(BASE) + list(overrides))
    return sum(param_count.activation_bytes_recompute(cfg, 1, 1, cfg.train.recompute).values())


def measure(batch, level, mode, extra=()):
    """One case in a fresh interpreter (peak RSS is per process) -> dict."""
    overrides = [f"train.batch_size={batch}", f"train.recompute={level}", *extra]
    code = ("import json, sys; from pangu_sigma.tools.memory_check import measure_here; "
            "print('RESULT ' + json.dumps(measure_here(json.loads(sys.argv[1]), sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(overrides), mode], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, GLOG_v="3"))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory case batch {batch} {level} {mode} failed: {proc.stderr.strip()[-500:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    return {"batch": batch, "recompute": level, "mode": mode, "step_growth": result["peak"] - result["before"],
            "peak_rss": result["peak"], "predicted_activations": predicted_activations(overrides)}


def _fit_intercept(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    return my - slope * mx


def compare(cases):
    """Add 'measured_activations' (step growth minus the per-(mode, level) intercept) and the ratio."""
    for key in {(c["mode"], c["recompute"]) for c in cases}:
        group = [c for c in cases if (c["mode"], c["recompute"]) == key]
        intercept = _fit_intercept([c["batch"] for c in group], [c["step_growth"] for c in group])
        for c in group:
            c["measured_activations"] = c["step_growth"] - intercept
            c["predicted_over_measured"] = c["predicted_activations"] / max(c["measured_activations"], 1.0)
    return cases


def table(cases):
    mib = 2 ** 20
    lines = [f"{'mode':<9}{'batch':>6} {'recompute':<10}{'growth MiB':>11}{'measured act MiB':>17}"
             f"{'predicted MiB':>14}{'pred/meas':>10}"]
    for c in sorted(cases, key=lambda c: (c["mode"], c["batch"], c["recompute"])):
        lines.append(f"{c['mode']:<9}{c['batch']:>6} {c['recompute']:<10}{c['step_growth'] / mib:>11.1f}"
                     f"{c['measured_activations'] / mib:>17.1f}{c['predicted_activations'] / mib:>14.1f}"
                     f"{c['predicted_over_measured']:>10.2f}")
    levels = sorted({c["recompute"] for c in cases})
    if "none" in levels:
        for mode in sorted({c["mode"] for c in cases}):
            for level in levels:
                if level == "none":
                    continue
                for batch in sorted({c["batch"] for c in cases}):
                    pick = {c["recompute"]: c for c in cases if c["mode"] == mode and c["batch"] == batch}
                    if "none" in pick and level in pick:
                        meas = pick["none"]["step_growth"] / max(pick[level]["step_growth"], 1)
                        pred = pick["none"]["predicted_activations"] / pick[level]["predicted_activations"]
                        lines.append(f"{mode:<9}{batch:>6} none/{level}: measured step-growth factor {meas:.2f}, "
                                     f"predicted activation factor {pred:.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = OneLineArgumentParser(description="Measured CPU step memory vs plan's activation model.")
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--levels", nargs="+", default=["none", "block"], choices=["none", "attention", "block"])
    parser.add_argument("--modes", nargs="+", default=["graph", "pynative"], choices=["graph", "pynative"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)

    def run():
        cases = []
        for mode in args.modes:
            for batch in args.batches:
                for level in args.levels:
                    cases.append(measure(batch, level, mode, args.set))
        for case in compare(cases):
            print(json.dumps(case), flush=True)
        print(table(cases))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
