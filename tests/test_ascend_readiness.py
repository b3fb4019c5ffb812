"""Issue 10 (Ascend 910A readiness): CPU tests of each Ascend-side fix (+ issue 22 item 2: the AlltoAll rule).

Items: 1 overflow detection, 4 gradient buckets, 5 HCCL group rules, 6 logical DEVICE_ID,
7 data sinking, 8 group names, 9 fp32 embedding gather, 13 Ascend on a CPU build.
(2: test_init_weights.py + test_parallel_equivalence.py seed cases; 3, 10, 11: test_launch_scripts.py,
test_msrun_script.py.)
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import ops, Tensor
from mindspore.ops.operations.math_ops import NPUClearFloatStatusV2, NPUGetFloatStatusV2

from locmoe import comm
from locmoe.errors import ConfigError
from locmoe.hccl_rules import MAX_GROUP_NAME_BYTES, alltoall_problem, check_server_devices, check_topology
from locmoe.parallel_context import ParallelContext
from locmoe.topology import Topology
from pangu_sigma.config import config_from_dict
from pangu_sigma.parallel.grad_reduce import GradReducer, bucket_buffer_bytes, plan_buckets
from pangu_sigma.training import overflow, train as train_module

META = {"vocab_size": 64, "seq_length": 8}
TINY = {"model": {"seq_length": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64,
                  "moe_layer_num": 1},
        "moe": {"expert_num_per_dp_dim": 2}, "train": {"batch_size": 2, "sink_size": 2, "train_steps": 2}}


def tiny_cfg(**parallel):
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["parallel"] = parallel
    return config_from_dict(raw)


@pytest.fixture
def no_groups(monkeypatch):
    registry = comm.GroupRegistry()
    registry.calls = []
    monkeypatch.setattr(registry, "_create", lambda name, ranks: registry.calls.append((name, ranks)))
    monkeypatch.setattr(comm, "GROUPS", registry)
    return registry


# ---- item 1: overflow detection ---------------------------------------------------------------
@pytest.mark.parametrize("target, features, env, mode", [
    ("CPU", set(), {}, "isfinite"),
    ("Ascend", {overflow.FEATURE_910A}, {}, "npu_float_status"),             # 910A: saturation mode
    ("Ascend", {overflow.FEATURE_910B}, {}, "isfinite"),                     # 910B default: INFNAN mode
    ("Ascend", {overflow.FEATURE_910B}, {"MS_ASCEND_CHECK_OVERFLOW_MODE": "SATURATION_MODE"}, "npu_float_status"),
])
def test_overflow_mode_follows_mindspore_loss_scale_cell(target, features, env, mode):
    assert overflow.overflow_check_mode(target, lambda f: f in features, env) == mode


def test_910a_train_step_reads_the_npu_float_status_and_reduces_it_over_the_world(monkeypatch, no_groups):
    """Built, not run: on 910A the step clears/reads the NPU overflow register and AllReduces the flag."""
    monkeypatch.setattr(overflow, "_soc_supports", lambda f: f == overflow.FEATURE_910A)
    cfg = tiny_cfg(device_target="Ascend", devices_per_node=2)
    topology = Topology(world_size=2, num_experts=2, devices_per_node=2, rank=0)
    step, _ = train_module.build_train_step(cfg, META, ParallelContext(topology, "native", distributed=True))
    check = step.overflow_check
    assert check.mode == "npu_float_status" and step.use_loss_scale  # fp16 on Ascend
    assert isinstance(check.get_status, NPUGetFloatStatusV2) and isinstance(check.clear_status, NPUClearFloatStatusV2)
    assert isinstance(check.world_reduce.op, ops.AllReduce)
    assert check.world_reduce.group_ranks == [0, 1]  # the flag of any device stops every device's update


def test_cpu_train_step_keeps_isfinite():
    cfg = tiny_cfg()
    topology = Topology(world_size=1, num_experts=2, devices_per_node=1)
    step, _ = train_module.build_train_step(cfg, META, ParallelContext(topology, "emulated", distributed=False))
    assert step.overflow_check.mode == "isfinite" and not hasattr(step.overflow_check, "get_status")
    check = overflow.OverflowCheck("isfinite")
    assert bool(check.finite(Tensor(1.0), Tensor(1.0))) and not bool(check.finite(Tensor(np.inf), Tensor(1.0)))


# ---- item 4: size-capped gradient buckets ------------------------------------------------------
def test_plan_buckets_by_hand():
    # sizes 3,3,3,10,1 with a cap of 6: [3+3], [3] (3+10 > 6), [10] alone (bigger than the cap), [1]
    assert plan_buckets([3, 3, 3, 10, 1], 6) == [[0, 1], [2], [3], [4]]
    assert plan_buckets([2, 2, 2], 100) == [[0, 1, 2]]
    assert bucket_buffer_bytes([3, 3, 3, 10, 1], 6) == 2 * 6  # the packed [3+3]; [10] is reduced unpacked


def test_bucketed_reduction_returns_every_gradient_in_place():
    """World of one (AllReduce = identity): packing and unpacking over many small buckets is exact."""
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (2, 2, 2), (7, 3), (1,), (64,)]
    params = [ms.Parameter(Tensor(np.zeros(s, np.float32)), name=f"p{i}") for i, s in enumerate(shapes)]
    reducer = GradReducer(params, Topology(world_size=1, num_experts=1, devices_per_node=1), "emulated",
                          bucket_mb=100 / 2 ** 20)  # 100-byte buckets
    # bytes 48, 20, 32, 84, 4, 256 -> [48+20+32], [84+4], [256] (alone, bigger than a bucket)
    assert [b for _, b in reducer.buckets] == [[0, 1, 2], [3, 4], [5]]
    grads = tuple(Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    out = reducer(grads)
    for g, o in zip(grads, out):
        np.testing.assert_array_equal(o.asnumpy(), g.asnumpy())


def test_grad_bucket_mb_is_validated():
    with pytest.raises(ConfigError, match="parallel.grad_bucket_mb"):
        tiny_cfg(grad_bucket_mb=0)


# ---- items 5 and 8: HCCL group rules, short group names -------------------------------------------
@pytest.mark.parametrize("devices, message", [
    ({"s0": [0, 1, 2]}, "1, 2, 4 or 8"),
    ({"s0": [0, 1, 2, 3, 4, 5]}, "1, 2, 4 or 8"),
    ({"s0": [2, 3, 4, 5]}, "HCCS half"),
    ({"s0": [3, 4]}, "HCCS half"),
    ({"s0": [0, 1], "s1": [0, 1, 2, 3]}, "same device count"),
])
def test_hccl_rule_violations_are_one_line(devices, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_server_devices("tp group [0, 1]", devices)
    assert "\n" not in str(err.value) and "tp group" in str(err.value)


def test_hccl_rules_accept_the_documented_examples():
    # CANN create_group examples for 3 servers of 8: [1,9,17], [1,2,9,10,17,18], [4..7, 12..15, 20..23]
    for per_server in ([1], [1, 2], [4, 5, 6, 7], list(range(8))):
        check_server_devices("g", {s: per_server for s in range(3)})


def test_topology_rejects_groups_that_break_the_rules():
    topo = Topology(world_size=4, tp=4, num_experts=2, devices_per_node=4)
    check_topology(topo)  # TP 4 on devices 0-3
    with pytest.raises(ConfigError, match="world group.*HCCS half"):
        topo.check_hccl(device_of_rank=(2, 3, 4, 5))  # a 4-device job on devices 2-5
    with pytest.raises(ConfigError, match="tp group .*HCCS half"):  # a rank table with ranks 0-3 on devices 2-5
        Topology(world_size=8, tp=4, num_experts=2, devices_per_node=8).check_hccl((2, 3, 4, 5, 0, 1, 6, 7))
    with pytest.raises(ConfigError, match="dp group .*HCCS half"):  # TP 4 x DP 2 in one server: DP {0, 4}
        Topology(world_size=8, tp=4, num_experts=2, devices_per_node=8).check_hccl()
    with pytest.raises(ConfigError, match="world group"):
        Topology(world_size=6, tp=2, num_experts=2, devices_per_node=6).check_hccl()


@pytest.mark.parametrize("per_server, why", [
    ([[0, 1, 2, 3], [0, 1, 2, 3]], None), ([[4, 5, 6, 7], [4, 5, 6, 7]], None),  # one HCCS half per server
    ([list(range(8)), list(range(8))], None), ([[0], []], None), ([[0, 4], []], None),  # whole servers; one server
    ([[0], [0]], "not whole HCCS halves"), ([[0, 1], [0, 1]], "not whole HCCS halves"),  # TP 8 / TP 4-ish EP groups
    ([[0, 2, 4, 6], [0, 2, 4, 6]], "not whole HCCS halves"),
    ([[0, 1, 2, 3], [4, 5, 6, 7]], "different HCCS halves"),
])
def test_alltoall_rule_takes_whole_hccs_halves_across_servers(per_server, why):
    # CANN HcclAlltoAll(V), Atlas training: a multi-server communicator takes whole clusters (devices 0-3, 4-7),
    # the same on every server; a single-server one is not constrained by this rule
    nodes = [s for s, devices in enumerate(per_server) for _ in devices]
    devices = [d for ds in per_server for d in ds]
    found = alltoall_problem(range(len(nodes)), nodes, devices)
    assert (found is None) if why is None else (why in found), found


def test_exchange_groups_checked_for_the_alltoall_rule():
    from locmoe.hccl_rules import alltoall_violations, default_device_of_rank
    from locmoe.tiers import alltoall_groups

    def broken(topo, two_tier):
        groups = alltoall_groups(topo, two_tier)
        bad = alltoall_violations(groups, topo.node_of_rank, default_device_of_rank(topo.node_of_rank))
        return [g for _, g, _ in bad], [g for _, g in groups]

    tp8 = Topology(world_size=16, tp=8, ep=2, num_experts=2, devices_per_node=8)  # one NPU per server per EP group
    assert broken(tp8, False) == ([[t, 8 + t] for t in range(8)],) * 2
    bad, groups = broken(tp8, True)  # tier 1: groups of 1 (none); tier 2: the EP groups
    assert bad == groups == [[t, 8 + t] for t in range(8)]
    tp1 = Topology(world_size=16, tp=1, ep=16, num_experts=16, devices_per_node=8)  # EP group = 2 whole servers
    assert broken(tp1, False) == ([], [list(range(16))])
    assert broken(tp1, True) == ([], [list(range(8)), list(range(8, 16)), list(range(16))])
    one_server = Topology(world_size=16, tp=2, ep=4, num_experts=4, devices_per_node=8)  # EP {0,2,4,6}: no tier 2
    assert broken(one_server, True) == ([], [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]])
    # parallel.a2a_group servers: one AlltoAll(V) over all 16 ranks (both servers, all 8 EP groups)
    assert broken(tp8, False) != broken_servers(tp8, False) == ([], [list(range(16))])
    assert broken_servers(tp8, True) == ([], [list(range(16))])
    straddling = Topology(world_size=24, tp=1, ep=12, num_experts=12, devices_per_node=8)  # EP groups 0-11, 12-23
    with pytest.raises(ConfigError, match="parallel.a2a_group='servers' is invalid: 'ep' for this layout"):
        broken_servers(straddling, False)  # server 1 holds parts of both EP groups
    with pytest.raises(ConfigError, match="parallel.a2a_group='eps' is invalid: one of"):
        tiny_cfg(a2a_group="eps")


def broken_servers(topo, two_tier):
    from locmoe.hccl_rules import alltoall_violations, default_device_of_rank
    from locmoe.tiers import alltoall_groups
    groups = alltoall_groups(topo, two_tier, "servers")
    bad = alltoall_violations(groups, topo.node_of_rank, default_device_of_rank(topo.node_of_rank))
    return [g for _, g, _ in bad], [g for _, g in groups]


def test_plan_flags_the_alltoall_rule_on_the_128n_layout(capsys):
    from pangu_sigma.cluster import plan
    # the 128N layout with the exchange over the EP groups (the shipped config says servers)
    assert plan.main(["--config", "configs/locmoe_128n.yaml", "--world-size", "128",
                      "--set", "parallel.a2a_group=ep"]) == 0
    out = capsys.readouterr().out
    note = [line for line in out.splitlines() if "HCCL AlltoAll rule broken" in line]
    assert "AlltoAll(V) rule BROKEN by 8 of 8 exchange groups" in out and len(note) == 1, out
    assert ("EP group (tier 2 of the two-tier exchange, AlltoAllV) of ranks [0, 8, 16, 24" in note[0]
            and "devices [0] on server 0 of 16 servers" in note[0] and "whole 4-device clusters" in note[0]
            and "parallel.a2a_group: servers" in note[0]), note
    assert plan.main(["--config", "configs/locmoe_128n.yaml", "--world-size", "128"]) == 0  # shipped: servers
    out = capsys.readouterr().out
    assert "AlltoAll(V) rule (whole HCCS halves across servers) holds for 1 exchange groups" in out, out
    from pangu_sigma.config import load_config
    cfg = load_config("configs/locmoe_128n.yaml", ["parallel.op_level_model_parallel_num=1", "parallel.a2a_group=ep",
                                                   "train.batch_size=4", "train.gradient_accumulation_steps=1"])
    fixed = plan.make_plan(cfg, world_size=128)  # TP 1: EP groups of 16 = 2 whole servers, tier 1 = 1 server
    assert fixed["hccl"]["alltoall_groups"] == 16 + 8 and fixed["hccl"]["alltoall_violations"] == []
    assert not any("AlltoAll rule" in n for n in fixed["notes"])


def test_plan_rejects_a_bad_layout_before_any_hccl_call(capsys):
    from pangu_sigma.cluster import plan
    # TP 4 on 8-device servers: every DP group has devices 0 and 4 of a server, across the HCCS halves
    code = plan.main(["--config", "configs/locmoe_64n.yaml", "--world-size", "64",
                      "--set", "parallel.op_level_model_parallel_num=4", "--set", "train.batch_size=32",
                      "--set", "train.gradient_accumulation_steps=32"])  # the global batch 512 kept at dp 16
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dp group" in err[0] and "HCCS half" in err[0], err


@pytest.mark.parametrize("world", [512, 1024])
def test_plan_at_512_and_1024_devices_has_short_group_names(capsys, world):
    from pangu_sigma.cluster import plan
    cfg_path = "configs/locmoe_256n.yaml"
    assert plan.main(["--config", cfg_path, "--world-size", str(world), "--json", "--set", f"parallel.world_size={world}",
                      "--set", "train.global_batch_size=0"]) == 0
    import json
    p = json.loads(capsys.readouterr().out)
    assert p["hccl"]["checked"] and p["hccl"]["max_name_bytes"] <= MAX_GROUP_NAME_BYTES
    # the old names spelled out the members: the DP groups at these sizes would not fit
    longest_old = max(len("g_" + "_".join(map(str, g))) for g in p["groups"]["dp"])
    assert longest_old > MAX_GROUP_NAME_BYTES


def test_group_names_are_short_stable_and_distinct():
    big = list(range(0, 1024, 8))
    assert comm.group_name(big) == comm.group_name(list(big))
    assert len(comm.group_name(big).encode()) <= MAX_GROUP_NAME_BYTES
    names = {comm.group_name(list(range(s, 1024, 8))) for s in range(8)}
    assert len(names) == 8
    assert comm.group_name(range(4), world_size=4) == comm.GlobalComm.WORLD_COMM_GROUP


# ---- item 6: logical DEVICE_ID --------------------------------------------------------------------
def test_visible_devices_map_physical_ids_to_logical_indices():
    from pangu_sigma.cluster.ranktable import logical_device_ids, parse_visible_devices
    assert parse_visible_devices("4-7") == [4, 5, 6, 7] == parse_visible_devices("4,5,6-7")
    assert logical_device_ids([6, 7], [4, 5, 6, 7]) == [2, 3]
    assert logical_device_ids([6, 7]) == [6, 7]
    with pytest.raises(ConfigError, match="device 2"):
        logical_device_ids([2], [4, 5, 6, 7])
    with pytest.raises(ConfigError, match="ASCEND_VISIBLE_DEVICES"):
        parse_visible_devices("7-4")


def test_device_id_env_is_a_logical_index():
    from pangu_sigma.build import device_id_from_env
    assert device_id_from_env({"DEVICE_ID": "3"}) == 3 and device_id_from_env({}) == 0
    with pytest.raises(ConfigError, match="DEVICE_ID"):
        device_id_from_env({"DEVICE_ID": "x"})


# ---- item 7: data sinking -------------------------------------------------------------------------
def test_ascend_sink_is_one_device_loop(monkeypatch):
    """ms.data_sink gets a jit_config whose jit_level "" makes one call = sink_size steps on 910A
    (mindspore/train/data_sink.py: loop = 1 when _ascend_910a_target() and not jit_level)."""
    seen = {}
    monkeypatch.setattr(train_module.ms, "data_sink",
                        lambda fn, dataset, sink_size, jit_config=None: seen.update(size=sink_size, jit=jit_config))
    cfg = tiny_cfg(device_target="Ascend")
    train_module.sink_runner(cfg, object(), object())
    assert seen["size"] == cfg.train.sink_size and seen["jit"] is not None
    assert seen["jit"].jit_config_dict["jit_level"] == "" and seen["jit"].jit_config_dict["exc_mode"] == "sink"


# ---- item 9: fp32 embedding gather ------------------------------------------------------------------
def test_fp16_embedding_gradient_is_accumulated_in_fp32():
    """70,000 uses of one token: fp32 accumulation gives 70,000; a table cast to fp16 before the gather
    scatter-adds in fp16, which stalls at 2,048 on CPU (and saturates at 65,504 on 910A)."""
    from pangu_sigma.model.embedding import Embedding
    from pangu_sigma.parallel.tp_layers import VocabParallelEmbedding  # noqa: F401 (same fix, TP twin)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        emb = Embedding(8, 8, 4, 0.02, 0.0, compute_dtype=ms.float16)
        ids = Tensor(np.zeros((8750, 8), np.int32))  # [B, S]
        grads = ms.grad(lambda: emb(ids).sum(), grad_position=None, weights=emb.trainable_params())()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_array_equal(grads[0].asnumpy()[0], np.full(4, 70000.0, np.float32))


# ---- item 13: Ascend on a CPU-only MindSpore ------------------------------------------------------------
def test_ascend_on_a_cpu_build_is_one_line():
    from pangu_sigma.build import ascend_backend_error, set_device
    if ascend_backend_error() is None:
        pytest.skip("this MindSpore has a working Ascend backend")
    with pytest.raises(ConfigError) as err:
        set_device(tiny_cfg(device_target="Ascend"))
    text = str(err.value)
    assert "\n" not in text and "parallel.device_target" in text and "no usable Ascend backend" in text
    assert "CANN" in text


# ---- item 3: config paths against the launch folder ---------------------------------------------------
def test_config_paths_resolve_against_the_launch_folder(tmp_path):
    from pangu_sigma.config import load_config
    from pangu_sigma.training.run_paths import resolve_paths
    cfg = load_config("configs/cpu_tiny.yaml", ["train.init_checkpoint=ckpt/init.ckpt"])
    cfg.data.dataset_dir = "output/data/default"
    resolved = resolve_paths(cfg, str(tmp_path))
    assert resolved.data.dataset_dir == str(tmp_path / "output/data/default")
    assert resolved.train.output_dir == str(tmp_path / cfg.train.output_dir)
    assert resolved.train.init_checkpoint == str(tmp_path / "ckpt/init.ckpt")
    assert cfg.data.dataset_dir == "output/data/default"  # the original is untouched
    kept = resolve_paths(load_config("configs/cpu_tiny.yaml", ["data.dataset_dir=/abs/data"]), str(tmp_path))
    assert kept.data.dataset_dir == "/abs/data" and kept.train.init_checkpoint == ""
    with pytest.raises(ConfigError, match="--paths-from"):
        resolve_paths(cfg, "relative/dir")


def test_group_creation_checks_the_hccl_rules_first(monkeypatch, no_groups):
    """Where groups are built (locmoe.comm.create_topology_groups): under HCCL a bad layout stops before
    any group is created."""
    monkeypatch.setattr(comm.GlobalComm, "INITED", True)
    monkeypatch.setattr(comm.GlobalComm, "BACKEND", "hccl")
    monkeypatch.setattr(comm, "get_group_size", lambda: 16)
    with pytest.raises(ConfigError, match="dp group .*HCCS half"):
        comm.create_topology_groups(Topology(world_size=16, tp=4, num_experts=2, devices_per_node=8))
    assert no_groups.calls == []
    comm.create_topology_groups(Topology(world_size=16, tp=8, num_experts=2, devices_per_node=8))
    assert [ranks for _, ranks in no_groups.calls] == [list(range(8)), [0, 8]]  # TP 8, DP over 2 servers
