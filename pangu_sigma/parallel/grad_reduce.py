"""Gradient reduction by parameter group, and the global gradient norm.

Autodiff through the collectives gives, on every rank, the exact derivative of
J = sum over ranks of each rank's loss, with replicated tensors on different
ranks treated as separate copies. A parameter's gradient is therefore the SUM
of its copies' gradients over the ranks that hold a replica of it, and the
mean-loss gradient is that divided by the world size:
    replicated parameters (embeddings, LayerNorms, routers, ...): all ranks
    TP-sharded dense parameters: the data-parallel group
    expert parameters: the expert-data-parallel group (sharded over EP and TP)
Gradients of one group are packed into flat buckets of at most
`bucket_bytes` (parallel.grad_bucket_mb), one AllReduce per bucket; a gradient
bigger than a bucket is reduced alone, without a copy. The extra memory is then
about two buckets (the packed input and the reduced output of the bucket in
flight), not a copy of every gradient of the group (~6 GiB at 128N).
"""
from mindspore import nn, ops

from locmoe.comm import AllReduce

MIB = 2 ** 20
DEFAULT_BUCKET_MB = 256.0


def plan_buckets(sizes_bytes, bucket_bytes):
    """Indices 0..n-1 (in order) -> consecutive buckets whose byte sizes sum to <= bucket_bytes.

    An entry bigger than bucket_bytes gets a bucket of its own.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets, current, filled = [], [], 0
    for index, size in enumerate(sizes_bytes):
        if current and filled + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(index)
        filled += size
    if current:
        buckets.append(current)
    return buckets


def bucket_buffer_bytes(sizes_bytes, bucket_bytes):
    """Extra bytes of the bucketed reduction: packed input + reduced output of the largest packed bucket.

    Buckets of a single gradient are reduced in place of it (no packing copy).
    """
    largest = 0
    for bucket in plan_buckets(sizes_bytes, bucket_bytes):
        if len(bucket) > 1:
            largest = max(largest, sum(sizes_bytes[i] for i in bucket))
    return 2 * largest


def replica_group(name, topology, tp_sharded):
    """The ranks holding a copy of parameter `name`."""
    if "experts." in name:
        return topology.expert_dp_group()
    if tp_sharded and topology.tp > 1:
        return topology.dp_group()
    return list(range(topology.world_size))


class GradReducer(nn.Cell):
    """grads tuple -> reduced grads tuple (mean-loss gradients); global_norm_sq(grads) -> ||g||^2."""

    def __init__(self, params, topology, backend, is_tp_sharded=lambda param: False,
                 bucket_mb=DEFAULT_BUCKET_MB):
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
        self.bucket_bytes = int(bucket_mb * MIB)
        # buckets: (group index, [param indices]) in a fixed order, the same on every rank
        self.buckets = []
        for k, indices in enumerate(members):
            sizes = [params[i].size * params[i].itemsize for i in indices]
            for bucket in plan_buckets(sizes, self.bucket_bytes):
                self.buckets.append((k, [indices[j] for j in bucket]))
        self.reducers = nn.CellList([AllReduce(g, backend, topology, f"grad_allreduce_{k}")
                                     for k, g in enumerate(groups)])
        self.world = AllReduce(list(range(topology.world_size)), backend, topology, "grad_norm_allreduce")
        self.scale = 1.0 / topology.world_size
        self.num_params = len(params)

    def construct(self, grads):
        reduced = list(grads)
        for k, indices in self.buckets:
            if len(indices) == 1:
                i = indices[0]
                reduced[i] = self.reducers[k](grads[i]) * self.scale
                continue
            flat = ops.concat([grads[i].reshape(-1) for i in indices])  # [sum of bucket sizes]
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
