"""Tests for ``numba_cnn.functional.conv2d`` / ``conv2d_backward`` against the NumPy reference
(``numba_cnn.reference``) and, when installed, PyTorch."""
import tracemalloc

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from numba_cnn import _args, _conv_plan
from numba_cnn import functional as F
from numba_cnn import reference as R

from _conv_cases import CASES, CASE_IDS, ConvCase, PoisonedEmptyNumpy, assert_close, \
    expected_out_hw, make_inputs, torch_conv2d

RTOL = {np.float64: 1e-10, np.float32: 1e-4}
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]


def _check_against_reference(case, x, w, b, g, rtol):
    """Forward and backward of the library vs the float64 reference of the *same* data."""
    y = F.conv2d(x, w, b, **case.kwargs)
    y_ref = R.conv2d(x, w, b, **case.kwargs)
    assert y.shape == (case.N, case.F) + expected_out_hw(case)
    assert_close(y, y_ref, rtol, "forward")

    gx, gw, gb = F.conv2d_backward(g, x, w, need_bias=case.bias, **case.kwargs)
    gx_ref, gw_ref, gb_ref = R.conv2d_backward(g, x, w, need_bias=case.bias, **case.kwargs)
    assert_close(gx, gx_ref, rtol, "grad_x")
    assert_close(gw, gw_ref, rtol, "grad_weight")
    if case.bias:
        assert gb is not None, "need_bias=True must return grad_bias"
        assert_close(gb, gb_ref, rtol, "grad_bias")
    else:
        assert gb is None, "need_bias=False must return None for grad_bias"
    return y, gx, gw, gb


# ---------------------------------------------------------------------------------------------
# Values: the curated case grid
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv2d_matches_reference(case, dtype, rng):
    x, w, b, g = make_inputs(case, rng, dtype)
    y, gx, gw, gb = _check_against_reference(case, x, w, b, g, RTOL[dtype])
    for name, out in (("y", y), ("grad_x", gx), ("grad_weight", gw), ("grad_bias", gb)):
        if out is not None:
            assert out.dtype == dtype, f"{name} dtype {out.dtype}, expected {np.dtype(dtype)}"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_output_position_is_written(case, rng, monkeypatch):
    # outputs are allocated uninitialised (np.empty) whenever the kernels cover every position
    monkeypatch.setattr(F, "np", PoisonedEmptyNumpy())
    x, w, b, g = make_inputs(case, rng, np.float32)
    _check_against_reference(case, x, w, b, g, RTOL[np.float32])


@pytest.mark.parametrize("channel_blocked", [False, True], ids=["grid", "channel_blocked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_both_layouts_match_reference(case, dtype, channel_blocked, rng, monkeypatch):
    # the shape rules send few of these small cases to the channel-blocked layout: force each
    # layout wherever it is implemented (the blocked one needs groups == 1)
    monkeypatch.setattr(_conv_plan, "FORCE_CHANNEL_BLOCKED", channel_blocked)
    monkeypatch.setattr(F, "np", PoisonedEmptyNumpy())
    x, w, b, g = make_inputs(case, rng, dtype)
    _check_against_reference(case, x, w, b, g, RTOL[dtype])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conv2d_matches_torch(case, rng, torch_mod):
    x, w, b, g = make_inputs(case, rng, np.float64)
    y_t, gx_t, gw_t, gb_t = torch_conv2d(torch_mod, case, x, w, b, g)
    assert_close(F.conv2d(x, w, b, **case.kwargs), y_t, 1e-10, "forward")
    gx, gw, gb = F.conv2d_backward(g, x, w, need_bias=True, **case.kwargs)
    assert_close(gx, gx_t, 1e-10, "grad_x")
    assert_close(gw, gw_t, 1e-10, "grad_weight")
    if gb_t is not None:
        assert_close(gb, gb_t, 1e-10, "grad_bias")


def test_positional_arguments_match_keywords(rng):
    case = ConvCase(2, 4, 7, 6, 6, 3, 2, stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                    groups=2)
    x, w, b, g = make_inputs(case, rng)
    y_pos = F.conv2d(x, w, b, (2, 1), (1, 2), (1, 2), 2)
    np.testing.assert_array_equal(y_pos, F.conv2d(x, w, b, **case.kwargs))
    assert_close(y_pos, R.conv2d(x, w, b, **case.kwargs), 1e-10, "forward")
    grads_pos = F.conv2d_backward(g, x, w, (2, 1), (1, 2), (1, 2), 2, True)
    grads_kw = F.conv2d_backward(g, x, w, need_bias=True, **case.kwargs)
    for a, k in zip(grads_pos, grads_kw):
        np.testing.assert_array_equal(a, k)


def test_package_aliases():
    import numba_cnn
    assert numba_cnn.F is F


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

CASE_DT = ConvCase(2, 4, 6, 5, 6, 3, 2, stride=(1, 2), padding=1, groups=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_native_dtype_preserved(dtype, rng):
    x, w, b, g = make_inputs(CASE_DT, rng, dtype)
    assert F.conv2d(x, w, b, **CASE_DT.kwargs).dtype == dtype
    assert F.conv2d(x, w, None, **CASE_DT.kwargs).dtype == dtype
    for out in F.conv2d_backward(g, x, w, **CASE_DT.kwargs):
        assert out.dtype == dtype


def test_float16_computed_as_float32(rng):
    x, w, b, g = make_inputs(CASE_DT, rng, np.float16)
    y = F.conv2d(x, w, b, **CASE_DT.kwargs)
    assert y.dtype == np.float32
    assert_close(y, R.conv2d(x, w, b, **CASE_DT.kwargs), 1e-4, "forward")
    grads = F.conv2d_backward(g, x, w, **CASE_DT.kwargs)
    for out, ref, name in zip(grads, R.conv2d_backward(g, x, w, **CASE_DT.kwargs),
                              ("grad_x", "grad_weight", "grad_bias")):
        assert out.dtype == np.float32, f"{name} dtype {out.dtype}"
        assert_close(out, ref, 1e-4, name)


@pytest.mark.parametrize("int_dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_and_bool_input_becomes_float64(int_dtype, rng):
    case = CASE_DT
    x = rng.integers(0, 2 if int_dtype is np.bool_ else 5, case.x_shape).astype(int_dtype)
    w = rng.integers(0, 2 if int_dtype is np.bool_ else 5, case.w_shape).astype(int_dtype)
    assert x.any() and not x.all()
    y = F.conv2d(x, w, **case.kwargs)
    assert y.dtype == np.float64
    assert_close(y, R.conv2d(x, w, **case.kwargs), 1e-12, "forward")
    g = rng.integers(-3, 4, y.shape).astype(int_dtype)
    for out, ref in zip(F.conv2d_backward(g, x, w, **case.kwargs),
                        R.conv2d_backward(g, x, w, **case.kwargs)):
        assert out.dtype == np.float64
        assert_close(out, ref, 1e-12, "backward")


def test_int_x_with_float32_weight_follows_numpy_promotion(rng):
    # np.result_type(int64, float32) is float64.
    x = rng.integers(-4, 5, CASE_DT.x_shape)
    w = rng.standard_normal(CASE_DT.w_shape).astype(np.float32)
    y = F.conv2d(x, w, **CASE_DT.kwargs)
    assert y.dtype == np.result_type(x.dtype, np.float32) == np.float64
    assert_close(y, R.conv2d(x, w, **CASE_DT.kwargs), 1e-10, "forward")


def test_mixed_float32_x_float64_weight_gives_float64(rng):
    x, _, _, g = make_inputs(CASE_DT, rng, np.float32)
    _, w, b, _ = make_inputs(CASE_DT, rng, np.float64)
    y = F.conv2d(x, w, b, **CASE_DT.kwargs)
    assert y.dtype == np.float64
    # float32 data is exactly representable in float64, so the result is float64-accurate.
    assert_close(y, R.conv2d(x, w, b, **CASE_DT.kwargs), 1e-10, "forward")
    grads = F.conv2d_backward(g, x, w, **CASE_DT.kwargs)
    for out, ref, name in zip(grads, R.conv2d_backward(g, x, w, **CASE_DT.kwargs),
                              ("grad_x", "grad_weight", "grad_bias")):
        assert out.dtype == np.float64, f"{name} dtype {out.dtype}"
        assert_close(out, ref, 1e-10, name)


def test_nested_list_input(rng):
    x, w, b, _ = make_inputs(ConvCase(1, 2, 4, 4, 2, 2, 2), rng)
    y = F.conv2d(x.tolist(), w.tolist(), b.tolist())
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    assert_close(y, R.conv2d(x, w, b), 1e-10, "forward")


# ---------------------------------------------------------------------------------------------
# Memory layout: outputs, non-contiguous inputs, no mutation, empty batch
# ---------------------------------------------------------------------------------------------

LAYOUT_CASES = [
    ConvCase(2, 4, 7, 6, 6, 3, 3, stride=2, padding=1, groups=2),
    ConvCase(2, 3, 6, 7, 5, 2, 4, padding="same", dilation=(2, 1)),
    ConvCase(1, 5, 5, 5, 5, 1, 1, groups=1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=["groups2", "same_dil", "k1x1"])
def test_outputs_are_new_c_contiguous_arrays(case, dtype, rng):
    x, w, b, g = make_inputs(case, rng, dtype)
    y = F.conv2d(x, w, b, **case.kwargs)
    outs = [("y", y)] + list(zip(("grad_x", "grad_weight", "grad_bias"),
                                 F.conv2d_backward(g, x, w, **case.kwargs)))
    for name, out in outs:
        assert isinstance(out, np.ndarray), name
        assert out.flags.c_contiguous, f"{name} is not C-contiguous"
        for inp in (x, w, b, g):
            assert not np.shares_memory(out, inp), f"{name} shares memory with an input"


def _noncontiguous(arr, kind):
    """A non-contiguous view with the same values as ``arr``. Gaps in the underlying buffer are
    poisoned (NaN, or -7 for integers) so that reading the wrong element shows."""
    poison = np.nan if arr.dtype.kind == "f" else -7
    if kind == "transposed" and arr.ndim == 4:
        base = np.ascontiguousarray(arr.transpose(0, 2, 3, 1))      # NHWC storage
        view = base.transpose(0, 3, 1, 2)
    elif kind == "transposed" or kind == "strided":
        # Every other element of a bigger array, last axis stored reversed.
        shape = list(arr.shape)
        shape[-1] *= 2
        base = np.full(shape, poison, dtype=arr.dtype)
        base[..., ::2] = arr[..., ::-1]
        view = base[..., ::2][..., ::-1]
    else:
        raise AssertionError(kind)
    np.testing.assert_array_equal(view, arr)
    assert not view.flags.c_contiguous
    return view


@pytest.mark.parametrize("kind", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", LAYOUT_CASES[:2], ids=["groups2", "same_dil"])
def test_noncontiguous_inputs(case, dtype, kind, rng):
    x, w, b, g = make_inputs(case, rng, dtype)
    xv, wv, bv, gv = (_noncontiguous(a, kind) for a in (x, w, b, g))
    tol = 1e-12 if dtype == np.float64 else 1e-6
    assert_close(F.conv2d(xv, wv, bv, **case.kwargs), F.conv2d(x, w, b, **case.kwargs), tol,
                 "forward")
    for out_v, out_c, name in zip(F.conv2d_backward(gv, xv, wv, **case.kwargs),
                                  F.conv2d_backward(g, x, w, **case.kwargs),
                                  ("grad_x", "grad_weight", "grad_bias")):
        assert out_v.flags.c_contiguous, name
        assert_close(out_v, out_c, tol, name)
    # And against the reference, in case the contiguous path is wrong too.
    assert_close(F.conv2d(xv, wv, bv, **case.kwargs), R.conv2d(x, w, b, **case.kwargs),
                 RTOL[dtype], "forward vs reference")


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int64],
                         ids=["f64", "f32", "f16", "i64"])
def test_inputs_not_modified(dtype, rng):
    case = LAYOUT_CASES[0]
    x, w, b, g = (a.astype(dtype) for a in make_inputs(case, rng, np.float64))
    views = [_noncontiguous(a, "strided") for a in (x, w, b, g)]
    for xx, ww, bb, gg in ((x, w, b, g), tuple(views)):
        copies = [np.array(a, copy=True) for a in (xx, ww, bb, gg)]
        bases = [np.array(v.base, copy=True) for v in views]
        F.conv2d(xx, ww, bb, **case.kwargs)
        F.conv2d_backward(gg, xx, ww, **case.kwargs)
        for a, c in zip((xx, ww, bb, gg), copies):
            np.testing.assert_array_equal(a, c)
        for v, c in zip(views, bases):  # including the NaN-poisoned gaps of the views
            np.testing.assert_array_equal(v.base, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [
    ConvCase(0, 3, 6, 5, 4, 3, 2, padding=1),
    ConvCase(0, 4, 7, 7, 6, 3, 3, stride=2, groups=2, dilation=2, padding="valid"),
], ids=["plain", "groups"])
def test_batch_zero(case, dtype):
    x = np.empty(case.x_shape, dtype)
    w = np.random.default_rng(1).standard_normal(case.w_shape).astype(dtype)
    b = np.arange(case.F, dtype=dtype) + 1
    oh, ow = expected_out_hw(case)
    y = F.conv2d(x, w, b, **case.kwargs)
    assert y.shape == (0, case.F, oh, ow) and y.dtype == dtype
    gx, gw, gb = F.conv2d_backward(np.empty((0, case.F, oh, ow), dtype), x, w, **case.kwargs)
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == w.shape and gw.dtype == dtype
    assert gb.shape == (case.F,) and gb.dtype == dtype
    np.testing.assert_array_equal(gw, 0)   # sum over an empty batch
    np.testing.assert_array_equal(gb, 0)
    assert F.conv2d_backward(np.empty((0, case.F, oh, ow), dtype), x, w, need_bias=False,
                             **case.kwargs)[2] is None


# ---------------------------------------------------------------------------------------------
# NaN and inf
# ---------------------------------------------------------------------------------------------

NAN_CASES = [
    ConvCase(2, 4, 8, 7, 6, 3, 3, stride=2, padding=1, groups=2),
    ConvCase(1, 3, 9, 9, 6, 3, 2, dilation=2, padding="same", groups=3),
    ConvCase(2, 2, 7, 8, 3, 2, 3, stride=(1, 2), padding=(0, 1), dilation=(2, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", NAN_CASES, ids=["groups2_s2", "depthwise_same_dil", "dil_s12"])
def test_nan_propagates_to_exactly_its_windows(case, dtype, rng):
    x, w, b, _ = make_inputs(case, rng, dtype)
    # Put the NaN in the second image, second channel group, off-centre pixel.
    pos = (case.N - 1, case.C - 1, case.H // 2 + 1, case.W // 2 - 1)
    x[pos] = np.nan
    y = F.conv2d(x, w, b, **case.kwargs)
    # Expected mask: outputs whose (dilated, strided, grouped) window covers pos, computed by
    # convolving an indicator with an all-ones kernel (no NaN arithmetic involved).
    indicator = np.zeros(case.x_shape)
    indicator[pos] = 1.0
    mask = R.conv2d(indicator, np.ones(case.w_shape), **case.kwargs) > 0.5
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(np.isnan(y), mask)
    ref = R.conv2d(np.where(np.isnan(x), 0, x), w, b, **case.kwargs)
    assert_close(y[~mask], ref[~mask], RTOL[dtype], "finite outputs")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 1, 1, 1), (1, 3, 4, 4), (5, 2, 13, 1),
                                   (2, 4, 33, 17)], ids=str)
def test_bias_gradient_matches_float64_reference_sums(shape, dtype, rng, monkeypatch):
    """``channel_sums``, the backward's bias gradient: each channel summed in float64, the
    same bits at any thread count, and a NaN or inf only in its own channel."""
    from numba_cnn import _threads
    monkeypatch.setattr(_threads, "SERIAL_WORK", 0)  # these small arrays on the threads too
    grad = rng.standard_normal(shape).astype(dtype)
    expected = grad.astype(np.float64).sum(axis=(0, 2, 3))
    summed = F._bias_gradient(grad)
    assert summed.dtype == dtype and summed.shape == (shape[1],)
    # float64: the sum's rounding error; float32: one rounding of the float64 sum
    np.testing.assert_allclose(summed, expected, rtol=1e-13 if dtype == np.float64 else 1e-7,
                               atol=1e-12)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_array_equal(F._bias_gradient(grad), summed)
    finally:
        numba.set_num_threads(threads)
    grad[-1, 0, -1, -1] = np.nan
    grad[0, -1, 0, 0] = np.inf if shape[1] > 1 else np.nan
    summed = F._bias_gradient(grad)
    assert np.isnan(summed[0]) and (shape[1] == 1 or np.isposinf(summed[-1]))
    assert np.isfinite(summed[1:-1]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(padding="same", dilation=2),
                                    dict(stride=(1, 2), padding=(0, 1), dilation=(2, 1))],
                         ids=["s2", "same_dil2", "dil_s12"])
def test_channel_blocked_weight_gradient_has_the_reference_nan_pattern(kwargs, dtype, rng):
    # the channel-blocked weight gradient reads x only inside valid output windows, so a NaN
    # makes exactly the entries NaN whose sum reaches it (the grid path may make more NaN)
    x = rng.standard_normal((2, 16, 9, 8)).astype(dtype)
    w = rng.standard_normal((16, 16, 3, 3)).astype(dtype)
    assert _conv_plan.blocked_weight_gradient(_geometry(x, w, kwargs), x.itemsize)
    x[1, 15, 5, 3] = np.nan
    x[0, 3, 0, 7] = np.nan
    g = rng.standard_normal(F.conv2d(x, w, **kwargs).shape).astype(dtype)
    grad_weight = F.conv2d_backward(g, x, w, **kwargs)[1]
    with np.errstate(invalid="ignore"):
        expected = R.conv2d_backward(g, x, w, **kwargs)[1]
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    np.testing.assert_array_equal(np.isnan(grad_weight), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert_close(grad_weight[finite], expected[finite], RTOL[dtype], "finite entries")


def _geometry(x, w, kwargs):
    return _args.conv2d_geometry(x.shape, w.shape, kwargs.get("stride", 1),
                                 kwargs.get("padding", 0), kwargs.get("dilation", 1), 1, "test")


def _lines_read(term_offsets, lanes, padded_height, padded_width):
    """The line (of its channel block) that each term of a blocked correlation reads for
    output line 0."""
    return (term_offsets // lanes // padded_width) % padded_height


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_blocked_plans_sum_exactly_the_tap_rows_that_read_real_lines(kernel, stride, dilation):
    # line_terms leaves out the terms that read zero padding, and only those: the results are
    # the same either way, so only this test would notice a real line left out or a padding
    # line summed
    for pad in range(0, (kernel - 1) * dilation + 1):
        for height in (1, 2, 5, 9):
            if (height + 2 * pad - (kernel - 1) * dilation - 1) < 0:
                continue  # no output
            g = _args.conv2d_geometry((1, 16, height, 4), (32, 16, kernel, 1), (stride, 1),
                                      (pad, 0), (dilation, 1), 1, "test")
            plan = _conv_plan.ChannelBlockedPlan(g, 4)
            reads = _lines_read(plan.term_offsets, plan.lanes, g.padded_height,
                                g.padded_width)
            for i, (first, count) in enumerate(plan.line_terms):
                line = i * stride + reads
                real = (line >= g.pad[0]) & (line < g.pad[0] + height)
                summed = np.zeros(real.size, dtype=bool)
                summed[first:first + count] = True
                np.testing.assert_array_equal(summed, real)
            grad_plan = _conv_plan.BlockedInputGradPlan(g, 4)
            for phase in grad_plan.phases:
                reads = _lines_read(phase.term_offsets, grad_plan.lanes,
                                    grad_plan.padded_height, grad_plan.padded_width)
                assert len(phase.line_terms) == phase.rows
                for i, (first, count) in enumerate(phase.line_terms):
                    line = i + reads  # a phase correlates the gradient at stride 1
                    real = (line >= grad_plan.pad_top) & (line < grad_plan.pad_top + g.out_height)
                    summed = np.zeros(real.size, dtype=bool)
                    summed[first:first + count] = True
                    np.testing.assert_array_equal(summed, real)



@pytest.mark.parametrize("channels", [16, 21, 40])
def test_blocked_terms_read_every_real_channel_at_every_tap_once(channels):
    # a partly filled last channel block has no terms for its missing channels (their weights
    # are zero): the terms are exactly the (channel, tap) pairs, tap rows outermost
    g = _args.conv2d_geometry((1, channels, 6, 7), (channels + 3, channels, 3, 2), 1, 1, 1, 1,
                              "test")
    plan = _conv_plan.ChannelBlockedPlan(g, 4)
    lanes, height, width = plan.lanes, g.padded_height, g.padded_width
    lane, pixel = plan.term_offsets % lanes, plan.term_offsets // lanes
    block, row, column = pixel // (height * width), pixel // width % height, pixel % width
    channel = block * lanes + lane
    assert (channel < channels).all()
    pairs = set(zip(channel.tolist(), row.tolist(), column.tolist()))
    assert len(pairs) == plan.term_offsets.size == channels * 3 * 2
    assert (np.diff(row) >= 0).all()  # tap rows outermost
    grad_plan = _conv_plan.BlockedInputGradPlan(g, 4)
    (phase,) = grad_plan.phases
    lane, pixel = phase.term_offsets % lanes, phase.term_offsets // lanes
    filters = (pixel // (grad_plan.padded_height * grad_plan.padded_width)) * lanes + lane
    assert (filters < g.out_channels).all()
    assert phase.term_offsets.size == len(set(phase.term_offsets.tolist())) == (
        g.out_channels * 3 * 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_blocked_passes_on_few_wide_lines_unblock_afterwards(dtype, rng, monkeypatch):
    # one output line of 32 channels: a line of output slots per thread would outweigh the
    # whole blocked output once there are 2 threads, so the sums go through a blocked output
    monkeypatch.setattr(_conv_plan, "FORCE_CHANNEL_BLOCKED", True)
    x = rng.standard_normal((1, 32, 1, 40)).astype(dtype)
    w = rng.standard_normal((32, 32, 1, 3)).astype(dtype)
    b = rng.standard_normal(32).astype(dtype)
    lanes = 64 // x.itemsize
    slots = F._output_slots(1, 32 // lanes, 1, 40, lanes, x.dtype)
    assert (slots is None) == (numba.get_num_threads() * 2 > 32 // lanes)
    y = F.conv2d(x, w, b, padding=(0, 1))
    assert_close(y, R.conv2d(x, w, b, padding=(0, 1)), RTOL[dtype], "forward")
    g = rng.standard_normal(y.shape).astype(dtype)
    grad_x, grad_w, _ = F.conv2d_backward(g, x, w, padding=(0, 1))
    ref_x, ref_w, _ = R.conv2d_backward(g, x, w, padding=(0, 1))
    assert_close(grad_x, ref_x, RTOL[dtype], "grad_x")
    assert_close(grad_w, ref_w, RTOL[dtype], "grad_weight")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("channels, filters", [(8, 4), (4, 8)])
def test_grid_passes_unpack_from_their_tasks_or_afterwards(channels, filters, batch, dtype,
                                                           rng):
    # Few channels: the grid. A task computes 4 rows of an image (filters in the forward,
    # channels in the input gradient), so with one image and two threads, a task per thread
    # would outweigh the whole output grid of 4 rows, and the sums go through it and are
    # unpacked afterwards; otherwise the tasks write y's or grad_x's crop themselves.
    threads = min(2, numba.config.NUMBA_NUM_THREADS)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        check_grid_unpacking(channels, filters, batch, threads, dtype, rng)
    finally:
        numba.set_num_threads(previous)


def check_grid_unpacking(channels, filters, batch, threads, dtype, rng):
    # > 1M multiply-adds: not left to one thread
    x = rng.standard_normal((batch, channels, 64, 64)).astype(dtype)
    w = rng.standard_normal((filters, channels, 3, 3)).astype(dtype)
    b = rng.standard_normal(filters).astype(dtype)
    for rows in (filters, channels):  # forward, input gradient
        plan = _conv_plan.ForwardPlan.for_geometry(_args.conv2d_geometry(
            (batch, channels, 64, 64), (rows, channels, 3, 3), 1, 1, 1, 1))
        _, tiles, slot_shape = F._grid_correlation(plan, (plan.block_shape,), 4096, (rows, 9),
                                                   x.itemsize, batch, threads)
        assert (slot_shape is None) == (rows * batch < 4 * tiles * threads)
    y = F.conv2d(x, w, b, padding=1)
    assert_close(y, R.conv2d(x, w, b, padding=1), RTOL[dtype], "forward")
    g = rng.standard_normal(y.shape).astype(dtype)
    grad_x, grad_w, _ = F.conv2d_backward(g, x, w, padding=1)
    ref_x, ref_w, _ = R.conv2d_backward(g, x, w, padding=1)
    assert_close(grad_x, ref_x, RTOL[dtype], "grad_x")
    assert_close(grad_w, ref_w, RTOL[dtype], "grad_weight")


@pytest.mark.parametrize("channels, filters, width, forward, input_gradient", [
    (128, 128, 28, True, True),     # res28
    (100, 120, 19, True, True),     # odd3: 15/16 of the filters' vectors, 7/8 of the channels'
    (100, 120, 24, True, False),    # wider: 7/8 is not enough
    (72, 72, 14, True, True),       # 9/10 filled, narrow
    (72, 72, 28, False, False),     # 9/10 filled, wide
    (64, 36, 28, False, True),      # 36 of 48 lanes written by the forward
    (40, 40, 7, False, False),      # 5/6 filled
    (16, 64, 28, True, False),      # one vector of channels read (forward) / written
    (64, 16, 28, False, True),      # written (forward) / one vector read
    (8, 64, 28, False, False),      # half a vector read (forward) / written
])
def test_blocked_layout_rules(channels, filters, width, forward, input_gradient):
    # the layout choice documented beside _blocked_correlation_pays, float32 (16 lanes)
    g = _args.conv2d_geometry((8, channels, width, width), (filters, channels, 3, 3), 1, 1, 1, 1,
                              "test")
    assert _conv_plan.blocked_forward(g, 4) == forward
    assert _conv_plan.blocked_input_gradient(g, 4) == input_gradient


@pytest.mark.parametrize("batch, stride, forward, input_gradient", [
    (8, 1, True, True), (16, 1, True, True), (4, 1, False, False), (1, 1, False, False),
    (8, 2, True, False),  # a strided input gradient needs two vectors read
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reading_one_vector_of_channels_takes_a_batch_of_8(batch, stride, forward,
                                                           input_gradient, dtype):
    itemsize = np.dtype(dtype).itemsize
    lanes = _conv_plan.VECTOR_BYTES // itemsize
    # one vector of channels in, two filled vectors of filters out, and the other way round
    one_to_two = _args.conv2d_geometry((batch, lanes, 28, 28), (2 * lanes, lanes, 3, 3),
                                       stride, 1, 1, 1, "test")
    two_to_one = _args.conv2d_geometry((batch, 2 * lanes, 28, 28), (lanes, 2 * lanes, 3, 3),
                                       stride, 1, 1, 1, "test")
    assert _conv_plan.blocked_forward(one_to_two, itemsize) == forward
    assert _conv_plan.blocked_input_gradient(two_to_one, itemsize) == input_gradient
    # two vectors read: any batch and stride (up to 28 pixels wide)
    two_to_two = _args.conv2d_geometry((batch, 2 * lanes, 28, 28), (2 * lanes, 2 * lanes, 3, 3),
                                       stride, 1, 1, 1, "test")
    assert _conv_plan.blocked_forward(two_to_two, itemsize)
    assert _conv_plan.blocked_input_gradient(two_to_two, itemsize)


def test_inf_propagates_like_reference(rng):
    case = ConvCase(2, 3, 7, 7, 4, 3, 3, padding=1)
    x, w, b, _ = make_inputs(case, rng)
    w = np.abs(w) + 0.1          # positive weights: +inf -> +inf, -inf -> -inf, both -> nan
    x[0, 0, 3, 2] = np.inf
    x[0, 0, 3, 3] = -np.inf
    x[1, 2, 0, 6] = np.inf
    y = F.conv2d(x, w, b, **case.kwargs)
    with np.errstate(invalid="ignore"):   # inf - inf in the reference is the point here
        ref = R.conv2d(x, w, b, **case.kwargs)
    assert np.isnan(ref).any() and np.isposinf(ref).any() and np.isneginf(ref).any()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))
    finite = np.isfinite(ref)
    assert_close(y[finite], ref[finite], 1e-10, "finite outputs")


@pytest.mark.parametrize("channel_blocked", [True, False], ids=["blocked", "grid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_finite_weights_propagate_like_reference(channel_blocked, dtype, rng, monkeypatch):
    # an inf or NaN weight on a tap row that reads the padding makes the padded rows' outputs
    # NaN (0 * inf), as in PyTorch: the blocked forward, which leaves out the terms that read
    # padding rows, must not leave out these
    monkeypatch.setattr(_conv_plan, "FORCE_CHANNEL_BLOCKED", channel_blocked)
    x = rng.standard_normal((2, 32, 6, 5)).astype(dtype)
    w = rng.standard_normal((32, 32, 3, 3)).astype(dtype)
    w[0, 0, 0, 1] = np.inf  # tap row 0: reads the top padding row for output row 0
    w[5, 3, 2, 2] = np.nan  # tap row 2: the bottom padding row for the last output row
    geometry = _geometry(x, w, dict(padding=1))
    assert _conv_plan.blocked_forward(geometry, x.itemsize) == channel_blocked
    y = F.conv2d(x, w, padding=1)
    with np.errstate(invalid="ignore"):
        ref = R.conv2d(x, w, padding=1)
    assert np.isnan(ref[:, 0, 0]).all() and np.isnan(ref[:, 5, -1]).all()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
    finite = np.isfinite(ref)
    assert_close(y[finite], ref[finite], RTOL[dtype], "finite outputs")



@pytest.mark.parametrize("height, channels", [(28, 32), (6, 48)],
                         ids=["larger_than_weight", "smaller_than_weight"])
def test_strided_blocked_input_gradient_holds_one_phase_where_grad_x_is_large(
        height, channels, rng):
    # Stride 2: four phases whose results together are as large as grad_x. Where grad_x is
    # larger than the weight, each is written into grad_x before the next is computed, so the
    # pass's peak beyond grad_x stays well under one grad_x; elsewhere all are computed first.
    x = rng.standard_normal((2, channels, height, height - 1)).astype(np.float32)
    w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
    geometry = _geometry(x, w, dict(stride=2, padding=1))
    assert _conv_plan.blocked_input_gradient(geometry, x.itemsize)
    g = rng.standard_normal(geometry.output_shape).astype(np.float32)
    F._conv2d_grad_input(g, w, None, geometry)  # compiled before memory is traced
    tracemalloc.start()
    try:
        grad_x = F._conv2d_grad_input(g, w, None, geometry)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_close(grad_x, R.conv2d_backward(g, x, w, stride=2, padding=1)[0], RTOL[np.float32],
                 "grad_x")
    if grad_x.nbytes > w.nbytes:
        assert peak - grad_x.nbytes < 0.75 * grad_x.nbytes, (peak, grad_x.nbytes)

def test_blocked_weight_gradient_is_unblocked_in_place(rng):
    # 32 channels (whole vectors), one batch part: the weight gradient is written over its
    # channel-blocked partial sums, so the pass holds no second weight-sized array
    x = rng.standard_normal((2, 32, 6, 6)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    geometry = _args.conv2d_geometry(x.shape, w.shape, 2, 1, 1, 1, "test")
    assert _conv_plan.blocked_weight_gradient(geometry, 4)
    assert _conv_plan.ChannelBlockedPlan.for_geometry(geometry, 4).batch_parts == 1
    g = rng.standard_normal(geometry.output_shape).astype(np.float32)
    F._conv2d_grad_weight(g, x, geometry)  # compiled before memory is traced
    tracemalloc.start()
    try:
        grad_w = F._conv2d_grad_weight(g, x, geometry)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_close(grad_w, R.conv2d_backward(g, x, w, stride=2, padding=1)[1], RTOL[np.float32],
                 "grad_weight")
    assert peak - grad_w.nbytes < 0.5 * grad_w.nbytes, (peak, grad_w.nbytes)


@pytest.mark.parametrize("stride", [1, 2])
def test_backward_of_few_input_channels_holds_no_whole_copy_of_grad_out(stride, rng):
    # One input channel, 16 filters: x is small against grad_out, and the grid passes' packed
    # copies of grad_out (with margins or spare columns) would dominate a whole-batch peak. The
    # input gradient packs per thread and the weight gradient in parts of the batch.
    x = rng.standard_normal((24, 1, 20, 20)).astype(np.float32)
    w = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    geometry = _args.conv2d_geometry(x.shape, w.shape, stride, 1, 1, 1, "test")
    assert not (_conv_plan.blocked_input_gradient(geometry, 4)
                or _conv_plan.blocked_weight_gradient(geometry, 4))
    g = rng.standard_normal(geometry.output_shape).astype(np.float32)
    F.conv2d_backward(g, x, w, stride=stride, padding=1)  # compiled before memory is traced
    tracemalloc.start()
    try:
        grad_x, grad_w, _ = F.conv2d_backward(g, x, w, stride=stride, padding=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    ref_x, ref_w, _ = R.conv2d_backward(g, x, w, stride=stride, padding=1)
    assert_close(grad_x, ref_x, RTOL[np.float32], "grad_x")
    assert_close(grad_w, ref_w, RTOL[np.float32], "grad_weight")
    arrays = 2 * (x.nbytes + g.nbytes + w.nbytes)  # of a forward + backward
    assert peak - grad_x.nbytes - grad_w.nbytes < 0.25 * arrays, (peak, arrays)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

_r = np.random.default_rng(7)
X = _r.standard_normal((2, 4, 6, 6))
W = _r.standard_normal((6, 4, 3, 3))
W_G2 = _r.standard_normal((6, 2, 3, 3))
B = _r.standard_normal(6)
G = _r.standard_normal((2, 6, 4, 4))       # grad_out for X, W with stride 1, padding 0

BAD_FORWARD = [
    # id, args, kwargs, exception, regex the message must match
    ("x_3d", (X[0], W), {}, ValueError, r"\bx\b"),
    ("x_5d", (X[None], W), {}, ValueError, r"\bx\b"),
    ("x_scalar", (np.float64(3.0), W), {}, ValueError, r"\bx\b"),
    ("weight_3d", (X, W[0]), {}, ValueError, "weight"),
    ("weight_5d", (X, W[None]), {}, ValueError, "weight"),
    ("channel_mismatch", (X, W[:, :3]), {}, ValueError, "channels"),
    ("channel_mismatch_groups", (X, W_G2[:, :1]), {"groups": 2}, ValueError, "channels"),
    ("groups_not_dividing_C", (X, W[:, :1]), {"groups": 3}, ValueError, "groups"),
    ("groups_not_dividing_F", (X, W_G2[:5]), {"groups": 2}, ValueError, "groups"),
    ("groups_0", (X, W), {"groups": 0}, ValueError, "groups"),
    ("groups_negative", (X, W), {"groups": -2}, ValueError, "groups"),
    ("groups_float", (X, W_G2), {"groups": 2.0}, TypeError, "groups"),
    ("groups_str", (X, W_G2), {"groups": "2"}, TypeError, "groups"),
    ("stride_0", (X, W), {"stride": 0}, ValueError, "stride"),
    ("stride_pair_0", (X, W), {"stride": (1, 0)}, ValueError, "stride"),
    ("stride_negative", (X, W), {"stride": -1}, ValueError, "stride"),
    ("stride_float", (X, W), {"stride": 1.5}, TypeError, "stride"),
    ("stride_triple", (X, W), {"stride": (1, 1, 1)}, TypeError, "stride"),
    ("dilation_0", (X, W), {"dilation": 0}, ValueError, "dilation"),
    ("dilation_pair_0", (X, W), {"dilation": (0, 2)}, ValueError, "dilation"),
    ("padding_negative", (X, W), {"padding": -1}, ValueError, "padding"),
    ("padding_pair_negative", (X, W), {"padding": (0, -1)}, ValueError, "padding"),
    ("padding_unknown_str", (X, W), {"padding": "full"}, ValueError, "padding"),
    ("padding_float", (X, W), {"padding": 0.5}, TypeError, "padding"),
    ("same_stride2", (X, W), {"padding": "same", "stride": 2}, ValueError, "same"),
    ("same_stride_pair", (X, W), {"padding": "same", "stride": (1, 2)}, ValueError, "same"),
    ("kernel_larger_than_input", (X, _r.standard_normal((2, 4, 7, 3))), {}, ValueError, None),
    ("dilated_kernel_too_big", (X, W), {"dilation": 3}, ValueError, None),
    ("dilated_kernel_too_big_padded", (X, W), {"dilation": (4, 1), "padding": 1}, ValueError,
     None),
    ("bias_wrong_length", (X, W, B[:5]), {}, ValueError, "bias"),
    ("bias_2d", (X, W, B[:, None]), {}, ValueError, "bias"),
    ("bias_scalar", (X, W, np.float64(1.0)), {}, ValueError, "bias"),
    ("bias_complex", (X, W, B.astype(complex)), {}, TypeError, "bias"),
    ("x_complex", (X.astype(np.complex128), W), {}, TypeError, None),
    ("weight_complex", (X, W.astype(np.complex64)), {}, TypeError, None),
    ("x_object", (X.astype(object), W), {}, TypeError, None),
    ("x_string", (X.astype(str), W), {}, TypeError, None),
    ("weight_string", (X, np.full(W.shape, "a")), {}, TypeError, None),
    ("x_ragged", ([[[[1.0, 2.0], [3.0]]]], W), {}, (TypeError, ValueError), None),
]


@pytest.mark.parametrize("args, kwargs, exc, match",
                         [c[1:] for c in BAD_FORWARD], ids=[c[0] for c in BAD_FORWARD])
def test_conv2d_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        F.conv2d(*args, **kwargs)


BAD_BACKWARD = [
    ("grad_out_wrong_shape", (G[:, :, :3], X, W), {}, ValueError, "grad_out"),
    ("grad_out_wrong_channels", (G[:, :5], X, W), {}, ValueError, "grad_out"),
    ("grad_out_wrong_batch", (G[:1], X, W), {}, ValueError, "grad_out"),
    ("grad_out_for_other_stride", (G, X, W), {"stride": 2}, ValueError, "grad_out"),
    ("grad_out_3d", (G[0], X, W), {}, ValueError, "grad_out"),
    ("grad_out_complex", (G.astype(complex), X, W), {}, TypeError, None),
    ("grad_out_string", (G.astype(str), X, W), {}, TypeError, None),
    ("x_3d", (G, X[0], W), {}, ValueError, r"\bx\b"),
    ("weight_3d", (G, X, W[0]), {}, ValueError, "weight"),
    ("channel_mismatch", (G, X, W[:, :3]), {}, ValueError, "channels"),
    ("groups_not_dividing", (G, X, W[:, :1]), {"groups": 3}, ValueError, "groups"),
    ("groups_float", (G, X, W_G2), {"groups": 2.0}, TypeError, "groups"),
    ("stride_0", (G, X, W), {"stride": 0}, ValueError, "stride"),
    ("dilation_0", (G, X, W), {"dilation": 0}, ValueError, "dilation"),
    ("padding_negative", (G, X, W), {"padding": -1}, ValueError, "padding"),
    ("padding_unknown_str", (G, X, W), {"padding": "full"}, ValueError, "padding"),
    ("same_stride2", (G, X, W), {"padding": "same", "stride": 2}, ValueError, "same"),
    ("x_complex", (G, X.astype(complex), W), {}, TypeError, None),
    ("x_object", (G, X.astype(object), W), {}, TypeError, None),
]


@pytest.mark.parametrize("args, kwargs, exc, match",
                         [c[1:] for c in BAD_BACKWARD], ids=[c[0] for c in BAD_BACKWARD])
def test_conv2d_backward_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        F.conv2d_backward(*args, **kwargs)


@pytest.mark.parametrize("name, valid, lookalike", [
    ("stride", 1, True), ("stride", 1, 1.0), ("padding", 1, 1.0), ("padding", (1, 1), (1.0, 1)),
    ("dilation", (1, 1), (True, 1)), ("groups", 2, 2.0), ("stride", 2, np.float64(2.0))])
def test_validation_cache_refuses_values_equal_to_a_cached_one(name, valid, lookalike):
    # geometries are cached by their arguments: 1.0 == True == 1 with one hash, but only the
    # int is valid, so a call with the int must not let the others through
    w = W_G2 if name == "groups" else W
    F.conv2d(X, w, **{name: valid})
    with pytest.raises(TypeError, match=name):
        F.conv2d(X, w, **{name: lookalike})


def test_validation_cache_returns_the_geometry_it_would_compute():
    arguments = ((2, 4, 9, 8), (6, 2, 3, 2), (2, 1), 1, (1, 2), 2, "conv2d")
    fresh = _args.conv2d_geometry.__wrapped__(*arguments)
    assert _args.conv2d_geometry(*arguments) == fresh
    assert _args.conv2d_geometry(*arguments) is _args.conv2d_geometry(*arguments)  # cached
    assert _args.conv2d_geometry(*arguments[:2], [2, 1], *arguments[3:]) == fresh  # not cached


def test_bad_input_fixtures_are_otherwise_valid():
    # Guard against the bad-input table passing for the wrong reason.
    assert F.conv2d(X, W, B).shape == (2, 6, 4, 4)
    assert F.conv2d(X, W_G2, B, groups=2).shape == (2, 6, 4, 4)
    assert F.conv2d(X, W, padding="same").shape == (2, 6, 6, 6)
    assert len(F.conv2d_backward(G, X, W)) == 3


# ---------------------------------------------------------------------------------------------
# Property test: random valid geometries
# ---------------------------------------------------------------------------------------------

_int_or_pair = lambda lo, hi: st.one_of(  # noqa: E731
    st.integers(lo, hi), st.tuples(st.integers(lo, hi), st.integers(lo, hi)))


def _as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    C = groups * draw(st.integers(1, 6 // groups))
    Fo = groups * draw(st.integers(1, 6 // groups))
    N = draw(st.integers(1, 2))
    KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(_int_or_pair(1, 3))
    dilation = draw(_int_or_pair(1, 3))
    if _as_pair(stride) == (1, 1):
        padding = draw(st.one_of(st.sampled_from(["same", "valid"]), _int_or_pair(0, 2)))
    else:
        padding = draw(st.one_of(st.just("valid"), _int_or_pair(0, 2)))
    dh, dw = _as_pair(dilation)
    if padding == "same":
        pad_total = (dh * (KH - 1), dw * (KW - 1))
    elif padding == "valid":
        pad_total = (0, 0)
    else:
        pad_total = tuple(2 * p for p in _as_pair(padding))
    h_min = max(1, dh * (KH - 1) + 1 - pad_total[0])
    w_min = max(1, dw * (KW - 1) + 1 - pad_total[1])
    assume(h_min <= 9 and w_min <= 9)
    H, Wd = draw(st.integers(h_min, 9)), draw(st.integers(w_min, 9))
    bias = draw(st.booleans())
    case = ConvCase(N, C, H, Wd, Fo, KH, KW, stride, padding, dilation, groups, bias)
    return case, draw(st.integers(0, 2 ** 32 - 1))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(conv_cases())
def test_conv2d_property_random_geometry(case_and_seed):
    case, seed = case_and_seed
    x, w, b, g = make_inputs(case, np.random.default_rng(seed), np.float64)
    _check_against_reference(case, x, w, b, g, 1e-10)
