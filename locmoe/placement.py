"""Domain-affine placement: which data-parallel ranks read which domains, and which
experts serve each domain (DESIGN section 7; paper sec. 3.2's implied premise).

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

Level 1 (RRE's domain -> expert group): domain d's group is the set of experts
hosted on its home nodes, the nodes whose slots d holds the most of (a domain that
is the majority on no node gets the node where it holds the most slots); then,
while it lowers (largest node load, sum of squared loads), a domain takes one more of the nodes that
read it as a home (greedy; loads assume an even split over a domain's homes). Every
node is home to at least one domain, so no expert is left without tokens; a
domain's tokens read on a node outside its home (the few slots where the cut
between two domains falls inside a node) cross to its home nodes. The expert
load of a node is the sum of its home domains' quotas split over their homes.
"""
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class DomainPlacement:
    """slot_domain [dp, B]: the domain of each batch slot of each dp rank (row = dp rank).
    quotas [D]: samples of each domain per global batch.
    domain_nodes: per domain, the sorted nodes whose ranks read it.
    home_nodes: per domain, the nodes hosting its level-1 experts (a subset of domain_nodes).
    domain_experts [D, E] float32: 1 where the expert sits on a home node of the domain (level 1).
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

    def lines(self, names=None):
        """Human-readable map for `plan`: one line per domain."""
        out = []
        for d, nodes in enumerate(self.domain_nodes):
            name = names[d] if names is not None else str(d)
            experts = np.nonzero(self.domain_experts[d])[0].tolist()
            out.append(f"domain {d} ({name}): {int(self.quotas[d])} samples/global batch, read on nodes "
                       f"{list(nodes)}, level-1 experts {experts} on nodes {list(self.home_nodes[d])}")
        return out


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
    majority = held.argmax(0)  # [nodes] the domain holding most of each node's slots (ties: lower id)
    homes = np.zeros_like(held, dtype=bool)  # [D, nodes]
    homes[majority, np.arange(len(node_ids))] = True
    for d in range(len(quotas)):
        if not homes[d].any() and held[d].any():
            homes[d, int(held[d].argmax())] = True
    homes = _balance_homes(homes, held > 0, quotas)
    domain_nodes, home_nodes = [], []
    domain_experts = np.zeros((len(quotas), topology.num_experts), np.float32)  # [D, E]
    for d in range(len(quotas)):
        domain_nodes.append(tuple(node_ids[i] for i in np.nonzero(held[d])[0]))
        home_nodes.append(tuple(node_ids[i] for i in np.nonzero(homes[d])[0]))
        for node in home_nodes[-1]:
            domain_experts[d, topology.experts_of_node(node)] = 1.0
        if not home_nodes[-1]:  # an empty domain: never read; any expert may serve it
            domain_experts[d] = 1.0
    return DomainPlacement(slot_domain, quotas, tuple(domain_nodes), tuple(home_nodes), domain_experts)


def _node_loads(homes, quotas):
    """Tokens per node per global batch if each domain splits evenly over its homes. # [nodes]"""
    counts = np.maximum(homes.sum(1, keepdims=True), 1)
    return (homes * quotas[:, None] / counts).sum(0)


def _spread(loads):
    return (round(float(loads.max()), 9), round(float((loads ** 2).sum()), 6))


def _balance_homes(homes, reads, quotas):
    """Greedy: add the (domain, node it reads) home that most lowers (largest node load, sum of
    squared loads); homes only grow, so it ends."""
    homes = homes.copy()
    best = _spread(_node_loads(homes, quotas))
    while True:
        move = None
        for d, n in zip(*np.nonzero(reads & ~homes)):
            homes[d, n] = True
            score = _spread(_node_loads(homes, quotas))
            homes[d, n] = False
            if score < best:
                best, move = score, (d, n)
        if move is None:
            return homes
        homes[move] = True
