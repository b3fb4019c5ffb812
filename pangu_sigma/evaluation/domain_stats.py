"""Per-domain evaluation sums (numpy only): perplexity, tokens, drops and expert load by domain.

Every sample carries a domain id (meta.json's `domains` names them). The
accumulator sums, per domain, the token cross-entropy and each MoE layer's
routing counts; the overall figures are the sums over domains, so the overall
mean CE is the token-weighted mean of the per-domain CEs and the overall
perplexity is the token-weighted geometric mean of the per-domain ones:

    ln ppl = sum_d (n_d / n) ln ppl_d,   n = sum_d n_d.
"""
import math

import numpy as np


def domain_name(names, domain_id):
    """meta.json's name of a domain id, or domain<id> when the list has none."""
    return names[domain_id] if 0 <= domain_id < len(names) else f"domain{domain_id}"


def token_local(expert_index, local_mask, per_group):
    """Whether each token went to an expert local to its token group's rank.

    expert_index [N] (tokens in batch order, N = G * per_group), local_mask [G, E] -> [N] bool.
    """
    expert_index = np.asarray(expert_index, np.int64).reshape(-1)
    group = np.arange(expert_index.size) // per_group  # [N]
    return np.asarray(local_mask)[group, expert_index] > 0.5


class DomainAccumulator:
    """Sums per domain: tokens, CE, and per MoE layer expert load [M, E], dropped [M], local [M]."""

    def __init__(self, names, num_layers, num_experts):
        self.names = list(names)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.sums = {}

    def _entry(self, domain_id):
        if domain_id not in self.sums:
            self.sums[domain_id] = {"tokens": 0, "nll": 0.0,
                                    "load": np.zeros((self.num_layers, self.num_experts), np.int64),
                                    "dropped": np.zeros(self.num_layers, np.int64),
                                    "local": np.zeros(self.num_layers, np.int64)}
        return self.sums[domain_id]

    def add(self, nll, domain_ids, routing=(), rows=None):
        """One batch.

        nll [B, S] per-token cross-entropy; domain_ids [B]; routing: per MoE layer
        (expert_index [B*S], keep [B*S] bool, local [B*S] bool) in batch order;
        rows [B] bool: the samples to count (None: all). Returns the batch's
        counted sums (load [M, E], dropped [M], local [M]) over all domains.
        """
        nll = np.asarray(nll, np.float64)
        batch, seq = nll.shape
        domain_ids = np.asarray(domain_ids, np.int64).reshape(batch)
        rows = np.ones(batch, bool) if rows is None else np.asarray(rows, bool).reshape(batch)
        token_domain = np.repeat(domain_ids, seq)  # [B*S]
        token_rows = np.repeat(rows, seq)  # [B*S]
        batch_sums = (np.zeros((self.num_layers, self.num_experts), np.int64), np.zeros(self.num_layers, np.int64),
                      np.zeros(self.num_layers, np.int64))
        for d in np.unique(domain_ids[rows]):
            entry = self._entry(int(d))
            mine = rows & (domain_ids == d)  # [B]
            entry["tokens"] += int(mine.sum()) * seq
            entry["nll"] += float(nll[mine].sum())
            tokens = token_rows & (token_domain == d)  # [B*S]
            for m, (expert_index, keep, local) in enumerate(routing):
                expert_index = np.asarray(expert_index).reshape(-1)[tokens]
                load = np.bincount(expert_index, minlength=self.num_experts)
                dropped = int((~np.asarray(keep, bool).reshape(-1)[tokens]).sum())
                near = int(np.asarray(local, bool).reshape(-1)[tokens].sum())
                entry["load"][m] += load
                entry["dropped"][m] += dropped
                entry["local"][m] += near
                batch_sums[0][m] += load
                batch_sums[1][m] += dropped
                batch_sums[2][m] += near
        return batch_sums

    def result(self):
        """{'overall': figures, 'domains': {name: figures}} (see `figures`), domains in id order."""
        domains = {domain_name(self.names, d): figures(**self.sums[d]) for d in sorted(self.sums)}
        if not self.sums:
            return {"overall": figures(0, 0.0, np.zeros((self.num_layers, self.num_experts)),
                                       np.zeros(self.num_layers), np.zeros(self.num_layers)), "domains": {}}
        total = {key: sum(self.sums[d][key] for d in self.sums) for key in ("tokens", "nll", "load", "dropped",
                                                                              "local")}
        return {"overall": figures(**total), "domains": domains}


def figures(tokens, nll, load, dropped, local):
    """Mean CE, perplexity and per-layer routing figures of summed counts.

    load [M, E] tokens routed to each expert; dropped [M], local [M] token counts.
    """
    load = np.asarray(load, np.float64)
    ce = nll / tokens if tokens else float("nan")
    return {"tokens": int(tokens), "ce": ce, "perplexity": math.exp(ce) if tokens else float("nan"),
            "expert_load": load.tolist(), "dropped": np.asarray(dropped).tolist(),
            "local": np.asarray(local).tolist(), "layers": layer_figures(load, dropped, local)}


def rerouted_tokens(expert_index, keep, pair_slots):
    """Tokens kept although their routed (group, expert) pair was full: rerouted to a node-local expert
    (moe.reroute_overflow). expert_index [G, T], keep [G, T] bool, pair_slots [G, E] the slots of each pair
    (C_l on the group's node, units * u elsewhere). A token overflows when its place in its pair's queue
    (first come first served, token order) is >= the pair's slots. -> [G, T] bool."""
    expert_index = np.asarray(expert_index)
    onehot = expert_index[..., None] == np.arange(np.asarray(pair_slots).shape[1])  # [G, T, E]
    place = ((np.cumsum(onehot, 1) - 1) * onehot).sum(-1)  # [G, T]
    limit = np.take_along_axis(np.asarray(pair_slots), expert_index, 1)  # [G, T]
    return np.asarray(keep, bool) & (place >= limit)


def pair_counts_of(expert_index, num_experts):
    """expert_index [G, T] (the expert each token was routed to) -> routed tokens per pair [G, E]."""
    expert_index = np.asarray(expert_index)
    groups = expert_index.shape[0]
    flat = expert_index.reshape(groups, -1) + num_experts * np.arange(groups)[:, None]  # [G, T]
    return np.bincount(flat.reshape(-1), minlength=groups * num_experts).reshape(groups, num_experts)


def layer_figures(load, dropped, local):
    """Per MoE layer: max/mean expert load, the smallest expert's share, drop rate and local fraction."""
    load = np.asarray(load, np.float64)
    out = []
    for m in range(load.shape[0]):
        routed = load[m].sum()
        share = load[m] / max(routed, 1e-300)
        out.append({"max_over_mean": float(share.max() * load.shape[1]) if routed else float("nan"),
                    "min_share": float(share.min()) if routed else float("nan"),
                    "drop_rate": float(dropped[m] / routed) if routed else float("nan"),
                    "local_fraction": float(local[m] / routed) if routed else float("nan")})
    return out


def mean_over_layers(layers, key):
    values = [layer[key] for layer in layers]
    return float(np.mean(values)) if values else float("nan")


def domain_table(result, title="per domain"):
    """Text table: one row per domain and one overall: tokens, CE, perplexity and the routing figures
    (mean over MoE layers of max/mean load, drop % and local %)."""
    rows = [f"{title}:", f"{'domain':<12} {'tokens':>9} {'CE':>8} {'ppl':>10} {'max/mean':>9} {'drop%':>7} "
                         f"{'local%':>7}"]
    entries = list(result["domains"].items()) + [("overall", result["overall"])]
    for name, fig in entries:
        layers = fig["layers"]
        rows.append(f"{name:<12} {fig['tokens']:>9,} {fig['ce']:>8.4f} {fig['perplexity']:>10.3f} "
                    f"{mean_over_layers(layers, 'max_over_mean'):>9.3f} "
                    f"{100 * mean_over_layers(layers, 'drop_rate'):>7.2f} "
                    f"{100 * mean_over_layers(layers, 'local_fraction'):>7.2f}")
    return "\n".join(rows)
