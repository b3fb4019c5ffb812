"""Ranks -> nodes; TP / DP / EP / expert-data-parallel groups; expert placement.

Layout (Megatron-style, TP innermost so a TP group never leaves a node):
    rank = dp_rank * tp + tp_rank
    ep_rank = dp_rank % ep          (EP groups: ep consecutive DP ranks)
    edp_rank = dp_rank // ep        (expert data parallel: same ep_rank)
Expert e is held by every rank whose ep_rank == e // (num_experts / ep).
A node is a set of ranks (from the rank table, or consecutive blocks of
devices_per_node); the experts local to a node are those held by its ranks.

A single process may pose as any rank of any cluster ("virtual topology"):
routing, locality loss and byte accounting then behave as on that rank.
"""
from dataclasses import dataclass, field

from locmoe.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    world_size: int = 1
    tp: int = 1
    ep: int = 1
    num_experts: int = 1
    devices_per_node: int = 8
    rank: int = 0
    node_of_rank: tuple = field(default=None)  # explicit rank -> node id (from a rank table)

    def __post_init__(self):
        def need(ok, name, value, valid):
            if not ok:
                raise ConfigError(name, value, valid)

        need(self.world_size >= 1, "world_size", self.world_size, "an integer >= 1")
        need(self.tp >= 1 and self.world_size % self.tp == 0, "op_level_model_parallel_num", self.tp,
             f"a divisor of world_size={self.world_size}")
        dp = self.world_size // self.tp
        need(self.ep >= 1 and dp % self.ep == 0, "expert_parallel", self.ep,
             f"a divisor of dp={dp} (world_size {self.world_size} / tp {self.tp})")
        need(self.num_experts % self.ep == 0, "expert_parallel", self.ep,
             f"a divisor of num_experts={self.num_experts}")
        need(0 <= self.rank < self.world_size, "rank", self.rank, f"in [0, {self.world_size})")
        if self.node_of_rank is None:
            need(self.devices_per_node >= 1, "devices_per_node", self.devices_per_node, "an integer >= 1")
            object.__setattr__(self, "node_of_rank",
                               tuple(r // self.devices_per_node for r in range(self.world_size)))
        else:
            need(len(self.node_of_rank) == self.world_size, "node_of_rank", len(self.node_of_rank),
                 f"one node id per rank ({self.world_size})")
            object.__setattr__(self, "node_of_rank", tuple(self.node_of_rank))
        for r in range(0, self.world_size, self.tp):
            nodes = {self.node_of_rank[q] for q in range(r, r + self.tp)}
            need(len(nodes) == 1, "op_level_model_parallel_num", self.tp,
                 f"TP groups must stay inside one node; ranks {r}..{r + self.tp - 1} span nodes {sorted(nodes)}")

    # ---- sizes and coordinates -------------------------------------------------
    @property
    def dp(self):
        return self.world_size // self.tp

    @property
    def experts_per_rank(self):
        return self.num_experts // self.ep

    @property
    def nodes(self):
        return len(set(self.node_of_rank))

    def tp_rank(self, rank=None):
        return (self.rank if rank is None else rank) % self.tp

    def dp_rank(self, rank=None):
        return (self.rank if rank is None else rank) // self.tp

    def ep_rank(self, rank=None):
        return self.dp_rank(rank) % self.ep

    def node(self, rank=None):
        return self.node_of_rank[self.rank if rank is None else rank]

    # ---- groups (lists of global ranks, sorted) -------------------------------
    def tp_group(self, rank=None):
        r = self.rank if rank is None else rank
        base = r - r % self.tp
        return list(range(base, base + self.tp))

    def dp_group(self, rank=None):
        return list(range(self.tp_rank(rank), self.world_size, self.tp))

    def ep_group(self, rank=None):
        d = self.dp_rank(rank)
        first = d - d % self.ep
        return [(first + i) * self.tp + self.tp_rank(rank) for i in range(self.ep)]

    def expert_dp_group(self, rank=None):
        d = self.dp_rank(rank)
        return [q * self.tp + self.tp_rank(rank) for q in range(d % self.ep, self.dp, self.ep)]

    def all_groups(self, kind):
        """Distinct groups of one kind ('tp', 'dp', 'ep', 'edp') over the world."""
        fn = {"tp": self.tp_group, "dp": self.dp_group, "ep": self.ep_group, "edp": self.expert_dp_group}[kind]
        return self.distinct_groups(fn)

    def distinct_groups(self, group_of):
        """The distinct values of group_of(rank) over the world's ranks, in order of first appearance."""
        seen = []
        for r in range(self.world_size):
            g = group_of(r)
            if g not in seen:
                seen.append(g)
        return seen

    # ---- expert placement -----------------------------------------------------
    def experts_of_rank(self, rank=None):
        first = self.ep_rank(rank) * self.experts_per_rank
        return list(range(first, first + self.experts_per_rank))

    def experts_of_node(self, node):
        held = set()
        for r in range(self.world_size):
            if self.node_of_rank[r] == node:
                held.update(self.experts_of_rank(r))
        return sorted(held)

    def local_experts(self, rank=None):
        """Experts hosted on the node of `rank` (reached without leaving the node)."""
        return self.experts_of_node(self.node(rank))

    def local_expert_mask(self, rank=None):
        local = set(self.local_experts(rank))
        return [1.0 if e in local else 0.0 for e in range(self.num_experts)]

    def is_intra_node(self, src, dst):
        return self.node_of_rank[src] == self.node_of_rank[dst]

    def check_hccl(self, device_of_rank=None):
        """ConfigError naming the first group that breaks HCCL's Ascend 910A rules (locmoe.hccl_rules)."""
        from locmoe.hccl_rules import check_topology
        check_topology(self, device_of_rank)


def single_process(num_experts):
    """The trivial topology: one rank holding every expert."""
    return Topology(world_size=1, tp=1, ep=1, num_experts=num_experts, devices_per_node=1)
