"""Activation recomputation levels (train.recompute), applied with MindSpore's cell recompute.

`Cell.recompute()` (mindspore/nn/cell.py, GRAPH mode) marks every primitive of
the cell except its outputs as recomputed: the backward pass recomputes the
cell's intermediates from its inputs instead of keeping them. Levels:

    none       keep every activation (fastest, most memory).
    attention  recompute the attention cell of every block (q, k, v, scores,
               softmax, context): Korthikanti et al. 2022's "selective"
               recomputation, which drops the N*a*s softmax terms that grow
               with the sequence length, for about one extra attention forward.
               How MindSpore keeps the recomputed copies in the backward
               (frontend/optimizer/recompute.cc InsertRecomputedNodes,
               utils/recompute_helper.cc GetFirstTargetInputs / NewRecomputedNode;
               a frontend pass, the same on CPU and Ascend): each recomputed
               copy without recomputed inputs gets Depend(input, MakeTuple(first
               target inputs)), the gradient inputs of the first backward node
               that reads a recomputed value (a "target") and that do not
               themselves pass through a target. With ops.matmul (MatMulExt)
               every such gradient does: its backward transposes the forward
               input in a node of its own (grad_math_ops.cc, MatMulExt:
               dw = MatMulExt(MatrixTransposeExt(x), dout)), so that Transpose is
               the target and the gradient reaches the attention's targets only
               through targets. The list came out empty ("Can not find the nodes
               to depend, please check the recompute strategy.", a WARNING), the
               Depend pointed at an empty MakeTuple, and the CPU kernel graph ran
               the copies during the forward: the live peak was unchanged to the
               byte. The linear layers therefore use the MatMul primitive, whose
               backward is dw = MatMul(x, dout, transpose_a) (grad_math_ops.cc,
               MatMul): out_proj's weight gradient is a target that reads the
               attention output's gradient, and the copies wait for it (measured
               with pangu_sigma.tools.memory_check; tests/test_memory_check.py).
               Block recomputation lowered the peak with either matmul.
    block      recompute every decoder block and the top query layer: only each
               block's input (the float32 residual stream, N*d*4 bytes) is kept,
               and one block's activations live at a time in the backward pass.
               In a sparse block the communication primitives of the MoE layer
               (All-to-All, TP AllGather / ReduceScatter / AllReduce) are kept,
               not recomputed, so the backward pass sends no extra tokens
               (their outputs, the expert buffers, stay in memory; param_count
               counts them). The TP AllReduces of the row-parallel linears are
               recomputed with the block (intra-node, N*d per call), as Megatron does.
Losses and gradients are unchanged (deterministic ops; dropout draws differ
between the forward and the recomputation, so keep dropout_rate 0 when bitwise
equality matters).
"""
from mindspore import ops

RECOMPUTE_LEVELS = ("none", "attention", "block")
_COMM_PRIMITIVES = (ops.AllReduce, ops.AllGather, ops.AlltoAll, ops.ReduceScatter)


def _keep_communication(cell):
    """Exclude every collective primitive under cell from recomputation."""
    for _, sub in cell.cells_and_names():
        for value in vars(sub).values():
            if isinstance(value, _COMM_PRIMITIVES):
                value.recompute(False)


def apply_recompute(model, level):
    """Mark the blocks of a PanguSigmaModel for recomputation at `level` (see RECOMPUTE_LEVELS)."""
    if level not in RECOMPUTE_LEVELS:
        raise ValueError(f"train.recompute={level!r}: expected one of {RECOMPUTE_LEVELS}")
    if level == "none":
        return model
    layers = list(model.blocks) + [model.query_layer]
    for layer in layers:
        if level == "attention":
            layer.attn.recompute()
        else:
            layer.recompute()
            moe = getattr(layer, "ffn", None)
            if moe is not None and hasattr(moe, "exchange"):  # a sparse block's MoELayer
                _keep_communication(moe)
    return model
