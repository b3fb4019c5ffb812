"""pangu_sigma.tools: capacity bound CLI, delta estimation, simulator (comm + FLOPs by hand), routing
report, routing-stats converter and compare_routers end to end. One tiny trained run is shared."""
import collections
import json
import math
import os
import sys

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from scipy import special  # noqa: E402

import mindspore as ms  # noqa: E402

from locmoe import comm  # noqa: E402
from locmoe.capacity import expert_capacity  # noqa: E402
from locmoe.errors import ConfigError  # noqa: E402
from locmoe.gating import grap_weight  # noqa: E402
from locmoe.topology import Topology  # noqa: E402
from pangu_sigma.config import config_from_dict, load_config  # noqa: E402
from pangu_sigma.tools import capacity_bound, cost_model, routing_stats, simulate  # noqa: E402
from pangu_sigma.tools.cost_model import Hardware, LinkMap  # noqa: E402
from pangu_sigma.tools.routing_capture import (chosen_cosines, estimate_delta, gate_weights,  # noqa: E402
                                               capture_routing, token_consistency)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
STEPS = 6
SIZES = [400, 300, 200, 100]  # samples per domain for the cluster configs' domain-affine placement (no dataset here)


def _quiet(*_):
    pass


def _rc(main, argv):
    """Exit status of a CLI main(), whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def tiny_raw(data_dir, output_dir):
    """4 experts over a virtual cluster of 4 ranks, 2 per node: rank 0's node-local experts are {0, 1}."""
    return {
        "model": {"seq_length": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_hidden_size": 64,
                  "moe_layer_num": 1},
        "moe": {"router": "locmoe", "expert_num_per_dp_dim": 1, "capacity_factor": 1.25},
        "parallel": {"expert_parallel": 4, "devices_per_node": 2, "virtual_world_size": 4},
        "data": {"dataset_dir": data_dir},
        "train": {"batch_size": 8, "sink_size": 1, "train_steps": STEPS, "output_dir": output_dir},
        "optim": {"lr": 0.005, "min_lr": 0.0005, "warmup_steps": 2},
        "checkpoint": {"save_steps": 0, "keep_last": 1},
        "logging": {"log_steps": 100, "expert_stats_steps": 100},
    }


@pytest.fixture(scope="module", autouse=True)
def _restore_mode():
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    """(config path, config, run folder) of a LocMoE model trained STEPS steps; shared by the module."""
    from pangu_sigma.training.train import train

    root = tmp_path_factory.mktemp("tools_run")
    run_dir = str(root / "run")
    path = str(root / "tiny.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(tiny_raw(tiny_data, run_dir), handle)
    cfg = load_config(path)
    train(cfg, log=_quiet)
    return path, cfg, run_dir


# ---------------------------------------------------------------- capacity bound
@pytest.mark.parametrize("d,n,delta", [(128, 8, 0.05), (5120, 16, 0.03), (1024, 64, 0.1)])
def test_capacity_cli_agrees_with_betainc(capsys, d, n, delta):
    assert capacity_bound.main(["--hidden-size", str(d), "--experts", str(n), "--delta", str(delta),
                                "--json"]) == 0
    given = json.loads(capsys.readouterr().out)["given"]
    p_ref = 1.0 - special.betainc(0.5, (d - 1) / 2.0, delta * delta)  # eq. 8
    np.testing.assert_allclose(given["p_delta"], p_ref, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(given["ec_min"], 1.0 / (n * p_ref), rtol=1e-9)  # Theorem 1
    erfc = special.erfc(math.sqrt(delta * delta * d / (2 - delta * delta)))  # eq. 9
    np.testing.assert_allclose(given["p_delta_erfc"], erfc, rtol=1e-12)
    np.testing.assert_allclose(given["ec_min_erfc"], 1.0 / (n * erfc), rtol=1e-12)
    np.testing.assert_allclose(given["ec_min_exp"], math.exp(delta * delta * d / (2 - delta * delta)) / n,
                               rtol=1e-12)
    assert capacity_bound.main(["--hidden-size", str(d), "--experts", str(n), "--delta", str(delta)]) == 0
    text = capsys.readouterr().out
    assert f"{given['ec_min']:.6g}" in text and f"{given['p_delta']:.6g}" in text


@pytest.mark.parametrize("argv", [
    ["--hidden-size", "128", "--experts", "8"],                        # neither --delta nor --checkpoint
    ["--hidden-size", "128", "--experts", "8", "--delta", "1.5"],      # not a cosine
    ["--hidden-size", "1", "--experts", "8", "--delta", "0.1"],
    ["--experts", "8", "--delta", "0.1"],                              # d unknown
    ["--hidden-size", "128", "--experts", "8", "--delta", "x"],
    ["--checkpoint", "nowhere", "--hidden-size", "8", "--experts", "2"],  # checkpoint without --config
])
def test_capacity_cli_bad_args_are_one_line(capsys, argv):
    assert _rc(capacity_bound.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_capacity_cli_estimates_delta_from_a_checkpoint(tiny_run, capsys):
    path, cfg, run_dir = tiny_run
    assert capacity_bound.main(["--checkpoint", run_dir, "--config", path, "--json", "--max-tokens", "512"]) == 0
    result = json.loads(capsys.readouterr().out)
    (layer,) = result["measured"]["layers"]
    est = layer["estimate"]
    assert est["tokens"] == 512 and result["measured"]["quantile"] == 0.01
    assert est["minimum"] <= est["delta"] <= est["median"] <= est["maximum"]
    if 0 < est["delta"] < 1:
        np.testing.assert_allclose(layer["bound"]["ec_min"],
                                   1 / (4 * (1 - special.betainc(0.5, 31 / 2, est["delta"] ** 2))), rtol=1e-9)
    assert result["config_capacity"]["expert_capacity"] == expert_capacity(8 * 16, 1.25, 4) == 40
    # table routers have no gate to measure against: one line, exit 2
    assert capacity_bound.main(["--checkpoint", run_dir, "--config", path, "--set", "moe.router=hash"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: moe.router='hash'") and err.count("\n") == 1


# ---------------------------------------------------------------- delta on known angles
def test_delta_estimation_on_tokens_with_known_cosines():
    d, n = 64, 4
    weight = grap_weight(n, d)  # [4, 64], row i = 1/16 on block i
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)  # [4, 64]
    # a direction orthogonal to every GrAP row: +-1 alternating inside each block (block sums are 0)
    ortho = np.tile([1.0, -1.0], d // 2) / math.sqrt(d)
    assert np.allclose(weight @ ortho, 0.0)
    cosines = np.linspace(0.02, 0.9, 101)  # the known angles
    rng = np.random.RandomState(0)
    chosen = rng.randint(0, n, size=cosines.size)
    scale = rng.uniform(0.5, 5.0, size=(cosines.size, 1))  # norms must not matter
    tokens = scale * (cosines[:, None] * unit[chosen] + np.sqrt(1 - cosines[:, None] ** 2) * ortho)  # [101, 64]

    # the GrAP gate (eq. 4, no bias) routes each token to the expert it was built for
    assert (np.argmax(tokens @ weight.T, 1) == chosen).all()
    np.testing.assert_allclose(chosen_cosines(tokens, weight, chosen), cosines, atol=1e-12)
    est = estimate_delta(tokens, weight, chosen, quantile=0.01)
    np.testing.assert_allclose(est.delta, cosines[1], atol=1e-12)  # 1st percentile of 101 = the 2nd smallest
    np.testing.assert_allclose(est.mean, cosines.mean(), atol=1e-12)
    np.testing.assert_allclose(est.median, 0.46, atol=1e-12)
    assert est.minimum == pytest.approx(0.02) and est.tokens == 101 and est.nonpositive_fraction == 0
    assert estimate_delta(tokens, weight, chosen, quantile=0.0).delta == pytest.approx(0.02)
    with pytest.raises(ConfigError):
        estimate_delta(tokens, weight, chosen, quantile=1.0)
    with pytest.raises(ConfigError, match="no gate weight"):
        gate_weights(None, "hash", n, d)


# ---------------------------------------------------------------- simulator: communication by hand
HW = Hardware(hccs_gbytes=30.0, hccs_links=3, hccs_latency_us=5.0, pcie_gbytes=32.0, pcie_latency_us=10.0,
              roce_gbits=100.0, roce_latency_us=10.0)


def test_token_consistency_by_hand_and_against_a_counter():
    # by hand: id 5 goes to experts 1, 1, 2 (modal 1: 2 of 3), id 7 to 0, 3 (1 of 2), id 9 once (left out)
    assert token_consistency([5, 5, 5, 7, 7, 9], [1, 1, 2, 0, 3, 2]) == {"modal_share": 0.6, "ids": 2,
                                                                          "occurrences": 5}
    assert token_consistency([3, 4], [0, 1])["modal_share"] is None  # no id repeats
    # per group: id 5 goes to expert 1 on node 0 and to expert 2 on node 1, always
    assert token_consistency([5, 5, 5, 5], [1, 1, 2, 2])["modal_share"] == 0.5
    assert token_consistency([5, 5, 5, 5], [1, 1, 2, 2], groups=[0, 0, 1, 1]) == {"modal_share": 1.0, "ids": 2,
                                                                                   "occurrences": 4}
    with pytest.raises(ValueError, match="one group per token"):
        token_consistency([5, 5], [1, 1], groups=[0])
    assert token_consistency([2, 2, 6, 6, 6], [4, 4, 0, 0, 0])["modal_share"] == 1.0  # a token-id table
    rng = np.random.RandomState(3)
    ids, experts = rng.randint(0, 40, 500), rng.randint(0, 8, 500)
    by_id = collections.defaultdict(collections.Counter)
    for t, e in zip(ids, experts):
        by_id[t][e] += 1
    repeated = [c for c in by_id.values() if sum(c.values()) >= 2]
    modal = sum(max(c.values()) for c in repeated) / sum(sum(c.values()) for c in repeated)
    got = token_consistency(ids, experts)
    assert got["ids"] == len(repeated) and got["modal_share"] == pytest.approx(modal, abs=1e-12)
    with pytest.raises(ValueError, match="one expert per token"):
        token_consistency([1, 2], [0])


def test_all_to_all_time_and_bytes_by_hand():
    topo = Topology(world_size=16, tp=1, ep=16, num_experts=16, devices_per_node=8)  # 2 nodes x 8
    links = LinkMap(topo, HW)
    group = list(range(16))
    nbytes = 16 * 3_000_000  # each rank's [E, C, d] input; 3 MB to each peer
    per_peer = nbytes / 16
    # rank r: 3 peers in its HCCS group of 4, 4 across PCIe in its node, 8 on the other node (RoCE)
    hccs = 5e-6 * 1 + per_peer / 30e9                   # 3 peers on 3 dedicated links, in parallel
    pcie = 10e-6 * 4 + 4 * per_peer / 32e9              # 4 peers through one PCIe port
    roce = 10e-6 * 8 + 8 * per_peer / (100e9 / 8)       # 8 peers through one 100 Gb/s port
    time, tiers = cost_model.p2p_collective_time(links, cost_model.uniform_traffic("all_to_all", group, nbytes))
    assert time == pytest.approx(max(hccs, pcie, roce), rel=1e-12)
    assert time == pytest.approx(roce)  # 80 us + 1.92 ms
    # bytes agree with locmoe.comm's accounting (intra = HCCS + PCIe, inter = RoCE)
    intra, inter = comm.world_collective_bytes("all_to_all", [group], topo, nbytes)
    assert tiers["hccs"] + tiers["pcie"] == intra and tiers["roce"] == inter
    assert tiers["hccs"] == 16 * 3 * per_peer
    # chunked (overlap degree 2): the latency is paid twice, the bandwidth term once
    time2, _ = cost_model.p2p_collective_time(links, cost_model.uniform_traffic("all_to_all", group, nbytes), 2)
    assert time2 - time == pytest.approx(10e-6 * 8, rel=1e-9)


def test_allreduce_ring_time_by_hand():
    topo = Topology(world_size=16, tp=1, ep=16, num_experts=16, devices_per_node=8)
    links = LinkMap(topo, HW)
    nbytes = 8_000_000
    time, sent = cost_model.ring_allreduce_time(links, [0, 1, 2, 3], nbytes)  # one HCCS mesh
    assert sent == 2 * 3 / 4 * nbytes == sum(comm.collective_bytes("all_reduce", [0, 1, 2, 3], topo, nbytes, 0))
    assert time == pytest.approx(2 * 3 * 5e-6 + 2 * 3 / 4 * nbytes / 30e9)
    time, _ = cost_model.ring_allreduce_time(links, [0, 8], nbytes)  # across nodes: RoCE paces the ring
    assert time == pytest.approx(2 * 10e-6 + nbytes / 12.5e9)
    assert comm.collective_bytes("all_reduce", [0, 8], topo, nbytes, 0) == (0, nbytes)


def _sim_config(overrides=(), **model):
    raw = {"model": dict({"vocab_size": 10, "seq_length": 2, "hidden_size": 4, "num_layers": 1, "num_heads": 1,
                          "ffn_hidden_size": 8, "moe_layer_num": 0}, **model),
           "moe": {"router": "locmoe", "expert_num_per_dp_dim": 1, "capacity_factor": 1.25},
           "parallel": {"device_target": "Ascend", "expert_parallel": 1, "devices_per_node": 8,
                        "comm_overlap_degree": 1},
           "train": {"batch_size": 1}}
    return config_from_dict(raw, list(overrides))


def test_compute_time_of_a_hand_counted_model():
    """d 4, f 8, S 2, 1 sequence (N 2 tokens), V 10, one dense block + the query layer, TP 1.

    per attention sublayer: q 2*4*4 + kv 2*4*8 + out 2*4*4 = 128 MACs; QK^T 2*2*4 + PV 2*2*4 = 32 MACs
        -> 320 FLOPs, two sublayers 640
    per dense FFN: 2*4*8 + 2*8*4 = 128 MACs -> 256 FLOPs, two FFNs 512
    LM head: 2*4*10 = 80 MACs -> 160 FLOPs
    forward 1312 FLOPs, forward + backward 3 * 1312 = 3936
    """
    cfg = _sim_config()
    hw = Hardware(peak_tflops=1e-9, efficiency=1.0)  # 1000 FLOP/s
    topo = Topology(world_size=1, tp=1, ep=1, num_experts=1, devices_per_node=1)
    out = simulate.simulate_step(cfg, topo, hw, 10)
    c = out["compute"]
    assert c["attention"] == pytest.approx(3 * 640 / 1000)
    assert c["dense_ffn"] == pytest.approx(3 * 512 / 1000)
    assert c["head"] == pytest.approx(3 * 160 / 1000)
    assert c["router"] == 0 and c["experts_mean"] == 0
    assert out["step_time"] == pytest.approx(3.936)  # one device: no communication at all
    assert out["breakdown"]["computation"] == pytest.approx(3.936)
    assert out["breakdown"]["communication"] == out["breakdown"]["idle"] == 0


def test_moe_step_by_hand_two_nodes():
    """16 devices (2 nodes x 8), TP 1, EP 16, 16 experts; the block is sparse. d 16, f 32, S 4, batch 64
    (N 256 tokens per device), uniform routing: 16 tokens per expert from every device."""
    cfg = _sim_config(hidden_size=16, ffn_hidden_size=32, seq_length=4, moe_layer_num=1, num_heads=2,
                      overrides=["parallel.expert_parallel=16", "train.batch_size=64"])
    topo = Topology(world_size=16, tp=1, ep=16, num_experts=16, devices_per_node=8)
    hw = Hardware(peak_tflops=1e-3, efficiency=1.0, act_bytes=2)  # 1e9 FLOP/s
    out = simulate.simulate_step(cfg, topo, hw, 10, dispatch="routed")  # the All-to-AllV what-if
    # A2A: 16 rows of 16 fp16 values = 512 bytes to each peer; the RoCE side (8 peers) is the slowest
    per_peer = 16 * 16 * 2
    a2a = max(5e-6 + per_peer / 30e9, 4 * 10e-6 + 4 * per_peer / 32e9, 8 * 10e-6 + 8 * per_peer / 12.5e9)
    assert out["communication"]["moe_all_to_all"] == pytest.approx(4 * a2a)  # dispatch + combine, fwd + bwd
    assert out["communication"]["tp_allreduce"] == 0 and out["communication"]["moe_tp_collectives"] == 0
    # experts: every device receives 16 tokens from each of 16 sources for its one expert = 256 rows
    assert out["compute"]["experts_mean"] == pytest.approx(3 * 256 * 4 * 16 * 32 / 1e9)
    assert out["compute"]["router"] == pytest.approx(3 * 256 * 16 / 1e9)  # GrAP: N d
    assert out["breakdown"]["idle"] == pytest.approx(0, abs=1e-12) and out["breakdown"]["overlapped"] == 0
    total = sum(out["compute"][k] for k in ("attention", "dense_ffn", "head", "router", "experts_mean"))
    assert out["step_time"] == pytest.approx(total + sum(out["communication"].values()))
    assert out["a2a_node_local_fraction"] == pytest.approx(8 / 16)  # self + 7 node peers of 16 destinations

    # imbalance: every device sends all its tokens to expert 0 (capacity 20 keeps 20 of 256)
    counts = np.zeros((1, 16, 16))
    counts[0, :, 0] = 256
    skew = simulate.simulate_step(cfg, topo, hw, 10, counts=counts, dispatch="routed")
    assert skew["layers"][0]["drop_rate"] == pytest.approx(1 - 20 / 256)
    assert skew["layers"][0]["expert_rows_max"] == 16 * 20 and skew["layers"][0]["expert_rows_mean"] == 20
    assert skew["breakdown"]["idle"] == pytest.approx(3 * (320 - 20) * 4 * 16 * 32 / 1e9)
    padded = simulate.simulate_step(cfg, topo, hw, 10, counts=counts, dispatch="padded")
    assert padded["layers"][0]["expert_rows_max"] == 16 * 20 and padded["breakdown"]["idle"] == pytest.approx(0)
    # two tiers (the default, padded): the 8 experts of the other node get C_r = ceil(256 * 0.5 / 16) = 8
    # rows per source instead of 20; the 7 same-node peers get C = 20 (tier 1) and nothing of tier 2
    tiered_cfg = _sim_config(hidden_size=16, ffn_hidden_size=32, seq_length=4, moe_layer_num=1, num_heads=2,
                             overrides=["parallel.expert_parallel=16", "train.batch_size=64",
                                        "moe.remote_capacity_factor=0.5"])
    one = simulate.simulate_step(cfg, topo, hw, 10)
    two = simulate.simulate_step(tiered_cfg, topo, hw, 10)
    row = 16 * 2 * 4  # bytes per row x 4 All-to-Alls per step
    assert one["a2a_bytes_per_step_world"]["roce"] == 16 * 8 * 20 * row
    assert two["a2a_bytes_per_step_world"]["roce"] == 16 * 8 * 8 * row
    assert two["layers"][0]["remote_capacity"] == 8 and two["layers"][0]["drop_rate_remote"] == pytest.approx(
        8 * (16 - 8) / 256)  # uniform routing: 16 tokens per remote expert, 8 kept
    intra = two["a2a_bytes_per_step_world"]["hccs"] + two["a2a_bytes_per_step_world"]["pcie"]
    assert intra == 16 * 7 * 20 * row


def test_overlap_hides_all_but_one_chunk():
    cfg = load_config(os.path.join(CONFIGS, "locmoe_128n.yaml"))
    one = simulate.run(cfg, world_size=128, overlap_degree=1, domain_sizes=SIZES)
    four = simulate.run(cfg, world_size=128, overlap_degree=4, domain_sizes=SIZES)
    assert one["breakdown"]["overlapped"] == 0
    layer = four["layers"][0]
    a, x = layer["comm_time"], layer["expert_compute_mean"]  # the overlap of an average device
    assert four["micro_batches"] == 8  # the config's batch of 32 per rank in micro-batches of 4
    assert four["breakdown"]["overlapped"] == pytest.approx(8 * 8 * 0.75 * (min(a, x) + min(a, 2 * x)))
    for res in (one, four):
        assert sum(res["breakdown"].values()) == pytest.approx(res["step_time"])
    # two tiers: 4 chunks of C_l = 3200 and u = 40 rows (multiples of TP 8: at most 40 / 8 = 5 chunks)
    assert (layer["capacity"], layer["remote_capacity"], layer["chunks"]) == (3200, 40, 4)
    assert simulate.run(cfg, world_size=128, overlap_degree=6, domain_sizes=SIZES)["layers"][0]["chunks"] == 5
    # one EP member per node: tier 1 (the rank's own expert, C_l = 3200 rows) skips the dispatch AllGather over
    # TP, which then carries only the tier-2 rows; the ReduceScatter still sums every row's partial outputs
    # (PCIe-paced: 4 peers of the other HCCS half through one 32 GB/s port, as in the All-to-All by hand above)
    parts = one["layers"][0]["comm"]
    local_slice = (3200 // 8) * 5120 * 2  # the own expert's [C_l / TP, d] fp16 rows, to each TP peer
    assert parts["tp_reducescatter_experts"] - parts["tp_allgather_dispatch"] == pytest.approx(4 * local_slice / 32e9)


def test_simulate_cli(capsys):
    path = os.path.join(CONFIGS, "locmoe_64n.yaml")
    assert _rc(simulate.main, ["--config", path, "--world-size", "64", "--json"]) == 2  # no dataset: which domains?
    assert capsys.readouterr().err.startswith("error: --domain-sizes")
    assert simulate.main(["--config", path, "--world-size", "64", "--json", "--domain-sizes", "400,300,200,100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world_size"] == 64 and out["nodes"] == 8 and out["routing"] == "uniform"
    assert sum(out["breakdown"].values()) == pytest.approx(out["step_time"])
    assert _rc(simulate.main, ["--config", path]) == 2  # the device count is not in the config
    err = capsys.readouterr().err
    assert err.startswith("error: --world-size") and err.count("\n") == 1
    assert _rc(simulate.main, ["--config", path, "--world-size", "64", "--efficiency", "2"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- routing statistics
def test_resample_and_relative_placement():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    np.testing.assert_allclose(routing_stats.resample(p, 8), np.repeat(p / 2, 2))
    np.testing.assert_allclose(routing_stats.resample(p, 2), [0.75, 0.25])
    # measured: experts {0, 1} local, lambda = 0.75 -> odds (0.75/2)/(0.25/2) = 3 per local expert
    row = routing_stats.relative_row(p, [1, 1, 0, 0], [4], 16)
    np.testing.assert_allclose(row.sum(), 1.0)
    np.testing.assert_allclose(row[4], 3 / (3 + 15))  # one local expert of 16 on the target


def test_converter_from_the_training_log(tiny_run, tmp_path):
    path, cfg, run_dir = tiny_run
    out = str(tmp_path / "stats.json")
    target = os.path.join(CONFIGS, "locmoe_128n.yaml")
    assert routing_stats.main(["--train-log", os.path.join(run_dir, "train_log_rank0.jsonl"), "--train-config",
                               path, "--config", target, "--world-size", "128", "--output", out]) == 0
    stats = routing_stats.load_stats(out)
    counts = stats["counts"]
    assert counts.shape == (8, 128, 16) and stats["source"]["placement"] == "same"  # auto: no extrapolated locality
    np.testing.assert_allclose(counts.sum(-1), 32 * 1024)  # the 128N config's tokens per rank and step: 32 x 1024
    res = simulate.run(load_config(target), world_size=128, routing_stats=out, domain_sizes=SIZES)
    assert res["routing"] == out and res["step_time"] > 0


# ---------------------------------------------------------------- routing capture and report
@pytest.mark.parametrize("scope", ["rank", "cluster"])
def test_capture_matches_the_layers_own_statistics(tiny_run, scope):
    """The captured routing of one batch equals the statistics the model's forward reports for the batch eval
    routes first; in cluster scope every token group routes as its rank, with its own node's experts local
    (groups 0-1 on experts {0, 1}, groups 2-3 on {2, 3}), not as rank 0."""
    import dataclasses
    from pangu_sigma.build import dataset_meta
    from pangu_sigma.data.dataset import load_split
    from pangu_sigma.evaluation.eval import eval_layout, routing_plan
    from pangu_sigma.tools.routing_capture import load_trained_model
    path, cfg, run_dir = tiny_run
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, virtual_scope=scope))
    groups = 4 if scope == "cluster" else 1
    model, _ = load_trained_model(cfg, run_dir)
    cap = capture_routing(cfg, None, max_tokens=8 * 16 * groups, model=model)  # exactly the first batch
    (layer,) = cap.layers
    assert layer.tokens.shape == (128 * groups, 32) and cap.capacity == 40 and cap.tokens_per_group == 128
    near = [[True, True, False, False]] * 2 + [[False, False, True, True]] * 2
    assert cap.group_masks.tolist() == near[:groups] and cap.scope == scope
    ids, domains = load_split(cfg.data.dataset_dir, "valid")
    (rows, _), *_ = routing_plan(cfg, dataset_meta(cfg), eval_layout(cfg), domains)[0]
    assert len(rows) == 8 * groups and (cap.token_ids == ids[rows, :-1].reshape(-1)).all()
    _, _, _, load, dropped, local = model(ms.Tensor(ids[rows, :-1]), ms.Tensor(domains[rows]))
    np.testing.assert_array_equal(np.bincount(layer.expert_index, minlength=4), load.asnumpy()[0])
    assert (~layer.keep).sum() == dropped.asnumpy()[0, :2].sum()
    by_group = np.bincount(cap.token_group, weights=cap.token_local(layer), minlength=groups)  # [G]
    np.testing.assert_array_equal(by_group, local.asnumpy()[0])  # the layer's node-local tokens of each group
    np.testing.assert_array_equal(cap.token_node(), cap.token_group // 2)  # 2 groups per node
    # the LayerNorm output is what the GrAP gate scores: its argmax (+ bias, ReLU) is the chosen expert
    bias = model.blocks[1].ffn.router.gate.bias.asnumpy()
    scores = np.maximum(layer.tokens @ grap_weight(4, 32).T + bias, 0)
    assert (np.argmax(scores, 1) == layer.expert_index).mean() > 0.99


def test_routing_report_writes_every_plot(tiny_run, tmp_path):
    pytest.importorskip("matplotlib", reason="the routing report needs matplotlib (the 'plots' extra)")
    from pangu_sigma.tools.routing_report import main
    path, cfg, run_dir = tiny_run
    out = tmp_path / "report"
    assert _rc(main, ["--config", path, "--checkpoint", run_dir, "--output", str(out), "--max-tokens", "512"]) == 0
    block = cfg.model.num_layers - 1
    expected = [f"fig8_pair_cosines_layer{block}.png", f"fig9_gate_cosines_layer{block}.png",
                "fig12_expert_load.png", "drop_locality.png"]
    for name in expected:
        with open(out / name, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", name
    report = (out / "report.md").read_text()
    for name in expected:
        assert f"]({name})" in report
    assert "| block |" in report and "delta (q=0.01)" in report and "## Per domain on the valid split" in report
    figures = json.loads((out / "report.json").read_text())
    for column in ("token id's modal expert %", "same, per node %"):  # the modal expert: >= 1/E of an id's
        assert 100 / cfg.num_experts <= float(figures["captured_layers"][0][column]) <= 100  # occurrences
    assert set(figures["eval"]["domains"]) and figures["eval"]["tokens"] == sum(
        d["tokens"] for d in figures["eval"]["domains"].values())


def test_routing_report_without_matplotlib_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    from pangu_sigma.tools.routing_report import main
    path, _, run_dir = tiny_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert _rc(main, ["--config", path, "--checkpoint", run_dir, "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "matplotlib" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- compare_routers end to end
@pytest.mark.slow
def test_compare_routers_two_routers_five_steps(tiny_run, tmp_path, capsys):
    from pangu_sigma.tools.compare_routers import main
    path, _, _ = tiny_run
    out = tmp_path / "cmp"
    assert _rc(main, ["--config", path, "--routers", "locmoe,hash", "--steps", "5", "--output", str(out),
                      "--cluster-config-dir", CONFIGS, "--quiet", "--seeds", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["results"]) == ["hash", "locmoe"] and report["meta"]["routers"] == ["locmoe", "hash"]
    assert report["meta"]["tokens_per_step"] == 8 * 16
    for router, r in report["results"].items():
        assert r["seeds"] == [1234, 1235] and len(r["runs"]) == 2
        ppl = [run["valid"]["perplexity"] for run in r["runs"]]
        s = r["summary"]["valid ppl"]
        assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(ppl))
        assert s["sd"] == pytest.approx(np.std(ppl, ddof=1))
        for domain in report["meta"]["domains"]:
            assert r["summary"][f"ppl {domain}"]["n"] == 2 and r["domains"][domain]["tokens"]["n"] == 2
        for run in r["runs"]:
            assert math.isfinite(run["valid"]["perplexity"]) and run["tokens_per_s"] > 0
            (layer,) = run["valid"]["layers"]
            assert layer["max_over_mean"] >= 1 and 0 <= layer["min_share"] <= 0.25
            assert 0 <= layer["drop_rate"] < 1 and 0 <= layer["local_fraction"] <= 1
            for size in ("64", "128", "256"):
                sim = run["simulated"][size]
                assert sim["routed"]["step_time"] > 0 and sim["uniform"]["step_time"] > 0, sim
                assert sim["config"].endswith(f"{router}_{size}n.yaml")
            assert os.path.isfile(os.path.join(run["run_dir"], "train_log_rank0.jsonl"))
            assert run["moe_inter_node_bytes_per_step"] >= 0 and len(run["valid"]["dropped_remote"]) == 1
            assert len(run["valid"]["local_by_rank"]) == 1 and min(run["valid"]["local_by_rank"][0]) >= 0
    md = (out / "report.md").read_text()
    assert "| locmoe | 2 |" in md and "| hash | 2 |" in md and "step 256N (ms)" in md and " ± " in md
    # a second run into the same folder is refused in one line unless --overwrite
    capsys.readouterr()  # the runs' notices (e.g. eval's "[checkpoint] read ... step 5") are not part of it
    assert _rc(main, ["--config", path, "--routers", "locmoe", "--steps", "5", "--output", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_simulated_step_with_accumulation_is_k_micro_batches_and_one_gradient_reduction():
    """batch 32 per rank in 8 micro-batches = 8 x the step of a batch of 4 routed at once, except the
    gradient AllReduces, which happen once per step."""
    path = os.path.join(CONFIGS, "locmoe_128n.yaml")
    iid = "data.placement=iid"  # a domain-affine placement cuts the line by the step's batch (32 vs 4)
    acc = simulate.run(load_config(path, ["train.batch_size=32", "train.gradient_accumulation_steps=8", iid]),
                       world_size=128)
    one = simulate.run(load_config(path, ["train.batch_size=4", "train.gradient_accumulation_steps=1", iid]),
                       world_size=128)
    grads = ("grad_allreduce_dense", "grad_allreduce_experts")
    for name in grads:
        assert acc["communication"][name] == pytest.approx(one["communication"][name])
    once = sum(one["communication"][n] for n in grads)
    assert acc["step_time"] - once == pytest.approx(8 * (one["step_time"] - once), rel=1e-12)
    assert acc["tokens_per_rank"] == one["tokens_per_rank"] == 4 * 1024 and acc["micro_batches"] == 8
    assert acc["a2a_bytes_per_step_world"]["roce"] == pytest.approx(8 * one["a2a_bytes_per_step_world"]["roce"])


def test_simulated_inter_node_bytes_per_rank_are_the_layers_with_non_uniform_routing():
    """2 nodes x 2 devices, TP 1, EP 4, 4 experts, d 16, S 4, batch 16 (N 64 tokens per rank), two tiers:
    C = ceil(64 * 1.25 / 4) = 20 rows per node-local expert, C_r = ceil(64 * 0.5 / 4) = 8 per remote one."""
    from locmoe.comm import CommCounter
    from locmoe.exchange import register_tiered_exchange_bytes

    cfg = _sim_config(hidden_size=16, ffn_hidden_size=32, seq_length=4, moe_layer_num=1, num_heads=2,
                      overrides=["parallel.expert_parallel=4", "parallel.devices_per_node=2", "train.batch_size=16",
                                 "moe.remote_capacity_factor=0.5"])
    topo = Topology(world_size=4, tp=1, ep=4, num_experts=4, devices_per_node=2)
    hw = Hardware(peak_tflops=1e-3, efficiency=1.0, act_bytes=2)
    # per-rank routing, not one distribution scaled: rank 0 mostly local, rank 1 mostly to expert 2 (remote),
    # ranks 2 and 3 (node 1) split unevenly
    counts = np.array([[[40, 16, 4, 4], [4, 4, 40, 16], [8, 8, 24, 24], [16, 0, 0, 48]]], np.float64)
    out = simulate.simulate_step(cfg, topo, hw, 10, counts=counts)
    layer = out["layers"][0]
    assert (layer["capacity"], layer["remote_capacity"]) == (20, 8)
    # the layer's byte model (both tiers, dispatch + combine, forward + backward) for each rank
    ranks = [Topology(world_size=4, tp=1, ep=4, num_experts=4, devices_per_node=2, rank=r) for r in range(4)]
    by_layer = [register_tiered_exchange_bytes(CommCounter(t), t, 4, 20, 8, 16, "float16", False).totals()["inter"]
                for t in ranks]
    # by hand: 2 remote experts x C_r 8 rows x 16 values x 2 bytes, 4 All-to-Alls per step
    assert by_layer == [4 * 2 * 8 * 16 * 2] * 4
    assert [4 * b for b in layer["a2a_inter_node_bytes_by_device"]] == by_layer
    assert out["a2a_bytes_per_step_world"]["roce"] == sum(by_layer)
    # the routing sets the drops per tier: remote pairs keep 8, local pairs 20
    over_remote = [0, (40 - 8) + (16 - 8), 0, 16 - 8]  # per rank: tokens above C_r on its remote experts
    over_local = [40 - 20, 0, (24 - 20) + (24 - 20), 48 - 20]
    assert layer["drop_rate_remote"] == pytest.approx(sum(over_remote) / 256)
    assert layer["drop_rate"] == pytest.approx((sum(over_remote) + sum(over_local)) / 256)


def test_simulated_bytes_follow_the_placement_units_as_the_layer_sends_them():
    """4 nodes x 1 device, EP 4, 4 experts, two domains read by ranks {0, 1} and {2, 3}, level-1 experts {0, 1}
    and {2, 3} (locmoe.placement): rank 0's only remote pair is expert 1. T / E = 16 rows: quanta 2 (units of
    >= 8 rows at f_r = 1), 2 * 4 * 1/2 = 4 units of u = ceil(64 * 0.5 / 8) = 4 rows; experts 2 and 3 get
    nothing from it."""
    from locmoe.comm import CommCounter
    from locmoe.exchange import register_tiered_exchange_bytes
    from locmoe.placement import plan_placement
    from locmoe.tiers import unit_table

    cfg = _sim_config(hidden_size=16, ffn_hidden_size=32, seq_length=4, moe_layer_num=1, num_heads=2,
                      overrides=["parallel.expert_parallel=4", "parallel.devices_per_node=1", "train.batch_size=16",
                                 "moe.remote_capacity_factor=0.5", "moe.num_domain_groups=2",
                                 "data.placement=domain_affine"])
    topo = Topology(world_size=4, tp=1, ep=4, num_experts=4, devices_per_node=1)
    placement = plan_placement([10, 10], topo, 16)
    assert placement.domain_experts.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    hw = Hardware(peak_tflops=1e-3, efficiency=1.0, act_bytes=2)
    counts = np.array([[[40, 24, 0, 0], [10, 54, 0, 0], [0, 0, 60, 4], [0, 0, 16, 48]]], np.float64)
    out = simulate.simulate_step(cfg, topo, hw, 10, counts=counts, placement=placement)
    layer = out["layers"][0]
    assert (layer["remote_capacity"], layer["remote_quanta"]) == (4, 2)
    table = unit_table(topo, placement.remote_units(2))
    by_layer = [register_tiered_exchange_bytes(CommCounter(t), t, 4, 20, 4, 16, "float16", False,
                                               units=table).totals()["inter"]
                for t in (Topology(world_size=4, tp=1, ep=4, num_experts=4, devices_per_node=1, rank=r)
                          for r in range(4))]
    assert by_layer == [4 * 4 * 4 * 16 * 2] * 4  # 4 units of 4 rows out and back, forward and backward
    assert [4 * b for b in layer["a2a_inter_node_bytes_by_device"]] == by_layer
    # drops: remote pairs keep 16 (rank 0: 24 -> 8 over; rank 1's remote is expert 0: 10, none over; rank 2's
    # expert 3 gets 4; rank 3's expert 2 gets 16)
    assert layer["drop_rate_remote"] == pytest.approx(8 / 256)


def test_cluster_counts_map_each_measured_rank_onto_the_target_by_node():
    # measured: 4 ranks on 2 nodes, 4 experts (1 per rank); each rank its own pattern
    measured = Topology(world_size=4, tp=1, ep=4, num_experts=4, devices_per_node=2)
    rows = np.array([[6, 2, 1, 1], [3, 3, 2, 2], [1, 1, 4, 4], [0, 2, 2, 6]], np.float64)
    load = rows[None]  # [1 layer, 4 ranks, 4 experts]
    # the same cluster: every rank gets its own measured row back (no extrapolation from one rank)
    same, source = routing_stats.cluster_counts(load, measured, measured, 10, 1)
    assert source == {0: 0, 1: 1, 2: 2, 3: 3}
    np.testing.assert_allclose(same[0], 10 * rows / rows.sum(1, keepdims=True))
    # twice the nodes and experts: node 2 takes node 0's ranks, experts relabelled by node (by hand for rank 4:
    # measured rank 0 puts 0.8 on its 2 local experts, odds (0.8/2)/(0.2/2) = 4 -> 2*4/(2*4 + 6) = 8/14 on
    # experts 4, 5 (profile 3:1), and 6/14 evenly over the remote experts 6, 7, 0, 1, 2, 3)
    target = Topology(world_size=8, tp=1, ep=8, num_experts=8, devices_per_node=2)
    big, source = routing_stats.cluster_counts(load, measured, target, 14, 1)
    assert [source[r] for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    np.testing.assert_allclose(big[0, 4], [1, 1, 1, 1, 6, 2, 1, 1])
    np.testing.assert_allclose(big[0].sum(1), 14)
    with pytest.raises(ConfigError, match="load_by_rank"):
        routing_stats.cluster_counts(load[:, :3], measured, target, 14, 1)


@pytest.mark.slow
def test_compare_routers_equal_drops_end_to_end(tiny_run, tmp_path, capsys):
    """--equal-drops: the pilot's drops predicted from its routed counts are the drops eval measured
    (first come, first served, on the real layer); so are the check run's at its own capacities; the
    seeded run uses the capacities of the last round and sends the bytes the calibration predicted."""
    from pangu_sigma.tools.compare_routers import main
    path, _, _ = tiny_run
    out = tmp_path / "eq"
    assert _rc(main, ["--config", path, "--routers", "locmoe", "--steps", "4", "--output", str(out),
                      "--clusters", "", "--equal-drops", "20", "--pilot-remote-capacity-factor", "2",
                      "--check-rounds", "1",
                      "--set", "moe.capacity_factor=4", "--set", "moe.remote_capacity_factor=0.5",
                      "--set", "parallel.virtual_scope=cluster", "--set", "moe.num_domain_groups=2",
                      "--set", "parallel.devices_per_node=1",  # 4 nodes: a domain's experts span two
                      "--set", "data.placement=domain_affine"]) == 0
    report = json.loads((out / "report.json").read_text())
    r = report["results"]["locmoe"]
    c = r["calibration"]
    (run,) = r["runs"]
    tokens = 8 * 16
    assert c["remote_quanta"] == 4  # level 1 under the placement: tier-2 units of 1/4 of a 1/E share's slots
    assert c["pilot_remote_capacity"] == expert_capacity(tokens, 2.0, 4 * 4)
    assert c["pilot_predicted_drop_percent"] == pytest.approx(c["pilot_drop_percent"], abs=1e-9)
    assert c["predicted_drop_percent"] <= 20 and c["remote_capacity"] >= 1
    assert run["valid"]["routing"]["remote_capacity"] == c["remote_capacity"]
    counts = np.load(os.path.join(c["pilot_run_dir"], "valid_pair_counts.npy"))  # [M, N, G, E]
    assert counts.shape[0] == 1 and counts.shape[2:] == (4, 4) and counts.sum() == run["valid"]["tokens"]
    assert expert_capacity(tokens, c["remote_capacity_factor"], 4 * 4) == c["remote_capacity"]
    assert run["moe_inter_node_bytes_per_step"] == c["predicted_inter_node_bytes_per_step"]
    assert report["meta"]["equal_drops_percent"] == 20 and "## Equal drops" in (out / "report.md").read_text()
    rounds = c["check_rounds"]  # round 0 at the pilot's calibration; its drops measured on the real layer
    assert 1 <= len(rounds) <= 2 and [r["run_dirs"][0].endswith(f) for r, f in
                                      zip(rounds, ("seed1234", "round1/seed1234"))] == [True] * len(rounds)
    for r in rounds:
        assert r["predicted_drop_percent"] == pytest.approx(r["measured_drop_percent"], abs=1e-9)
    kept = (rounds[0]["next_local_capacity"], rounds[0]["next_remote_capacity"]) == (
        rounds[0]["local_capacity"], rounds[0]["remote_capacity"])
    assert len(rounds) == (1 if kept else 2) and run["run_dir"] == rounds[-1]["run_dirs"][0]
    assert (run["valid"]["routing"]["capacity"], run["valid"]["routing"]["remote_capacity"]) == (
        rounds[-1]["local_capacity"], rounds[-1]["remote_capacity"]) == (c["local_capacity"], c["remote_capacity"])
    assert "### Check rounds" in (out / "report.md").read_text()
    routed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[eval] routed as training")]
    assert len(routed) == 1 + len(rounds)  # pilot, each round's seed: eval names both tiers' capacities
    assert f"{c['remote_capacity']}-slot units per (group, expert) pair" in routed[-1]
    # --reuse: the finished runs are evaluated again, not trained: same figures, logs untouched
    logs = [os.path.join(d, "train_log_rank0.jsonl") for d in [c["pilot_run_dir"]] + [r["run_dirs"][0] for r in rounds]]
    stamps = [os.path.getmtime(p) for p in logs]
    assert _rc(main, ["--config", path, "--routers", "locmoe", "--steps", "4", "--output", str(out), "--quiet",
                      "--clusters", "", "--equal-drops", "20", "--pilot-remote-capacity-factor", "2",
                      "--check-rounds", "1",
                      "--set", "moe.capacity_factor=4", "--set", "moe.remote_capacity_factor=0.5",
                      "--set", "parallel.virtual_scope=cluster", "--set", "moe.num_domain_groups=2",
                      "--set", "parallel.devices_per_node=1", "--set", "data.placement=domain_affine",
                      "--reuse"]) == 0
    again = json.loads((out / "report.json").read_text())["results"]["locmoe"]
    assert [os.path.getmtime(p) for p in logs] == stamps
    assert again["calibration"]["remote_capacity"] == c["remote_capacity"]
    assert again["runs"][0]["valid"]["perplexity"] == run["valid"]["perplexity"]
    assert "reusing the finished training" in capsys.readouterr().out


def test_reuse_takes_only_a_run_trained_with_the_same_config(tiny_run):
    """compare_routers --reuse: a finished run folder stands for its config only; another capacity (a
    calibration that changed since) or another router is a different run, a new output folder name is not."""
    import dataclasses
    from pangu_sigma.tools.compare_runs import finished_training, stored_config_differences
    _, cfg, run_dir = tiny_run
    steps = cfg.train.train_steps
    assert finished_training(run_dir, steps, cfg) is not None and stored_config_differences(run_dir, cfg) == []
    moved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=run_dir + "_elsewhere"))
    assert finished_training(run_dir, steps, moved) is not None
    wider = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, remote_capacity_factor=0.75))
    assert stored_config_differences(run_dir, wider) == ["moe.remote_capacity_factor"]
    assert finished_training(run_dir, steps, wider) is None
    assert finished_training(run_dir, steps, dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, router="switch"))) is None
    assert finished_training(run_dir, steps + 1, cfg) is None


def test_a2a_sensitivity_finds_the_scale_of_a_share():
    from pangu_sigma.tools.a2a_sensitivity import parse_targets, scale_for_share
    # a stand-in step: fixed 90 ms of compute and an All-to-All of 10 ms / s at bandwidth scale s
    def simulate_at(s):
        a2a = 0.010 / s
        return {"a2a_fraction": a2a / (0.090 + a2a)}
    # share 50 %: 10 / s = 90 -> s = 1/9; share 10 %: s = 1 (the links' own share)
    assert scale_for_share(50.0, simulate_at) == pytest.approx(1 / 9, rel=1e-6)
    with pytest.raises(ConfigError):
        scale_for_share(5.0, simulate_at)  # below the links' 10 %: no slower All-to-All gets there
    assert parse_targets("128:18.10,256:28.74") == {128: 18.1, 256: 28.74}
    for bad in ("128", "128:x", "0:5", "128:100", ""):
        with pytest.raises(ConfigError):
            parse_targets(bad)
