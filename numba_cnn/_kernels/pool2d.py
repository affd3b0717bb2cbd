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


# -------------------------------------------------------------------------------------------
# Unrolled window paths. The tap-by-tap row loops above are general but keep running maxima and
# sums in memory, and LLVM leaves them scalar for strided windows (a stride that is not a
# compile-time constant). The common square 2x2 and 3x3 windows with stride_w 1 or 2 get a path
# that visits one whole window per output, unrolled, in registers, with a literal stride, for the
# outputs whose window lies entirely inside the image ("interior"); the border keeps the general
# code. Measured on (32, 64, 56, 56) float32, forward: max 2x2 s2 5.5 -> 1.05 ms, max 3x3 s2 p1
# 15 -> 3.2 ms, max 3x3 s1 p1 ~100 -> 16 ms, avg 2x2 s2 4.2 -> 1.0 ms; avg 2x2 s2 backward
# 4.5 -> 1.3 ms. Most of the remaining cost in a row was per-column bookkeeping: the loops over
# border columns visit only those (_border_columns), never test every column.
#
# A run of interior outputs is processed in chunks of ``lanes`` and the last chunk is moved back
# to end at the last output (recomputing a few outputs, which is harmless: each output is written,
# never accumulated). That keeps the chunks in LLVM's vector loop instead of its scalar
# remainder (short rows: a 56-wide input has 28 outputs per row, a 16-wide vector loop would
# leave 12 of them to scalar code).
# -------------------------------------------------------------------------------------------

# Chunk lengths, the kernels' ``lanes`` arguments. Passed in at run time on purpose: a literal
# chunk length lets LLVM unroll the chunk completely (scalar code, 5-10x the compile time).
# Measured on (32, 64, 56, 56) float32, all values tried in one process in turn (8-64):
# max forward 16 (2x2 s2 3.2 ms vs 3.7 at 32), average forward 32 (its sums are float64;
# 4.3 ms vs 6.2-6.6 at 8-16), average backward 16 (8-64 within noise).
MAX_FORWARD_LANES = 16
AVG_FORWARD_LANES = 32
AVG_BACKWARD_LANES = 16
# integers up to 2**24 are exact in float32
_EXACT_FLOAT32_INT = 1 << 24


@njit(inline="always")
def _is_unrolled(kernel_h, kernel_w, stride_w, dilation_h, dilation_w):
    return (kernel_h == kernel_w and (kernel_h == 2 or kernel_h == 3)
            and (stride_w == 1 or stride_w == 2) and dilation_h == 1 and dilation_w == 1)


@njit(inline="always")
def _interior_columns(width, out_width, kernel_w, stride_w, pad_w):
    """Output columns [first, stop) whose whole (undilated) window lies inside [0, width)."""
    first = (pad_w + stride_w - 1) // stride_w
    stop = min(out_width, (width - kernel_w + pad_w) // stride_w + 1)
    return first, max(first, stop)


@njit(inline="always")
def _border_columns(out_width, skip_interior, column_first, column_stop):
    """How many output columns a row loop visits: all, or only those outside the interior."""
    if skip_interior:
        return out_width - (column_stop - column_first)
    return out_width


@njit(inline="always")
def _border_column(i, skip_interior, column_first, column_stop):
    """The i-th visited column (see _border_columns): the interior run is jumped over."""
    if skip_interior and i >= column_first:
        return i + column_stop - column_first
    return i


@njit(inline="always")
def _take(value, current):
    """Does ``value`` replace the running maximum ``current``? (strict >, first NaN wins)"""
    return (value > current) | ((value != value) & (current == current))


@njit(inline="always")
def _max_windows(x_flat, out_flat, idx_flat, x_base, pos_base, out_base, first, count, width,
                 kernel, stride):
    """Max and argmax of ``count`` whole windows starting at output column ``first``.

    ``x_base`` / ``pos_base``: flat index in ``x_flat`` / offset in the plane of the top-left tap
    of output column 0 (they may be "negative" columns; the windows used are inside the image).
    """
    for column in range(first, first + count):
        position = pos_base + column * stride
        at = np.uint64(x_base + column * stride)
        best = x_flat[at]
        best_position = position
        for kh in range(kernel):
            for kw in range(kernel):
                if kh + kw > 0:
                    value = x_flat[at + np.uint64(kh * width + kw)]
                    take = _take(value, best)
                    best = value if take else best
                    best_position = position + kh * width + kw if take else best_position
        out_flat[np.uint64(out_base + column)] = best
        idx_flat[np.uint64(out_base + column)] = best_position


@njit(inline="always")
def _max_windows_chunked(x_flat, out_flat, idx_flat, x_base, pos_base, out_base, first, stop,
                         width, kernel, stride, lanes):
    start = first
    while start < stop:
        count = min(lanes, stop - first)
        _max_windows(x_flat, out_flat, idx_flat, x_base, pos_base, out_base,
                     min(start, stop - count), count, width, kernel, stride)
        start += count


@njit(inline="always")
def _max_row_unrolled(x_flat, out_flat, idx_flat, x_base, pos_base, out_base, first, stop,
                      width, kernel, stride_w, lanes):
    # literal kernel and stride per branch, so each inlined copy is specialised
    if kernel == 2:
        if stride_w == 2:
            _max_windows_chunked(x_flat, out_flat, idx_flat, x_base, pos_base, out_base, first,
                                 stop, width, 2, 2, lanes)
        else:
            _max_windows_chunked(x_flat, out_flat, idx_flat, x_base, pos_base, out_base, first,
                                 stop, width, 2, 1, lanes)
    else:
        if stride_w == 2:
            _max_windows_chunked(x_flat, out_flat, idx_flat, x_base, pos_base, out_base, first,
                                 stop, width, 3, 2, lanes)
        else:
            _max_windows_chunked(x_flat, out_flat, idx_flat, x_base, pos_base, out_base, first,
                                 stop, width, 3, 1, lanes)


@njit(inline="always")
def _max_one_window(x, plane, height, width, h_origin, w_origin, kernel_h, kernel_w):
    """Max and argmax of one undilated window clipped to the image (padding is -inf)."""
    best = x[plane, 0]
    best_position = -1
    for kh in range(kernel_h):
        ih = h_origin + kh
        if ih < 0 or ih >= height:
            continue
        for kw in range(kernel_w):
            iw = w_origin + kw
            if iw < 0 or iw >= width:
                continue
            position = ih * width + iw
            value = x[plane, position]
            if best_position < 0 or _take(value, best):
                best = value
                best_position = position
    return best, best_position


@njit(inline="always")
def _avg_windows(x_flat, out_flat, x_base, out_base, first, count, width, kernel, stride,
                 divisor):
    """Averages of ``count`` whole windows from output column ``first`` (see _max_windows)."""
    for column in range(first, first + count):
        at = np.uint64(x_base + column * stride)
        total = 0.0
        for kh in range(kernel):
            for kw in range(kernel):
                total += x_flat[at + np.uint64(kh * width + kw)]
        out_flat[np.uint64(out_base + column)] = total / divisor


@njit(inline="always")
def _avg_windows_chunked(x_flat, out_flat, x_base, out_base, first, stop, width, kernel,
                         stride, divisor, lanes):
    start = first
    while start < stop:
        count = min(lanes, stop - first)
        _avg_windows(x_flat, out_flat, x_base, out_base, min(start, stop - count), count,
                     width, kernel, stride, divisor)
        start += count


@njit(inline="always")
def _avg_row_unrolled(x_flat, out_flat, x_base, out_base, first, stop, width, kernel, stride_w,
                      divisor, lanes):
    if kernel == 2:
        if stride_w == 2:
            _avg_windows_chunked(x_flat, out_flat, x_base, out_base, first, stop, width, 2, 2,
                                 divisor, lanes)
        else:
            _avg_windows_chunked(x_flat, out_flat, x_base, out_base, first, stop, width, 2, 1,
                                 divisor, lanes)
    else:
        if stride_w == 2:
            _avg_windows_chunked(x_flat, out_flat, x_base, out_base, first, stop, width, 3, 2,
                                 divisor, lanes)
        else:
            _avg_windows_chunked(x_flat, out_flat, x_base, out_base, first, stop, width, 3, 1,
                                 divisor, lanes)


@njit(inline="always")
def _avg_spread_windows(shares, grad_input_flat, grad_base, first, count, width, kernel,
                        stride):
    """Backward of ``_avg_windows`` for windows that do not overlap: stores, not adds.

    ``shares`` holds the row's output gradients already divided, in the gradient's dtype.
    """
    # one input row per loop: stores kh*width apart in one loop body would be a dependence of
    # unknown distance to LLVM, which then leaves the loop scalar
    for kh in range(kernel):
        for column in range(first, first + count):
            at = np.uint64(grad_base + kh * width + column * stride)
            share = shares[np.uint64(column)]
            for kw in range(kernel):
                grad_input_flat[at + np.uint64(kw)] = share


@njit(inline="always")
def _avg_spread_row_unrolled(grad_out_flat, grad_input_flat, shares, grad_base, out_base, first,
                             stop, width, kernel, divisor, lanes):
    """Interior windows of one output row, stride == kernel (non-overlapping windows)."""
    zero = grad_input_flat.dtype.type(0)
    if -_EXACT_FLOAT32_INT <= divisor <= _EXACT_FLOAT32_INT:
        # Divided in the gradient's dtype: for float32 the correctly rounded quotient, the same
        # as the general path's float64 quotient rounded to float32 (double rounding is exact
        # for division when the wider format has > 2 * 24 + 2 bits) at half the cost. Only
        # while the divisor itself is exact in float32. zero + q: the same sign of zero as the
        # general path's 0 += q.
        exact_divisor = grad_input_flat.dtype.type(divisor)
        for column in range(first, stop):
            shares[np.uint64(column)] = (zero + grad_out_flat[np.uint64(out_base + column)]
                                         / exact_divisor)
    else:  # a huge divisor_override: float64 division, as the general path
        for column in range(first, stop):
            shares[np.uint64(column)] = zero + grad_out_flat[np.uint64(out_base + column)] / divisor
    start = first
    while start < stop:
        count = min(lanes, stop - first)
        chunk_first = min(start, stop - count)
        # literal kernel and stride per branch, so each inlined copy is specialised
        if kernel == 2:
            _avg_spread_windows(shares, grad_input_flat, grad_base, chunk_first, count, width,
                                2, 2)
        else:
            _avg_spread_windows(shares, grad_input_flat, grad_base, chunk_first, count, width,
                                3, 3)
        start += count


@cached_njit(parallel=True)
def max_pool2d_forward(x, out, indices, height, width, out_height, out_width, kernel_h, kernel_w,
                       stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, lanes):
    """Max pooling with argmax indices.

    x : (P, H*W) input planes; out : (P, OH*OW) same dtype; indices : (P, OH*OW) int64, both
    written here. An index is the offset ``ih*W + iw`` of the maximum inside its input plane.
    Padding acts as -inf, so padded taps are simply skipped. Ties go to the first maximum in
    row-major window order (strict ``>``); a NaN wins over every number and the first NaN is kept,
    so the output is NaN and the index points at the first NaN of the window. A window of -inf
    only gives -inf and the index of its first in-image tap.

    Square 2x2 / 3x3 windows take the unrolled path for their interior outputs (see above). The
    general loops run tap by tap over a whole output row (taps in row-major window order, so the
    first-maximum rule holds): the innermost loop walks output columns with a fixed input
    stride and no window bookkeeping; visiting one window at a time in a generic loop cost ~12x
    more on (32, 64, 56, 56).
    """
    lanes = max(lanes, 1)  # a chunk of 0 outputs would never advance
    unrolled = _is_unrolled(kernel_h, kernel_w, stride_w, dilation_h, dilation_w)
    column_first, column_stop = _interior_columns(width, out_width, kernel_w, stride_w, pad_w)
    x_flat = x.reshape(-1)
    out_flat = out.reshape(-1)
    indices_flat = indices.reshape(-1)
    for task in prange(x.shape[0]):
        # the prange index is uint64 inside the parfor. Index the 2-D arrays directly: taking
        # per-plane views (x[plane]) here made the kernel ~5x slower.
        plane = np.int64(task)
        for oh in range(out_height):
            h_origin = oh * stride_h - pad_h
            row = oh * out_width
            if (unrolled and h_origin >= 0 and h_origin + kernel_h <= height
                    and column_first < column_stop):
                position = h_origin * width - pad_w
                _max_row_unrolled(x_flat, out_flat, indices_flat,
                                  plane * height * width + position, position,
                                  plane * out_height * out_width + row, column_first,
                                  column_stop, width, kernel_h, stride_w, lanes)
                for i in range(_border_columns(out_width, True, column_first, column_stop)):
                    ow = _border_column(i, True, column_first, column_stop)
                    best, best_position = _max_one_window(x, plane, height, width, h_origin,
                                                          ow * stride_w - pad_w, kernel_h,
                                                          kernel_w)
                    out[plane, row + ow] = best
                    indices[plane, row + ow] = best_position
                continue
            h_stop = min(h_origin + (kernel_h - 1) * dilation_h + 1, height)
            h_first = _first_tap(h_origin, dilation_h)
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
                       stride_h, stride_w, pad_h, pad_w, count_include_pad, divisor_override,
                       lanes):
    """Average pooling. x : (P, H*W); out : (P, OH*OW), written here.

    The window sums are accumulated in float64 whatever the dtype (more accurate than a float32
    running sum, and a float32 sum cannot overflow to inf halfway), then divided by the divisor:
    ``divisor_override`` if non-zero, else the window's extent inside the padded input
    (``count_include_pad``) or inside the image. Square 2x2 / 3x3 windows take the unrolled path
    for their interior outputs; the general loops visit the taps a whole output row at a time,
    as in ``max_pool2d_forward``. Both add a window's taps in the same (row-major) order.
    """
    lanes = max(lanes, 1)  # a chunk of 0 outputs would never advance
    unrolled = _is_unrolled(kernel_h, kernel_w, stride_w, 1, 1)
    column_first, column_stop = _interior_columns(width, out_width, kernel_w, stride_w, pad_w)
    # an interior window lies inside the image: both divisors are the window's size
    interior_divisor = divisor_override if divisor_override != 0 else kernel_h * kernel_w
    x_flat = x.reshape(-1)
    out_flat = out.reshape(-1)
    for task in prange(x.shape[0]):
        plane = np.int64(task)
        totals = np.empty(out_width, dtype=np.float64)
        for oh in range(out_height):
            h_first, h_stop, pool_h = _avg_window(oh, stride_h, pad_h, kernel_h, height)
            h_origin = oh * stride_h - pad_h
            unrolled_row = (unrolled and h_origin >= 0 and h_origin + kernel_h <= height
                            and column_first < column_stop)
            if unrolled_row:
                position = h_origin * width - pad_w
                _avg_row_unrolled(x_flat, out_flat, plane * height * width + position,
                                  plane * out_height * out_width + oh * out_width, column_first,
                                  column_stop, width, kernel_h, stride_w, interior_divisor,
                                  lanes)
            else:
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
            for i in range(_border_columns(out_width, unrolled_row, column_first, column_stop)):
                ow = _border_column(i, unrolled_row, column_first, column_stop)
                w_first, w_stop, pool_w = _avg_window(ow, stride_w, pad_w, kernel_w, width)
                if h_first >= h_stop or w_first >= w_stop:
                    # Unreachable with validated arguments (padding <= kernel // 2); PyTorch
                    # leaves such an output at 0.
                    out[plane, oh * out_width + ow] = 0
                    continue
                if unrolled_row:  # a border window of an unrolled row: sum it here
                    total = 0.0
                    for ih in range(h_first, h_stop):
                        for iw in range(w_first, w_stop):
                            total += x[plane, ih * width + iw]
                    totals[ow] = total
                divisor = _avg_divisor(pool_h, pool_w, h_stop - h_first, w_stop - w_first,
                                       count_include_pad, divisor_override)
                out[plane, oh * out_width + ow] = totals[ow] / divisor


@cached_njit(parallel=True)
def avg_pool2d_backward(grad_out, grad_input, height, width, out_height, out_width, kernel_h,
                        kernel_w, stride_h, stride_w, pad_h, pad_w, count_include_pad,
                        divisor_override, lanes):
    """Gradient of ``avg_pool2d_forward``: each output gradient, divided by its window's divisor,
    is added to every in-image position of the window (as PyTorch: divide first, then add).

    grad_out : (P, OH*OW); grad_input : (P, H*W), overwritten (zeroed here). Non-overlapping
    square 2x2 / 3x3 windows (stride == kernel) store their interior shares directly (the
    unrolled path; no position gets two shares); everything else goes row at a time, like the
    forward pass.
    """
    lanes = max(lanes, 1)  # a chunk of 0 outputs would never advance
    unrolled = (kernel_h == kernel_w and (kernel_h == 2 or kernel_h == 3)
                and stride_h == kernel_h and stride_w == kernel_w)
    column_first, column_stop = _interior_columns(width, out_width, kernel_w, stride_w, pad_w)
    interior_divisor = divisor_override if divisor_override != 0 else kernel_h * kernel_w
    # the unrolled windows tile the whole plane: every position is stored once, no zeroing
    tiled = (unrolled and pad_h == 0 and pad_w == 0 and out_height * kernel_h == height
             and out_width * kernel_w == width)
    grad_out_flat = grad_out.reshape(-1)
    grad_input_flat = grad_input.reshape(-1)
    plane_length = grad_input.shape[1]
    for task in prange(grad_out.shape[0]):
        plane = np.int64(task)
        shares = np.empty(out_width, dtype=np.float64)
        row_shares = np.empty(out_width, dtype=grad_input.dtype)
        if not tiled:
            plane_start = np.uint64(plane * plane_length)
            for i in range(plane_length):
                grad_input_flat[plane_start + np.uint64(i)] = 0
        for oh in range(out_height):
            h_first, h_stop, pool_h = _avg_window(oh, stride_h, pad_h, kernel_h, height)
            h_origin = oh * stride_h - pad_h
            unrolled_row = (unrolled and h_origin >= 0 and h_origin + kernel_h <= height
                            and column_first < column_stop)
            if unrolled_row:
                position = h_origin * width - pad_w
                _avg_spread_row_unrolled(grad_out_flat, grad_input_flat, row_shares,
                                         plane * height * width + position,
                                         plane * out_height * out_width + oh * out_width,
                                         column_first, column_stop, width, kernel_h,
                                         interior_divisor, lanes)
            for i in range(_border_columns(out_width, unrolled_row, column_first, column_stop)):
                ow = _border_column(i, unrolled_row, column_first, column_stop)
                w_first, w_stop, pool_w = _avg_window(ow, stride_w, pad_w, kernel_w, width)
                if h_first >= h_stop or w_first >= w_stop:
                    shares[ow] = 0.0
                    continue
                divisor = _avg_divisor(pool_h, pool_w, h_stop - h_first, w_stop - w_first,
                                       count_include_pad, divisor_override)
                shares[ow] = grad_out[plane, oh * out_width + ow] / divisor
            if unrolled_row:
                # border windows only (their shares are non-zero); no overlap with the interior
                for i in range(_border_columns(out_width, True, column_first, column_stop)):
                    ow = _border_column(i, True, column_first, column_stop)
                    w_first, w_stop, _ = _avg_window(ow, stride_w, pad_w, kernel_w, width)
                    for ih in range(h_first, h_stop):
                        for iw in range(w_first, w_stop):
                            grad_input[plane, ih * width + iw] += shares[ow]
                continue
            for ih in range(h_first, h_stop):
                for kw in range(kernel_w):
                    offset = kw - pad_w
                    first, stop = _valid_outputs(offset, stride_w, width, out_width)
                    base = ih * width + offset
                    if first == 0 and stop == out_width:  # see max_pool2d_forward
                        _spread_tap(grad_input, shares, plane, base, 0, out_width, stride_w)
                    else:
                        _spread_tap(grad_input, shares, plane, base, first, stop, stride_w)
