"""Layer classes for training code: they hold parameters and the state saved by ``forward``.

Every layer has ``forward(x) -> y`` and ``backward(dout) -> dx``; ``backward`` uses what the
last ``forward`` saved and fills the parameter gradients ``dW`` and ``db``. ``params`` and
``grads`` are dicts referencing the very arrays ``W``/``b`` and ``dW``/``db``, so an optimizer
can update them in place. Layers call ``numba_cnn.functional`` and nothing below it.
"""
import math

import numpy as np

from . import _args
from . import functional


def _generator(rng):
    """Accept a ``numpy.random.Generator``, a seed, or None (fresh entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _float_dtype(dtype, op):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: dtype must be float32 or float64, got {dtype}")
    return dtype


class _Layer:
    """Shared bookkeeping: the saved forward state and the error for backward-before-forward."""

    _saved = None

    def _require_forward(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward: "
                               "call forward(x) first, backward uses what it saved")
        return self._saved

    def __call__(self, x):
        return self.forward(x)

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class _ConvBase(_Layer):
    """Parameter allocation, initialisation, params/grads and repr shared by convolutions."""

    _defaults = {}

    def _set_shape_arguments(self, op, in_channels, out_channels, groups, kernel_size, stride,
                             dilation):
        """Validate and store the channel counts, groups, kernel size, stride and dilation."""
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):
            if not _args._is_int(value):
                raise TypeError(f"{op}: {name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{op}: {name} must be >= 1, got {value}")
        if in_channels % groups:
            raise ValueError(f"{op}: in_channels={in_channels} must be divisible by "
                             f"groups={groups}")
        if out_channels % groups:
            raise ValueError(f"{op}: out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _args.check_at_least(_args.pair(kernel_size, "kernel_size", op), 1,
                                                "kernel_size", op)
        self.stride = _args.check_at_least(_args.pair(stride, "stride", op), 1, "stride", op)
        self.dilation = _args.check_at_least(_args.pair(dilation, "dilation", op), 1,
                                             "dilation", op)

    def _init_parameters(self, weight_shape, fan_in, out_channels, bias, dtype, rng):
        # He (Kaiming) uniform for ReLU networks: W ~ U(-sqrt(6 / fan_in), sqrt(6 / fan_in)),
        # which has variance 2 / fan_in; biases start at zero.
        bound = math.sqrt(6.0 / fan_in)
        generator = _generator(rng)
        self.W = generator.uniform(-bound, bound, size=weight_shape).astype(dtype)
        self.b = np.zeros(out_channels, dtype=dtype) if bias else None
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b) if bias else None

    @property
    def params(self):
        return {"W": self.W, "b": self.b} if self.b is not None else {"W": self.W}

    @property
    def grads(self):
        return {"W": self.dW, "b": self.db} if self.b is not None else {"W": self.dW}

    def _store_grads(self, grad_weight, grad_bias):
        # in place, so arrays handed out through ``grads`` stay current
        if self.dW.shape != grad_weight.shape or self.dW.dtype != grad_weight.dtype:
            self.dW = np.empty_like(grad_weight)
        self.dW[...] = grad_weight
        if grad_bias is not None:
            if self.db.shape != grad_bias.shape or self.db.dtype != grad_bias.dtype:
                self.db = np.empty_like(grad_bias)
            self.db[...] = grad_bias

    def extra_repr(self):
        parts = [f"{self.in_channels}, {self.out_channels}", f"kernel_size={self.kernel_size}"]
        for name, default in self._defaults.items():
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        if self.b is None:
            parts.append("bias=False")
        if self.W.dtype != np.float32:
            parts.append(f"dtype={self.W.dtype.name}")
        return ", ".join(parts)


class Conv2D(_ConvBase):
    """2-D convolution layer: ``y = conv2d(x, W, b, stride, padding, dilation, groups)``.

    Args:
        in_channels (C), out_channels (F): channel counts, both divisible by ``groups``.
        kernel_size, stride, dilation: int or (h, w), >= 1.
        padding: int or (h, w) >= 0, or "valid" / "same" (see ``functional.conv2d``).
        groups: number of blocked connections from input to output channels.
        bias: learn an additive bias ``b`` (F,).
        dtype: float32 (default) or float64, the dtype of W, b, dW, db.
        rng: ``numpy.random.Generator`` or seed for the weight initialisation.

    Shape:
        x: (N, C, H, W) -> y: (N, F, H_out, W_out),
        ``H_out = floor((H + 2 * pad_h - dilation_h * (KH - 1) - 1) / stride_h) + 1``.

    Attributes:
        W: (F, C // groups, KH, KW), He-uniform: U(-sqrt(6 / fan_in), sqrt(6 / fan_in)) with
            ``fan_in = C // groups * KH * KW``.
        b: (F,) zeros, or None when ``bias=False``.
        dW, db: gradients filled by ``backward``.

    Example:
        >>> layer = Conv2D(3, 8, 3, padding=1, rng=0)
        >>> y = layer.forward(np.zeros((2, 3, 16, 16), np.float32))
        >>> dx = layer.backward(np.ones_like(y))
    """

    _defaults = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, dtype=np.float32, rng=None):
        op = "Conv2D"
        self._set_shape_arguments(op, in_channels, out_channels, groups, kernel_size, stride,
                                  dilation)
        if isinstance(padding, str):
            # validated here so that a bad string fails at construction, not at first forward
            _args._conv_padding(padding, self.kernel_size, self.stride, self.dilation, op)
            self.padding = padding
        else:
            self.padding = _args.check_at_least(_args.pair(padding, "padding", op), 0,
                                                "padding", op)
        dtype = _float_dtype(dtype, op)
        fan_in = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_parameters((out_channels, in_channels // groups) + self.kernel_size, fan_in,
                              out_channels, bias, dtype, rng)

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, F, H_out, W_out). Saves x for ``backward``."""
        y = functional.conv2d(x, self.W, self.b, self.stride, self.padding, self.dilation,
                              self.groups)
        self._saved = x
        return y

    def backward(self, dout):
        """dout: (N, F, H_out, W_out) -> dx: (N, C, H, W); fills ``dW`` and ``db``."""
        x = self._require_forward()
        grad_x, grad_weight, grad_bias = functional.conv2d_backward(
            dout, x, self.W, self.stride, self.padding, self.dilation, self.groups,
            need_bias=self.b is not None)
        self._store_grads(grad_weight.astype(self.W.dtype, copy=False),
                          None if grad_bias is None else grad_bias.astype(self.b.dtype,
                                                                           copy=False))
        return grad_x


class ConvTranspose2D(_ConvBase):
    """2-D transposed convolution layer:
    ``y = conv_transpose2d(x, W, b, stride, padding, output_padding, groups, dilation)``.

    Args:
        in_channels (C_in), out_channels (C_out): channel counts, both divisible by ``groups``.
        kernel_size, stride, dilation: int or (h, w), >= 1.
        padding: int or (h, w) >= 0 (no strings, as in PyTorch).
        output_padding: int or (h, w) >= 0, extra rows/columns at the bottom/right; per axis
            smaller than the stride or the dilation. Ignored by ``forward(x, output_size)``.
        groups: number of blocked connections from input to output channels.
        bias: learn an additive bias ``b`` (C_out,).
        dtype: float32 (default) or float64, the dtype of W, b, dW, db.
        rng: ``numpy.random.Generator`` or seed for the weight initialisation.

    Shape:
        x: (N, C_in, H, W) -> y: (N, C_out, H_out, W_out),
        ``H_out = (H - 1) * stride_h - 2 * pad_h + dilation_h * (KH - 1) + output_padding_h + 1``.

    Attributes:
        W: (C_in, C_out // groups, KH, KW), He-uniform: U(-sqrt(6 / fan_in), sqrt(6 / fan_in))
            with PyTorch's fan_in for transposed convolution, ``W.shape[1] * KH * KW =
            C_out // groups * KH * KW``.
        b: (C_out,) zeros, or None when ``bias=False``.
        dW, db: gradients filled by ``backward``.

    Example:
        >>> layer = ConvTranspose2D(8, 3, 3, stride=2, padding=1, output_padding=1, rng=0)
        >>> y = layer.forward(np.zeros((2, 8, 16, 16), np.float32))      # (2, 3, 32, 32)
        >>> dx = layer.backward(np.ones_like(y))
    """

    _defaults = {"stride": (1, 1), "padding": (0, 0), "output_padding": (0, 0), "groups": 1,
                 "dilation": (1, 1)}

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, dtype=np.float32, rng=None):
        op = "ConvTranspose2D"
        self._set_shape_arguments(op, in_channels, out_channels, groups, kernel_size, stride,
                                  dilation)
        self.padding = _args._transposed_padding(padding, op)
        self.output_padding = _args.check_output_padding(output_padding, self.stride,
                                                         self.dilation, op)
        dtype = _float_dtype(dtype, op)
        fan_in = out_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._init_parameters((in_channels, out_channels // groups) + self.kernel_size, fan_in,
                              out_channels, bias, dtype, rng)

    def _output_padding(self, x, output_size):
        if output_size is None:
            return self.output_padding
        shape = np.shape(x)
        if len(shape) != 4:
            raise ValueError(f"ConvTranspose2D: x must be 4-D (N, C_in, H, W), got shape {shape}")
        return _args.output_padding_for_size(shape[2:], output_size, self.kernel_size,
                                             self.stride, self.padding, self.dilation,
                                             "ConvTranspose2D")

    def forward(self, x, output_size=None):
        """x: (N, C_in, H, W) -> y: (N, C_out, H_out, W_out). Saves x for ``backward``.

        output_size: optional (H_out, W_out) or (N, C, H_out, W_out) (N and C are ignored, so a
        skip connection's shape can be passed). It picks the output padding as PyTorch does,
        overriding the layer's ``output_padding`` for this call; per axis it must lie between
        the size with output padding 0 and that plus ``stride - 1`` (ValueError otherwise).
        """
        output_padding = self._output_padding(x, output_size)
        y = functional.conv_transpose2d(x, self.W, self.b, self.stride, self.padding,
                                        output_padding, self.groups, self.dilation)
        self._saved = (x, output_padding)
        return y

    def backward(self, dout):
        """dout: (N, C_out, H_out, W_out) -> dx: (N, C_in, H, W); fills ``dW`` and ``db``."""
        x, output_padding = self._require_forward()
        grad_x, grad_weight, grad_bias = functional.conv_transpose2d_backward(
            dout, x, self.W, self.stride, self.padding, output_padding, self.groups,
            self.dilation, need_bias=self.b is not None)
        self._store_grads(grad_weight.astype(self.W.dtype, copy=False),
                          None if grad_bias is None else grad_bias.astype(self.b.dtype,
                                                                           copy=False))
        return grad_x


# Pooling layers (no parameters) are defined beside their functional ops' module.
from ._pool_layers import AvgPool2D, GlobalAvgPool2D, MaxPool2D  # noqa: E402

__all__ = ["Conv2D", "ConvTranspose2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool2D"]
