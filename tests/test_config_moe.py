"""MoEConfig validation and Topology groups worked out by hand."""
import os

os.environ.setdefault("GLOG_v", "3")

import pytest  # noqa: E402

from locmoe.config import MoEConfig  # noqa: E402
from locmoe.errors import ConfigError  # noqa: E402
from locmoe.topology import Topology, single_process  # noqa: E402


def _assert_names(err, field, value):
    msg = str(err)
    assert "\n" not in msg
    assert field in msg, msg
    assert repr(value) in msg, msg
    assert err.field.split(".")[-1] == field and err.value == value


@pytest.mark.parametrize("kwargs,field,value", [
    (dict(capacity_factor=0), "capacity_factor", 0),
    (dict(capacity_factor=-1.5), "capacity_factor", -1.5),
    (dict(router="foo"), "router", "foo"),
    (dict(num_experts=8, num_domain_groups=3), "num_domain_groups", 3),
    (dict(router="hash"), "vocab_size", 0),
    (dict(router="rre", num_domain_groups=2), "vocab_size", 0),
    (dict(locality_smoothing=0), "locality_smoothing", 0),
    (dict(locality_smoothing=1.0), "locality_smoothing", 1.0),
    (dict(num_experts=0), "num_experts", 0),
    (dict(num_experts=8, expert_parallel=3), "expert_parallel", 3),
    (dict(comm_overlap_degree=0), "comm_overlap_degree", 0),
    (dict(switch_jitter=1.0), "switch_jitter", 1.0),
    (dict(aux_loss_coef=-0.01), "aux_loss_coef", -0.01),
    (dict(comm_backend="hccl"), "comm_backend", "hccl"),
    (dict(reroute_overflow=True), "reroute_overflow", True),  # one tier: no node-local tier to reroute to
    (dict(reroute_overflow=True, remote_capacity_factor=0.5, router="hash", vocab_size=8), "reroute_overflow", True),
    (dict(reroute_overflow=1, remote_capacity_factor=0.5), "reroute_overflow", 1),
])
def test_moe_config_rejects(kwargs, field, value):
    with pytest.raises(ConfigError) as info:
        MoEConfig(**kwargs)
    _assert_names(info.value, field, value)


def test_moe_config_unknown_key():
    with pytest.raises(ConfigError) as info:
        MoEConfig.from_dict({"num_experts": 8, "capacity_factr": 1.25})
    _assert_names(info.value, "capacity_factr", 1.25)


def test_moe_config_valid():
    cfg = MoEConfig.from_dict({"num_experts": 8, "router": "hash", "vocab_size": 100, "num_domain_groups": 4})
    assert cfg.experts_per_group == 2 and cfg.capacity_factor == 1.0 and cfg.aux_loss_coef == 0.01
    assert MoEConfig(router="rre", vocab_size=10).router == "rre"


# ---------------------------------------------------------------- Topology
# world 8, tp 2, ep 2, 4 devices per node, 4 experts:
#   rank = dp_rank * 2 + tp_rank, dp = 4, ep_rank = dp_rank % 2
#   rank:     0 1 2 3 4 5 6 7
#   tp_rank:  0 1 0 1 0 1 0 1
#   dp_rank:  0 0 1 1 2 2 3 3
#   ep_rank:  0 0 1 1 0 0 1 1
#   node:     0 0 0 0 1 1 1 1
#   experts (2 per ep rank): ep 0 -> [0, 1], ep 1 -> [2, 3]
HAND = dict(
    tp=[[0, 1], [2, 3], [4, 5], [6, 7]],
    dp=[[0, 2, 4, 6], [1, 3, 5, 7]],
    ep=[[0, 2], [1, 3], [4, 6], [5, 7]],        # consecutive dp ranks {0,1}, {2,3}, same tp rank
    edp=[[0, 4], [1, 5], [2, 6], [3, 7]],       # same ep_rank, same tp rank
)


def test_topology_hand_worked():
    t = Topology(world_size=8, tp=2, ep=2, num_experts=4, devices_per_node=4, rank=5)
    assert (t.dp, t.experts_per_rank, t.nodes) == (4, 2, 2)
    for kind, groups in HAND.items():
        assert sorted(t.all_groups(kind)) == groups, kind
    assert [t.tp_rank(r) for r in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [t.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [t.ep_rank(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [t.node(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [t.experts_of_rank(r) for r in range(8)] == [[0, 1]] * 2 + [[2, 3]] * 2 + [[0, 1]] * 2 + [[2, 3]] * 2
    # each node of 4 ranks holds both EP shards, so every expert is local
    assert t.local_experts(0) == [0, 1, 2, 3] and t.local_experts(7) == [0, 1, 2, 3]
    # the defaults use rank 5
    assert t.tp_group() == [4, 5] and t.dp_group() == [1, 3, 5, 7]
    assert t.ep_group() == [5, 7] and t.expert_dp_group() == [1, 5] and t.experts_of_rank() == [0, 1]
    assert t.is_intra_node(4, 7) and not t.is_intra_node(3, 4)


def test_topology_two_devices_per_node():
    # same layout, 2 devices per node: a node is one TP pair = one dp rank = one EP shard
    t = Topology(world_size=8, tp=2, ep=2, num_experts=4, devices_per_node=2)
    assert t.nodes == 4
    assert [t.local_experts(r) for r in (0, 2, 4, 6)] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert t.local_expert_mask(2) == [0.0, 0.0, 1.0, 1.0]
    # EP partners (0, 2) are on different nodes
    assert t.ep_group(0) == [0, 2] and not t.is_intra_node(0, 2)


def test_topology_explicit_node_table():
    t = Topology(world_size=4, tp=1, ep=4, num_experts=8, node_of_rank=(0, 1, 0, 1))
    assert t.local_experts(0) == [0, 1, 4, 5] and t.local_experts(1) == [2, 3, 6, 7]


def test_topology_refuses_tp_group_across_nodes():
    with pytest.raises(ConfigError) as info:
        Topology(world_size=8, tp=4, ep=1, num_experts=4, devices_per_node=2)
    assert "op_level_model_parallel_num" in str(info.value) and "span" in str(info.value)
    with pytest.raises(ConfigError):
        Topology(world_size=4, tp=2, ep=1, num_experts=2, node_of_rank=(0, 1, 0, 1))


@pytest.mark.parametrize("kwargs,field", [
    (dict(world_size=8, tp=3), "op_level_model_parallel_num"),
    (dict(world_size=8, tp=2, ep=3, num_experts=3), "expert_parallel"),
    (dict(world_size=8, tp=2, ep=2, num_experts=3), "expert_parallel"),
    (dict(world_size=4, rank=4), "rank"),
    (dict(world_size=4, node_of_rank=(0, 0, 1)), "node_of_rank"),
])
def test_topology_rejects(kwargs, field):
    with pytest.raises(ConfigError) as info:
        Topology(**kwargs)
    assert info.value.field == field and "\n" not in str(info.value)


def test_single_process():
    t = single_process(8)
    assert t.local_experts() == list(range(8)) and t.experts_of_rank() == list(range(8))
    assert t.all_groups("ep") == [[0]]
