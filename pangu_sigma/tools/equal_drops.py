"""Calibrate the remote capacity of the two-tier exchange to a drop-rate target.

With a static-shape exchange the inter-node bytes are set by the remote capacity
C_r (every (rank, remote expert) pair sends C_r rows), so routers are compared at
equal drops: for each router, the smallest C_r whose drop rate meets the target.

Slots are assigned first come first served within a token group, so a
(group, expert) pair that receives n tokens at capacity C drops max(0, n - C) of
them (locmoe.dispatch.assign_slots / assign_tiered_slots). From the routed
counts of a model before capacity, per (batch, group, expert), the drops at any
capacity follow without running the model again. One approximation: a layer's
routing depends on what the layers below it dropped, so the counts of a pilot run
(a generous capacity; evaluate(..., pair_counts=True)) predict, not measure, the drops of the calibrated runs;
compare_routers reports the measured drops of the runs at the chosen capacity.
"""
import math

import numpy as np

from locmoe.capacity import expert_capacity


def drops_at(counts, capacity):
    """Tokens dropped with first-come-first-served slots: sum of max(0, n - C) over the pairs.

    counts [..., G, E] routed tokens per pair; capacity [G, E] (or a scalar) slots per pair."""
    return int(np.maximum(np.asarray(counts, np.int64) - np.asarray(capacity, np.int64), 0).sum())


def tier_drop_rates(counts, local_mask, local_capacity, remote_capacity):
    """Per MoE layer (local-tier drops, remote-tier drops) / routed tokens.

    counts [M, N, G, E] (M layers, N batches); local_mask [G, E] (1: expert on the group's node).
    -> (local [M], remote [M]) drop rates."""
    counts = np.asarray(counts, np.int64)
    mask = np.asarray(local_mask) > 0.5  # [G, E]
    local, remote = [], []
    for layer in counts:  # [N, G, E]
        tokens = max(int(layer.sum()), 1)
        local.append(drops_at(np.where(mask, layer, 0), local_capacity) / tokens)
        remote.append(drops_at(np.where(mask, 0, layer), remote_capacity) / tokens)
    return np.array(local), np.array(remote)


def smallest_remote_capacity(counts, local_mask, local_capacity, target_rate, multiple=1):
    """The smallest remote capacity C_r (a multiple of `multiple`) at which the predicted drop rate,
    mean over MoE layers of (local + remote drops) / routed tokens, is <= target_rate.

    Returns a dict: capacity (None if the local tier alone exceeds the target), the predicted
    local / remote / total drop rates (mean over layers) at it, and the same at C_r = 0."""
    counts = np.asarray(counts, np.int64)
    mask = np.asarray(local_mask) > 0.5
    local_rates, _ = tier_drop_rates(counts, mask, local_capacity, 0)
    base = {"local_drop_rate": float(local_rates.mean()), "target_rate": float(target_rate)}
    if local_rates.mean() > target_rate:
        return dict(base, capacity=None, remote_drop_rate=float("nan"), drop_rate=float("nan"))
    widest = int(np.where(mask, 0, counts).max(initial=0))  # no remote drops at this capacity
    top = -(-max(widest, 1) // multiple) * multiple
    for capacity in range(multiple, top + multiple, multiple):  # drops fall as C_r grows: first hit is smallest
        _, remote_rates = tier_drop_rates(counts, mask, local_capacity, capacity)
        total = float((local_rates + remote_rates).mean())
        if total <= target_rate:
            return dict(base, capacity=capacity, remote_drop_rate=float(remote_rates.mean()), drop_rate=total)
    raise AssertionError("unreachable: at the widest remote count no remote token is dropped")


def factor_for_capacity(capacity, tokens_per_group, num_experts):
    """A capacity factor f with expert_capacity(tokens_per_group, f, num_experts) == capacity
    (ec = ceil(T f / E)); the exact value C E / T, nudged down if float rounding overshoots."""
    factor = capacity * num_experts / tokens_per_group
    if expert_capacity(tokens_per_group, factor, num_experts) != capacity:
        factor = math.nextafter(factor, 0.0)
    if expert_capacity(tokens_per_group, factor, num_experts) != capacity:
        raise ValueError(f"no capacity factor gives {capacity} slots for {tokens_per_group} tokens and "
                         f"{num_experts} experts")
    return factor


def remote_spread(counts, local_mask):
    """How a model's remote tokens spread over the remote pairs, the figures that set C_r.

    counts [M, N, G, E]; local_mask [G, E]. Means over (layer, batch, group) of: the tokens a
    group sends to other nodes, the remote pairs it has (E - n_l), those that get any token,
    the tokens per used pair and the busiest pair's tokens. The static exchange pads every
    remote pair to C_r, so C_r follows the busiest pairs, not the remote tokens' total."""
    counts = np.asarray(counts, np.int64)
    remote = np.asarray(local_mask) < 0.5  # [G, E]
    per_group = [counts[:, :, g][..., remote[g]] for g in range(remote.shape[0])]  # G x [M, N, E - n_l]
    rows = np.stack(per_group, 2)  # [M, N, G, E - n_l]
    tokens = rows.sum(-1)  # [M, N, G]
    used = (rows > 0).sum(-1)
    return {"remote_tokens": float(tokens.mean()), "remote_pairs": int(rows.shape[-1]),
            "used_pairs": float(used.mean()), "tokens_per_used_pair": float(tokens.sum() / max(used.sum(), 1)),
            "busiest_pair": float(rows.max(-1).mean())}
