"""ModelConfig: the dense dimensions of PanGu-Sigma (the MoE part is locmoe.MoEConfig)."""
from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    seq_length: int = 64
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    ffn_hidden_size: int = 512
    moe_layer_num: int = 2        # the top moe_layer_num decoder layers are sparse
    dropout_rate: float = 0.0
    param_init_std: float = 0.02
    layernorm_eps: float = 1e-5
    compute_dtype: str = "float32"  # float16 on Ascend

    @property
    def dense_layer_num(self):
        return self.num_layers - self.moe_layer_num
