"""Log formatting: one line per step, and the per-layer expert-load table."""
import json
import os

import numpy as np


def step_line(step, total_steps, metrics, tokens_per_s, show_scale):
    """One log line: step, loss terms, lr, grad norm, throughput (loss scale on fp16 runs)."""
    line = (f"step {step:>6d}/{total_steps} | loss {metrics['loss']:.4f} | ce {metrics['ce']:.4f} | "
            f"aux {metrics['aux']:.4f} | loc {metrics['loc']:.4f} | lr {metrics['lr']:.3e} | "
            f"gnorm {metrics['grad_norm']:.3f} | tok/s {tokens_per_s:,.0f}")
    if show_scale:
        line += f" | scale {metrics['loss_scale']:.0f}{' OVERFLOW(skipped)' if metrics['overflow'] else ''}"
    return line


def expert_table(load, dropped, local, first_layer=0, title="expert load", rank_tokens=None):
    """Per-layer table: share of routed tokens per expert, max/mean load, drop rate (all, and of
    the tokens bound for other nodes: the remote tier), node-local fraction (mean over the
    data-parallel ranks, and the lowest and highest rank); then the local fraction by rank.

    load [M, E] token counts; dropped [M] or [M, 2] (node-local, remote) or [M, 3] (with the tokens
    rerouted to a node-local expert, moe.reroute_overflow: a rer% column) and local [M] or
    [M, P] (per rank) token counts. rank_tokens [P]: the tokens each rank routed (default: every rank
    routes the same number, as in training), the denominator of the rank's local fraction.
    """
    load = np.asarray(load, np.float64)
    if load.size == 0:
        return f"{title}: the model has no MoE layers"
    dropped, local = np.asarray(dropped, np.float64), np.asarray(local, np.float64)
    tiers = dropped.ndim == 2  # without the split by tier the remote-tier column is n/a
    rerouted = dropped[:, 2] if tiers and dropped.shape[1] > 2 else None  # [M]
    dropped = dropped[:, :2] if tiers else np.stack([dropped, np.zeros_like(dropped)], 1)  # [M, 2]
    local = local if local.ndim == 2 else local[:, None]  # [M, P]
    layers, experts = load.shape
    ranks = local.shape[1]
    routed = np.maximum(load.sum(1), 1.0)  # [M]
    share = load / routed[:, None]
    if rank_tokens is None:
        per_rank = routed[:, None] / ranks  # [M, 1] every rank routes the same number of tokens
    else:
        per_rank = np.maximum(np.asarray(rank_tokens, np.float64), 1.0)[None, :]  # [1, P] each rank's own
    by_rank = local / per_rank  # [M, P] local fraction of each rank
    head = ("layer " + " ".join(f"{f'e{e}':>6}" for e in range(experts))
            + "  max/mean   drop%  dropR%" + ("    rer%" if rerouted is not None else "")
            + "  local%  (min..max over ranks)")
    rows = [f"{title} (share of routed tokens per expert; dropR: dropped tokens bound for other nodes; "
            + ("rer: kept at a node-local expert other than the routed one; " if rerouted is not None else "")
            + f"local: routed to its rank's node, {ranks} rank(s)):", head]
    for m in range(layers):
        cells = " ".join(f"{s:6.3f}" for s in share[m])
        max_over_mean = share[m].max() * experts
        rows.append(f"{first_layer + m:>5} {cells}  {max_over_mean:8.3f}  {100 * dropped[m].sum() / routed[m]:6.2f}"
                    f"  {f'{100 * dropped[m, 1] / routed[m]:6.2f}' if tiers else '   n/a'}"
                    + (f"  {100 * rerouted[m] / routed[m]:6.2f}" if rerouted is not None else "")
                    + f"  {100 * local[m].sum() / routed[m]:6.2f}"
                    f"  ({100 * by_rank[m].min():.2f}..{100 * by_rank[m].max():.2f})")
    if ranks > 1:
        rows.append("local% by rank: " + "; ".join(
            f"layer {first_layer + m}: " + " ".join(f"{100 * f:.1f}" for f in by_rank[m]) for m in range(layers)))
    return "\n".join(rows)


class JsonlLog:
    """Append-only machine-readable log (one JSON object per line) for reports and the simulator."""

    def __init__(self, path, fresh=False):
        """fresh: a new run; an older log at path is kept as path + '.prev'."""
        self.path = path
        if fresh and os.path.exists(path):
            os.replace(path, path + ".prev")

    def write(self, record):
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
