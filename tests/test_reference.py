"""Validate the NumPy oracle ``numba_cnn.reference`` itself: against PyTorch (when installed)
and against central finite differences."""
import numpy as np
import pytest

from numba_cnn import reference as R

from _conv_cases import CASES, CASE_IDS, ConvCase, assert_close, expected_out_hw, make_inputs, \
    torch_conv2d

RTOL = 1e-10


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_torch(case, rng, torch_mod):
    x, w, b, g = make_inputs(case, rng)
    y_t, gx_t, gw_t, gb_t = torch_conv2d(torch_mod, case, x, w, b, g)

    y = R.conv2d(x, w, b, **case.kwargs)
    assert y.dtype == np.float64
    assert y.shape == (case.N, case.F) + expected_out_hw(case)
    assert_close(y, y_t, RTOL, "forward")

    gx, gw, gb = R.conv2d_backward(g, x, w, need_bias=True, **case.kwargs)
    assert_close(gx, gx_t, RTOL, "grad_x")
    assert_close(gw, gw_t, RTOL, "grad_weight")
    if gb_t is not None:
        assert_close(gb, gb_t, RTOL, "grad_bias")
    assert R.conv2d_backward(g, x, w, need_bias=False, **case.kwargs)[2] is None


def test_reference_tiny_by_hand():
    # A 1x1x3x3 input with a 2x2 kernel, stride 1, no padding, worked out by hand.
    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    w = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = R.conv2d(x, w, bias=np.array([0.5]))
    # y[i, j] = x[i,j] + 2 x[i,j+1] + 3 x[i+1,j] + 4 x[i+1,j+1] + 0.5
    expected = np.array([[0 + 2 + 9 + 16, 1 + 4 + 12 + 20], [3 + 8 + 18 + 28, 4 + 10 + 21 + 32]])
    np.testing.assert_array_equal(y[0, 0], expected + 0.5)
    # padding "same" with an even kernel pads bottom/right only (PyTorch convention): the top-left
    # output therefore equals the unpadded one.
    y_same = R.conv2d(x, w, padding="same")
    assert y_same.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(y_same[0, 0, :2, :2], expected)
    assert y_same[0, 0, 2, 2] == 8.0  # only x[2,2]*w[0,0]; the other taps hit padding


# Tiny shapes for finite differences: a handful of geometries exercising each feature.
FD_CASES = [
    ConvCase(2, 2, 5, 4, 2, 3, 2, stride=(2, 1), padding=1),
    ConvCase(1, 4, 5, 5, 4, 2, 2, groups=2, padding="same", dilation=2),
    ConvCase(2, 3, 6, 5, 3, 2, 1, stride=3, groups=3, dilation=(1, 1), padding=(1, 0)),
    ConvCase(1, 2, 4, 6, 3, 2, 3, dilation=(1, 2), padding="valid"),
]


def _fd_grad(loss, arr, eps):
    """Central finite differences of the scalar ``loss()`` w.r.t. every entry of ``arr``
    (modified in place and restored)."""
    grad = np.zeros_like(arr)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        plus = loss()
        flat[i] = orig - eps
        minus = loss()
        flat[i] = orig
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("case", FD_CASES, ids=[f"fd{i}" for i in range(len(FD_CASES))])
def test_reference_backward_finite_differences(case, rng):
    x, w, b, g = make_inputs(case._replace(bias=True), rng)

    def loss():
        return float(np.sum(R.conv2d(x, w, b, **case.kwargs) * g))

    gx, gw, gb = R.conv2d_backward(g, x, w, need_bias=True, **case.kwargs)
    eps = 1e-5
    # The loss is linear in each argument, so central differences are exact up to rounding.
    for name, arr, analytic in (("x", x, gx), ("weight", w, gw), ("bias", b, gb)):
        numeric = _fd_grad(loss, arr, eps)
        assert_close(analytic, numeric, 1e-7, f"grad_{name}")
        assert np.max(np.abs(numeric)) > 0.1  # the check is not vacuous


def test_reference_batch_zero():
    x = np.zeros((0, 3, 5, 5))
    w = np.ones((4, 3, 3, 3))
    y = R.conv2d(x, w, np.ones(4), padding=1)
    assert y.shape == (0, 4, 5, 5)
    gx, gw, gb = R.conv2d_backward(np.zeros((0, 4, 5, 5)), x, w, padding=1)
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (4,)
    assert not gw.any() and not gb.any()


def test_reference_casts_to_float64(rng):
    case = CASES[0]
    x, w, b, g = make_inputs(case, rng, dtype=np.float32)
    y = R.conv2d(x, w, b)
    assert y.dtype == np.float64
    y_int = R.conv2d(np.round(x * 4).astype(np.int32), np.round(w * 4).astype(np.int64))
    assert y_int.dtype == np.float64
    np.testing.assert_array_equal(
        y_int, R.conv2d(np.round(x * 4).astype(np.float64), np.round(w * 4).astype(np.float64)))
    assert all(a.dtype == np.float64 for a in R.conv2d_backward(g, x, w))
