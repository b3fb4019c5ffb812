"""Check plan's activation model (pangu_sigma.cluster.param_count) against MindSpore's own memory plan on CPU.

    python -m pangu_sigma.tools.memory_check [--batches 2 4 8] [--levels none block] [--set a.b=c ...]

What plan models: the bytes live at the peak of a GRAPH-mode train step when freed
memory is reused: the regime of Ascend, whose GRAPH-mode runtime plans every
operator output and workspace of the graph with memory reuse (SOMAS). Off Ascend
the default is no reuse: the installed libmindspore_core.so logs "Set
memory_optimize_level to O0 as default on other device"
(mindspore/core/utils/ms_context.cc, SetDeviceTargetFromInner) when the device is CPU.

What the CPU runtime does: it reuses nothing within a step. Measured (MindSpore
2.10, the BASE config below, GRAPH mode): the step's RSS growth tracks SOMAS's
"Total Dynamic Size (Upper Bound)", the sum of every intermediate tensor of the
step, with memory_optimize_level O0 and O1 alike (batch slope 220 MiB per
sequence for both; block recompute adds 686 MiB of RSS and 672 MiB of upper
bound at batch 8, because the recomputed forward adds tensors and nothing is
freed early). So peak RSS on CPU cannot check a model of the live set, and the
1.6-4.5x gaps of the first measurement were that regime, not the model.

Method. Each case runs in a fresh process in GRAPH mode with
`mindspore.runtime.set_memory(optimize_level="O1")` (mindspore/runtime/memory.py),
which makes the CPU backend run SOMAS on the compiled step graph
(mindspore/ccsrc/backend/common/somas/somas.cc, plugin/cpu/graph_optimizer/somas/cpu_somas.cc
in the wheel's libmindspore_backend_common.so / libmindspore_cpu.so). SOMAS logs,
at INFO level of the SESSION submodule, its statistics of the graph
(somas.cc UpdateSomasResultToGraph):
    Total Dynamic Size (Upper Bound)        sum of all intermediate tensors of the step
    Theoretical Optimal Size (Lower Bound)  the largest sum of the tensors live at one
                                            node, in the graph's execution order: the
                                            step's peak live memory with perfect reuse
    Reused Size(Allocate Size)              what its solver actually placed
MindSpore keeps no allocator statistics on CPU (mindspore/runtime/memory.py:
memory_stats() "For the CPU backend, a dictionary with empty data is always
returned"; MS_ALLOC_CONF=memory_tracker:True writes no memory blocks on CPU), so
the lower bound is the measurement: MindSpore's own count of the live tensors of
the graph it compiled, autodiff and recompute passes included, parameters and
optimizer moments excluded (they are not intermediates). tests/test_memory_check.py
checks its meaning on graphs whose live set is worked out by hand.

Measured activation part = lower bound - the batch-independent intercept of a
least-squares line through the batch sizes (one line per recompute level; what
stays is what grows with the batch: activations). The intercepts, read from
SOMAS's tensor list (MS_DEV_SAVE_GRAPHS=3 writes CPU_somas_pre_processed_info_0.ir:
every tensor's size, life start and end, producing node): without recomputation
0 MiB, the step peaks in the cross-entropy's backward before any parameter
gradient exists; with block recomputation 25 MiB, the peak moves to the
recomputed bottom block at the end of the backward, when the parameter gradients
(28.5 MiB in all here, plan's `gradients` item) are nearly all live. Predicted:
param_count.activation_bytes_recompute of the same config (float32 on CPU,
tp = ep = 1). The recompute factor (none / recompute at one batch size) is printed
for the peak (measured: lower bounds; predicted: activations + the float32
gradients plan holds through the step) and for the activation parts. The RSS
growth of the first step and the upper bound are printed beside them as the check
of the CPU regime.

Results (MindSpore 2.10 CPU, BASE, batches 2/4/8): predicted / measured activation
part 0.968 without recomputation and 1.034 with block recomputation; the peak
falls 2.0x / 2.7x / 3.3x with block recomputation against 2.3x / 2.9x / 3.3x
predicted. Attention-level recomputation leaves the peak unchanged to the byte:
the CPU kernel graph runs the recomputed attention during the forward (see
pangu_sigma/model/recompute.py), so the model's attention level is not confirmed here.

Prints one JSON line per case and a table.
"""
import json
import os
import re
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
# SOMAS's statistics block (INFO, SESSION submodule): log label -> our key
SOMAS_FIELDS = {"Total Dynamic Size (Upper Bound)": "upper_bound",
                "Theoretical Optimal Size (Lower Bound)": "lower_bound",
                "Reused Size(Allocate Size)": "allocated"}
# only the SESSION submodule at INFO (the SOMAS statistics), everything else at ERROR
SOMAS_LOG_ENV = {"GLOG_v": "3", "MS_SUBMODULE_LOG_v": "{SESSION:1}"}


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


def enable_somas():
    """GRAPH mode on CPU with SOMAS memory reuse planned (and its statistics logged)."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.runtime.set_memory(optimize_level="O1")


def parse_somas(log_text):
    """SOMAS statistics blocks in a MindSpore log -> [{'upper_bound', 'lower_bound', 'allocated'}], one per graph."""
    blocks, current = [], {}
    for line in log_text.splitlines():
        for label, key in SOMAS_FIELDS.items():
            match = re.match(re.escape(label) + r":\s*(\d+)\s*$", line.strip())
            if match:
                if key in current:
                    blocks.append(current)
                    current = {}
                current[key] = int(match.group(1))
    if current:
        blocks.append(current)
    return blocks


def measure_here(overrides):
    """In this process: build, compile, reset the peak, one step -> {'before', 'peak'} RSS bytes."""
    import numpy as np
    import mindspore as ms
    from locmoe.parallel_context import ParallelContext
    from pangu_sigma.build import single_process_topology
    from pangu_sigma.config import load_config
    from pangu_sigma.training.train import build_train_step

    enable_somas()
    cfg = load_config(CONFIG, list(BASE) + list(overrides))
    ms.set_seed(1)
    ctx = ParallelContext(single_process_topology(cfg), "emulated", distributed=False)
    vocab, seq, batch = cfg.model.vocab_size, cfg.model.seq_length, cfg.train.batch_size
    step, _ = build_train_step(cfg, {"vocab_size": vocab, "seq_length": seq}, ctx)
    rng = np.random.RandomState(0)
    ids = ms.Tensor(rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32))  # [B, S+1]
    domains = ms.Tensor(np.zeros(batch, np.int32))  # [B]
    step.compile(ids, domains)
    _reset_peak()
    before = _status()["VmRSS"]
    step(ids, domains)
    float(step.metrics_scalars.asnumpy()[0, 0])
    return {"before": before, "peak": _status()["VmHWM"]}


def run_logged(argv, timeout=900):
    """Run `python *argv` in a fresh interpreter with SOMAS's statistics logged -> (stdout, stderr)."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **SOMAS_LOG_ENV))
    if proc.returncode != 0:
        raise RuntimeError(f"memory case {argv[-1]} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout, proc.stderr


def predicted(overrides):
    """param_count's prediction for the same config -> {'predicted_activations', 'predicted_gradients'}:
    the activation bytes at the step's peak (train.recompute applied) and the float32 parameter
    gradients, which plan holds for the whole step (its `gradients` item)."""
    from pangu_sigma.cluster import param_count
    from pangu_sigma.config import load_config

    cfg = load_config(CONFIG, list(BASE) + list(overrides))
    return {"predicted_activations": sum(param_count.activation_bytes_recompute(cfg, 1, 1,
                                                                                cfg.train.recompute).values()),
            "predicted_gradients": param_count.params_per_device(cfg, 1, 1) * param_count.GRAD_BYTES}


def measure(batch, level, extra=()):
    """One case in a fresh interpreter (peak RSS is per process; set_memory once per process) -> dict."""
    overrides = [f"train.batch_size={batch}", f"train.recompute={level}", *extra]
    code = ("import json, sys; from pangu_sigma.tools.memory_check import measure_here; "
            "print('RESULT ' + json.dumps(measure_here(json.loads(sys.argv[1]))))")
    stdout, stderr = run_logged(["-c", code, json.dumps(overrides)])
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    graphs = parse_somas(stderr)
    if not lines or len(graphs) != 1:
        raise RuntimeError(f"memory case batch {batch} {level}: expected one RESULT line and one SOMAS statistics "
                           f"block (the train step graph), got {len(lines)} and {len(graphs)}")
    result = json.loads(lines[-1][len("RESULT "):])
    return {"batch": batch, "recompute": level, **graphs[0], "rss_growth": result["peak"] - result["before"],
            **predicted(overrides)}


def _fit_intercept(xs, ys):
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    return my - slope * mx


def compare(cases):
    """Add 'intercept' and 'measured_activations' (lower bound minus the per-level intercept) and the ratio."""
    for level in {c["recompute"] for c in cases}:
        group = [c for c in cases if c["recompute"] == level]
        intercept = _fit_intercept([c["batch"] for c in group], [c["lower_bound"] for c in group])
        for c in group:
            c["intercept"] = intercept
            c["measured_activations"] = c["lower_bound"] - intercept
            c["predicted_over_measured"] = c["predicted_activations"] / max(c["measured_activations"], 1.0)
    return cases


def recompute_factors(cases, level):
    """{batch: {'peak': (measured, predicted), 'activations': (measured, predicted)}}, factors none / level.

    peak: the step's live peak, measured = SOMAS lower bound; predicted = activations + gradients
    (plan's step memory above the parameters and moments). activations: the batch-dependent parts
    (measured_activations, predicted_activations)."""
    out = {}
    for batch in sorted({c["batch"] for c in cases}):
        pick = {c["recompute"]: c for c in cases if c["batch"] == batch}
        if "none" in pick and level in pick:
            off, on = pick["none"], pick[level]
            out[batch] = {
                "peak": (off["lower_bound"] / on["lower_bound"],
                         (off["predicted_activations"] + off["predicted_gradients"])
                         / (on["predicted_activations"] + on["predicted_gradients"])),
                "activations": (off["measured_activations"] / max(on["measured_activations"], 1.0),
                                off["predicted_activations"] / on["predicted_activations"]),
            }
    return out


def table(cases):
    mib = 2 ** 20
    lines = [f"{'batch':>5} {'recompute':<10}{'pred act':>9}{'meas act':>9}{'pred/meas':>10}"
             f"{'lower bd':>9}{'intercept':>10}{'upper bd':>9}{'RSS grow':>9}{'allocated':>10}   (MiB)"]
    for c in sorted(cases, key=lambda c: (c["batch"], c["recompute"])):
        lines.append(f"{c['batch']:>5} {c['recompute']:<10}{c['predicted_activations'] / mib:>9.1f}"
                     f"{c['measured_activations'] / mib:>9.1f}{c['predicted_over_measured']:>10.3f}"
                     f"{c['lower_bound'] / mib:>9.1f}{c['intercept'] / mib:>10.1f}{c['upper_bound'] / mib:>9.1f}"
                     f"{c['rss_growth'] / mib:>9.1f}{c['allocated'] / mib:>10.1f}")
    lines.append(f"gradients (predicted, float32, batch-independent): "
                 f"{cases[0]['predicted_gradients'] / mib:.1f} MiB")
    for level in sorted({c["recompute"] for c in cases} - {"none"}):
        for batch, factors in recompute_factors(cases, level).items():
            text = ", ".join(f"{what} measured {meas:.2f} / predicted {pred:.2f} (>= {0.75 * pred:.2f}?)"
                             for what, (meas, pred) in factors.items())
            lines.append(f"{batch:>5} none/{level} factor: {text}")
    return "\n".join(lines)


def main(argv=None):
    parser = OneLineArgumentParser(description="MindSpore's peak live step memory (SOMAS, CPU) vs plan's "
                                               "activation model.")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--levels", nargs="+", default=["none", "block"], choices=["none", "attention", "block"])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)

    def run():
        cases = [measure(batch, level, args.set) for batch in args.batches for level in args.levels]
        for case in compare(cases):
            print(json.dumps(case), flush=True)
        print(table(cases))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
