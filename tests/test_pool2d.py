"""Tests of 2-D max / average / global average pooling and their backward passes.

The fast path (``numba_cnn._pooling``) is checked against the float64 NumPy references
(``numba_cnn._reference_pool``) and, when torch is importable, against
``torch.nn.functional.max_pool2d`` / ``avg_pool2d`` / ``adaptive_avg_pool2d`` and their autograd
gradients. Shapes are tiny and only float32 / float64 (plus int64 indices) reach the kernels, so
each kernel compiles in two signatures for the whole file.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from numba_cnn import _reference_pool as ref
from numba_cnn.layers import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from numba_cnn._pooling import (_pool_geometry, _pool_params, avg_pool2d, avg_pool2d_backward,
                                global_avg_pool2d, global_avg_pool2d_backward, max_pool2d,
                                max_pool2d_backward)

try:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
except Exception:  # ImportError or a broken install: torch comparisons skip, the rest runs
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

RTOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]


def _data(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _ties(shape, seed=0):
    """Integer-valued floats from {0, 1, 2}: most windows hold several equal maxima."""
    return np.random.default_rng(seed).integers(0, 3, shape).astype(np.float64)


def _close(actual, expected, dtype):
    rtol = RTOL[np.dtype(dtype).type]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol)


# (input shape, max-pool keyword arguments): each line exercises something specific.
MAX_CASES = [
    ((2, 3, 8, 8), dict(kernel_size=2)),                                   # default stride
    ((2, 3, 7, 7), dict(kernel_size=3, stride=2, padding=1)),              # ResNet stem
    ((1, 2, 6, 5), dict(kernel_size=3, stride=1)),                         # overlapping windows
    ((2, 2, 7, 9), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0),
                        dilation=(1, 2))),                                 # non-square all
    ((1, 2, 9, 8), dict(kernel_size=3, padding=1, dilation=2, stride=1)),  # dilation + padding
    ((2, 1, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),   # drops last
    ((1, 2, 6, 6), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),   # ceil + pad
    ((1, 2, 5, 7), dict(kernel_size=2, stride=2, ceil_mode=True)),         # partial last window
    ((2, 2, 7, 6), dict(kernel_size=(7, 6))),                              # kernel == input
    ((1, 1, 4, 4), dict(kernel_size=5, stride=2, ceil_mode=True)),         # kernel > input, ceil
    ((1, 2, 8, 7), dict(kernel_size=2, stride=3)),                         # stride > kernel
    ((1, 1, 4, 4), dict(kernel_size=2, stride=3, dilation=4, ceil_mode=True)),  # taps past end
    ((1, 1, 1, 1), dict(kernel_size=1)),                                   # 1x1 everything
]

AVG_CASES = [
    ((2, 3, 8, 8), dict(kernel_size=2)),
    ((2, 3, 7, 7), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 3, 7, 7), dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
    ((1, 2, 6, 5), dict(kernel_size=3, stride=1)),                         # overlapping windows
    ((2, 2, 7, 9), dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0))),
    ((2, 1, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    ((1, 2, 5, 5), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((1, 2, 5, 5), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                        count_include_pad=False)),
    ((1, 2, 5, 7), dict(kernel_size=2, stride=2, ceil_mode=True)),         # clipped last window
    ((2, 2, 7, 6), dict(kernel_size=(7, 6))),                              # kernel == input
    ((1, 1, 4, 4), dict(kernel_size=5, stride=2, ceil_mode=True)),
    ((1, 1, 4, 4), dict(kernel_size=5, stride=2, ceil_mode=True, count_include_pad=False)),
    ((1, 2, 6, 6), dict(kernel_size=2, divisor_override=5)),
    ((1, 2, 6, 6), dict(kernel_size=3, stride=2, padding=1, divisor_override=-3,
                        ceil_mode=True, count_include_pad=False)),
    ((1, 2, 8, 7), dict(kernel_size=2, stride=3)),
]


def _avg_backward_args(kwargs):
    kwargs = dict(kwargs)
    return kwargs.pop("kernel_size"), kwargs


# ---------------------------------------------------------------------------------------------
# Against the NumPy references
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, kwargs", MAX_CASES)
def test_max_pool_matches_reference(shape, kwargs):
    for x in (_data(shape), _ties(shape, seed=1)):
        y, indices = max_pool2d(x, return_indices=True, **kwargs)
        y_ref, indices_ref = ref.max_pool2d(x, return_indices=True, **kwargs)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(indices, indices_ref)
        grad_out = _data(y.shape, seed=2)
        _close(max_pool2d_backward(grad_out, indices, x.shape),
               ref.max_pool2d_backward(grad_out, indices_ref, x.shape), np.float64)


@pytest.mark.parametrize("shape, kwargs", AVG_CASES)
def test_avg_pool_matches_reference(shape, kwargs):
    x = _data(shape)
    y = avg_pool2d(x, **kwargs)
    _close(y, ref.avg_pool2d(x, **kwargs), np.float64)
    grad_out = _data(y.shape, seed=2)
    kernel_size, rest = _avg_backward_args(kwargs)
    _close(avg_pool2d_backward(grad_out, x.shape, kernel_size, **rest),
           ref.avg_pool2d_backward(grad_out, x.shape, kernel_size, **rest), np.float64)


def test_global_avg_pool_matches_reference():
    x = _data((2, 3, 5, 4))
    y = global_avg_pool2d(x)
    assert y.shape == (2, 3, 1, 1)
    _close(y, ref.global_avg_pool2d(x), np.float64)
    _close(y, avg_pool2d(x, (5, 4)), np.float64)
    grad_out = _data((2, 3, 1, 1), seed=1)
    _close(global_avg_pool2d_backward(grad_out, x.shape),
           ref.global_avg_pool2d_backward(grad_out, x.shape), np.float64)


def test_max_pool_ties_go_to_first_maximum():
    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 0.0, 3.0]]]])
    y, indices = max_pool2d(x, (2, 3), return_indices=True)
    assert y[0, 0, 0, 0] == 3.0 and indices[0, 0, 0, 0] == 1
    # All equal: the first in-image tap (padding, being -inf, never wins).
    y, indices = max_pool2d(np.full((1, 1, 3, 3), 7.0), 3, stride=1, padding=1,
                            return_indices=True)
    assert (y == 7.0).all()
    np.testing.assert_array_equal(indices[0, 0], [[0, 0, 1], [0, 0, 1], [3, 3, 4]])


def test_max_pool_nan_gives_nan_and_first_nan_index():
    x = np.array([[[[0.0, np.nan, 9.0, np.nan],
                    [np.nan, 5.0, -np.inf, 1.0]]]])
    y, indices = max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y).all()
    np.testing.assert_array_equal(indices[0, 0, 0], [1, 3])


def test_max_pool_inf_windows():
    x = np.full((1, 1, 2, 4), -np.inf)
    x[0, 0, 1, 3] = np.inf
    y, indices = max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(y[0, 0, 0], [-np.inf, np.inf])
    np.testing.assert_array_equal(indices[0, 0, 0], [0, 7])


# The kernels' unrolled path (square 2x2 / 3x3 windows, stride_w 1 or 2, no dilation) handles
# the interior outputs of a row in chunks of 8-32 with the last chunk moved back over the
# previous one; the rest of the row (padding borders) and rows touching the padding take the
# general loops. These widths give interior runs shorter than, equal to and longer than a chunk,
# with and without a remainder; the data hold ties, NaN, -inf and +inf.
UNROLLED_SHAPES = [(1, 2, 7, 75), (2, 1, 9, 70), (1, 1, 6, 34)]
UNROLLED_WINDOWS = [dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil)
                    for kernel in (2, 3) for stride in ((1, 1), (2, 2), (3, 3), (3, 2), (2, 1))
                    for padding in (0, 1) for ceil in (False, True)]


def _special_values(shape, dtype, seed):
    x = _ties(shape, seed).astype(dtype)
    picks = np.random.default_rng(seed + 1).random(shape)
    x[picks < 0.02] = np.nan
    x[(picks >= 0.02) & (picks < 0.04)] = -np.inf
    x[(picks >= 0.04) & (picks < 0.05)] = np.inf
    return x


def _on_dirty_memory(call, shape, dtype):
    """Run ``call`` right after freeing a NaN-filled array of ``shape``: the allocator tends to
    hand the same block to the call's output, so positions a kernel forgets to write show up."""
    garbage = np.full(shape, np.nan, dtype)
    del garbage
    return call()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UNROLLED_SHAPES)
def test_unrolled_windows_match_reference(shape, dtype):
    for kwargs in UNROLLED_WINDOWS:
        for x in (_data(shape, dtype, seed=3), _special_values(shape, dtype, seed=4)):
            y, indices = max_pool2d(x, return_indices=True, **kwargs)
            y_ref, indices_ref = ref.max_pool2d(x, return_indices=True, **kwargs)
            np.testing.assert_array_equal(y, y_ref.astype(dtype), err_msg=str(kwargs))
            np.testing.assert_array_equal(indices, indices_ref, err_msg=str(kwargs))
        x = _data(shape, dtype, seed=5)
        grad_out = _data(y.shape, dtype, seed=6)
        kernel_size, rest = _avg_backward_args(kwargs)
        for extra in (dict(), dict(count_include_pad=False), dict(divisor_override=3)):
            _close(avg_pool2d(x, **kwargs, **extra), ref.avg_pool2d(x, **kwargs, **extra), dtype)
            grad_x = _on_dirty_memory(
                lambda: avg_pool2d_backward(grad_out, shape, kernel_size, **rest, **extra),
                shape, dtype)
            _close(grad_x, ref.avg_pool2d_backward(grad_out, shape, kernel_size, **rest, **extra),
                   dtype)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("divisor", [3, 2**24 + 1, -(2**24 + 3)])
def test_avg_backward_divisor_override_rounds_like_the_general_path(divisor, padding):
    # The unrolled backward divides float32 gradients in float32 (exact while the divisor is an
    # integer float32 holds exactly); a larger divisor_override must still give the float64
    # quotient rounded once, in interior and border windows alike.
    grad_out = _data((1, 2, 3, 3), np.float32, seed=9)
    shape = (1, 2, 6 - 2 * padding, 6 - 2 * padding)
    grad_x = avg_pool2d_backward(grad_out, shape, 2, 2, padding, divisor_override=divisor)
    expected = ref.avg_pool2d_backward(grad_out.astype(np.float64), shape, 2, 2, padding,
                                       divisor_override=divisor).astype(np.float32)
    np.testing.assert_array_equal(grad_x, expected)


def test_output_size_formula_matches_reference_window_count():
    # _pool_geometry implements PyTorch's formula; the reference enumerates windows instead.
    for size in range(1, 10):
        for kernel in range(1, 5):
            for stride in range(1, 4):
                for pad in range(kernel // 2 + 1):
                    for dilation in (1, 2, 3):
                        for ceil_mode in (False, True):
                            try:
                                geometry = _pool_geometry((1, 1, size, 1), (kernel, 1),
                                                          (stride, 1), (pad, 0),
                                                          (dilation, 1), ceil_mode, "t")
                            except ValueError:
                                continue
                            starts = ref._window_starts(size, kernel, stride, pad, dilation,
                                                        ceil_mode)
                            assert geometry.out_height == len(starts), (
                                size, kernel, stride, pad, dilation, ceil_mode)


# ---------------------------------------------------------------------------------------------
# Against PyTorch
# ---------------------------------------------------------------------------------------------

def _torch_grad(function, x, grad_out):
    x_t = torch.from_numpy(x.copy()).requires_grad_(True)
    y_t = function(x_t)
    if isinstance(y_t, tuple):
        y_t = y_t[0]
    y_t.backward(torch.from_numpy(grad_out.copy()))
    return x_t.grad.numpy()


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kwargs", MAX_CASES)
def test_max_pool_matches_torch(shape, kwargs, dtype):
    for x in (_data(shape, dtype), _ties(shape, seed=3).astype(dtype)):
        y, indices = max_pool2d(x, return_indices=True, **kwargs)
        y_t, indices_t = F.max_pool2d(torch.from_numpy(x), return_indices=True, **kwargs)
        assert y.dtype == dtype and indices.dtype == np.int64
        np.testing.assert_array_equal(y, y_t.numpy())
        np.testing.assert_array_equal(indices, indices_t.numpy())
        grad_out = _data(y.shape, dtype, seed=4)
        grad_x = max_pool2d_backward(grad_out, indices, x.shape)
        assert grad_x.dtype == dtype
        _close(grad_x, _torch_grad(lambda t: F.max_pool2d(t, **kwargs), x, grad_out), dtype)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kwargs", AVG_CASES)
def test_avg_pool_matches_torch(shape, kwargs, dtype):
    x = _data(shape, dtype)
    y = avg_pool2d(x, **kwargs)
    assert y.dtype == dtype
    _close(y, F.avg_pool2d(torch.from_numpy(x), **kwargs).numpy(), dtype)
    grad_out = _data(y.shape, dtype, seed=4)
    kernel_size, rest = _avg_backward_args(kwargs)
    grad_x = avg_pool2d_backward(grad_out, x.shape, kernel_size, **rest)
    assert grad_x.dtype == dtype
    _close(grad_x, _torch_grad(lambda t: F.avg_pool2d(t, **kwargs), x, grad_out), dtype)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_avg_pool_matches_torch(dtype):
    x = _data((2, 3, 5, 4), dtype)
    y = global_avg_pool2d(x)
    assert y.dtype == dtype
    _close(y, F.adaptive_avg_pool2d(torch.from_numpy(x), 1).numpy(), dtype)
    grad_out = _data((2, 3, 1, 1), dtype, seed=1)
    _close(global_avg_pool2d_backward(grad_out, x.shape),
           _torch_grad(lambda t: F.adaptive_avg_pool2d(t, 1), x, grad_out), dtype)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_windows_match_torch(dtype):
    x = _data((1, 2, 6, 6), dtype)
    # One NaN per 2x2 window where there is one: values and indices as PyTorch.
    x[0, 0, 0, 1] = x[0, 0, 3, 3] = x[0, 1, 5, 4] = np.nan
    x[0, 1, 0, 0] = np.inf
    x[0, 1, 2:4, 2:4] = -np.inf
    for kwargs in (dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1)):
        y, indices = max_pool2d(x, return_indices=True, **kwargs)
        y_t, indices_t = F.max_pool2d(torch.from_numpy(x), return_indices=True, **kwargs)
        np.testing.assert_array_equal(y, y_t.numpy())  # NaN == NaN for assert_array_equal
        np.testing.assert_array_equal(indices, indices_t.numpy())
        _close(avg_pool2d(x, **kwargs), F.avg_pool2d(torch.from_numpy(x), **kwargs).numpy(),
               dtype)
    # Two NaNs in one window: both give NaN, but PyTorch reports the *last* NaN and we the first
    # (documented difference); the gradient goes to the reported element.
    x = np.array([[[[0.0, np.nan], [np.nan, 5.0]]]], dtype=dtype)
    y, indices = max_pool2d(x, 2, return_indices=True)
    y_t, indices_t = F.max_pool2d(torch.from_numpy(x), 2, return_indices=True)
    assert np.isnan(y).all() and torch.isnan(y_t).all()
    assert indices[0, 0, 0, 0] == 1 and indices_t[0, 0, 0, 0] == 2


@needs_torch
def test_output_sizes_and_empty_windows_match_torch():
    """Over a grid of 1-D geometries: same output size as torch, the same configurations
    rejected, and we reject exactly those where torch's max pooling returns an index outside the
    plane (a dilated window that covers only padding)."""
    for size in range(1, 8):
        for kernel in range(1, 4):
            for stride in range(1, 4):
                for pad in range(kernel // 2 + 1):
                    for dilation in (1, 2, 3):
                        for ceil_mode in (False, True):
                            x = np.zeros((1, 1, size, 1))
                            kwargs = dict(kernel_size=(kernel, 1), stride=(stride, 1),
                                          padding=(pad, 0), dilation=(dilation, 1),
                                          ceil_mode=ceil_mode)
                            try:
                                y_t, indices_t = F.max_pool2d(torch.from_numpy(x),
                                                              return_indices=True, **kwargs)
                            except RuntimeError:
                                with pytest.raises(ValueError, match="too small"):
                                    max_pool2d(x, **kwargs)
                                continue
                            if (indices_t.numpy() >= size).any():
                                with pytest.raises(ValueError, match="only padding"):
                                    max_pool2d(x, **kwargs)
                                continue
                            assert max_pool2d(x, **kwargs).shape == tuple(y_t.shape), kwargs


@needs_torch
def test_padding_limit_matches_torch():
    x = np.zeros((1, 1, 9, 9))
    for kernel in range(1, 5):
        for pad in range(4):
            for dilation in (1, 2):
                try:
                    F.max_pool2d(torch.from_numpy(x), kernel, 1, pad, dilation)
                    torch_ok = True
                except RuntimeError:
                    torch_ok = False
                try:
                    max_pool2d(x, kernel, 1, pad, dilation)
                    ours_ok = True
                except ValueError as error:
                    assert "padding" in str(error)
                    ours_ok = False
                assert ours_ok == torch_ok, (kernel, pad, dilation)


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, layouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_zero(dtype):
    x = np.zeros((0, 3, 6, 5), dtype=dtype)
    y, indices = max_pool2d(x, 2, return_indices=True)
    assert y.shape == indices.shape == (0, 3, 3, 2) and y.dtype == dtype
    assert max_pool2d_backward(y, indices, x.shape).shape == x.shape
    y = avg_pool2d(x, 3, 2, 1, ceil_mode=True)
    assert y.shape == (0, 3, 4, 3) and y.dtype == dtype
    grad_x = avg_pool2d_backward(y, x.shape, 3, 2, 1, ceil_mode=True)
    assert grad_x.shape == x.shape and grad_x.dtype == dtype
    y = global_avg_pool2d(x)
    assert y.shape == (0, 3, 1, 1) and y.dtype == dtype
    assert global_avg_pool2d_backward(y, x.shape).shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_one(dtype):
    x = _data((1, 1, 5, 6), dtype)
    y, indices = max_pool2d(x, 2, return_indices=True)
    y_ref, indices_ref = ref.max_pool2d(x, 2, return_indices=True)
    _close(y, y_ref, dtype)
    np.testing.assert_array_equal(indices, indices_ref)
    _close(avg_pool2d(x, 3, 1, 1), ref.avg_pool2d(x, 3, 1, 1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_and_read_only_inputs(dtype):
    base = _data((3, 4, 10, 9), dtype)
    views = [base[::2, 1:, ::2, ::-1], base.transpose(0, 1, 3, 2), np.broadcast_to(base[:1],
                                                                                   (2, 4, 10, 9))]
    for x in views:
        dense = np.ascontiguousarray(x)
        y, indices = max_pool2d(x, 3, 2, 1, return_indices=True)
        y_dense, indices_dense = max_pool2d(dense, 3, 2, 1, return_indices=True)
        np.testing.assert_array_equal(y, y_dense)
        np.testing.assert_array_equal(indices, indices_dense)
        np.testing.assert_array_equal(avg_pool2d(x, 2), avg_pool2d(dense, 2))
        np.testing.assert_array_equal(global_avg_pool2d(x), global_avg_pool2d(dense))
        grad_view = np.broadcast_to(np.ones(1, dtype), y.shape)  # read-only, strides 0
        np.testing.assert_array_equal(max_pool2d_backward(grad_view, indices[..., ::1], x.shape),
                                      max_pool2d_backward(np.ones(y.shape, dtype), indices,
                                                          x.shape))
        grad_view = np.broadcast_to(np.ones(1, dtype), avg_pool2d(x, 2).shape)
        np.testing.assert_array_equal(avg_pool2d_backward(grad_view, x.shape, 2),
                                      avg_pool2d_backward(np.ones(grad_view.shape, dtype),
                                                          x.shape, 2))


def test_inputs_not_modified_and_outputs_new_c_contiguous():
    x = _data((2, 3, 6, 6))
    x_before = x.copy()
    y, indices = max_pool2d(x, 3, 1, 1, return_indices=True)
    grad_out = _data(y.shape, seed=1)
    grad_before, indices_before = grad_out.copy(), indices.copy()
    outputs = [y, indices, max_pool2d_backward(grad_out, indices, x.shape)]
    y_avg = avg_pool2d(x, 3, 1, 1)
    outputs += [y_avg, avg_pool2d_backward(grad_out, x.shape, 3, 1, 1)]
    outputs += [global_avg_pool2d(x),
                global_avg_pool2d_backward(grad_out[:, :, :1, :1], x.shape)]
    # A kernel-sized "pool" of a 1x1 kernel must still copy, not return its input.
    outputs += [max_pool2d(x, 1), avg_pool2d(x, 1)]
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(grad_out, grad_before)
    np.testing.assert_array_equal(indices, indices_before)
    for out in outputs:
        assert out.flags.c_contiguous
        assert not np.shares_memory(out, x) and not np.shares_memory(out, grad_out)


@pytest.mark.parametrize("in_dtype, out_dtype", [
    (np.float16, np.float32), (np.int32, np.float64), (np.int64, np.float64),
    (np.uint8, np.float64), (np.bool_, np.float64),
])
def test_dtype_rules(in_dtype, out_dtype):
    x = np.random.default_rng(0).integers(0, 2, (2, 2, 4, 4)).astype(in_dtype)
    expected = x.astype(np.float64)
    y, indices = max_pool2d(x, 2, return_indices=True)
    assert y.dtype == out_dtype
    np.testing.assert_array_equal(y, ref.max_pool2d(expected, 2))
    np.testing.assert_array_equal(indices, ref.max_pool2d(expected, 2, return_indices=True)[1])
    y = avg_pool2d(x, 2)
    assert y.dtype == out_dtype
    _close(y, ref.avg_pool2d(expected, 2), np.float32)
    assert global_avg_pool2d(x).dtype == out_dtype
    # backward dtypes follow grad_out
    grad_out = np.ones((2, 2, 2, 2), dtype=in_dtype)
    assert max_pool2d_backward(grad_out, indices, x.shape).dtype == out_dtype
    assert avg_pool2d_backward(grad_out, x.shape, 2).dtype == out_dtype
    assert global_avg_pool2d_backward(grad_out[:, :, :1, :1], x.shape).dtype == out_dtype


def test_indices_of_other_integer_dtypes_accepted():
    x = _data((1, 2, 4, 4))
    y, indices = max_pool2d(x, 2, return_indices=True)
    grad_out = _data(y.shape, seed=1)
    expected = max_pool2d_backward(grad_out, indices, x.shape)
    for dtype in (np.int32, np.uint16):
        np.testing.assert_array_equal(
            max_pool2d_backward(grad_out, indices.astype(dtype), x.shape), expected)


def test_list_input_accepted():
    x = _data((1, 1, 4, 4))
    np.testing.assert_array_equal(max_pool2d(x.tolist(), 2), max_pool2d(x, 2))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

X = _data((2, 3, 4, 4))
_, IDX = max_pool2d(X, 2, return_indices=True)
G = np.ones((2, 3, 2, 2))

BAD_CALLS = [
    # max_pool2d
    ("x 3-D", lambda: max_pool2d(X[0], 2), ValueError, "x must be 4-D"),
    ("x 5-D", lambda: max_pool2d(X[None], 2), ValueError, "x must be 4-D"),
    ("x no channels", lambda: max_pool2d(np.zeros((1, 0, 4, 4)), 2), ValueError, "x must"),
    ("x empty image", lambda: max_pool2d(np.zeros((1, 1, 0, 4)), 2), ValueError, "x must"),
    ("x complex", lambda: max_pool2d(X.astype(complex), 2), TypeError, "x has dtype complex"),
    ("x object", lambda: max_pool2d(X.astype(object), 2), TypeError, "x has dtype object"),
    ("x str", lambda: max_pool2d(np.full((1, 1, 2, 2), "a"), 2), TypeError, "x has dtype"),
    ("kernel 0", lambda: max_pool2d(X, 0), ValueError, "kernel_size must be >= 1"),
    ("kernel (2, 0)", lambda: max_pool2d(X, (2, 0)), ValueError, "kernel_size must be >= 1"),
    ("kernel float", lambda: max_pool2d(X, 2.5), TypeError, "kernel_size"),
    ("kernel triple", lambda: max_pool2d(X, (1, 2, 3)), TypeError, "kernel_size"),
    ("stride 0", lambda: max_pool2d(X, 2, 0), ValueError, "stride must be >= 1"),
    ("stride -1", lambda: max_pool2d(X, 2, (1, -1)), ValueError, "stride must be >= 1"),
    ("padding -1", lambda: max_pool2d(X, 2, 1, -1), ValueError, "padding must be >= 0"),
    ("padding > k//2", lambda: max_pool2d(X, 3, 1, 2), ValueError, "padding must be at most"),
    ("padding > k//2 dilated", lambda: max_pool2d(X, 3, 1, 2, dilation=2), ValueError,
     "padding must be at most half the kernel size"),
    ("dilation 0", lambda: max_pool2d(X, 2, dilation=0), ValueError, "dilation must be >= 1"),
    ("kernel too large", lambda: max_pool2d(X, 5), ValueError,
     "kernel larger than the padded input"),
    ("dilated too large", lambda: max_pool2d(X, 3, dilation=2), ValueError, "too small"),
    ("window only padding", lambda: max_pool2d(X[:, :, :2, :2], 2, 1, 1, dilation=3),
     ValueError, "pools only padding"),
    ("ceil_mode str", lambda: max_pool2d(X, 2, ceil_mode="yes"), TypeError, "ceil_mode"),
    ("return_indices int", lambda: max_pool2d(X, 2, return_indices=1), TypeError,
     "return_indices"),
    # max_pool2d_backward
    ("indices float", lambda: max_pool2d_backward(G, IDX.astype(float), X.shape), TypeError,
     "indices must be an integer array"),
    ("indices shape", lambda: max_pool2d_backward(G, IDX[:, :, :1], X.shape), ValueError,
     "indices has shape"),
    ("indices too big", lambda: max_pool2d_backward(G, IDX + 16, X.shape), ValueError,
     "indices must lie in [0, H*W)"),
    ("indices negative", lambda: max_pool2d_backward(G, IDX - 16, X.shape), ValueError,
     "got -"),
    ("grad_out 3-D", lambda: max_pool2d_backward(G[0], IDX[0], X.shape), ValueError,
     "grad_out must be 4-D"),
    ("grad_out channels", lambda: max_pool2d_backward(G[:, :2], IDX[:, :2], X.shape),
     ValueError, "grad_out has shape"),
    ("grad_out complex", lambda: max_pool2d_backward(G.astype(complex), IDX, X.shape),
     TypeError, "grad_out"),
    ("input_shape 3", lambda: max_pool2d_backward(G, IDX, (2, 3, 4)), ValueError,
     "input_shape must be 4 ints"),
    ("input_shape 0 H", lambda: max_pool2d_backward(G, IDX, (2, 3, 0, 4)), ValueError,
     "input_shape"),
    ("input_shape float", lambda: max_pool2d_backward(G, IDX, (2, 3, 4.0, 4)), TypeError,
     "input_shape"),
    ("input_shape None", lambda: max_pool2d_backward(G, IDX, None), TypeError, "input_shape"),
    # avg_pool2d
    ("avg x 3-D", lambda: avg_pool2d(X[0], 2), ValueError, "x must be 4-D"),
    ("avg kernel 0", lambda: avg_pool2d(X, 0), ValueError, "kernel_size"),
    ("avg stride 0", lambda: avg_pool2d(X, 2, 0), ValueError, "stride"),
    ("avg padding", lambda: avg_pool2d(X, 2, 1, 2), ValueError, "padding must be at most"),
    ("avg kernel too large", lambda: avg_pool2d(X, (2, 5)), ValueError,
     "kernel larger than the padded input"),
    ("divisor 0", lambda: avg_pool2d(X, 2, divisor_override=0), ValueError,
     "divisor_override must be non-zero"),
    ("divisor float", lambda: avg_pool2d(X, 2, divisor_override=2.0), TypeError,
     "divisor_override"),
    ("divisor bool", lambda: avg_pool2d(X, 2, divisor_override=True), TypeError,
     "divisor_override"),
    ("count_include_pad", lambda: avg_pool2d(X, 2, count_include_pad="no"), TypeError,
     "count_include_pad"),
    ("avg x object", lambda: avg_pool2d(X.astype(object), 2), TypeError, "x has dtype"),
    # avg_pool2d_backward
    ("avg grad_out shape", lambda: avg_pool2d_backward(G[:, :, :1], X.shape, 2), ValueError,
     "grad_out has shape (2, 3, 1, 2), expected (2, 3, 2, 2)"),
    ("avg grad_out 3-D", lambda: avg_pool2d_backward(G[0], X.shape, 2), ValueError,
     "grad_out must be 4-D"),
    ("avg input_shape", lambda: avg_pool2d_backward(G, (2, 3, -4, 4), 2), ValueError,
     "input_shape"),
    ("avg backward divisor 0", lambda: avg_pool2d_backward(G, X.shape, 2, divisor_override=0),
     ValueError, "divisor_override"),
    ("avg backward too large", lambda: avg_pool2d_backward(G, (2, 3, 1, 1), 2), ValueError,
     "too small"),
    # global
    ("global x 3-D", lambda: global_avg_pool2d(X[0]), ValueError, "x must be 4-D"),
    ("global x complex", lambda: global_avg_pool2d(X.astype(complex)), TypeError, "x has dtype"),
    ("global grad_out shape", lambda: global_avg_pool2d_backward(G, X.shape), ValueError,
     "grad_out has shape (2, 3, 2, 2), expected (2, 3, 1, 1)"),
    ("global input_shape", lambda: global_avg_pool2d_backward(G[:, :, :1, :1], (2, 3)),
     ValueError, "input_shape"),
    # layers validate at construction
    ("MaxPool2D kernel", lambda: MaxPool2D(0), ValueError, "MaxPool2D: kernel_size"),
    ("MaxPool2D padding", lambda: MaxPool2D(3, padding=2), ValueError, "padding"),
    ("MaxPool2D ceil_mode", lambda: MaxPool2D(2, ceil_mode=None), TypeError, "ceil_mode"),
    ("AvgPool2D stride", lambda: AvgPool2D(2, stride=0), ValueError, "AvgPool2D: stride"),
    ("AvgPool2D divisor", lambda: AvgPool2D(2, divisor_override=0), ValueError,
     "divisor_override"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_CALLS],
                         ids=[case[0] for case in BAD_CALLS])
def test_bad_input_raises(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_error_messages_name_the_value():
    with pytest.raises(ValueError, match=r"padding=\(2, 2\) with kernel_size=\(3, 3\)"):
        max_pool2d(X, 3, 1, 2)
    bad = IDX.copy()
    bad[1, 2, 1, 0] = 16
    with pytest.raises(ValueError, match=r"\[0, 16\) for input_shape \(2, 3, 4, 4\), got 16"):
        max_pool2d_backward(G, bad, X.shape)
    with pytest.raises(ValueError, match=r"got \(0, 0\)"):
        max_pool2d(X, 0)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

def test_max_pool_layer_matches_functional():
    layer = MaxPool2D((3, 2), stride=(2, 1), padding=1, dilation=(1, 2), ceil_mode=True)
    x = _data((2, 3, 7, 8))
    y, indices = max_pool2d(x, (3, 2), (2, 1), 1, (1, 2), True, return_indices=True)
    np.testing.assert_array_equal(layer.forward(x), y)
    grad_out = _data(y.shape, seed=1)
    np.testing.assert_array_equal(layer.backward(grad_out),
                                  max_pool2d_backward(grad_out, indices, x.shape))
    assert layer.params == {} and layer.grads == {}


def test_avg_pool_layer_matches_functional():
    args = ((3, 2), (2, 1), 1, True, False, None)
    x = _data((2, 3, 7, 8))
    for divisor_override in (None, 3):
        layer = AvgPool2D(*args[:-1], divisor_override=divisor_override)
        y = avg_pool2d(x, *args[:-1], divisor_override=divisor_override)
        np.testing.assert_array_equal(layer.forward(x), y)
        grad_out = _data(y.shape, seed=1)
        np.testing.assert_array_equal(
            layer.backward(grad_out),
            avg_pool2d_backward(grad_out, x.shape, *args[:-1], divisor_override=divisor_override))
    assert layer.params == {} and layer.grads == {}


def test_global_avg_pool_layer_matches_functional():
    layer = GlobalAvgPool2D()
    x = _data((2, 3, 5, 4))
    np.testing.assert_array_equal(layer.forward(x), global_avg_pool2d(x))
    grad_out = _data((2, 3, 1, 1), seed=1)
    np.testing.assert_array_equal(layer.backward(grad_out),
                                  global_avg_pool2d_backward(grad_out, x.shape))
    assert layer.params == {} and layer.grads == {}


def test_layer_backward_uses_last_forward():
    layer = MaxPool2D(2)
    layer.forward(_data((1, 1, 4, 4)))
    x = _data((2, 1, 6, 6), seed=5)
    y, indices = max_pool2d(x, 2, return_indices=True)
    layer.forward(x)
    assert layer.backward(np.ones_like(y)).shape == x.shape
    np.testing.assert_array_equal(layer.backward(np.ones_like(y)),
                                  max_pool2d_backward(np.ones_like(y), indices, x.shape))


@pytest.mark.parametrize("layer", [MaxPool2D(2), AvgPool2D(2), GlobalAvgPool2D()],
                         ids=["max", "avg", "global"])
def test_layer_backward_before_forward_raises(layer):
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.ones((1, 1, 1, 1)))


def test_layer_repr():
    assert repr(MaxPool2D(2)) == "MaxPool2D(kernel_size=(2, 2), stride=(2, 2))"
    assert repr(MaxPool2D(3, stride=2, padding=1, dilation=(1, 2), ceil_mode=True)) == (
        "MaxPool2D(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 2), "
        "ceil_mode=True)")
    assert repr(AvgPool2D((2, 3))) == "AvgPool2D(kernel_size=(2, 3), stride=(2, 3))"
    assert repr(AvgPool2D(3, 1, 1, True, False, divisor_override=4)) == (
        "AvgPool2D(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), ceil_mode=True, "
        "count_include_pad=False, divisor_override=4)")
    assert repr(GlobalAvgPool2D()) == "GlobalAvgPool2D()"


def test_layer_attributes_are_normalised():
    layer = MaxPool2D([3, 2], stride=np.int64(1))
    assert layer.kernel_size == (3, 2) and layer.stride == (1, 1)
    assert layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.ceil_mode is False
    assert _pool_params(2, None, 0, 1, "t") == ((2, 2), (2, 2), (0, 0), (1, 1))


# ---------------------------------------------------------------------------------------------
# Property test: random valid configurations against the reference
# ---------------------------------------------------------------------------------------------

@st.composite
def _pool_configs(draw):
    kind = draw(st.sampled_from(["max", "avg"]))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    kwargs = dict(
        kernel_size=kernel,
        stride=draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4)))),
        padding=(draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2))),
        ceil_mode=draw(st.booleans()),
    )
    if kind == "max":
        kwargs["dilation"] = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    else:
        kwargs["count_include_pad"] = draw(st.booleans())
        kwargs["divisor_override"] = draw(st.sampled_from([None, None, 1, 3, -2]))
    # widths up to 80: rows longer than the unrolled path's chunks, see UNROLLED_SHAPES
    shape = (draw(st.integers(0, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9)),
             draw(st.one_of(st.integers(1, 9), st.integers(10, 80))))
    return kind, shape, kwargs, draw(st.booleans())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_pool_configs())
def test_random_configurations_match_reference(config):
    kind, shape, kwargs, ties = config
    x = _ties(shape, seed=7) if ties else _data(shape, seed=7)
    if kind == "max":
        try:
            y, indices = max_pool2d(x, return_indices=True, **kwargs)
        except ValueError as error:
            assert "too small" in str(error) or "only padding" in str(error)
            assume(False)
        y_ref, indices_ref = ref.max_pool2d(x, return_indices=True, **kwargs)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(indices, indices_ref)
        grad_out = _data(y.shape, seed=8)
        _close(max_pool2d_backward(grad_out, indices, shape),
               ref.max_pool2d_backward(grad_out, indices_ref, shape), np.float64)
    else:
        try:
            y = avg_pool2d(x, **kwargs)
        except ValueError as error:
            assert "too small" in str(error)
            assume(False)
        _close(y, ref.avg_pool2d(x, **kwargs), np.float64)
        grad_out = _data(y.shape, seed=8)
        kernel_size, rest = _avg_backward_args(kwargs)
        _close(avg_pool2d_backward(grad_out, shape, kernel_size, **rest),
               ref.avg_pool2d_backward(grad_out, shape, kernel_size, **rest), np.float64)
