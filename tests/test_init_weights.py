"""Layout-independent initialisation (issue 10 item 2, docs/parallelism.md): the same seed gives the same
full model for 1 process, TP2 and TP2 x EP2, and the TP shards of a matrix differ.

The parallel models are built for every rank in this process (group creation recorded, never run), each
rank initialises only its slices, and the gathered slices must equal the single-process model. The
training equivalence from the seed runs under msrun in test_parallel_equivalence.py (cases *_seed).
"""
import numpy as np
import pytest

import parallel_cases as pc
from locmoe import comm
from locmoe.parallel_context import ParallelContext
from pangu_sigma.parallel.init_weights import counter_normal, draw_slice, init_std_of, initialise, tensor_key
from pangu_sigma.parallel.reshard import gather_full_params
from pangu_sigma.parallel.tp_layers import tp_shard_specs

SEED = 1234


@pytest.fixture
def no_groups(monkeypatch):
    registry = comm.GroupRegistry()
    monkeypatch.setattr(registry, "_create", lambda name, ranks: None)
    monkeypatch.setattr(comm, "GROUPS", registry)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("init_single")
    full = {}
    for name in ("tp2_seed", "tp2_ep2_seed"):
        ctx = ParallelContext(pc.topology_of(name, 0), "emulated", distributed=False)
        _, net = pc.build(name, ctx, str(out))
        cfg = pc.case_config(name, str(out))
        initialise(net, SEED, cfg.model)
        full[name] = (pc.params_of(net), cfg)
    return full


def test_counter_normal_is_standard_normal_and_keyed():
    z = counter_normal(tensor_key(0, "w"), np.arange(200_000, dtype=np.uint64))
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.003  # two-sided 5% tail of N(0, 1)
    other = counter_normal(tensor_key(1, "w"), np.arange(1000, dtype=np.uint64))
    assert np.corrcoef(z[:1000], other)[0, 1] < 0.1  # another seed is another draw
    # element i depends only on (key, i): a sub-range gives the same numbers
    assert np.array_equal(counter_normal(tensor_key(0, "w"), np.arange(500, 700, dtype=np.uint64)), z[500:700])
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 0.01  # the two normals of one Box-Muller pair


def test_slices_cut_through_element_pairs_equal_the_full_draw():
    """draw_slice draws whole pairs (2p, 2p+1) once when a slice holds them side by side, else element by
    element: both give the full tensor's values bitwise, and those are counter_normal at the full index."""
    std = 0.02
    full = draw_slice(SEED, "w", std, (6, 10), [np.arange(6), np.arange(10)])  # whole pairs
    rows, cols = np.array([1, 4]), np.arange(3, 8)  # columns 3..7: pairs cut at both ends
    np.testing.assert_array_equal(draw_slice(SEED, "w", std, (6, 10), [rows, cols]), full[np.ix_(rows, cols)])
    np.testing.assert_array_equal(draw_slice(SEED, "w", std, (6, 10), [rows, np.arange(4, 8)]),
                                  full[np.ix_(rows, np.arange(4, 8))])  # whole pairs again
    odd = draw_slice(SEED, "v", std, (3, 7), [np.arange(3), np.arange(7)])  # rows start at odd offsets
    flat = np.arange(21).reshape(3, 7)
    np.testing.assert_array_equal(odd, counter_normal(tensor_key(SEED, "v"), flat, std))
    np.testing.assert_array_equal(draw_slice(SEED, "v", std, (3, 7), [np.arange(1, 3), np.arange(2, 6)]),
                                  odd[1:3, 2:6])


def test_std_rules_match_the_model_initialisers(single):
    """init_std_of must agree with each layer's own initializer (what MindSpore drew at build time)."""
    ctx = ParallelContext(pc.topology_of("tp2_ep2_seed", 0), "emulated", distributed=False)
    _, net = pc.build("tp2_ep2_seed", ctx, "unused")
    cfg = single["tp2_ep2_seed"][1]
    for param in net.get_parameters():
        if not param.requires_grad:
            continue
        values = param.asnumpy()
        std = init_std_of(param.name, cfg.model)
        if std is None:
            assert values.min() == values.max(), param.name  # constant init: nothing layout-dependent
        else:
            assert abs(values.std() / std - 1.0) < 0.15, (param.name, values.std(), std)


@pytest.mark.parametrize("name", ["tp2_seed", "tp2_ep2_seed"])
def test_parallel_slices_gather_to_the_single_process_model(single, no_groups, name):
    workers = pc.CASES[name][0]
    reference, cfg = single[name]
    per_rank, topologies = [], []
    for rank in range(workers):
        topology = pc.topology_of(name, rank)
        ctx = ParallelContext(topology, "emulated", distributed=True)
        _, net = pc.build(name, ctx, "unused")
        initialise(net, SEED, cfg.model, topology)
        per_rank.append(pc.params_of(net))
        topologies.append(topology)
        specs = tp_shard_specs(net)
    full = gather_full_params(per_rank, topologies, specs, replica_atol=0.0)
    assert sorted(full) == sorted(reference)
    for key in reference:
        np.testing.assert_array_equal(full[key], reference[key], err_msg=key)
    # the two TP shards of a matrix differ (the bug: every TP rank drew the same values)
    for key in ("model.blocks.0.attn.q_proj.weight", "model.blocks.0.ffn.w_in.weight", "model.embedding.token_table",
                "model.blocks.1.ffn.experts.w_in"):
        assert not np.allclose(per_rank[0][key], per_rank[1][key]), key
