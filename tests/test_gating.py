"""GrAP gate (eq. 4) against a weight built here from the paper's formula."""
import os

os.environ.setdefault("GLOG_v", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from locmoe.errors import ConfigError  # noqa: E402
from locmoe.gating import GrAPGate, DenseGate, grap_weight  # noqa: E402
from np_reference import eq4_weight  # noqa: E402


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")


@pytest.mark.parametrize("n,d", [(1, 4), (2, 8), (4, 16), (8, 64), (4, 4)])
def test_grap_weight_matches_eq4(n, d):
    w = grap_weight(n, d)
    assert w.shape == (n, d)
    np.testing.assert_allclose(w, eq4_weight(n, d), rtol=0, atol=1e-7)


@pytest.mark.parametrize("n,d", [(2, 8), (4, 16), (8, 64)])
def test_grap_rows_orthogonal_with_exact_values(n, d):
    w = grap_weight(n, d).astype(np.float64)
    # each row: exactly d/n entries equal to n/d, all others 0, blocks contiguous
    for i in range(n):
        nz = np.nonzero(w[i])[0]
        assert list(nz) == list(range(i * d // n, (i + 1) * d // n))
        np.testing.assert_allclose(w[i, nz], n / d, rtol=1e-6)
    gram = w @ w.T
    # (d/n) * (n/d)^2 = n/d on the diagonal, 0 off it
    np.testing.assert_allclose(gram, np.eye(n) * (n / d), rtol=1e-6, atol=1e-12)
    # columns: every feature feeds exactly one expert
    assert np.all((w != 0).sum(0) == 1)


@pytest.mark.parametrize("use_bias", [True, False])
def test_grap_gate_equals_dense_layer(use_bias):
    n, d, t = 4, 16, 10
    rng = np.random.default_rng(0)
    gate = GrAPGate(d, n, use_bias)
    b = rng.normal(size=n).astype(np.float32)
    if use_bias:
        gate.bias.set_data(Tensor(b))
    else:
        assert gate.bias is None
    x = rng.normal(size=(t, d)).astype(np.float32)
    out = gate(Tensor(x)).asnumpy()
    ref = x.astype(np.float64) @ eq4_weight(n, d).T + (b if use_bias else 0.0)
    assert out.shape == (t, n)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_grap_gate_has_no_learned_weight():
    gate = GrAPGate(16, 4, True)
    assert [p.name for p in gate.trainable_params()] == ["bias"]
    assert len(GrAPGate(16, 4, False).trainable_params()) == 0


def test_dense_gate_is_x_wt():
    rng = np.random.default_rng(1)
    gate = DenseGate(8, 3, init_std=0.5)
    w = gate.weight.asnumpy()
    assert w.shape == (3, 8)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(gate(Tensor(x)).asnumpy(), x @ w.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,d", [(3, 16), (8, 12), (5, 7)])
def test_grap_weight_refuses_indivisible_hidden(n, d):
    with pytest.raises(ConfigError) as info:
        grap_weight(n, d)
    msg = str(info.value)
    assert "hidden_size" in msg and str(d) in msg and "\n" not in msg
    assert info.value.field == "hidden_size" and info.value.value == d
    with pytest.raises(ConfigError, match="hidden_size"):
        GrAPGate(d, n)
