"""Optimizer-state sharding (ZeRO stage 1) for AdamWeightDecay over each parameter's replica group.

Every parameter has a replica group R (pangu_sigma.parallel.grad_reduce.replica_group:
all ranks for replicated parameters, the data-parallel group for TP-sharded dense
ones, the expert-data-parallel group for experts). After the gradient reduction
every member of R holds the same full reduced (and clipped) gradient, so the
members can split the update: member k of R (k = position of this rank in the
sorted group) keeps and updates only slice k of the Adam moments and of the
parameter, then the updated slices are gathered over R:

    flat = parameter.reshape(-1), zero-padded to R * c elements, c = ceil(size / R)
    slice k = flat[k * c:(k + 1) * c]         moments m, v of shape [c] on member k
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr * (m / (eps + sqrt(v)) + wd * p)     (MindSpore's AdamWeightDecay,
                                                     nn/optim/adam.py _update_run_op:
                                                     no bias correction)
    gather: the slices of the parameters of one group are concatenated ([sum c]) in
    buckets of at most `bucket_bytes` of gathered float32 (R * sum c * 4; a larger
    parameter is a bucket of its own) and each bucket is gathered in one collective
    (locmoe.comm.AllGather: HCCL AllGather on the group when native; a zero
    [R, sum c] buffer with my row filled + sub-group AllReduce when emulated, as on
    CPU), then cut back into the parameters.
The padding stays zero (zero gradient, zero moments, zero update).

The gradient norm and the overflow flag are computed by TrainStep on the full
reduced gradients before this optimizer runs, so clipping and the loss-scale
skip are the same as without sharding.

Checkpoint layout (for converters): the moments are the Parameters
`zero_m.<param name>` and `zero_v.<param name>`, float32, shape [c], saved in the
rank's own checkpoint; rank r's slice k is its position in the sorted replica group
of that parameter; the full (unpadded) moment of the parameter's local shard is
concat over k of the slices, cut to the shard's size and reshaped to its shape
(the shard itself being the TP/EP shard of the rank, as for the parameter).
The unsharded optimizer names them `adam_m.<name>` / `adam_v.<name>` with the
parameter's shape. `global_step` is saved as `global_step` in both.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from locmoe.comm import AllGather
from pangu_sigma.parallel.grad_reduce import replica_group

MOMENT_PREFIXES = ("zero_m.", "zero_v.")


def no_weight_decay(param_name):
    """LayerNorm parameters, biases, embeddings tables and router biases are not decayed."""
    lowered = param_name.lower()
    return any(key in lowered for key in ("gamma", "beta", "bias", "ln", "norm", "table"))


def slice_layout(size, group_size, index):
    """(slice length c, start, stop) of member `index` of a group of `group_size` for a tensor of `size`."""
    length = -(-size // group_size)
    return length, index * length, (index + 1) * length


def shard_moment(full, group_size, index):
    """numpy: the full moment of a parameter (any shape) -> member `index`'s flat slice [c] (padded with 0)."""
    flat = np.asarray(full).reshape(-1)
    length, start, stop = slice_layout(flat.size, group_size, index)
    padded = np.zeros(length * group_size, flat.dtype)
    padded[:flat.size] = flat
    return padded[start:stop]


def unshard_moment(slices, shape):
    """numpy: the slices of every member (in group order) -> the full moment of `shape`."""
    flat = np.concatenate([np.asarray(s).reshape(-1) for s in slices])
    size = int(np.prod(shape))
    return flat[:size].reshape(shape)


class ShardedAdamWeightDecay(nn.Cell):
    """AdamWeightDecay with ZeRO-1 moments. Same interface as the nn.AdamWeightDecay TrainStep uses:
    `parameters`, `global_step`, `self(grads)` (grads: the reduced, clipped gradients, in `parameters` order).

    decay: {parameter name: weight decay} (0 for the undecayed group).
    """

    def __init__(self, params, decay, lr_schedule, optim_cfg, topology, backend, is_tp_sharded, bucket_bytes):
        super().__init__(auto_prefix=False)
        self.parameters = ms.ParameterTuple(params)
        self.lr_schedule = lr_schedule
        self.beta1 = float(optim_cfg.beta1)
        self.beta2 = float(optim_cfg.beta2)
        self.eps = float(optim_cfg.adam_eps)
        self.global_step = Parameter(Tensor([0], ms.int32), name="global_step")
        groups, members = [], []
        for index, param in enumerate(params):
            group = sorted(replica_group(param.name, topology, is_tp_sharded(param)))
            if group not in groups:
                groups.append(group)
                members.append([])
            members[groups.index(group)].append(index)
        # buckets: (group, [param indices]) with at most bucket_bytes gathered per bucket
        buckets = []
        for k, indices in enumerate(members):
            current, size = [], 0
            for i in indices:
                gathered = slice_layout(params[i].size, len(groups[k]), 0)[0] * len(groups[k]) * 4
                if current and size + gathered > bucket_bytes:
                    buckets.append((k, current))
                    current, size = [], 0
                current.append(i)
                size += gathered
            buckets.append((k, current))
        self.groups = groups
        self.members = [indices for _, indices in buckets]
        self.group_sizes = [len(groups[k]) for k, _ in buckets]
        self.group_index = [groups[k].index(topology.rank) for k, _ in buckets]
        layout, m_list, v_list = [], [], []
        for k, indices in enumerate(self.members):
            for i in indices:
                param = params[i]
                length, start, stop = slice_layout(param.size, self.group_sizes[k], self.group_index[k])
                layout.append((i, length, start, stop, int(param.size), tuple(param.shape)))
                m_list.append(Parameter(Tensor(np.zeros(length, np.float32)), name=MOMENT_PREFIXES[0] + param.name))
                v_list.append(Parameter(Tensor(np.zeros(length, np.float32)), name=MOMENT_PREFIXES[1] + param.name))
        self.layout = layout  # (param index, c, start, stop, size, shape) in group order
        self.moments1 = ms.ParameterTuple(m_list)
        self.moments2 = ms.ParameterTuple(v_list)
        self.weight_decay = [float(decay.get(p.name, 0.0)) for p in params]
        self.gathers = nn.CellList([AllGather(groups[k], 0, backend, topology, f"zero_allgather_{b}")
                                    for b, (k, _) in enumerate(buckets)])

    def _my_slice(self, x, length, start, stop, group_size):
        flat = x.reshape(-1)  # [size]
        pad = length * group_size - flat.shape[0]
        if pad > 0:
            flat = ops.concat((flat, ops.zeros((pad,), flat.dtype)))  # [R * c]
        return flat[start:stop]  # [c]

    def construct(self, grads):
        lr = ops.cast(self.lr_schedule(self.global_step), ms.float32).reshape(())
        ops.assign_add(self.global_step, Tensor([1], ms.int32))
        position = 0
        for k in range(len(self.members)):
            size_k = self.group_sizes[k]
            pieces = []
            first = position
            for _ in self.members[k]:
                i, length, start, stop, _, _ = self.layout[position]
                param = self.parameters[i]
                p = self._my_slice(param, length, start, stop, size_k)  # [c]
                g = self._my_slice(ops.cast(grads[i], ms.float32), length, start, stop, size_k)  # [c]
                m = self.moments1[position] * self.beta1 + g * (1.0 - self.beta1)
                v = self.moments2[position] * self.beta2 + ops.square(g) * (1.0 - self.beta2)
                update = m / (ops.sqrt(v) + self.eps)
                if self.weight_decay[i] > 0:
                    update = update + p * self.weight_decay[i]
                p = p - update * lr
                ops.assign(self.moments1[position], m)
                ops.assign(self.moments2[position], v)
                pieces.append(p)
                position += 1
            mine = ops.concat(pieces) if len(pieces) > 1 else pieces[0]  # [sum c]
            total = mine.shape[0]
            gathered = self.gathers[k](mine).reshape(size_k, total)  # [R, sum c], row j from member j
            offset = 0
            for j in range(first, position):
                i, length, _, _, size, shape = self.layout[j]
                full = gathered[:, offset:offset + length].reshape(-1)[:size]  # [size]
                ops.assign(self.parameters[i], full.reshape(shape))
                offset += length
        return True


def sharded_optimizer(network, optim_cfg, lr_schedule, topology, backend, is_tp_sharded, bucket_mb):
    """ShardedAdamWeightDecay over network's trainable parameters, with build_optimizer's decay groups and
    gather buckets of at most bucket_mb MiB (parallel.grad_bucket_mb, the size plan's memory model uses:
    pangu_sigma.cluster.param_count memory_per_device, gather_bucket)."""

    params = network.trainable_params()
    decay = {p.name: (0.0 if no_weight_decay(p.name) else float(optim_cfg.weight_decay)) for p in params}
    return ShardedAdamWeightDecay(params, decay, lr_schedule, optim_cfg, topology, backend, is_tp_sharded,
                                  int(bucket_mb * 2 ** 20))
