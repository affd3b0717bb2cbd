"""Argument normalisation, validation and output-shape formulas.

This is the only module that raises for bad user input. It is pure Python and NumPy (no Numba), so
every check runs before any kernel is compiled or called. Messages name the operation, the
argument, the value received and what was expected.
"""
import numbers
import operator
from typing import NamedTuple

import numpy as np

# Refuse outputs (or work buffers) above this many elements before allocating anything: a typo in
# a shape should raise a clear MemoryError, not take the machine down.
MAX_ELEMENTS = 2 ** 34


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def pair(value, name, op):
    """Normalise an int or a pair of ints to a tuple ``(h, w)`` of Python ints."""
    if _is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2 and all(
        _is_int(v) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{op}: {name} must be an int or a pair of ints (h, w), got {value!r}")


def check_at_least(values, minimum, name, op):
    """Raise ValueError unless both entries of ``values`` are >= ``minimum``."""
    if min(values) < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {values}")
    return values


def as_float_array(value, name, op):
    """Convert ``value`` to an ndarray of a float dtype, following the API's dtype rules.

    float32 and float64 stay as they are; integer and bool become float64; float16 stays float16
    (``result_dtype`` decides the compute dtype later). Complex, object, string and other
    non-numeric inputs raise TypeError.
    """
    try:
        array = np.asarray(value)
    except Exception as error:  # ragged lists and the like
        raise TypeError(f"{op}: {name} cannot be converted to a numeric array ({error})") from None
    kind = array.dtype.kind
    if kind == "f":
        if array.dtype.itemsize > 8:
            raise TypeError(f"{op}: {name} has dtype {array.dtype}; expected float16, float32 "
                            "or float64 (extended precision is not supported)")
        return array
    if kind in "iub":
        return array.astype(np.float64)
    raise TypeError(f"{op}: {name} has dtype {array.dtype}; expected a real numeric array "
                    "(float, int or bool)")


def result_dtype(*arrays):
    """The dtype an operation computes in: NumPy promotion of the inputs, float16 raised to
    float32."""
    dtype = np.result_type(*[a.dtype for a in arrays if a is not None])
    if dtype == np.float16:
        return np.dtype(np.float32)
    return dtype


def check_ndim(array, ndim, name, op, layout):
    if array.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {array.shape}")


def check_size(shape, what, op):
    """Raise MemoryError before allocating an array of ``shape`` that cannot reasonably fit."""
    count = 1
    for extent in shape:
        count *= int(extent)
    if count > MAX_ELEMENTS:
        raise MemoryError(f"{op}: {what} would have shape {tuple(shape)} ({count:,} elements), "
                          f"more than the {MAX_ELEMENTS:,} this library allocates")


def check_shape(array, expected, name, op):
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {tuple(array.shape)}, expected {tuple(expected)}")


def conv_out_size(size, kernel, stride, pad_total, dilation):
    """PyTorch's output size: floor((size + pad_total - dilation*(kernel-1) - 1) / stride) + 1."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


class ConvGeometry(NamedTuple):
    """Everything about a 2-D convolution's shapes, normalised and validated.

    ``pad`` is ``(top, bottom, left, right)``: symmetric except for ``padding="same"`` with an
    even kernel extent, where the extra row/column goes to the bottom/right as in PyTorch.
    """
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple
    stride: tuple
    dilation: tuple
    pad: tuple
    groups: int
    out_height: int
    out_width: int

    @property
    def padded_height(self):
        return self.height + self.pad[0] + self.pad[1]

    @property
    def padded_width(self):
        return self.width + self.pad[2] + self.pad[3]

    @property
    def output_shape(self):
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def input_shape(self):
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups) + self.kernel


def _conv_padding(padding, kernel, stride, dilation, op):
    """Normalise ``padding`` (int, pair, "same", "valid") to (top, bottom, left, right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' requires stride 1, got stride={stride}")
            total_h = dilation[0] * (kernel[0] - 1)
            total_w = dilation[1] * (kernel[1] - 1)
            return (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
        raise ValueError(f"{op}: invalid padding string {padding!r}, should be one of "
                         "'same', 'valid', an int or a pair of ints")
    pad_h, pad_w = check_at_least(pair(padding, "padding", op), 0, "padding", op)
    return (pad_h, pad_h, pad_w, pad_w)


def conv2d_geometry(x_shape, weight_shape, stride, padding, dilation, groups, op="conv2d"):
    """Validate a conv2d call's shapes and hyper-parameters and return its ``ConvGeometry``.

    x_shape: (N, C, H, W); weight_shape: (F, C // groups, KH, KW).
    """
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(f"{op}: weight must be 4-D (F, C // groups, KH, KW), "
                         f"got shape {tuple(weight_shape)}")
    if not _is_int(groups):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"{op}: groups must be >= 1, got {groups}")
    stride = check_at_least(pair(stride, "stride", op), 1, "stride", op)
    dilation = check_at_least(pair(dilation, "dilation", op), 1, "dilation", op)
    batch, channels, height, width = (int(s) for s in x_shape)
    out_channels, channels_per_group, kernel_h, kernel_w = (int(s) for s in weight_shape)
    if min(kernel_h, kernel_w) < 1 or channels_per_group < 1:
        raise ValueError(f"{op}: weight must have non-empty channel and kernel dimensions, "
                         f"got shape {tuple(weight_shape)}")
    if out_channels < 1:
        raise ValueError(f"{op}: weight must have at least one output channel, "
                         f"got shape {tuple(weight_shape)}")
    if channels % groups:
        raise ValueError(f"{op}: groups={groups} must divide the input channels, "
                         f"got {channels} channels")
    if out_channels % groups:
        raise ValueError(f"{op}: groups={groups} must divide the output channels "
                         f"(weight.shape[0]), got {out_channels}")
    if channels != channels_per_group * groups:
        raise ValueError(f"{op}: x has {channels} channels but weight expects "
                         f"{channels_per_group * groups} (weight.shape[1] * groups = "
                         f"{channels_per_group} * {groups})")
    if min(height, width) < 1:
        raise ValueError(f"{op}: x must have a non-empty image, got shape {tuple(x_shape)}")
    kernel = (kernel_h, kernel_w)
    pad = _conv_padding(padding, kernel, stride, dilation, op)
    padded = (height + pad[0] + pad[1], width + pad[2] + pad[3])
    extent = (dilation[0] * (kernel_h - 1) + 1, dilation[1] * (kernel_w - 1) + 1)
    if extent[0] > padded[0] or extent[1] > padded[1]:
        raise ValueError(
            f"{op}: the dilated kernel ({extent[0]}x{extent[1]}) is larger than the padded input "
            f"({padded[0]}x{padded[1]}). Given input size: {(channels, height, width)}, "
            f"kernel {kernel}, dilation {dilation}, padding {pad}. Output size is too small")
    out_height = conv_out_size(height, kernel_h, stride[0], pad[0] + pad[1], dilation[0])
    out_width = conv_out_size(width, kernel_w, stride[1], pad[2] + pad[3], dilation[1])
    geometry = ConvGeometry(batch, channels, height, width, out_channels, kernel, stride,
                            dilation, pad, groups, out_height, out_width)
    check_size(geometry.output_shape, "the output", op)
    return geometry


def check_bias(bias, out_channels, op):
    """Convert and validate an optional bias of shape (F,)."""
    if bias is None:
        return None
    bias = as_float_array(bias, "bias", op)
    if bias.shape != (out_channels,):
        raise ValueError(f"{op}: bias must have shape ({out_channels},) (one value per output "
                         f"channel), got shape {bias.shape}")
    return bias
