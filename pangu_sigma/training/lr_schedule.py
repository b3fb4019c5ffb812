"""Linear warm-up then cosine decay to min_lr."""
import math

import mindspore as ms
from mindspore import nn, ops, Tensor


def lr_at(step, lr, min_lr, warmup_steps, decay_steps):
    """Python reference of the schedule (step counted from 0)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(nn.learning_rate_schedule.LearningRateSchedule):
    """lr(step) = lr*(step+1)/warmup during warm-up, then min_lr + (lr-min_lr)*(1+cos(pi*p))/2."""

    def __init__(self, lr, min_lr, warmup_steps, decay_steps):
        super().__init__()
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.warmup = float(warmup_steps)
        self.span = float(max(1, decay_steps - warmup_steps))

    def construct(self, global_step):
        step = ops.cast(global_step, ms.float32)
        warm = self.lr * (step + 1.0) / max(self.warmup, 1.0)
        progress = ops.minimum((step - self.warmup) / self.span, Tensor(1.0, ms.float32))
        cosine = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + ops.cos(math.pi * progress))
        if self.warmup > 0:
            return ops.select(step < self.warmup, warm, cosine)
        return cosine
