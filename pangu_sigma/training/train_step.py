"""One optimizer step: loss, gradients, loss scaling, global-norm clipping, update, metrics.

Per-step metrics go into ring buffers indexed by step % sink_size, so the
host can log every step even when sink_size steps run on the device in one
call (data sinking on Ascend). METRIC_NAMES gives the columns.
"""
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.ops import composite as C

from pangu_sigma.training.overflow import OverflowCheck

METRIC_NAMES = ("loss", "ce", "aux", "loc", "lr", "grad_norm", "loss_scale", "overflow")
BUFFER_PREFIX = "metrics_"  # parameters that are logging buffers, not state (not checkpointed)

_scale_grad = C.MultitypeFuncGraph("scale_grad")


@_scale_grad.register("Tensor", "Tensor")
def _scale_one(factor, grad):
    return grad * ops.cast(factor, grad.dtype)


_square_sum = C.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_one(grad):
    return ops.cast(grad, ms.float32).square().sum()


def no_weight_decay(param_name):
    """LayerNorm parameters, biases, embeddings tables and router biases are not decayed."""
    lowered = param_name.lower()
    return any(key in lowered for key in ("gamma", "beta", "bias", "ln", "norm", "table"))


def build_optimizer(network, optim_cfg, lr_schedule):
    """AdamWeightDecay over the trainable parameters, two decay groups."""
    params = network.trainable_params()
    decay = [p for p in params if not no_weight_decay(p.name)]
    other = [p for p in params if no_weight_decay(p.name)]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return nn.AdamWeightDecay(groups, learning_rate=lr_schedule, beta1=optim_cfg.beta1, beta2=optim_cfg.beta2,
                              eps=optim_cfg.adam_eps)


class TrainStep(nn.Cell):
    """net_with_loss(ids, domain_ids) -> (total, ce, aux, loc, expert_load [M,E], dropped [M,2], local [M,P]).

    dropped: per layer, tokens dropped that were bound for (node-local, other-node) experts;
    local: per layer, node-local tokens of each data-parallel rank (P = rank_slots).

    grad_reducer: None in one process; when distributed a GradReducer
    (pangu_sigma.parallel.grad_reduce) that sums each gradient over its replicas
    and gives the global norm. metric_reducer: an AllReduce over the world so the
    logged losses are the mean over ranks and the expert statistics the sum over
    data-parallel ranks (tp copies of each are divided out). overflow_check: an
    OverflowCheck (pangu_sigma.training.overflow; default isfinite of the norm),
    the NPU float status on Ascend 910A where fp16 saturates instead of giving inf.
    """

    def __init__(self, net_with_loss, optimizer, lr_schedule, grad_clip, use_loss_scale, loss_scale_init,
                 loss_scale_window, sink_size, moe_layers, num_experts, grad_reducer=None, metric_reducer=None,
                 world_size=1, tp=1, overflow_check=None, rank_slots=1):
        super().__init__(auto_prefix=False)
        self.net = net_with_loss
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = C.HyperMap()
        self.grad_clip = float(grad_clip)
        self.use_loss_scale = use_loss_scale
        self.loss_scale_window = loss_scale_window
        self.grad_reducer = grad_reducer
        self.metric_reducer = metric_reducer
        self.world_size = float(world_size)
        self.tp = float(tp)
        self.sink_size = sink_size
        self.overflow_check = overflow_check if overflow_check is not None else OverflowCheck("isfinite")
        self.loss_scale = Parameter(Tensor(loss_scale_init if use_loss_scale else 1.0, ms.float32),
                                    name="loss_scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale_good_steps", requires_grad=False)
        self.step = Parameter(Tensor(0, ms.int32), name="train_step", requires_grad=False)
        self.metrics_scalars = Parameter(ops.zeros((sink_size, len(METRIC_NAMES)), ms.float32),
                                         name=BUFFER_PREFIX + "scalars", requires_grad=False)
        self.metrics_load = Parameter(ops.zeros((sink_size, moe_layers, num_experts), ms.float32),
                                      name=BUFFER_PREFIX + "load", requires_grad=False)
        self.metrics_dropped = Parameter(ops.zeros((sink_size, moe_layers, 2), ms.float32),
                                         name=BUFFER_PREFIX + "dropped", requires_grad=False)
        self.metrics_local = Parameter(ops.zeros((sink_size, moe_layers, rank_slots), ms.float32),
                                       name=BUFFER_PREFIX + "local", requires_grad=False)

    def _update_loss_scale(self, finite):
        scale = self.loss_scale
        good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
        grow = good >= self.loss_scale_window
        new_scale = ops.select(finite, ops.select(grow, scale * 2.0, scale), ops.maximum(scale * 0.5, 1.0))
        ops.assign(self.good_steps, ops.select(grow, ops.zeros_like(good), good))
        ops.assign(self.loss_scale, new_scale)
        return scale

    def construct(self, ids, domain_ids):
        ids = self.overflow_check.start(ids)  # Ascend 910A: clear the NPU overflow register
        total, ce, aux, loc, load, dropped, local = self.net(ids, domain_ids)
        scale = self.loss_scale * 1.0
        sens = (ops.cast(scale, total.dtype), ops.zeros_like(ce), ops.zeros_like(aux), ops.zeros_like(loc),
                ops.zeros_like(load), ops.zeros_like(dropped), ops.zeros_like(local))
        grads = self.grad(self.net, self.weights)(ids, domain_ids, sens)
        grads = self.hyper_map(ops.partial(_scale_grad, 1.0 / scale), grads)
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
            norm = ops.sqrt(self.grad_reducer.global_norm_sq(grads))
        else:
            norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        finite = self.overflow_check.finite(norm, norm)  # see pangu_sigma/training/overflow.py
        if self.grad_clip > 0:
            factor = ops.minimum(self.grad_clip / (norm + 1e-6), 1.0)
            grads = self.hyper_map(ops.partial(_scale_grad, factor), grads)
        lr = self.lr_schedule(self.optimizer.global_step)
        if self.use_loss_scale:
            if finite:
                self.optimizer(grads)
            self._update_loss_scale(finite)
        else:
            self.optimizer(grads)
        overflow = 1.0 - ops.cast(finite, ms.float32)
        if self.metric_reducer is not None:
            losses = self.metric_reducer(ops.stack((total, ce, aux, loc))) / self.world_size  # [4]
            total, ce, aux, loc = losses[0], losses[1], losses[2], losses[3]
            load = self.metric_reducer(load) / self.tp
            dropped = self.metric_reducer(dropped) / self.tp
            local = self.metric_reducer(local) / self.tp
        row = ops.stack((total, ce, aux, loc, ops.cast(lr, ms.float32).reshape(()), norm, scale.reshape(()),
                         overflow))  # [K]
        index = (self.step % self.sink_size).reshape(1)
        ops.scatter_update(self.metrics_scalars, index, row.expand_dims(0))
        ops.scatter_update(self.metrics_load, index, load.expand_dims(0))
        ops.scatter_update(self.metrics_dropped, index, dropped.expand_dims(0))
        ops.scatter_update(self.metrics_local, index, local.expand_dims(0))
        ops.assign_add(self.step, Tensor(1, ms.int32))
        return total
