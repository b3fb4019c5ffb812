"""Benchmark: MoE layer forward+backward vs a dense FFN of the same per-token FLOPs.

python -m locmoe.bench --router {locmoe,switch,hash,rre,all} --tokens 4096 --hidden 512
    --ffn 2048 --experts 8 --capacity-factor 1.0
prints one JSON line per router:
  moe_ms      whole MoE layer (gate, dispatch, experts, combine), fwd+bwd
  dense_ms    dense FFN hidden -> ffn -> hidden on all tokens, fwd+bwd
  experts_ms  the batched expert FFN alone on a ready [E, C, d] buffer, fwd+bwd
  gate_ms     the router alone (gate, softmax, top-1, losses), fwd+bwd
  ratio = moe_ms / dense_ms, overhead = moe_ms / experts_ms - 1  (medians after warm-up)
"""
import json
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer, Normal

from locmoe.config import MoEConfig, ROUTERS
from locmoe.errors import ConfigError, OneLineArgumentParser, run_cli
from locmoe.experts import BatchedExperts
from locmoe.layer import MoELayer
from locmoe.topology import single_process


class DenseFFN(nn.Cell):
    """hidden -> ffn -> hidden with GeLU, no bias: the FLOPs of one expert per token."""

    def __init__(self, hidden, ffn):
        super().__init__()
        self.w_in = Parameter(initializer(Normal(0.02), [hidden, ffn]), name="w_in")
        self.w_out = Parameter(initializer(Normal(0.02), [ffn, hidden]), name="w_out")
        # the MatMul primitive, as the experts' ops.bmm is the BatchMatMul primitive: like for like (ops.matmul
        # is MatMulExt, slower fwd+bwd on CPU: locmoe.bench_linear), so moe_ms / dense_ms is not flattered
        self.matmul = ops.MatMul()

    def construct(self, x):
        return self.matmul(ops.gelu(self.matmul(x, self.w_in), approximate="tanh"), self.w_out)


class _SumLoss(nn.Cell):
    """Scalar loss from any cell whose first output is a tensor, plus any loss terms it returns."""

    def __init__(self, net, with_losses):
        super().__init__()
        self.net = net
        self.with_losses = with_losses

    def construct(self, *inputs):
        out = self.net(*inputs)
        if self.with_losses:
            return out[0].sum() + out[1] + out[2]
        return out.sum()


class _FwdBwd(nn.Cell):
    def __init__(self, loss_cell):
        super().__init__()
        self.loss_cell = loss_cell
        self.weights = loss_cell.trainable_params()
        self.grad = ops.GradOperation(get_by_list=True, get_all=False)

    def construct(self, *inputs):
        loss = self.loss_cell(*inputs)
        grads = self.grad(self.loss_cell, self.weights)(*inputs)
        return loss, grads


class _RouterLoss(nn.Cell):
    def __init__(self, router, local_mask):
        super().__init__()
        self.router = router
        self.local_mask = local_mask

    def construct(self, x, token_ids, domain_ids):
        index, prob, probs, aux, loc, _ = self.router(x, token_ids, domain_ids, self.local_mask)
        return prob.sum() + aux + loc


def _time_interleaved(cases, warmup, steps):
    """Median ms per call of each (cell, inputs), timed round-robin so that machine noise
    hits every case alike (ratios stay meaningful on a busy machine)."""
    for cell, inputs in cases:
        for _ in range(warmup):
            cell(*inputs)[0].asnumpy()
    times = [[] for _ in cases]
    for _ in range(steps):
        for k, (cell, inputs) in enumerate(cases):
            start = time.perf_counter()
            cell(*inputs)[0].asnumpy()
            times[k].append((time.perf_counter() - start) * 1000.0)
    return [float(np.median(t)) for t in times]


def run_case(router, tokens, hidden, ffn, experts, capacity_factor, warmup=3, steps=10, seed=0):
    """Time one router; returns the JSON-ready dict."""
    rng = np.random.RandomState(seed)
    vocab = 32000
    cfg = MoEConfig(num_experts=experts, capacity_factor=capacity_factor, router=router, vocab_size=vocab,
                    num_domain_groups=1)
    x = Tensor(rng.randn(1, tokens, hidden).astype(np.float32))
    token_ids = Tensor(rng.randint(0, vocab, (1, tokens)).astype(np.int32))
    domain_ids = Tensor(np.zeros(1, np.int32))
    layer = MoELayer(cfg, hidden, ffn, single_process(experts))
    capacity = layer.capacity(tokens)
    buffer = Tensor(rng.randn(experts, capacity, hidden).astype(np.float32))  # [E, C, d]
    router_cell = MoELayer(cfg, hidden, ffn, single_process(experts)).router
    if router_cell.trainable_params():
        gate_cell = _FwdBwd(_RouterLoss(router_cell, layer.local_mask))
    else:  # table routers: nothing to differentiate, time the forward lookup
        gate_cell = _ForwardOnly(_RouterLoss(router_cell, layer.local_mask))
    moe_ms, dense_ms, experts_ms, gate_ms = _time_interleaved([
        (_FwdBwd(_SumLoss(layer, True)), (x, token_ids, domain_ids)),
        (_FwdBwd(_SumLoss(DenseFFN(hidden, ffn), False)), (x.reshape(tokens, hidden),)),
        (_FwdBwd(_SumLoss(BatchedExperts(experts, hidden, ffn), False)), (buffer,)),
        (gate_cell, (x, token_ids, token_ids * 0)),
    ], warmup, steps)
    return {"router": router, "tokens": tokens, "hidden": hidden, "ffn": ffn, "experts": experts,
            "capacity_factor": capacity_factor, "moe_ms": round(moe_ms, 2), "dense_ms": round(dense_ms, 2),
            "experts_ms": round(experts_ms, 2), "ratio": round(moe_ms / dense_ms, 4),
            "overhead": round(moe_ms / experts_ms - 1.0, 4), "gate_ms": round(gate_ms, 2)}


class _ForwardOnly(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, *inputs):
        return (self.net(*inputs),)


def add_shape_arguments(parser):
    """--tokens, --hidden, --ffn, --experts (the FFN shape the benchmarks time)."""
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)


def check_positive(args, *names):
    """ConfigError naming the first of args.<name> (--name) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}", getattr(args, name), "an integer >= 1")


def main(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--router", default="all", help="one of %s or all" % ", ".join(ROUTERS))
    add_shape_arguments(parser)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    routers = list(ROUTERS) if args.router == "all" else [args.router]
    def run():
        for name in routers:
            if name not in ROUTERS:
                raise ConfigError("--router", name, f"one of {list(ROUTERS)} or all")
        check_positive(args, "tokens", "hidden", "ffn", "experts", "steps")
        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("CPU")
        for name in routers:
            print(json.dumps(run_case(name, args.tokens, args.hidden, args.ffn, args.experts,
                                      args.capacity_factor, args.warmup, args.steps)), flush=True)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
