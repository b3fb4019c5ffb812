"""Benchmark: the forms of a linear layer, fwd+bwd of a GeLU FFN (GRAPH mode, interleaved timing).

python -m locmoe.bench_linear --tokens 4096 --hidden 512 --ffn 2048 --experts 8 [--rounds 8]
prints one JSON line per case (median ms of fwd+bwd, after warm-up, timed round-robin):
  dense  x [N, d] -> d -> ffn -> d, three forms of the two matmuls:
         ops.matmul            ops.matmul(x, w) with w [in, out]: MatMulExt (mindspore/ops/function/
                               math_func.py: `return auto_generate.matmul_ext(input, other)`)
         MatMul                ops.MatMul()(x, w), w [in, out]: the MatMul primitive
         MatMul(transpose_b)   ops.MatMul(transpose_b=True)(x, w), w [out, in]
  experts [E, C, d] -> ffn -> d per expert, two forms:
         ops.bmm               ops.bmm(x, w), w [E, in, out]: the BatchMatMul primitive
                               (math_func.py: `batch_matmul_ = BatchMatMul()`, `return batch_matmul_(...)`)
         BatchMatMul(transpose_b)  w [E, out, in]
Each line: {"case", "form", "ms", "vs_first_form" (ms / the case's first form's ms), shapes}.
"""
import json
import sys

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer, Normal

from locmoe.bench import _FwdBwd, _SumLoss, _time_interleaved, add_shape_arguments, check_positive
from locmoe.errors import ConfigError, OneLineArgumentParser, run_cli


class FormFFN(nn.Cell):
    """hidden -> ffn -> hidden with GeLU (tanh), no bias, the two matmuls in the given form.

    form: 'ops.matmul' | 'MatMul' | 'MatMul(transpose_b)' (dense, x [N, d]) or
          'ops.bmm' | 'BatchMatMul(transpose_b)' (experts, x [E, C, d], experts > 0)."""

    def __init__(self, form, hidden, ffn, experts=0):
        super().__init__()
        transposed = form.endswith("(transpose_b)")
        lead = [experts] if experts else []
        shape_in = lead + ([ffn, hidden] if transposed else [hidden, ffn])
        shape_out = lead + ([hidden, ffn] if transposed else [ffn, hidden])
        self.w_in = Parameter(initializer(Normal(0.02), shape_in), name="w_in")
        self.w_out = Parameter(initializer(Normal(0.02), shape_out), name="w_out")
        self.form = form
        self.product = {"MatMul": ops.MatMul(), "MatMul(transpose_b)": ops.MatMul(transpose_b=True),
                        "ops.bmm": ops.BatchMatMul(),
                        "BatchMatMul(transpose_b)": ops.BatchMatMul(transpose_b=True)}.get(form)

    def _mm(self, x, w):
        if self.form == "ops.matmul":
            return ops.matmul(x, w)
        return self.product(x, w)

    def construct(self, x):
        return self._mm(ops.gelu(self._mm(x, self.w_in), approximate="tanh"), self.w_out)


DENSE_FORMS = ("ops.matmul", "MatMul", "MatMul(transpose_b)")
EXPERT_FORMS = ("ops.bmm", "BatchMatMul(transpose_b)")


def run(tokens, hidden, ffn, experts, warmup, rounds, seed=0):
    """-> list of JSON-ready dicts, one per (case, form)."""
    rng = np.random.RandomState(seed)
    x = Tensor(rng.randn(tokens, hidden).astype(np.float32))  # [N, d]
    buffer = Tensor(rng.randn(experts, tokens // experts, hidden).astype(np.float32))  # [E, C, d]
    cases = [("dense", form, _FwdBwd(_SumLoss(FormFFN(form, hidden, ffn), False)), (x,)) for form in DENSE_FORMS]
    cases += [("experts", form, _FwdBwd(_SumLoss(FormFFN(form, hidden, ffn, experts), False)), (buffer,))
              for form in EXPERT_FORMS]
    times = _time_interleaved([(cell, inputs) for _, _, cell, inputs in cases], warmup, rounds)
    first = {}
    lines = []
    for (case, form, _, _), ms_value in zip(cases, times):
        first.setdefault(case, ms_value)
        lines.append({"case": case, "form": form, "tokens": tokens, "hidden": hidden, "ffn": ffn,
                      "experts": experts if case == "experts" else 0, "ms": round(ms_value, 2),
                      "vs_first_form": round(ms_value / first[case], 4)})
    return lines


def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)

    def go():
        check_positive(args, "tokens", "hidden", "ffn", "experts", "rounds")
        if args.tokens % args.experts:
            raise ConfigError("--tokens", args.tokens, f"a multiple of --experts={args.experts}")
        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("CPU")
        for line in run(args.tokens, args.hidden, args.ffn, args.experts, args.warmup, args.rounds):
            print(json.dumps(line), flush=True)

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
