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

Expected gradient: every global batch holds exactly q_d samples of domain d, drawn
without replacement from a fresh permutation of that domain per epoch, so each
sample of domain d is in a given batch with probability q_d / n_d and the batch
loss (a mean over all tokens of the global batch) has the expectation of the
i.i.d. batch, sum_d (n_d / N) E_d[loss], up to the rounding of q_d (|q_d - B dp
n_d / N| < 1 sample per batch). Only which rank holds which sample changes, and
the gradient reduction sums over ranks, so the update is the i.i.d. one.

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


def dp_line(topology):
    """Data-parallel ranks sorted by node (then by dp rank): the order of the line. # [dp]"""
    return sorted(range(topology.dp), key=lambda d: (topology.node(d * topology.tp), d))


BALANCE_TARGET = 1.1  # imposed max/mean expert load below which coverage and locality decide
# Remote-tier granularity: a unit is 1/Q of a uniform (1/E share) pair's capacity. Finer units fit each
# pair's share more closely (ceil(Q E share) rounds up by less than a unit), but a unit has fewer rows
# (u = ceil(T f_r / (Q E))), so u's own rounding moves every pair's capacity in coarser steps. Q is the
# largest of 8, 4, 2, 1 that leaves a unit >= MIN_UNIT_ROWS rows at f_r = 1 (steps of <= 1/8 of a unit):
# Q = 8 at the cluster configs' T / E = 256, Q = 2 at cpu_tiny's 16 (Q = 8 there left 2-row units and
# 50% capacity steps, which the Hash baseline's 1/16 steps did not have).
MAX_QUANTA, MIN_UNIT_ROWS = 8, 8


def remote_quanta(tokens_per_group, num_experts):
    """Q for a token group of tokens_per_group tokens over num_experts experts (see above)."""
    quanta = MAX_QUANTA
    while quanta > 1 and tokens_per_group < MIN_UNIT_ROWS * quanta * num_experts:
        quanta //= 2
    return quanta


@dataclass(frozen=True)
class DomainPlacement:
    """slot_domain [dp, B]: the domain of each batch slot of each dp rank (row = dp rank).
    quotas [D]: samples of each domain per global batch.
    domain_nodes: per domain, the sorted nodes whose ranks read it.
    home_nodes: per domain, the sorted nodes hosting at least one of its level-1 experts.
    domain_experts [D, E] float32: 1 where domain d may use expert e (level 1).
    """

    slot_domain: np.ndarray
    quotas: np.ndarray
    domain_nodes: tuple
    home_nodes: tuple
    domain_experts: np.ndarray

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
        A rank reading one domain of k experts gets quanta * E / k units per expert of that domain."""
        batch = self.slot_domain.shape[1]
        per_domain = self.domain_experts.sum(1).astype(np.int64)  # [D] k_d
        span = int(np.lcm.reduce(per_domain)) * batch  # common denominator of every share
        units = np.zeros(self.slot_domain.shape[:1] + self.domain_experts.shape[1:], np.int64)  # [dp, E]
        for r, row in enumerate(self.slot_domain):
            counts = np.bincount(row, minlength=len(per_domain))  # [D] samples of each domain
            numerator = (counts * (span // batch // per_domain)) @ (self.domain_experts > 0)  # [E] share * span
            units[r] = -(-(quanta * self.domain_experts.shape[1] * numerator) // span)
        return units

    def lines(self, names=None):
        """Human-readable map for `plan`: one line per domain."""
        out = []
        for d, nodes in enumerate(self.domain_nodes):
            name = names[d] if names is not None else str(d)
            experts = np.nonzero(self.domain_experts[d])[0].tolist()
            out.append(f"domain {d} ({name}): {int(self.quotas[d])} samples/global batch, read on nodes "
                       f"{list(nodes)}, level-1 experts {experts} on nodes {list(self.home_nodes[d])}")
        return out


def units_follow_placement(moe):
    """True when a domain-affine placement sets the remote tier's units (tier_units): two tiers on
    (moe.remote_capacity_factor > 0) and a router with level 1."""
    return moe.remote_capacity_factor > 0 and uses_level1(moe)


def tier_units(moe, placement, tokens_per_group):
    """(units [dp, E], quanta) of the two-tier exchange's remote tier (locmoe.tiers): the placement's
    expected shares (DomainPlacement.remote_units, remote_quanta for the training micro-batch's
    tokens_per_group) when two tiers are on (moe.remote_capacity_factor > 0) and the router uses
    level 1 under a domain-affine placement; else (None, 1): one unit per (rank, remote expert)
    pair. moe: a MoEConfig or an object with its router fields and num_experts."""
    if placement is None or not units_follow_placement(moe):
        return None, 1
    quanta = remote_quanta(tokens_per_group, placement.domain_experts.shape[1])
    return placement.remote_units(quanta), quanta


def plan_placement(domain_sizes, topology, batch_size):
    """The domain-affine placement of `topology` for per-rank batch_size B and domain sample counts."""
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ConfigError("train.batch_size", batch_size, "an integer >= 1")
    dp = topology.dp
    quotas = domain_quotas(domain_sizes, batch_size * dp)
    line_domains = np.repeat(np.arange(len(quotas)), quotas)  # [dp*B] domain of each slot on the line
    slot_domain = np.zeros((dp, batch_size), np.int64)  # [dp, B]
    for position, d in enumerate(dp_line(topology)):
        slot_domain[d] = line_domains[position * batch_size:(position + 1) * batch_size]
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
    return DomainPlacement(slot_domain, quotas, tuple(domain_nodes), tuple(home_nodes), domain_experts)


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
