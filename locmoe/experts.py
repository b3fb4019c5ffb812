"""Batched expert FFNs (eq. 1): W_out . GeLU(W_in . x) for every expert at once, with eq. 1's exact (erf)
GeLU like the dense FFN (pangu_sigma/model/blocks.py)."""
import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, Normal


class BatchedExperts(nn.Cell):
    """num_experts FFNs applied with two batched matmuls on [E, N, d].

    With tensor parallelism the inner dimension is a 1/tp shard
    (ffn_hidden_size is then the per-rank width) and the caller sums the
    partial outputs over the TP group.
    """

    def __init__(self, num_experts, hidden_size, ffn_hidden_size, init_std=0.02, out_init_std=None,
                 compute_dtype=ms.float32):
        super().__init__()
        out_init_std = init_std if out_init_std is None else out_init_std
        self.w_in = Parameter(initializer(Normal(init_std), [num_experts, hidden_size, ffn_hidden_size]), name="w_in")
        self.w_out = Parameter(initializer(Normal(out_init_std), [num_experts, ffn_hidden_size, hidden_size]),
                               name="w_out")
        self.compute_dtype = compute_dtype

    def construct(self, x):
        x = x.astype(self.compute_dtype)  # [E, N, d]
        inner = ops.gelu(ops.bmm(x, self.w_in.astype(self.compute_dtype)), approximate="none")  # [E, N, h]
        return ops.bmm(inner, self.w_out.astype(self.compute_dtype))  # [E, N, d]
