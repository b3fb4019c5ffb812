"""Capture what each MoE layer's router sees and decides, and the cosine statistics of sec. 4.1.

`capture_routing(cfg, checkpoint)` runs a split of the prepared data through a
trained model (GRAPH mode) and records, for every sparse block, the router
input (the float32 LayerNorm output `block.ln_ffn(x)` that the MoE layer
receives), the expert each token is routed to and whether it was kept within
capacity. It does not re-implement the model: it walks `model.blocks` and calls
the model's own cells in the order `PanguSigmaModel.construct` does (embedding,
dense blocks, then for a sparse block `self_attention`, `ln_ffn`, the MoE layer,
`add_branch`), and it asks the layer's own router cell for the decision, with
the same token grouping and capacity as `MoELayer.construct`, in training's
layout (eval's batches and token groups: in cluster scope each group routes as
its data-parallel rank, with its own node's experts local). So the hidden
states and the routing are those of the trained network, and the layer's
output feeds the next block exactly as in training.

Gate weights (figure 9, Theorem 1's delta): LocMoE's is the fixed GrAP matrix
of eq. 4 (`locmoe.gating.grap_weight`; the learned bias epsilon_i is not part
of the weight direction), Switch's is the learned dense gate. Hash and RRE
route by a token-id table and have no gate weight: `gate_weights` refuses them.

The cosine helpers below are plain numpy and take arrays, so they can be fed
hand-built tokens (tests) as well as captured ones.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from locmoe.capacity import expert_capacity
from locmoe.errors import ConfigError
from locmoe.gating import grap_weight

GATED_ROUTERS = ("locmoe", "switch")
DEFAULT_MAX_TOKENS = 32768
DEFAULT_QUANTILE = 0.01


# ---------------------------------------------------------------- cosine statistics (numpy only)
def unit_rows(x):
    """Rows scaled to unit L2 norm (zero rows stay zero). [N, d] float64"""
    x = np.asarray(x, np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def gate_cosines(tokens, weights):
    """cos(token_m, w_i) for every token and expert: tokens [N, d], weights [E, d] -> [N, E]."""
    return unit_rows(tokens) @ unit_rows(weights).T


def chosen_cosines(tokens, weights, expert_index):
    """cos between each token and the gate weight of the expert it was routed to. [N]"""
    expert_index = np.asarray(expert_index, np.int64)
    cos = gate_cosines(tokens, weights)  # [N, E]
    return cos[np.arange(len(expert_index)), expert_index]


@dataclass
class DeltaEstimate:
    """delta of Theorem 1 estimated from real routing (figure 9).

    delta is the `quantile` quantile of the chosen-expert cosine (Assumption 3
    asks for the minimum cosine of a token to its expert; the minimum of a
    finite sample is an outlier, so a low quantile stands in for it; quantile=0
    gives the sample minimum).
    """
    delta: float
    quantile: float
    mean: float
    median: float
    minimum: float
    maximum: float
    tokens: int
    nonpositive_fraction: float

    def as_dict(self):
        return dict(self.__dict__)


def estimate_delta(tokens, weights, expert_index, quantile=DEFAULT_QUANTILE):
    """DeltaEstimate from tokens [N, d], gate weights [E, d] and the chosen experts [N]."""
    if not 0.0 <= quantile < 1.0:
        raise ConfigError("quantile", quantile, "a number in [0, 1) (0 = the minimum cosine)")
    cos = chosen_cosines(tokens, weights, expert_index)
    if cos.size == 0:
        raise ConfigError("tokens", 0, "at least one routed token")
    return DeltaEstimate(delta=float(np.quantile(cos, quantile)), quantile=float(quantile),
                         mean=float(cos.mean()), median=float(np.median(cos)), minimum=float(cos.min()),
                         maximum=float(cos.max()), tokens=int(cos.size),
                         nonpositive_fraction=float((cos <= 0).mean()))


def pair_cosines(tokens, expert_index, i, j, max_tokens=300, rng=None):
    """Cosine similarities between tokens routed to expert i and tokens routed to expert j (figure 8).

    At most max_tokens tokens of each expert are sampled; for i == j the self-pairs
    (cosine 1) are left out. Returns a flat array (empty if an expert got no token).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    expert_index = np.asarray(expert_index)

    def pick(e):
        rows = np.flatnonzero(expert_index == e)
        if len(rows) > max_tokens:
            rows = np.sort(rng.choice(rows, max_tokens, replace=False))
        return rows

    a, b = pick(i), pick(j)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0)
    cos = unit_rows(tokens[a]) @ unit_rows(tokens[b]).T  # [|a|, |b|]
    if i == j:
        return cos[~np.eye(len(a), dtype=bool)]
    return cos.reshape(-1)


def token_consistency(token_ids, expert_index, groups=None):
    """How much the routing is a function of the token id: over the ids that occur at least twice, the
    share of their occurrences routed to the id's most frequent (modal) expert. 1 for a token-id table
    (Hash; RRE within a domain); a router that reads the context sends some occurrences elsewhere.
    groups [N] (e.g. the node that routed each token): the same within each group, an id in two groups
    counting as two ids (a router that keeps tokens on their node sends one id to each node's experts).
    token_ids, expert_index: [N]. Returns {"modal_share", "ids", "occurrences"} (share None if no id repeats)."""
    token_ids = np.asarray(token_ids, np.int64).reshape(-1)
    expert_index = np.asarray(expert_index, np.int64).reshape(-1)
    if token_ids.shape != expert_index.shape:
        raise ValueError(f"token_ids {token_ids.shape} and expert_index {expert_index.shape}: one expert per token")
    if groups is not None:
        groups = np.asarray(groups, np.int64).reshape(-1)
        if groups.shape != token_ids.shape:
            raise ValueError(f"groups {groups.shape} and token_ids {token_ids.shape}: one group per token")
    if token_ids.size == 0:
        return {"modal_share": None, "ids": 0, "occurrences": 0}
    if groups is not None:
        token_ids = groups * (int(token_ids.max()) + 1) + token_ids  # one key per (group, id)
    width = int(expert_index.max()) + 1
    pairs, pair_counts = np.unique(token_ids * width + expert_index, return_counts=True)  # (id, expert) pairs
    _, first = np.unique(pairs // width, return_index=True)  # pairs are sorted by id: each id's pairs are a run
    totals = np.add.reduceat(pair_counts, first)  # [ids] occurrences of each id
    modal = np.maximum.reduceat(pair_counts, first)  # [ids] occurrences at its modal expert
    repeated = totals >= 2
    occurrences = int(totals[repeated].sum())
    share = float(modal[repeated].sum() / occurrences) if occurrences else None
    return {"modal_share": share, "ids": int(repeated.sum()), "occurrences": occurrences}


# ---------------------------------------------------------------- capture from a model
@dataclass
class LayerCapture:
    block: int                      # index in model.blocks
    tokens: np.ndarray              # [N, d] float32 router input (LayerNorm output)
    expert_index: np.ndarray        # [N] int32 chosen expert
    keep: np.ndarray                # [N] bool: within capacity
    gate_weight: np.ndarray = None  # [E, d] or None (table routers)


@dataclass
class RoutingCapture:
    router: str
    num_experts: int
    hidden_size: int
    capacity: int                    # slots per expert per token group, as in the forward
    tokens_per_group: int
    group_masks: np.ndarray          # [G, E] bool: the experts on the node of each token group's (virtual) rank
    token_group: np.ndarray          # [N] int: the token group each captured token was routed in
    scope: str = "rank"              # eval_layout's: cluster (a group per data-parallel rank), rank or single
    layers: list = field(default_factory=list)
    token_ids: np.ndarray = None     # [N]
    split: str = "valid"

    @property
    def has_gate(self):
        return self.router in GATED_ROUTERS

    def token_node(self):
        """[N] int: the node of each captured token's group, numbered in the order of the groups (groups with the
        same node-local experts share one)."""
        first = {}
        node_of_group = np.array([first.setdefault(row.tobytes(), len(first)) for row in self.group_masks])  # [G]
        return node_of_group[self.token_group]

    def token_local(self, layer):
        """[N] bool: each captured token of `layer` went to an expert on its token group's node."""
        return self.group_masks[self.token_group, layer.expert_index]


def gate_weights(router_cell, router_name, num_experts, hidden_size):
    """[E, d] gate weight whose rows are the expert directions; ConfigError for table routers."""
    if router_name == "locmoe":
        return grap_weight(num_experts, hidden_size)
    if router_name == "switch":
        return router_cell.gate.weight.asnumpy().astype(np.float32)
    raise ConfigError("moe.router", router_name,
                      "locmoe or switch: the hash and rre routers map token ids through a table and have "
                      "no gate weight to measure a cosine against")


def load_trained_model(cfg, checkpoint_path):
    """(PanguSigmaModel with the checkpoint's weights, dataset meta), in eval mode, GRAPH mode set; built as
    eval builds it (pangu_sigma.evaluation.eval.build_eval_net): training's token groups (in cluster scope
    one per data-parallel rank, each with its own node's experts as local) and eval's capacity factor."""
    import mindspore as ms
    from pangu_sigma.build import dataset_meta, set_device
    from pangu_sigma.evaluation.eval import build_eval_net, eval_capacity_factor, eval_layout

    meta = dataset_meta(cfg)
    set_device(cfg, ms.GRAPH_MODE)
    net = build_eval_net(cfg, meta, eval_layout(cfg), eval_capacity_factor(cfg)[0], checkpoint_path,
                         check=False)  # any layout, merged on the fly; the config is the one the user names
    net.set_train(False)
    return net.model, meta


def layer_capacity(layer, tokens_per_group):
    """Slots per expert the MoE layer uses for groups of tokens_per_group tokens: the layer's own
    rule when it has one (e.g. eq. ec rounded up for overlap chunks), else eq. ec."""
    rule = getattr(layer, "capacity", None)
    if callable(rule):
        return int(rule(tokens_per_group))
    return expert_capacity(tokens_per_group, layer.capacity_factor, layer.num_experts)


def capture_cell(model):
    """A Cell: (token_ids [B, S], domain_ids [B]) -> per sparse block (router input [B*S, d], expert
    index [B*S], keep [B*S]); the model's own cells in PanguSigmaModel.construct's order, each MoE
    layer's own grouping, router and slot assignment (MoELayer.route)."""
    from mindspore import nn

    class CaptureNet(nn.Cell):
        def __init__(self, model):
            super().__init__(auto_prefix=False)
            self.model = model

        def construct(self, token_ids, domain_ids):
            _, routes = self.model.forward_routes(token_ids, domain_ids)
            out = ()
            for normed, expert_index, keep in routes:
                out = out + ((normed.reshape(-1, normed.shape[-1]), expert_index.reshape(-1),
                              keep.reshape(-1)),)  # [B*S, d], [G*T], [G*T]
            return out

    return CaptureNet(model)


def capture_batch(model, input_ids, domain_ids, cell=None):
    """One batch: per sparse block (block index, router input [B*S, d], expert index [B*S] int32,
    keep [B*S] bool). input_ids [B, S] int32, domain_ids [B] int32."""
    from mindspore import Tensor

    cell = cell or capture_cell(model)
    outs = cell(Tensor(np.asarray(input_ids, np.int32)), Tensor(np.asarray(domain_ids, np.int32)))
    first = model.dense_layer_num
    return [(first + j, normed.asnumpy(), idx.asnumpy().astype(np.int32), keep.asnumpy() > 0.5)
            for j, (normed, idx, keep) in enumerate(outs)]


def capture_routing(cfg, checkpoint_path, split="valid", batch_size=None, max_tokens=DEFAULT_MAX_TOKENS,
                    model=None):
    """RoutingCapture of every MoE layer over (the first max_tokens tokens of) a split, routed as eval
    routes it (pangu_sigma.evaluation.eval.routing_plan): training's batches and token groups, so in cluster
    scope every group routes as its data-parallel rank, with that rank's node-local experts (a learned
    locality bias pulls each group to its own node) and, under the domain-affine placement, its domains.

    batch_size: per data-parallel rank (default training's micro-batch), so that capacity, and hence
    dropping, is that of training; only batches without filler samples are used. model: an already
    loaded PanguSigmaModel, built as load_trained_model builds it (skips loading).
    """
    from pangu_sigma.build import dataset_meta
    from pangu_sigma.data.dataset import load_split
    from pangu_sigma.evaluation.eval import eval_layout, routing_plan

    if cfg.model.moe_layer_num == 0:
        raise ConfigError("model.moe_layer_num", 0, "at least 1 sparse layer to capture routing from")
    if not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise ConfigError("--max-tokens", max_tokens, "an integer >= 1")
    if model is None:
        model, _ = load_trained_model(cfg, checkpoint_path)
    layout = eval_layout(cfg)
    input_ids, domain_ids = load_split(cfg.data.dataset_dir, split)  # [N, S+1], [N]
    if len(input_ids) == 0:
        raise ConfigError("split", split, "a split with at least one sample")
    plan, global_batch, _ = routing_plan(cfg, dataset_meta(cfg), layout, domain_ids, batch_size)
    plan = [rows for rows, counted in plan if counted.all()] or [plan[0][0]]  # a split shorter than one batch:
    seq = input_ids.shape[1] - 1                                               # its filler samples too
    batches = max(1, min(len(plan), math.ceil(max_tokens / (global_batch * seq))))
    first_ffn = model.blocks[model.dense_layer_num].ffn
    if first_ffn.token_groups != layout["token_groups"]:
        raise ValueError(f"model routes {first_ffn.token_groups} token groups; the config's layout has "
                         f"{layout['token_groups']} (build it with load_trained_model)")
    groups, per_group = layout["token_groups"], global_batch * seq // layout["token_groups"]
    cell = capture_cell(model)
    pieces, ids_seen = None, []
    for rows in plan[:batches]:
        result = capture_batch(model, input_ids[rows, :-1], domain_ids[rows], cell)
        if pieces is None:
            pieces = [(blk, [], [], []) for blk, *_ in result]
        for (_, toks, idx, keep), (_, normed, e, k) in zip(pieces, result):
            toks.append(normed)
            idx.append(e)
            keep.append(k)
        ids_seen.append(input_ids[rows, :-1].reshape(-1))
    router_name = cfg.moe.router
    cap = RoutingCapture(router=router_name, num_experts=cfg.num_experts, hidden_size=cfg.model.hidden_size,
                         capacity=layer_capacity(first_ffn, per_group), tokens_per_group=per_group,
                         group_masks=first_ffn.local_mask.asnumpy() > 0.5,  # [G, E]
                         token_group=np.tile(np.repeat(np.arange(groups), per_group), batches),  # [N]
                         scope=layout["scope"], token_ids=np.concatenate(ids_seen), split=split)
    for blk, toks, idx, keep in pieces:
        layer = model.blocks[blk].ffn
        weight = (gate_weights(layer.router, router_name, cfg.num_experts, cfg.model.hidden_size)
                  if router_name in GATED_ROUTERS else None)
        cap.layers.append(LayerCapture(block=blk, tokens=np.concatenate(toks), expert_index=np.concatenate(idx),
                                       keep=np.concatenate(keep), gate_weight=weight))
    return cap


def layer_stats(capture_layer, num_experts, token_local):
    """Load per expert, drop rate and local fraction of one captured layer; token_local [N] bool: each token
    went to an expert on its own token group's node (RoutingCapture.token_local)."""
    idx = capture_layer.expert_index
    load = np.bincount(idx, minlength=num_experts).astype(np.int64)
    routed = max(1, len(idx))
    return {"load": load, "drop_rate": float((~capture_layer.keep).sum() / routed),
            "local_fraction": float(np.asarray(token_local).sum() / routed)}
