"""msrun worker (2 CPU ranks, TP2): loss and gradients of a tensor-parallel PanGu-Sigma.

Usage: msrun --worker_num=2 ... tp_worker.py WORK_DIR
Reads WORK_DIR/full_params.npz (a single-process PanguSigmaWithLoss's parameters)
and WORK_DIR/batch.npz (ids, domains); loads this rank's shards; runs forward +
backward in GRAPH mode; writes WORK_DIR/rank<r>.npz with the outputs and the raw
(un-reduced) gradient of every parameter, and (rank 0) WORK_DIR/specs.json with the
TP layouts {name: [dim, parts]}.
"""
import json
import os
import sys

import numpy as np

WORLD = 2
MODEL = dict(vocab_size=64, seq_length=8, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
             moe_layer_num=0, dropout_rate=0.0)


def main(work_dir):
    import mindspore as ms
    from mindspore import nn, Tensor
    from mindspore.communication import get_rank, init

    from locmoe.comm import create_topology_groups
    from locmoe.parallel_context import ParallelContext
    from locmoe.topology import Topology
    from pangu_sigma.model import ModelConfig, PanguSigmaModel, PanguSigmaWithLoss
    from pangu_sigma.parallel import shard_full_params, tp_shard_specs

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    init()
    rank = get_rank()
    topo = Topology(world_size=WORLD, tp=2, ep=1, num_experts=1, devices_per_node=2, rank=rank)
    create_topology_groups(topo)
    parallel = ParallelContext(topo, "emulated", distributed=True)
    net = PanguSigmaWithLoss(PanguSigmaModel(ModelConfig(**MODEL), None, topo, parallel=parallel))

    full = dict(np.load(os.path.join(work_dir, "full_params.npz")))
    shards = shard_full_params(full, net, topo)
    for p in net.get_parameters():
        p.set_data(Tensor(shards[p.name]))
    batch = np.load(os.path.join(work_dir, "batch.npz"))

    params = net.trainable_params()

    class LossAndGrads(nn.Cell):
        def __init__(self):
            super().__init__()
            self.grad_fn = ms.value_and_grad(net, None, params, has_aux=True)

        def construct(self, ids, domains):
            return self.grad_fn(ids, domains)

    outputs, grads = LossAndGrads()(Tensor(batch["ids"]), Tensor(batch["domains"]))
    result = {"total": outputs[0].asnumpy(), "ce": outputs[1].asnumpy()}
    result.update({"grad/" + p.name: g.asnumpy() for p, g in zip(params, grads)})
    np.savez(os.path.join(work_dir, f"rank{rank}.npz"), **result)
    if rank == 0:
        specs = {name: [s.dim, s.parts] for name, s in tp_shard_specs(net).items()}
        with open(os.path.join(work_dir, "specs.json"), "w") as f:
            json.dump(specs, f)
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
