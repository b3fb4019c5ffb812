"""Expert capacity (sec. 3.2) and Theorem 1's lower bound on it (eqs. 8-9).

`expert_capacity` is the number of buffer slots per (token group, expert):
the paper's ec = ceil(b_s * c_f / (ep * n)) with b_s the tokens of one
group (one device), ep the expert-parallel degree and n the experts per EP
rank, i.e. ep * n = total experts.
"""
import math

from scipy import special

from locmoe.errors import ConfigError


def expert_capacity(tokens_per_group, capacity_factor, num_experts):
    """ec = ceil(tokens * c_f / (ep * n)), with ep * n = num_experts total (at least 1).

    Called inside GRAPH-mode construct on static shapes: keep it free of raises
    (MoEConfig validates capacity_factor).
    """
    return max(1, math.ceil(tokens_per_group * capacity_factor / num_experts))


def _check_bound_args(num_experts, hidden_size, delta):
    if not (isinstance(num_experts, int) and num_experts >= 1):
        raise ConfigError("num_experts", num_experts, "an integer >= 1")
    if not (isinstance(hidden_size, int) and hidden_size >= 2):
        raise ConfigError("hidden_size", hidden_size, "an integer >= 2")
    if not (0 < delta < 1):
        raise ConfigError("delta", delta, "a cosine in (0, 1)")


def p_delta(hidden_size, delta):
    """Lemma 3 (eq. 8): P(|cos(token, w_i)| >= delta) for a uniform unit token in R^d.

    p_delta = 1 - I_{delta^2}(1/2, (d-1)/2), I the regularized incomplete beta.
    """
    _check_bound_args(1, hidden_size, delta)
    return float(special.betaincc(0.5, (hidden_size - 1) / 2.0, delta * delta))


def p_delta_erfc(hidden_size, delta):
    """Large-d form used in eq. 9: erfc(sqrt(delta^2 d / (2 - delta^2)))."""
    _check_bound_args(1, hidden_size, delta)
    return float(special.erfc(math.sqrt(delta * delta * hidden_size / (2.0 - delta * delta))))


def critical_capacity(num_experts, hidden_size, delta, exact=True):
    """Theorem 1: ec_min = 1 / (n * p_delta)  (exact, eq. 15) or 1 / (n * erfc(...)) (eq. 9).

    delta: the minimum cosine between a token and the gate weight of the expert
    it belongs to (about 0.03 in the paper's runs). A capacity below this bound
    leaves some expert without a single class-discriminative token per batch.
    """
    _check_bound_args(num_experts, hidden_size, delta)
    p = p_delta(hidden_size, delta) if exact else p_delta_erfc(hidden_size, delta)
    return 1.0 / (num_experts * p)


def critical_capacity_exp_bound(num_experts, hidden_size, delta):
    """The looser closed form of eq. 9: (1/n) * exp(delta^2 d / (2 - delta^2))."""
    _check_bound_args(num_experts, hidden_size, delta)
    return math.exp(delta * delta * hidden_size / (2.0 - delta * delta)) / num_experts
