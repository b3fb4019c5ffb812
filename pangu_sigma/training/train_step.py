"""One optimizer step: loss, gradients, loss scaling, global-norm clipping, update, metrics.

Per-step metrics go into ring buffers indexed by step % sink_size, so the
host can log every step even when sink_size steps run on the device in one
call (data sinking on Ascend). METRIC_NAMES gives the columns.
"""
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.ops import composite as C

from pangu_sigma.parallel.dropout import attach_draw_counter
from pangu_sigma.parallel.zero import no_weight_decay  # noqa: F401 (also imported from here by tests)
from pangu_sigma.training.overflow import OverflowCheck

METRIC_NAMES = ("loss", "ce", "aux", "loc", "lr", "grad_norm", "loss_scale", "overflow")
BUFFER_PREFIX = "metrics_"  # parameters that are logging buffers, not state (not checkpointed)
ACCUM_PREFIX = "grad_accum."  # gradient-accumulation buffers: zero between steps (not checkpointed)
DRAW_COUNTER = "dropout_draw"  # derived from train_step before every forward (not checkpointed)
TRANSIENT_PREFIXES = (BUFFER_PREFIX, ACCUM_PREFIX, DRAW_COUNTER)

_scale_grad = C.MultitypeFuncGraph("scale_grad")


@_scale_grad.register("Tensor", "Tensor")
def _scale_one(factor, grad):
    return grad * ops.cast(factor, grad.dtype)


_accumulate = C.MultitypeFuncGraph("accumulate")


@_accumulate.register("Tensor", "Tensor")
def _accumulate_one(total, grad):
    return ops.assign_add(total, ops.cast(grad, ms.float32))


_zero = C.MultitypeFuncGraph("zero")


@_zero.register("Tensor")
def _zero_one(total):
    return ops.assign(total, ops.zeros_like(total))


_square_sum = C.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_one(grad):
    return ops.cast(grad, ms.float32).square().sum()


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
    """net_with_loss(ids, domain_ids) -> (total, ce, aux, loc, expert_load [M,E], dropped [M,3], local [M,P]).

    dropped: per layer, tokens dropped that were bound for (node-local, other-node) experts, and tokens
    rerouted to a node-local expert (moe.reroute_overflow);
    local: per layer, node-local tokens of each data-parallel rank (P = rank_slots).

    grad_reducer: None in one process; when distributed a GradReducer
    (pangu_sigma.parallel.grad_reduce) that sums each gradient over its replicas
    and gives the global norm. metric_reducer: an AllReduce over the world so the
    logged losses are the mean over ranks and the expert statistics the sum over
    data-parallel ranks (tp copies of each are divided out). overflow_check: an
    OverflowCheck (pangu_sigma.training.overflow; default isfinite of the norm),
    the NPU float status on Ascend 910A where fp16 saturates instead of giving inf.

    Dropout (pangu_sigma.parallel.dropout): before every forward the draw counter `dropout_draw` is set
    to step * micro_batches + micro-batch index, and every HashDropout of the network hashes it with
    dropout_seed: masks follow the checkpointed `train_step`, so a resumed run draws the masks it would
    have drawn, and a recomputed forward redraws the forward's masks.
    """

    def __init__(self, net_with_loss, optimizer, lr_schedule, grad_clip, use_loss_scale, loss_scale_init,
                 loss_scale_window, sink_size, moe_layers, num_experts, grad_reducer=None, metric_reducer=None,
                 world_size=1, tp=1, overflow_check=None, rank_slots=1, dropout_seed=0):
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
        self.dropout_draw = Parameter(Tensor(0, ms.int32), name=DRAW_COUNTER, requires_grad=False)
        self.micro_batches = 1  # forwards per optimizer step (AccumulatingTrainStep sets k)
        attach_draw_counter(net_with_loss, self.dropout_draw, dropout_seed)
        # Training mode (dropout and Switch jitter on): a Cell starts with training=False
        # (mindspore/nn/cell.py:2752 set_train), and nothing else sets it in this custom loop.
        net_with_loss.set_train(True)
        self.metrics_scalars = Parameter(ops.zeros((sink_size, len(METRIC_NAMES)), ms.float32),
                                         name=BUFFER_PREFIX + "scalars", requires_grad=False)
        self.metrics_load = Parameter(ops.zeros((sink_size, moe_layers, num_experts), ms.float32),
                                      name=BUFFER_PREFIX + "load", requires_grad=False)
        self.metrics_dropped = Parameter(ops.zeros((sink_size, moe_layers, 3), ms.float32),
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

    def scaled_grads(self, ids, domain_ids, micro_index=None):
        """Forward, backward at the loss scale, gradients unscaled (not reduced).
        micro_index: the micro-batch's index in the step (an int32 Parameter; None: one forward per step).

        Returns (grads, scale, (total, ce, aux, loc, load, dropped, local)): what TrainStep.construct
        and a gradient-accumulation micro-batch (_MicroBatchGrad) both compute from one batch."""
        ids = self.overflow_check.start(ids)  # Ascend 910A: clear the NPU overflow register
        draw = self.step * self.micro_batches
        if micro_index is not None:
            draw = draw + micro_index
        ids = ops.depend(ids, ops.assign(self.dropout_draw, draw))  # before the forward reads it
        total, ce, aux, loc, load, dropped, local = self.net(ids, domain_ids)
        scale = self.loss_scale * 1.0
        sens = (ops.cast(scale, total.dtype), ops.zeros_like(ce), ops.zeros_like(aux), ops.zeros_like(loc),
                ops.zeros_like(load), ops.zeros_like(dropped), ops.zeros_like(local))
        grads = self.grad(self.net, self.weights)(ids, domain_ids, sens)
        grads = self.hyper_map(ops.partial(_scale_grad, 1.0 / scale), grads)
        return grads, scale, (total, ce, aux, loc, load, dropped, local)

    def construct(self, ids, domain_ids):
        grads, scale, outputs = self.scaled_grads(ids, domain_ids)
        total, ce, aux, loc, load, dropped, local = outputs
        return self.finish(grads, scale, total, ce, aux, loc, load, dropped, local)

    def finish(self, grads, scale, total, ce, aux, loc, load, dropped, local, overflow_flags=None):
        """Reduce, norm, overflow check, clip, update, loss scale, metrics row. grads: unscaled, unreduced.

        overflow_flags: None (read the NPU register here, after the reduction) or the [8] register
        flags this device gathered over a step's micro-batches (AccumulatingTrainStep)."""
        if self.grad_reducer is not None:
            grads = self.grad_reducer(grads)
            norm = ops.sqrt(self.grad_reducer.global_norm_sq(grads))
        else:
            norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        if overflow_flags is None:
            finite = self.overflow_check.finite(norm, norm)  # see pangu_sigma/training/overflow.py
        else:
            finite = self.overflow_check.finite_given(norm, overflow_flags)
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


class _Accumulators(nn.Cell):
    """The float32 buffers of one step's micro-batches (ACCUM_PREFIX names, zero between steps)."""

    def __init__(self, step):
        super().__init__(auto_prefix=False)
        self.grad_sums = ms.ParameterTuple([
            Parameter(ops.zeros(p.shape, ms.float32), name=ACCUM_PREFIX + p.name, requires_grad=False)
            for p in step.weights])
        self.loss_sums = Parameter(ops.zeros((4,), ms.float32), name=ACCUM_PREFIX + "losses", requires_grad=False)
        self.load_sum = Parameter(ops.zeros(step.metrics_load.shape[1:], ms.float32), name=ACCUM_PREFIX + "load",
                                  requires_grad=False)
        self.dropped_sum = Parameter(ops.zeros(step.metrics_dropped.shape[1:], ms.float32),
                                     name=ACCUM_PREFIX + "dropped", requires_grad=False)
        self.local_sum = Parameter(ops.zeros(step.metrics_local.shape[1:], ms.float32),
                                   name=ACCUM_PREFIX + "local", requires_grad=False)
        self.overflow_sum = Parameter(ops.zeros((8,), ms.float32), name=ACCUM_PREFIX + "overflow",
                                      requires_grad=False)
        self.micro_index = Parameter(Tensor(0, ms.int32), name=ACCUM_PREFIX + "micro_index", requires_grad=False)


class _MicroBatchGrad(nn.Cell):
    """One micro-batch: forward, backward at the loss scale, unscaled gradients added into the float32 buffers,
    losses and expert statistics added into their sums, the device's overflow register gathered."""

    def __init__(self, base, sums):
        super().__init__(auto_prefix=False)
        self.base = base
        self.sums = sums

    def construct(self, ids, domain_ids):
        base, o = self.base, self.sums
        grads, _, outputs = base.scaled_grads(ids, domain_ids, o.micro_index)
        total, ce, aux, loc, load, dropped, local = outputs
        total = ops.depend(total, ops.assign_add(o.micro_index, Tensor(1, ms.int32)))
        flags = base.overflow_check.local_flags(grads)  # [8]; zeros under isfinite
        base.hyper_map(_accumulate, o.grad_sums, grads)
        ops.assign_add(o.loss_sums, ops.stack((total, ce, aux, loc)))  # [4]
        ops.assign_add(o.load_sum, ops.cast(load, ms.float32))
        ops.assign_add(o.dropped_sum, ops.cast(dropped, ms.float32))
        ops.assign_add(o.local_sum, ops.cast(local, ms.float32))
        ops.assign_add(o.overflow_sum, flags)
        return total


class _ApplyAccumulated(nn.Cell):
    """The step's update from the buffers: mean gradient (sum / k), then TrainStep.finish; buffers zeroed."""

    def __init__(self, base, sums, steps):
        super().__init__(auto_prefix=False)
        self.base = base
        self.sums = sums
        self.inverse = Tensor(1.0 / steps, ms.float32)

    def construct(self):
        base, o = self.base, self.sums
        grads = base.hyper_map(ops.partial(_scale_grad, self.inverse), o.grad_sums)
        losses = ops.cast(o.loss_sums * self.inverse, ms.float32)  # [4]: means over the micro-batches
        scale = base.loss_scale * 1.0
        total = base.finish(grads, scale, losses[0], losses[1], losses[2], losses[3], o.load_sum * 1.0,
                            o.dropped_sum * 1.0, o.local_sum * 1.0, o.overflow_sum * 1.0)
        total = ops.depend(total, base.hyper_map(_zero, o.grad_sums))
        for buffer in (o.loss_sums, o.load_sum, o.dropped_sum, o.local_sum, o.overflow_sum, o.micro_index):
            total = ops.depend(total, ops.assign(buffer, ops.zeros_like(buffer)))
        return total


class AccumulatingTrainStep(nn.Cell):
    """One optimizer step over k = train.gradient_accumulation_steps micro-batches (gradient accumulation).

    `micro(ids, domain_ids)` (one compiled graph) runs one micro-batch of batch_size / k
    sequences per data-parallel rank: forward, backward at the current loss scale, and adds the
    unscaled gradients into float32 buffers (`grad_accum.<param>`, one per parameter: +4 B per
    parameter), the losses and expert statistics into their sums. `apply_update()` (a second graph)
    takes the mean gradient (sum / k, the gradient of the mean of the k micro-batch losses),
    then does what TrainStep does once per step: the bucketed gradient reduction (once per
    step, not per micro-batch), global norm, overflow check (any micro-batch's overflow
    skips the step: inf/NaN survive the sum; the 910A register is read after every micro-batch
    and the flags summed), clipping of the accumulated gradient, the (possibly ZeRO-1
    sharded) optimizer update, the loss scale, and the metrics row (losses: the mean over
    micro-batches; expert load, drops, locality: summed over them). Then it zeroes the buffers.
    With k = 1 it computes exactly TrainStep's step (0 + g = g, g * 1 = g).

    MoE routing is per micro-batch, as in Megatron: each micro-batch routes its own token
    groups with their own capacity (C from the micro-batch's tokens), aux loss (eq. 5) and
    locality loss (eq. 6). So with drops, or with the aux/locality terms (which are not
    linear in the tokens of a group), k micro-batches are not one batch of k times the size;
    dense models, and MoE without drops and without the two losses, are (to rounding).

    Why a host loop over two compiled graphs rather than an in-graph loop over the k
    micro-batches: compilation is independent of k (an unrolled in-graph loop traces forward
    and backward k times), and the activation peak is one micro-batch's by construction (the
    graphs are separate executions; in one graph the reuse would be left to the scheduler).
    The buffers (and the counters, metrics) are Parameters, so nothing crosses the host.

    Data: each call of `micro` takes the next micro-batch of the stream (pangu_sigma.data.dataset
    create_dataset(micro_batches=k)); on Ascend the k micro-batches of a step are one data-sink
    loop of `micro` (train.sink_runner). The buffers are not checkpointed (zero between steps).
    """

    def __init__(self, step, steps):
        super().__init__(auto_prefix=False)
        if steps < 1:
            raise ValueError(f"gradient accumulation over {steps} micro-batches; need >= 1")
        self.base = step
        self.accumulation_steps = int(steps)
        step.micro_batches = self.accumulation_steps  # dropout draws: step * k + micro-batch index
        self.sums = _Accumulators(step)
        self.micro = _MicroBatchGrad(step, self.sums)
        self.apply_update = _ApplyAccumulated(step, self.sums, steps)

    # what train.py, the checkpoint code and the tools read from a step cell
    metrics_scalars = property(lambda self: self.base.metrics_scalars)
    metrics_load = property(lambda self: self.base.metrics_load)
    metrics_dropped = property(lambda self: self.base.metrics_dropped)
    metrics_local = property(lambda self: self.base.metrics_local)
    optimizer = property(lambda self: self.base.optimizer)
    net = property(lambda self: self.base.net)

    def run_step(self, micro_batches):
        """Host side of one optimizer step: micro(ids, domain_ids) for each of the k batches, then apply_update()."""
        for ids, domain_ids in micro_batches:
            self.micro(ids, domain_ids)
        return self.apply_update()
