"""Element-wise kernels (ReLU forward and backward) over flat, C-contiguous arrays, and the
per-channel sums of a bias gradient.

NumPy's ``np.where(mask, 0, x)`` branches per element; on activations, whose signs are random,
that mispredicts about half the time: 3.5 ms for a (32, 32, 26, 26) float32 array on the project
machine, more than the convolution next to it. These loops are branch-free selects, vectorised
and split over the threads (0.14 ms forward, 0.11 ms backward).
"""
import numpy as np
from numba import prange

from . import cached_njit


@cached_njit(parallel=True)
def relu_forward(x, out, mask):
    """``mask = x <= 0``; ``out = 0 where mask else x`` (NaN is not <= 0: it passes).

    x, out : 1-D, same float dtype; mask : 1-D bool. All written but ``x``.
    """
    zero = out.dtype.type(0)
    for i in prange(x.shape[0]):
        value = x[i]
        negative = value <= zero
        mask[i] = negative
        out[i] = zero if negative else value


@cached_njit(parallel=True)
def relu_backward(grad_out, mask, grad_input):
    """``grad_input = 0 where mask else grad_out`` (1-D arrays, ``mask`` bool)."""
    zero = grad_input.dtype.type(0)
    for i in prange(grad_out.shape[0]):
        grad_input[i] = zero if mask[i] else grad_out[i]


@cached_njit(parallel=True, fastmath={"reassoc"})
def channel_sums(src, out):
    """``out[c] = sum_{n, h, w} src[n, c, h, w]``: a convolution's bias gradient.

    src : (N, C, H, W), C-contiguous; out : (C,), overwritten (src's dtype, or float64).

    One task per channel sums its N planes in float64, in an order fixed by the compiled loop
    (``reassoc`` only lets LLVM keep several vector partial sums), so the result does not
    depend on the thread count; NaN and inf propagate. NumPy's ``sum(axis=(0, 2, 3))`` runs
    on one thread, strided: 0.26 ms for mnist1's (64, 32, 26, 26) float32 gradient, a sixth of
    that layer's backward.
    """
    batch, channels, height, width = src.shape
    plane = height * width
    src_flat = src.reshape(-1)
    for c in prange(channels):
        total = np.float64(0)
        for n in range(batch):
            start = np.uint64((n * channels + c) * plane)
            for i in range(plane):
                total += src_flat[start + np.uint64(i)]
        out[c] = total
