"""Tests for the ``numba_cnn.layers.Conv2D`` layer: it must be a thin, stateful wrapper around
``numba_cnn.functional`` with the parameter/gradient bookkeeping described in API.md."""
import math
import re

import numpy as np
import pytest

from numba_cnn import functional as F
from numba_cnn import reference as R
from numba_cnn.layers import Conv2D

from _conv_cases import assert_close

# (id, constructor kwargs, input shape). Hyper-parameters are passed to F / R explicitly from
# here, not read back from the layer, so a layer that drops one fails.
CONFIGS = [
    ("plain", dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 6, 6)),
    ("groups2_s2_pad1", dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2,
                             padding=1, groups=2), (2, 4, 7, 6)),
    ("depthwise_same_dil_nobias", dict(in_channels=3, out_channels=6, kernel_size=3,
                                       padding="same", dilation=2, groups=3, bias=False),
     (1, 3, 8, 7)),
    ("f64_pairs", dict(in_channels=2, out_channels=5, kernel_size=2, stride=(2, 1),
                       padding=(1, 0), dtype=np.float64), (2, 2, 5, 6)),
]
CONFIG_IDS = [c[0] for c in CONFIGS]
HYPER = ("stride", "padding", "dilation", "groups")


def _hyper(kwargs):
    return {k: kwargs[k] for k in HYPER if k in kwargs}


def _make(kwargs, seed=0):
    return Conv2D(**kwargs, rng=seed)


def _tols(dtype):
    # (vs functional: same computation; vs float64 reference)
    return (1e-12, 1e-10) if dtype == np.float64 else (1e-6, 1e-4)


@pytest.mark.parametrize("kwargs, x_shape", [c[1:] for c in CONFIGS], ids=CONFIG_IDS)
def test_forward_backward_match_functional(kwargs, x_shape, rng):
    layer = _make(kwargs)
    dtype = np.dtype(kwargs.get("dtype", np.float32))
    tight, loose = _tols(dtype)
    x = rng.standard_normal(x_shape).astype(dtype)
    y = layer.forward(x)
    assert y.dtype == dtype
    assert_close(y, F.conv2d(x, layer.W, layer.b, **_hyper(kwargs)), tight, "forward vs F")
    assert_close(y, R.conv2d(x, layer.W, layer.b, **_hyper(kwargs)), loose, "forward vs ref")

    dout = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dout)
    gx, gw, gb = F.conv2d_backward(dout, x, layer.W, need_bias=layer.b is not None,
                                   **_hyper(kwargs))
    assert dx.shape == x.shape and dx.dtype == dtype
    assert layer.dW.shape == layer.W.shape and layer.dW.dtype == layer.W.dtype
    assert_close(dx, gx, tight, "dx vs F")
    assert_close(layer.dW, gw, tight, "dW vs F")
    rx, rw, rb = R.conv2d_backward(dout, x, layer.W, **_hyper(kwargs))
    assert_close(dx, rx, loose, "dx vs ref")
    assert_close(layer.dW, rw, loose, "dW vs ref")
    if kwargs.get("bias", True):
        assert layer.db.shape == layer.b.shape and layer.db.dtype == layer.b.dtype
        assert_close(layer.db, gb, tight, "db vs F")
        assert_close(layer.db, rb, loose, "db vs ref")
    else:
        assert layer.b is None
        assert getattr(layer, "db", None) is None


@pytest.mark.parametrize("kwargs, x_shape", [c[1:] for c in CONFIGS], ids=CONFIG_IDS)
def test_params_and_grads_reference_the_arrays(kwargs, x_shape, rng):
    layer = _make(kwargs)
    dtype = layer.W.dtype
    x = rng.standard_normal(x_shape).astype(dtype)
    dout = rng.standard_normal(layer.forward(x).shape).astype(dtype)
    layer.backward(dout)
    params, grads = layer.params, layer.grads
    assert params["W"] is layer.W
    assert grads["W"] is layer.dW
    if layer.b is not None:
        assert params["b"] is layer.b
        assert grads["b"] is layer.db
    else:
        assert params.get("b") is None and grads.get("b") is None

    # An optimizer step through the dicts updates the layer in place...
    w_before = layer.W.copy()
    dw = layer.dW.copy()
    for key in params:
        if params[key] is not None:
            params[key] -= 0.1 * grads[key]
    np.testing.assert_allclose(layer.W, w_before - 0.1 * dw, rtol=1e-6)
    assert not np.array_equal(layer.W, w_before)
    # ...and the next forward uses the updated weights.
    tight, _ = _tols(dtype)
    assert_close(layer.forward(x), F.conv2d(x, w_before - dtype.type(0.1) * dw, layer.b,
                                            **_hyper(kwargs)), max(tight, 1e-6), "forward")


def test_grads_dict_obtained_before_backward_sees_new_gradients(rng):
    # backward *fills* dW / db: a grads dict held by an optimizer stays current.
    layer = Conv2D(3, 4, 3, padding=1, rng=0)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    grads = layer.grads
    dout = rng.standard_normal(layer.forward(x).shape).astype(np.float32)
    layer.backward(dout)
    _, gw, gb = F.conv2d_backward(dout, x, layer.W, padding=1)
    assert_close(grads["W"], gw, 1e-6, "held grads['W']")
    assert_close(grads["b"], gb, 1e-6, "held grads['b']")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("groups, kernel", [(1, 3), (2, (3, 2)), (4, 1)])
def test_weight_shape_dtype_and_init(groups, kernel, dtype):
    C, Fo = 8, 48
    layer = Conv2D(C, Fo, kernel, groups=groups, dtype=dtype, rng=3)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    assert layer.W.shape == (Fo, C // groups, kh, kw)
    assert layer.W.dtype == dtype
    assert layer.b.shape == (Fo,) and layer.b.dtype == dtype
    np.testing.assert_array_equal(layer.b, 0)
    fan_in = C // groups * kh * kw
    bound = math.sqrt(6.0 / fan_in)
    w = layer.W.astype(np.float64)
    assert np.all(np.abs(w) <= bound * (1 + 1e-6)), (np.abs(w).max(), bound)
    # Uniform on [-bound, bound]: the extremes get close to the bound and the spread matches
    # (std = bound / sqrt(3)); with >= 96 samples these hold with overwhelming probability.
    assert np.abs(w).max() > 0.75 * bound
    assert w.min() < 0 < w.max()
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.25
    assert abs(w.mean()) < 0.25 * bound


def test_init_is_seeded():
    a = Conv2D(3, 8, 3, rng=123)
    b = Conv2D(3, 8, 3, rng=123)
    c = Conv2D(3, 8, 3, rng=124)
    np.testing.assert_array_equal(a.W, b.W)
    assert not np.array_equal(a.W, c.W)
    g1 = Conv2D(3, 8, 3, rng=np.random.default_rng(5))
    g2 = Conv2D(3, 8, 3, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(g1.W, g2.W)
    # the default (rng=None) works and gives a usable, non-constant weight
    d = Conv2D(3, 8, 3)
    assert d.W.shape == (8, 3, 3, 3) and np.ptp(d.W) > 0


def test_bias_false():
    layer = Conv2D(4, 6, 3, groups=2, bias=False, rng=0)
    assert layer.b is None
    assert layer.params.get("b") is None
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)
    y = layer.forward(x)
    assert_close(y, R.conv2d(x, layer.W, None, groups=2), 1e-4, "forward")
    layer.backward(np.ones_like(y))
    assert layer.grads.get("b") is None


def test_backward_uses_last_forward_input(rng):
    layer = Conv2D(3, 5, 3, stride=2, padding=1, rng=0, dtype=np.float64)
    x1 = rng.standard_normal((2, 3, 7, 7))
    x2 = rng.standard_normal((1, 3, 5, 6))         # different batch and size on purpose
    layer.forward(x1)
    y2 = layer.forward(x2)
    dout = rng.standard_normal(y2.shape)
    dx = layer.backward(dout)
    gx, gw, gb = R.conv2d_backward(dout, x2, layer.W, stride=2, padding=1)
    assert_close(dx, gx, 1e-10, "dx")
    assert_close(layer.dW, gw, 1e-10, "dW")
    assert_close(layer.db, gb, 1e-10, "db")


def test_backward_before_forward_raises():
    layer = Conv2D(3, 4, 3, rng=0)
    with pytest.raises((RuntimeError, ValueError), match="forward"):
        layer.backward(np.ones((1, 4, 3, 3), np.float32))


def _mentions(text, name, value):
    """``name=value`` in the repr, with an int also accepted in its normalised pair form."""
    forms = [repr(value)]
    if isinstance(value, int):
        forms.append(repr((value, value)))
    return any(f"{name}={form}" in text for form in forms)


def test_repr_shows_non_default_hyper_parameters():
    default = repr(Conv2D(3, 4, 3, rng=0))
    assert "Conv2D" in default
    assert re.search(r"\b3\b", default) and re.search(r"\b4\b", default)
    for name in HYPER:
        assert name not in default, f"default {name} shown in {default}"

    text = repr(Conv2D(4, 6, 5, stride=2, padding=1, dilation=3, groups=2, bias=False, rng=0))
    assert "Conv2D" in text
    for name, value in (("stride", 2), ("padding", 1), ("dilation", 3), ("groups", 2)):
        assert _mentions(text, name, value), f"{name}={value} not in {text}"
    assert "bias=False" in text
    assert re.search(r"\b5\b", text)                 # kernel size
    assert "same" in repr(Conv2D(3, 4, 3, padding="same", rng=0))
    assert _mentions(repr(Conv2D(3, 4, 3, stride=(2, 1), rng=0)), "stride", (2, 1))


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((3, 4, 3), {"groups": 2}, ValueError, "groups"),          # in_channels % groups
    ((4, 3, 3), {"groups": 2}, ValueError, "groups"),          # out_channels % groups
    ((4, 4, 3), {"groups": 0}, ValueError, "groups"),
    ((3, 4, 0), {}, ValueError, "kernel_size"),
    ((3, 4, (3, 0)), {}, ValueError, "kernel_size"),
    ((3, 4, 3), {"stride": 0}, ValueError, "stride"),
    ((3, 4, 3), {"padding": -1}, ValueError, "padding"),
], ids=["C_groups", "F_groups", "groups0", "kernel0", "kernel_pair0", "stride0", "pad_neg"])
def test_constructor_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Conv2D(*args, **kwargs)
