"""Domain-affine placement (locmoe.placement, pangu_sigma.data.placement_order) and the
locality it creates, measured in cluster scope (docs/routing.md)."""
import json
import os

import numpy as np
import pytest

from locmoe.errors import ConfigError
from locmoe.placement import DomainPlacement, domain_quotas, dp_line, plan_placement
from locmoe.topology import Topology
from pangu_sigma.data.dataset import BatchStream
from pangu_sigma.data.placement_order import epoch_batches, read_order


def test_quotas_are_largest_remainder_and_keep_every_domain():
    # 64 * [500, 300, 150, 50] / 1000 = [32, 19.2, 9.6, 3.2] -> [32, 19, 10, 3] by hand
    assert domain_quotas([500, 300, 150, 50], 64).tolist() == [32, 19, 10, 3]
    # a tiny domain keeps one slot, taken from the largest
    assert domain_quotas([990, 10], 8).tolist() == [7, 1]
    assert domain_quotas([5, 0, 5], 4).tolist() == [2, 0, 2]
    with pytest.raises(ConfigError, match="train.batch_size"):
        domain_quotas([1, 1, 1], 2)


def test_line_of_two_domains_over_four_nodes_by_hand():
    # 8 ranks, 2 per node, B = 4: 32 slots; quotas [24, 8]; domain 0 fills nodes 0-2, domain 1 node 3
    topo = Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2)
    p = plan_placement([3000, 1000], topo, 4)
    assert p.quotas.tolist() == [24, 8]
    assert (p.slot_domain[:6] == 0).all() and (p.slot_domain[6:] == 1).all()
    assert p.domain_nodes == ((0, 1, 2), (3,)) and p.home_nodes == ((0, 1, 2), (3,))
    assert np.nonzero(p.domain_experts[0])[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert np.nonzero(p.domain_experts[1])[0].tolist() == [6, 7]


def test_expert_granular_level1_of_the_four_domain_corpus_by_hand():
    # The four-domain corpus (tests' 200 kB build): 8 ranks, 2 per node, B = 8, 8 experts (one per rank).
    # Quotas 64 * sizes / sum = [16.6, 20.4, 20.2, 6.9] -> [17, 20, 20, 7]; the line reads
    # node 0: d0 x16 | node 1: d0 x1, d1 x15 | node 2: d1 x5, d2 x11 | node 3: d2 x9, d3 x7.
    topo = Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2)
    p = plan_placement([1941, 2377, 2363, 808], topo, 8)
    assert p.quotas.tolist() == [17, 20, 20, 7]
    groups = [np.nonzero(row)[0].tolist() for row in p.domain_experts]
    assert groups == [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [4, 5, 6, 7], [6, 7]]
    # every node that reads a domain hosts some of its experts (even node 1's single d0 sample)
    assert p.domain_nodes == ((0, 1), (1, 2), (2, 3), (3,)) and p.home_nodes == ((0, 1), (0, 1, 2), (2, 3), (3,))
    # even split: d0 17/4 = 4.25, d1 20/6 = 3.33, d2 20/4 = 5, d3 7/2 = 3.5 tokens per expert; mean 8
    by_hand = np.array([4.25 + 20 / 6] * 4 + [20 / 6 + 5] * 2 + [5 + 3.5] * 2) / 8
    assert np.allclose(p.expected_expert_load(), by_hand)
    assert by_hand.max() == pytest.approx(1.0625)  # node-granular homes (node 1 for d1's 20) imposed 1.25
    # rank 2 (node 1): d0 x1 with 2 of its 4 experts local, d1 x7 with 2 of 6 -> (1 * 2/4 + 7 * 2/6) / 8
    local_by_hand = [0.5, 0.5, (0.5 + 7 / 3) / 8, 2 / 6, (5 * 2 / 6 + 3 * 2 / 4) / 8, 0.5, 0.5, (1 * 2 / 4 + 7) / 8]
    assert np.allclose(p.expected_local_fraction(topo), local_by_hand)


def _reference_load_and_local(p, topo):
    """Loop-by-loop even split of every slot's token over its domain's experts: (load / mean [E], local [dp])."""
    load = np.zeros(topo.num_experts)
    local = np.zeros(topo.dp)
    for r in range(topo.dp):
        mine = set(topo.local_experts(r * topo.tp))
        for d in p.slot_domain[r]:
            experts = [e for e in range(topo.num_experts) if p.domain_experts[d, e]]
            for e in experts:
                load[e] += 1 / len(experts)
                local[r] += (e in mine) / len(experts) / p.slot_domain.shape[1]
    return load / load.mean(), local


def test_remote_quanta_leave_units_of_at_least_8_rows():
    from locmoe.placement import remote_quanta
    # T / (Q E) >= 8: 4096 / 16 = 256 -> 8; 128 / 8 = 16 -> 2; 127 / 8 < 16 -> 1; 512 / 8 = 64 -> 8 (the cap)
    assert [remote_quanta(t, e) for t, e in ((4096, 16), (128, 8), (127, 8), (512, 8), (256, 8), (8, 4))] == \
        [8, 2, 1, 8, 4, 1]
    # group-wise TP 8: T / (Q E) >= 64 so rounding u up to a multiple of 8 adds < 1/8: 128N / 256N (4096 tokens,
    # 16 experts) 4096 / (4 * 16) = 64 -> 4; 64N (1024 tokens) 1024 / 16 = 64 -> 1, where Q = 8 gave
    # ceil(1024 * 1.25 / 128) = 10 rows rounded to 16
    assert [remote_quanta(t, 16, 8) for t in (4096, 1024, 2048)] == [4, 1, 2]


def test_remote_units_follow_each_ranks_expected_share_by_hand():
    # 2 dp ranks, B = 4: rank 0 reads [0, 1, 1, 1], rank 1 [1, 1, 1, 1]; domain 0 uses experts {0, 1, 2}
    # (k = 3), domain 1 {2, 3} (k = 2); E = 4, quanta 8: units = ceil(32 * share).
    # rank 0: e0 = e1 = 1/4 * 1/3 = 1/12 -> ceil(2.67) = 3; e2 = 1/12 + 3/4 * 1/2 = 11/24 -> ceil(14.67) = 15;
    #         e3 = 3/8 -> 12. rank 1: e2 = e3 = 1/2 -> 16, e0 = e1 = 0 (never routed there).
    from locmoe.placement import DomainPlacement

    placement = DomainPlacement(np.array([[0, 1, 1, 1], [1, 1, 1, 1]]), np.array([1, 7]), ((0,), (0, 1)),
                                ((0,), (0, 1)), np.array([[1, 1, 1, 0], [0, 0, 1, 1]], np.float32))
    np.testing.assert_array_equal(placement.remote_units(8), [[3, 3, 15, 12], [0, 0, 16, 16]])
    np.testing.assert_array_equal(placement.remote_units(1), [[1, 1, 2, 2], [0, 0, 2, 2]])  # ceil(4 * share)


@pytest.mark.parametrize("sizes,world,tp,ep,per_node,batch,experts,uncovered", [
    ([1944, 2384, 2361, 800], 8, 1, 8, 2, 8, 16, []),     # uneven, as many nodes as domains
    ([1941, 2377, 2363, 808], 8, 1, 8, 2, 2, 8, []),      # the four-domain corpus at cpu_tiny's batch
    ([100, 900], 16, 2, 8, 4, 3, 16, []),                 # more nodes than domains, TP 2
    ([7, 5, 3, 9, 1, 4], 4, 1, 4, 2, 5, 8, []),           # fewer nodes than domains
    ([10, 1], 8, 1, 4, 2, 4, 8, []),                      # a tiny domain
    ([5, 3, 2, 1, 1, 8, 4], 16, 1, 16, 4, 2, 32, []),     # many domains, 2 experts per rank
    # locmoe_128n's shape, one expert per node: node 6 reads one sample each of d0 and d1 (1 = half an
    # expert's worth) and hosts one expert; serving d0 there too would load it 1/6 + 1/7 of d0's share more
    ([40, 30, 20, 10], 128, 8, 16, 8, 2, 16, [(0, 6)]),
    ([40, 30, 0, 10], 64, 8, 8, 8, 4, 16, []),            # an empty domain, locmoe_64n's shape
])
def test_placement_invariants(sizes, world, tp, ep, per_node, batch, experts, uncovered):
    topo = Topology(world_size=world, tp=tp, ep=ep, num_experts=experts, devices_per_node=per_node)
    p = plan_placement(sizes, topo, batch)
    dp = topo.dp
    # every global batch holds the quotas, proportional to the sizes within one sample
    counts = np.bincount(p.slot_domain.reshape(-1), minlength=len(sizes))
    assert counts.tolist() == p.quotas.tolist() and counts.sum() == batch * dp
    assert np.abs(counts - np.asarray(sizes) / sum(sizes) * batch * dp).max() <= 1.0
    # ranks of a node read only domains listed as read there
    for r in range(dp):
        node = topo.node(r * tp)
        for d in set(p.slot_domain[r].tolist()):
            assert node in p.domain_nodes[d]
    # every domain has an expert, every expert serves a domain that is read; homes are the experts' nodes
    assert (p.domain_experts.sum(1) >= 1).all()
    assert (p.domain_experts[p.quotas > 0].sum(0) >= 1).all()
    for d, nodes in enumerate(p.home_nodes):
        hosts = {topo.node(r) for r in range(world) for e in topo.experts_of_rank(r) if p.domain_experts[d, e]}
        assert set(nodes) == hosts
    # the imposed load and local fractions match the slot-by-slot reference; the load meets the goal
    load, local = _reference_load_and_local(p, topo)
    assert np.allclose(p.expected_expert_load(), load) and np.allclose(p.expected_local_fraction(topo), local)
    assert load.max() <= 1.1 + 1e-9 and load.min() >= 0.25
    # a node reading at least half an expert's worth of a domain hosts one of its experts, but where the
    # balance target forbids it (listed, checked by hand)
    missing = []
    for d, nodes in enumerate(p.domain_nodes):
        for node in nodes:
            slots = sum((p.slot_domain[r] == d).sum() for r in range(dp) if topo.node(r * tp) == node)
            if 2 * slots * experts >= batch * dp and node not in p.home_nodes[d]:
                missing.append((d, node))
    assert missing == uncovered
    # the line visits the nodes in order
    assert [topo.node(d * tp) for d in dp_line(topo)] == sorted(topo.node(d * tp) for d in range(dp))


def test_read_order_holds_quotas_never_repeats_and_images_the_cluster():
    rng = np.random.default_rng(0)
    domain_ids = rng.choice(4, size=600, p=[0.4, 0.3, 0.2, 0.1])
    topo = Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2)
    p = plan_placement(np.bincount(domain_ids, minlength=4), topo, 4)
    batches = epoch_batches(domain_ids, p, seed=3, epoch=1)  # [K, dp, B]
    assert len(np.unique(batches)) == batches.size  # without replacement within an epoch
    layouts = p.batch_layouts(p.batch_quotas(len(batches)))  # [K, dp, B]
    for k in range(len(batches)):
        assert (domain_ids[batches[k]] == layouts[k]).all()  # each slot holds its batch's domain
    assert not np.array_equal(batches, epoch_batches(domain_ids, p, seed=3, epoch=2))
    # the single-process image reads the ranks' batches side by side (dp order)
    image = read_order(domain_ids, p, range(8), 3, 1).reshape(len(batches), 8 * 4)
    ranks = [read_order(domain_ids, p, [r], 3, 1).reshape(len(batches), 4) for r in range(8)]
    assert np.array_equal(image, np.concatenate(ranks, 1))


def test_batch_stream_resumes_exactly_across_epochs():
    rng = np.random.default_rng(1)
    domain_ids = rng.choice(3, size=200, p=[0.5, 0.3, 0.2]).astype(np.int32)
    input_ids = np.arange(200, dtype=np.int32)[:, None].repeat(3, 1)  # row i holds i
    topo = Topology(world_size=4, tp=1, ep=4, num_experts=4, devices_per_node=2)
    p = plan_placement(np.bincount(domain_ids), topo, 5)

    def order(num_samples, epoch, *_):
        return read_order(domain_ids, p, [2], 9, epoch)

    def read_batches(rows, size):  # in memory instead of the shards
        for first in range(0, len(rows), size):
            chosen = rows[first:first + size]
            yield input_ids[chosen], domain_ids[chosen]

    def stream(start):
        return BatchStream(read_batches, len(input_ids), 5, 4, 2, True, 9, start, True, True, order_fn=order)

    full = stream(0)
    per_epoch = full.per_epoch
    first = [b[0][:, 0].tolist() for _, b in zip(range(per_epoch + 3), full)]
    resumed = [b[0][:, 0].tolist() for _, b in zip(range(4), stream(per_epoch - 1))]
    assert resumed == first[per_epoch - 1:per_epoch + 3]


def test_sample_mix_carries_the_rounding_so_each_domain_reads_its_corpus_share():
    # the held-out corpus's mix at 16 samples per global batch: rounding each batch alike gave the three
    # small domains 1 slot each (6.25%) whatever their size, and the large one 13
    sizes = np.array([85_400, 8_600, 4_100, 1_900])
    topo = Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2)
    p = plan_placement(sizes, topo, 2)
    assert p.quotas.tolist() == [13, 1, 1, 1]  # the rounded mean layout the level-1 mask is chosen from
    quotas = p.epoch_quotas()  # [K, D]
    assert len(quotas) == sizes.sum() // 16 and (quotas.sum(1) == 16).all()
    share = 16 * sizes / sizes.sum()  # exact samples per batch
    drift = np.cumsum(quotas, 0) - np.arange(1, len(quotas) + 1)[:, None] * share[None]  # [K, D]
    assert np.abs(drift).max() < 1  # within one sample of the corpus share after every batch
    # independently: plain bookkeeping of what each domain is owed, batch by batch
    owed = np.zeros(4)
    for q in quotas[:200]:
        owed += share - q
        assert np.all(np.abs(owed) < 1)
    # the epoch's read order holds those counts and every layout is a cut of the same line
    domain_ids = np.repeat(np.arange(4), sizes // 100)  # a 1/100 copy of the corpus
    batches = epoch_batches(domain_ids, plan_placement(sizes // 100, topo, 2), seed=1, epoch=0)  # [K, dp, B]
    read = np.stack([np.bincount(domain_ids[b].ravel(), minlength=4) for b in batches])  # [K, D]
    assert np.abs(np.cumsum(read, 0) - np.arange(1, len(read) + 1)[:, None] * share[None]).max() < 1
    assert len(np.unique(batches)) == batches.size


def test_tier2_units_cover_every_layout_of_the_epoch():
    sizes = np.array([85_400, 8_600, 4_100, 1_900])
    topo = Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2)
    p = plan_placement(sizes, topo, 2)
    units = p.remote_units(2)  # [dp, E]
    mean_only = DomainPlacement(p.slot_domain, p.quotas, p.domain_nodes, p.home_nodes, p.domain_experts)
    assert (units >= mean_only.remote_units(2)).all()
    per_domain = p.domain_experts / p.domain_experts.sum(1, keepdims=True)  # [D, E]
    for layout in p.epoch_layouts():  # every domain a rank reads in some batch has units at its experts
        for r, row in enumerate(layout):
            reached = (np.bincount(row, minlength=4) @ per_domain) > 0  # [E]
            assert (units[r][reached] > 0).all(), (r, row)
    assert len(p.epoch_layouts()) > 1  # boundary ranks do change domain between batches


# ---- point 1 of issue 9: the locality the loss can reach, in cluster scope -------------

@pytest.fixture(scope="module")
def four_domain_data(tmp_path_factory):
    from pangu_sigma.data.four_domain_corpus import build_four_domain_corpus
    from pangu_sigma.data.prepare import prepare

    root = tmp_path_factory.mktemp("four_domains")
    build_four_domain_corpus(str(root / "corpus"), max_bytes=200_000)
    prepare(str(root / "corpus"), str(root / "data"), vocab_size=512, seq_length=16, valid_fraction=0.05,
            progress_every=0)
    return str(root / "data")


def _train_and_measure(data_dir, out_dir, overrides, steps=160, window=20):
    """LocMoE on 4 nodes x 2 devices (8 experts, 1 per rank), cluster scope; routing of the last steps."""
    from conftest import tiny_run_config
    from pangu_sigma.training.train import train

    cfg = tiny_run_config(data_dir, str(out_dir), [
        "parallel.expert_parallel=8", "parallel.virtual_world_size=8", "parallel.virtual_scope=cluster",
        "model.hidden_size=64", "moe.capacity_factor=4.0", "moe.aux_loss_coef=0.03",
        "moe.locality_loss_coef=0.01", f"train.train_steps={steps}", "checkpoint.save_steps=0"] + overrides)
    train(cfg, log=lambda *a: None)
    with open(os.path.join(out_dir, "train_log_rank0.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][-window:]
    load = np.sum([r["expert_load"] for r in rows], 0).sum(0)  # [E] tokens routed, all MoE layers
    local = sum(sum(r["local"]) for r in rows)
    by_rank = np.sum([r["local_by_rank"] for r in rows], 0).sum(0)  # [8]: one token group per rank
    assert by_rank.shape == (8,) and by_rank.sum() == local
    assert all(sum(r["dropped_remote"]) <= sum(r["dropped"]) for r in rows)
    _train_and_measure.by_rank = by_rank / (load.sum() / 8)  # each rank's local fraction
    return local / load.sum(), load / load.mean()


def test_locality_is_learned_on_iid_data_and_beyond_the_placement_with_domain_affine(four_domain_data, tmp_path):
    """Issue 19's controls in cluster scope: LocMoE's learned locality bias against the same run with mu = 0
    (i.i.d. data) and against RRE at the same domain-affine placement and capacities."""
    baseline = 2 / 8  # experts per node / experts: what a router deciding from the token alone gets on i.i.d. data
    iid_local, iid_load = _train_and_measure(four_domain_data, tmp_path / "iid", [])
    iid_by_rank = _train_and_measure.by_rank
    no_mu_local, _ = _train_and_measure(four_domain_data, tmp_path / "iid_mu0", ["moe.locality_loss_coef=0"])
    assert abs(no_mu_local - baseline) <= 0.02, no_mu_local  # the control: no learned term, no locality
    assert iid_local >= 2 * baseline, (iid_local, iid_by_rank)  # the learned bias, on data that carries none
    assert iid_by_rank.min() >= 0.4, iid_by_rank
    print("iid LocMoE local", round(iid_local, 3), "by rank", np.round(iid_by_rank, 3).tolist(), "load / mean",
          np.round(iid_load, 3).tolist())
    # the cluster stays balanced: every expert is local to two ranks, and the per-rank aux loss splits each
    # node's share between its two experts (this 64-wide model after 160 steps: max/mean 1.43, min 0.69;
    # configs/cpu_tiny.yaml's 300-step run, docs/results.md: <= 1.3)
    assert iid_load.min() >= 0.5 and iid_load.max() <= 1.5, iid_load

    affine = ["data.placement=domain_affine", "moe.num_domain_groups=4"]
    local, relative_load = _train_and_measure(four_domain_data, tmp_path / "affine", affine)
    by_rank = _train_and_measure.by_rank
    rre_local, _ = _train_and_measure(four_domain_data, tmp_path / "rre", affine + ["moe.router=rre"])
    from pangu_sigma.build import domain_sizes
    from pangu_sigma.data.dataset import read_meta

    topo = Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2)
    placement = plan_placement(domain_sizes(read_meta(four_domain_data)), topo, 8)
    expected = float(placement.expected_local_fraction(topo).mean())  # level 1's even split over each domain
    print("local: LocMoE iid", round(iid_local, 3), "mu=0", round(no_mu_local, 3), "| affine LocMoE", round(local, 3),
          "RRE", round(rre_local, 3), "placement", round(expected, 3), "| per rank", np.round(by_rank, 3).tolist(),
          "load / mean", np.round(relative_load, 3).tolist())
    assert abs(rre_local - expected) <= 0.05, (rre_local, expected)  # RRE gets what the placement gives
    assert local >= expected + 0.1 and local >= rre_local + 0.1, (local, expected, rre_local)
    assert np.mean(by_rank) == pytest.approx(local)
    assert by_rank.min() >= 0.1, by_rank
    # The placement alone imposes max/mean <= 1.1 (test_expert_granular_level1_of_the_four_domain_corpus_by_hand);
    # the rest is the router's own imbalance against the locality pull.
    assert placement.expected_expert_load().max() <= 1.1
    assert relative_load.min() >= 0.25 and relative_load.max() <= 1.3, relative_load


def test_a_resume_that_changes_the_level1_map_is_refused_or_said():
    from pangu_sigma.training.placement_check import check_placement_map, placement_map

    sizes = [40, 30, 20, 10]
    on_8 = plan_placement(sizes, Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2), 2)
    on_16 = plan_placement(sizes, Topology(world_size=16, tp=1, ep=8, num_experts=8, devices_per_node=2), 1)
    stored = placement_map(on_8)
    assert placement_map(on_16) != stored  # the node count moves domains to other experts
    check_placement_map(stored, on_8, (), print)  # the same map: nothing to say
    check_placement_map(None, on_16, (), print)   # a run without a stored map (or placement): nothing to compare
    with pytest.raises(ConfigError, match=r"data.placement='domain_affine' is invalid: .*domain \d: experts "):
        check_placement_map(stored, on_16, (), print)
    said = []
    check_placement_map(stored, on_16, ("data.placement",), said.append)
    assert len(said) == 1 and "level-1 map changes" in said[0]


@pytest.mark.parametrize("overrides,checked", [
    (["data.placement=domain_affine"], False),  # the placement picks each domain's experts itself
    (["data.placement=iid", "moe.iid_level1=none"], False),  # level 1 allows every expert
    (["data.placement=iid", "moe.iid_level1=node_striped"], True),
    (["data.placement=iid", "moe.iid_level1=blocks"], True),
])
def test_a_short_domain_map_is_an_error_only_where_level1_reads_it(tmp_path, overrides, checked):
    from conftest import tiny_run_config
    from pangu_sigma.build import check_domain_map
    cfg = tiny_run_config(str(tmp_path), str(tmp_path / "run"), ["moe.num_domain_groups=2",
                                                                 "moe.domain_to_group=[0, 1]"] + overrides)
    placement = object() if cfg.data.placement == "domain_affine" else None
    check_domain_map(cfg, 2, placement)  # one group per domain: always fine
    if checked:
        with pytest.raises(ConfigError, match=r"moe.domain_to_group.*\[0, 1\].*4 domains"):
            check_domain_map(cfg, 4, placement)
    else:
        check_domain_map(cfg, 4, placement)
