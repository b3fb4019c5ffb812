"""Gates: token features -> one score per expert.

GrAPGate is the paper's Grouped Average Pooling layer (eq. 4): expert i's
score is the mean of the i-th block of d/n features, i.e. a dense layer
whose fixed weight has n/d on block i of row i. Its rows are orthogonal,
which is the condition of Lemma 2. It is computed as a reshape + mean
(no matmul, no weight to learn); only the bias epsilon_i may be learned.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore.common.initializer import initializer, Normal

from locmoe.errors import ConfigError


def grap_weight(num_experts, hidden_size):
    """The fixed eq. 4 weight as a numpy array [n, d]: w[i, j] = n/d if i*d/n <= j < (i+1)*d/n."""
    if hidden_size % num_experts:
        raise ConfigError("hidden_size", hidden_size,
                          f"a multiple of num_experts={num_experts} (the GrAP gate averages d/n features per expert)")
    block = hidden_size // num_experts
    weight = np.zeros((num_experts, hidden_size), np.float32)
    for i in range(num_experts):
        weight[i, i * block:(i + 1) * block] = 1.0 / block
    return weight


class GrAPGate(nn.Cell):
    """Eq. 4 gate: x [T, d] -> omega . x + epsilon, [T, n]."""

    def __init__(self, hidden_size, num_experts, use_bias=True):
        super().__init__()
        grap_weight(num_experts, hidden_size)  # validates divisibility
        self.num_experts = num_experts
        self.block = hidden_size // num_experts
        self.use_bias = use_bias
        self.bias = Parameter(Tensor(np.zeros(num_experts, np.float32)), name="bias") if use_bias else None

    def construct(self, x):
        tokens = x.shape[0]
        pooled = x.reshape(tokens, self.num_experts, self.block).mean(-1)  # [T, n]
        if self.use_bias:
            pooled = pooled + self.bias
        return pooled


class DenseGate(nn.Cell):
    """Learned linear gate W x (Switch Transformer), [T, d] -> [T, n]."""

    def __init__(self, hidden_size, num_experts, init_std=0.02):
        super().__init__()
        self.weight = Parameter(initializer(Normal(init_std), [num_experts, hidden_size], ms.float32), name="weight")

    def construct(self, x):
        return ops.matmul(x, self.weight.T)  # [T, n]
