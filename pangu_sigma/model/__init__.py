"""The PanGu-Sigma model: embeddings, attention, dense & sparse blocks, top query layer."""
from pangu_sigma.model.attention import CausalAttention, Linear
from pangu_sigma.model.blocks import DenseBlock, DenseFFN, SparseBlock, TopQueryLayer
from pangu_sigma.model.embedding import Embedding
from pangu_sigma.model.model_config import ModelConfig
from pangu_sigma.model.pangu_sigma import PanguSigmaModel, PanguSigmaWithLoss, token_cross_entropy

__all__ = [
    "CausalAttention", "DenseBlock", "DenseFFN", "Embedding", "Linear", "ModelConfig",
    "PanguSigmaModel", "PanguSigmaWithLoss", "SparseBlock", "TopQueryLayer", "token_cross_entropy",
]
