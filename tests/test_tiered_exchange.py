"""TieredExchange in one process: every rank of a 2-node layout runs against a shared
board standing in for the collectives (each round records every rank's send buffer and
answers from the previous round's; chained collectives settle after a few rounds),
checked against the tier layout written out here in numpy: EP only (4 ranks) and
TP 2 x EP in group-wise mode (each TP rank sends 1/TP of each tier's capacity)."""
from collections import Counter

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Tensor

import locmoe.exchange as exchange
from locmoe.comm import CommCounter
from locmoe.tiers import unit_table
from locmoe.topology import Topology

E, CL, CR, D = 8, 4, 2, 4
MAX_ROUNDS = 10  # > the longest chain of collectives (5 in a layer: A2A, gather, reduce-scatter, A2A, gather)


class Board:
    def __init__(self):
        self.sent, self.prev, self.calls = {}, {}, {}

    def key(self, name, rank):
        """(name, rank, n): the n-th call of a collective by rank in this round (a cell runs once per chunk)."""
        n = self.calls.get((name, rank), 0)
        self.calls[(name, rank)] = n + 1
        return name, rank, n


BOARD = Board()


class _Fake(nn.Cell):
    """A collective over `group` answered from BOARD.prev (zeros until every member has sent)."""

    def __init__(self, group, *args):  # the locmoe.comm signatures: (group, [dims], backend, topology, name)
        super().__init__()
        topology, name = args[-2:]
        self.group, self.name, self.me = sorted(group), name, topology.rank
        self.dim = args[0] if isinstance(args[0], int) else None

    def construct(self, x):
        name, _, n = key = BOARD.key(self.name, self.me)
        BOARD.sent[key] = x.asnumpy()
        sent = [BOARD.prev.get((name, src, n)) for src in self.group]
        if any(s is None or s.shape != x.shape for s in sent):
            return self.empty(x)
        return Tensor(self.answer(sent, self.group.index(self.me)))

    def empty(self, x):
        return ops.zeros_like(x)


class FakeAllToAll(_Fake):
    def answer(self, sent, mine):  # split and concat on dim 0
        return np.concatenate([np.array_split(s, len(sent))[mine] for s in sent])


class FakeAllToAllV(_Fake):
    def __init__(self, group, blocks, *args):
        super().__init__(group, *args)
        self.blocks = blocks

    def answer(self, sent, mine):  # the blocks each source addressed to me, by source
        return np.concatenate([s[sum(self.blocks[i][:mine]):sum(self.blocks[i][:mine + 1])]
                               for i, s in enumerate(sent)])

    def construct(self, x):
        name, _, n = key = BOARD.key(self.name, self.me)
        BOARD.sent[key] = x.asnumpy()
        sent = [BOARD.prev.get((name, src, n)) for src in self.group]
        mine = self.group.index(self.me)
        if any(s is None or s.shape[1:] != x.shape[1:] for s in sent):
            return ops.zeros((sum(row[mine] for row in self.blocks),) + x.shape[1:], x.dtype)
        return Tensor(self.answer(sent, mine))


class FakeAllGather(_Fake):
    def answer(self, sent, mine):
        return np.concatenate(sent, self.dim)

    def empty(self, x):
        shape = list(x.shape)
        shape[self.dim] *= len(self.group)
        return ops.zeros(tuple(shape), x.dtype)


class FakeReduceScatter(_Fake):
    def answer(self, sent, mine):
        return np.array_split(np.sum(sent, 0), len(sent), self.dim)[mine]

    def empty(self, x):
        shape = list(x.shape)
        shape[self.dim] //= len(self.group)
        return ops.zeros(tuple(shape), x.dtype)


class FakeAllReduce(_Fake):
    def answer(self, sent, mine):
        return np.sum(sent, 0)


@pytest.fixture
def fake_collectives(monkeypatch):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    for name, fake in (("AllToAll", FakeAllToAll), ("AllToAllV", FakeAllToAllV), ("AllGather", FakeAllGather),
                       ("ReduceScatter", FakeReduceScatter), ("AllReduce", FakeAllReduce)):
        monkeypatch.setattr(exchange, name, fake)
    BOARD.sent, BOARD.prev = {}, {}


def _rounds(run, ranks):
    """Run every rank, round after round, each round answered from the last, until every collective
    receives what it received the round before (a fixed point: every answer is the true one)."""
    BOARD.sent, BOARD.prev = {}, {}
    for _ in range(MAX_ROUNDS):
        BOARD.calls = {}
        results = {r: run(r) for r in ranks}
        settled = BOARD.prev.keys() == BOARD.sent.keys() and all(
            np.array_equal(BOARD.prev[k], v) for k, v in BOARD.sent.items())
        BOARD.prev, BOARD.sent = BOARD.sent, {}
        if settled:
            return results
    raise AssertionError(f"the collectives did not settle in {MAX_ROUNDS} rounds")


LAYOUTS = {  # name: (world, tp, ep, devices_per_node); 2 nodes each
    "ep4": (4, 1, 4, 2),  # node 0 = ranks 0, 1 (experts 0-3), node 1 = ranks 2, 3
    "tp2_ep4": (8, 2, 4, 4),  # node 0 = ranks 0-3 (dp 0, 1: experts 0-3); EP groups {0,2,4,6}, {1,3,5,7}
    "tp2_ep2": (4, 2, 2, 2),  # node = one TP group (one EP member per node, as the 64N-256N configs)
}


def uneven_units(dp):
    """[dp, E]: each data-parallel rank sends each expert a different number of units (0: none). On 2 nodes of
    one DP rank each (tp2_ep2) DP rank 1 has no units at all (R = 0) while DP rank 0 has 4."""
    pattern = np.array([[2, 1, 0, 0, 1, 0, 3, 0], [0, 0, 0, 0, 0, 0, 2, 1],
                        [1, 0, 0, 0, 1, 2, 1, 1], [0, 3, 0, 1, 0, 0, 0, 0]], np.int64)
    return pattern[np.arange(dp) % 4]


@pytest.mark.parametrize("layout, uneven, a2a_group", [(layout, uneven, "ep") for layout in LAYOUTS for uneven in
                                                      (False, True)] + [("tp2_ep2", True, "servers")])
def test_tiers_reach_the_right_experts_and_come_back(fake_collectives, layout, uneven, a2a_group):
    """a2a_group servers: tier 2 over both nodes' ranks (both EP groups), zero blocks across EP groups."""
    world, tp, ep, per_node = LAYOUTS[layout]
    topos = {r: Topology(world_size=world, tp=tp, ep=ep, num_experts=E, devices_per_node=per_node, rank=r)
             for r in range(world)}
    node_of = lambda r: r // per_node
    local_ids = {r: [e for e in range(E) if e // (E // 2) == node_of(r)] for r in range(world)}  # node's experts
    pattern = uneven_units(world // tp) if uneven else np.ones((world // tp, E), np.int64)
    # units of source rank s for expert e: the pattern, none for its own node's experts (tier 1)
    units_of = lambda s, e: 0 if e in local_ids[s] else int(pattern[s // tp][e])
    table = unit_table(topos[0], pattern if uneven else None)
    cells = {r: exchange.TieredExchange(topos[r], E, "emulated", True, units=table, a2a_group=a2a_group)
             for r in range(world)}
    if a2a_group == "servers":
        _assert_whole_servers(cells[0].a2a_remote_in, topos[0])
    rng = np.random.default_rng(0)
    dp = world // tp
    local_by_dp = [rng.normal(size=(E // 2, CL, D)).astype(np.float32) for _ in range(dp)]
    # each source's remote buffer: its units by expert id, CR rows each
    unit_owner = {s: [e for e in range(E) for _ in range(units_of(s * tp, e))] for s in range(dp)}
    remote_by_dp = [rng.normal(size=(len(unit_owner[s]), CR, D)).astype(np.float32) for s in range(dp)]
    local = {r: local_by_dp[r // tp] for r in range(world)}  # the TP ranks of a group hold the same tokens
    remote = {r: remote_by_dp[r // tp] for r in range(world)}
    mine_or_none = lambda r: Tensor(remote[r]) if len(remote[r]) else None  # R = 0: no remote buffer
    got = _rounds(lambda r: [cells[r].to_experts(Tensor(local[r]), mine_or_none(r), CR).asnumpy()], range(world))
    per_rank = E // ep
    for r in range(world):
        group = [(r // tp // ep * ep + i) * tp + r % tp for i in range(ep)]  # my EP group
        members = [s for s in group if node_of(s) == node_of(r)]
        mine = [(r // tp % ep) * per_rank + k for k in range(per_rank)]
        incoming = {e: [remote[s][k] for s in group if node_of(s) != node_of(r)
                        for k, owner in enumerate(unit_owner[s // tp]) if owner == e] for e in mine}
        width = max([len(v) for v in incoming.values()] + [1])  # units of my busiest expert
        expected = []
        for e in mine:
            rows_l = [local[s][local_ids[s].index(e)] for s in members]  # tier 1: my node's sources
            rows_r = incoming[e] + [np.zeros((CR, D), np.float32)] * (width - len(incoming[e]))  # tier 2, padded
            expected.append(np.concatenate(rows_l + rows_r))  # [m*CL + W*CR, d]
        np.testing.assert_array_equal(got[r][0], np.stack(expected))
    # the way back: expert e multiplies its rows by (e + 1), split over the TP ranks as partial sums
    # (TP rank t contributes the share w[t]); every source gets its own rows back, summed over TP
    share = np.arange(1, tp + 1, dtype=np.float32) / (tp * (tp + 1) / 2)  # [tp], sums to 1

    def back_of(r):
        mine = np.arange((r // tp % ep) * per_rank, (r // tp % ep + 1) * per_rank, dtype=np.float32)
        partial = got[r][0] * ((mine + 1) * share[r % tp])[:, None, None]
        return [None if t is None else t.asnumpy() for t in cells[r].from_experts(Tensor(partial), CL, CR)]

    back = _rounds(back_of, range(world))
    for r in range(world):
        scale_l = (np.array(local_ids[r]) + 1)[:, None, None]
        scale_r = (np.array(unit_owner[r // tp]) + 1)[:, None, None]
        np.testing.assert_allclose(back[r][0], local[r] * scale_l, rtol=1e-5)
        if len(remote[r]):
            np.testing.assert_allclose(back[r][1], remote[r] * scale_r, rtol=1e-5)
        else:
            assert back[r][1] is None


def _assert_whole_servers(a2a, topo):
    """The AllToAllV of a2a_group servers: every rank of both nodes, nothing between different EP groups."""
    assert a2a.group == list(range(topo.world_size))
    for i in range(topo.world_size):
        for j in range(topo.world_size):
            assert (a2a.blocks[i][j] == 0) or (topo.ep_group(i) == topo.ep_group(j)), (i, j)


@pytest.mark.parametrize("layout", ["tp2_ep2", "tp2_ep4"])
def test_one_tier_exchange_over_whole_servers_equals_numpy(fake_collectives, layout):
    """TokenExchange (group-wise) with a2a_group ep and servers: each rank's experts get every EP source's
    rows for them, and every source its rows back (expert e scales by e + 1, partial sums over TP), the
    numpy reference in both forms."""
    world, tp, ep, per_node = LAYOUTS[layout]
    dp, c = world // tp, 4
    topos = {r: Topology(world_size=world, tp=tp, ep=ep, num_experts=E, devices_per_node=per_node, rank=r)
             for r in range(world)}
    rng = np.random.default_rng(2)
    buffers = [rng.normal(size=(E, c, D)).astype(np.float32) for _ in range(dp)]  # [E, c, d] per DP rank
    share = np.arange(1, tp + 1, dtype=np.float32) / (tp * (tp + 1) / 2)  # [tp], sums to 1
    for form in ("ep", "servers"):
        cells = {r: exchange.TokenExchange(topos[r], E, "emulated", True, a2a_group=form) for r in range(world)}
        if form == "servers":
            _assert_whole_servers(cells[0].a2a_in, topos[0])
        got = _rounds(lambda r: [cells[r].to_experts(Tensor(buffers[r // tp])).asnumpy()], range(world))
        for r in range(world):
            sources = topos[r].ep_group()
            expected = [np.concatenate([buffers[s // tp][e] for s in sources]) for e in topos[r].experts_of_rank()]
            np.testing.assert_array_equal(got[r][0], np.stack(expected), err_msg=form)  # [E/ep, ep*c, d]

        def back_of(r):
            mine = np.array(topos[r].experts_of_rank(), np.float32)
            return [cells[r].from_experts(Tensor(got[r][0] * ((mine + 1) * share[r % tp])[:, None, None])).asnumpy()]

        back = _rounds(back_of, range(world))
        for r in range(world):
            np.testing.assert_allclose(back[r][0], buffers[r // tp] * (np.arange(E) + 1)[:, None, None], rtol=1e-5,
                                       err_msg=form)


def test_tiered_bytes_follow_the_remote_capacity():
    topo = Topology(world_size=4, tp=1, ep=4, num_experts=E, devices_per_node=2, rank=0)
    totals = exchange.register_tiered_exchange_bytes(CommCounter(topo), topo, E, 3, 2, D, "float32", True).totals()
    # per call: tier 2 sends one [CR, D] fp32 block per remote expert, 2 to each rank of node 1; tier 1 [2, 2, CL, D],
    # 1 block to rank 1;
    # tier 2 sends nothing to rank 1 (same node). 4 calls of each (dispatch + combine, fwd + bwd).
    block_r, block_l = 2 * 2 * D * 4, 2 * 3 * D * 4
    assert totals == {"inter": 4 * 2 * block_r, "intra": 4 * block_l}


def test_tiered_bytes_follow_the_units_by_hand():
    # EP 4 on 2 nodes, units of uneven_units(4): rank 0 (node 0) sends expert 4 (rank 2) 1 unit and expert 6
    # (rank 3) 3 units; on the way back it returns what ranks 2 and 3 sent its experts 0-1: 1 (rank 2: e0) and
    # 3 (rank 3: e1). u = CR = 2 rows of D = 4 fp32 = 32 B; 2 calls each (fwd + bwd); nothing to rank 1.
    topo = Topology(world_size=4, tp=1, ep=4, num_experts=E, devices_per_node=2, rank=0)
    table = unit_table(topo, uneven_units(4))
    counter = exchange.register_tiered_exchange_bytes(CommCounter(topo), topo, E, 3, CR, D, "float32", True,
                                                      units=table)
    by_name = counter.by_name()
    assert by_name["a2a_remote_dispatch"] == (0, 2 * 4 * 32) and by_name["a2a_remote_combine"] == (0, 2 * 4 * 32)
    # world: every unit crosses nodes once per call, out and back; rows 1-3 of the pattern without their
    # node's experts: rank 1 (node 0) e6 2 + e7 1, rank 2 (node 1) e0 1, rank 3 (node 1) e1 3 + e3 1
    units = 4 + 3 + 1 + 4
    assert counter.world_totals()["inter"] == 2 * 2 * units * 32


def test_tiered_bytes_group_wise_tp_by_hand():
    # TP 2 x EP 2 on 2 nodes (one EP member per node, as the 64N-256N configs): rank 0, 4 experts per rank,
    # C_l = 4, C_r = 2, d = 4, fp32, 2 calls per collective (fwd + bwd). Tier 1 is a group of one: no bytes.
    topo = Topology(world_size=4, tp=2, ep=2, num_experts=E, devices_per_node=2, rank=0)
    totals = exchange.register_tiered_exchange_bytes(CommCounter(topo), topo, E, 4, 2, D, "float32", True).totals()
    # tier 2: 4 blocks [C_r/2 = 1, 4] fp32 = 64 B to rank 2 on node 1; dispatch + combine
    inter = 2 * 2 * 64
    # over TP (rank 1, same node), each x 2 calls: tier 1 is the node's one EP member, so no TP slice and no
    # dispatch gather (it would rebuild what both TP ranks hold): one AllReduce of the partial outputs
    # [1, 4, 4, 4] 256 B, a ring of 2 sends 2 * 1/2 of it = 256 B (the sliced form sent 128 + 128 + 128);
    # remote: the 4 blocks from rank 2 and the placeholder to myself, each
    # [C_r/2 = 1, 4]: gather [5, 1, 4] 80 B, reduce-scatter half of [5, 2, 4] 160 B, gather back [5, 1, 4] 80 B
    intra = 2 * 256 + 2 * (80 + 80 + 80)
    assert totals == {"inter": inter, "intra": intra}


@pytest.mark.parametrize("layout, uneven, overlap, a2a_group, reroute", [
    ("tp2_ep4", False, 1, "ep", False), ("tp2_ep4", True, 1, "ep", False), ("tp2_ep2", False, 3, "ep", True),
    ("tp2_ep2", True, 2, "ep", False), ("tp2_ep2", True, 1, "servers", False)])
def test_two_tier_layer_on_every_rank_equals_the_single_process(fake_collectives, layout, uneven, overlap,
                                                                a2a_group, reroute):
    """The whole MoELayer, distributed over a TP2 x EP layout (group-wise, TP-sharded experts) with
    every rank against the recorded collectives, gives each rank's token group the output and the
    counts of the single-process layer whose token groups pose as the ranks (drops in both tiers), at
    overlap degree 1 and in chunks through both tiers (degrees 2 and 3: locmoe.tiers.tier_chunks); with
    units on tp2_ep2, DP rank 1 has none (R = 0) and DP rank 0 has 4; with reroute_overflow (the tokens over
    their slots take free node-local slots)."""
    from locmoe.config import MoEConfig
    from locmoe.layer import MoELayer
    from locmoe.parallel_context import ParallelContext

    world, tp, ep, per_node = LAYOUTS[layout]
    dp, seq, hidden, ffn = world // tp, 64, 8, 16
    cfg = MoEConfig(num_experts=E, router="switch", capacity_factor=1.0, remote_capacity_factor=0.75,
                    expert_parallel=ep, groupwise_a2a=True, comm_overlap_degree=overlap, a2a_group=a2a_group,
                    reroute_overflow=reroute)
    topo = lambda r: Topology(world_size=world, tp=tp, ep=ep, num_experts=E, devices_per_node=per_node, rank=r)
    ms.set_seed(3)
    units = uneven_units(dp) if uneven else None  # tokens routed to a pair of 0 units: dropped
    quanta = 2 if uneven else 1  # a unit is half a uniform pair's capacity
    ref = MoELayer(cfg, hidden, ffn, topo(0), param_init_std=0.5, token_groups=dp,
                   group_ranks=[d * tp for d in range(dp)], remote_units=units, remote_quanta=quanta)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(dp, seq, hidden)).astype(np.float32)  # one sample per DP rank
    tok = rng.integers(0, 50, size=(dp, seq)).astype(np.int32)
    dom = np.zeros(dp, np.int32)
    ref_y, _, _, ref_stats = ref(Tensor(x), Tensor(tok), Tensor(dom))
    ref_stats = [s.asnumpy() for s in ref_stats]
    assert ref_stats[3] > 0 and ref_stats[1] >= ref_stats[3], "the case should drop in the remote tier"
    # the single process's slots, first come first served in numpy: C_l per node-local expert, units * u per
    # remote expert (u = ceil(T f_r / (quanta E)) rounded up to a multiple of TP), none where units are 0
    index, keep = (t.asnumpy() for t in ref.route(Tensor(x), Tensor(tok), Tensor(dom)))  # [G, T] each
    cap_l = -(-int(np.ceil(seq * 1.0 / E)) // tp) * tp  # capacity_factor 1.0
    unit = -(-int(np.ceil(seq * 0.75 / (quanta * E))) // tp) * tp  # remote_capacity_factor 0.75
    moved = 0  # tokens kept past their pair's slots: rerouted to a node-local expert
    for g in range(dp):
        node_experts = topo(g * tp).local_experts()
        limit = [cap_l if e in node_experts else unit * (1 if units is None else units[g][e]) for e in range(E)]
        used = [0] * E
        for t_, e in enumerate(index[g]):
            first_served = used[e] < limit[e]
            # rerouted: the tokens over their slots may take free node-local slots (tests/test_layer.py checks which)
            assert keep[g][t_] == first_served or (reroute and keep[g][t_] and not first_served), (g, t_, e)
            moved += int(keep[g][t_] and not first_served)
            used[e] += 1
        if reroute:
            kept_first = sum(min(used[e], limit[e]) for e in range(E))
            free_local = sum(max(0, limit[e] - used[e]) for e in node_experts)
            assert keep[g].sum() == min(len(index[g]), kept_first + free_local), g  # no local slot left free
    from locmoe.tiers import tier_chunks
    chunks = len(tier_chunks(cap_l, unit, overlap, tp))
    assert chunks == min(overlap, cap_l // tp, unit // tp) and (overlap == 1) == (chunks == 1)
    params = {k: p.asnumpy() for k, p in ref.parameters_dict().items()}
    layers = {}
    for r in range(world):
        t = topo(r)
        layer = MoELayer(cfg, hidden, ffn, t, param_init_std=0.5, parallel=ParallelContext(t, "emulated", True),
                         remote_units=units, remote_quanta=quanta)
        mine = slice(t.ep_rank() * (E // ep), (t.ep_rank() + 1) * (E // ep))
        inner = slice(t.tp_rank() * ffn // tp, (t.tp_rank() + 1) * ffn // tp)
        for k, p in layer.parameters_dict().items():
            full = params[k]
            if k.endswith("w_in"):
                full = full[mine][:, :, inner]  # [E/ep, d, ffn/tp]
            elif k.endswith("w_out"):
                full = full[mine][:, inner]  # [E/ep, ffn/tp, d]
            p.set_data(Tensor(full))
        layers[r] = layer
    if a2a_group == "servers":  # tier 2 over both nodes' ranks, the R = 0 and R = 4 ranks in one communicator
        _assert_whole_servers(layers[0].exchange.a2a_remote_in, topo(0))

    def run(r):
        d = r // tp
        y, _, _, stats = layers[r](Tensor(x[d:d + 1]), Tensor(tok[d:d + 1]), Tensor(dom[d:d + 1]))
        return [y.asnumpy()] + [s.asnumpy() for s in stats]

    got = _rounds(run, range(world))
    for r in range(world):
        np.testing.assert_allclose(got[r][0][0], ref_y.asnumpy()[r // tp], rtol=1e-5, atol=1e-6)
    # counts: the metrics AllReduce sums the ranks and divides out the TP copies
    assert ref_stats[5] == moved and (moved > 0) == reroute  # the layer's rerouted count
    summed = [sum(got[r][i] for r in range(world)) / tp for i in range(1, 7)]
    for i, name in enumerate(["load", "dropped", "local", "dropped_remote", "local_by_rank", "rerouted"]):
        np.testing.assert_array_equal(summed[i], ref_stats[i], err_msg=name)


# ---- GRAPH mode: every rank issues the same collectives, whatever its tier-2 units ----------------
ISSUED = {}  # rank -> [(collective, "fwd" / "bwd")] in the order the stand-ins ran


def _recording(rank, name, out_shape):
    """A pyfunc kernel standing in for one collective on `rank`: zeros of the collective's output shape,
    its run recorded (its backward too). Like a collective without side effects it is pruned when its
    output is unused, and its backward when no gradient needs it (a constant input)."""
    def forward(x):  # recorded with the rows of the chunk (x [..., rows, d]): chunks of unequal widths
        ISSUED[rank].append((name, "fwd", x.shape[-2]))
        return np.zeros(out_shape(x.shape), x.dtype)

    def backward(x, dout):
        ISSUED[rank].append((name, "bwd", x.shape[-2]))
        return np.zeros_like(x)

    back = ops.Custom(backward, out_shape=lambda xs, ds: xs, out_dtype=lambda xt, dt: xt, func_type="pyfunc")

    def bprop(x, out, dout):
        return (back(x, dout),)

    return ops.Custom(forward, out_shape=out_shape, out_dtype=lambda t: t, func_type="pyfunc", bprop=bprop)


class _StandIn(nn.Cell):
    """The locmoe.comm signature (group, [dim or blocks], backend, topology, name); a group of one is the
    identity, as in locmoe.comm."""

    def __init__(self, group, *args):
        super().__init__()
        topology, name = args[-2:]
        self.group, self.me = sorted(group), topology.rank
        self.identity = len(self.group) == 1
        self.op = _recording(self.me, name, self.shape_of(args[0] if isinstance(args[0], (int, list)) else None))

    def construct(self, x):
        if self.identity:
            return x
        return self.op(x)


class StandInAllToAll(_StandIn):
    def shape_of(self, _):
        return lambda s: s


class StandInAllToAllV(_StandIn):
    def shape_of(self, blocks):
        recv = sum(row[self.group.index(self.me)] for row in blocks)
        return lambda s: [recv] + list(s[1:])


class StandInAllGather(_StandIn):
    def shape_of(self, dim):
        return lambda s: [n * len(self.group) if i == dim % len(s) else n for i, n in enumerate(s)]


class StandInReduceScatter(_StandIn):
    def shape_of(self, dim):
        return lambda s: [n // len(self.group) if i == dim % len(s) else n for i, n in enumerate(s)]


class StandInAllReduce(_StandIn):
    def shape_of(self, _):
        return lambda s: s


def test_every_rank_issues_the_same_collectives_with_and_without_units(monkeypatch):
    """TP2 x EP2, one EP member per node (the shipped cluster shape), DP rank 0 with no tier-2 units
    (R = 0) and DP rank 1 with 5: a training step of the MoELayer in GRAPH mode issues on both members
    of EP group {0, 2} the same collectives in the same order, forward and backward, each overlap chunk
    (degree 2) its own. (On 1a91f21, at degree 1, rank 0 ran the remote dispatch forward only.)"""
    from locmoe.config import MoEConfig
    from locmoe.layer import MoELayer
    from locmoe.parallel_context import ParallelContext
    from test_layer import _Sum

    for name, fake in (("AllToAll", StandInAllToAll), ("AllToAllV", StandInAllToAllV),
                       ("AllGather", StandInAllGather), ("ReduceScatter", StandInReduceScatter),
                       ("AllReduce", StandInAllReduce)):
        monkeypatch.setattr(exchange, name, fake)
    ms.set_context(mode=ms.GRAPH_MODE)
    world, tp, ep, per_node = LAYOUTS["tp2_ep2"]
    units = np.array([[0] * E, [3, 0, 2, 0, 0, 0, 0, 0]], np.int64)  # dp 0 (node 0): R = 0; dp 1: R = 5
    overlap, ranks = 2, (0, 2)  # C_l = 6, u = 6 rows: 2 chunks of 4 and 2 (multiples of TP) in each tier
    cfg = MoEConfig(num_experts=E, router="switch", capacity_factor=3.0, remote_capacity_factor=6.0,
                    expert_parallel=ep, groupwise_a2a=True, comm_overlap_degree=overlap)
    rng = np.random.default_rng(0)
    x = Tensor(rng.normal(size=(1, 16, 8)).astype(np.float32))
    tok, dom = Tensor(np.zeros((1, 16), np.int32)), Tensor(np.zeros(1, np.int32))
    for r in ranks:
        t = Topology(world_size=world, tp=tp, ep=ep, num_experts=E, devices_per_node=per_node, rank=r)
        layer = MoELayer(cfg, 8, 16, t, parallel=ParallelContext(t, "emulated", True), remote_units=units,
                         remote_quanta=2)
        assert layer.max_units == (0 if r // tp == 0 else 5)
        loss = _Sum(layer)  # sum(y^2) + aux + loc
        ISSUED[r] = []
        value, grads = ms.value_and_grad(loss, grad_position=0, weights=loss.trainable_params())(x, tok, dom)
        [g.asnumpy() for g in (value, *grads[0:1], *grads[1])]  # wait for every kernel (they run asynchronously)
    remote = [c for c in ISSUED[0] if "remote" in c[0] and "a2a" in c[0]]
    assert sorted(remote) == sorted([(f"moe_a2a_remote_{k}", d, rows // tp) for k in ("dispatch", "combine")
                                     for d in ("fwd", "bwd") for rows in (4, 2)])  # each chunk's TP slice
    assert "moe_tp_gather_local_dispatch" not in {c[0] for c in ISSUED[0]}  # tier 1 unsliced (one member)
    assert Counter(ISSUED[2]) == Counter(ISSUED[0])  # the same collectives, forward and backward
    ep_order = [[c for c in ISSUED[r] if "a2a" in c[0]] for r in ranks]  # (the TP ones go to other groups)
    assert ep_order[0] == ep_order[1]  # in the same order on the EP group, chunk by chunk
