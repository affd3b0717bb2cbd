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


@njit(cache=True)
def _first_tap(start, dilation):
    """First tap ``start + j*dilation`` (j >= 0) that is not in the leading padding (>= 0)."""
    if start >= 0:
        return start
    return start + ((-start + dilation - 1) // dilation) * dilation


@njit(cache=True)
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


@njit(cache=True)
def _avg_divisor(pool_h, pool_w, rows, cols, count_include_pad, divisor_override):
    if divisor_override != 0:
        return divisor_override
    if count_include_pad:
        return pool_h * pool_w
    return rows * cols


@njit(parallel=True, cache=True)
def max_pool2d_forward(x, out, indices, height, width, out_height, out_width, kernel_h, kernel_w,
                       stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w):
    """Max pooling with argmax indices.

    x : (P, H*W) input planes; out : (P, OH*OW) same dtype; indices : (P, OH*OW) int64, both
    written here. An index is the offset ``ih*W + iw`` of the maximum inside its input plane.
    Padding acts as -inf, so padded taps are simply skipped. Ties go to the first maximum in
    row-major window order (strict ``>``); a NaN wins over every number and the first NaN is kept,
    so the output is NaN and the index points at the first NaN of the window. A window of -inf
    only gives -inf and the index of its first in-image tap.
    """
    for task in prange(x.shape[0]):
        plane = np.int64(task)  # the prange index is uint64 inside the parfor
        for oh in range(out_height):
            h_origin = oh * stride_h - pad_h
            h_stop = min(h_origin + (kernel_h - 1) * dilation_h + 1, height)
            h_first = _first_tap(h_origin, dilation_h)
            for ow in range(out_width):
                w_origin = ow * stride_w - pad_w
                w_stop = min(w_origin + (kernel_w - 1) * dilation_w + 1, width)
                w_first = _first_tap(w_origin, dilation_w)
                best = -np.inf
                best_index = h_first * width + w_first
                for ih in range(h_first, h_stop, dilation_h):
                    row = ih * width
                    for iw in range(w_first, w_stop, dilation_w):
                        value = x[plane, row + iw]
                        # value != value: NaN test that survives (no fastmath); best == best keeps
                        # the first NaN instead of moving to a later one.
                        if value > best or (value != value and best == best):
                            best = value
                            best_index = row + iw
                out[plane, oh * out_width + ow] = best
                indices[plane, oh * out_width + ow] = best_index


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
def avg_pool2d_forward(x, out, height, width, out_height, out_width, kernel_h, kernel_w,
                       stride_h, stride_w, pad_h, pad_w, count_include_pad, divisor_override):
    """Average pooling. x : (P, H*W); out : (P, OH*OW), written here.

    The window sum is accumulated in float64 whatever the dtype (more accurate than a float32
    running sum, and a float32 sum cannot overflow to inf halfway), then divided by the divisor:
    ``divisor_override`` if non-zero, else the window's extent inside the padded input
    (``count_include_pad``) or inside the image.
    """
    for task in prange(x.shape[0]):
        plane = np.int64(task)
        for oh in range(out_height):
            h_first, h_stop, pool_h = _avg_window(oh, stride_h, pad_h, kernel_h, height)
            for ow in range(out_width):
                w_first, w_stop, pool_w = _avg_window(ow, stride_w, pad_w, kernel_w, width)
                if h_first >= h_stop or w_first >= w_stop:
                    # Unreachable with validated arguments (padding <= kernel // 2); PyTorch
                    # leaves such an output at 0.
                    out[plane, oh * out_width + ow] = 0
                    continue
                total = 0.0
                for ih in range(h_first, h_stop):
                    row = ih * width
                    for iw in range(w_first, w_stop):
                        total += x[plane, row + iw]
                divisor = _avg_divisor(pool_h, pool_w, h_stop - h_first, w_stop - w_first,
                                       count_include_pad, divisor_override)
                out[plane, oh * out_width + ow] = total / divisor


@njit(parallel=True, cache=True)
def avg_pool2d_backward(grad_out, grad_input, height, width, out_height, out_width, kernel_h,
                        kernel_w, stride_h, stride_w, pad_h, pad_w, count_include_pad,
                        divisor_override):
    """Gradient of ``avg_pool2d_forward``: each output gradient, divided by its window's divisor,
    is added to every in-image position of the window (as PyTorch: divide first, then add).

    grad_out : (P, OH*OW); grad_input : (P, H*W), overwritten (zeroed here).
    """
    for task in prange(grad_out.shape[0]):
        plane = np.int64(task)
        for i in range(grad_input.shape[1]):
            grad_input[plane, i] = 0
        for oh in range(out_height):
            h_first, h_stop, pool_h = _avg_window(oh, stride_h, pad_h, kernel_h, height)
            for ow in range(out_width):
                w_first, w_stop, pool_w = _avg_window(ow, stride_w, pad_w, kernel_w, width)
                if h_first >= h_stop or w_first >= w_stop:
                    continue
                divisor = _avg_divisor(pool_h, pool_w, h_stop - h_first, w_stop - w_first,
                                       count_include_pad, divisor_override)
                share = grad_out[plane, oh * out_width + ow] / divisor
                for ih in range(h_first, h_stop):
                    row = ih * width
                    for iw in range(w_first, w_stop):
                        grad_input[plane, row + iw] += share
