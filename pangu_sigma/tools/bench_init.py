"""Benchmark of layout-independent initialisation (pangu_sigma.parallel.init_weights.draw_slice).

python -m pangu_sigma.tools.bench_init [--repeats 3] [--scale 1.0]
prints one JSON line per case: the slice a rank draws (a TP-8 column slice of a dense matrix, an expert
slice [E/ep, d, h/tp]), elements, the best of --repeats wall times and ns per element (wall and this
process's CPU time, which a shared machine disturbs less), then one line
estimating a 128N rank (1.61 B values, `plan`'s parameter count per rank) at the cases' mean rate.
"""
import json
import sys
import time

import numpy as np

from locmoe.errors import OneLineArgumentParser, run_cli
from pangu_sigma.parallel.init_weights import draw_slice

RANK_VALUES_128N = 1.61e9  # random values one rank of locmoe_128n draws (issue 22 item 7)


def cases(scale):
    """(name, full_shape, per-axis full indices of the local slice)."""
    d, h = int(5120 * scale), int(20480 * scale)
    tp, experts, ep = 8, 8, 4
    column = np.arange(h // tp, dtype=np.int64) + 3 * (h // tp)  # TP rank 3 of a column-parallel weight
    yield "tp8_column_slice", (d, h), [np.arange(d, dtype=np.int64), column]
    local_e = experts // ep
    width = h // 8 // tp
    yield "expert_slice", (experts, d, h // 8), [np.arange(local_e, dtype=np.int64) + local_e,
                                                 np.arange(d, dtype=np.int64), np.arange(width, dtype=np.int64) + width]


def main(argv=None):
    parser = OneLineArgumentParser(prog="python -m pangu_sigma.tools.bench_init", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies d and h (0.25: a quick run)")
    args = parser.parse_args(argv)

    def body():
        rates = []
        for name, full_shape, axes in cases(args.scale):
            elements = int(np.prod([len(a) for a in axes]))
            best = best_cpu = float("inf")
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                draw_slice(1234, name, 0.02, full_shape, axes)
                best_cpu = min(best_cpu, time.process_time() - start_cpu)
                best = min(best, time.perf_counter() - start)
            rates.append(best / elements)
            print(json.dumps({"bench": "init_weights", "case": name, "elements": elements, "best_s": round(best, 3),
                              "ns_per_element": round(best / elements * 1e9, 2),
                              "cpu_ns_per_element": round(best_cpu / elements * 1e9, 2)}), flush=True)
        mean = sum(rates) / len(rates)
        print(json.dumps({"bench": "init_weights", "case": "estimate_128n_rank", "elements": RANK_VALUES_128N,
                          "seconds": round(mean * RANK_VALUES_128N, 1)}), flush=True)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
