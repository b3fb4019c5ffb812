"""Collectives over groups of global ranks, with two backends, plus byte accounting.

Cells (GRAPH mode, differentiable): AllToAll, AllGather, AllReduce (sum),
ReduceScatter (sum then split). A group of size 1 is the identity.

Backends (`resolve_backend`):
- "native":   ops.AlltoAll / AllGather / AllReduce / ReduceScatter (HCCL, Ascend).
              The primitive is stored as `cell.op` so it can be inspected.
- "emulated": everything from sub-group AllReduce(sum), the one collective
              that works (with autodiff) on CPU under msrun. Values and gradients
              are exact; the wire traffic is larger (a g-times bigger buffer).

Groups: named by a hash of their members ("g2_<16 hex>", short for HCCL's
128-byte limit; the whole world uses the world group) and created at most once per process (`GROUPS`). Rule: every rank must
create every group it belongs to, and never a group it is not in; members must
create shared groups in the same order. Building the same cells in the same
order on every rank satisfies this; `create_topology_groups(topology)` at
start-up (all of this rank's TP/DP/EP/EDP groups, fixed order) is the safe way.

Bytes: `collective_bytes` counts what the *logical* collective puts on the wire
(not the emulation), split into intra-node / inter-node by the Topology:
- all_to_all:     this rank sends nbytes/g to each other member (per-destination).
- all_gather:     this rank's piece (nbytes) goes to each other member (per-destination).
- reduce_scatter: this rank sends nbytes/g to each other member (per-destination).
- all_reduce:     ring = reduce-scatter + all-gather, 2*(g-1)/g*nbytes; all of
                  it counts as inter-node if the group spans nodes, else intra
                  (a ring over several nodes is paced by its inter-node links).
`nbytes` is always the size of this rank's *input* tensor.
"""
import hashlib
import math

import numpy as np
from mindspore import nn, ops, Tensor
from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank
from mindspore.ops import ReduceOp

from locmoe.errors import ConfigError
from locmoe.hccl_rules import check_group_name

KINDS = ("all_to_all", "all_gather", "all_reduce", "reduce_scatter")  # + all_to_all_v (CommCounter.register_v)
BACKENDS = ("native", "emulated")


def resolve_backend(name, device_target):
    """'auto' -> 'native' on Ascend, 'emulated' elsewhere; 'native' off Ascend is an error."""
    if name == "auto":
        return "native" if device_target == "Ascend" else "emulated"
    if name not in BACKENDS:
        raise ConfigError("comm_backend", name, "one of 'auto', 'native', 'emulated'")
    if name == "native" and device_target == "CPU":
        raise ConfigError("comm_backend", name,
                          "'emulated' or 'auto' on CPU: AlltoAll/ReduceScatter do not exist on CPU")
    return name


# ---- groups -------------------------------------------------------------------
def _world_size(topology):
    if GlobalComm.INITED:
        return get_group_size()
    return topology.world_size if topology is not None else None


def group_name(group_ranks, world_size=None):
    """Short stable name from the members: "g<size>_<16 hex digits of sha1 of the member list>".

    The same on every process (hashlib, not Python's salted hash). HCCL limits a
    group name to 128 bytes with the NUL (locmoe/hccl_rules.py); a name spelling
    out the members passes that beyond ~30 ranks (a 256-rank DP group at 512
    devices). The world group keeps MindSpore's name.
    """
    ranks = [int(r) for r in group_ranks]
    if world_size is not None and ranks == list(range(world_size)):
        return GlobalComm.WORLD_COMM_GROUP
    digest = hashlib.sha1(",".join(map(str, ranks)).encode("ascii")).hexdigest()[:16]
    return f"g{len(ranks)}_{digest}"


class GroupRegistry:
    """Creates each communication group at most once per process."""

    def __init__(self):
        self.created = {}  # name -> tuple of ranks

    def ensure(self, group_ranks, world_size=None):
        name = group_name(group_ranks, world_size)
        if name == GlobalComm.WORLD_COMM_GROUP:
            return name
        ranks = tuple(int(r) for r in group_ranks)
        if name in self.created:
            if self.created[name] != ranks:  # a 64-bit hash collision: refuse rather than mix groups
                raise RuntimeError(f"group name {name} is taken by ranks {list(self.created[name])[:8]}...; "
                                   f"cannot reuse it for {list(ranks)[:8]}...")
            return name
        check_group_name(name)
        self._create(name, list(ranks))
        self.created[name] = ranks
        return name

    def _create(self, name, ranks):
        if not GlobalComm.INITED:
            raise RuntimeError(f"cannot create communication group {name} over ranks {ranks}: "
                               "call mindspore.communication.init() first")
        create_group(name, ranks)


GROUPS = GroupRegistry()


def create_topology_groups(topology, device_of_rank=None):
    """Create every TP/DP/EP/EDP group (size > 1) containing this rank, in a fixed order.

    Under HCCL every group of the topology is first checked against the Ascend 910A
    rules (locmoe/hccl_rules.py; device ids from the rank table, else the position on
    the node): a bad layout is one ConfigError naming the group, before any HCCL call.
    """
    if GlobalComm.INITED and GlobalComm.BACKEND == "hccl":
        topology.check_hccl(device_of_rank)
    ws = _world_size(topology)
    for kind in ("tp", "dp", "ep", "edp"):
        ranks = {"tp": topology.tp_group, "dp": topology.dp_group,
                 "ep": topology.ep_group, "edp": topology.expert_dp_group}[kind]()
        if len(ranks) > 1:
            GROUPS.ensure(ranks, ws)


# ---- byte accounting (pure Python) ----------------------------------------------
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "bool_": 1}


def itemsize(dtype):
    """Bytes per element of a mindspore / numpy dtype or its name."""
    key = str(dtype).lower()
    if key in _ITEMSIZE:
        return _ITEMSIZE[key]
    return np.dtype(dtype).itemsize


def collective_bytes(kind, group_ranks, topology, nbytes_per_rank, rank):
    """(intra, inter) bytes that `rank` sends in one call of `kind` over `group_ranks`."""
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; expected one of {KINDS}")
    ranks = list(group_ranks)
    g = len(ranks)
    if rank not in ranks:
        raise ValueError(f"rank {rank} is not in group {ranks}")
    if g == 1:
        return 0, 0
    if kind == "all_reduce":
        sent = 2 * (g - 1) * nbytes_per_rank // g
        spans = len({topology.node(r) for r in ranks}) > 1
        return (0, sent) if spans else (sent, 0)
    if kind in ("all_to_all", "reduce_scatter"):
        if nbytes_per_rank % g:
            raise ValueError(f"{kind}: {nbytes_per_rank} bytes do not split into {g} equal chunks")
        per_dst = nbytes_per_rank // g
    else:  # all_gather: my whole piece to every other member
        per_dst = nbytes_per_rank
    intra = inter = 0
    for dst in ranks:
        if dst == rank:
            continue
        if topology.is_intra_node(rank, dst):
            intra += per_dst
        else:
            inter += per_dst
    return intra, inter


def all_to_all_v_bytes(group_ranks, topology, blocks, block_bytes, rank):
    """(intra, inter) bytes `rank` sends in one AllToAllV over `group_ranks`: blocks[i][j] blocks of
    block_bytes from member i to member j (its blocks to itself never leave the device)."""
    ranks = list(group_ranks)
    me = ranks.index(rank)
    intra = inter = 0
    for j, dst in enumerate(ranks):
        if dst == rank:
            continue
        sent = blocks[me][j] * block_bytes
        if topology.is_intra_node(rank, dst):
            intra += sent
        else:
            inter += sent
    return intra, inter


def world_collective_bytes(kind, groups, topology, nbytes_per_rank):
    """(intra, inter) summed over every member of every group (one call per rank)."""
    intra = inter = 0
    for ranks in groups:
        for r in ranks:
            a, e = collective_bytes(kind, ranks, topology, nbytes_per_rank, r)
            intra, inter = intra + a, inter + e
    return intra, inter


def group_family(group_ranks, topology):
    """The world-wide family of groups that `group_ranks` belongs to (TP, DP, EP, EDP or world)."""
    ranks = list(group_ranks)
    if ranks == list(range(topology.world_size)):
        return [ranks]
    for kind in ("tp", "dp", "ep", "edp"):
        fam = topology.all_groups(kind)
        if ranks in fam:
            return fam
    raise ValueError(f"group {ranks} is not a TP/DP/EP/EDP group of the topology; pass family= explicitly")


class CommCounter:
    """Collective calls registered at build time (shapes known); totals per step.

    `totals()` is this rank's sends; `world_totals()` sums over every rank, assuming
    each rank makes the same call in its own group of the same family (SPMD).
    """

    def __init__(self, topology):
        self.topology = topology
        self.records = []  # dicts: name, kind, group_ranks, family, nbytes, calls

    def register(self, name, kind, group_ranks, shape, dtype, calls=1, family=None, family_shapes=None):
        """family_shapes: one input shape per group of `family` when they differ (else `shape` for all)."""
        nbytes = math.prod(shape) * itemsize(dtype)
        fam = family if family is not None else group_family(group_ranks, self.topology)
        sizes = None if family_shapes is None else [math.prod(s) * itemsize(dtype) for s in family_shapes]
        self.records.append(dict(name=name, kind=kind, group_ranks=list(group_ranks), family=fam,
                                 nbytes=nbytes, calls=calls, family_nbytes=sizes))

    def register_v(self, name, groups, block_shape, dtype, calls=1):
        """An AllToAllV (uneven blocks): groups = [(group_ranks, blocks [g][g]), ...], every group of the
        family with its own matrix; this rank's is the one holding it."""
        nbytes = math.prod(block_shape) * itemsize(dtype)
        mine = [(ranks, blocks) for ranks, blocks in groups if self.topology.rank in ranks]
        if len(mine) != 1:
            raise ValueError(f"{name}: rank {self.topology.rank} must be in exactly one group of the family")
        self.records.append(dict(name=name, kind="all_to_all_v", group_ranks=list(mine[0][0]), blocks=mine[0][1],
                                 family=[(list(r), b) for r, b in groups], nbytes=nbytes, calls=calls))

    def _record_bytes(self, rec, world):
        if rec["kind"] == "all_to_all_v":
            pairs = rec["family"] if world else [(rec["group_ranks"], rec["blocks"])]
            intra = inter = 0
            for ranks, blocks in pairs:
                for r in (ranks if world else [self.topology.rank]):
                    a, e = all_to_all_v_bytes(ranks, self.topology, blocks, rec["nbytes"], r)
                    intra, inter = intra + a, inter + e
            return intra, inter
        if world and rec.get("family_nbytes"):
            parts = [world_collective_bytes(rec["kind"], [g], self.topology, n)
                     for g, n in zip(rec["family"], rec["family_nbytes"])]
            return sum(p[0] for p in parts), sum(p[1] for p in parts)
        if world:
            return world_collective_bytes(rec["kind"], rec["family"], self.topology, rec["nbytes"])
        return collective_bytes(rec["kind"], rec["group_ranks"], self.topology, rec["nbytes"], self.topology.rank)

    def register_cell(self, cell, shape, dtype, calls=1, family=None):
        self.register(cell.comm_name, cell.kind, cell.group_ranks, shape, dtype, calls, family)

    def by_name(self, world=False):
        """{name: (intra, inter)} per step, for this rank (or the whole world)."""
        out = {}
        for rec in self.records:
            a, e = self._record_bytes(rec, world)
            prev = out.get(rec["name"], (0, 0))
            out[rec["name"]] = (prev[0] + a * rec["calls"], prev[1] + e * rec["calls"])
        return out

    def totals(self, world=False):
        """{'intra': bytes, 'inter': bytes} per step."""
        parts = self.by_name(world).values()
        return {"intra": sum(p[0] for p in parts), "inter": sum(p[1] for p in parts)}

    def world_totals(self):
        return self.totals(world=True)


# ---- cells --------------------------------------------------------------------
class _Collective(nn.Cell):
    """Shared set-up: group, my index in it, backend, and the emulation's AllReduce."""
    kind = None

    def __init__(self, group_ranks, backend, topology, name):
        super().__init__()
        ranks = sorted(int(r) for r in group_ranks)
        if backend not in BACKENDS:
            raise ConfigError("comm_backend", backend, f"one of {BACKENDS} (resolve 'auto' first)")
        self.group_ranks = ranks
        self.group_size = len(ranks)
        self.backend = backend
        self.topology = topology
        self.comm_name = name or f"{self.kind}_{'_'.join(map(str, ranks))}"
        self.identity = self.group_size == 1
        self.op = None
        self.group = None
        if self.identity:
            self.index = 0
            return
        my_rank = topology.rank if topology is not None else get_rank()
        if my_rank not in ranks:
            raise ValueError(f"{self.comm_name}: rank {my_rank} is not in group {ranks}")
        self.index = ranks.index(my_rank)
        self.group = GROUPS.ensure(ranks, _world_size(topology))
        if backend == "emulated":
            self.op = ops.AllReduce(ReduceOp.SUM, self.group)
            self.onehot = Tensor(np.eye(self.group_size, dtype=np.float32)[:, self.index:self.index + 1])  # [g, 1]

    def bytes_per_call(self, shape, dtype):
        """(intra, inter) bytes this rank sends per call for an input of `shape`, `dtype`."""
        if self.topology is None:
            raise ValueError(f"{self.comm_name}: byte accounting needs a Topology")
        nbytes = math.prod(shape) * itemsize(dtype)
        return collective_bytes(self.kind, self.group_ranks, self.topology, nbytes, self.topology.rank)

    def _slot(self, x):
        """Zero buffer [g, *x.shape] holding x at my slot (one-hot mask, differentiable)."""
        flat = x.reshape((1, -1))  # [1, m]
        buf = ops.cast(self.onehot, x.dtype) * flat  # [g, m]
        return buf.reshape((self.group_size,) + x.shape)  # [g, *x.shape]


def _split_front(x, dim, g):
    """Split `dim` into g chunks and stack them in front: [g, *chunk_shape]."""
    s = x.shape
    x = x.reshape(s[:dim] + (g, s[dim] // g) + s[dim + 1:])  # [..., g, S_dim/g, ...]
    return ops.moveaxis(x, dim, 0)  # [g, ..., S_dim/g, ...]


def _concat_front(x, dim):
    """Concatenate the leading axis (in order) into axis `dim` of the rest: inverse of _split_front."""
    g = x.shape[0]
    x = ops.moveaxis(x, 0, dim)  # [..., g, C_dim, ...]
    s = x.shape
    return x.reshape(s[:dim] + (g * s[dim + 1],) + s[dim + 2:])  # [..., g*C_dim, ...]


class AllToAll(_Collective):
    """Split `split_dim` into g chunks, send chunk j to member j, concat received chunks on `concat_dim`."""
    kind = "all_to_all"

    def __init__(self, group_ranks, split_dim=0, concat_dim=0, backend="emulated", topology=None, name=None):
        super().__init__(group_ranks, backend, topology, name)
        self.split_dim = split_dim
        self.concat_dim = concat_dim
        if not self.identity and backend == "native":
            self.op = ops.AlltoAll(self.group_size, split_dim, concat_dim, group=self.group)

    def construct(self, x):
        if self.identity:
            return x
        if self.backend == "native":
            return self.op(x)
        g = self.group_size
        chunks = _split_front(x, self.split_dim % x.ndim, g)  # [g(dst), *C]
        buf = self.op(self._slot(chunks))  # [g(src), g(dst), *C], row i from rank i
        mine = buf[:, self.index]  # [g(src), *C]
        return _concat_front(mine, self.concat_dim % x.ndim)  # concat over src


def take_rows(x, index):
    """x [n, *rest] with a zero row appended, rows picked by a static index (n: the zero row). -> [len(index), *rest]"""
    padded = ops.concat((x, ops.zeros((1,) + x.shape[1:], x.dtype)), 0)  # [n + 1, *rest]
    return ops.gather(padded, index, 0)


class AllToAllV(_Collective):
    """All-to-All with a static, uneven number of equal blocks per (source, destination) pair.

    blocks[i][j]: blocks member i (group order) sends member j; the same matrix on every member.
    construct(x [n_send, *block]) -> [n_recv, *block]: x holds my blocks by destination (member
    order), the result the blocks sent to me by source (member order); n_send = sum_j blocks[me][j],
    n_recv = sum_i blocks[i][me]. Every member must send itself at least one block (a receive of
    nothing is a shape-() tensor in MindSpore's AlltoAllV), which never leaves the device.
    native:   ops.AlltoAllV (mindspore/ops/operations/comm_ops.py: flat input, send/recv numel lists,
              block_size in elements; Ascend only; its bprop in ops/_grad_experimental/grad_comm_ops.py
              swaps the two lists).
    emulated: every chunk padded to the largest block count of the matrix, then the AllToAll
              emulation, then the padding dropped: same values and gradients, static shapes.
    """
    kind = "all_to_all_v"

    def __init__(self, group_ranks, blocks, backend="emulated", topology=None, name=None):
        super().__init__(group_ranks, backend, topology, name)
        g = len(self.group_ranks)
        blocks = [[int(b) for b in row] for row in blocks]
        if len(blocks) != g or any(len(row) != g or min(row) < 0 for row in blocks):
            raise ValueError(f"{self.comm_name}: blocks must be a {g} x {g} matrix of counts >= 0")
        if any(blocks[i][i] < 1 for i in range(g)):
            raise ValueError(f"{self.comm_name}: every member must send itself >= 1 block")
        self.blocks = blocks
        me = self.index
        self.send_blocks = tuple(blocks[me])  # [g] by destination
        self.recv_blocks = tuple(blocks[i][me] for i in range(g))  # [g] by source
        self.num_send, self.num_recv = sum(self.send_blocks), sum(self.recv_blocks)
        if self.identity:
            return
        if backend == "native":
            # ops.AlltoAllV alone among the collectives used here is built without `no_eliminate`
            # (mindspore/ops/operations/comm_ops.py:2026-2031, against AllReduce :185, AllGather :360,
            # ReduceScatter :583, AlltoAll :948): set it as they do. Its bprop builds a fresh AlltoAllV
            # without it (ops/_grad_experimental/grad_comm_ops.py:662), so the backward is kept alive by
            # the data flow instead (locmoe.exchange.TieredExchange: no constant input, no unused output).
            self.op = ops.AlltoAllV(self.group)
            self.op.add_prim_attr("no_eliminate", True)
            return
        widest = max(max(row) for row in blocks)
        self.widest = widest
        # emulation: my send buffer [g(dst), widest] from x (index num_send = the zero block) ...
        pad_send, start = [], 0
        for count in self.send_blocks:
            pad_send += list(range(start, start + count)) + [self.num_send] * (widest - count)
            start += count
        self.pad_send = Tensor(np.array(pad_send, np.int32))  # [g*widest]
        # ... and the received [g(src), widest] -> my n_recv blocks
        self.unpad_recv = Tensor(np.array([i * widest + k for i in range(g) for k in range(self.recv_blocks[i])],
                                          np.int32))  # [n_recv]

    def construct(self, x):
        if self.identity:
            return x
        block = x.shape[1:]
        if self.backend == "native":
            size = 1
            for n in block:
                size *= n
            send = tuple([count * size for count in self.send_blocks])  # elements per destination
            recv = tuple([count * size for count in self.recv_blocks])  # elements per source
            flat = self.op(x.reshape(-1), send, recv)  # [n_recv * block numel]
            return flat.reshape((self.num_recv,) + block)  # [n_recv, *block]
        g = self.group_size
        chunks = take_rows(x, self.pad_send).reshape((g, self.widest) + block)  # [g(dst), widest, *block]
        buf = self.op(self._slot(chunks))  # [g(src), g(dst), widest, *block], row i from rank i
        mine = buf[:, self.index].reshape((g * self.widest,) + block)  # [g(src)*widest, *block]
        return ops.gather(mine, self.unpad_recv, 0)  # [n_recv, *block]


class AllGather(_Collective):
    """Concatenate every member's tensor (in group order) along `dim`."""
    kind = "all_gather"

    def __init__(self, group_ranks, dim=0, backend="emulated", topology=None, name=None):
        super().__init__(group_ranks, backend, topology, name)
        self.dim = dim
        if not self.identity and backend == "native":
            self.op = ops.AllGather(self.group)

    def construct(self, x):
        if self.identity:
            return x
        d = self.dim % x.ndim
        if self.backend == "native":
            y = self.op(ops.moveaxis(x, d, 0))  # [g*S_d, ...rest]
            return ops.moveaxis(y, 0, d)
        buf = self.op(self._slot(x))  # [g, *S], slot i from rank i
        return _concat_front(buf, d)  # [..., g*S_d, ...]


class AllReduce(_Collective):
    """Sum over the group."""
    kind = "all_reduce"

    def __init__(self, group_ranks, backend="emulated", topology=None, name=None):
        super().__init__(group_ranks, backend, topology, name)
        if not self.identity and backend == "native":
            self.op = ops.AllReduce(ReduceOp.SUM, self.group)

    def construct(self, x):
        if self.identity:
            return x
        return self.op(x)


class ReduceScatter(_Collective):
    """Sum over the group, then keep my 1/g slice of `dim`."""
    kind = "reduce_scatter"

    def __init__(self, group_ranks, dim=0, backend="emulated", topology=None, name=None):
        super().__init__(group_ranks, backend, topology, name)
        self.dim = dim
        if not self.identity and backend == "native":
            self.op = ops.ReduceScatter(ReduceOp.SUM, self.group)

    def construct(self, x):
        if self.identity:
            return x
        d = self.dim % x.ndim
        if self.backend == "native":
            y = self.op(ops.moveaxis(x, d, 0))  # [S_d/g, ...rest]
            return ops.moveaxis(y, 0, d)
        total = self.op(x)  # [*S]
        return _split_front(total, d, self.group_size)[self.index]  # [..., S_d/g, ...]
