"""MoEConfig: every knob of the MoE layer, validated at construction."""
from dataclasses import dataclass, fields

from locmoe.errors import ConfigError

ROUTERS = ("locmoe", "switch", "hash", "rre")
COMM_BACKENDS = ("auto", "native", "emulated")
A2A_GROUPS = ("ep", "servers")  # MoEConfig.a2a_group


def uses_level1(moe):
    """True when moe.router routes by level 1 (a domain's tokens only reach its group's experts):
    RRE always, LocMoE and Switch with num_domain_groups > 1, Hash never (locmoe.routers.build_router).
    moe: a MoEConfig or any object with router and num_domain_groups."""
    return moe.router == "rre" or (moe.router in ("locmoe", "switch") and moe.num_domain_groups > 1)


def builds_locality_bias(moe):
    """True when LocMoE builds its learned locality bias (locmoe.routers.LocalityBias): the router is LocMoE,
    moe.locality_bias is on and mu > 0 (with mu = 0 nothing would train it). moe: a MoEConfig or any object
    with router, locality_bias and locality_loss_coef."""
    return moe.router == "locmoe" and moe.locality_bias and moe.locality_loss_coef > 0


@dataclass
class MoEConfig:
    """Configuration of one MoE layer (shared by all sparse layers of a model).

    num_experts: total experts n (= expert_num_per_dp_dim * expert_parallel).
    capacity_factor: c_f of ec = ceil(tokens * c_f / (ep * n_local)); with two tiers, the
        capacity of each (source, node-local expert) pair.
    remote_capacity_factor: 0 = one tier (every (source, expert) pair gets the capacity_factor
        slots). > 0 = two-tier exchange (locmoe.exchange, locmoe.tiers): a (source, expert on
        another node) pair gets ceil(tokens * this / n) slots (times its expected share * n,
        in units of 1/Q, under a domain-affine placement with level 1; locmoe.placement.remote_quanta),
        and only those rows cross nodes.
    reroute_overflow: two tiers, beyond the paper: a token over its pair's slots (a remote pair's units or a
        node-local expert's C_l) goes to its best node-local expert with a free slot (gate order, ties as
        LocMoE's) instead of being dropped, and keeps that expert's gate value R (eq. 3). Learned routers
        only (a table router has no order of the other experts).
    router: one of ROUTERS.
    aux_loss_coef: alpha of eq. 5 (0.01 in the paper).
    locality_loss_coef: mu of eq. 6.
    locality_smoothing: epsilon mixed into D_l so that KL(D_c || D_l) is finite.
    locality_bias: LocMoE's learned locality term (locmoe.routers.LocalityBias): one scalar per
        layer added to the routing scores of the experts on the token's node, trained by eqs. 5-6
        only. false: the router decides from the token alone (locality only from the data
        placement and level 1).
    locality_bias_rate: b's step relative to the other parameters'. The stored parameter is theta and
        b = rate * theta with d b / d theta taken as 1 (LocalityBias.value), so Adam, which steps every
        parameter by about the learning rate, moves b `rate` times as fast, and its gradient (what the global
        norm and clipping see) is b's own. b lives in routing-score units (a fraction of a score's spread), far
        above a weight's scale: at rate 1 it rises by the learning rate every step and, in a short run, stops
        where the schedule stops it, not where eq. 5 balances eq. 6 (docs/routing.md).
    num_domain_groups: level-1 groups (RRE; LocMoE keeps level 1 as in the paper). 1 disables it.
    domain_to_group: explicit level-1 map, entry d = the expert group of domain d (groups are
        contiguous blocks of num_experts / num_domain_groups experts). Empty: domain % groups.
        A domain-affine placement (locmoe.placement) replaces it by the experts on the nodes
        serving each domain.
    gate_bias: learned bias epsilon_i of the GrAP gate.
    switch_jitter: multiplicative uniform jitter of the Switch router input in training.
    vocab_size: token-id range of the hash and RRE tables.
    table_seed: seed of the fixed RRE table.
    expert_parallel: EP degree; tokens of ep ranks meet in the All-to-All.
    comm_overlap_degree: chunks of the capacity dimension for compute/comm overlap (two tiers: of C_l
        and of u alike, locmoe.tiers.tier_chunks).
    groupwise_a2a: group-wise All-to-All (EP slice per TP rank, then TP AllGather).
    comm_backend: auto (from the device target), native (HCCL ops) or emulated.
    a2a_group: the communicator of the EP exchange's inter-node AlltoAll(V): "ep" (the EP group) or
        "servers" (every rank of the EP group's servers, zero blocks between ranks of different EP
        groups: same bytes; HCCL's AlltoAll rule on Atlas training, locmoe.hccl_rules).
    """

    num_experts: int = 8
    capacity_factor: float = 1.0
    remote_capacity_factor: float = 0.0
    reroute_overflow: bool = False
    router: str = "locmoe"
    aux_loss_coef: float = 0.01
    locality_loss_coef: float = 0.01
    locality_smoothing: float = 1e-4
    locality_bias: bool = True
    locality_bias_rate: float = 1.0
    num_domain_groups: int = 1
    domain_to_group: tuple = ()
    gate_bias: bool = True
    switch_jitter: float = 0.0
    vocab_size: int = 0
    table_seed: int = 1234
    expert_parallel: int = 1
    comm_overlap_degree: int = 1
    groupwise_a2a: bool = True
    comm_backend: str = "auto"
    a2a_group: str = "ep"

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_dict(cls, values, prefix="moe"):
        """Build from a mapping, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{prefix}.{key}", values[key], f"unknown key; valid keys: {sorted(known)}")
        return cls(**values)

    def validate(self, prefix="moe"):
        def need(ok, name, valid):
            if not ok:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), valid)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        need(is_int(self.num_experts) and self.num_experts >= 1, "num_experts", "an integer >= 1")
        need(is_num(self.capacity_factor) and self.capacity_factor > 0, "capacity_factor", "a number > 0")
        need(is_num(self.remote_capacity_factor) and self.remote_capacity_factor >= 0, "remote_capacity_factor",
             "a number >= 0 (0: one tier, every pair at capacity_factor)")
        need(self.router in ROUTERS, "router", f"one of {list(ROUTERS)}")
        need(isinstance(self.reroute_overflow, bool), "reroute_overflow", "true or false")
        if self.reroute_overflow:
            need(self.remote_capacity_factor > 0, "reroute_overflow",
                 "false with one tier (remote_capacity_factor 0): rerouting fills the node-local tier of two")
            need(self.router in ("locmoe", "switch"), "reroute_overflow",
                 f"false for the {self.router} router (a table router has no gate order to pick a local expert by)")
        need(is_num(self.aux_loss_coef) and self.aux_loss_coef >= 0, "aux_loss_coef", "a number >= 0")
        need(is_num(self.locality_loss_coef) and self.locality_loss_coef >= 0, "locality_loss_coef", "a number >= 0")
        need(is_num(self.locality_smoothing) and 0 < self.locality_smoothing < 1,
             "locality_smoothing", "a number in (0, 1): KL against a distribution with zeros is infinite")
        need(isinstance(self.locality_bias, bool), "locality_bias", "true or false")
        need(is_num(self.locality_bias_rate) and self.locality_bias_rate > 0, "locality_bias_rate", "a number > 0")
        need(is_int(self.num_domain_groups) and self.num_domain_groups >= 1, "num_domain_groups", "an integer >= 1")
        need(self.num_experts % self.num_domain_groups == 0, "num_domain_groups",
             f"a divisor of num_experts={self.num_experts}")
        if isinstance(self.domain_to_group, list):
            self.domain_to_group = tuple(self.domain_to_group)
        need(isinstance(self.domain_to_group, tuple)
             and all(is_int(g) and 0 <= g < self.num_domain_groups for g in self.domain_to_group),
             "domain_to_group", f"a list of group indices in [0, num_domain_groups={self.num_domain_groups}), "
             "one per domain (empty: domain % num_domain_groups)")
        need(isinstance(self.gate_bias, bool), "gate_bias", "true or false")
        need(is_num(self.switch_jitter) and 0 <= self.switch_jitter < 1, "switch_jitter", "a number in [0, 1)")
        need(is_int(self.vocab_size) and self.vocab_size >= 0, "vocab_size", "an integer >= 0")
        if self.router in ("hash", "rre"):
            need(self.vocab_size >= 1, "vocab_size", f"an integer >= 1 (the {self.router} router maps token ids)")
        need(is_int(self.table_seed), "table_seed", "an integer")
        need(is_int(self.expert_parallel) and self.expert_parallel >= 1, "expert_parallel", "an integer >= 1")
        need(self.num_experts % self.expert_parallel == 0, "expert_parallel",
             f"a divisor of num_experts={self.num_experts}")
        need(is_int(self.comm_overlap_degree) and self.comm_overlap_degree >= 1, "comm_overlap_degree",
             "an integer >= 1")
        need(isinstance(self.groupwise_a2a, bool), "groupwise_a2a", "true or false")
        need(self.comm_backend in COMM_BACKENDS, "comm_backend", f"one of {list(COMM_BACKENDS)}")
        need(self.a2a_group in A2A_GROUPS, "a2a_group", f"one of {list(A2A_GROUPS)}")

    @property
    def experts_per_group(self):
        return self.num_experts // self.num_domain_groups
