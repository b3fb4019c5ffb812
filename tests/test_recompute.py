"""Activation recomputation (train.recompute) changes memory, not results: the same losses and
parameters after 3 optimizer steps from the seed with none / attention / block (<= 1e-6 relative),
on a model with dense and sparse blocks and dropout 0.1 (the recomputed forward redraws the forward's
masks); and bad levels fail at config load."""
import numpy as np
import pytest
import mindspore as ms

from locmoe.errors import ConfigError
from locmoe.parallel_context import ParallelContext

VOCAB, SEQ, BATCH, STEPS = 64, 8, 4, 3


def _config(level, output_dir):
    from pangu_sigma.config import config_from_dict

    return config_from_dict({
        "model": {"seq_length": SEQ, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "ffn_hidden_size": 64,
                  "moe_layer_num": 1, "dropout_rate": 0.1},
        "moe": {"router": "locmoe", "expert_num_per_dp_dim": 4, "capacity_factor": 1.0},
        "data": {"dataset_dir": output_dir},
        "train": {"batch_size": BATCH, "sink_size": 1, "train_steps": STEPS, "output_dir": output_dir,
                  "recompute": level},
        "optim": {"lr": 0.01, "min_lr": 0.001, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.1},
    })


def _run(level, output_dir):
    from pangu_sigma.build import single_process_topology
    from pangu_sigma.training.train import build_train_step

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    cfg = _config(level, output_dir)
    ms.set_seed(5)
    ctx = ParallelContext(single_process_topology(cfg), "emulated", distributed=False)
    step_cell, net = build_train_step(cfg, {"vocab_size": VOCAB, "seq_length": SEQ}, ctx)
    rng = np.random.RandomState(3)
    ids = ms.Tensor(rng.randint(0, VOCAB, (BATCH, SEQ + 1)).astype(np.int32))  # [B, S+1]
    domains = ms.Tensor(np.zeros(BATCH, np.int32))
    losses = []
    for _ in range(STEPS):
        step_cell(ids, domains)
        losses.append(float(step_cell.metrics_scalars.asnumpy()[0, 0]))
    return np.array(losses), {p.name: p.asnumpy() for p in net.trainable_params()}


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _run("none", str(tmp_path_factory.mktemp("recompute_none")))


@pytest.mark.parametrize("level", ["attention", "block"])
def test_recompute_gives_same_losses_and_parameters(plain, level, tmp_path):
    losses, params = _run(level, str(tmp_path))
    ref_losses, ref_params = plain
    assert _rel(losses, ref_losses) <= 1e-6, (losses, ref_losses)
    worst = max((_rel(params[k], ref_params[k]), k) for k in ref_params)
    assert worst[0] <= 1e-6, worst
    assert ref_losses[-1] < ref_losses[0]  # the steps trained


def test_recompute_marks_cells():
    """The levels mark what they say (the equality above alone would pass if nothing were marked)."""
    from pangu_sigma.build import single_process_topology
    from pangu_sigma.build import build_model

    cfg = _config("none", "unused")
    for level, expect_attn, expect_block in (("attention", True, False), ("block", False, True)):
        from pangu_sigma.model.recompute import apply_recompute
        net = build_model(cfg, {"vocab_size": VOCAB, "seq_length": SEQ}, single_process_topology(cfg))
        apply_recompute(net.model, level)
        for layer in list(net.model.blocks) + [net.model.query_layer]:
            assert (layer.attn._recompute_cell is not None) == expect_attn
            assert (layer._recompute_cell is not None) == expect_block


def test_bad_recompute_level_is_a_config_error():
    with pytest.raises(ConfigError, match="train.recompute"):
        _config("full", "unused")


def test_block_recompute_keeps_every_collective_primitive():
    """_keep_communication marks every collective primitive of the MoE layer as not recomputed, the two-tier
    exchange's AlltoAllV too (not a subclass of AlltoAll). Primitives built without a communicator (their
    constructors need init()); the row-parallel AllReduce outside the MoE layer stays recomputed."""
    from mindspore import nn, ops
    from mindspore.ops import Primitive
    from pangu_sigma.model.recompute import _keep_communication, resent_calls

    def bare(cls):
        prim = cls.__new__(cls)
        Primitive.__init__(prim, cls.__name__)
        return prim

    class Holder(nn.Cell):
        def __init__(self, prim):
            super().__init__()
            self.op = prim

    kinds = (ops.AllReduce, ops.AllGather, ops.AlltoAll, ops.AlltoAllV, ops.ReduceScatter)
    moe = nn.CellList([Holder(bare(cls)) for cls in kinds])
    _keep_communication(moe)
    assert [cell.op.attrs.get("recompute") for cell in moe] == [False] * len(kinds)
    # what is re-sent: row-parallel AllReduces only (attention: L + 1 cells; block: + the L - M + 1 dense FFNs)
    assert resent_calls("none", 39, 8) == {"tp_row_linear": 0, "moe_exchange": 0}
    assert resent_calls("attention", 39, 8) == {"tp_row_linear": 40, "moe_exchange": 0}
    assert resent_calls("block", 39, 8) == {"tp_row_linear": 72, "moe_exchange": 0}
