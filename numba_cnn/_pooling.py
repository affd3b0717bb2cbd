"""2-D max, average and global average pooling, with backward passes (functional API).

``numba_cnn.functional`` re-exports the public functions of this module. Each one validates and
normalises its arguments in the pure-Python section below, converts the input to a C-contiguous
array of the compute dtype, allocates the output and calls a kernel from ``_kernels.pool2d``.

Semantics are PyTorch's (``torch.nn.functional.max_pool2d`` / ``avg_pool2d``), including:

* ``stride=None`` means ``stride = kernel_size``;
* output size ``floor((H + 2*p - d*(k-1) - 1) / s) + 1`` (``ceil`` with ``ceil_mode``); with
  ``ceil_mode`` a last window that would start in the right padding is dropped
  (PyTorch: ``if (out-1)*s >= H + p: out -= 1``);
* padding must be at most ``kernel_size // 2`` - the kernel size, not the dilated extent: PyTorch
  documents "half of effective kernel size" but its CPU shape check also requires
  ``pad <= kernel_size // 2``, which is the binding condition;
* max pooling pads with -inf; indices are int64 offsets ``ih*W + iw`` into each H*W input plane;
* average pooling clips a ceil_mode window to the padded input before counting
  (``count_include_pad``) and uses ``divisor_override`` (any non-zero int) when given.

Deliberate differences from PyTorch (both cases where PyTorch's answer is unusable):

* A NaN in a max-pool window gives NaN with the index of the *first* NaN in row-major window
  order, like ties (PyTorch 2.13 CPU returns the index of the *last* NaN).
* A dilated max-pool window that covers only padding raises ValueError here. PyTorch returns -inf
  with an index outside the input plane there, and its backward then corrupts memory.
"""
import numbers
from typing import NamedTuple

import numpy as np

from ._args import (as_float_array, check_at_least, check_ndim, check_shape, check_size, pair,
                    result_dtype)
from ._kernels import pool2d as _kernels
from ._threads import threads_for


# ---------------------------------------------------------------------------------------------
# Pooling argument validation and geometry (pure Python, no Numba): everything that can raise for
# bad input runs here, before any kernel is compiled or called.
# ---------------------------------------------------------------------------------------------

class PoolGeometry(NamedTuple):
    """Shapes and normalised hyper-parameters of one 2-D pooling call (all Python ints)."""
    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool
    out_height: int
    out_width: int

    @property
    def input_shape(self):
        return (self.batch, self.channels, self.height, self.width)

    @property
    def output_shape(self):
        return (self.batch, self.channels, self.out_height, self.out_width)

    @property
    def planes(self):
        return self.batch * self.channels

    @property
    def work(self):
        """Window taps visited plus input elements touched: what ``threads_for`` weighs."""
        return self.planes * (self.out_height * self.out_width * self.kernel[0] * self.kernel[1]
                              + self.height * self.width)


def _check_flag(value, name, op):
    """Flags must be real booleans: a stray int or string is more likely a misplaced argument."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    return bool(value)


def _check_divisor_override(value, op):
    """None (no override) or a non-zero int, as PyTorch (negative divisors are accepted)."""
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: divisor_override must be None or an int, got {value!r}")
    if int(value) == 0:
        raise ValueError(f"{op}: divisor_override must be non-zero (or None), got {value!r}")
    return int(value)


def _pool_params(kernel_size, stride, padding, dilation, op):
    """Normalise and check the hyper-parameters that do not depend on the input.

    Returns ``(kernel, stride, padding, dilation)`` as ``(h, w)`` tuples of ints.
    """
    kernel = check_at_least(pair(kernel_size, "kernel_size", op), 1, "kernel_size", op)
    if stride is None:
        stride = kernel
    else:
        stride = check_at_least(pair(stride, "stride", op), 1, "stride", op)
    padding = check_at_least(pair(padding, "padding", op), 0, "padding", op)
    dilation = check_at_least(pair(dilation, "dilation", op), 1, "dilation", op)
    half = (kernel[0] // 2, kernel[1] // 2)
    if padding[0] > half[0] or padding[1] > half[1]:
        raise ValueError(f"{op}: padding must be at most half the kernel size (kernel_size // 2 "
                         f"= {half}), got padding={padding} with kernel_size={kernel}")
    return kernel, stride, padding, dilation


def _pool_out_size(size, kernel, stride, pad, dilation, ceil_mode):
    """PyTorch's ``pooling_output_shape`` for one axis (may be < 1; the caller raises)."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = (span + stride - 1) // stride + 1
        # ceil_mode may add a window that starts in the right padding: PyTorch drops it.
        if (out - 1) * stride >= size + pad:
            out -= 1
        return out
    return span // stride + 1


def _first_empty_window(size, kernel, stride, pad, dilation, out_size):
    """Index of the first output position whose dilated taps all miss the input, or None.

    Only possible with dilation > 1 and padding > 0 (an undilated window, or one that starts
    inside the image, always covers an input element), and only for windows that stick out of
    the image, so only those near either border are examined.
    """
    if dilation == 1 or pad == 0:
        return None
    extent = dilation * (kernel - 1) + 1
    left = range(0, min(out_size, pad // stride + 1))
    right = range(max(0, (size + pad - extent + 1) // stride), out_size)
    for out_pos in list(left) + list(right):
        start = out_pos * stride - pad
        first = start if start >= 0 else start + (-start + dilation - 1) // dilation * dilation
        if not (first <= start + (kernel - 1) * dilation and first < size):
            return out_pos
    return None


def _check_input_shape(input_shape, op):
    """``input_shape`` of a backward call: 4 ints (N, C, H, W), N >= 0 and C, H, W >= 1."""
    try:
        values = tuple(input_shape)
    except TypeError:
        raise TypeError(f"{op}: input_shape must be a sequence of 4 ints (N, C, H, W), "
                        f"got {input_shape!r}") from None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
               for v in values):
        raise TypeError(f"{op}: input_shape must be a sequence of 4 ints (N, C, H, W), "
                        f"got {input_shape!r}")
    values = tuple(int(v) for v in values)
    if len(values) != 4 or values[0] < 0 or min(values[1:]) < 1:
        raise ValueError(f"{op}: input_shape must be 4 ints (N, C, H, W) with N >= 0 and "
                         f"C, H, W >= 1, got {values}")
    return values


def _check_input_array(x, op):
    """Convert ``x`` by the API dtype rules and check it is a non-empty-image 4-D NCHW array."""
    x = as_float_array(x, "x", op)
    check_ndim(x, 4, "x", op, "(N, C, H, W)")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"{op}: x must have C, H, W >= 1 (only the batch may be empty), "
                         f"got shape {x.shape}")
    return x


def _pool_geometry(input_shape, kernel, stride, padding, dilation, ceil_mode, op):
    """Output size of a pooling call on ``input_shape`` (already checked), validated.

    ``kernel``, ``stride``, ``padding``, ``dilation`` come from ``_pool_params``.
    """
    batch, channels, height, width = input_shape
    out_height = _pool_out_size(height, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    out_width = _pool_out_size(width, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    if out_height < 1 or out_width < 1:
        extent = (dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1)
        raise ValueError(
            f"{op}: kernel larger than the padded input: kernel_size={kernel} (dilated extent "
            f"{extent}) does not fit in the padded input "
            f"({height + 2 * padding[0]}x{width + 2 * padding[1]}). Given input size: "
            f"{(channels, height, width)}, padding={padding}, stride={stride}. Calculated output "
            f"size: {(channels, out_height, out_width)}. Output size is too small")
    for axis, (size, out_size) in enumerate(((height, out_height), (width, out_width))):
        empty = _first_empty_window(size, kernel[axis], stride[axis], padding[axis],
                                    dilation[axis], out_size)
        if empty is not None:
            raise ValueError(
                f"{op}: with kernel_size={kernel}, dilation={dilation} and padding={padding}, "
                f"output {'row' if axis == 0 else 'column'} {empty} pools only padding (input "
                f"{height}x{width}); every max-pool window must contain an input element")
    geometry = PoolGeometry(batch, channels, height, width, kernel, stride, padding, dilation,
                            bool(ceil_mode), out_height, out_width)
    check_size(geometry.output_shape, "the output", op)
    return geometry


def _check_grad_out(grad_out, expected_shape, op):
    grad_out = as_float_array(grad_out, "grad_out", op)
    check_ndim(grad_out, 4, "grad_out", op, "(N, C, OH, OW)")
    check_shape(grad_out, expected_shape, "grad_out", op)
    return grad_out


def _check_indices(indices, grad_out, input_shape, op):
    """Max-pool indices: an integer array shaped like ``grad_out``, values in [0, H*W)."""
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
        raise TypeError(f"{op}: indices must be an integer array (int64 offsets into each H*W "
                        f"input plane), got dtype {indices.dtype}")
    check_shape(indices, grad_out.shape, "indices", op)
    plane_size = input_shape[2] * input_shape[3]
    if indices.size:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= plane_size:
            bad = low if low < 0 else high
            raise ValueError(f"{op}: indices must lie in [0, H*W) = [0, {plane_size}) for "
                             f"input_shape {input_shape}, got {bad}")
    return indices


# ---------------------------------------------------------------------------------------------
# Conversion helpers
# ---------------------------------------------------------------------------------------------

def _kernel_array(array, dtype):
    """C-contiguous, writeable array of ``dtype`` (copied only when needed).

    Read-only arrays are copied too: Numba compiles a separate specialisation for them, which
    would cost seconds of compilation for nothing (kernels never write to their inputs).
    """
    array = np.ascontiguousarray(array, dtype=dtype)
    if not array.flags.writeable:
        array = array.copy()
    return array


def _planes(array, planes):
    """(N, C, A, B) C-contiguous -> (N*C, A*B) view, the layout the kernels use."""
    return array.reshape(planes, -1)


# ---------------------------------------------------------------------------------------------
# Public functional API
# ---------------------------------------------------------------------------------------------

def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """2-D max pooling over NCHW input, as ``torch.nn.functional.max_pool2d``.

    Args:
        x: (N, C, H, W) array; float32/float64 computed natively, float16 as float32, int/bool as
            float64. May be a non-contiguous view; never modified.
        kernel_size, stride, padding, dilation: int or (h, w). ``stride=None`` means
            ``kernel_size``. Padding (implicit -inf) must be <= kernel_size // 2.
        ceil_mode: use ceil instead of floor for the output size (a last window starting in the
            right padding is dropped).
        return_indices: also return the argmax indices (needed by ``max_pool2d_backward``).

    Returns:
        y: (N, C, OH, OW) new C-contiguous array of the compute dtype, with
        ``OH = floor((H + 2*pad_h - dil_h*(KH-1) - 1) / stride_h) + 1`` (ceil with ceil_mode),
        likewise OW; and, if ``return_indices``, indices: (N, C, OH, OW) int64 offsets
        ``ih*W + iw`` into each input plane. Ties go to the first maximum in row-major window
        order; a NaN in a window gives NaN and the index of the window's first NaN.

    Raises:
        TypeError / ValueError naming the argument for bad input (see module docstring).
    """
    op = "max_pool2d"
    return_indices = _check_flag(return_indices, "return_indices", op)
    ceil_mode = _check_flag(ceil_mode, "ceil_mode", op)
    kernel, stride, padding, dilation = _pool_params(kernel_size, stride, padding, dilation, op)
    x = _check_input_array(x, op)
    geometry = _pool_geometry(x.shape, kernel, stride, padding, dilation, ceil_mode, op)
    dtype = result_dtype(x)
    out = np.empty(geometry.output_shape, dtype=dtype)
    indices = np.empty(geometry.output_shape, dtype=np.int64)
    if geometry.planes:
        x = _kernel_array(x, dtype)
        with threads_for(geometry.work):
            _kernels.max_pool2d_forward(
                _planes(x, geometry.planes), _planes(out, geometry.planes),
                _planes(indices, geometry.planes), geometry.height, geometry.width,
                geometry.out_height, geometry.out_width, kernel[0], kernel[1], stride[0],
                stride[1], padding[0], padding[1], dilation[0], dilation[1],
                _kernels.MAX_FORWARD_LANES)
    if return_indices:
        return out, indices
    return out


def max_pool2d_backward(grad_out, indices, input_shape):
    """Gradient of ``max_pool2d`` with respect to its input.

    Args:
        grad_out: (N, C, OH, OW) gradient of the loss with respect to the pooled output.
        indices: (N, C, OH, OW) integer array from ``max_pool2d(..., return_indices=True)``,
            offsets into each H*W input plane, all in [0, H*W).
        input_shape: (N, C, H, W) of the forward input.

    Returns:
        grad_x: (N, C, H, W) new C-contiguous array, dtype of ``grad_out`` (float16 -> float32,
        int/bool -> float64): each output gradient added to its argmax position (overlapping
        windows accumulate).
    """
    op = "max_pool2d_backward"
    input_shape = _check_input_shape(input_shape, op)
    grad_out = as_float_array(grad_out, "grad_out", op)
    check_ndim(grad_out, 4, "grad_out", op, "(N, C, OH, OW)")
    if grad_out.shape[:2] != input_shape[:2]:
        raise ValueError(f"{op}: grad_out has shape {grad_out.shape} but input_shape "
                         f"{input_shape} needs (N, C) = {input_shape[:2]} in front")
    indices = _check_indices(indices, grad_out, input_shape, op)
    check_size(input_shape, "grad_x", op)
    dtype = result_dtype(grad_out)
    grad_input = np.empty(input_shape, dtype=dtype)
    planes = input_shape[0] * input_shape[1]
    if planes == 0:
        return grad_input
    if grad_out.size == 0:  # (N, C, 0, OW): nothing flows back
        grad_input[...] = 0
        return grad_input
    with threads_for(grad_input.size + grad_out.size):
        _kernels.max_pool2d_backward(
            _planes(_kernel_array(grad_out, dtype), planes),
            _planes(_kernel_array(indices, np.int64), planes), _planes(grad_input, planes))
    return grad_input


def _avg_setup(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, op):
    """Shared argument checks of avg_pool2d and its backward (no dilation in average pooling)."""
    ceil_mode = _check_flag(ceil_mode, "ceil_mode", op)
    count_include_pad = _check_flag(count_include_pad, "count_include_pad", op)
    divisor_override = _check_divisor_override(divisor_override, op)
    kernel, stride, padding, dilation = _pool_params(kernel_size, stride, padding, 1, op)
    return kernel, stride, padding, dilation, ceil_mode, count_include_pad, divisor_override


def _avg_kernel_args(geometry, count_include_pad, divisor_override, lanes):
    g = geometry
    return (g.height, g.width, g.out_height, g.out_width, g.kernel[0], g.kernel[1],
            g.stride[0], g.stride[1], g.padding[0], g.padding[1], bool(count_include_pad),
            0 if divisor_override is None else int(divisor_override), lanes)


def _run_avg_forward(x, dtype, geometry, count_include_pad, divisor_override):
    """Allocate the output and run the average-pooling kernel (also global pooling's)."""
    out = np.empty(geometry.output_shape, dtype=dtype)
    if geometry.planes:
        with threads_for(geometry.work):
            _kernels.avg_pool2d_forward(
                _planes(_kernel_array(x, dtype), geometry.planes), _planes(out, geometry.planes),
                *_avg_kernel_args(geometry, count_include_pad, divisor_override,
                                  _kernels.AVG_FORWARD_LANES))
    return out


def _run_avg_backward(grad_out, geometry, count_include_pad, divisor_override):
    """Allocate grad_x and run the average-pooling backward kernel (also global pooling's)."""
    dtype = result_dtype(grad_out)
    grad_input = np.empty(geometry.input_shape, dtype=dtype)
    if geometry.planes:
        with threads_for(geometry.work):
            _kernels.avg_pool2d_backward(
                _planes(_kernel_array(grad_out, dtype), geometry.planes),
                _planes(grad_input, geometry.planes),
                *_avg_kernel_args(geometry, count_include_pad, divisor_override,
                                  _kernels.AVG_BACKWARD_LANES))
    return grad_input


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """2-D average pooling over NCHW input, as ``torch.nn.functional.avg_pool2d``.

    Args:
        x: (N, C, H, W) array (dtype rules as ``max_pool2d``); never modified.
        kernel_size, stride, padding: int or (h, w); ``stride=None`` means ``kernel_size``;
            padding (implicit zeros) must be <= kernel_size // 2.
        ceil_mode: ceil instead of floor for the output size; a ceil_mode window hanging over
            the right edge is clipped to the padded input before counting.
        count_include_pad: divide by the window's extent inside the padded input (True) or
            inside the image only (False).
        divisor_override: if a non-zero int, divide every window sum by it instead.

    Returns:
        y: (N, C, OH, OW) new C-contiguous array,
        ``OH = floor((H + 2*pad_h - KH) / stride_h) + 1`` (ceil with ceil_mode), likewise OW.
        Window sums are accumulated in float64 before the division.
    """
    op = "avg_pool2d"
    (kernel, stride, padding, dilation, ceil_mode, count_include_pad,
     divisor_override) = _avg_setup(kernel_size, stride, padding, ceil_mode, count_include_pad,
                                    divisor_override, op)
    x = _check_input_array(x, op)
    geometry = _pool_geometry(x.shape, kernel, stride, padding, dilation, ceil_mode, op)
    return _run_avg_forward(x, result_dtype(x), geometry, count_include_pad, divisor_override)


def avg_pool2d_backward(grad_out, input_shape, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True, divisor_override=None):
    """Gradient of ``avg_pool2d`` with respect to its input.

    Args:
        grad_out: (N, C, OH, OW), OH and OW as ``avg_pool2d`` computes them for ``input_shape``.
        input_shape: (N, C, H, W) of the forward input.
        kernel_size ... divisor_override: the forward call's arguments.

    Returns:
        grad_x: (N, C, H, W) new C-contiguous array, dtype of ``grad_out`` (float16 -> float32,
        int/bool -> float64): each output gradient divided by its window's divisor and added to
        every in-image position of the window.
    """
    op = "avg_pool2d_backward"
    (kernel, stride, padding, dilation, ceil_mode, count_include_pad,
     divisor_override) = _avg_setup(kernel_size, stride, padding, ceil_mode, count_include_pad,
                                    divisor_override, op)
    input_shape = _check_input_shape(input_shape, op)
    geometry = _pool_geometry(input_shape, kernel, stride, padding, dilation, ceil_mode, op)
    grad_out = _check_grad_out(grad_out, geometry.output_shape, op)
    check_size(input_shape, "grad_x", op)
    return _run_avg_backward(grad_out, geometry, count_include_pad, divisor_override)


def _global_geometry(input_shape):
    """Global average pooling is average pooling with the whole plane as the only window."""
    _, _, height, width = input_shape
    return PoolGeometry(input_shape[0], input_shape[1], height, width, (height, width),
                        (height, width), (0, 0), (1, 1), False, 1, 1)


def global_avg_pool2d(x):
    """Mean over each H x W plane.

    Args:
        x: (N, C, H, W) array (dtype rules as ``max_pool2d``); never modified.

    Returns:
        y: (N, C, 1, 1) new C-contiguous array (sums accumulated in float64), the same as
        ``avg_pool2d(x, (H, W))`` and ``torch.nn.functional.adaptive_avg_pool2d(x, 1)``.
    """
    op = "global_avg_pool2d"
    x = _check_input_array(x, op)
    geometry = _global_geometry(x.shape)
    # Reuses the average-pooling kernel, so no extra compilation.
    return _run_avg_forward(x, result_dtype(x), geometry, True, None)


def global_avg_pool2d_backward(grad_out, input_shape):
    """Gradient of ``global_avg_pool2d``.

    Args:
        grad_out: (N, C, 1, 1).
        input_shape: (N, C, H, W) of the forward input.

    Returns:
        grad_x: (N, C, H, W) new C-contiguous array, ``grad_out / (H*W)`` broadcast over each
        plane; dtype of ``grad_out`` (float16 -> float32, int/bool -> float64).
    """
    op = "global_avg_pool2d_backward"
    input_shape = _check_input_shape(input_shape, op)
    geometry = _global_geometry(input_shape)
    grad_out = _check_grad_out(grad_out, geometry.output_shape, op)
    check_size(input_shape, "grad_x", op)
    return _run_avg_backward(grad_out, geometry, True, None)
