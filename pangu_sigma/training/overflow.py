"""fp16 overflow detection for the loss scale: NPU float status on Ascend 910A, isfinite elsewhere.

Ascend 910A computes float16 in saturation mode: an overflow gives +-65504,
not inf/NaN, so `isfinite` of the gradient norm never fires there. The device
keeps an overflow register instead; MindSpore's own loss-scale cell reads it
on 910A (mindspore/nn/wrap/loss_scale.py, TrainOneStepWithLossScaleCell:
`ascend_910a_target` = soc feature "amp_loss_scale_train_classic_target",
`_get_ascend_overflow_status_on_saturation_mode`) and so does
`mindspore.amp.all_finite` (mindspore/amp.py, `_all_finite`): clear the
register with NPUClearFloatStatusV2, run the step, read it with
NPUGetFloatStatusV2 (an int32 [8] vector, all zero = no overflow), AllReduce
the vector over the devices *before* clearing it again, then clear it.
The same source uses the register on 910B only when
MS_ASCEND_CHECK_OVERFLOW_MODE=SATURATION_MODE (910B's default is INFNAN mode,
where inf/NaN propagate and isfinite works).
"""
import os

import mindspore as ms
from mindspore import nn, ops, Tensor

MODES = ("isfinite", "npu_float_status")
FEATURE_910A = "amp_loss_scale_train_classic_target"  # mindspore/nn/wrap/loss_scale.py, mindspore/amp.py
FEATURE_910B = "train_hq_dtype_line"


def _soc_supports(feature):
    from mindspore._c_expression import MSContext  # as mindspore/amp.py does
    return MSContext.get_instance().ascend_soc_supports_feature(feature)


def overflow_check_mode(device_target, soc_supports=None, environ=None):
    """'npu_float_status' where fp16 saturates (Ascend 910A; 910B in SATURATION_MODE), else 'isfinite'."""
    environ = os.environ if environ is None else environ
    soc_supports = _soc_supports if soc_supports is None else soc_supports
    if device_target != "Ascend":
        return "isfinite"
    if soc_supports(FEATURE_910A):
        return "npu_float_status"
    if soc_supports(FEATURE_910B) and environ.get("MS_ASCEND_CHECK_OVERFLOW_MODE") == "SATURATION_MODE":
        return "npu_float_status"
    return "isfinite"


class OverflowCheck(nn.Cell):
    """start(x) -> x after clearing the status; finite(norm, after) -> bool [] (True: apply the step).

    mode 'isfinite': finite = isfinite(norm) (norm is already the global norm).
    mode 'npu_float_status': finite = isfinite(norm) and the NPU overflow register,
    summed over the world with `world_reduce` (an AllReduce cell, or None for one
    device), is all zero; the register is cleared after the read and the reduce.
    `after` is a tensor the read must wait for (the reduced gradients).
    """

    def __init__(self, mode, world_reduce=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"overflow check mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.world_reduce = world_reduce
        self.npu = mode == "npu_float_status"
        if self.npu:
            from mindspore.ops.operations.math_ops import NPUClearFloatStatusV2, NPUGetFloatStatusV2
            self.clear_status = NPUClearFloatStatusV2()
            self.get_status = NPUGetFloatStatusV2()

    def start(self, x):
        """Clear the overflow register before the forward pass that produces from `x`."""
        if not self.npu:
            return x
        status = Tensor([0] * 8, ms.int32)
        cleared = self.clear_status(status)
        return ops.depend(x, cleared)

    def finite(self, norm, after):
        ok = ops.isfinite(norm)
        if not self.npu:
            return ok
        status = ops.depend(Tensor([0] * 8, ms.int32), after)
        read = self.get_status(status)  # [8] int32, non-zero = overflow on this device
        flags = ops.cast(read, ms.float32)
        if self.world_reduce is not None:
            flags = self.world_reduce(flags)  # [8], summed over the world
        status = ops.depend(status, flags)
        cleared = self.clear_status(status)  # after the reduce, so the reduce's own status is not carried over
        flags = ops.depend(flags, cleared)
        return ops.logical_and(ok, ops.equal(flags, 0.0).all())

    def local_flags(self, after):
        """[8] float32: this device's overflow register, read after `after` and then cleared (zeros under
        isfinite). Gradient accumulation reads it after every micro-batch and sums the flags."""
        if not self.npu:
            return ops.zeros((8,), ms.float32)
        status = ops.depend(Tensor([0] * 8, ms.int32), after)
        flags = ops.cast(self.get_status(status), ms.float32)  # [8], non-zero = overflow on this device
        cleared = self.clear_status(ops.depend(status, flags))
        return ops.depend(flags, cleared)

    def finite_given(self, norm, flags):
        """As finite, with the register flags this device gathered over a step's micro-batches (`flags`, [8])
        plus its register now (the reduction), summed over the world."""
        ok = ops.isfinite(norm)
        if not self.npu:
            return ok
        flags = flags + self.local_flags(norm)
        if self.world_reduce is not None:
            flags = self.world_reduce(flags)  # [8], summed over the world
        return ops.logical_and(ok, ops.equal(flags, 0.0).all())
