"""Activation recomputation levels (train.recompute), applied with MindSpore's cell recompute.

`Cell.recompute()` (mindspore/nn/cell.py, GRAPH mode) marks every primitive of
the cell except its outputs as recomputed: the backward pass recomputes the
cell's intermediates from its inputs instead of keeping them. Levels:

    none       keep every activation (fastest, most memory).
    attention  recompute the attention cell of every block (q, k, v, scores,
               softmax, context): Korthikanti et al. 2022's "selective"
               recomputation, which drops the N*a*s softmax terms that grow
               with the sequence length, for about one extra attention forward.
               Measured on MindSpore 2.10 CPU (pangu_sigma.tools.memory_check
               --levels none attention): the live peak is unchanged to the byte.
               Cause (a frontend pass, the same on CPU and Ascend):
               frontend/optimizer/recompute.cc InsertRecomputedNodes makes each
               recomputed copy wait, via Depend(input, MakeTuple(...)), for the
               gradient inputs of the first backward node reading a recomputed
               value (a "target") that do not themselves pass through a target
               (utils/recompute_helper.cc GetFirstTargetInputs, NewRecomputedNode).
               ops.matmul (MatMulExt) transposes its forward input in a backward
               node of its own (grad_math_ops.cc: dw = MatMulExt(
               MatrixTransposeExt(x), dout)), so every gradient reaches the
               attention's backward through targets: the list is empty (WARNING
               "Can not find the nodes to depend, please check the recompute
               strategy."), the Depend points at an empty MakeTuple and the kernel
               graph runs the copies in the forward. With the linears on the MatMul
               primitive (dw = MatMul(x, dout, transpose_a) reads the gradient)
               the copies wait and the level works (measured, seq 256, batches
               2/4: peak 1.74x/2.04x, activations 2.45x vs 2.04x predicted), but
               plan's activation model then over-predicts the `none` level by 35%
               at seq 128 (MatMul's backward keeps no transposed copies), so that
               change waits for param_count to model it. Re-measured (memory_check,
               seq 128, batches 2/4/8, the linears and the PV product on the
               primitives): predicted / measured 1.38 / 1.73 / 1.53 at `none`,
               1.28 / 1.34 / 1.31 at `block` (the bound is 1.25), while `attention`
               lowers the peak 1.12x / 1.27x / 1.38x. Until then use `block`.
    block      recompute every decoder block and the top query layer: only each
               block's input (the float32 residual stream, N*d*4 bytes) is kept,
               and one block's activations live at a time in the backward pass.
               In a sparse block the communication primitives of the MoE layer
               (All-to-All, the two-tier exchange's AllToAllV, TP AllGather /
               ReduceScatter / AllReduce) are kept, not recomputed, so the
               backward pass sends no extra tokens
               (their outputs, the expert buffers, stay in memory; param_count
               counts them). The TP AllReduces of the row-parallel linears are
               recomputed with the block (intra-node, N*d per call), as Megatron does.
Losses and gradients are unchanged (deterministic ops; a dropout mask is a hash
of the step, site and position, pangu_sigma.parallel.dropout, so the
recomputation redraws the forward's mask).
"""
RECOMPUTE_LEVELS = ("none", "attention", "block")  # read by the config without importing MindSpore


def _keep_communication(cell):
    """Exclude every collective primitive under cell from recomputation."""
    from mindspore import ops
    # ops.AlltoAllV is not a subclass of ops.AlltoAll (mindspore/ops/operations/comm_ops.py:856 and :1945, both
    # PrimitiveWithInfer): listed on its own, or recompute would re-send the tier-2 exchange.
    comm_primitives = (ops.AllReduce, ops.AllGather, ops.AlltoAll, ops.AlltoAllV, ops.ReduceScatter)
    for _, sub in cell.cells_and_names():
        for value in vars(sub).values():
            if isinstance(value, comm_primitives):
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


def resent_calls(level, num_layers, moe_layer_num):
    """{collective name: calls per micro-batch that recomputation runs a second time}: the TP AllReduce of
    every row-parallel linear inside a recomputed cell ("tp_row_linear", [N, d] each): the attention
    out-projection of the L blocks and the query layer (attention, block), the dense FFNs' w_out
    (block: L - M dense blocks and the query layer). The MoE layer's collectives: none (kept above)."""
    if level not in RECOMPUTE_LEVELS:
        raise ValueError(f"train.recompute={level!r}: expected one of {RECOMPUTE_LEVELS}")
    attention = 0 if level == "none" else num_layers + 1
    dense_ffn = num_layers - moe_layer_num + 1 if level == "block" else 0
    return {"tp_row_linear": attention + dense_ffn, "moe_exchange": 0}
