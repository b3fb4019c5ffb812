"""The PanGu-Sigma model: embeddings, attention, dense & sparse blocks, top query layer.

Names are imported on first use (PEP 562), so `pangu_sigma.model.model_config` and
`pangu_sigma.model.recompute` (read by the config, plan and the launchers) do not import MindSpore.
"""
import importlib

_MODULE_OF = {
    "CausalAttention": "attention", "Linear": "attention",
    "DenseBlock": "blocks", "DenseFFN": "blocks", "SparseBlock": "blocks", "TopQueryLayer": "blocks",
    "Embedding": "embedding", "ModelConfig": "model_config",
    "PanguSigmaModel": "pangu_sigma", "PanguSigmaWithLoss": "pangu_sigma", "token_cross_entropy": "pangu_sigma",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
