"""`python -m pangu_sigma.cluster.plan` and pangu_sigma.cluster.param_count, checked against hand-worked numbers."""
import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from locmoe.errors import ConfigError
from pangu_sigma.cluster import param_count, plan
from pangu_sigma.config import config_from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SCRIPTS = os.path.join(ROOT, "run_scripts")

# The cluster configs' model, written out by hand (PanGu-alpha 13B dimensions).
V, S, D, F, BLOCKS, MOE, E = 40000, 1024, 5120, 20480, 39, 8, 16


def run_plan(capsys, *argv):
    """plan.main in-process; returns (exit code, stdout, stderr)."""
    code = plan.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, *argv):
    code, out, err = run_plan(capsys, *argv, "--json")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1
    return json.loads(out)


def config_path(name):
    return os.path.join(CONFIGS, name)


# ---- independent parameter formula ------------------------------------------------------
def linear(n_in, n_out):
    return n_in * n_out + n_out  # weight + bias


def hand_params(vocab, seq, d, f, blocks, moe, experts, router="locmoe"):
    """Module by module, from pangu_sigma/model and locmoe (not from param_count)."""
    layernorm = 2 * d
    attention = linear(d, d) + linear(d, 2 * d) + linear(d, d)   # q_proj, kv_proj, out_proj
    dense_ffn = linear(d, f) + linear(f, d)
    expert = d * f + f * d                                       # w_in, w_out: no bias
    gate = {"locmoe": experts + 1, "switch": experts * d, "hash": 0, "rre": 0}[router]  # LocMoE: GrAP bias + locality bias
    dense_block = 2 * layernorm + attention + dense_ffn
    sparse_block = 2 * layernorm + attention + experts * expert + gate
    query_block = dense_block + seq * d                          # + top_query_table
    total = vocab * d + seq * d + (blocks - moe) * dense_block + moe * sparse_block + query_block + layernorm
    active = total - moe * (experts - 1) * expert
    return total, active


# ---- the three cluster sizes --------------------------------------------------------------
# (devices, nodes, tp, dp, ep, experts per rank, node-local experts, expert-dp replicas, batch per DP rank,
#  micro-batch): the global batch is Table 1's 32 per DP rank x DP 16 = 512 at every size
CLUSTERS = [
    (64, 8, 8, 8, 8, 2, 2, 1, 64, 1),       # EP capped by DP 8: 2 experts per rank keeps 16
    (128, 16, 8, 16, 16, 1, 1, 1, 32, 4),   # Table 1 as printed
    (256, 32, 8, 32, 16, 1, 1, 2, 16, 4),   # DP 32 / EP 16 = 2 replicas of every expert
]


@pytest.mark.parametrize("devices,nodes,tp,dp,ep,per_rank,local,edp,batch,micro", CLUSTERS)
def test_cluster_plans_match_hand_values(capsys, devices, nodes, tp, dp, ep, per_rank, local, edp, batch, micro):
    p = plan_json(capsys, "--config", config_path(f"locmoe_{devices}n.yaml"), "--world-size", devices)
    assert (p["world_size"], p["nodes"], p["devices_per_node"]) == (devices, nodes, 8)
    assert (p["tp"], p["dp"], p["ep"], p["edp"]) == (tp, dp, ep, edp)
    assert p["num_experts"] == 16 and p["experts_per_rank"] == per_rank
    assert p["local_experts_per_node"] == local
    # node n holds experts [n*per_rank, (n+1)*per_rank) of its EP group; replicas repeat every ep nodes
    for node, experts in enumerate(p["experts_of_node"]):
        first = (node % ep) * per_rank
        assert experts == list(range(first, first + per_rank))
    assert p["global_batch"] == 512 == batch * dp and p["batch_per_dp_rank"] == batch
    assert p["micro_batch_per_dp_rank"] * p["gradient_accumulation_steps"] == batch
    assert p["micro_batch_per_dp_rank"] == micro and p["tokens_per_rank"] == micro * 1024  # routed at once
    total, active = hand_params(V, S, D, F, BLOCKS, MOE, E)
    assert (p["params_total"], p["params_active"]) == (total, active)
    assert p["params_non_trainable"] == 0
    # fp32 weight + fp32 grad per parameter; the 2 fp32 Adam moments split over each replica group
    mem = p["memory_breakdown_gib"]
    assert mem["parameters"] * 2 ** 30 == pytest.approx(4 * p["params_per_device"])
    assert mem["gradients"] == pytest.approx(mem["parameters"])
    assert p["optimizer_shard"] and p["memory_fits"] and p["memory_per_device_gib"] <= 28
    split = ((V * D + (BLOCKS + 1) * (4 * D * D + 3 * D) + (BLOCKS - MOE + 1) * (D * F + F + F * D)) // 8)
    experts = MOE * (16 // ep) * 2 * D * (F // 8)
    replicated = p["params_per_device"] - split - experts
    moments = 8 * (split / dp + replicated / devices + experts / edp)
    assert mem["optimizer"] * 2 ** 30 == pytest.approx(moments, rel=1e-6)
    assert mem["grad_accumulation"] == pytest.approx(mem["gradients"])  # the float32 accumulation buffer
    persistent = (mem["parameters"] + mem["gradients"] + mem["grad_accumulation"] + mem["optimizer"]
                  + mem["hccl_workspace"])
    phases = max(mem["activations"] + mem["a2a_buffers"] + mem["grad_bucket"], mem["zero_gather"])
    assert p["memory_per_device_gib"] == pytest.approx(persistent + phases)
    assert p["activation_parts_gib"] and sum(p["activation_parts_gib"].values()) == pytest.approx(mem["activations"])
    assert set(p["a2a_bytes_per_step"]) == {"intra", "inter"}


def test_a2a_bytes_128n_by_hand(capsys):
    p = plan_json(capsys, "--config", config_path("locmoe_128n.yaml"), "--world-size", 128,
                  "--set", "moe.remote_capacity_factor=0", "--set", "moe.capacity_factor=1.25")  # one tier
    tokens = 4 * 1024                           # micro-batch 4 x seq 1024 per rank (batch 32 in 8 micro-batches)
    capacity = math.ceil(tokens * 1.25 / 16)    # 320
    slice_bytes = 16 * (capacity // 8) * D * 2  # [E, C/TP, d] fp16 = 6,553,600
    passes = 8 * 2 * 8                          # 8 micro-batches x (forward + backward) x 8 MoE layers
    # rank 0's EP group is ranks 0, 8, ..., 120: one per node, so in each of the two All-to-Alls
    # 15 chunks of 1/16 leave the node. Inside node 0 (the TP group), per pass: the AllGather of
    # the received slice to 7 ranks, the ReduceScatter of the [E, C, d] partial outputs (C/8 of
    # it to each of 7 ranks = 7 slices) and the AllGather of the returned slice to 7 ranks.
    inter = passes * 2 * 15 * slice_bytes // 16
    intra = passes * (7 + 7 + 7) * slice_bytes
    assert p["expert_capacity"] == capacity == 320
    assert p["a2a_bytes_per_step"] == {"intra": intra, "inter": inter}
    assert p["a2a_bytes_per_step_world"] == {"intra": 128 * intra, "inter": 128 * inter}



def test_two_tier_bytes_128n_by_hand(capsys):
    """LocMoE's config (micro-batches of 4 sequences of 1024 per rank, 8 per step): the node-local expert
    at C = ceil(4096 * 12 / 16) = 3072, the others at C_r = ceil(4096 * 0.5 / 16) = 128."""
    p = plan_json(capsys, "--config", config_path("locmoe_128n.yaml"), "--world-size", 128,
                  "--set", "moe.capacity_factor=12", "--set", "moe.remote_capacity_factor=0.5")  # no dataset: one
    # unit of C_r per remote expert
    assert (p["expert_capacity"], p["remote_capacity"], p["remote_quanta"]) == (3072, 128, 1)
    block_r = (128 // 8) * D * 2    # one expert's TP slice of the remote tier, fp16
    block_l = (3072 // 8) * D * 2   # the node's one local expert, TP slice
    passes = 8 * 2 * 8              # 8 micro-batches x (forward + backward) x 8 MoE layers
    # tier 2: one [C_r/8, d] block per remote expert out and back; 15 blocks leave the node (the AllToAllV's
    # placeholder to itself stays). Tier 1 is a group of one rank: no bytes.
    inter = passes * 2 * 15 * block_r
    # inside the node (TP 8): tier 2's AllGather of the received slices, ReduceScatter of the partial
    # outputs, AllGather of the returned slices, each to 7 ranks, carrying 15 blocks and the placeholder;
    # tier 1 (the node's one EP member: its All-to-All is the identity) unsliced, so no dispatch AllGather,
    # and one ring AllReduce of the [1, 1, C, d] partial outputs: 2 * 7/8 of its 8 slices (the sliced form
    # sent 3 x 7 slices)
    intra = passes * (7 * 3 * 16 * block_r + 2 * 7 * block_l)
    assert p["a2a_bytes_per_step"] == {"intra": intra, "inter": inter}
    # train.recompute block sends the MoE collectives once (kept out of recomputation) but re-runs the
    # TP AllReduce of every row-parallel linear in a recomputed cell: the attention of 39 blocks + the query
    # layer, the dense FFN of 31 blocks + the query layer, [4096, d] fp16 each, ring of 8: 2 * 7/8 of it
    resent = 8 * (40 + 32) * 2 * 7 * (4096 * D * 2) // 8
    assert p["a2a_detail"]["recompute_resent"] == {"intra": resent, "inter": 0}
    one_tier = plan_json(capsys, "--config", config_path("switch_128n.yaml"), "--world-size", 128)
    assert inter / one_tier["a2a_bytes_per_step"]["inter"] == pytest.approx(64 / 160)


def test_two_tier_bytes_follow_the_placement_units(capsys):
    """With the domain sizes, LocMoE's remote tier sends each (rank, remote expert) pair its units
    (locmoe.placement.DomainPlacement.remote_units, checked by hand in test_placement): rank 0's inter-node
    bytes are its units out (dispatch) plus the units other ranks sent its expert, back (combine)."""
    from locmoe.placement import plan_placement
    from locmoe.topology import Topology

    p = plan_json(capsys, "--config", config_path("locmoe_128n.yaml"), "--world-size", 128,
                  "--domain-sizes", "400,300,200,100")
    # T / E = 4096 / 16 = 256 rows: quanta 4 leaves units of 64 rows at f_r = 1 (>= 8 per TP rank)
    unit = math.ceil(4096 * 0.625 / (16 * 4))  # 40 rows, a multiple of TP 8
    assert (p["remote_capacity"], p["remote_quanta"]) == (unit, 4)
    topology = Topology(world_size=128, tp=8, ep=16, num_experts=16, devices_per_node=8)
    units = plan_placement([400, 300, 200, 100], topology, 32).remote_units(4)  # [dp 16, E 16]; dp d on node d
    out = sum(units[0][e] for e in range(1, 16))  # rank 0 (node 0) holds expert 0
    back = sum(units[d][0] for d in range(1, 16))
    passes = 8 * 2 * 8  # micro-batches x (forward + backward) x MoE layers
    assert p["a2a_bytes_per_step"]["inter"] == passes * (out + back) * (unit // 8) * D * 2
    uniform = plan_json(capsys, "--config", config_path("locmoe_128n.yaml"), "--world-size", 128)
    # a rank reading one domain of k experts, one of them on its node, sends (k - 1)/k of its tokens away
    # instead of 15/16: fewer bytes, by how the domains spread (here 0.85x)
    assert 0 < p["a2a_bytes_per_step_world"]["inter"] < uniform["a2a_bytes_per_step_world"]["inter"]
    assert any("--domain-sizes" in note for note in uniform["notes"])  # bytes without a placement: said so


SMALL = {
    "model": {"vocab_size": 64, "seq_length": 8, "hidden_size": 8, "num_layers": 2, "num_heads": 2,
              "ffn_hidden_size": 16, "moe_layer_num": 1},
    "moe": {"router": "locmoe", "expert_num_per_dp_dim": 1, "capacity_factor": 1.0},
    "parallel": {"op_level_model_parallel_num": 2, "expert_parallel": 4, "devices_per_node": 4},
    "train": {"batch_size": 2, "sink_size": 1, "precision": "float32"},
}


def write_config(tmp_path, raw, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("groupwise", [True, False])
def test_a2a_bytes_small_hand_case(capsys, tmp_path, groupwise):
    # 8 ranks = 2 nodes x 4; TP 2 -> DP 4 = EP 4; 4 experts, 1 per rank.
    # rank 0: TP group [0, 1], EP group [0, 2, 4, 6] (2 on node 0; 4, 6 on node 1).
    # 16 tokens per rank, C = ceil(16 * 1.0 / 4) = 4, buffer [4, 4, 8] fp32 = 512 bytes.
    raw = json.loads(json.dumps(SMALL))
    raw["parallel"]["groupwise_a2a"] = groupwise
    p = plan_json(capsys, "--config", write_config(tmp_path, raw), "--world-size", 8)
    assert (p["nodes"], p["tp"], p["dp"], p["ep"], p["experts_per_rank"]) == (2, 2, 4, 4, 1)
    assert p["experts_of_node"] == [[0, 1], [2, 3]] and p["local_experts_per_node"] == 2
    assert p["expert_capacity"] == 4
    # per pass (forward; backward repeats it), 1 MoE layer:
    if groupwise:
        # slice [4, 2, 8] fp32 = 256 B, two A2As: 64 B each to rank 2 (intra), to 4 and 6 (inter);
        # TP [0, 1]: AllGather of the 256 B slice to rank 1, ReduceScatter of the 512 B partial
        # outputs (256 B to rank 1), AllGather of the 256 B returned slice: all intra.
        per_pass = (2 * 64 + 256 + 256 + 256, 2 * 2 * 64)
    else:
        # the full 512 B buffer, two A2As: 128 B to each of ranks 2 (intra), 4, 6 (inter);
        # TP AllReduce of the 512 B partial outputs inside the node: 2 * (2-1)/2 * 512 = 512 B.
        per_pass = (2 * 128 + 512, 2 * 2 * 128)
    assert p["a2a_bytes_per_step"] == {"intra": 2 * per_pass[0], "inter": 2 * per_pass[1]}
    assert p["a2a_bytes_per_step_world"] == {"intra": 8 * 2 * per_pass[0], "inter": 8 * 2 * per_pass[1]}


# ---- failures --------------------------------------------------------------------------------
def test_expert_parallel_not_dividing_dp_names_the_numbers(capsys):
    code, out, err = run_plan(capsys, "--config", config_path("locmoe_128n.yaml"), "--world-size", 64)
    assert code == 2 and out == ""
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: parallel.expert_parallel=16")
    assert "a divisor of the data-parallel size 8" in line and "world 64" in line and "8" in line


def test_expert_count_not_dividing_hidden_names_the_numbers(capsys):
    code, _, err = run_plan(capsys, "--config", config_path("locmoe_64n.yaml"), "--world-size", 64,
                            "--set", "moe.expert_num_per_dp_dim=3")  # 3 x 8 = 24 experts; 5120 % 24 = 8
    assert code == 2
    assert err.startswith("error: model.hidden_size=5120") and "24" in err and len(err.strip().splitlines()) == 1


def test_tp_not_dividing_world_and_missing_world_size(capsys):
    code, _, err = run_plan(capsys, "--config", config_path("locmoe_128n.yaml"), "--world-size", 100)
    assert code == 2 and "op_level_model_parallel_num=8" in err and "divisor of the world size 100" in err
    code, _, err = run_plan(capsys, "--config", config_path("locmoe_128n.yaml"))
    assert code == 2 and err.startswith("error: --world-size") and "--rank-table" in err


def test_cli_subprocess_one_line_error_and_text():
    bad = subprocess.run([sys.executable, "-m", "pangu_sigma.cluster.plan", "--config", config_path("locmoe_256n.yaml"),
                          "--world-size", "64"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: ")
    ok = subprocess.run([sys.executable, "-m", "pangu_sigma.cluster.plan", "--config", config_path("locmoe_128n.yaml"),
                         "--world-size", "128"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for text in ("128 devices = 16 nodes", "tp 8", "dp 16", "ep 16", "node-local [0]", "inter-node", "params"):
        assert text in ok.stdout


# ---- rank tables ------------------------------------------------------------------------------
def test_rank_table_from_hccl_tools_drives_world_size_and_nodes(capsys, tmp_path):
    pieces = []
    for server in range(4):
        ips = ",".join(f"{d}:192.{d + 1}.{server}.{10 + d}" for d in range(8))
        out = tmp_path / f"server{server}.json"
        subprocess.run([sys.executable, os.path.join(SCRIPTS, "hccl_tools.py"), "--device-range", "[0,8)",
                        "--server-ip", f"10.0.0.{server + 1}", "--device-ips", ips, "--output", str(out)],
                       check=True, capture_output=True)
        pieces.append(str(out))
    merged = tmp_path / "rank_table_32p.json"
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "merge_hccl.py"), str(merged), *pieces],
                   check=True, capture_output=True)
    four_per_node = ("--set", "parallel.expert_parallel=4", "--set", "moe.expert_num_per_dp_dim=4")
    # the 128-device config on a 32-device table: one line naming the field, both counts and the nodes
    code, _, err = run_plan(capsys, "--config", config_path("locmoe_128n.yaml"), "--rank-table", merged, *four_per_node)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: parallel.world_size=128 is invalid: 32, the device count of rank table")
    assert "(4 nodes of 8); this config is for 16 nodes" in err
    # told the world size, the global batch must still be 512: batch_size 32 x dp 4 = 128
    code, _, err = run_plan(capsys, "--config", config_path("locmoe_128n.yaml"), "--rank-table", merged, *four_per_node,
                            "--set", "parallel.world_size=32")
    assert code == 2 and err.startswith("error: train.global_batch_size=512 is invalid: 128 = train.batch_size 32 "
                                        "x dp 4") and "train.batch_size=128" in err
    # 32 devices, TP 8 -> DP 4; EP 4 x 4 experts per rank keeps 16 experts
    p = plan_json(capsys, "--config", config_path("locmoe_128n.yaml"), "--rank-table", merged, *four_per_node,
                  "--set", "parallel.world_size=32", "--set", "train.batch_size=128",
                  "--set", "train.gradient_accumulation_steps=32")
    assert (p["world_size"], p["nodes"], p["devices_per_node"]) == (32, 4, 8)
    assert (p["dp"], p["ep"], p["experts_per_rank"], p["local_experts_per_node"]) == (4, 4, 4, 4)
    assert p["source"].startswith("rank table")
    # capacity_factor 12.5 was sized for 1 node-local expert (0.78 T); with 4 it is 4 x ceil(4096 x 12.5 / 16) = 3.1 T
    note = [n for n in p["notes"] if n.startswith("moe.capacity_factor 12.5")]
    assert note and "4 node-local experts 12800 slots for its 4096 tokens" in note[0] and ": 3.125;" in note[0]
    fitted = plan_json(capsys, "--config", config_path("locmoe_128n.yaml"), "--rank-table", merged, *four_per_node,
                       "--set", "parallel.world_size=32", "--set", "train.batch_size=128",
                       "--set", "train.gradient_accumulation_steps=32", "--set", "moe.capacity_factor=3")
    assert not any(n.startswith("moe.capacity_factor") for n in fitted["notes"])
    code, _, err = run_plan(capsys, "--config", config_path("locmoe_128n.yaml"), "--rank-table", merged,
                            "--world-size", 128)
    assert code == 2 and "--world-size=128" in err and "32" in err


def half_board_table(servers):
    """Servers with 4 NPUs each (one HCCS group), written by hand."""
    return {"version": "1.0", "server_count": str(servers), "status": "completed",
            "server_list": [{"server_id": f"10.0.1.{s + 1}", "host_nic_ip": "reserve",
                             "device": [{"device_id": str(d), "device_ip": f"192.{d + 1}.1.{s + 1}",
                                         "rank_id": str(4 * s + d)} for d in range(4)]}
                            for s in range(servers)]}


def test_hand_written_rank_table_with_4_device_servers(capsys, tmp_path):
    path = tmp_path / "half_boards.json"
    path.write_text(json.dumps(half_board_table(4)))
    # TP 8 cannot fit a 4-NPU server
    code, _, err = run_plan(capsys, "--config", config_path("locmoe_128n.yaml"), "--rank-table", path)
    assert code == 2 and "op_level_model_parallel_num=8" in err and "at most 4 devices per node" in err
    # TP 4: 16 devices, DP 4 = EP 4, 16 experts -> 4 per rank, 4 node-local per server
    p = plan_json(capsys, "--config", config_path("locmoe_128n.yaml"), "--rank-table", path,
                  "--set", "parallel.op_level_model_parallel_num=4", "--set", "parallel.expert_parallel=4",
                  "--set", "moe.expert_num_per_dp_dim=4", "--set", "parallel.world_size=16",
                  "--set", "train.global_batch_size=0")
    assert (p["world_size"], p["nodes"], p["devices_per_node"], p["dp"], p["ep"]) == (16, 4, 4, 4, 4)
    assert p["experts_of_node"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert any("devices per server" in n for n in p["notes"])  # the table (4) overrides the config (8)


# ---- shipped configs ----------------------------------------------------------------------------
SHIPPED = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))


def test_configs_are_shipped():
    names = {os.path.basename(p) for p in SHIPPED}
    for router in ("locmoe", "hash", "switch", "rre"):
        for size in (64, 128, 256):
            assert f"{router}_{size}n.yaml" in names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    if os.path.basename(path).split("_")[-1] in ("64n.yaml", "128n.yaml", "256n.yaml"):
        assert cfg.num_experts == 16 and cfg.model.moe_layer_num == 8 and cfg.model.num_heads == 40
        assert cfg.parallel.op_level_model_parallel_num == 8 and cfg.optim.adam_eps == 1e-6
        assert cfg.parallel.device_target == "Ascend" and cfg.parallel.devices_per_node == 8


def test_table1_values_at_128n():
    raw = yaml.safe_load(open(config_path("locmoe_128n.yaml")))
    # Table 1's batch_size 32 per DP rank (MindFormers) x DP 16 = 512 sequences, PanGu-Sigma's global batch
    assert raw["train"]["batch_size"] == 32 and raw["train"]["sink_size"] == 16
    assert raw["parallel"]["expert_parallel"] == 16 and raw["moe"]["expert_num_per_dp_dim"] == 1


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("router", ["hash", "switch", "rre"])
def test_router_variants_differ_only_in_routing(router, size):
    base = yaml.safe_load(open(config_path(f"locmoe_{size}n.yaml")))
    variant = yaml.safe_load(open(config_path(f"{router}_{size}n.yaml")))
    assert variant["moe"].pop("router") == router and base["moe"].pop("router") == "locmoe"
    assert variant["train"].pop("output_dir") == f"output/{router}_{size}n"
    base["train"].pop("output_dir")
    # LocMoE keeps level 1 with an explicit map and the two-tier exchange, both tiers at the baselines' 1.25
    # headroom over a learned local share pi: 1.25 pi T on the node-local expert(s) and 1.25 (1 - pi) / (1 - pi_0)
    # of the placement's remote shares (pi_0 its own local share with 4 equal domains): 1.25 T rows per rank
    # either way, as the baselines' 16 pairs of 1.25 T / 16 (docs/routing.md)
    assert base["moe"].pop("num_domain_groups") == 4 and base["moe"].pop("domain_to_group") == [0, 1, 2, 3]
    pi, pi_0, local_experts = {64: (0.75, 0.5, 2), 128: (0.625, 0.25, 1), 256: (0.625, 0.25, 1)}[size]
    assert variant["moe"].pop("capacity_factor") == 1.25
    assert base["moe"].pop("capacity_factor") == pytest.approx(1.25 * pi * 16 / local_experts)
    assert base["moe"].pop("remote_capacity_factor") == pytest.approx(1.25 * (1 - pi) / (1 - pi_0))
    assert base["parallel"].pop("comm_overlap_degree") == 2 == variant["parallel"].pop("comm_overlap_degree")
    assert variant["moe"].pop("num_domain_groups") == (4 if router == "rre" else 1)
    assert variant["data"]["placement"] == base["data"]["placement"] == "domain_affine"
    assert variant == base


# ---- param_count ---------------------------------------------------------------------------------
def test_param_count_imports_no_mindspore():
    code = "import sys, pangu_sigma.cluster.param_count; print('mindspore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("router", ["locmoe", "switch", "hash", "rre"])
def test_param_count_formula_by_router(router):
    cfg = load_config(config_path(f"{router}_128n.yaml"))
    counts = param_count.count_params(cfg)
    assert (counts["total"], counts["active"]) == hand_params(V, S, D, F, BLOCKS, MOE, E, router)
    assert counts["non_trainable"] == (MOE * V if router in ("hash", "rre") else 0)


def test_params_per_device_limits():
    cfg = load_config(config_path("locmoe_128n.yaml"))
    counts = param_count.count_params(cfg)
    assert param_count.params_per_device(cfg, 1, 1) == counts["total"]
    assert param_count.params_per_device(cfg, 1, 16) == counts["active"]  # one expert per layer on each rank
    # TP 8 splits every weight matrix: what stays whole is LayerNorms, row-parallel biases, tables, router
    replicated = 2 * S * D + 40 * 5 * D + 32 * D + 2 * D + MOE * (E + 1)  # router: GrAP bias + locality bias
    split = counts["active"] - replicated
    assert param_count.params_per_device(cfg, 8, 16) == split // 8 + replicated


def tiny_config(router, tmp_path):
    return config_from_dict({
        "model": {"vocab_size": 48, "seq_length": 8, "hidden_size": 16, "num_layers": 3, "num_heads": 2,
                  "ffn_hidden_size": 24, "moe_layer_num": 2},
        "moe": {"router": router, "expert_num_per_dp_dim": 4, "num_domain_groups": 2 if router == "rre" else 1},
        "data": {"dataset_dir": str(tmp_path / "no_data")},
        "train": {"batch_size": 2, "sink_size": 1},
    })


@pytest.mark.parametrize("router", ["locmoe", "switch", "hash", "rre"])
def test_param_count_equals_mindspore_model(router, tmp_path):
    from pangu_sigma.build import build_model
    from locmoe.topology import single_process

    cfg = tiny_config(router, tmp_path)
    net = build_model(cfg, {"vocab_size": 48, "seq_length": 8}, single_process(cfg.num_experts), with_loss=False)
    counts = param_count.count_params(cfg)
    assert sum(p.size for p in net.trainable_params()) == counts["total"]
    assert sum(p.size for p in net.untrainable_params()) == counts["non_trainable"]
    assert counts["total"] == hand_params(48, 8, 16, 24, 3, 2, 4, router)[0]


def test_activation_estimate_scales_with_batch_and_tp():
    cfg = load_config(config_path("locmoe_128n.yaml"), ["train.batch_size=32", "train.gradient_accumulation_steps=1"])
    half = load_config(config_path("locmoe_128n.yaml"), ["train.batch_size=16", "train.gradient_accumulation_steps=1"])
    full = param_count.activation_bytes(cfg, 8, 16)
    halved = param_count.activation_bytes(half, 8, 16)
    for part in ("attention", "dense_ffn", "head"):
        assert halved[part] * 2 == pytest.approx(full[part], rel=1e-9)
    # dense FFN of one block, by hand: N*d*(4 + 2 + 1) + 8*N (LayerNorm mean, 1/std) + 2*N*f*2/8 bytes,
    # 31 dense blocks + the query layer
    n = 32 * 1024
    assert full["dense_ffn"] == 32 * (n * D * 7 + 8 * n + 2 * n * F * 2 // 8)
    assert param_count.activation_bytes(cfg, 1, 16)["attention"] > full["attention"]


# ---- recomputation, optimizer sharding, buffers (issue: fit a 910A) ------------------------
CLUSTER_CONFIGS = [(r, n) for r in ("locmoe", "switch", "hash", "rre") for n in (64, 128, 256)]


@pytest.mark.parametrize("router,size", CLUSTER_CONFIGS)
def test_every_cluster_config_fits_a_910a(capsys, router, size):
    p = plan_json(capsys, "--config", config_path(f"{router}_{size}n.yaml"), "--world-size", size)
    assert p["memory_fits"] and p["memory_per_device_gib"] <= 28 - 1, p["memory_breakdown_gib"]  # >= 1 GiB margin
    # HCCL's AlltoAll rule (locmoe.hccl_rules): parallel.a2a_group servers runs the exchange over whole servers
    assert p["hccl"]["alltoall_groups"] >= 1 and p["hccl"]["alltoall_violations"] == [], p["hccl"]
    assert p["memory_margin_gib"] == pytest.approx(28 - p["memory_per_device_gib"])
    mem = p["memory_breakdown_gib"]  # HCCL: every group holds 2 x parallel.hccl_buffsize_mb
    assert mem["hccl_workspace"] * 2 ** 30 == pytest.approx(p["hccl_groups"] * 2 * p["hccl_buffsize_mb"] * 2 ** 20)
    assert set(p["memory_breakdown_gib"]) == {"parameters", "gradients", "optimizer", "activations", "a2a_buffers",
                                              "grad_bucket", "zero_gather", "hccl_workspace", "grad_accumulation"}
    assert p["global_batch"] == p["batch_per_dp_rank"] * p["dp"] == 512  # Table 1: 32 per DP rank x DP 16


FIT_FIGURES = re.compile(
    r"# Fit at (\d+)N \(`plan`\): micro-batch (\d+) \((\d+) accumulation steps\).*?-> ([0-9.]+) GiB.*?"
    r"recompute none / attention / block: ([0-9.]+) / ([0-9.]+) / ([0-9.]+) GiB.*?"
    r"without optimizer sharding ([0-9.]+) GiB; the whole batch of (\d+) at once \(no\n# accumulation\) "
    r"([0-9.]+) GiB", re.S)


def test_memory_figures_in_the_cluster_configs_comments_are_plans():
    """Every GiB figure of each cluster config's 'Fit at' paragraph is what plan computes for that variant
    of the config (stale comments fail here), and plan's text says what its memory model leaves out."""
    from pangu_sigma.cluster.plan import make_plan
    from pangu_sigma.config import load_config

    for router, size in CLUSTER_CONFIGS:
        path = config_path(f"{router}_{size}n.yaml")
        found = FIT_FIGURES.search(open(path, encoding="utf-8").read())
        assert found, f"{path}: no 'Fit at' paragraph"
        nodes, micro, steps, base, none, attention, block, unsharded, batch, whole = found.groups()
        cfg = load_config(path)
        assert (int(nodes), int(micro) * int(steps), int(steps), int(batch)) == \
            (size, cfg.train.batch_size, cfg.train.gradient_accumulation_steps, cfg.train.batch_size), path
        variants = {base: (), none: ("train.recompute=none",), attention: ("train.recompute=attention",),
                    block: ("train.recompute=block",), unsharded: ("parallel.optimizer_shard=false",),
                    whole: ("train.gradient_accumulation_steps=1",)}
        for figure, sets in variants.items():
            gib = make_plan(load_config(path, sets), world_size=size)["memory_per_device_gib"]
            assert f"{gib:.2f}" == figure, (path, sets, gib, figure)


def test_plan_says_what_its_memory_model_leaves_out_and_flags_a_thin_margin(capsys):
    code, out, _ = run_plan(capsys, "--config", config_path("locmoe_64n.yaml"), "--world-size", "64")
    assert code == 0 and "margin" in out and "operator workspaces" in out and "fragmentation" in out
    assert "fp16 copies of the weights outside recomputed blocks" in out
    thin = plan_json(capsys, "--config", config_path("locmoe_64n.yaml"), "--world-size", "64",
                     "--set", "parallel.grad_bucket_mb=256", "--set", "parallel.hccl_buffsize_mb=200")
    assert 0 < thin["memory_margin_gib"] < 1  # 27.71 GiB: fits the budget, but not the margin
    assert any("less than 1 GiB" in note and "parallel.hccl_buffsize_mb" in note for note in thin["notes"])


def test_hccl_buffsize_is_exported_before_init_and_a_conflicting_environment_is_one_line():
    from pangu_sigma.build import export_hccl_buffsize
    from pangu_sigma.config import load_config

    cfg = load_config(config_path("locmoe_64n.yaml"))
    environ = {}
    export_hccl_buffsize(cfg, environ)
    assert environ == {"HCCL_BUFFSIZE": "100"}
    with pytest.raises(ConfigError, match=r"parallel.hccl_buffsize_mb=100 is invalid: the HCCL_BUFFSIZE set"):
        export_hccl_buffsize(cfg, {"HCCL_BUFFSIZE": "200"})
    cpu = {}
    export_hccl_buffsize(load_config(config_path("cpu_tiny.yaml")), cpu)
    assert cpu == {}  # no HCCL on CPU


def test_recompute_levels_by_hand():
    """Block recompute keeps each block's float32 input + the sparse blocks' expert buffers, and then
    the larger of the head and one layer's activations (the head's backward has run before any layer
    is recomputed); attention recompute drops the q/k/v/context and softmax terms."""
    cfg = load_config(config_path("locmoe_128n.yaml"), ["train.batch_size=4", "train.gradient_accumulation_steps=1",
                                                        "moe.remote_capacity_factor=0",
                                                        "moe.capacity_factor=1.25"])  # one tier
    n, p, t, a = 4 * 1024, 2, 8, 40
    cap = math.ceil(n * 1.25 / 16)
    rows = 16 * cap
    attention = n * D * (4 + p + 1) + 8 * n + n * D * 4 * p / t + n * a * S * (4 + p + 1) / t
    dense = n * D * (4 + p + 1) + 8 * n + 2 * n * F * p / t
    sparse = n * D * (8 + 1) + 8 * n + 4 * n * 16 + 2 * rows * D * p + 2 * rows * F * p / t
    head = n * D * 4 + 8 * n + 4 * 4 * n * V / t   # four float32 [N, V/t] in the loss's backward
    block = param_count.activation_bytes_recompute(cfg, t, 16, "block")
    expect = 40 * n * D * 4 + MOE * 2 * rows * D * p + max(head, attention + max(dense, sparse))
    assert sum(block.values()) == pytest.approx(expect, rel=1e-9)
    attn = param_count.activation_bytes_recompute(cfg, t, 16, "attention")
    expect = 40 * (n * D * (8 + 1) + 8 * n) + 32 * dense + MOE * sparse + max(head, attention)
    assert sum(attn.values()) == pytest.approx(expect, rel=1e-9)
    none = sum(param_count.activation_bytes_recompute(cfg, t, 16, "none").values())
    assert sum(block.values()) < sum(attn.values()) < none
    # two tiers (the shipped LocMoE config): one node-local expert per node (TP 8 fills the node)
    # at C = ceil(n * 12 / 16), the 15 others at C_r = ceil(n * 1.25 / 16) (one unit each: the bound a placement's
    # units stay under up to a unit's rounding per pair)
    two = load_config(config_path("locmoe_128n.yaml"), ["train.batch_size=4", "train.gradient_accumulation_steps=1"])
    assert param_count.buffer_rows(two, n, t, 16) == math.ceil(n * 12.5 / 16) + 15 * math.ceil(n * 0.625 / 16)


def test_optimizer_sharding_and_hccl_constants():
    cfg = load_config(config_path("locmoe_256n.yaml"))
    plain = param_count.memory_breakdown(cfg, 8, 16, 32, optimizer_shard=False, comm_groups=5)
    shard = param_count.memory_breakdown(cfg, 8, 16, 32, optimizer_shard=True, comm_groups=5)
    parts = param_count.params_per_device_parts(cfg, 8, 16)
    assert plain["optimizer"] * 2 ** 30 == pytest.approx(8 * sum(parts.values()))
    by_hand = 8 * (parts["tp_split"] / 32 + parts["replicated"] / 256 + parts["experts"] / 2)
    assert shard["optimizer"] * 2 ** 30 == pytest.approx(by_hand)
    assert plain["zero_gather"] == 0 and shard["zero_gather"] > 0
    assert shard["hccl_workspace"] * 2 ** 30 == 5 * 2 * 100 * 2 ** 20  # 2 x HCCL_BUFFSIZE (hccl_buffsize_mb 100)
    cpu = load_config(config_path("cpu_tiny.yaml"))
    assert param_count.memory_breakdown(cpu, 1, 8, 1, 1000)["hccl_workspace"] == 0


def test_plan_text_prints_breakdown_and_global_batch(capsys):
    code, out, _ = run_plan(capsys, "--config", config_path("locmoe_128n.yaml"), "--world-size", 128)
    assert code == 0
    assert "recompute block, optimizer_shard true" in out and "fits" in out
    assert "HCCL workspace" in out and "grad bucket" in out and "all-to-all buffers" in out
    assert "gradient accumulation buffer" in out
    assert ("global batch 512 sequences (524,288 tokens) = 32 per data-parallel rank (train.batch_size) x dp 16; "
            "micro-batch 4 x 8 accumulation steps (train.gradient_accumulation_steps)") in out


def test_accumulation_counts_one_micro_batch_of_activations_plus_the_buffer():
    """batch 32 in 8 micro-batches: the activations and All-to-All buffers of a batch of 4, plus a float32
    accumulation buffer of the device's gradient size; without accumulation no buffer."""
    acc = load_config(config_path("locmoe_128n.yaml"), ["train.batch_size=32", "train.gradient_accumulation_steps=8"])
    four = load_config(config_path("locmoe_128n.yaml"), ["train.batch_size=4", "train.gradient_accumulation_steps=1"])
    a = param_count.memory_breakdown(acc, 8, 16, 16)
    b = param_count.memory_breakdown(four, 8, 16, 16)
    for item in ("activations", "a2a_buffers", "parameters", "gradients", "optimizer"):
        assert a[item] == pytest.approx(b[item], rel=1e-12), item
    assert b["grad_accumulation"] == 0
    assert a["grad_accumulation"] * 2 ** 30 == pytest.approx(4 * param_count.params_per_device(acc, 8, 16))
    assert a["total"] == pytest.approx(b["total"] + a["grad_accumulation"])
