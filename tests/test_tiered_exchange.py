"""TieredExchange in one process: every rank of a 2-node EP group runs against a shared
board standing in for the All-to-All (record every rank's send buffer, then replay
each rank's receive), checked against the tier layout written out here."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

import locmoe.exchange as exchange
from locmoe.comm import CommCounter
from locmoe.topology import Topology

E, CL, CR, D = 8, 3, 2, 4
# 4 ranks, 2 per node, EP 4, 2 experts per rank: node 0 = ranks 0, 1 (experts 0-3), node 1 = ranks 2, 3


class Board:
    def __init__(self):
        self.sent, self.replay = {}, False


BOARD = Board()


class FakeAllToAll(nn.Cell):
    """All-to-All over `group` (split and concat on dim 0) through BOARD."""

    def __init__(self, group, split_dim=0, concat_dim=0, backend=None, topology=None, name=None):
        super().__init__()
        self.group, self.name, self.me = list(group), name, topology.rank

    def construct(self, x):
        BOARD.sent[(self.name, self.me)] = x.asnumpy()
        if not BOARD.replay:
            return ops.zeros_like(x)
        mine = self.group.index(self.me)
        return Tensor(np.stack([BOARD.sent[(self.name, src)][mine] for src in self.group]))  # [g(src), ...]


class Identity(nn.Cell):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def construct(self, x):
        return x


@pytest.fixture
def fake_collectives(monkeypatch):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    monkeypatch.setattr(exchange, "AllToAll", FakeAllToAll)
    for name in ("AllGather", "ReduceScatter", "AllReduce"):
        monkeypatch.setattr(exchange, name, Identity)
    BOARD.sent, BOARD.replay = {}, False


def _two_phase(run, ranks):
    BOARD.replay = False
    for r in ranks:
        run(r)
    BOARD.replay = True
    return {r: run(r) for r in ranks}


def test_tiers_reach_the_right_experts_and_come_back(fake_collectives):
    topos = {r: Topology(world_size=4, tp=1, ep=4, num_experts=E, devices_per_node=2, rank=r) for r in range(4)}
    cells = {r: exchange.TieredExchange(topos[r], E, "emulated", True) for r in range(4)}
    rng = np.random.default_rng(0)
    local = {r: rng.normal(size=(4, CL, D)).astype(np.float32) for r in range(4)}  # the node's 4 experts
    remote = {r: rng.normal(size=(4, CR, D)).astype(np.float32) for r in range(4)}  # the other node's 4
    got = _two_phase(lambda r: cells[r].to_experts(Tensor(local[r]), Tensor(remote[r])).asnumpy(), range(4))
    for r in range(4):
        node = r // 2
        expected = []
        for k in range(2):  # my 2 experts
            e = 2 * r + k
            rows_l = [local[s][e - 4 * node] for s in (2 * node, 2 * node + 1)]  # tier 1: my node's sources
            rows_r = [remote[s][e - 4 * node] if s // 2 != node else np.zeros((CR, D), np.float32)
                      for s in range(4)]  # tier 2: every EP source; same-node blocks are the zero hole
            expected.append(np.concatenate(rows_l + rows_r))  # [2*CL + 4*CR, d]
        np.testing.assert_array_equal(got[r], np.stack(expected))
    # the way back: expert e multiplies its rows by (e + 1); every source gets its own rows back
    back = _two_phase(lambda r: [None if t is None else t.asnumpy() for t in cells[r].from_experts(
        Tensor(got[r] * (np.arange(2 * r, 2 * r + 2, dtype=np.float32) + 1)[:, None, None]), CL, CR)], range(4))
    for r in range(4):
        node = r // 2
        scale_l = (np.arange(4 * node, 4 * node + 4) + 1)[:, None, None]
        scale_r = (np.arange(4 * (1 - node), 4 * (1 - node) + 4) + 1)[:, None, None]
        np.testing.assert_allclose(back[r][0], local[r] * scale_l, rtol=1e-6)
        np.testing.assert_allclose(back[r][1], remote[r] * scale_r, rtol=1e-6)


def test_tiered_bytes_follow_the_remote_capacity():
    topo = Topology(world_size=4, tp=1, ep=4, num_experts=E, devices_per_node=2, rank=0)
    totals = exchange.register_tiered_exchange_bytes(CommCounter(topo), topo, E, CL, CR, D, "float32", True).totals()
    # per call: tier 2 sends [4, 2, CR, D] fp32 blocks, 2 of them to node 1; tier 1 [2, 2, CL, D], 1 block to rank 1;
    # the tier-2 zero hole to rank 1 stays in the node. 4 calls of each (dispatch + combine, fwd + bwd).
    block_r, block_l = 2 * CR * D * 4, 2 * CL * D * 4
    assert totals == {"inter": 4 * 2 * block_r, "intra": 4 * (block_l + block_r)}
