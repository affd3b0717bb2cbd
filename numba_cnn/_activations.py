"""ReLU for the compat layers: the Numba kernels where they apply, NumPy everywhere else.

The kernels take float32 / float64 arrays of at least ``KERNEL_MIN_SIZE`` elements (below that,
starting the threads costs more than NumPy's loop); other dtypes, shapes and sizes take
``np.where`` with exactly the same results.
"""
import numpy as np

from ._kernels import elementwise as _kernels

KERNEL_MIN_SIZE = 1 << 14


def _kernel_dtype(*arrays):
    dtype = arrays[0].dtype
    return (dtype in (np.float32, np.float64) and all(a.dtype == dtype for a in arrays)
            and arrays[0].size >= KERNEL_MIN_SIZE)


def relu(x):
    """(y, mask): ``mask = x <= 0`` and ``y = where(mask, 0, x)``, y a new array."""
    x = np.asarray(x)
    if not _kernel_dtype(x):
        mask = x <= 0
        return np.where(mask, 0, x), mask
    x_flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(x.shape, dtype=x.dtype)
    mask = np.empty(x.shape, dtype=np.bool_)
    _kernels.relu_forward(x_flat, out.reshape(-1), mask.reshape(-1))
    return out, mask


def relu_backward(grad_out, mask):
    """``where(mask, 0, grad_out)`` as a new array (broadcasting as ``np.where`` does)."""
    grad_out = np.asarray(grad_out)
    if grad_out.shape != mask.shape or not _kernel_dtype(grad_out):
        return np.where(mask, 0, grad_out)
    grad_input = np.empty(grad_out.shape, dtype=grad_out.dtype)
    _kernels.relu_backward(np.ascontiguousarray(grad_out).reshape(-1), mask.reshape(-1),
                           grad_input.reshape(-1))
    return grad_input
