"""Tensor-parallel layouts and resharding, single process (no communication runs).

Parallel models for every rank of a TP2 x EP2 cluster are *built* in this one
process (group creation is stubbed; nothing is executed), which is enough to
check parameter names, shard shapes, the recorded layouts and the
full -> shards -> full round trip. Values and gradients under msrun: test_tp_msrun.py.
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, Parameter
from mindspore.common.initializer import Normal, initializer

from locmoe import comm
from locmoe.config import MoEConfig
from locmoe.errors import ConfigError
from locmoe.parallel_context import ParallelContext
from locmoe.topology import Topology
from pangu_sigma.model import ModelConfig, PanguSigmaModel, PanguSigmaWithLoss
from pangu_sigma.parallel import TPShard, gather_full_params, shard_full_params, tp_shard_specs
from pangu_sigma.parallel.dropout import HashDropout, attach_draw_counter

VOCAB, SEQ, HIDDEN, HEADS, FFN, EXPERTS = 64, 8, 32, 4, 64, 4


@pytest.fixture(autouse=True)
def stub_groups(monkeypatch):
    """Build distributed cells without mindspore.communication.init(): group creation is a no-op."""
    registry = comm.GroupRegistry()
    registry._create = lambda name, ranks: None
    monkeypatch.setattr(comm, "GROUPS", registry)
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


class ExpertsDouble(nn.Cell):
    """Stands in for locmoe.layer.MoELayer at construction: a replicated router weight and
    experts [E/ep, d, h/tp] / [E/ep, h/tp, d] as the distributed MoELayer holds them."""

    def __init__(self, moe_config, hidden_size, ffn_hidden_size, topology, param_init_std=0.02,
                 compute_dtype=ms.float32, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        parallel = kwargs.get("parallel")
        ep, tp = (parallel.ep, parallel.tp) if parallel is not None else (1, 1)
        experts, inner = moe_config.num_experts // ep, ffn_hidden_size // tp
        self.router = nn.Cell()
        self.router.weight = Parameter(initializer(Normal(0.1), [hidden_size, moe_config.num_experts]), name="weight")
        self.experts = nn.Cell()
        self.experts.w_in = Parameter(initializer(Normal(0.1), [experts, hidden_size, inner]), name="w_in")
        self.experts.w_out = Parameter(initializer(Normal(0.1), [experts, inner, hidden_size]), name="w_out")


def model_config(**overrides):
    values = dict(vocab_size=VOCAB, seq_length=SEQ, hidden_size=HIDDEN, num_layers=2, num_heads=HEADS,
                  ffn_hidden_size=FFN, moe_layer_num=1)
    values.update(overrides)
    return ModelConfig(**values)


def topology(rank, world=4, tp=2, ep=2):
    return Topology(world_size=world, tp=tp, ep=ep, num_experts=EXPERTS, devices_per_node=2, rank=rank)


def build(topo=None, distributed=True, factory=ExpertsDouble, moe_cfg=None, seed=0, **overrides):
    """PanguSigmaWithLoss: single process when topo is None, else the parallel model of topo.rank."""
    ms.set_seed(seed)
    moe_cfg = moe_cfg or MoEConfig(num_experts=EXPERTS, vocab_size=VOCAB)
    if topo is None:
        single = Topology(world_size=1, num_experts=EXPERTS, devices_per_node=1)
        model = PanguSigmaModel(model_config(**overrides), moe_cfg, single, moe_layer_factory=factory)
        return PanguSigmaWithLoss(model)
    parallel = ParallelContext(topo, "emulated", distributed=distributed)
    model = PanguSigmaModel(model_config(**overrides), moe_cfg, topo, moe_layer_factory=factory, parallel=parallel)
    return PanguSigmaWithLoss(model)


def params(net):
    return {p.name: p.asnumpy() for p in net.get_parameters()}


def test_tpshard_fused_layout_and_round_trip():
    full = np.arange(4 * 8).reshape(4, 8)
    fused = TPShard(1, parts=2)  # [k0 k1 k2 k3 | v0 v1 v2 v3] over 2 ranks
    np.testing.assert_array_equal(fused.shard(full, 2, 0), full[:, [0, 1, 4, 5]])
    np.testing.assert_array_equal(fused.shard(full, 2, 1), full[:, [2, 3, 6, 7]])
    np.testing.assert_array_equal(fused.unshard([fused.shard(full, 2, r) for r in range(2)]), full)
    rows = TPShard(0)
    np.testing.assert_array_equal(rows.unshard([rows.shard(full, 4, r) for r in range(4)]), full)
    assert fused.local_shape((4, 8), 2) == (4, 4)
    with pytest.raises(ValueError, match="does not split"):
        TPShard(1, parts=2).local_shape((4, 6), 2)


def test_parallel_model_names_shapes_and_layouts():
    single = build()
    names = [p.name for p in single.get_parameters()]
    for rank in range(4):
        net = build(topology(rank))
        model = net.model
        assert [p.name for p in net.get_parameters()] == names  # same names, shard shapes
        shapes = {p.name: p.shape for p in net.get_parameters()}
        assert shapes["model.embedding.token_table"] == (VOCAB // 2, HIDDEN)
        assert shapes["model.embedding.position_table"] == (SEQ, HIDDEN)
        assert shapes["model.blocks.0.attn.q_proj.weight"] == (HIDDEN, HIDDEN // 2)
        assert shapes["model.blocks.0.attn.kv_proj.weight"] == (HIDDEN, HIDDEN)  # [d, 2d/tp]
        assert shapes["model.blocks.0.attn.kv_proj.bias"] == (HIDDEN,)
        assert shapes["model.blocks.0.attn.out_proj.weight"] == (HIDDEN // 2, HIDDEN)
        assert shapes["model.blocks.0.attn.out_proj.bias"] == (HIDDEN,)
        assert shapes["model.blocks.0.ffn.w_in.weight"] == (HIDDEN, FFN // 2)
        assert shapes["model.blocks.0.ffn.w_out.weight"] == (FFN // 2, HIDDEN)
        assert shapes["model.query_layer.top_query_table"] == (SEQ, HIDDEN)
        assert shapes["model.blocks.1.ffn.experts.w_in"] == (EXPERTS // 2, HIDDEN, FFN // 2)
        assert model.blocks[1].ffn.kwargs["parallel"].topology.rank == rank  # factory got parallel=
        assert model.blocks[0].attn.local_heads == HEADS // 2
        assert model.embedding.vocab_start == (rank % 2) * VOCAB // 2
        specs = tp_shard_specs(net)
        assert model.tp_shard_specs == specs  # current (wrapped) parameter names
        expected = {}
        for prefix in ("model.blocks.0.", "model.blocks.1.", "model.query_layer."):
            expected.update({prefix + "attn.q_proj.weight": TPShard(1), prefix + "attn.q_proj.bias": TPShard(0),
                             prefix + "attn.kv_proj.weight": TPShard(1, 2),
                             prefix + "attn.kv_proj.bias": TPShard(0, 2),
                             prefix + "attn.out_proj.weight": TPShard(0)})
        for prefix in ("model.blocks.0.", "model.query_layer."):
            expected.update({prefix + "ffn.w_in.weight": TPShard(1), prefix + "ffn.w_in.bias": TPShard(0),
                             prefix + "ffn.w_out.weight": TPShard(0)})
        expected["model.embedding.token_table"] = TPShard(0)
        assert specs == expected
        assert net.model.tp == 2
        assert type(net.cross_entropy).__name__ == "VocabParallelCrossEntropy"


def test_dropout_masks_of_tp2_x_dp2_ranks_are_the_single_process_masks():
    """Every dropout site gets the same id on every layout; the replicated sites draw one mask on both
    TP ranks, and the TP ranks' attention-probability masks (their heads) and the DP ranks' rows
    assemble into the single process's mask of the global batch."""
    counter = Parameter(ms.Tensor(3, ms.int32), name="dropout_draw", requires_grad=False)

    def sites(net):
        attach_draw_counter(net, counter, seed=99)
        cells = {name: cell for name, cell in net.cells_and_names() if isinstance(cell, HashDropout)}
        for cell in cells.values():
            cell.set_train(True)
        return cells

    def mask(cell, shape):
        return cell(ms.Tensor(np.ones(shape, np.float32))).asnumpy() > 0

    batch = 2
    single = sites(build(dropout_rate=0.5))
    ranks = [sites(build(topology(rank), dropout_rate=0.5)) for rank in range(4)]  # rank = dp_rank * 2 + tp_rank
    assert len(single) == 10 and all(list(r) == list(single) for r in ranks)
    for name, cell in single.items():  # same seed, site and draw: the same hash state at every site
        assert all(r[name].host_state == cell.host_state for r in ranks), name
    for name in ("model.embedding.dropout", "model.blocks.1.attn.prob_dropout", "model.blocks.1.ffn_dropout"):
        cell = single[name]
        if name.endswith("prob_dropout"):  # [B, H, S, S], heads split over TP
            full = mask(cell, (2 * batch, HEADS, SEQ, SEQ))
            pieces = [[mask(ranks[2 * d + t][name], (batch, HEADS // 2, SEQ, SEQ)) for t in range(2)]
                      for d in range(2)]
            assembled = np.concatenate([np.concatenate(p, axis=1) for p in pieces], axis=0)
        else:  # [B, S, d], replicated over TP
            full = mask(cell, (2 * batch, SEQ, HIDDEN))
            pieces = [[mask(ranks[2 * d + t][name], (batch, SEQ, HIDDEN)) for t in range(2)] for d in range(2)]
            for d in range(2):
                np.testing.assert_array_equal(pieces[d][0], pieces[d][1], err_msg=name)
            assembled = np.concatenate([p[0] for p in pieces], axis=0)
        np.testing.assert_array_equal(assembled, full, err_msg=name)
        assert 0.3 < full.mean() < 0.7


def test_tp1_and_non_distributed_contexts_keep_the_single_process_model():
    single = build()
    for net in (build(topology(0, world=2, tp=1, ep=1)), build(topology(1), distributed=False)):
        assert [(p.name, p.shape) for p in net.get_parameters()] == \
               [(p.name, p.shape) for p in single.get_parameters()]
        assert tp_shard_specs(net) == {} and net.model.tp == 1
        assert type(net.cross_entropy).__name__ == "_TokenCrossEntropy"


def test_factory_gets_parallel_only_when_given():
    single = build()
    assert single.model.blocks[1].ffn.kwargs == {}


@pytest.mark.parametrize("field,value", [("num_heads", 1), ("vocab_size", 63), ("ffn_hidden_size", 66 + 1)])
def test_tp_divisibility_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=rf"model\.{field}={value} is invalid: .*tp=2") as err:
        build(topology(0), **{field: value})
    assert "\n" not in str(err.value)


def test_incremental_decoding_with_tp_is_not_implemented():
    net = build(topology(0))
    with pytest.raises(NotImplementedError, match="incremental decoding with tensor parallelism"):
        net.model.forward_with_cache(None, None)


def test_reshard_round_trip_tp2_ep2():
    full = params(build(seed=3))
    topos = [topology(r) for r in range(4)]
    nets = [build(t) for t in topos]
    shards = [shard_full_params(full, net, t) for net, t in zip(nets, topos)]
    for net, shard in zip(nets, shards):
        assert {p.name: p.shape for p in net.get_parameters()} == {k: v.shape for k, v in shard.items()}
    # rank 3: tp_rank 1, ep_rank 1
    h, d = FFN // 2, HIDDEN // 2
    kv = full["model.blocks.0.attn.kv_proj.weight"]
    np.testing.assert_array_equal(shards[3]["model.blocks.0.attn.kv_proj.weight"],
                                  np.concatenate([kv[:, d:HIDDEN], kv[:, HIDDEN + d:]], axis=1))
    np.testing.assert_array_equal(shards[3]["model.blocks.1.ffn.experts.w_in"],
                                  full["model.blocks.1.ffn.experts.w_in"][2:, :, h:])
    np.testing.assert_array_equal(shards[3]["model.blocks.1.ffn.experts.w_out"],
                                  full["model.blocks.1.ffn.experts.w_out"][2:, h:, :])
    np.testing.assert_array_equal(shards[2]["model.blocks.1.ffn.experts.w_in"],
                                  full["model.blocks.1.ffn.experts.w_in"][2:, :, :h])
    np.testing.assert_array_equal(shards[1]["model.embedding.token_table"], full["model.embedding.token_table"][32:])
    np.testing.assert_array_equal(shards[1]["model.blocks.0.attn.out_proj.weight"],
                                  full["model.blocks.0.attn.out_proj.weight"][d:])
    np.testing.assert_array_equal(shards[1]["model.blocks.0.attn.out_proj.bias"],
                                  full["model.blocks.0.attn.out_proj.bias"])
    full_shapes = {k: v.shape for k, v in full.items()}
    for kwargs in ({}, {"full_shapes": full_shapes}):
        back = gather_full_params(shards, topos, nets[0], replica_atol=0.0, **kwargs)
        assert set(back) == set(full)
        for name in full:
            np.testing.assert_array_equal(back[name], full[name], err_msg=name)
    # any subset holding every (tp, ep) coordinate is enough; specs may be a dict
    order = [3, 0, 2, 1]
    back = gather_full_params([shards[i] for i in order], [topos[i] for i in order], tp_shard_specs(nets[0]))
    for name in full:
        np.testing.assert_array_equal(back[name], full[name], err_msg=name)


def test_reshard_with_the_real_moe_layer_tp2_ep2():
    """locmoe.layer.MoELayer (the default factory) built distributed for each rank of TP2 x EP2."""
    moe_cfg = MoEConfig(num_experts=EXPERTS, vocab_size=VOCAB, expert_parallel=2)
    full = params(build(factory=None, moe_cfg=moe_cfg))
    topos = [topology(r) for r in range(4)]
    nets = [build(t, factory=None, moe_cfg=moe_cfg) for t in topos]
    shards = [shard_full_params(full, net, t) for net, t in zip(nets, topos)]
    assert shards[0]["model.blocks.1.ffn.experts.w_in"].shape == (EXPERTS // 2, HIDDEN, FFN // 2)
    back = gather_full_params(shards, topos, nets[0], full_shapes={k: v.shape for k, v in full.items()})
    for name in full:
        np.testing.assert_array_equal(back[name], full[name], err_msg=name)


def test_reshard_errors():
    full = params(build())
    topo = topology(0)
    net = build(topo)
    with pytest.raises(ValueError, match="parameter names differ"):
        shard_full_params({k: v for k, v in full.items() if "final_ln" not in k}, net, topo)
    bad = dict(full)
    bad["model.blocks.0.ln_attn.gamma"] = np.ones(HIDDEN + 1, np.float32)
    with pytest.raises(ValueError, match="ln_attn.gamma: replicated parameter"):
        shard_full_params(bad, net, topo)
    bad = dict(full)
    bad["model.blocks.0.attn.q_proj.weight"] = np.ones((HIDDEN, 2 * HIDDEN), np.float32)
    with pytest.raises(ValueError, match="q_proj.weight: full shape"):
        shard_full_params(bad, net, topo)
    # a single-process (tp=1) model cannot take a TP topology's shards
    with pytest.raises(ValueError, match="experts|replicated|full shape"):
        shard_full_params(full, build(), topo)
    # the net built for ep=2 holds E/2 experts, a topology claiming ep=1 is inconsistent
    with pytest.raises(ValueError, match="experts.w_in: the parallel model holds 2 experts"):
        shard_full_params(full, net, Topology(world_size=2, tp=2, ep=1, num_experts=EXPERTS, devices_per_node=2))
    with pytest.raises(ValueError, match="2 parameter dicts but 1 topologies"):
        gather_full_params([full, full], [topo], {})


def test_vocab_parallel_token_nll_is_each_tokens_cross_entropy():
    """The per-token form distributed eval uses (one shard holding the whole vocabulary, identity
    collectives) against numpy's log-softmax; the labels outside a shard's range pick nothing."""
    from pangu_sigma.parallel.tp_layers import vocab_parallel_token_nll

    rng = np.random.RandomState(0)
    logits = rng.randn(2, 3, 8).astype(np.float32)  # [B, S, V]
    labels = rng.randint(0, 8, (2, 3)).astype(np.int32)  # [B, S]
    shifted = logits - logits.max(-1, keepdims=True)
    expected = -(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))  # [B, S, V]
    expected = np.take_along_axis(expected, labels[..., None], -1).reshape(-1)  # [B*S]
    same = lambda x: x  # noqa: E731 (a TP group of one)
    got = vocab_parallel_token_nll(ms.Tensor(logits), ms.Tensor(labels), 0, same, same).asnumpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # a shard of ids 8..15 owns none of these labels: its target term is 0 (the AllReduce adds the owner's)
    other = vocab_parallel_token_nll(ms.Tensor(logits), ms.Tensor(labels), 8, same, same).asnumpy()
    np.testing.assert_allclose(other, np.log(np.exp(shifted).sum(-1)).reshape(-1), rtol=1e-5)
