"""Byte accounting, native primitive construction and backend resolution (no msrun)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops
from mindspore.communication import GlobalComm

from locmoe import comm
from locmoe.errors import ConfigError
from locmoe.topology import Topology

# 2 nodes x 2 ranks: node 0 = {0, 1}, node 1 = {2, 3}
EP = [0, 1, 2, 3]
SHAPE = (4, 3, 8)          # 4 chunks of [capacity 3, hidden 8], fp32
NBYTES = 4 * 3 * 8 * 4     # 384 bytes per rank; one chunk = 96 bytes


def topo(rank=0, tp=1, ep=4):
    return Topology(world_size=4, tp=tp, ep=ep, num_experts=4, devices_per_node=2, rank=rank)


def test_all_to_all_bytes_by_hand():
    # rank 0 sends a 96-byte chunk to 1 (same node) and to 2, 3 (other node); every rank is alike
    for r in EP:
        assert comm.collective_bytes("all_to_all", EP, topo(r), NBYTES, r) == (96, 192)
    assert comm.world_collective_bytes("all_to_all", [EP], topo(), NBYTES) == (4 * 96, 4 * 192)
    # 2-rank group across nodes: half the tensor crosses, all of it inter-node
    assert comm.collective_bytes("all_to_all", [0, 2], topo(), NBYTES, 0) == (0, 192)


def test_other_collectives_bytes_by_hand():
    t = topo(3)
    # all_gather of a 96-byte piece: my piece to each of 3 others (1 same node, 2 other node)
    assert comm.collective_bytes("all_gather", EP, t, 96, 3) == (96, 192)
    # reduce_scatter of 384 bytes: 96 to each other member
    assert comm.collective_bytes("reduce_scatter", EP, t, NBYTES, 3) == (96, 192)
    # all_reduce, ring: 2 * 3/4 * 384 = 576 bytes, inter because the group spans nodes
    assert comm.collective_bytes("all_reduce", EP, t, NBYTES, 3) == (0, 576)
    assert comm.world_collective_bytes("all_reduce", [EP], t, NBYTES) == (0, 4 * 576)
    # all_reduce inside a node: 2 * 1/2 * 384 = 384 intra
    assert comm.collective_bytes("all_reduce", [2, 3], t, NBYTES, 3) == (384, 0)
    # a group of one sends nothing
    assert comm.collective_bytes("all_to_all", [3], t, NBYTES, 3) == (0, 0)
    with pytest.raises(ValueError):
        comm.collective_bytes("all_to_all", [0, 1], t, NBYTES, 3)


def test_comm_counter_rank_and_world_totals():
    counter = comm.CommCounter(topo(1))
    counter.register("moe0.a2a", "all_to_all", EP, SHAPE, ms.float32, calls=2)  # dispatch + combine
    counter.register("grads", "all_reduce", [0, 1, 2, 3], (24,), np.float32)  # 96 bytes
    assert counter.by_name()["moe0.a2a"] == (192, 384)
    assert counter.totals() == {"intra": 192, "inter": 384 + 144}
    assert counter.world_totals() == {"intra": 4 * 192, "inter": 4 * (384 + 144)}


def test_counter_infers_group_family_for_world_totals():
    t = topo(1, tp=2, ep=2)  # EP groups [0, 2] and [1, 3] cross nodes; TP groups stay in a node
    counter = comm.CommCounter(t)
    counter.register("a2a", "all_to_all", t.ep_group(), SHAPE, "float32")
    counter.register("tp_ag", "all_gather", t.tp_group(), (3, 8), ms.float16)  # 48 bytes
    assert counter.by_name() == {"a2a": (0, 192), "tp_ag": (48, 0)}
    assert counter.by_name(world=True) == {"a2a": (0, 4 * 192), "tp_ag": (4 * 48, 0)}
    with pytest.raises(ValueError):
        counter.register("odd", "all_reduce", [0, 3], SHAPE, "float32")


@pytest.fixture
def registry(monkeypatch):
    """A fresh group registry that records creations instead of calling HCCL."""
    reg = comm.GroupRegistry()
    reg.calls = []
    monkeypatch.setattr(reg, "_create", lambda name, ranks: reg.calls.append((name, ranks)))
    monkeypatch.setattr(comm, "GROUPS", reg)
    return reg


def test_native_primitives_and_groups(registry):
    world = GlobalComm.WORLD_COMM_GROUP
    a2a = comm.AllToAll(EP, split_dim=0, concat_dim=1, backend="native", topology=topo(1), name="ep_a2a")
    assert isinstance(a2a.op, ops.AlltoAll)
    assert {k: a2a.op.attrs[k] for k in ("split_count", "split_dim", "concat_dim", "group")} == \
        {"split_count": 4, "split_dim": 0, "concat_dim": 1, "group": world}
    assert a2a.bytes_per_call(SHAPE, ms.float32) == (96, 192)

    t2 = topo(2, tp=2, ep=2)
    sub = comm.AllToAll(t2.ep_group(), split_dim=1, concat_dim=1, backend="native", topology=t2)
    ag = comm.AllGather(t2.tp_group(), dim=1, backend="native", topology=t2)
    ar = comm.AllReduce(t2.ep_group(), backend="native", topology=t2)
    rs = comm.ReduceScatter(t2.tp_group(), dim=0, backend="native", topology=t2)
    g02, g23 = comm.group_name([0, 2]), comm.group_name([2, 3])
    assert g02 != g23
    assert sub.op.attrs["group"] == g02 and sub.op.attrs["split_count"] == 2
    assert isinstance(ag.op, ops.AllGather) and ag.op.attrs["group"] == g23
    assert isinstance(ar.op, ops.AllReduce) and ar.op.attrs["group"] == g02 and ar.op.attrs["op"] == "sum"
    assert isinstance(rs.op, ops.ReduceScatter) and rs.op.attrs["group"] == g23
    assert rs.op.attrs["op"] == "sum"
    assert registry.calls == [(g02, [0, 2]), (g23, [2, 3])]  # each once, none for the world


class _OneSidedAlltoAllV(nn.Cell):
    """Stands in for ops.AlltoAllV (no CPU kernel) on one member: returns the first sum(recv) elements
    of its input twice over, so the numel lists the cell computes in GRAPH mode shape the output."""

    def construct(self, flat, send, recv):
        total = 0
        for n in recv:
            total += n
        return ops.concat((flat, flat))[:total]


def test_native_all_to_all_v_passes_numel_lists_in_graph_mode(registry):
    # member 0 of [0, 1] sends 2 blocks to itself and 1 to member 1, receives 2 from itself and 3 from member 1
    cell = comm.AllToAllV([0, 1], [[2, 1], [3, 1]], backend="native", topology=topo(0), name="ep_a2av")
    assert isinstance(cell.op, ops.AlltoAllV) and cell.op.attrs["group"] == comm.group_name([0, 1])
    assert (cell.send_blocks, cell.recv_blocks, cell.num_send, cell.num_recv) == ((2, 1), (2, 3), 3, 5)
    cell.op = _OneSidedAlltoAllV()
    ms.set_context(mode=ms.GRAPH_MODE)
    x = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)  # [n_send, *block]: blocks of 8 elements
    out = cell(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(out, np.concatenate([x, x])[:5])  # recv (16, 24) elements -> [5, 2, 4]


def test_emulated_uses_subgroup_allreduce(registry):
    t = topo(3)
    for cell in (comm.AllToAll([1, 3], backend="emulated", topology=t),
                 comm.AllGather([1, 3], backend="emulated", topology=t),
                 comm.ReduceScatter([1, 3], backend="emulated", topology=t)):
        assert isinstance(cell.op, ops.AllReduce) and cell.op.attrs["group"] == comm.group_name([1, 3])
        assert cell.index == 1
    assert registry.calls == [(comm.group_name([1, 3]), [1, 3])]


def test_size_one_group_is_identity_without_group(registry):
    t = Topology(world_size=1, num_experts=2)
    x = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    for cell in (comm.AllToAll([0], 0, 1, backend="native", topology=t), comm.AllGather([0], 1, topology=t),
                 comm.AllReduce([0], topology=t), comm.ReduceScatter([0], 1, topology=t)):
        assert cell.op is None
        np.testing.assert_array_equal(cell(x).asnumpy(), x.asnumpy())
    assert registry.calls == []


def test_group_needs_init_and_membership():
    with pytest.raises(RuntimeError, match="init"):
        comm.AllReduce([0, 1], topology=topo(0))
    with pytest.raises(ValueError, match="not in group"):
        comm.AllReduce([1, 2], topology=topo(0))


def test_resolve_backend():
    assert comm.resolve_backend("auto", "Ascend") == "native"
    assert comm.resolve_backend("auto", "CPU") == "emulated"
    assert comm.resolve_backend("emulated", "CPU") == "emulated"
    assert comm.resolve_backend("native", "Ascend") == "native"
    with pytest.raises(ConfigError, match="AlltoAll/ReduceScatter do not exist on CPU") as err:
        comm.resolve_backend("native", "CPU")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        comm.resolve_backend("hccl", "CPU")
