"""Evaluation a multi-domain user can trust: per-domain figures, eval routed as training, seeds.

References are independent of the code under test: hand-worked sums, numpy on the
model's own logits, and the training log of the same batch.
"""
import math
import os

import numpy as np
import pytest

import mindspore as ms

from pangu_sigma.evaluation.domain_stats import DomainAccumulator, token_local
from pangu_sigma.evaluation.eval_forward import eval_batches


def _quiet(*_):
    pass


# ---------------------------------------------------------------- numpy only
def test_domain_sums_by_hand():
    acc = DomainAccumulator(["code", "en"], num_layers=1, num_experts=2)
    nll = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # [B=3, S=2]
    domains = np.array([1, 0, 1])
    expert = np.array([0, 1, 1, 1, 0, 0])  # [B*S]
    keep = np.array([True, False, True, True, True, True])
    local = np.array([True, False, False, False, True, True])
    sums = acc.add(nll, domains, [(expert, keep, local)], rows=np.array([True, True, False]))  # row 2 not counted
    out = acc.result()
    en, code = out["domains"]["en"], out["domains"]["code"]
    assert (en["tokens"], code["tokens"], out["overall"]["tokens"]) == (2, 2, 4)
    assert en["ce"] == 1.5 and code["ce"] == 3.5 and out["overall"]["ce"] == 2.5
    assert en["expert_load"] == [[1, 1]] and en["dropped"] == [1] and en["local"] == [1]
    assert code["expert_load"] == [[0, 2]] and code["dropped"] == [0] and code["local"] == [0]
    assert sums[0].tolist() == [[1, 3]] and sums[1].tolist() == [1] and sums[2].tolist() == [1]
    assert en["layers"][0]["drop_rate"] == 0.5 and code["layers"][0]["max_over_mean"] == 2.0
    # unnamed domain ids get a name, not an error
    acc.add(np.ones((1, 2)), [5])
    assert "domain5" in acc.result()["domains"]


def test_rank_local_percent_divides_by_the_ranks_own_tokens():
    """Rank 0 routed 40 tokens, all node-local; rank 1 routed 20, 5 of them local: 100% and 25% (dividing by
    the mean of 30 tokens printed 133.3% and 16.7%). Same figures from compare_routers' min/max columns."""
    from pangu_sigma.training.callbacks import expert_table
    from pangu_sigma.tools.compare_evaluation import _rank_local_percent

    table = expert_table([[30, 30]], [0], [[40, 5]], rank_tokens=[40, 20])
    assert "local% by rank: layer 0: 100.0 25.0" in table
    valid = {"tokens": 60, "local_by_rank": [[40, 5]], "tokens_by_rank": [40, 20]}
    assert _rank_local_percent(valid, np.max) == pytest.approx(100.0)
    assert _rank_local_percent(valid, np.min) == pytest.approx(25.0)


def test_token_local_uses_each_groups_rank():
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], np.float32)  # [G=2, E=4]
    expert = np.array([0, 2, 0, 2])  # groups of 2 tokens
    assert token_local(expert, mask, 2).tolist() == [True, False, False, True]


def test_eval_batches_cover_every_sample_once_in_trainings_order():
    plan = eval_batches(10, 4, seed=7, shuffle=True)
    order = np.random.default_rng([7, 0]).permutation(10)  # training's epoch 0 (pangu_sigma.data.dataset)
    assert [len(c) for c, _ in plan] == [4, 4, 4]
    counted = np.concatenate([c[m] for c, m in plan])
    assert counted.tolist() == order.tolist()
    assert plan[-1][1].tolist() == [True, True, False, False]
    assert plan[-1][0][2:].tolist() == order[:2].tolist()  # routed filler, not counted
    small = eval_batches(3, 8, seed=0, shuffle=False)  # fewer samples than one batch
    assert len(small) == 1 and small[0][1].sum() == 3 and len(small[0][0]) == 8


# ---------------------------------------------------------------- with the model
@pytest.fixture(scope="module")
def cluster_run(tiny_data, tmp_path_factory):
    """A cluster-scope LocMoE run (4 virtual ranks, 4 token groups): 2 steps, a checkpoint after each."""
    from conftest import tiny_run_config
    from pangu_sigma.training.train import train

    out = tmp_path_factory.mktemp("eval_cluster")
    cfg = tiny_run_config(tiny_data, str(out), ["parallel.virtual_scope=cluster", "train.train_steps=2",
                                                "train.sink_size=1", "checkpoint.save_steps=1",
                                                "moe.capacity_factor=1.0", "logging.log_steps=1"])
    train(cfg, log=_quiet)
    return cfg, str(out)


def test_per_domain_perplexities_combine_into_the_overall_one(cluster_run):
    """numpy on the model's logits, batch by batch in eval's plan (training's order, full batches)."""
    from pangu_sigma.build import dataset_meta
    from pangu_sigma.data.dataset import load_split
    from pangu_sigma.evaluation.eval import build_eval_net, eval_layout, evaluate

    cfg, run_dir = cluster_run
    result = evaluate(cfg, run_dir, log=_quiet)
    meta = dataset_meta(cfg)
    assert result["routing"]["token_groups"] == 4 and result["routing"]["samples_per_batch"] == 32

    ids, domains = load_split(cfg.data.dataset_dir, "valid")
    n, batch = len(ids), 32
    order = np.random.default_rng([cfg.data.seed, 0]).permutation(n)
    order = np.concatenate([order, order[:(-n) % batch]])  # the last batch filled up from the start
    net = build_eval_net(cfg, meta, eval_layout(cfg), cfg.moe.capacity_factor, run_dir)
    net.set_train(False)
    nll_sum = np.zeros(len(meta["domains"]))
    tokens = np.zeros(len(meta["domains"]), np.int64)
    routed = dropped = 0
    group_tokens = np.zeros(4, np.int64)  # counted tokens of each token group (the last batch is partial)
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        counted = np.arange(start, start + batch) < n
        group_tokens += counted.reshape(4, -1).sum(1) * (ids.shape[1] - 1)
        logits, _, _, load, drop, _ = net.model(ms.Tensor(ids[rows, :-1]), ms.Tensor(domains[rows]))
        z = logits.asnumpy().astype(np.float64)  # [B, S, V]
        z -= z.max(-1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll = -np.take_along_axis(log_probs, ids[rows, 1:, None].astype(np.int64), -1)[..., 0]  # [B, S]
        for d in range(len(meta["domains"])):
            mine = counted & (domains[rows] == d)
            nll_sum[d] += nll[mine].sum()
            tokens[d] += mine.sum() * nll.shape[1]
        if counted.all():  # full batches: eval's routing counts are the model's own statistics
            routed += load.asnumpy().sum()
            dropped += drop.asnumpy().sum()
    assert tokens.sum() == n * (ids.shape[1] - 1) == result["tokens"]
    assert result["tokens_by_rank"] == group_tokens.tolist()
    assert (np.asarray(result["local_by_rank"]) <= group_tokens).all()  # a rank's local% never exceeds 100
    for d, name in enumerate(meta["domains"]):
        got = result["domains"][name]
        assert got["tokens"] == tokens[d]
        assert got["perplexity"] == pytest.approx(math.exp(nll_sum[d] / tokens[d]), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll_sum.sum() / tokens.sum()), rel=1e-5)
    # token-weighted geometric mean of the domains' perplexities is the overall one, exactly
    weights = {name: result["domains"][name]["tokens"] / result["tokens"] for name in result["domains"]}
    combined = math.exp(sum(w * math.log(result["domains"][k]["perplexity"]) for k, w in weights.items()))
    assert combined == pytest.approx(result["perplexity"], rel=1e-12)
    full = evaluate(cfg, run_dir, log=_quiet, max_batches=n // batch, per_batch=True)
    assert sum(np.sum(b["load"]) for b in full["batches"]) == routed
    assert sum(np.sum(b["dropped"]) for b in full["batches"]) == dropped


def test_cluster_scope_eval_reproduces_the_training_routing_of_the_same_batch(cluster_run):
    """Step 2 of training routes train batch 1 with the weights saved after step 1; eval of that
    checkpoint on the train split (training's order and layout) must count the same load, drops and
    locality; with a larger moe.eval_capacity_factor the same load and no drops."""
    from pangu_sigma.training import checkpoint
    from pangu_sigma.training.callbacks import read_jsonl
    from pangu_sigma.config import config_from_dict
    from pangu_sigma.evaluation.eval import evaluate

    cfg, run_dir = cluster_run
    step2 = [r for r in read_jsonl(os.path.join(run_dir, "train_log_rank0.jsonl")) if r["step"] == 2][0]
    assert sum(step2["dropped"]) > 0  # capacity factor 1: the test sees drops
    ckpt1 = os.path.join(checkpoint.rank_dir(run_dir), "step_00000001.ckpt")
    lines = []
    ev = evaluate(cfg, ckpt1, split="train", max_batches=2, per_batch=True, log=lines.append)
    batch = ev["batches"][1]
    np.testing.assert_array_equal(batch["load"], step2["expert_load"])
    np.testing.assert_array_equal(batch["dropped"], step2["dropped"])
    np.testing.assert_array_equal(batch["local"], step2["local"])
    assert "cluster scope, 4 token group(s)" in lines[0] and "moe.capacity_factor, as in training" in lines[0]

    wide = config_from_dict(cfg.to_dict(), ["moe.eval_capacity_factor=8"])
    ev8 = evaluate(wide, ckpt1, split="train", max_batches=2, per_batch=True, log=_quiet)
    assert ev8["routing"]["capacity_factor"] == 8 and ev8["routing"]["capacity_factor_source"] == \
        "moe.eval_capacity_factor"
    np.testing.assert_array_equal(ev8["batches"][1]["load"], step2["expert_load"])
    assert sum(ev8["batches"][1]["dropped"]) == 0


def test_eval_capacity_factor_is_validated(tiny_data, tmp_path):
    from conftest import tiny_run_config
    from locmoe.errors import ConfigError

    with pytest.raises(ConfigError, match="moe.eval_capacity_factor"):
        tiny_run_config(tiny_data, str(tmp_path), ["moe.eval_capacity_factor=-1"])


# ---------------------------------------------------------------- compare_routers over seeds (no training)
def test_compare_routers_spread_and_the_cluster_scope_tokens_per_step(tiny_data, tmp_path):
    from conftest import tiny_run_config
    from pangu_sigma.tools import compare_routers as cr

    rank = tiny_run_config(tiny_data, str(tmp_path))
    cluster = tiny_run_config(tiny_data, str(tmp_path), ["parallel.virtual_scope=cluster"])
    assert cr.tokens_per_step(rank) == (8 * 16, 8)
    assert cr.tokens_per_step(cluster) == (4 * 8 * 16, 32)  # the whole virtual cluster's batch, dp = 4

    s = cr.spread([69.8, 88.4, 75.0, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(np.mean([69.8, 88.4, 75.0]))
    assert s["sd"] == pytest.approx(np.std([69.8, 88.4, 75.0], ddof=1)) and (s["min"], s["max"]) == (69.8, 88.4)

    def run(ppl, drop):
        layers = [{"max_over_mean": 1.5, "min_share": 0.1, "drop_rate": drop, "local_fraction": 0.5}]
        return {"tokens_per_s": 1000.0, "simulated": {64: {"routed": {"step_time": 0.01}}},
                "valid": {"perplexity": ppl, "layers": layers,
                          "domains": {"en": {"tokens": 10, "perplexity": ppl + 1, "layers": layers}}}}

    runs = [run(10.0, 0.1), run(14.0, 0.3)]
    cols = cr.columns(["en"], [64])
    summary = cr.summarize(runs, cols)
    assert summary["valid ppl"]["mean"] == 12.0 and summary["ppl en"]["mean"] == 13.0
    assert summary["drop %"]["mean"] == pytest.approx(20.0) and summary["step 64N (ms)"]["mean"] == 10.0
    assert cr._n_label(summary) == "2"
    assert cr._cell("{:.3f}", summary["valid ppl"], "mean") == f"12.000 ± {np.std([10, 14], ddof=1):.3f}"
    assert cr._cell("{:.3f}", summary["valid ppl"], "range") == "10.000-14.000"


@pytest.mark.parametrize("placement", ["iid", "domain_affine"])
def test_eval_routes_trainings_micro_batches_with_accumulation(tiny_data, tmp_path, placement):
    """train.gradient_accumulation_steps=2: step 2 routes train batch 1 as two micro-batches of 4 sequences
    per rank (drops at capacity factor 1); eval of the step-1 checkpoint on the train split routes the same
    micro-batches (its batches 2 and 3), so their load, drops and locality add up to step 2's."""
    from conftest import tiny_run_config
    from pangu_sigma.training import checkpoint
    from pangu_sigma.training.callbacks import read_jsonl
    from pangu_sigma.evaluation.eval import evaluate
    from pangu_sigma.training.train import train

    cfg = tiny_run_config(tiny_data, str(tmp_path), ["parallel.virtual_scope=cluster", "train.train_steps=2",
                                                     "train.sink_size=1", "checkpoint.save_steps=1",
                                                     "moe.capacity_factor=1.0", "train.gradient_accumulation_steps=2",
                                                     f"data.placement={placement}"])
    train(cfg, log=_quiet)
    step2 = [r for r in read_jsonl(os.path.join(str(tmp_path), "train_log_rank0.jsonl")) if r["step"] == 2][0]
    assert sum(step2["dropped"]) > 0
    ckpt1 = os.path.join(checkpoint.rank_dir(str(tmp_path)), "step_00000001.ckpt")
    ev = evaluate(cfg, ckpt1, split="train", max_batches=4, per_batch=True, log=_quiet)
    assert ev["routing"]["samples_per_batch"] == 16 and ev["routing"]["tokens_per_group"] == 4 * 16
    for key in ("load", "dropped", "local"):
        np.testing.assert_array_equal(np.add(ev["batches"][2][key], ev["batches"][3][key]), step2[key if key != "load"
                                                                                                   else "expert_load"])
