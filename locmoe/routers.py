"""The four top-1 routers, one result type for all.

Every router maps token groups to experts:
    construct(x [G, T, d] float32, token_ids [G, T] int32,
              domain_ids [G, T] int32, local_mask [G, E] float32)
    -> RouterOutput fields, as a plain tuple (GRAPH mode):
       expert_index [G, T] int32   the chosen expert (eq. 2)
       expert_prob  [G, T] float32 its gate probability R (eq. 3); 1 for table routers
       router_probs [G, T, E]      the routing distribution (one-hot for table routers); for LocMoE
                                   with its locality bias, the biased one that eqs. 5-6 see
       aux_loss     []             eq. 5 (0 for table routers)
       loc_loss     []             eq. 6 (LocMoE only, else 0)
       gate_probs   [G, T, E] float32 the gate distribution R is read from (eq. 3): router_probs without
                                   LocMoE's locality bias (equal to it for every other router); the
                                   layer reads the R of a token it reroutes from it (moe.reroute_overflow)
Adding a router touches this file only.
"""
from collections import namedtuple

import heapq
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from locmoe.gating import GrAPGate, DenseGate
from locmoe.losses import load_balance_loss, locality_loss
from locmoe.config import builds_locality_bias, uses_level1
from locmoe.errors import ConfigError
from locmoe.selection import MASKED, top1_index

RouterOutput = namedtuple("RouterOutput", "expert_index expert_prob router_probs aux_loss loc_loss gate_probs")


def domain_group_mask(num_experts, num_groups):
    """Level-1 routing (PanGu-Sigma RRE): [groups, E], 1 where expert e belongs to group g."""
    per_group = num_experts // num_groups
    mask = np.zeros((num_groups, num_experts), np.float32)
    for g in range(num_groups):
        mask[g, g * per_group:(g + 1) * per_group] = 1.0
    return mask


def level1_domain_experts(cfg, domain_experts=None):
    """Level-1 routing as a [D, E] float32 mask (row d: experts domain d may use), or None (no level 1).

    domain_experts: a mask from a placement (locmoe.placement), used as given.
    Else cfg.domain_to_group maps domain d to a contiguous block of experts_per_group
    experts; with an empty map, domain d uses group d % num_domain_groups.
    Routers index the mask with domain % D, so a full map is the identity.
    """
    if domain_experts is not None:
        mask = np.asarray(domain_experts, np.float32)
        if mask.ndim != 2 or mask.shape[1] != cfg.num_experts or (mask.sum(1) < 1).any():
            raise ConfigError("domain_experts", mask.shape,
                              f"a [domains, {cfg.num_experts}] 0/1 mask with at least one expert per domain")
        return mask
    if cfg.num_domain_groups == 1:
        return None
    groups = domain_group_mask(cfg.num_experts, cfg.num_domain_groups)  # [groups, E]
    if not cfg.domain_to_group:
        return groups
    return groups[np.asarray(cfg.domain_to_group, np.int64)]  # [D, E]


def balanced_hash_table(token_counts, num_experts):
    """Hash layer table (Roller et al. 2021): token id -> expert with near-equal token load.

    Seen tokens, in decreasing frequency (ties by id), each go to the expert
    with the least token load so far (longest-processing-time greedy). Unseen
    ids (count 0) then go to the expert holding the fewest ids, so a token
    missing from the counted corpus does not always land on one expert.
    token_counts [V] int -> table [V] int32.
    """
    counts = np.asarray(token_counts, np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))
    seen = [t for t in order if counts[t] > 0]
    unseen = [t for t in order if counts[t] <= 0]
    table = np.zeros(len(counts), np.int32)
    held = np.zeros(num_experts, np.int64)
    by_load = [(0, e) for e in range(num_experts)]  # (token load, expert)
    for token in seen:
        load, expert = heapq.heappop(by_load)
        table[token] = expert
        held[expert] += 1
        heapq.heappush(by_load, (load + int(counts[token]), expert))
    by_ids = [(int(held[e]), e) for e in range(num_experts)]  # (ids held, expert)
    heapq.heapify(by_ids)
    for token in unseen:
        count, expert = heapq.heappop(by_ids)
        table[token] = expert
        heapq.heappush(by_ids, (count + 1, expert))
    return table


def random_table(vocab_size, num_choices, seed):
    """RRE level 2: a fixed random token id -> index in [0, num_choices) table."""
    return np.random.RandomState(seed).randint(0, num_choices, size=vocab_size).astype(np.int32)


def _top1(router_probs, tie_break=None):
    """Top-1 (eq. 2) -> (expert index [G, T], its probability [G, T]). tie_break [G, T, E]: the tie order
    among experts sharing the largest probability (locmoe.selection.top1_index)."""
    expert_index = top1_index(router_probs, tie_break)  # [G, T]
    expert_prob = ops.gather_elements(router_probs, -1, expert_index.expand_dims(-1)).squeeze(-1)  # [G, T]
    return expert_index, expert_prob


TIE_MODULUS = 1021  # a prime: for E <= 1021 experts almost every token gets a strict order of the experts


def tie_order(token_ids, num_experts):
    """LocMoE's tie order [G, T, E] float32 (larger wins among experts tied at the top probability):
    ((61 t + 1) mod p) * (97 e + 13) mod p, p = 1021, a per-token permutation of the experts
    (multiplication by a token-dependent factor mod a prime). A function of the token alone: any
    pull to local experts comes from the learned locality bias (LocalityBias), not from the tie rule."""
    experts = ops.arange(num_experts, dtype=ms.int32) * 97 + 13  # [E]
    factor = (token_ids.astype(ms.int32) * 61 + 1) % TIE_MODULUS  # [G, T]
    return ((factor.expand_dims(-1) * experts) % TIE_MODULUS).astype(ms.float32)  # [G, T, E]


class _LearnedRouter(nn.Cell):
    """Shared tail of the learned routers: softmax over (masked) scores, top-1, losses."""

    def __init__(self, cfg, domain_experts=None):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.aux_coef = cfg.aux_loss_coef
        mask = level1_domain_experts(cfg, domain_experts)
        self.level1 = mask is not None
        self.num_level1_rows = 1 if mask is None else len(mask)
        self.group_mask = Tensor(np.ones((1, cfg.num_experts), np.float32) if mask is None else mask)  # [D, E]

    def _route(self, scores, domain_ids, tie_break=None, local_bias=None, local_mask=None):
        """scores [G, T, E] -> (expert_index, expert_prob, router_probs, aux, gate_probs).

        local_bias [1] (LocMoE's locality bias b) and local_mask [G, E]: b is added to the node-local experts'
        scores of the routing distribution (top-1, eqs. 5-6) only; the gate value R of eq. 3 that scales the
        expert's output is the softmax of the scores without it, so b decides where a token goes, not how much
        of the expert's output it keeps (the task loss does not train it)."""
        allowed = None
        if self.level1:
            allowed = ops.gather(self.group_mask, domain_ids % self.num_level1_rows, 0)  # [G, T, E]
            scores = scores + (1.0 - allowed) * MASKED
        gate_probs = ops.softmax(scores, -1)  # [G, T, E]
        router_probs = gate_probs
        if local_bias is not None:
            # the mask centred on the token's allowed experts (a per-token shift: softmax and top-1 unchanged), so
            # where every allowed expert is local (a domain whose level-1 experts are all on the node) b's gradient
            # is exactly 0, not rounding noise that Adam would turn into steps of about lr
            mask = local_mask.expand_dims(1)  # [G, 1, E]
            if allowed is None:
                centre = mask.mean(axis=-1, keep_dims=True)  # [G, 1, 1]
            else:
                centre = (mask * allowed).sum(-1, keepdims=True) / allowed.sum(-1, keepdims=True)  # [G, T, 1]
            router_probs = ops.softmax(scores + local_bias * (mask - centre), -1)  # [G, T, E]
        expert_index, _ = _top1(router_probs, None if tie_break is None else ops.stop_gradient(tie_break))
        expert_prob = ops.gather_elements(gate_probs, -1, expert_index.expand_dims(-1)).squeeze(-1)  # [G, T]
        onehot = ops.one_hot(expert_index, self.num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        aux = load_balance_loss(router_probs, onehot, self.aux_coef)
        return expert_index, expert_prob, router_probs, aux, gate_probs


class LocalityBias(nn.Cell):
    """LocMoE's learned locality term: one scalar b per MoE layer, added to the routing scores of the
    experts on the node where the token is processed (local_mask [G, E], the only per-rank part).

    The gate stays replicated and layout-free (b is one shared parameter, replicated like the gate
    bias), but the routing decision now depends on where the token is, through a term that eq. 6 can
    move: summed over data-parallel ranks, d(sum_g KL(D_c^g || D_l^g))/db = sum_g sum_t sum_i
    (log(D_c,i^g / D_l,i^g) + 1) p_ti (m_gi - pi_t) / T, pi_t = sum_j p_tj m_gj (the token's local
    mass), which does not cancel over ranks because each rank's m_g moves its own tokens; its
    D_l part is -log(D_l,local / D_l,remote) * pi_t (1 - pi_t) per token, always pushing b up. The
    per-group aux loss (eq. 5) pushes back once a group's load piles onto its node's experts
    ("local experts compete with skilled experts"). With mu = 0 the router has no such term (there is
    nothing to train it: eq. 5 alone would leave Adam stepping b by +-lr on rounding-level gradients,
    and a b of either sign decides the ReLU's zero-score ties). b only routes: the gate value R of
    eq. 3 comes from the unbiased scores (docs/routing.md).
    """

    def __init__(self, rate=1.0):
        super().__init__()
        self.rate = float(rate)
        self.bias = Parameter(Tensor(np.zeros(1, np.float32)), name="bias")  # [1], theta: b = rate * theta

    def value(self):
        """b = rate * theta, with d b / d theta = 1 (theta + stop_gradient((rate - 1) theta)): the optimizer sees
        b's gradient and, Adam stepping theta by about the learning rate, b moves `rate` times as fast
        (moe.locality_bias_rate)."""
        if self.rate == 1.0:
            return self.bias
        return self.bias + ops.stop_gradient(self.bias * (self.rate - 1.0))  # [1]


class LocMoERouter(_LearnedRouter):
    """LocMoE: G = ReLU(GrAP(x) + eps) (eq. 4), softmax, top-1; aux (eq. 5) + locality (eq. 6) losses;
    with moe.locality_bias, a learned locality bias b on the node-local experts' routing scores
    (LocalityBias) that eq. 6 trains, so the router learns locality on any data.

    The ReLU gives every expert whose pre-activation is <= 0 the same score 0, so a token can have
    several experts at the top probability. argmax alone sends all of them to the lowest allowed
    index (and the aux loss, with no gradient through the ReLU there, cannot undo it); such ties are
    spread over the tied experts by the token id instead (tie_order). The order is a function of
    integers only, so every layout (TP, EP, one process) breaks a tie the same way; breaking it by
    the pre-activation did not (float rounding of x differs between layouts and flips near-equal
    negative pre-activations).
    """

    def __init__(self, cfg, hidden_size, domain_experts=None):
        super().__init__(cfg, domain_experts)
        self.gate = GrAPGate(hidden_size, cfg.num_experts, cfg.gate_bias)
        self.locality = LocalityBias(cfg.locality_bias_rate) if builds_locality_bias(cfg) else None
        self.loc_coef = cfg.locality_loss_coef
        self.smoothing = cfg.locality_smoothing

    def construct(self, x, token_ids, domain_ids, local_mask):
        pre = self.gate(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)  # [G, T, E]
        ties = tie_order(token_ids, self.num_experts)  # [G, T, E]
        bias = None if self.locality is None else self.locality.value()  # [1]
        expert_index, expert_prob, router_probs, aux, gate_probs = self._route(
            ops.relu(pre), domain_ids, tie_break=ties, local_bias=bias, local_mask=local_mask)
        loc = locality_loss(router_probs, local_mask, self.loc_coef, self.smoothing)
        return expert_index, expert_prob, router_probs, aux, loc, gate_probs


class SwitchRouter(_LearnedRouter):
    """Switch Transformer: softmax(W x), top-1, aux loss; optional multiplicative jitter in training."""

    def __init__(self, cfg, hidden_size, init_std=0.02, domain_experts=None):
        super().__init__(cfg, domain_experts)
        self.gate = DenseGate(hidden_size, cfg.num_experts, init_std)
        self.jitter = cfg.switch_jitter

    def construct(self, x, token_ids, domain_ids, local_mask):
        if self.training and self.jitter > 0:
            x = x * ops.uniform(x.shape, Tensor(1.0 - self.jitter, ms.float32), Tensor(1.0 + self.jitter, ms.float32))
        scores = self.gate(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], x.shape[1], -1)  # [G, T, E]
        expert_index, expert_prob, router_probs, aux, gate_probs = self._route(scores, domain_ids)
        return expert_index, expert_prob, router_probs, aux, ops.zeros((), ms.float32), gate_probs


class _TableRouter(nn.Cell):
    """A fixed token-id table; no learned parameters, gate probability 1."""

    def __init__(self, num_experts, table):
        super().__init__()
        self.num_experts = num_experts
        # Stored with the model (a checkpoint carries it), never trained.
        self.table = Parameter(Tensor(table, ms.int32), name="table", requires_grad=False)

    def _finish(self, expert_index):
        router_probs = ops.one_hot(expert_index, self.num_experts, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
        expert_prob = ops.ones(expert_index.shape, ms.float32)
        zero = ops.zeros((), ms.float32)
        return expert_index, expert_prob, router_probs, zero, zero, router_probs


class HashRouter(_TableRouter):
    """Hash layer: expert = table[token id], the table balanced by token frequency."""

    def __init__(self, cfg, token_counts=None):
        counts = np.ones(cfg.vocab_size, np.int64) if token_counts is None else np.asarray(token_counts)
        if counts.shape != (cfg.vocab_size,):
            raise ConfigError("token_counts", counts.shape, f"one count per token id, shape ({cfg.vocab_size},)")
        super().__init__(cfg.num_experts, balanced_hash_table(counts, cfg.num_experts))

    def construct(self, x, token_ids, domain_ids, local_mask):
        return self._finish(ops.gather(self.table, token_ids, 0))  # [G, T]


class RRERouter(_TableRouter):
    """PanGu-Sigma RRE: level 1 domain -> expert group, level 2 fixed random token id -> expert in the group.

    Groups are rows of the level-1 mask (level1_domain_experts); with groups of unequal
    size (a placement) the level-2 table draws in [0, L), L = lcm of the group sizes, and
    a token goes to member (table[token] mod size) of its domain's group, which for equal
    blocks is PanGu-Sigma's table[token] in [0, experts_per_group).
    """

    def __init__(self, cfg, domain_experts=None):
        mask = level1_domain_experts(cfg, domain_experts)
        mask = np.ones((1, cfg.num_experts), np.float32) if mask is None else mask  # [D, E]
        sizes = mask.sum(1).astype(np.int64)  # [D]
        width = int(sizes.max())
        members = np.zeros((len(mask), width), np.int32)  # [D, K] experts of each group, padded
        for d, row in enumerate(mask):
            experts = np.nonzero(row)[0]
            members[d, :len(experts)] = experts
        span = int(np.lcm.reduce(sizes))
        super().__init__(cfg.num_experts, random_table(cfg.vocab_size, span, cfg.table_seed))
        self.rows = len(mask)
        self.width = width
        self.members = Tensor(members.reshape(-1))  # [D*K]
        self.sizes = Tensor(sizes.astype(np.int32))  # [D]

    def construct(self, x, token_ids, domain_ids, local_mask):
        domain = domain_ids % self.rows  # [G, T]
        member = ops.gather(self.table, token_ids, 0) % ops.gather(self.sizes, domain, 0)  # [G, T]
        return self._finish(ops.gather(self.members, domain * self.width + member, 0))


def build_router(cfg, hidden_size, token_counts=None, init_std=0.02, domain_experts=None):
    """The router named by cfg.router. token_counts feeds the hash table (uniform if None).

    domain_experts: a [D, E] level-1 mask from a placement for the routers with level 1
    (LocMoE and Switch when num_domain_groups > 1, RRE always); the hash router has none.
    """
    level1 = domain_experts if uses_level1(cfg) else None
    if cfg.router == "locmoe":
        return LocMoERouter(cfg, hidden_size, level1)
    if cfg.router == "switch":
        return SwitchRouter(cfg, hidden_size, init_std, level1)
    if cfg.router == "hash":
        return HashRouter(cfg, token_counts)
    if cfg.router == "rre":
        return RRERouter(cfg, domain_experts)
    raise ConfigError("moe.router", cfg.router, "one of locmoe, switch, hash, rre")
