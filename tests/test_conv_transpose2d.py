"""Tests for the transposed convolution: ``numba_cnn.functional.conv_transpose2d`` /
``conv_transpose2d_backward``, the ``numba_cnn.layers.ConvTranspose2D`` layer and the NumPy
reference ``numba_cnn.reference.conv_transpose2d`` (itself checked against finite differences
and, when installed, PyTorch)."""
import math
import re
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import numba_cnn
from numba_cnn import _conv_plan
from numba_cnn import functional as F
from numba_cnn import layers
from numba_cnn import reference as R
from numba_cnn.layers import ConvTranspose2D

from _conv_cases import CASES as CONV_CASES, CASE_IDS as CONV_CASE_IDS, PoisonedEmptyNumpy, \
    assert_close, expected_out_hw

RTOL = {np.float64: 1e-10, np.float32: 1e-4}
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class TCase(NamedTuple):
    """A transposed convolution: x (N, C, H, W) -> y (N, F, OH, OW); weight (C, F // groups,
    KH, KW)."""
    N: int
    C: int
    H: int
    W: int
    F: int
    KH: int
    KW: int
    stride: object = 1
    padding: object = 0
    output_padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True

    @property
    def x_shape(self):
        return (self.N, self.C, self.H, self.W)

    @property
    def w_shape(self):
        return (self.C, self.F // self.groups, self.KH, self.KW)

    @property
    def out_hw(self):
        """PyTorch's documented formula, computed here independently of the library."""
        (sh, sw), (ph, pw) = _pair(self.stride), _pair(self.padding)
        (oph, opw), (dh, dw) = _pair(self.output_padding), _pair(self.dilation)
        return ((self.H - 1) * sh - 2 * ph + dh * (self.KH - 1) + oph + 1,
                (self.W - 1) * sw - 2 * pw + dw * (self.KW - 1) + opw + 1)

    @property
    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding,
                    output_padding=self.output_padding, groups=self.groups,
                    dilation=self.dilation)


def make_inputs(case, rng, dtype=np.float64):
    """Random normal x, weight, bias (or None) and grad_out for ``case``."""
    x = rng.standard_normal(case.x_shape).astype(dtype)
    w = rng.standard_normal(case.w_shape).astype(dtype)
    b = rng.standard_normal(case.F).astype(dtype) if case.bias else None
    g = rng.standard_normal((case.N, case.F) + case.out_hw).astype(dtype)
    return x, w, b, g


# (id, case). Each feature at least once; C != F in most; odd and non-square sizes throughout.
_CASES = [
    ("basic", TCase(2, 3, 4, 5, 4, 3, 3)),
    ("k1x1", TCase(2, 5, 4, 3, 3, 1, 1)),
    ("stride2", TCase(2, 3, 4, 5, 4, 3, 3, stride=2)),
    ("stride2_pad1_op1", TCase(2, 4, 5, 4, 3, 3, 3, stride=2, padding=1, output_padding=1)),
    ("stride3", TCase(1, 2, 3, 4, 3, 3, 3, stride=3)),
    ("k2_stride3_pad1_op2", TCase(1, 3, 3, 3, 2, 2, 2, stride=3, padding=1, output_padding=2)),
    ("k1_stride3", TCase(2, 2, 3, 2, 3, 1, 1, stride=3, output_padding=(2, 1))),
    ("stride_pair_2_1_op", TCase(2, 3, 4, 5, 2, 3, 2, stride=(2, 1), output_padding=(1, 0))),
    ("stride_pair_1_3_pad", TCase(1, 2, 5, 3, 3, 2, 3, stride=(1, 3), padding=(1, 0),
                                  output_padding=(0, 2))),
    ("pad_pair", TCase(2, 3, 5, 4, 4, 3, 3, padding=(2, 1))),
    ("pad_crops_most", TCase(1, 2, 4, 4, 2, 3, 3, padding=2)),
    ("dil2", TCase(2, 3, 4, 4, 4, 3, 3, dilation=2)),
    ("dil_gt_stride_op", TCase(1, 2, 4, 5, 3, 2, 3, output_padding=(2, 1), dilation=(3, 2))),
    ("dil3_stride2_op2", TCase(1, 3, 4, 4, 2, 3, 2, stride=2, padding=1, output_padding=2,
                               dilation=3)),
    ("dil2_stride3_op1", TCase(2, 2, 3, 3, 3, 2, 2, stride=3, padding=(0, 1),
                               output_padding=(1, 2), dilation=2)),
    ("groups2", TCase(2, 4, 4, 4, 6, 3, 3, groups=2, padding=1)),
    ("groups3_stride2_op1", TCase(1, 6, 3, 4, 9, 3, 2, groups=3, stride=2, output_padding=1)),
    ("depthwise", TCase(2, 5, 4, 5, 5, 3, 3, groups=5, padding=1)),
    ("depthwise_mult2_s2_dil", TCase(1, 3, 4, 4, 6, 3, 3, groups=3, stride=2, padding=1,
                                     output_padding=1, dilation=2)),
    ("nobias", TCase(2, 3, 4, 4, 4, 3, 3, bias=False)),
    ("nobias_groups_s2", TCase(1, 4, 3, 4, 4, 2, 3, groups=2, stride=2, bias=False)),
    ("odd_7x5_k3x2", TCase(2, 3, 7, 5, 4, 3, 2)),
    ("c1_f1", TCase(2, 1, 3, 5, 1, 2, 3)),
    ("h1_w_wide", TCase(2, 3, 1, 6, 2, 1, 3, padding=(0, 1))),
    ("kernel_larger_than_input", TCase(1, 2, 2, 2, 3, 5, 4, stride=2)),
    ("c7_f11", TCase(2, 7, 4, 4, 11, 3, 3, padding=1)),
    ("c20_f36_g4_s2", TCase(1, 20, 4, 5, 36, 3, 3, groups=4, stride=2, padding=1,
                            output_padding=1)),
    # found by fuzzing the channel-blocked input gradient (this forward): reads that all lie in
    # the left margin of a width-1 input
    ("w1_reads_in_margin", TCase(3, 32, 3, 1, 29, 3, 4, stride=(3, 2), padding=3,
                                 dilation=(2, 2))),
]
CASES = [case for _, case in _CASES]
CASE_IDS = [name for name, _ in _CASES]


def _check_against_reference(case, x, w, b, g, rtol):
    y = F.conv_transpose2d(x, w, b, **case.kwargs)
    assert y.shape == (case.N, case.F) + case.out_hw
    assert_close(y, R.conv_transpose2d(x, w, b, **case.kwargs), rtol, "forward")
    gx, gw, gb = F.conv_transpose2d_backward(g, x, w, need_bias=case.bias, **case.kwargs)
    gx_ref, gw_ref, gb_ref = R.conv_transpose2d_backward(g, x, w, **case.kwargs)
    assert_close(gx, gx_ref, rtol, "grad_x")
    assert_close(gw, gw_ref, rtol, "grad_weight")
    if case.bias:
        assert gb is not None, "need_bias=True must return grad_bias"
        assert_close(gb, gb_ref, rtol, "grad_bias")
    else:
        assert gb is None, "need_bias=False must return None for grad_bias"
    return y, gx, gw, gb


def torch_conv_transpose2d(torch, case, x, w, b, g):
    """Forward and autograd gradients from ``torch.nn.functional.conv_transpose2d``, float64."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    wt = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
    bt = None if b is None else torch.tensor(np.asarray(b, np.float64), requires_grad=True)
    yt = torch.nn.functional.conv_transpose2d(xt, wt, bt, **case.kwargs)
    yt.backward(torch.tensor(np.asarray(g, np.float64)))
    return (yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(),
            None if bt is None else bt.grad.numpy())


# ---------------------------------------------------------------------------------------------
# Values: the case grid against the reference, the reference against PyTorch and finite
# differences, and the adjoint identities with conv2d
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv_transpose2d_matches_reference(case, dtype, rng):
    x, w, b, g = make_inputs(case, rng, dtype)
    outs = _check_against_reference(case, x, w, b, g, RTOL[dtype])
    for name, out in zip(("y", "grad_x", "grad_weight", "grad_bias"), outs):
        if out is not None:
            assert out.dtype == dtype, f"{name} dtype {out.dtype}, expected {np.dtype(dtype)}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_output_position_is_written(case, rng, monkeypatch):
    # outputs are allocated uninitialised (np.empty) whenever the kernels cover every position
    monkeypatch.setattr(F, "np", PoisonedEmptyNumpy())
    x, w, b, g = make_inputs(case, rng, np.float32)
    _check_against_reference(case, x, w, b, g, RTOL[np.float32])


@pytest.mark.parametrize("channel_blocked", [False, True], ids=["grid", "channel_blocked"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_both_layouts_match_reference(case, channel_blocked, rng, monkeypatch):
    # force each layout wherever it is implemented (see test_conv2d); on the grid the backward
    # shares one packed grad_out between its two passes
    monkeypatch.setattr(_conv_plan, "FORCE_CHANNEL_BLOCKED", channel_blocked)
    monkeypatch.setattr(F, "np", PoisonedEmptyNumpy())
    x, w, b, g = make_inputs(case, rng, np.float64)
    _check_against_reference(case, x, w, b, g, RTOL[np.float64])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_and_library_match_torch(case, rng, torch_mod):
    x, w, b, g = make_inputs(case, rng)
    y_t, gx_t, gw_t, gb_t = torch_conv_transpose2d(torch_mod, case, x, w, b, g)
    ref = (R.conv_transpose2d(x, w, b, **case.kwargs),) + R.conv_transpose2d_backward(
        g, x, w, **case.kwargs)
    lib = (F.conv_transpose2d(x, w, b, **case.kwargs),) + F.conv_transpose2d_backward(
        g, x, w, **case.kwargs)
    for who, outs in (("reference", ref), ("library", lib)):
        assert outs[0].dtype == np.float64
        for name, out, expected in zip(("forward", "grad_x", "grad_weight", "grad_bias"), outs,
                                       (y_t, gx_t, gw_t, gb_t)):
            if expected is not None:
                assert_close(out, expected, 1e-10, f"{who} {name}")


FD_CASES = [
    TCase(2, 2, 3, 3, 2, 2, 2, stride=2, padding=1, output_padding=1),
    TCase(1, 4, 3, 3, 4, 2, 2, groups=2, output_padding=1, dilation=2),
    TCase(1, 2, 2, 3, 3, 3, 2, stride=(3, 1), padding=(1, 0), output_padding=(2, 0)),
]


def _fd_grad(loss, arr, eps):
    """Central finite differences of ``loss()`` w.r.t. every entry of ``arr`` (restored)."""
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
    x, w, b, g = make_inputs(case, rng)

    def loss():
        return float(np.sum(R.conv_transpose2d(x, w, b, **case.kwargs) * g))

    gx, gw, gb = R.conv_transpose2d_backward(g, x, w, **case.kwargs)
    # The loss is linear in each argument, so central differences are exact up to rounding.
    for name, arr, analytic in (("x", x, gx), ("weight", w, gw), ("bias", b, gb)):
        numeric = _fd_grad(loss, arr, 1e-5)
        assert_close(analytic, numeric, 1e-7, f"grad_{name}")
        assert np.max(np.abs(numeric)) > 0.1  # the check is not vacuous


def test_reference_tiny_by_hand():
    # 1x1x2x2 input, 2x2 kernel, stride 2: each input pixel stamps a scaled copy of the kernel.
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    w = np.array([[[[1.0, 10.0], [100.0, 1000.0]]]])
    y = R.conv_transpose2d(x, w, np.array([0.5]), stride=2)
    expected = np.kron(x[0, 0], w[0, 0]) + 0.5
    np.testing.assert_array_equal(y[0, 0], expected)
    # output_padding=1 adds a row and a column at the bottom/right that no tap reaches
    y_op = R.conv_transpose2d(x, w, stride=2, output_padding=1)
    np.testing.assert_array_equal(y_op[0, 0], np.pad(expected - 0.5, ((0, 1), (0, 1))))
    # padding crops one row/column from each side of the full output
    y_p = R.conv_transpose2d(x, w, stride=2, padding=1)
    np.testing.assert_array_equal(y_p[0, 0], (expected - 0.5)[1:3, 1:3])


_ADJOINT = [(name, case) for name, case in zip(CONV_CASE_IDS, CONV_CASES)
            if not isinstance(case.padding, str)]


@pytest.mark.parametrize("conv_case", [c for _, c in _ADJOINT], ids=[n for n, _ in _ADJOINT])
def test_identity_with_conv2d_backward(conv_case, rng):
    """conv_transpose2d(g, W) is the input gradient of conv2d(x, W), and the transposed
    convolution's input gradient is conv2d itself (the output_padding that recovers x's size
    is always smaller than the stride)."""
    c = conv_case
    (sh, sw), (ph, pw), (dh, dw) = _pair(c.stride), _pair(c.padding), _pair(c.dilation)
    oh, ow = expected_out_hw(c)
    output_padding = ((c.H + 2 * ph - dh * (c.KH - 1) - 1) % sh,
                      (c.W + 2 * pw - dw * (c.KW - 1) - 1) % sw)
    kwargs = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
    x = rng.standard_normal(c.x_shape)
    w = rng.standard_normal(c.w_shape)
    g = rng.standard_normal((c.N, c.F, oh, ow))
    y = F.conv_transpose2d(g, w, output_padding=output_padding, **kwargs)
    assert y.shape == x.shape
    assert_close(y, F.conv2d_backward(g, x, w, **kwargs)[0], 1e-10, "transpose vs grad_x")
    grad_g = F.conv_transpose2d_backward(x, g, w, output_padding=output_padding,
                                         need_bias=False, **kwargs)[0]
    assert_close(grad_g, F.conv2d(x, w, **kwargs), 1e-10, "grad_x vs conv2d")


def test_adjoint_dot_product_with_large_output_padding(rng):
    # output_padding >= stride (allowed since it is < dilation): <T x, y> == <x, T^T y> with
    # T^T the library's input gradient, so the extra rows are consistent in both directions.
    case = TCase(2, 3, 4, 3, 4, 3, 2, stride=(1, 2), padding=(1, 0), output_padding=(2, 2),
                 dilation=(3, 3), groups=1, bias=False)
    x, w, _, g = make_inputs(case, rng)
    lhs = np.sum(F.conv_transpose2d(x, w, **case.kwargs) * g)
    rhs = np.sum(x * F.conv_transpose2d_backward(g, x, w, **case.kwargs)[0])
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def test_positional_arguments_match_keywords(rng):
    case = TCase(2, 4, 3, 4, 6, 3, 2, stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
                 dilation=(1, 2), groups=2)
    x, w, b, g = make_inputs(case, rng)
    y_pos = F.conv_transpose2d(x, w, b, (2, 1), (1, 0), (1, 0), 2, (1, 2))
    np.testing.assert_array_equal(y_pos, F.conv_transpose2d(x, w, b, **case.kwargs))
    grads_pos = F.conv_transpose2d_backward(g, x, w, (2, 1), (1, 0), (1, 0), 2, (1, 2), True)
    for a, k in zip(grads_pos, F.conv_transpose2d_backward(g, x, w, **case.kwargs)):
        np.testing.assert_array_equal(a, k)


def test_exports():
    assert "conv_transpose2d" in F.__all__ and "conv_transpose2d_backward" in F.__all__
    assert numba_cnn.ConvTranspose2D is layers.ConvTranspose2D is ConvTranspose2D
    assert "ConvTranspose2D" in numba_cnn.__all__ and "ConvTranspose2D" in layers.__all__


# ---------------------------------------------------------------------------------------------
# dtypes, layout, mutation, empty batch, NaN
# ---------------------------------------------------------------------------------------------

CASE_DT = TCase(2, 4, 3, 4, 6, 3, 2, stride=2, padding=1, output_padding=(1, 0), groups=2)


def test_float16_computed_as_float32(rng):
    x, w, b, g = make_inputs(CASE_DT, rng, np.float16)
    y = F.conv_transpose2d(x, w, b, **CASE_DT.kwargs)
    assert y.dtype == np.float32
    assert_close(y, R.conv_transpose2d(x, w, b, **CASE_DT.kwargs), 1e-4, "forward")
    for out, ref, name in zip(F.conv_transpose2d_backward(g, x, w, **CASE_DT.kwargs),
                              R.conv_transpose2d_backward(g, x, w, **CASE_DT.kwargs),
                              ("grad_x", "grad_weight", "grad_bias")):
        assert out.dtype == np.float32, f"{name} dtype {out.dtype}"
        assert_close(out, ref, 1e-4, name)


@pytest.mark.parametrize("int_dtype", [np.int32, np.int64, np.bool_])
def test_integer_and_bool_input_becomes_float64(int_dtype, rng):
    high = 2 if int_dtype is np.bool_ else 5
    x = rng.integers(0, high, CASE_DT.x_shape).astype(int_dtype)
    w = rng.integers(0, high, CASE_DT.w_shape).astype(int_dtype)
    y = F.conv_transpose2d(x, w, **CASE_DT.kwargs)
    assert y.dtype == np.float64
    assert_close(y, R.conv_transpose2d(x, w, **CASE_DT.kwargs), 1e-12, "forward")
    g = rng.integers(-3, 4, y.shape).astype(int_dtype)
    for out, ref in zip(F.conv_transpose2d_backward(g, x, w, **CASE_DT.kwargs),
                        R.conv_transpose2d_backward(g, x, w, **CASE_DT.kwargs)):
        assert out.dtype == np.float64
        assert_close(out, ref, 1e-12, "backward")


def test_mixed_dtypes_follow_numpy_promotion(rng):
    x, w, b, g = make_inputs(CASE_DT, rng, np.float32)
    b64 = b.astype(np.float64)
    # a float64 bias promotes the whole computation, like x or weight would
    y = F.conv_transpose2d(x, w, b64, **CASE_DT.kwargs)
    assert y.dtype == np.float64
    assert_close(y, R.conv_transpose2d(x, w, b, **CASE_DT.kwargs), 1e-10, "forward")
    grads = F.conv_transpose2d_backward(g, x.astype(np.float64), w, **CASE_DT.kwargs)
    for out, ref in zip(grads, R.conv_transpose2d_backward(g, x, w, **CASE_DT.kwargs)):
        assert out.dtype == np.float64
        assert_close(out, ref, 1e-10, "backward")


def _noncontiguous(arr, kind):
    """A non-contiguous view with the values of ``arr``: NHWC storage ("transposed", 4-D
    arrays) or every other element of a NaN-filled buffer, last axis reversed ("strided")."""
    if kind == "transposed" and arr.ndim == 4:
        view = np.moveaxis(np.ascontiguousarray(np.moveaxis(arr, 1, -1)), -1, 1)
    else:
        shape = list(arr.shape)
        shape[-1] *= 2
        base = np.full(shape, np.nan, dtype=arr.dtype)
        base[..., ::2] = arr[..., ::-1]
        view = base[..., ::2][..., ::-1]
    np.testing.assert_array_equal(view, arr)
    assert not view.flags.c_contiguous
    return view


@pytest.mark.parametrize("kind", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noncontiguous_inputs(kind, dtype, rng):
    case = CASE_DT
    x, w, b, g = make_inputs(case, rng, dtype)
    xv, wv, bv, gv = (_noncontiguous(a, kind) for a in (x, w, b, g))
    y = F.conv_transpose2d(xv, wv, bv, **case.kwargs)
    assert y.flags.c_contiguous
    assert_close(y, R.conv_transpose2d(x, w, b, **case.kwargs), RTOL[dtype], "forward")
    for out, ref, name in zip(F.conv_transpose2d_backward(gv, xv, wv, **case.kwargs),
                              R.conv_transpose2d_backward(g, x, w, **case.kwargs),
                              ("grad_x", "grad_weight", "grad_bias")):
        assert out.flags.c_contiguous, name
        assert_close(out, ref, RTOL[dtype], name)


def test_inputs_not_modified_and_outputs_are_new(rng):
    x, w, b, g = make_inputs(CASE_DT, rng)
    views = [_noncontiguous(a, "strided") for a in (x, w, b, g)]
    for args in ((x, w, b, g), tuple(views)):
        copies = [a.copy() for a in args]
        bases = [v.base.copy() for v in views]
        y = F.conv_transpose2d(*args[:3], **CASE_DT.kwargs)
        grads = F.conv_transpose2d_backward(args[3], *args[:2], **CASE_DT.kwargs)
        for a, c in zip(args, copies):
            np.testing.assert_array_equal(a, c)
        for v, c in zip(views, bases):  # including the NaN-poisoned gaps
            np.testing.assert_array_equal(v.base, c)
        for out in (y,) + grads:
            assert out.flags.c_contiguous
            assert not any(np.shares_memory(out, a) for a in args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_zero(dtype):
    case = TCase(0, 4, 3, 4, 6, 3, 3, stride=2, padding=1, output_padding=1, groups=2)
    x = np.empty(case.x_shape, dtype)
    w = np.ones(case.w_shape, dtype)
    b = np.arange(case.F, dtype=dtype)
    y = F.conv_transpose2d(x, w, b, **case.kwargs)
    assert y.shape == (0, case.F) + case.out_hw and y.dtype == dtype
    g = np.empty(y.shape, dtype)
    gx, gw, gb = F.conv_transpose2d_backward(g, x, w, **case.kwargs)
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == w.shape and gw.dtype == dtype and not gw.any()
    assert gb.shape == (case.F,) and gb.dtype == dtype and not gb.any()
    assert F.conv_transpose2d_backward(g, x, w, need_bias=False, **case.kwargs)[2] is None
    rx, rw, rb = R.conv_transpose2d_backward(g, x, w, **case.kwargs)
    assert R.conv_transpose2d(x, w, b, **case.kwargs).shape == y.shape
    assert rx.shape == x.shape and rw.shape == w.shape and rb.shape == (case.F,)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_propagates_to_exactly_its_outputs(dtype, rng):
    case = TCase(2, 4, 4, 5, 6, 3, 2, stride=2, padding=1, output_padding=1, dilation=(1, 2),
                 groups=2)
    x, w, b, _ = make_inputs(case, rng, dtype)
    pos = (1, 3, 2, 1)
    x[pos] = np.nan
    y = F.conv_transpose2d(x, w, b, **case.kwargs)
    indicator = np.zeros(case.x_shape)
    indicator[pos] = 1.0
    mask = R.conv_transpose2d(indicator, np.ones(case.w_shape), **case.kwargs) > 0.5
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(np.isnan(y), mask)
    ref = R.conv_transpose2d(np.where(np.isnan(x), 0, x), w, b, **case.kwargs)
    assert_close(y[~mask], ref[~mask], RTOL[dtype], "finite outputs")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

_r = np.random.default_rng(7)
X = _r.standard_normal((2, 4, 3, 3))
W = _r.standard_normal((4, 3, 3, 3))           # C_in 4 -> C_out 3
W_G2 = _r.standard_normal((4, 2, 3, 3))        # groups 2: C_out 4
B = _r.standard_normal(3)
G = _r.standard_normal((2, 3, 5, 5))           # grad_out for X, W with the defaults

BAD_FORWARD = [
    # id, args, kwargs, exception, regex the message must match
    ("x_3d", (X[0], W), {}, ValueError, r"\bx\b"),
    ("x_5d", (X[None], W), {}, ValueError, r"\bx\b"),
    ("weight_3d", (X, W[0]), {}, ValueError, "weight"),
    ("channel_mismatch", (X[:, :3], W), {}, ValueError, "channels"),
    ("channel_mismatch_weight", (X, W[:3]), {}, ValueError, "channels"),
    ("groups_not_dividing_C_in", (X[:, :3], W[:3]), {"groups": 2}, ValueError, "groups"),
    ("groups_0", (X, W), {"groups": 0}, ValueError, "groups"),
    ("groups_float", (X, W_G2), {"groups": 2.0}, TypeError, "groups"),
    ("stride_0", (X, W), {"stride": 0}, ValueError, "stride"),
    ("stride_pair_0", (X, W), {"stride": (1, 0)}, ValueError, "stride"),
    ("stride_float", (X, W), {"stride": 1.5}, TypeError, "stride"),
    ("dilation_0", (X, W), {"dilation": 0}, ValueError, "dilation"),
    ("padding_negative", (X, W), {"padding": -1}, ValueError, "padding"),
    ("padding_same", (X, W), {"padding": "same"}, TypeError, "padding"),
    ("padding_valid", (X, W), {"padding": "valid"}, TypeError, "padding"),
    ("padding_triple", (X, W), {"padding": (1, 1, 1)}, TypeError, "padding"),
    ("output_padding_negative", (X, W), {"stride": 2, "output_padding": -1}, ValueError,
     "output_padding"),
    ("output_padding_eq_stride", (X, W), {"output_padding": 1}, ValueError, "output_padding"),
    ("output_padding_pair_too_big", (X, W), {"stride": 2, "output_padding": (0, 2)}, ValueError,
     "output_padding"),
    ("output_padding_ge_stride_and_dilation", (X, W),
     {"stride": 2, "dilation": 2, "output_padding": 2}, ValueError, "output_padding"),
    ("output_padding_float", (X, W), {"stride": 2, "output_padding": 0.5}, TypeError,
     "output_padding"),
    ("output_empty", (X, W), {"padding": 3}, ValueError, "output"),
    ("bias_c_in_length", (X, W, np.ones(4)), {}, ValueError, "bias"),
    ("bias_2d", (X, W, B[:, None]), {}, ValueError, "bias"),
    ("bias_complex", (X, W, B.astype(complex)), {}, TypeError, "bias"),
    ("x_complex", (X.astype(complex), W), {}, TypeError, r"\bx\b"),
    ("weight_object", (X, W.astype(object)), {}, TypeError, "weight"),
    ("x_string", (X.astype(str), W), {}, TypeError, r"\bx\b"),
]


@pytest.mark.parametrize("args, kwargs, exc, match",
                         [c[1:] for c in BAD_FORWARD], ids=[c[0] for c in BAD_FORWARD])
def test_conv_transpose2d_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        F.conv_transpose2d(*args, **kwargs)


BAD_BACKWARD = [
    ("grad_out_wrong_size", (G[:, :, :4], X, W), {}, ValueError, "grad_out"),
    ("grad_out_c_in_channels", (np.ones((2, 4, 5, 5)), X, W), {}, ValueError, "grad_out"),
    ("grad_out_for_other_output_padding", (G, X, W), {"stride": 2, "output_padding": 1},
     ValueError, "grad_out"),
    ("grad_out_3d", (G[0], X, W), {}, ValueError, "grad_out"),
    ("grad_out_complex", (G.astype(complex), X, W), {}, TypeError, "grad_out"),
    ("x_3d", (G, X[0], W), {}, ValueError, r"\bx\b"),
    ("channel_mismatch", (G, X[:, :3], W), {}, ValueError, "channels"),
    ("padding_same", (G, X, W), {"padding": "same"}, TypeError, "padding"),
    ("output_padding_eq_stride", (G, X, W), {"output_padding": 1}, ValueError,
     "output_padding"),
]


@pytest.mark.parametrize("args, kwargs, exc, match",
                         [c[1:] for c in BAD_BACKWARD], ids=[c[0] for c in BAD_BACKWARD])
def test_conv_transpose2d_backward_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        F.conv_transpose2d_backward(*args, **kwargs)


def test_bad_input_fixtures_are_otherwise_valid():
    assert F.conv_transpose2d(X, W, B).shape == (2, 3, 5, 5)
    assert F.conv_transpose2d(X, W_G2, groups=2).shape == (2, 4, 5, 5)
    assert F.conv_transpose2d(X, W, padding=2).shape == (2, 3, 1, 1)
    assert F.conv_transpose2d(X, W, stride=2, output_padding=1).shape == (2, 3, 8, 8)
    assert F.conv_transpose2d(X, W, stride=2, dilation=3, output_padding=2).shape == (2, 3, 13, 13)
    assert len(F.conv_transpose2d_backward(G, X, W)) == 3


def test_error_messages_name_the_value():
    with pytest.raises(ValueError, match=r"output_padding=\(1, 1\).*stride=\(1, 1\)"):
        F.conv_transpose2d(X, W, output_padding=1)
    with pytest.raises(ValueError, match=r"x has 3 channels but weight expects 4"):
        F.conv_transpose2d(X[:, :3], W)
    with pytest.raises(ValueError, match=r"-1x-1"):
        F.conv_transpose2d(X, W, padding=3)


# ---------------------------------------------------------------------------------------------
# Property test: random valid geometries
# ---------------------------------------------------------------------------------------------

@st.composite
def transposed_cases(draw):
    groups = draw(st.integers(1, 3))
    C = groups * draw(st.integers(1, 6 // groups))
    Fo = groups * draw(st.integers(1, 6 // groups))
    KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1))
                           for s, d in zip(stride, dilation))
    case = TCase(draw(st.integers(1, 2)), C, draw(st.integers(1, 5)), draw(st.integers(1, 5)),
                 Fo, KH, KW, stride, padding, output_padding, dilation, groups,
                 draw(st.booleans()))
    assume(min(case.out_hw) >= 1)
    return case, draw(st.integers(0, 2 ** 32 - 1))


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(transposed_cases())
def test_conv_transpose2d_property_random_geometry(case_and_seed):
    case, seed = case_and_seed
    x, w, b, g = make_inputs(case, np.random.default_rng(seed))
    _check_against_reference(case, x, w, b, g, 1e-10)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------

LAYER_CONFIGS = [
    ("plain", dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 4, 5)),
    ("s2_pad1_op1_groups2", dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2,
                                 padding=1, output_padding=1, groups=2), (2, 4, 3, 4)),
    ("f64_dil_nobias", dict(in_channels=2, out_channels=5, kernel_size=2, stride=(2, 1),
                            output_padding=(0, 1), dilation=(1, 2), bias=False,
                            dtype=np.float64), (1, 2, 4, 3)),
]
LAYER_IDS = [c[0] for c in LAYER_CONFIGS]
HYPER = ("stride", "padding", "output_padding", "groups", "dilation")


def _hyper(kwargs):
    return {k: kwargs[k] for k in HYPER if k in kwargs}


@pytest.mark.parametrize("kwargs, x_shape", [c[1:] for c in LAYER_CONFIGS], ids=LAYER_IDS)
def test_layer_matches_functional_and_reference(kwargs, x_shape, rng):
    layer = ConvTranspose2D(**kwargs, rng=0)
    dtype = np.dtype(kwargs.get("dtype", np.float32))
    tight, loose = (1e-12, 1e-10) if dtype == np.float64 else (1e-6, 1e-4)
    x = rng.standard_normal(x_shape).astype(dtype)
    y = layer.forward(x)
    assert y.dtype == dtype
    assert_close(y, F.conv_transpose2d(x, layer.W, layer.b, **_hyper(kwargs)), tight, "F")
    assert_close(y, R.conv_transpose2d(x, layer.W, layer.b, **_hyper(kwargs)), loose, "ref")
    dout = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dout)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert layer.dW.shape == layer.W.shape and layer.dW.dtype == layer.W.dtype
    rx, rw, rb = R.conv_transpose2d_backward(dout, x, layer.W, **_hyper(kwargs))
    assert_close(dx, rx, loose, "dx")
    assert_close(layer.dW, rw, loose, "dW")
    if kwargs.get("bias", True):
        assert layer.db.shape == layer.b.shape == (kwargs["out_channels"],)
        assert layer.db.dtype == dtype
        assert_close(layer.db, rb, loose, "db")
    else:
        assert layer.b is None and layer.db is None
        assert "b" not in layer.params and "b" not in layer.grads


def test_layer_params_and_grads_reference_the_arrays(rng):
    layer = ConvTranspose2D(4, 6, 3, stride=2, groups=2, rng=0)
    grads = layer.grads           # held before backward, as an optimizer would
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    dout = rng.standard_normal(layer.forward(x).shape).astype(np.float32)
    layer.backward(dout)
    assert layer.params["W"] is layer.W and layer.params["b"] is layer.b
    assert layer.grads["W"] is layer.dW and layer.grads["b"] is layer.db
    _, gw, gb = F.conv_transpose2d_backward(dout, x, layer.W, stride=2, groups=2)
    assert_close(grads["W"], gw, 1e-6, "held grads['W']")
    assert_close(grads["b"], gb, 1e-6, "held grads['b']")
    w_before = layer.W.copy()
    for key in layer.params:
        layer.params[key] -= np.float32(0.1) * layer.grads[key]
    assert_close(layer.W, w_before - np.float32(0.1) * gw, 1e-6, "SGD step in place")
    assert_close(layer.forward(x), F.conv_transpose2d(x, layer.W, layer.b, stride=2, groups=2),
                 1e-6, "forward uses the updated weights")


def test_layer_output_size_picks_output_padding(rng):
    layer = ConvTranspose2D(3, 2, 3, stride=(2, 3), padding=1, rng=0, dtype=np.float64)
    x = rng.standard_normal((2, 3, 4, 5))
    # output_padding 0 gives (7, 13); valid sizes run to (8, 15)
    assert layer.forward(x).shape == (2, 2, 7, 13)
    for size, output_padding in (((8, 14), (1, 1)), ((7, 15), (0, 2)),
                                 ([2, 99, 8, 13], (1, 0)),      # N, C ignored (as in PyTorch)
                                 (np.array([7, 13]), (0, 0))):
        y = layer.forward(x, output_size=size)
        assert y.shape == (2, 2) + tuple(int(s) for s in size[-2:])
        assert_close(y, R.conv_transpose2d(x, layer.W, layer.b, stride=(2, 3), padding=1,
                                           output_padding=output_padding), 1e-10, "forward")
        dout = rng.standard_normal(y.shape)
        dx = layer.backward(dout)           # uses the output padding of that forward
        rx, rw, rb = R.conv_transpose2d_backward(dout, x, layer.W, stride=(2, 3), padding=1,
                                                 output_padding=output_padding)
        assert_close(dx, rx, 1e-10, "dx")
        assert_close(layer.dW, rw, 1e-10, "dW")
        assert_close(layer.db, rb, 1e-10, "db")


def test_layer_output_size_matches_torch(rng, torch_mod):
    kwargs = dict(stride=(3, 2), padding=(1, 0), dilation=(1, 2))
    layer = ConvTranspose2D(4, 6, (2, 3), groups=2, rng=0, dtype=np.float64, **kwargs)
    tlayer = torch_mod.nn.ConvTranspose2d(4, 6, (2, 3), groups=2, dtype=torch_mod.float64,
                                          **kwargs)
    with torch_mod.no_grad():
        tlayer.weight.copy_(torch_mod.tensor(layer.W))
        tlayer.bias.copy_(torch_mod.tensor(layer.b + 0.5))
    layer.b += 0.5
    x = rng.standard_normal((1, 4, 3, 4))
    for size in ((6, 11), (7, 12), (8, 11)):   # from (6, 11) to (8, 12)
        y_t = tlayer(torch_mod.tensor(x), output_size=list(size)).detach().numpy()
        assert_close(layer.forward(x, output_size=size), y_t, 1e-10, f"output_size={size}")
    with pytest.raises(ValueError):
        tlayer(torch_mod.tensor(x), output_size=[9, 11])
    with pytest.raises(ValueError):
        layer.forward(x, output_size=(9, 11))


def test_layer_impossible_output_size_lists_the_range(rng):
    layer = ConvTranspose2D(3, 2, 3, stride=2, padding=1, rng=0)
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=re.escape("from (7, 7) to (8, 8)")):
        layer.forward(x, output_size=(9, 8))
    with pytest.raises(ValueError, match="output_size"):
        layer.forward(x, output_size=(1, 7, 7))
    with pytest.raises(TypeError, match="output_size"):
        layer.forward(x, output_size=(7.0, 7))
    with pytest.raises(TypeError, match="output_size"):
        layer.forward(x, output_size=7)
    # stride 1: only one size is possible, whatever the dilation
    one = ConvTranspose2D(3, 2, 3, dilation=3, rng=0)
    with pytest.raises(ValueError, match=re.escape("from (10, 10) to (10, 10)")):
        one.forward(x, output_size=(11, 10))


def test_layer_backward_uses_last_forward(rng):
    layer = ConvTranspose2D(3, 5, 3, stride=2, padding=1, output_padding=1, rng=0,
                            dtype=np.float64)
    layer.forward(rng.standard_normal((2, 3, 4, 4)))
    x2 = rng.standard_normal((1, 3, 3, 5))
    y2 = layer.forward(x2, output_size=(5, 9))      # output padding 0 for this call
    dout = rng.standard_normal(y2.shape)
    dx = layer.backward(dout)
    gx, gw, gb = R.conv_transpose2d_backward(dout, x2, layer.W, stride=2, padding=1)
    assert_close(dx, gx, 1e-10, "dx")
    assert_close(layer.dW, gw, 1e-10, "dW")
    assert_close(layer.db, gb, 1e-10, "db")
    assert layer.forward(x2).shape == (1, 5, 6, 10)  # the layer's own output_padding again


def test_layer_backward_before_forward_raises():
    with pytest.raises(RuntimeError, match="forward"):
        ConvTranspose2D(3, 4, 3, rng=0).backward(np.ones((1, 4, 5, 5), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_weight_shape_dtype_and_init(dtype):
    C_in, C_out, groups = 48, 8, 2
    layer = ConvTranspose2D(C_in, C_out, (3, 2), groups=groups, dtype=dtype, rng=3)
    assert layer.W.shape == (C_in, C_out // groups, 3, 2) and layer.W.dtype == dtype
    assert layer.b.shape == (C_out,) and layer.b.dtype == dtype and not layer.b.any()
    assert layer.dW.shape == layer.W.shape and layer.db.shape == layer.b.shape
    # PyTorch's fan_in for transposed convolution: W.shape[1] * KH * KW (here 4 * 6 = 24, not
    # the 24 * 6 = 144 that C_in // groups would give)
    bound = math.sqrt(6.0 / (C_out // groups * 3 * 2))
    w = layer.W.astype(np.float64)
    assert np.abs(w).max() <= bound * (1 + 1e-6)
    assert np.abs(w).max() > 0.9 * bound
    assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.1
    np.testing.assert_array_equal(layer.W, ConvTranspose2D(C_in, C_out, (3, 2), groups=groups,
                                                           dtype=dtype, rng=3).W)


def test_layer_repr_shows_non_default_hyper_parameters():
    default = repr(ConvTranspose2D(3, 4, 3, rng=0))
    assert default.startswith("ConvTranspose2D(3, 4")
    for name in HYPER + ("bias", "dtype"):
        assert name not in default, f"default {name} shown in {default}"
    text = repr(ConvTranspose2D(4, 6, 5, stride=2, padding=1, output_padding=(1, 0), groups=2,
                                bias=False, dilation=3, dtype=np.float64, rng=0))
    for part in ("stride=(2, 2)", "padding=(1, 1)", "output_padding=(1, 0)", "groups=2",
                 "dilation=(3, 3)", "bias=False", "dtype=float64", "kernel_size=(5, 5)"):
        assert part in text, f"{part} not in {text}"


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((3, 4, 3), {"groups": 2}, ValueError, "groups"),            # in_channels % groups
    ((4, 3, 3), {"groups": 2}, ValueError, "groups"),            # out_channels % groups
    ((4, 4, 3), {"groups": 0}, ValueError, "groups"),
    ((4.0, 4, 3), {}, TypeError, "in_channels"),
    ((3, 4, 0), {}, ValueError, "kernel_size"),
    ((3, 4, 3), {"stride": 0}, ValueError, "stride"),
    ((3, 4, 3), {"padding": -1}, ValueError, "padding"),
    ((3, 4, 3), {"padding": "same"}, TypeError, "padding"),
    ((3, 4, 3), {"output_padding": 1}, ValueError, "output_padding"),
    ((3, 4, 3), {"stride": 2, "output_padding": -1}, ValueError, "output_padding"),
    ((3, 4, 3), {"dilation": 0}, ValueError, "dilation"),
    ((3, 4, 3), {"dtype": np.float16}, TypeError, "dtype"),
], ids=["C_groups", "F_groups", "groups0", "in_float", "kernel0", "stride0", "pad_neg",
        "pad_same", "op_eq_stride", "op_neg", "dil0", "f16"])
def test_layer_constructor_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ConvTranspose2D(*args, **kwargs)
