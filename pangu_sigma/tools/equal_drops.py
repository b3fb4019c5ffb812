"""Calibrate the remote capacity of the two-tier exchange to a drop-rate target.

With a static-shape exchange the inter-node bytes are set by the remote capacity
(every (rank, remote expert) pair sends its units of u rows, locmoe.tiers), so routers
are compared at equal drops: for each router, the smallest u whose drop rate meets the
target.

Slots are assigned first come first served within a token group, so a
(group, expert) pair that receives n tokens at capacity C drops max(0, n - C) of
them (locmoe.dispatch.assign_slots / assign_tiered_slots). From the routed
counts of a model before capacity, per (batch, group, expert), the drops at any
capacity follow without running the model again. One approximation: a layer's
routing depends on what the layers below it dropped, so the counts of a pilot run
(a generous capacity; evaluate(..., pair_counts=True)) predict, not measure, the drops of the calibrated runs;
compare_routers reports the measured drops of the runs at the chosen capacity.

With moe.reroute_overflow (locmoe.dispatch.reroute_to_local) a token over its pair's slots takes a free slot
of a node-local expert, so a token group drops max(0, L + O - n_l C_l): L its tokens routed to node-local
experts, O its remote tokens over their pairs' slots. Exact when every token may use every node-local expert
(no level 1); with level 1 a lower bound (a token cannot take a local expert its domain does not use).
"""
import math

import numpy as np

from locmoe.capacity import expert_capacity


def drops_at(counts, capacity):
    """Tokens dropped with first-come-first-served slots: sum of max(0, n - C) over the pairs.

    counts [..., G, E] routed tokens per pair; capacity [G, E] (or a scalar) slots per pair."""
    return int(np.maximum(np.asarray(counts, np.int64) - np.asarray(capacity, np.int64), 0).sum())


def remote_slots(local_mask, remote_capacity, units=None):
    """[G, E] tier-2 slots of every pair: units * remote_capacity (locmoe.tiers; units None: one unit
    per remote expert), 0 on the group's node."""
    remote = np.asarray(local_mask) < 0.5
    units = remote.astype(np.int64) if units is None else np.where(remote, np.asarray(units, np.int64), 0)
    return units * int(remote_capacity)


def tier_drop_rates(counts, local_mask, local_capacity, remote_capacity, units=None):
    """Per MoE layer (local-tier drops, remote-tier drops) / routed tokens.

    counts [M, N, G, E] (M layers, N batches); local_mask [G, E] (1: expert on the group's node);
    remote_capacity: the rows of a tier-2 unit, units [G, E] per pair (None: one per remote expert).
    -> (local [M], remote [M]) drop rates."""
    counts = np.asarray(counts, np.int64)
    mask = np.asarray(local_mask) > 0.5  # [G, E]
    slots = remote_slots(mask, remote_capacity, units)  # [G, E]
    local, remote = [], []
    for layer in counts:  # [N, G, E]
        tokens = max(int(layer.sum()), 1)
        local.append(drops_at(np.where(mask, layer, 0), local_capacity) / tokens)
        remote.append(drops_at(np.where(mask, 0, layer), slots) / tokens)
    return np.array(local), np.array(remote)


def rerouted_drop_rates(counts, local_mask, local_capacity, remote_capacity, units=None):
    """Per MoE layer, drops / routed tokens with moe.reroute_overflow: per token group and batch
    max(0, L + O - n_l C_l) (the module docstring). counts [M, N, G, E]; local_mask [G, E]. -> [M]."""
    counts = np.asarray(counts, np.int64)
    mask = np.asarray(local_mask) > 0.5  # [G, E]
    slots = remote_slots(mask, remote_capacity, units)  # [G, E]
    local_tokens = np.where(mask, counts, 0).sum(-1)  # [M, N, G]
    over = np.where(mask, 0, np.maximum(counts - slots, 0)).sum(-1)  # [M, N, G] remote tokens over their slots
    dropped = np.maximum(local_tokens + over - mask.sum(1) * int(local_capacity), 0)  # [M, N, G]
    return dropped.reshape(len(counts), -1).sum(1) / np.maximum(counts.reshape(len(counts), -1).sum(1), 1)


def drop_rates(counts, local_mask, local_capacity, remote_capacity, units=None, reroute=False):
    """Per MoE layer (all drops, remote-tier drops) / routed tokens (tier_drop_rates); with reroute the total
    from rerouted_drop_rates and NaN for the remote tier's part, which the pair counts do not give."""
    if reroute:
        total = rerouted_drop_rates(counts, local_mask, local_capacity, remote_capacity, units)
        return total, np.full_like(total, np.nan)
    local, remote = tier_drop_rates(counts, local_mask, local_capacity, remote_capacity, units)
    return local + remote, remote


def smallest_remote_capacity(counts, local_mask, local_capacity, target_rate, multiple=1, units=None,
                             reroute=False):
    """The smallest tier-2 unit u (a multiple of `multiple`; the per-pair capacity without units) at
    which the predicted drop rate, mean over MoE layers of (local + remote drops) / routed tokens,
    is <= target_rate.

    Returns a dict: capacity (None if no u meets the target: the local tier alone, or tokens routed
    to pairs of 0 units, exceed it), the predicted local / remote / total drop rates (mean over
    layers) at it, and the local tier's at u = 0 without rerouting. reroute: moe.reroute_overflow
    (rerouted_drop_rates; the split is NaN)."""
    counts = np.asarray(counts, np.int64)
    mask = np.asarray(local_mask) > 0.5
    local_rates, _ = tier_drop_rates(counts, mask, local_capacity, 0, units)
    base = {"local_drop_rate": float(local_rates.mean()), "target_rate": float(target_rate)}
    per_unit = remote_slots(mask, 1, units)  # [G, E] units of each pair
    reached = np.where(per_unit > 0, np.where(mask, 0, counts), 0)  # remote tokens to pairs with units
    widest = int(np.max(-(-reached // np.maximum(per_unit, 1)), initial=0))  # no drop in any pair with units
    top = -(-max(widest, 1) // multiple) * multiple
    least, _ = drop_rates(counts, mask, local_capacity, top, units, reroute)  # [M] the least drops any u gets
    if float(least.mean()) > target_rate:
        return dict(base, capacity=None, remote_drop_rate=float("nan"), drop_rate=float("nan"))
    for capacity in range(multiple, top + multiple, multiple):  # drops fall as u grows: first hit is smallest
        every, remote = drop_rates(counts, mask, local_capacity, capacity, units, reroute)
        total = float(every.mean())
        if total <= target_rate:
            return dict(base, capacity=capacity, remote_drop_rate=float(remote.mean()), drop_rate=total,
                        **({"local_drop_rate": float("nan")} if reroute else {}))
    raise AssertionError("unreachable: the widest u met the target above")


def group_rows(local_mask, local_capacity, remote_capacity, units=None):
    """Expert rows of the busiest token group's buffer: n_l * C_l + R * u (R: its tier-2 units; one per
    remote expert without units), what locmoe.layer's two-tier buffer holds per group (S)."""
    mask = np.asarray(local_mask) > 0.5  # [G, E]
    per_unit = remote_slots(mask, 1, units)  # [G, E]
    return int((mask.sum(1) * int(local_capacity) + per_unit.sum(1) * int(remote_capacity)).max())


def smallest_tier_capacities(counts, local_mask, target_rate, multiple=1, units=None, max_local=None,
                             reroute=False):
    """Both tiers sized together: over node-local capacities C_l (multiples of `multiple`, up to the
    busiest local pair's count or max_local), the smallest tier-2 unit u meeting target_rate at each
    (smallest_remote_capacity), and of those the (C_l, u) with the fewest expert rows per group
    (group_rows; ties: the smaller C_l). A router that sends more tokens to its node's experts needs
    fewer remote rows, and its larger local pairs need less headroom each.

    counts [M, N, G, E]; local_mask [G, E]; reroute: moe.reroute_overflow (a remote pair's overflow fills
    the free node-local slots, rerouted_drop_rates). Returns smallest_remote_capacity's dict for the chosen
    pair plus local_capacity and rows, or capacity None when no C_l meets the target."""
    counts = np.asarray(counts, np.int64)
    mask = np.asarray(local_mask) > 0.5
    busiest = int(np.where(mask, counts, 0).max(initial=0))
    top = -(-max(busiest, 1) // multiple) * multiple
    if max_local is not None:
        top = min(top, -(-int(max_local) // multiple) * multiple)
    best = None
    for local_capacity in range(multiple, top + multiple, multiple):
        found = smallest_remote_capacity(counts, mask, local_capacity, target_rate, multiple, units, reroute)
        if found["capacity"] is None:
            continue
        rows = group_rows(mask, local_capacity, found["capacity"], units)
        if best is None or rows < best["rows"]:
            best = dict(found, local_capacity=local_capacity, rows=rows)
    if best is None:
        found = smallest_remote_capacity(counts, mask, top, target_rate, multiple, units, reroute)
        return dict(found, local_capacity=top, rows=None)
    return best


def factor_for_capacity(capacity, tokens_per_group, num_experts):
    """A capacity factor f with expert_capacity(tokens_per_group, f, num_experts) == capacity
    (ec = ceil(T f / E); for a tier-2 unit pass num_experts = E * quanta, locmoe.layer); the exact
    value C E / T, nudged down if float rounding overshoots."""
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
    the tokens per used pair and the busiest pair's tokens. The static exchange sends every
    remote pair its slots whatever it receives, so C_r follows the busiest pairs, not the
    remote tokens' total."""
    counts = np.asarray(counts, np.int64)
    remote = np.asarray(local_mask) < 0.5  # [G, E]
    per_group = [counts[:, :, g][..., remote[g]] for g in range(remote.shape[0])]  # G x [M, N, E - n_l]
    rows = np.stack(per_group, 2)  # [M, N, G, E - n_l]
    tokens = rows.sum(-1)  # [M, N, G]
    used = (rows > 0).sum(-1)
    return {"remote_tokens": float(tokens.mean()), "remote_pairs": int(rows.shape[-1]),
            "used_pairs": float(used.mean()), "tokens_per_used_pair": float(tokens.sum() / max(used.sum(), 1)),
            "busiest_pair": float(rows.max(-1).mean())}
