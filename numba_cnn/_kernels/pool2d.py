"""Numba kernels for 2-D max and average pooling (forward and backward).

Every kernel works on planes: arrays are passed as 2-D views ``(P, H*W)`` / ``(P, OH*OW)`` with
``P = N*C``, C-contiguous, and a ``prange`` runs over the planes. One task owns a whole plane, so
the scatter-adds of the backward passes (windows may overlap) are race-free without per-thread
buffers. Loops are plain (DESIGN.md: 2-17x faster than PyTorch's NCHW pooling on this machine).

No ``fastmath`` at all: its ``nnan`` / ``ninf`` assumptions let LLVM fold the NaN tests away, which
broke NaN propagation in max pooling (and did not make it faster).

Kernels never validate: ``numba_cnn._pooling`` checks shapes, hyper-parameters and index ranges and
passes normalised ints (``divisor_override == 0`` means "no override"; 0 is rejected before).
"""
import numpy as np
from numba import njit, prange

from . import cached_njit


@cached_njit()
def _first_tap(start, dilation):
    """First tap ``start + j*dilation`` (j >= 0) that is not in the leading padding (>= 0)."""
    if start >= 0:
        return start
    return start + ((-start + dilation - 1) // dilation) * dilation


@cached_njit()
def _avg_window(out_pos, stride, pad, kernel, size):
    """One axis of an average-pool window, clipped as PyTorch does.

    Returns ``(first, stop, padded_extent)``: the input rows ``first <= i < stop`` that the window
    covers, and how many of its positions lie inside the padded input (the divisor for
    ``count_include_pad``; smaller than ``kernel`` only for a ceil_mode window that hangs over the
    right padding).
    """
    start = out_pos * stride - pad
    end = min(start + kernel, size + pad)
    return max(start, 0), min(end, size), end - start


@cached_njit()
def _avg_divisor(pool_h, pool_w, rows, cols, count_include_pad, divisor_override):
    if divisor_override != 0:
        return divisor_override
    if count_include_pad:
        return pool_h * pool_w
    return rows * cols


@njit(inline="always")
def _valid_outputs(offset, stride, size, out_size):
    """Output columns ``ow`` whose input column ``ow * stride + offset`` lies in [0, size).

    Inlined, with non-negative divisions only: as an ordinary call (floor division of negative
    numbers, tuple return) it made max pooling ~6x slower.
    """
    first = 0
    if offset < 0:
        first = (stride - 1 - offset) // stride
    last = size - 1 - offset
    stop = 0
    if last >= 0:
        stop = min(out_size, last // stride + 1)
    return first, stop


@njit(inline="always")
def _max_tap(x, out, indices, plane, row, base, first, stop, stride):
    """Fold one window tap into the running maxima of output columns [first, stop) of a row."""
    for ow in range(first, stop):
        position = base + ow * stride
        value = x[plane, position]
        current = out[plane, row + ow]
        # value != value: NaN test that survives (no fastmath); current == current keeps the
        # first NaN instead of moving to a later one.
        if value > current or (value != value and current == current):
            out[plane, row + ow] = value
            indices[plane, row + ow] = position


@njit(inline="always")
def _sum_tap(x, totals, plane, base, first, stop, stride):
    for ow in range(first, stop):
        totals[ow] += x[plane, base + ow * stride]


@njit(inline="always")
def _spread_tap(grad_input, shares, plane, base, first, stop, stride):
    for ow in range(first, stop):
        grad_input[plane, base + ow * stride] += shares[ow]


@cached_njit(parallel=True)
def max_pool2d_forward(x, out, indices, height, width, out_height, out_width, kernel_h, kernel_w,
                       stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w):
    """Max pooling with argmax indices.

    x : (P, H*W) input planes; out : (P, OH*OW) same dtype; indices : (P, OH*OW) int64, both
    written here. An index is the offset ``ih*W + iw`` of the maximum inside its input plane.
    Padding acts as -inf, so padded taps are simply skipped. Ties go to the first maximum in
    row-major window order (strict ``>``); a NaN wins over every number and the first NaN is kept,
    so the output is NaN and the index points at the first NaN of the window. A window of -inf
    only gives -inf and the index of its first in-image tap.

    The loops run tap by tap over a whole output row (taps in row-major window order, so the
    first-maximum rule holds): the innermost loop walks output columns with a fixed input
    stride and no window bookkeeping, which LLVM vectorises; visiting one window at a time cost
    ~12x more on (32, 64, 56, 56).
    """
    for task in prange(x.shape[0]):
        # the prange index is uint64 inside the parfor. Index the 2-D arrays directly: taking
        # per-plane views (x[plane]) here made the kernel ~5x slower.
        plane = np.int64(task)
        for oh in range(out_height):
            h_origin = oh * stride_h - pad_h
            h_stop = min(h_origin + (kernel_h - 1) * dilation_h + 1, height)
            h_first = _first_tap(h_origin, dilation_h)
            row = oh * out_width
            for ow in range(out_width):
                out[plane, row + ow] = -np.inf
                indices[plane, row + ow] = h_first * width + _first_tap(ow * stride_w - pad_w,
                                                                        dilation_w)
            for ih in range(h_first, h_stop, dilation_h):
                for kw in range(kernel_w):
                    offset = kw * dilation_w - pad_w
                    first, stop = _valid_outputs(offset, stride_w, width, out_width)
                    base = ih * width + offset
                    # The same loop with literal full-row bounds for the common case: with
                    # computed bounds alone, LLVM's code for it ran ~5x slower.
                    if first == 0 and stop == out_width:
                        _max_tap(x, out, indices, plane, row, base, 0, out_width, stride_w)
                    else:
                        _max_tap(x, out, indices, plane, row, base, first, stop, stride_w)


@cached_njit(parallel=True)
def max_pool2d_backward(grad_out, indices, grad_input):
    """Scatter-add ``grad_out`` to the argmax positions.

    grad_out : (P, OH*OW); indices : (P, OH*OW) int64 in [0, H*W) (checked by the caller);
    grad_input : (P, H*W), overwritten (zeroed here, inside the task that owns the plane).
    Overlapping windows can pick the same input element, hence ``+=``.
    """
    for task in prange(grad_out.shape[0]):
        plane = np.int64(task)
        for i in range(grad_input.shape[1]):
            grad_input[plane, i] = 0
        for j in range(grad_out.shape[1]):
            grad_input[plane, indices[plane, j]] += grad_out[plane, j]


@cached_njit(parallel=True)
def avg_pool2d_forward(x, out, height, width, out_height, out_width, kernel_h, kernel_w,
                       stride_h, stride_w, pad_h, pad_w, count_include_pad, divisor_override):
    """Average pooling. x : (P, H*W); out : (P, OH*OW), written here.

    The window sums are accumulated in float64 whatever the dtype (more accurate than a float32
    running sum, and a float32 sum cannot overflow to inf halfway), then divided by the divisor:
    ``divisor_override`` if non-zero, else the window's extent inside the padded input
    (``count_include_pad``) or inside the image. Taps are visited a whole output row at a time,
    as in ``max_pool2d_forward``.
    """
    for task in prange(x.shape[0]):
        plane = np.int64(task)
        totals = np.empty(out_width, dtype=np.float64)
        for oh in range(out_height):
            h_first, h_stop, pool_h = _avg_window(oh, stride_h, pad_h, kernel_h, height)
            totals[:] = 0.0
            for ih in range(h_first, h_stop):
                for kw in range(kernel_w):
                    offset = kw - pad_w
                    first, stop = _valid_outputs(offset, stride_w, width, out_width)
                    base = ih * width + offset
                    if first == 0 and stop == out_width:  # see max_pool2d_forward
                        _sum_tap(x, totals, plane, base, 0, out_width, stride_w)
                    else:
                        _sum_tap(x, totals, plane, base, first, stop, stride_w)
            for ow in range(out_width):
                w_first, w_stop, pool_w = _avg_window(ow, stride_w, pad_w, kernel_w, width)
                if h_first >= h_stop or w_first >= w_stop:
                    # Unreachable with validated arguments (padding <= kernel // 2); PyTorch
                    # leaves such an output at 0.
                    out[plane, oh * out_width + ow] = 0
                    continue
                divisor = _avg_divisor(pool_h, pool_w, h_stop - h_first, w_stop - w_first,
                                       count_include_pad, divisor_override)
                out[plane, oh * out_width + ow] = totals[ow] / divisor


@cached_njit(parallel=True)
def avg_pool2d_backward(grad_out, grad_input, height, width, out_height, out_width, kernel_h,
                        kernel_w, stride_h, stride_w, pad_h, pad_w, count_include_pad,
                        divisor_override):
    """Gradient of ``avg_pool2d_forward``: each output gradient, divided by its window's divisor,
    is added to every in-image position of the window (as PyTorch: divide first, then add).

    grad_out : (P, OH*OW); grad_input : (P, H*W), overwritten (zeroed here). Row at a time,
    like the forward pass.
    """
    for task in prange(grad_out.shape[0]):
        plane = np.int64(task)
        shares = np.empty(out_width, dtype=np.float64)
        for i in range(grad_input.shape[1]):
            grad_input[plane, i] = 0
        for oh in range(out_height):
            h_first, h_stop, pool_h = _avg_window(oh, stride_h, pad_h, kernel_h, height)
            for ow in range(out_width):
                w_first, w_stop, pool_w = _avg_window(ow, stride_w, pad_w, kernel_w, width)
                if h_first >= h_stop or w_first >= w_stop:
                    shares[ow] = 0.0
                    continue
                divisor = _avg_divisor(pool_h, pool_w, h_stop - h_first, w_stop - w_first,
                                       count_include_pad, divisor_override)
                shares[ow] = grad_out[plane, oh * out_width + ow] / divisor
            for ih in range(h_first, h_stop):
                for kw in range(kernel_w):
                    offset = kw - pad_w
                    first, stop = _valid_outputs(offset, stride_w, width, out_width)
                    base = ih * width + offset
                    if first == 0 and stop == out_width:  # see max_pool2d_forward
                        _spread_tap(grad_input, shares, plane, base, 0, out_width, stride_w)
                    else:
                        _spread_tap(grad_input, shares, plane, base, first, stop, stride_w)
