"""Router losses: load balance (eq. 5) and locality (eq. 6).

Both take token groups [G, T, E]: each group is the token set of one
device (one data-parallel shard), and the loss is averaged over groups, so
a single process holding G groups computes exactly what G devices would.
"""
from mindspore import ops


def load_balance_loss(router_probs, expert_onehot, coef):
    """Eq. 5: alpha * n * sum_i f_i * P_i, per group then averaged.

    router_probs [G, T, E]; expert_onehot [G, T, E] (no gradient through f_i).
    """
    num_experts = router_probs.shape[-1]
    fraction_routed = ops.stop_gradient(expert_onehot.mean(1))  # f_i, [G, E]
    mean_prob = router_probs.mean(1)  # P_i, [G, E]
    return coef * num_experts * (fraction_routed * mean_prob).sum(-1).mean()


def localized_distribution(local_mask, smoothing):
    """D_l of eq. 6: all mass on node-local experts, smoothed by epsilon so KL stays finite.

    local_mask [G, E] (1 = expert hosted on this group's node):
    D_l = (1 - eps) * mask / |local| + eps / E.
    """
    num_experts = local_mask.shape[-1]
    local_share = local_mask / local_mask.sum(-1, keepdims=True)
    return (1.0 - smoothing) * local_share + smoothing / num_experts


def locality_loss(router_probs, local_mask, coef, smoothing):
    """Eq. 6: mu * KL(D_c || D_l), per group then averaged.

    D_c = mean router probability over the group's tokens (differentiable
    stand-in for the assignment distribution); D_l from localized_distribution.
    router_probs [G, T, E]; local_mask [G, E].
    """
    current = router_probs.mean(1)  # D_c, [G, E]
    target = localized_distribution(local_mask, smoothing)  # D_l, [G, E]
    kl = (current * (ops.log(current + 1e-20) - ops.log(target))).sum(-1)  # [G]
    return coef * kl.mean()
