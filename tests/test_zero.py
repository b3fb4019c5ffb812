"""Optimizer-state sharding (pangu_sigma.parallel.zero): the slice layout a converter relies on,
and the sharded AdamWeightDecay's update against MindSpore's nn.AdamWeightDecay (one rank,
where the update formula, decay groups, learning-rate schedule and global step must match;
the multi-rank runs are in test_parallel_equivalence.py)."""
import numpy as np
import pytest
import mindspore as ms

from locmoe.topology import Topology
from pangu_sigma.parallel.zero import shard_moment, slice_layout, unshard_moment


@pytest.mark.parametrize("size,group", [(10, 3), (12, 4), (5, 8), (7, 1)])
def test_slices_cover_the_tensor_once_with_zero_padding(size, group):
    full = np.arange(1, size + 1, dtype=np.float32).reshape(-1, 1)  # [size, 1]
    slices = [shard_moment(full, group, k) for k in range(group)]
    length = -(-size // group)
    assert all(s.shape == (length,) for s in slices)
    assert [slice_layout(size, group, k)[1:] for k in range(group)] == [(k * length, (k + 1) * length)
                                                                        for k in range(group)]
    joined = np.concatenate(slices)
    assert np.array_equal(joined[:size], full.reshape(-1)) and not joined[size:].any()
    assert np.array_equal(unshard_moment(slices, full.shape), full)


def _steps(sharded, bucket_bytes=None):
    from pangu_sigma.build import build_model, single_process_topology
    from pangu_sigma.config import config_from_dict
    from pangu_sigma.parallel.zero import sharded_optimizer
    from pangu_sigma.training.lr_schedule import WarmupCosineLR
    from pangu_sigma.training.train_step import TrainStep, build_optimizer

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    cfg = config_from_dict({
        "model": {"seq_length": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64,
                  "moe_layer_num": 1},
        "moe": {"expert_num_per_dp_dim": 4, "capacity_factor": 4.0},
        "train": {"batch_size": 4, "train_steps": 3},
        "optim": {"lr": 0.01, "min_lr": 0.001, "warmup_steps": 1, "grad_clip": 0.5, "weight_decay": 0.1},
    })
    ms.set_seed(3)
    topology = single_process_topology(cfg)
    net = build_model(cfg, {"vocab_size": 64, "seq_length": 8}, topology)
    schedule = WarmupCosineLR(cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, 3)
    if sharded:  # bucket_bytes: many small gather buckets instead of one per replica group
        bucket_mb = 256.0 if bucket_bytes is None else bucket_bytes / 2 ** 20  # as parallel.grad_bucket_mb
        optimizer = sharded_optimizer(net, cfg.optim, schedule,
                                      Topology(world_size=1, tp=1, ep=1, num_experts=4, devices_per_node=1),
                                      "emulated", lambda p: False, bucket_mb)
        sizes = [sum(optimizer.parameters[i].size * 4 for i in members) for members in optimizer.members]  # 1 rank
        if bucket_bytes is None:
            assert len(optimizer.members) == 1  # one replica group, all of it under 256 MiB
        else:  # every bucket within the size, or a single parameter bigger than it
            assert len(optimizer.members) > 5
            assert all(size <= bucket_bytes or len(m) == 1 for size, m in zip(sizes, optimizer.members))
    else:
        optimizer = build_optimizer(net, cfg.optim, schedule)
    step = TrainStep(net, optimizer, schedule, cfg.optim.grad_clip, False, 1.0, 1000, 1, 1, 4)
    rng = np.random.RandomState(0)
    ids = ms.Tensor(rng.randint(0, 64, (4, 9)).astype(np.int32))  # [B, S+1]
    domains = ms.Tensor(np.zeros(4, np.int32))
    losses = []
    for _ in range(3):
        step(ids, domains)
        losses.append(float(step.metrics_scalars.asnumpy()[0, 0]))
    params = {p.name: p.asnumpy() for p in net.trainable_params()}
    moments = {p.name: p.asnumpy() for p in step.get_parameters() if p.name.startswith(("adam_m.", "zero_m."))}
    return np.array(losses), params, moments


@pytest.fixture(scope="module")
def reference():
    return _steps(False)


@pytest.mark.parametrize("bucket_bytes", [None, 4096])
def test_sharded_update_equals_adamweightdecay(reference, bucket_bytes):
    ref_losses, ref_params, ref_moments = reference
    losses, params, moments = _steps(True, bucket_bytes)
    assert np.allclose(losses, ref_losses, rtol=1e-6, atol=0)
    # relative Frobenius difference per tensor (the key bias has a zero true gradient: its
    # float-noise gradient, normalised by Adam, differs elementwise between any two kernels)
    worst = max((_rel(params[k], v), k) for k, v in ref_params.items())
    assert worst[0] <= 1e-4, worst
    names = sorted(ref_params)
    assert _rel(np.concatenate([params[k].reshape(-1) for k in names]),
                np.concatenate([ref_params[k].reshape(-1) for k in names])) <= 1e-6
    assert len(moments) == len(ref_moments)
    for name, value in ref_moments.items():  # one rank: the slice is the whole moment, flat
        mine = moments["zero_m." + name[len("adam_m."):]]
        assert mine.shape == (value.size,) and _rel(mine, value.reshape(-1)) <= 1e-5, name


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
