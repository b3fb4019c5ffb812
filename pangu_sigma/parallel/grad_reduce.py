"""Gradient reduction by parameter group, and the global gradient norm.

Autodiff through the collectives gives, on every rank, the exact derivative of
J = sum over ranks of each rank's loss, with replicated tensors on different
ranks treated as separate copies. A parameter's gradient is therefore the SUM
of its copies' gradients over the ranks that hold a replica of it, and the
mean-loss gradient is that divided by the world size:
    replicated parameters (embeddings, LayerNorms, routers, ...): all ranks
    TP-sharded dense parameters: the data-parallel group
    expert parameters: the expert-data-parallel group (sharded over EP and TP)
Gradients of one group are flattened into one buffer: one AllReduce per group.
"""
from mindspore import nn, ops

from locmoe.comm import AllReduce


def replica_group(name, topology, tp_sharded):
    """The ranks holding a copy of parameter `name`."""
    if "experts." in name:
        return topology.expert_dp_group()
    if tp_sharded and topology.tp > 1:
        return topology.dp_group()
    return list(range(topology.world_size))


class GradReducer(nn.Cell):
    """grads tuple -> reduced grads tuple (mean-loss gradients); global_norm_sq(grads) -> ||g||^2."""

    def __init__(self, params, topology, backend, is_tp_sharded=lambda param: False):
        super().__init__()
        groups, members = [], []
        for index, param in enumerate(params):
            group = replica_group(param.name, topology, is_tp_sharded(param))
            if group not in groups:
                groups.append(group)
                members.append([])
            members[groups.index(group)].append(index)
        self.members = members
        self.group_sizes = [float(len(g)) for g in groups]
        self.reducers = nn.CellList([AllReduce(g, backend, topology, f"grad_allreduce_{k}")
                                     for k, g in enumerate(groups)])
        self.world = AllReduce(list(range(topology.world_size)), backend, topology, "grad_norm_allreduce")
        self.scale = 1.0 / topology.world_size
        self.num_params = len(params)

    def construct(self, grads):
        reduced = list(grads)
        for k in range(len(self.members)):
            indices = self.members[k]
            flat = ops.concat([grads[i].reshape(-1) for i in indices])  # [sum of sizes]
            flat = self.reducers[k](flat) * self.scale
            offset = 0
            for i in indices:
                size = grads[i].size
                reduced[i] = flat[offset:offset + size].reshape(grads[i].shape)
                offset += size
        return tuple(reduced)

    def global_norm_sq(self, grads):
        """Sum of squares over distinct parameter values: each copy weighted 1/replicas, summed over the world."""
        total = ops.zeros((), grads[0].dtype)
        for k in range(len(self.members)):
            part = ops.zeros((), grads[0].dtype)
            for i in self.members[k]:
                part = part + grads[i].square().sum()
            total = total + part / self.group_sizes[k]
        return self.world(total)
