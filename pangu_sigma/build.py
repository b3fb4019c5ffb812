"""From a RunConfig (+ the prepared dataset's meta.json) to topology, model and loss cell.

Shared by train, eval, generate and the tools, so they all build the same network.
"""
import dataclasses
import functools
import os

import numpy as np
import mindspore as ms

from locmoe.errors import ConfigError
from locmoe.layer import MoELayer
from locmoe.topology import Topology
from pangu_sigma.data.dataset import read_meta
from pangu_sigma.model import PanguSigmaModel, PanguSigmaWithLoss


def set_device(cfg, mode=ms.GRAPH_MODE):
    """Execution mode and device; Ascend reads DEVICE_ID from the environment."""
    ms.set_context(mode=mode)
    if cfg.parallel.device_target == "Ascend":
        ms.set_device("Ascend", int(os.environ.get("DEVICE_ID", "0")))
    else:
        ms.set_device("CPU")


def dataset_meta(cfg):
    """meta.json of cfg.data.dataset_dir, checked against the model config."""
    meta = read_meta(cfg.data.dataset_dir)
    if meta["seq_length"] != cfg.model.seq_length:
        raise ConfigError("model.seq_length", cfg.model.seq_length,
                          f"{meta['seq_length']}, the sample length of {cfg.data.dataset_dir}")
    if cfg.model.vocab_size not in (0, meta["vocab_size"]):
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"0 or {meta['vocab_size']}, the vocabulary of {cfg.data.dataset_dir}")
    return meta


def single_process_topology(cfg):
    """The topology this process routes with: the virtual cluster rank, or a lone rank."""
    par = cfg.parallel
    if par.virtual_world_size:
        return Topology(world_size=par.virtual_world_size, tp=par.op_level_model_parallel_num,
                        ep=par.expert_parallel, num_experts=cfg.num_experts,
                        devices_per_node=par.devices_per_node, rank=par.virtual_rank)
    if par.expert_parallel > 1 or par.op_level_model_parallel_num > 1:
        raise ConfigError("parallel.expert_parallel", par.expert_parallel,
                          "1 in a single process (multi-process runs: run_scripts/run_msrun.sh; or set "
                          "parallel.virtual_world_size to pose as one rank of a cluster)")
    return Topology(world_size=1, tp=1, ep=1, num_experts=cfg.num_experts, devices_per_node=1)


def token_counts(cfg):
    """Train-split token frequencies for the hash router, or None if the data has none."""
    path = os.path.join(cfg.data.dataset_dir, "token_counts.npy")
    return np.load(path) if os.path.isfile(path) else None


def build_model(cfg, meta, topology, with_loss=True):
    """PanguSigmaModel (wrapped with its loss if with_loss) for this config and dataset."""
    model_cfg = dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"], compute_dtype=cfg.compute_dtype)
    moe_cfg = cfg.moe_config(vocab_size=meta["vocab_size"]) if model_cfg.moe_layer_num > 0 else None
    counts = token_counts(cfg) if cfg.moe.router == "hash" else None
    out_std = model_cfg.param_init_std / (2.0 * model_cfg.num_layers) ** 0.5
    factory = functools.partial(MoELayer, token_counts=counts, out_init_std=out_std)
    model = PanguSigmaModel(model_cfg, moe_cfg, topology, moe_layer_factory=factory)
    return PanguSigmaWithLoss(model) if with_loss else model
