"""Element-wise kernels (ReLU forward and backward) over flat, C-contiguous arrays.

NumPy's ``np.where(mask, 0, x)`` branches per element; on activations, whose signs are random,
that mispredicts about half the time: 3.5 ms for a (32, 32, 26, 26) float32 array on the project
machine, more than the convolution next to it. These loops are branch-free selects, vectorised
and split over the threads (0.14 ms forward, 0.11 ms backward).
"""
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
