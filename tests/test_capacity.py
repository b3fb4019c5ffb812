"""Expert capacity and Theorem 1's bound against scipy/math references computed here."""
import math
import os

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import special  # noqa: E402

from locmoe.capacity import (expert_capacity, p_delta, p_delta_erfc, critical_capacity,  # noqa: E402
                             critical_capacity_exp_bound)
from locmoe.errors import ConfigError  # noqa: E402

DIMS = [16, 128, 1024, 5120]
DELTAS = [0.01, 0.03, 0.1, 0.3]
NS = [1, 8, 16]


@pytest.mark.parametrize("tokens,cf,experts,expected", [
    (4096, 1.0, 8, 512),        # 4096 / 8
    (10, 1.25, 4, 4),           # ceil(3.125)
    (10, 1.0, 4, 3),            # ceil(2.5)
    (16, 1.0, 4, 4),            # exact, no rounding up
    (16, 2.0, 4, 8),
    (1, 1.0, 64, 1),            # ceil(1/64) = 1
    (1, 0.01, 64, 1),           # minimum 1
    (0, 1.0, 8, 1),             # minimum 1 even with no tokens
    (2048, 1.1, 128, 18),       # ceil(17.6)
])
def test_expert_capacity_hand_worked(tokens, cf, experts, expected):
    got = expert_capacity(tokens, cf, experts)
    assert got == expected and isinstance(got, int)


def _p_ref(d, delta):
    """Eq. 8 literally: 1 - I_{delta^2}(1/2, (d-1)/2)."""
    return 1.0 - special.betainc(0.5, (d - 1) / 2.0, delta * delta)


def _p_ref_tail(d, delta):
    """Eq. 12's middle form I_{1 - delta^2}((d-1)/2, 1/2): the same number without cancellation."""
    return special.betainc((d - 1) / 2.0, 0.5, 1.0 - delta * delta)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("delta", DELTAS)
def test_p_delta_matches_betainc(d, delta):
    p = p_delta(d, delta)
    assert 0.0 < p < 1.0
    np.testing.assert_allclose(p, _p_ref(d, delta), rtol=0, atol=1e-12)
    np.testing.assert_allclose(p, _p_ref_tail(d, delta), rtol=1e-9, atol=0)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("n", NS)
def test_critical_capacity_exact(n, d, delta):
    ref = 1.0 / (n * _p_ref_tail(d, delta))
    np.testing.assert_allclose(critical_capacity(n, d, delta, exact=True), ref, rtol=1e-9)
    p_plain = _p_ref(d, delta)
    if p_plain > 1e-6:  # the 1 - betainc form is only accurate away from 0
        np.testing.assert_allclose(critical_capacity(n, d, delta, exact=True), 1.0 / (n * p_plain), rtol=1e-6)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("n", NS)
def test_critical_capacity_erfc_and_exp_bound(n, d, delta):
    z2 = delta * delta * d / (2.0 - delta * delta)
    erfc_form = 1.0 / (n * math.erfc(math.sqrt(z2)))
    exp_form = math.exp(z2) / n
    np.testing.assert_allclose(critical_capacity(n, d, delta, exact=False), erfc_form, rtol=1e-9)
    np.testing.assert_allclose(critical_capacity_exp_bound(n, d, delta), exp_form, rtol=1e-9)
    # eq. 9: 1 / (n erfc(z)) > exp(z^2) / n, since erfc(z) < exp(-z^2) for z > 0
    assert critical_capacity_exp_bound(n, d, delta) < critical_capacity(n, d, delta, exact=False)


def test_p_delta_d3_is_one_minus_delta():
    # Archimedes: on the sphere in R^3, x_1 of a uniform point is uniform on [-1, 1]
    for delta in (0.05, 0.3, 0.5, 0.9):
        np.testing.assert_allclose(p_delta(3, delta), 1.0 - delta, rtol=1e-12)


def test_p_delta_monte_carlo_lemma3():
    rng = np.random.default_rng(2024)
    samples = 100_000
    for d in (3, 8, 20):
        g = rng.standard_normal((samples, d))
        x1 = np.abs(g[:, 0] / np.linalg.norm(g, axis=1))  # uniform unit vectors, first coordinate
        for delta in (0.1, 0.3, 0.6):
            p = p_delta(d, delta)
            frac = float((x1 >= delta).mean())
            sigma = math.sqrt(p * (1 - p) / samples)
            assert abs(frac - p) <= 3 * sigma, (d, delta, frac, p, sigma)


@pytest.mark.parametrize("d", [64, 128, 256, 1024, 5120])
@pytest.mark.parametrize("scaled", [0.05, 0.1, 0.5, 1.0, 2.0, 3.0])
def test_erfc_form_relative_error(d, scaled):
    delta = scaled / math.sqrt(d)  # delta * sqrt(d) <= 3
    exact = p_delta(d, delta)
    approx = p_delta_erfc(d, delta)
    np.testing.assert_allclose(approx, math.erfc(math.sqrt(delta * delta * d / (2 - delta * delta))), rtol=1e-12)
    rel = abs(approx - exact) / exact
    assert rel <= (1 + delta * delta * d) / d, (d, delta, rel)


def test_paper_remark_p_near_0_3():
    # Sec. 3.2 / eq. 14: delta ~ 1/sqrt(d) gives p_delta ~ 0.3 for large d (2 * (1 - Phi(1)) = 0.3173)
    for d in (1024, 5120):
        np.testing.assert_allclose(p_delta(d, 1 / math.sqrt(d)), math.erfc(1 / math.sqrt(2)), rtol=2e-3)


@pytest.mark.parametrize("args,field", [
    ((0, 128, 0.1), "num_experts"),
    ((8, 1, 0.1), "hidden_size"),
    ((8, 128, 0.0), "delta"),
    ((8, 128, 1.0), "delta"),
])
def test_bound_argument_errors(args, field):
    with pytest.raises(ConfigError, match=field):
        critical_capacity(*args)
