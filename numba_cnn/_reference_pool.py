"""Slow, obviously-correct NumPy references for the pooling ops (re-exported by ``reference``).

Same names and signatures as ``numba_cnn._pooling``; everything is computed in float64 with
direct loops over output positions, for small shapes in tests. The window geometry is written
down independently of ``_pooling`` (enumerating window positions instead of PyTorch's output-size
formula), so a formula bug in the fast path shows up as a mismatch. No validation: callers pass
valid arguments. NumPy only.
"""
import numpy as np


def _pair(value):
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _window_starts(size, kernel, stride, pad, dilation, ceil_mode):
    """Start positions (in unpadded coordinates, may be negative) of the pooling windows.

    A window whose taps all lie in the padded input [-pad, size + pad) is always used. With
    ceil_mode, windows continue past that while the previous one (for the first window: one
    stride before it) did not reach the end of the padded input, as long as they start before
    the right padding.
    """
    extent = dilation * (kernel - 1) + 1
    starts = []
    position = 0
    while True:
        start = position * stride - pad
        fits = start + extent <= size + pad
        previous_reached_end = (start - stride) + extent >= size + pad
        if fits or (ceil_mode and not previous_reached_end and start < size):
            starts.append(start)
            position += 1
        else:
            return starts


def _taps(start, kernel, dilation, low, high):
    """Window positions start + j*dilation (j < kernel) that lie in [low, high)."""
    return [start + j * dilation for j in range(kernel) if low <= start + j * dilation < high]


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """x: (N, C, H, W) -> y: (N, C, OH, OW) float64 [, indices (N, C, OH, OW) int64].

    Padding never wins (it is -inf); the first maximum in row-major window order wins ties; a NaN
    beats every number and the first NaN is reported.
    """
    x = np.asarray(x, dtype=np.float64)
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, c, h, w = x.shape
    rows = _window_starts(h, kh, sh, ph, dh, ceil_mode)
    cols = _window_starts(w, kw, sw, pw, dw, ceil_mode)
    out = np.empty((n, c, len(rows), len(cols)))
    indices = np.empty((n, c, len(rows), len(cols)), dtype=np.int64)
    for b in range(n):
        for ch in range(c):
            for i, row_start in enumerate(rows):
                for j, col_start in enumerate(cols):
                    candidates = [(ih, iw) for ih in _taps(row_start, kh, dh, 0, h)
                                  for iw in _taps(col_start, kw, dw, 0, w)]
                    values = np.array([x[b, ch, ih, iw] for ih, iw in candidates])
                    nan = np.flatnonzero(np.isnan(values))
                    # np.argmax returns the first occurrence of the maximum
                    best = nan[0] if nan.size else int(np.argmax(values))
                    out[b, ch, i, j] = values[best]
                    indices[b, ch, i, j] = candidates[best][0] * w + candidates[best][1]
    return (out, indices) if return_indices else out


def max_pool2d_backward(grad_out, indices, input_shape):
    """grad_out, indices: (N, C, OH, OW) -> grad_x: (N, C, H, W) float64."""
    grad_out = np.asarray(grad_out, dtype=np.float64)
    n, c, h, w = input_shape
    grad_x = np.zeros((n, c, h * w))
    for b in range(n):
        for ch in range(c):
            np.add.at(grad_x[b, ch], np.asarray(indices[b, ch]).ravel(), grad_out[b, ch].ravel())
    return grad_x.reshape(n, c, h, w)


def _avg_windows(shape, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override):
    """Yield ((i, j), in-image rows, in-image cols, divisor) for every output position."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    h, w = shape
    for i, row_start in enumerate(_window_starts(h, kh, sh, ph, 1, ceil_mode)):
        for j, col_start in enumerate(_window_starts(w, kw, sw, pw, 1, ceil_mode)):
            rows = _taps(row_start, kh, 1, 0, h)
            cols = _taps(col_start, kw, 1, 0, w)
            if divisor_override is not None:
                divisor = divisor_override
            elif count_include_pad:
                # positions inside the padded input; a ceil_mode window hanging past the right
                # padding is clipped there
                divisor = (len(_taps(row_start, kh, 1, -ph, h + ph))
                           * len(_taps(col_start, kw, 1, -pw, w + pw)))
            else:
                divisor = len(rows) * len(cols)
            yield (i, j), rows, cols, divisor


def _avg_out_size(shape, kernel_size, stride, padding, ceil_mode):
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    return (len(_window_starts(shape[0], kh, sh, ph, 1, ceil_mode)),
            len(_window_starts(shape[1], kw, sw, pw, 1, ceil_mode)))


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """x: (N, C, H, W) -> y: (N, C, OH, OW) float64."""
    x = np.asarray(x, dtype=np.float64)
    n, c, h, w = x.shape
    out = np.zeros((n, c) + _avg_out_size((h, w), kernel_size, stride, padding, ceil_mode))
    for (i, j), rows, cols, divisor in _avg_windows((h, w), kernel_size, stride, padding,
                                                    ceil_mode, count_include_pad,
                                                    divisor_override):
        if rows and cols:
            out[:, :, i, j] = x[:, :, rows][:, :, :, cols].sum(axis=(2, 3)) / divisor
    return out


def avg_pool2d_backward(grad_out, input_shape, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True, divisor_override=None):
    """grad_out: (N, C, OH, OW) -> grad_x: (N, C, H, W) float64."""
    grad_out = np.asarray(grad_out, dtype=np.float64)
    n, c, h, w = input_shape
    grad_x = np.zeros((n, c, h, w))
    for (i, j), rows, cols, divisor in _avg_windows((h, w), kernel_size, stride, padding,
                                                    ceil_mode, count_include_pad,
                                                    divisor_override):
        for ih in rows:
            for iw in cols:
                grad_x[:, :, ih, iw] += grad_out[:, :, i, j] / divisor
    return grad_x


def global_avg_pool2d(x):
    """x: (N, C, H, W) -> y: (N, C, 1, 1) float64."""
    return np.asarray(x, dtype=np.float64).mean(axis=(2, 3), keepdims=True)


def global_avg_pool2d_backward(grad_out, input_shape):
    """grad_out: (N, C, 1, 1) -> grad_x: (N, C, H, W) float64."""
    n, c, h, w = input_shape
    grad_out = np.asarray(grad_out, dtype=np.float64).reshape(n, c, 1, 1)
    return np.broadcast_to(grad_out / (h * w), (n, c, h, w)).copy()
