"""Domain-affine placement: which data-parallel ranks read which domains, and which
experts serve each domain (docs/data.md; paper sec. 3.2's implied premise).

Why: with a replicated gate and i.i.d. data on every rank, the locality loss summed
over ranks is an entropy term plus a constant, and the cluster-wide local fraction
of any router that decides from the token alone is (local experts per node) / E.
Locality needs the routing to depend on where a token is processed; this module
makes it depend through the data.

The layout ("the line"): one global batch is B * dp sample slots. The data-parallel
ranks are laid on a line sorted by node (each rank = B consecutive slots), and the
domains are laid on the same line in index order, domain d taking q_d consecutive
slots, q_d = its share of the global batch:

    q_d = round(B * dp * n_d / N)      (largest remainder; every non-empty domain >= 1)

So the ranks of a node read the domains whose segment covers the node's slots;
uneven sizes, more nodes than domains (a domain spans several nodes) and fewer
nodes than domains (a node reads several domains) all follow from the same cut.

The sample mix: global batch k holds q_d(k) samples of domain d, drawn without
replacement from a fresh permutation of that domain per epoch. q_d(k) carries the
rounding remainder from batch to batch (carried_quotas): after k batches domain d
has had within one sample of k * B dp n_d / N, its corpus share, whatever its size
(a domain of 0.3 samples per batch is read in every third or fourth batch, not in
every batch as a rounded quota of 1 would). So over an epoch the batch loss (a mean
over all tokens of the global batch) has the expectation of the i.i.d. batch,
sum_d (n_d / N) E_d[loss]. Only which rank holds which sample changes, and the
gradient reduction sums over ranks, so the update is the i.i.d. one. Batch k's
slots follow the same line cut with its own q(k) (batch_layouts), so a boundary
rank's slots may change domain between batches; the level-1 mask is chosen from the
rounded mean quotas q_d below, and the tier-2 units cover every layout of the epoch.
What the placement does change: which domains each rank reads, hence the per-rank
aux and locality terms, level-1 routing and the drops of each rank's pairs.

Level 1 (RRE's domain -> expert group) is chosen expert by expert: mask[d, e] = 1
when domain d may use expert e. Under the router's per-rank balance loss a domain's
tokens split about evenly over its experts, so the placement imposes the expected
load  L_e = sum_d mask[d, e] * q_d / k_d  (k_d = experts of domain d; an expert
shared by several domains sums their shares), and the expected local fraction is
sum_{d, n} held[d, n] * c[d, n] / k_d / (B * dp), held[d, n] = slots of domain d
read on node n, c[d, n] = experts of d hosted on node n. The mask minimises, in
this order (a tuple compared left to right):

  1. max(max_e L_e / mean, BALANCE_TARGET = 1.1): the imposed imbalance, down to 1.1;
  2. the (domain, node) pairs left uncovered: node n reads at least half an expert's
     worth of domain d (held[d, n] >= B * dp / (2 E)) but hosts none of d's experts,
     so those tokens would all leave the node (a thinner sliver, e.g. one sample where
     the cut between two domains falls inside a node, may stay uncovered);
  3. minus the expected local fraction;
  4. sum_e L_e^2 (spread below the maximum).

Every expert serves at least one non-empty domain and every domain has an expert.
The search is a deterministic local search: from each of two starts (each expert to
the domain holding most of its node's slots; each domain to every expert of the
nodes that read it), repeatedly apply the single change -- add or drop one
(domain, expert) pair, or move one of a domain's experts to another expert -- that
lowers the tuple most (ties: the first in (domain, expert, expert) order), until
none does; the better of the two ends is the placement. Small domains then spread
thinly over several experts and fill the gaps that whole-expert rounding of the
large ones leaves (hand-worked case in tests/test_placement.py). An empty domain
(never read) may use every expert; it adds no load.
"""
from dataclasses import dataclass

import numpy as np

from locmoe.config import uses_level1
from locmoe.errors import ConfigError

PLACEMENTS = ("iid", "domain_affine")


def domain_quotas(domain_sizes, global_batch):
    """Samples of each domain per global batch, proportional to domain_sizes. # [D]

    Largest-remainder rounding; a non-empty domain gets at least one slot (taken
    from the domain with the largest quota), so no domain disappears from training.
    """
    sizes = np.asarray(domain_sizes, np.float64)
    if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 0).any() or sizes.sum() <= 0:
        raise ConfigError("domain_sizes", list(domain_sizes), "one sample count >= 0 per domain, not all zero")
    nonempty = int((sizes > 0).sum())
    if global_batch < nonempty:
        raise ConfigError("train.batch_size", global_batch,
                          f"a global batch of at least {nonempty} samples (one per non-empty domain) "
                          "under data.placement=domain_affine")
    exact = sizes / sizes.sum() * global_batch
    quotas = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(sizes)), -(exact - quotas)))
    quotas[order[:global_batch - quotas.sum()]] += 1
    for d in np.nonzero((quotas == 0) & (sizes > 0))[0]:
        quotas[int(np.argmax(quotas))] -= 1
        quotas[d] = 1
    return quotas


IID_LEVEL1 = ("blocks", "node_striped", "none")


def striped_level1_groups(num_groups, topology):
    """Level-1 groups striped over the nodes, for i.i.d. data: [groups, E] float32, 1 where expert e
    is in group g. The experts are ordered by (index within their node, node) and cut into num_groups
    contiguous runs, so every node holds experts of every group when it holds at least num_groups
    experts: a token of any domain then has a node-local option on every rank. PanGu-Sigma's contiguous
    blocks (locmoe.routers.domain_group_mask) put a group on E / groups consecutive experts, i.e. on
    few nodes, and leave the other nodes' ranks no local expert for that domain."""
    per_node = [topology.experts_of_node(n) for n in sorted(set(topology.node_of_rank))]
    order = [experts[j] for j in range(max(len(e) for e in per_node)) for experts in per_node if j < len(experts)]
    per_group = topology.num_experts // num_groups
    mask = np.zeros((num_groups, topology.num_experts), np.float32)  # [groups, E]
    for g in range(num_groups):
        mask[g, order[g * per_group:(g + 1) * per_group]] = 1.0
    return mask


def dp_line(topology):
    """Data-parallel ranks sorted by node (then by dp rank): the order of the line. # [dp]"""
    return sorted(range(topology.dp), key=lambda d: (topology.node(d * topology.tp), d))


BALANCE_TARGET = 1.1  # imposed max/mean expert load below which coverage and locality decide
# Remote-tier granularity: a unit is 1/Q of a uniform (1/E share) pair's capacity. Finer units fit each
# pair's share more closely (ceil(Q E share) rounds up by less than a unit), but a unit has fewer rows
# (u = ceil(T f_r / (Q E)), then rounded up to a multiple of TP in group-wise mode), so u's own rounding
# moves every pair's capacity in coarser steps. Q is the largest of 8, 4, 2, 1 that leaves a unit of
# >= MIN_UNIT_ROWS rows per TP rank at f_r = 1, so the TP rounding adds < 1/8 of a unit: Q = 4 at 128N
# and 256N (T / E = 256, TP 8), 1 at 64N (T / E = 64: with Q = 8 a 10-row unit became 16, 1.6x the
# stated headroom), 2 at cpu_tiny's 16 (Q = 8 there left 2-row units and 50% capacity steps, which the
# Hash baseline's 1/16 steps did not have).
MAX_QUANTA, MIN_UNIT_ROWS = 8, 8


def remote_quanta(tokens_per_group, num_experts, multiple=1):
    """Q for a token group of tokens_per_group tokens over num_experts experts, units rounded up to a
    multiple of `multiple` rows (TP in group-wise mode; see above)."""
    quanta = MAX_QUANTA
    while quanta > 1 and tokens_per_group < MIN_UNIT_ROWS * multiple * quanta * num_experts:
        quanta //= 2
    return quanta


def carried_quotas(shares, batches):
    """[K, D] samples of each domain in global batches 0..K-1 for per-batch shares [D] (floats summing to
    the global batch G): largest remainder on each batch's share plus what earlier batches still owe
    (negative: were given ahead), so the cumulative count of every domain stays within one sample of
    k * share (an owed amount is always in (-1, 1)). Ties: the lower domain id."""
    shares = np.asarray(shares, np.float64)
    total = int(round(shares.sum()))
    owed = np.zeros(len(shares))
    out = np.zeros((batches, len(shares)), np.int64)
    order_ids = np.arange(len(shares))
    for k in range(batches):
        target = shares + owed  # sums to G
        given = np.maximum(np.floor(target + 1e-9), 0).astype(np.int64)
        rest = total - int(given.sum())
        if rest > 0:
            order = np.lexsort((order_ids, -(target - given)))  # largest remainder first
            given[order[:rest]] += 1
        out[k] = given
        owed = target - given
    return out


def layout_of(quotas, line, batch_size):
    """slot_domain [dp, B] of one global batch with quotas [D]: the domains cut along the line in index
    order, B slots per rank, the ranks in line order."""
    line_domains = np.repeat(np.arange(len(quotas)), quotas)  # [dp*B] domain of each slot on the line
    slot_domain = np.zeros((len(line), batch_size), np.int64)  # [dp, B]
    for position, d in enumerate(line):
        slot_domain[d] = line_domains[position * batch_size:(position + 1) * batch_size]
    return slot_domain


@dataclass(frozen=True)
class DomainPlacement:
    """slot_domain [dp, B]: the domain of each batch slot of each dp rank (row = dp rank) at the rounded
    mean quotas; batch_layouts gives each batch's own.
    quotas [D]: rounded samples of each domain per global batch (every non-empty domain >= 1).
    sizes [D]: samples of each domain in the split read (an epoch; each batch's share B dp n_d / N is
        read with carried_quotas).
    line: the dp ranks in line order (dp_line).
    domain_nodes: per domain, the sorted nodes whose ranks read it.
    home_nodes: per domain, the sorted nodes hosting at least one of its level-1 experts.
    domain_experts [D, E] float32: 1 where domain d may use expert e (level 1).
    """

    slot_domain: np.ndarray
    quotas: np.ndarray
    domain_nodes: tuple
    home_nodes: tuple
    domain_experts: np.ndarray
    sizes: np.ndarray = None
    line: tuple = None

    def batch_quotas(self, batches):
        """[K, D] samples of each domain in global batches 0..K-1 of an epoch (carried_quotas)."""
        if self.sizes is None:
            return np.repeat(self.quotas[None], batches, 0)
        sizes = np.asarray(self.sizes, np.float64)
        return carried_quotas(sizes / sizes.sum() * self.slot_domain.size, batches)

    def batch_layouts(self, quotas):
        """quotas [K, D] -> slot_domain of each batch [K, dp, B] (layout_of along the line)."""
        batch = self.slot_domain.shape[1]
        line = self.line if self.line is not None else range(len(self.slot_domain))
        cache = {}
        out = np.zeros((len(quotas),) + self.slot_domain.shape, np.int64)
        for k, q in enumerate(quotas):
            key = tuple(q.tolist())
            if key not in cache:
                cache[key] = layout_of(q, line, batch)
            out[k] = cache[key]
        return out

    def epoch_quotas(self):
        """[K, D] the quotas of the batches of one epoch: until a domain runs out (placement_order)."""
        sizes = np.asarray(self.sizes, np.int64)
        quotas = self.batch_quotas(max(1, int(sizes.sum()) // int(self.slot_domain.size) + 1))
        within = (np.cumsum(quotas, 0) <= sizes[None]).all(1)  # [K] batches that fit
        return quotas[:int(within.sum())]

    def epoch_layouts(self):
        """The distinct slot layouts [L, dp, B] of one epoch, with the mean layout (slot_domain)."""
        if self.sizes is None:
            return self.slot_domain[None]
        quotas = self.epoch_quotas()
        distinct = np.unique(quotas, axis=0) if len(quotas) else quotas
        layouts = [self.slot_domain] + [layout_of(q, self.line or range(len(self.slot_domain)),
                                                  self.slot_domain.shape[1]) for q in distinct]
        return np.unique(np.stack(layouts), axis=0)

    def expected_expert_load(self):
        """Each expert's share of the tokens relative to the mean (1 = balanced) if every domain
        splits evenly over its level-1 experts: the imbalance the placement itself imposes. # [E]"""
        share = (self.quotas[:, None] * self.domain_experts / self.domain_experts.sum(1, keepdims=True)).sum(0)
        return share / share.mean()

    def expected_local_fraction(self, topology):
        """Per dp rank, the share of its tokens sent to experts on its own node if every domain
        splits evenly over its level-1 experts. # [dp]"""
        local = np.asarray([topology.local_expert_mask(r * topology.tp) for r in range(topology.dp)],
                           np.float64)  # [dp, E]
        per_domain = self.domain_experts / self.domain_experts.sum(1, keepdims=True)  # [D, E]
        reads = np.stack([np.bincount(row, minlength=len(self.quotas)) for row in self.slot_domain])  # [dp, D]
        return (reads @ per_domain * local).sum(1) / self.slot_domain.shape[1]

    def remote_units(self, quanta):
        """[dp, E] int64: each (data-parallel rank, expert) pair's remote-tier capacity in units of
        1/quanta of a uniform pair's, from the pair's expected share of the rank's tokens under level 1
        (its domains' samples split evenly over each domain's level-1 experts):
            units = ceil(quanta * E * share),  share = sum_d (samples of d in the rank's batch / B) * mask[d, e] / k_d,
        exact (integer arithmetic). 0 = the rank never routes there (it sends that expert nothing).
        A rank reading one domain of k experts gets quanta * E / k units per expert of that domain.
        Every batch layout of the epoch counts (epoch_layouts): a boundary rank whose slots change
        domain between batches gets the most units of any layout."""
        batch = self.slot_domain.shape[1]
        per_domain = self.domain_experts.sum(1).astype(np.int64)  # [D] k_d
        span = int(np.lcm.reduce(per_domain)) * batch  # common denominator of every share
        units = np.zeros(self.slot_domain.shape[:1] + self.domain_experts.shape[1:], np.int64)  # [dp, E]
        for layout in self.epoch_layouts():
            for r, row in enumerate(layout):
                counts = np.bincount(row, minlength=len(per_domain))  # [D] samples of each domain
                numerator = (counts * (span // batch // per_domain)) @ (self.domain_experts > 0)  # [E] share * span
                units[r] = np.maximum(units[r], -(-(quanta * self.domain_experts.shape[1] * numerator) // span))
        return units

    def lines(self, names=None):
        """Human-readable map for `plan`: one line per domain."""
        out = []
        for d, nodes in enumerate(self.domain_nodes):
            name = names[d] if names is not None else str(d)
            experts = np.nonzero(self.domain_experts[d])[0].tolist()
            mix = f"{int(self.quotas[d])} samples/global batch"
            if self.sizes is not None:
                share = self.slot_domain.size * self.sizes[d] / max(int(np.sum(self.sizes)), 1)
                mix += f" in the mean layout ({share:.2f} on average: the remainder is carried)"
            out.append(f"domain {d} ({name}): {mix}, read on nodes "
                       f"{list(nodes)}, level-1 experts {experts} on nodes {list(self.home_nodes[d])}")
        return out


def units_follow_placement(moe):
    """True when a domain-affine placement sets the remote tier's units (tier_units): two tiers on
    (moe.remote_capacity_factor > 0) and a router with level 1."""
    return moe.remote_capacity_factor > 0 and uses_level1(moe)


def tier_units(moe, placement, tokens_per_group, multiple=1):
    """(units [dp, E], quanta) of the two-tier exchange's remote tier (locmoe.tiers): the placement's
    expected shares (DomainPlacement.remote_units, remote_quanta for the training micro-batch's
    tokens_per_group) when two tiers are on (moe.remote_capacity_factor > 0) and the router uses
    level 1 under a domain-affine placement; else (None, 1): one unit per (rank, remote expert)
    pair. moe: a MoEConfig or an object with its router fields and num_experts; multiple: the rows a
    unit is rounded up to a multiple of (TP in group-wise mode, MoELayer.capacity_multiple)."""
    if placement is None or not units_follow_placement(moe):
        return None, 1
    quanta = remote_quanta(tokens_per_group, placement.domain_experts.shape[1], multiple)
    return placement.remote_units(quanta), quanta


def plan_placement(domain_sizes, topology, batch_size):
    """The domain-affine placement of `topology` for per-rank batch_size B and domain sample counts."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ConfigError("train.batch_size", batch_size, "an integer >= 1")
    dp = topology.dp
    quotas = domain_quotas(domain_sizes, batch_size * dp)
    line = tuple(dp_line(topology))
    slot_domain = layout_of(quotas, line, batch_size)  # [dp, B]
    node_ids = sorted(set(topology.node(r * topology.tp) for r in range(dp)))
    held = np.zeros((len(quotas), len(node_ids)), np.int64)  # [D, nodes] slots of domain d on node
    for r in range(dp):
        column = node_ids.index(topology.node(r * topology.tp))
        held[:, column] += np.bincount(slot_domain[r], minlength=len(quotas))
    expert_node = np.zeros((topology.num_experts, len(node_ids)), np.float64)  # [E, nodes] one-hot
    for column, node in enumerate(node_ids):
        expert_node[topology.experts_of_node(node), column] = 1.0
    read = quotas > 0
    mask = level1_mask(quotas[read], held[read], expert_node, line_starts(topology, slot_domain, node_ids, read))
    domain_experts = np.ones((len(quotas), topology.num_experts), np.float32)  # [D, E]; empty domains: all
    domain_experts[read] = mask
    domain_nodes, home_nodes = [], []
    for d in range(len(quotas)):
        domain_nodes.append(tuple(node_ids[i] for i in np.nonzero(held[d])[0]))
        hosts = domain_experts[d] @ expert_node  # [nodes] experts of d on each node
        home_nodes.append(tuple(node_ids[i] for i in np.nonzero(hosts)[0]))
    return DomainPlacement(slot_domain, quotas, tuple(domain_nodes), tuple(home_nodes), domain_experts,
                           np.asarray(domain_sizes, np.int64), line)


def line_starts(topology, slot_domain, node_ids, read):
    """First start of the search: expert i of a node owns the i-th equal part of the node's
    slots on the line and goes to the domain holding most of that part (ties: lower id); a
    domain left without an expert shares the first expert of the node where it holds most. # [D', E]"""
    index = np.cumsum(read) - 1  # domain id -> row among the non-empty domains
    start = np.zeros((int(read.sum()), topology.num_experts), np.float32)
    line = dp_line(topology)
    held = np.zeros((len(start), len(node_ids)), np.int64)
    for column, node in enumerate(node_ids):
        slots = np.concatenate([slot_domain[r] for r in line if topology.node(r * topology.tp) == node])
        held[:, column] = np.bincount(index[slots], minlength=len(start))
        experts = topology.experts_of_node(node)
        for expert, part in zip(experts, np.array_split(slots, len(experts))):
            part = part if len(part) else slots
            start[int(np.bincount(index[part], minlength=len(start)).argmax()), expert] = 1.0
    for d in np.nonzero(start.sum(1) == 0)[0]:
        node = node_ids[int(held[d].argmax())]
        start[d, topology.experts_of_node(node)[0]] = 1.0
    return start


def placement_key(masks, quotas, held, expert_node):
    """The tuple the search minimises (module docstring), for a batch of masks [M, D, E]:
    four [M] columns, rounded so that float noise never breaks a tie; invalid masks (a domain
    or an expert with nothing) get inf."""
    counts = masks.sum(2)  # [M, D] experts per domain
    valid = (counts > 0).all(1) & (masks.sum(1) > 0).all(1)
    counts = np.maximum(counts, 1)
    total, num_experts = quotas.sum(), masks.shape[2]
    load = (quotas[None, :, None] * masks / counts[:, :, None]).sum(1) / (total / num_experts)  # [M, E] / mean
    hosted = masks @ expert_node  # [M, D, nodes] experts of d on node n
    local = (held[None] * hosted / counts[:, :, None]).sum((1, 2)) / total
    uncovered = ((2 * held[None] * num_experts >= total) & (hosted == 0)).sum((1, 2))
    columns = [np.maximum(load.max(1), BALANCE_TARGET), uncovered.astype(np.float64), -local, (load ** 2).sum(1)]
    return [np.where(valid, np.round(c, 9), np.inf) for c in columns]


def _neighbours(mask):
    """Every single change of `mask` [D, E]: toggle one pair, or move one of a domain's experts. # [M, D, E]"""
    out = []
    for d, e in zip(*np.nonzero(np.ones_like(mask))):
        toggled = mask.copy()
        toggled[d, e] = 1.0 - toggled[d, e]
        out.append(toggled)
        if mask[d, e] == 0:
            for f in np.nonzero(mask[d])[0]:
                moved = toggled.copy()
                moved[d, f] = 0.0
                out.append(moved)
    return np.stack(out)


def _best(candidates, quotas, held, expert_node):
    keys = placement_key(candidates, quotas, held, expert_node)
    first = int(np.lexsort(keys[::-1])[0])  # stable: the first of the smallest
    return candidates[first], [c[first] for c in keys]


def _descend(mask, quotas, held, expert_node):
    """Apply the best single change while one lowers the key. -> (mask, key)"""
    best = [c[0] for c in placement_key(mask[None], quotas, held, expert_node)]
    while True:
        step, key = _best(_neighbours(mask), quotas, held, expert_node)
        if not key < best:
            return mask, best
        mask, best = step, key


def level1_mask(quotas, held, expert_node, line_start):
    """The level-1 mask [D, E] of the non-empty domains (module docstring: the tuple, the search).
    quotas [D]; held [D, nodes] slots read per node; expert_node [E, nodes] one-hot; line_start [D, E]."""
    quotas = np.asarray(quotas, np.float64)
    held = np.asarray(held, np.float64)
    reads = (held @ expert_node.T > 0).astype(np.float32)  # [D, E] every expert of the nodes reading d
    ends = [_descend(start.astype(np.float32), quotas, held, expert_node) for start in (line_start, reads)]
    return min(ends, key=lambda end: end[1])[0]
