"""Drop-in replacement for the layers of "Deep Learning from Scratch" (``common/layers.py``).

Change one import and the book's networks (``SimpleConvNet``, ``DeepConvNet``), its ``Trainer``
and its optimizers run unchanged, with convolution and max pooling done by the Numba kernels of
``numba_cnn.functional`` instead of im2col matrices::

    # from common.layers import *
    from numba_cnn.compat import *

Constructors, defaults, attributes (``W``, ``b``, ``dW``, ``db``; ``dgamma``, ``dbeta``,
``running_mean``, ``running_var``; ``loss``) and call signatures are the book's, and results equal
the book's layers to floating-point tolerance. What training code relies on:

- ``layer.W`` and ``layer.b`` are the very arrays passed in. Optimizers update them in place and
  ``load_params`` rebinds them; either takes effect on the next ``forward``.
- ``backward`` uses the state saved by the last ``forward``: the input and the weights are kept
  by reference, not copied, so do not modify them in place between the two calls (the book's
  networks never do). No layer modifies its inputs (the book's ``Relu.backward`` writes into
  ``dout``; this one does not).
- dtypes follow NumPy promotion: float64 weights with float32 or float16 inputs compute in
  float64, as the book's networks do. Where every input is float32, Convolution and Pooling
  compute and return float32 (the book's im2col always builds float64 matrices, so it returns
  float64); float16 alone is computed as float32. ``dW`` and ``db`` have the dtypes of ``W`` and
  ``b`` (the compute dtype for a scalar or integer bias).
- Any strides work for ``x`` and ``dout`` (the book's layers hand each other transposed views);
  outputs of Convolution and Pooling are new C-contiguous arrays.
- Max pooling ties go to the first maximum in row-major window order, as ``np.argmax``.
- ``Pooling`` with ``pad > 0`` pads with zeros, as the book's im2col does (its Pooling layer
  computes the output size without the padding and fails for ``pad > 0``): a window covering
  padding never returns less than 0, and gradient routed to a padding zero is dropped. This
  differs from ``functional.max_pool2d``, which pads with -inf as PyTorch does.
- ``Dropout`` draws its mask from NumPy's global generator exactly as the book does
  (``np.random.rand(*x.shape) > dropout_ratio``), so seeded runs reproduce the book's numbers.
  No other layer touches the global generator.

Convolution and Pooling call ``numba_cnn.functional``; Relu runs a branch-free Numba kernel on
float arrays of 16k elements or more (NumPy's ``np.where`` mispredicts on random signs and cost
more than the convolutions in the demo network), with the book's results; the other layers are
NumPy, as in the book.
"""
import numpy as np

from . import _activations, functional

__all__ = ["Convolution", "Pooling", "Relu", "Sigmoid", "Affine", "SoftmaxWithLoss", "Dropout",
           "BatchNormalization"]

# The book's constant in BatchNormalization (written 10e-7 there).
_BATCH_NORM_EPS = 1e-6
# The book's constant in cross_entropy_error, which keeps log() finite.
_LOG_EPS = 1e-7


def _from_forward(layer, state):
    """The state saved by ``layer``'s last forward; a clear error if there was none."""
    if state is None:
        raise RuntimeError(f"{type(layer).__name__}.backward called before forward: call "
                           "forward first, backward uses what it saved")
    return state


def _grad_dtype(param, computed):
    """dtype a parameter gradient is stored in: the parameter's own float dtype, else the
    dtype it was computed in (scalar or integer parameters)."""
    if isinstance(param, np.ndarray) and param.dtype.kind == "f":
        return param.dtype
    return computed.dtype


def _bias_vector(bias, filters, dtype):
    """The book adds ``b`` to an (N*OH*OW, FN) matrix: a scalar, (1,) or (FN,)-sized ``b``
    broadcasts to one value per filter."""
    bias = np.asarray(bias)
    if bias.size == 1:
        return np.full(filters, bias.reshape(()), dtype=dtype)
    if bias.size == filters:
        return bias.reshape(filters).astype(dtype, copy=False)
    raise ValueError(f"Convolution: b must be a scalar or have {filters} values (one per "
                     f"filter), got shape {bias.shape}")


class Convolution:
    """2-D convolution (cross-correlation) ``y = conv(x, W) + b``, computed by
    ``functional.conv2d``.

    Args:
        W: (FN, C, FH, FW) filters, kept by reference as ``self.W``.
        b: (FN,) bias (or a scalar), kept by reference as ``self.b``.
        stride, pad: int (or (h, w)); ``pad`` zero-pads both sides.

    Shape:
        x: (N, C, H, W) -> y: (N, FN, OH, OW), ``OH = (H + 2 * pad - FH) // stride + 1``,
        likewise OW.

    Attributes:
        W, b: the parameters as passed in (rebinding them takes effect on the next forward).
        dW, db: gradients set by ``backward``, with the dtypes of W and b.
    """

    def __init__(self, W, b, stride=1, pad=0):
        self.W = W
        self.b = b
        self.stride = stride
        self.pad = pad
        self.dW = None
        self.db = None
        self._saved = None

    def forward(self, x):
        weight = self.W
        dtype = np.result_type(x, weight, self.b)
        bias = _bias_vector(self.b, np.shape(weight)[0], dtype)
        out = functional.conv2d(x, weight, bias, self.stride, self.pad)
        self._saved = (x, weight, self.b)
        return out

    def backward(self, dout):
        x, weight, bias = _from_forward(self, self._saved)
        dx, grad_weight, grad_bias = functional.conv2d_backward(dout, x, weight, self.stride,
                                                                self.pad)
        self.dW = grad_weight.astype(_grad_dtype(weight, grad_weight), copy=False)
        self.db = grad_bias.astype(_grad_dtype(bias, grad_bias), copy=False)
        return dx


class Pooling:
    """2-D max pooling over ``pool_h x pool_w`` windows, computed by ``functional.max_pool2d``.

    Args:
        pool_h, pool_w: window size.
        stride: int (or (h, w)); 1 by default, as the book's Pooling (its networks pass
            ``stride=2``).
        pad: zero padding on both sides (see the module docstring: zeros, not -inf).

    Shape:
        x: (N, C, H, W) -> y: (N, C, OH, OW), ``OH = (H + 2 * pad - pool_h) // stride + 1``,
        likewise OW.
    """

    def __init__(self, pool_h, pool_w, stride=1, pad=0):
        self.pool_h = pool_h
        self.pool_w = pool_w
        self.stride = stride
        self.pad = pad
        self._saved = None

    def forward(self, x):
        pad = self.pad
        if pad:
            # the book's im2col pads with zeros; functional.max_pool2d would pad with -inf
            x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        out, indices = functional.max_pool2d(x, (self.pool_h, self.pool_w), self.stride,
                                             return_indices=True)
        self._saved = (np.shape(x), indices, pad)
        return out

    def backward(self, dout):
        padded_shape, indices, pad = _from_forward(self, self._saved)
        dx = functional.max_pool2d_backward(dout, indices, padded_shape)
        if pad:
            dx = np.ascontiguousarray(dx[:, :, pad:padded_shape[2] - pad,
                                         pad:padded_shape[3] - pad])
        return dx


class Relu:
    """``max(x, 0)``; the gradient passes where ``x > 0`` (NaN passes forward, as in the book)."""

    def __init__(self):
        self.mask = None

    def forward(self, x):
        out, self.mask = _activations.relu(x)
        return out

    def backward(self, dout):
        return _activations.relu_backward(dout, _from_forward(self, self.mask))


class Sigmoid:
    """``1 / (1 + exp(-x))``."""

    def __init__(self):
        self.out = None

    def forward(self, x):
        self.out = 1 / (1 + np.exp(-x))
        return self.out

    def backward(self, dout):
        out = _from_forward(self, self.out)
        return dout * (1.0 - out) * out


class Affine:
    """Fully connected layer ``y = x.reshape(N, -1) @ W + b``.

    Args:
        W: (D, M) weights and b: (M,) bias, kept by reference.

    Shape:
        x: (N, ...) with D elements per sample -> y: (N, M); ``backward`` returns dx shaped
        like x.
    """

    def __init__(self, W, b):
        self.W = W
        self.b = b
        self.dW = None
        self.db = None
        self._saved = None

    def forward(self, x):
        x_shape = np.shape(x)
        flat = np.reshape(x, (x_shape[0], -1))
        weight = self.W
        self._saved = (x_shape, flat, weight)
        return np.dot(flat, weight) + self.b

    def backward(self, dout):
        x_shape, flat, weight = _from_forward(self, self._saved)
        self.dW = np.dot(flat.T, dout)
        self.db = np.sum(dout, axis=0)
        return np.dot(dout, weight.T).reshape(x_shape)


class SoftmaxWithLoss:
    """Softmax over the last axis followed by the mean cross-entropy over the batch.

    ``forward(x, t)`` takes integer labels (N,) or one-hot labels shaped like x and returns the
    loss (also kept as ``self.loss``). ``backward(dout=1)`` returns ``(y - onehot(t)) / N``;
    ``dout`` is accepted for the book's signature and, as in the book, not used (the loss ends
    the graph).
    """

    def __init__(self):
        self.loss = None
        self.y = None
        self.t = None

    def forward(self, x, t):
        t = np.asarray(t)
        exp = np.exp(x - np.max(x, axis=-1, keepdims=True))
        self.y = exp / np.sum(exp, axis=-1, keepdims=True)
        self.t = t
        self.loss = _cross_entropy(self.y, t)
        return self.loss

    def backward(self, dout=1):
        _from_forward(self, self.y)
        batch = self.t.shape[0] if self.t.ndim else 1
        if self.t.size == self.y.size:
            return (self.y - self.t) / batch
        dx = self.y.copy()
        dx[np.arange(batch), self.t] -= 1
        return dx / batch


def _cross_entropy(y, t):
    """Mean of ``-log(y[label] + 1e-7)``; one-hot ``t`` are turned into labels first."""
    if y.ndim == 1:
        y = y.reshape(1, -1)
        t = t.reshape(1, -1)
    labels = t.argmax(axis=1) if t.size == y.size else t
    batch = y.shape[0]
    return -np.sum(np.log(y[np.arange(batch), labels] + _LOG_EPS)) / batch


class Dropout:
    """Zeroes each element with probability ``dropout_ratio`` in training; scales by
    ``1 - dropout_ratio`` at test time (no rescaling during training, as the book).

    The mask comes from NumPy's global generator, ``np.random.rand(*x.shape) > dropout_ratio``,
    exactly as in the book, so ``np.random.seed`` reproduces the book's runs.
    """

    def __init__(self, dropout_ratio=0.5):
        self.dropout_ratio = dropout_ratio
        self.mask = None

    def forward(self, x, train_flg=True):
        if train_flg:
            self.mask = np.random.rand(*x.shape) > self.dropout_ratio
            return x * self.mask
        return x * (1.0 - self.dropout_ratio)

    def backward(self, dout):
        return dout * _from_forward(self, self.mask)


class BatchNormalization:
    """Batch normalisation with the book's semantics.

    Every input is flattened to (N, D) (a 4-D input is normalised per C*H*W feature, not per
    channel) and normalised with the batch statistics in training, ``eps = 1e-6``; the running
    statistics start at zero and are replaced (new arrays, not updated in place) by
    ``momentum * running + (1 - momentum) * batch`` (variance without Bessel's correction).

    Args:
        gamma, beta: (D,) scale and shift, kept by reference.
        momentum: weight of the old running statistics.
        running_mean, running_var: (D,) initial running statistics, or None for zeros.

    Attributes:
        dgamma, dbeta: gradients set by ``backward``.
    """

    def __init__(self, gamma, beta, momentum=0.9, running_mean=None, running_var=None):
        self.gamma = gamma
        self.beta = beta
        self.momentum = momentum
        self.running_mean = running_mean
        self.running_var = running_var
        self.dgamma = None
        self.dbeta = None
        self._saved = None

    def forward(self, x, train_flg=True):
        x_shape = np.shape(x)
        flat = np.reshape(x, (x_shape[0], -1)) if len(x_shape) != 2 else x
        if self.running_mean is None:
            self.running_mean = np.zeros(flat.shape[1])
            self.running_var = np.zeros(flat.shape[1])
        gamma = self.gamma
        if train_flg:
            mean = flat.mean(axis=0)
            centered = flat - mean
            var = np.mean(centered ** 2, axis=0)
            std = np.sqrt(var + _BATCH_NORM_EPS)
            normalized = centered / std
            self._saved = (x_shape, centered, normalized, std, gamma)
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mean
            self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var
        else:
            centered = flat - self.running_mean
            normalized = centered / np.sqrt(self.running_var + _BATCH_NORM_EPS)
        return (gamma * normalized + self.beta).reshape(x_shape)

    def backward(self, dout):
        x_shape, centered, normalized, std, gamma = _from_forward(self, self._saved)
        dout = np.reshape(dout, (dout.shape[0], -1)) if np.ndim(dout) != 2 else dout
        batch = dout.shape[0]
        self.dbeta = dout.sum(axis=0)
        self.dgamma = np.sum(normalized * dout, axis=0)
        grad_normalized = gamma * dout
        grad_centered = grad_normalized / std
        grad_std = -np.sum(grad_normalized * centered / (std * std), axis=0)
        grad_var = 0.5 * grad_std / std
        grad_centered = grad_centered + (2.0 / batch) * centered * grad_var
        grad_mean = np.sum(grad_centered, axis=0)
        return (grad_centered - grad_mean / batch).reshape(x_shape)
