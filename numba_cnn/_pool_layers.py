"""Pooling layers: ``MaxPool2D``, ``AvgPool2D``, ``GlobalAvgPool2D`` (re-exported by ``layers``).

Hyper-parameters are validated and normalised once, in the constructor, with the same helpers the
functional ops use; ``forward`` / ``backward`` only delegate to ``numba_cnn._pooling`` with the
stored values and keep what the backward pass needs (indices or the input shape, never a copy of
the input). Pooling layers have no parameters: ``params`` and ``grads`` are empty dicts.
"""
import numpy as np

from ._pooling import (_check_divisor_override, _check_flag, _pool_params, avg_pool2d,
                       avg_pool2d_backward, global_avg_pool2d, global_avg_pool2d_backward,
                       max_pool2d, max_pool2d_backward)


def _shape_of(x):
    """Shape of the forward input (free for arrays; lists are accepted by the ops too)."""
    return tuple(int(extent) for extent in np.shape(x))


class _Pool2D:
    """Shared state handling and repr of the pooling layers."""

    def __init__(self):
        self.params = {}
        self.grads = {}
        self._input_shape = None

    def _saved_input_shape(self):
        if self._input_shape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward: there is "
                               "no saved forward state to differentiate")
        return self._input_shape

    def _repr_items(self):
        return []

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self._repr_items())})"


class MaxPool2D(_Pool2D):
    """2-D max pooling layer (PyTorch ``nn.MaxPool2d`` semantics).

    Args:
        kernel_size, stride, padding, dilation: int or (h, w); ``stride=None`` means
            ``kernel_size``; padding (implicit -inf) must be <= kernel_size // 2.
        ceil_mode: ceil instead of floor for the output size.

    Shape:
        x: (N, C, H, W) -> y: (N, C, OH, OW) with
        ``OH = floor((H + 2*pad_h - dil_h*(KH-1) - 1) / stride_h) + 1`` (ceil with ceil_mode).

    Attributes:
        kernel_size, stride, padding, dilation: normalised (h, w) tuples; ceil_mode: bool.
        params, grads: empty dicts (no parameters).

    Example:
        >>> pool = MaxPool2D(2)
        >>> y = pool.forward(x)        # (N, C, H // 2, W // 2)
        >>> dx = pool.backward(dy)     # (N, C, H, W)
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        op = type(self).__name__
        self.kernel_size, self.stride, self.padding, self.dilation = _pool_params(
            kernel_size, stride, padding, dilation, op)
        self.ceil_mode = _check_flag(ceil_mode, "ceil_mode", op)
        self._indices = None

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, C, OH, OW); saves the argmax indices for ``backward``."""
        out, indices = max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                  self.ceil_mode, return_indices=True)
        self._indices = indices
        self._input_shape = _shape_of(x)
        return out

    def backward(self, dout):
        """dout: (N, C, OH, OW) -> dx: (N, C, H, W) for the last ``forward`` input."""
        input_shape = self._saved_input_shape()
        return max_pool2d_backward(dout, self._indices, input_shape)

    def _repr_items(self):
        items = [f"kernel_size={self.kernel_size}", f"stride={self.stride}"]
        if self.padding != (0, 0):
            items.append(f"padding={self.padding}")
        if self.dilation != (1, 1):
            items.append(f"dilation={self.dilation}")
        if self.ceil_mode:
            items.append("ceil_mode=True")
        return items


class AvgPool2D(_Pool2D):
    """2-D average pooling layer (PyTorch ``nn.AvgPool2d`` semantics).

    Args:
        kernel_size, stride, padding: int or (h, w); ``stride=None`` means ``kernel_size``;
            padding (implicit zeros) must be <= kernel_size // 2.
        ceil_mode: ceil instead of floor for the output size.
        count_include_pad: count padded positions in the divisor.
        divisor_override: if a non-zero int, the divisor of every window.

    Shape:
        x: (N, C, H, W) -> y: (N, C, OH, OW) with
        ``OH = floor((H + 2*pad_h - KH) / stride_h) + 1`` (ceil with ceil_mode).

    Attributes:
        kernel_size, stride, padding: normalised (h, w) tuples; ceil_mode, count_include_pad:
        bool; divisor_override: int or None. params, grads: empty dicts.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__()
        op = type(self).__name__
        self.kernel_size, self.stride, self.padding, _ = _pool_params(
            kernel_size, stride, padding, 1, op)
        self.ceil_mode = _check_flag(ceil_mode, "ceil_mode", op)
        self.count_include_pad = _check_flag(count_include_pad, "count_include_pad", op)
        self.divisor_override = _check_divisor_override(divisor_override, op)

    def _args(self):
        return (self.kernel_size, self.stride, self.padding, self.ceil_mode,
                self.count_include_pad, self.divisor_override)

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, C, OH, OW); saves the input shape for ``backward``."""
        out = avg_pool2d(x, *self._args())
        self._input_shape = _shape_of(x)
        return out

    def backward(self, dout):
        """dout: (N, C, OH, OW) -> dx: (N, C, H, W) for the last ``forward`` input."""
        return avg_pool2d_backward(dout, self._saved_input_shape(), *self._args())

    def _repr_items(self):
        items = [f"kernel_size={self.kernel_size}", f"stride={self.stride}"]
        if self.padding != (0, 0):
            items.append(f"padding={self.padding}")
        if self.ceil_mode:
            items.append("ceil_mode=True")
        if not self.count_include_pad:
            items.append("count_include_pad=False")
        if self.divisor_override is not None:
            items.append(f"divisor_override={self.divisor_override}")
        return items


class GlobalAvgPool2D(_Pool2D):
    """Global average pooling: the mean of each H x W plane.

    Shape:
        x: (N, C, H, W) -> y: (N, C, 1, 1).
    """

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, C, 1, 1); saves the input shape for ``backward``."""
        out = global_avg_pool2d(x)
        self._input_shape = _shape_of(x)
        return out

    def backward(self, dout):
        """dout: (N, C, 1, 1) -> dx: (N, C, H, W) for the last ``forward`` input."""
        return global_avg_pool2d_backward(dout, self._saved_input_shape())
