"""msrun worker (4 CPU ranks): emulated collectives' values and gradients -> .npy files.

Usage: msrun --worker_num=4 ... comm_worker.py OUT_DIR
For each case, writes out_<case>_<rank>.npy (forward) and grad_<case>_<rank>.npy,
the gradient of sum_over_ranks(sum(out * w_rank)) with respect to this rank's input.
"""
import os
import sys

import numpy as np

# name: (kind, groups (every rank is in exactly one), kwargs, input shape)
CASES = {
    "a2a_world": ("all_to_all", [[0, 1, 2, 3]], dict(split_dim=0, concat_dim=0), (12, 8)),
    "a2a_sub": ("all_to_all", [[0, 2], [1, 3]], dict(split_dim=1, concat_dim=0), (3, 8, 5)),
    "ag_world": ("all_gather", [[0, 1, 2, 3]], dict(dim=1), (3, 2)),
    "ag_sub": ("all_gather", [[0, 2], [1, 3]], dict(dim=0), (2, 3)),
    "rs_world": ("reduce_scatter", [[0, 1, 2, 3]], dict(dim=0), (8, 3)),
    "rs_sub": ("reduce_scatter", [[0, 1], [2, 3]], dict(dim=1), (2, 4)),
    "ar_world": ("all_reduce", [[0, 1, 2, 3]], {}, (3, 4)),
    "ar_sub": ("all_reduce", [[0, 1], [2, 3]], {}, (3, 4)),
    # uneven blocks [2, 3] per (source, destination) pair, one matrix per group; shape = the block
    "a2av_world": ("all_to_all_v", [[0, 1, 2, 3]],
                   dict(blocks=[[1, 0, 2, 1], [3, 1, 0, 0], [0, 2, 1, 1], [1, 1, 0, 2]]), (2, 3)),
    "a2av_sub": ("all_to_all_v", [[0, 2], [1, 3]], dict(blocks=[[1, 2], [0, 3]]), (4,)),
}


def _blocks(case, rank):
    """(blocks I send, blocks I receive) in an all_to_all_v case."""
    group = group_of(case, rank)
    i, blocks = group.index(rank), CASES[case][2]["blocks"]
    return sum(blocks[i]), sum(row[i] for row in blocks)


def group_of(case, rank):
    return next(g for g in CASES[case][1] if rank in g)


def make_input(case, rank):
    shape = CASES[case][3]
    if CASES[case][0] == "all_to_all_v":
        shape = (_blocks(case, rank)[0],) + shape
    return (np.arange(np.prod(shape)).reshape(shape) * 0.5 + 100.0 * rank).astype(np.float32)


def out_shape(case):
    kind, groups, kw, shape = CASES[case]
    g, shape = len(groups[0]), list(shape)
    if kind == "all_to_all":
        shape[kw["split_dim"]] //= g
        shape[kw["concat_dim"]] *= g
    elif kind == "all_gather":
        shape[kw["dim"]] *= g
    elif kind == "reduce_scatter":
        shape[kw["dim"]] //= g
    return tuple(shape)


def make_weight(case, rank):
    shape = out_shape(case)
    if CASES[case][0] == "all_to_all_v":
        shape = (_blocks(case, rank)[1],) + CASES[case][3]
    return np.cos(np.arange(np.prod(shape)) + 1.7 * rank).reshape(shape).astype(np.float32)


def main(out_dir):
    import mindspore as ms
    from mindspore import nn, ops, Tensor
    from mindspore.communication import init, get_rank

    from locmoe import comm
    from locmoe.topology import Topology

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    rank = get_rank()
    topo = Topology(world_size=4, tp=1, ep=4, num_experts=4, devices_per_node=2, rank=rank)
    cls = {"all_to_all": comm.AllToAll, "all_to_all_v": comm.AllToAllV, "all_gather": comm.AllGather,
           "all_reduce": comm.AllReduce, "reduce_scatter": comm.ReduceScatter}

    class ValueAndGrad(nn.Cell):
        def __init__(self, coll):
            super().__init__()
            self.coll = coll
            self.grad = ops.GradOperation()

        def loss(self, x, w):
            return (self.coll(x) * w).sum()

        def construct(self, x, w):
            return self.coll(x), self.grad(self.loss)(x, w)

    cells = {name: cls[kind](group_of(name, rank), backend="emulated", topology=topo, **kw)
             for name, (kind, _, kw, _) in CASES.items()}  # fixed order: groups created alike
    for name, cell in cells.items():
        x = make_input(name, rank)
        w = make_weight(name, rank)
        out, grad = ValueAndGrad(cell)(Tensor(x), Tensor(w))
        np.save(os.path.join(out_dir, f"out_{name}_{rank}.npy"), out.asnumpy())
        np.save(os.path.join(out_dir, f"grad_{name}_{rank}.npy"), grad.asnumpy())
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
