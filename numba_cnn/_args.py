"""Argument normalisation, validation and output-shape formulas.

This is the only module that raises for bad user input. It is pure Python and NumPy (no Numba), so
every check runs before any kernel is compiled or called. Messages name the operation, the
argument, the value received and what was expected.
"""
import functools
import numbers
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


def _conv_arguments(x_shape, weight_shape, stride, dilation, groups, op, x_layout,
                    weight_layout):
    """Checks shared by convolution and transposed convolution: 4-D shapes, groups, stride and
    dilation. Returns (groups, stride, dilation) normalised."""
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must be 4-D {x_layout}, got shape {tuple(x_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(f"{op}: weight must be 4-D {weight_layout}, "
                         f"got shape {tuple(weight_shape)}")
    if not _is_int(groups):
        raise TypeError(f"{op}: groups must be an int, got {groups!r}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"{op}: groups must be >= 1, got {groups}")
    stride = check_at_least(pair(stride, "stride", op), 1, "stride", op)
    dilation = check_at_least(pair(dilation, "dilation", op), 1, "dilation", op)
    return groups, stride, dilation


def _plain(value):
    """Whether ``value`` is an int, a string or a tuple of ints, by exact type."""
    kind = type(value)
    return kind is int or kind is str or (kind is tuple
                                          and all(type(item) is int for item in value))


def _memoised(geometry):
    """``geometry(shapes, hyper-parameters..., op)``, cached for calls whose arguments are all
    plain ints, tuples of ints and strings: training repeats the same few calls, and validating
    one took ~6 us, a seventh of a small layer's whole call. Exact types, because ``1.0 == 1``
    and ``True == 1`` hash alike while only the int is valid; other arguments (lists, NumPy
    ints) are validated afresh each call, and so are bad ones (errors are not cached)."""
    cached = functools.lru_cache(maxsize=256)(geometry)

    @functools.wraps(geometry)
    def run(*arguments, **keywords):
        if not keywords and all(_plain(argument) for argument in arguments):
            return cached(*arguments)
        return geometry(*arguments, **keywords)

    return run


@_memoised
def conv2d_geometry(x_shape, weight_shape, stride, padding, dilation, groups, op="conv2d"):
    """Validate a conv2d call's shapes and hyper-parameters and return its ``ConvGeometry``.

    x_shape: (N, C, H, W); weight_shape: (F, C // groups, KH, KW).
    """
    groups, stride, dilation = _conv_arguments(x_shape, weight_shape, stride, dilation, groups,
                                               op, "(N, C, H, W)", "(F, C // groups, KH, KW)")
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


# ---------------------------------------------------------------------------------------------
# Transposed convolution (conv_transpose2d, ConvTranspose2D)
# ---------------------------------------------------------------------------------------------

class ConvTransposeGeometry(NamedTuple):
    """A 2-D transposed convolution's shapes, normalised and validated.

    x: (batch, in_channels, height, width) -> y: (batch, out_channels, out_height, out_width),
    weight: (in_channels, out_channels // groups, KH, KW), and per axis
    ``out = (in - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1``.

    ``conv`` is the ``ConvGeometry`` of the convolution this one is the transpose (adjoint) of:
    input y-shaped (batch, out_channels, out_height, out_width), weight ``weight`` read as
    conv2d filters (in_channels filters of out_channels // groups channels), output x-shaped.
    When ``output_padding >= stride`` (allowed when it is smaller than the dilation) that
    convolution's formula gives ``floor(output_padding / stride)`` more rows or columns than x
    has; ``conv`` is cut to x's size, which is exactly the adjoint of the transposed convolution.
    """
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple
    stride: tuple
    padding: tuple
    output_padding: tuple
    dilation: tuple
    groups: int
    out_height: int
    out_width: int
    conv: ConvGeometry

    @property
    def input_shape(self):
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def output_shape(self):
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def weight_shape(self):
        return (self.in_channels, self.out_channels // self.groups) + self.kernel


def transposed_out_size(size, kernel, stride, padding, dilation, output_padding):
    """PyTorch's transposed-convolution output size along one axis."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _transposed_padding(padding, op):
    if isinstance(padding, str):
        raise TypeError(f"{op}: padding must be an int or a pair of ints (h, w), got "
                        f"{padding!r} (string paddings such as 'same' or 'valid' are not "
                        "supported by transposed convolution, as in PyTorch)")
    return check_at_least(pair(padding, "padding", op), 0, "padding", op)


def check_output_padding(output_padding, stride, dilation, op):
    """Normalise ``output_padding`` to (h, w) and apply PyTorch's rule: per axis it must be
    >= 0 and smaller than the stride or the dilation (either)."""
    output_padding = check_at_least(pair(output_padding, "output_padding", op), 0,
                                    "output_padding", op)
    for axis, name in enumerate(("height", "width")):
        if not (output_padding[axis] < stride[axis] or output_padding[axis] < dilation[axis]):
            raise ValueError(
                f"{op}: output_padding must be smaller than either stride or dilation (per "
                f"axis), got output_padding={output_padding} with stride={stride} and "
                f"dilation={dilation} ({name}: {output_padding[axis]} is not smaller than "
                f"{stride[axis]} or {dilation[axis]})")
    return output_padding


@_memoised
def conv_transpose2d_geometry(x_shape, weight_shape, stride, padding, output_padding, dilation,
                              groups, op="conv_transpose2d"):
    """Validate a conv_transpose2d call's shapes and hyper-parameters; return its geometry.

    x_shape: (N, C_in, H, W); weight_shape: (C_in, C_out // groups, KH, KW).
    """
    groups, stride, dilation = _conv_arguments(x_shape, weight_shape, stride, dilation, groups,
                                               op, "(N, C_in, H, W)",
                                               "(C_in, C_out // groups, KH, KW)")
    padding = _transposed_padding(padding, op)
    output_padding = check_output_padding(output_padding, stride, dilation, op)
    batch, channels, height, width = (int(s) for s in x_shape)
    in_channels, out_per_group, kernel_h, kernel_w = (int(s) for s in weight_shape)
    if in_channels < 1 or out_per_group < 1 or min(kernel_h, kernel_w) < 1:
        raise ValueError(f"{op}: weight must have non-empty channel and kernel dimensions, "
                         f"got shape {tuple(weight_shape)}")
    if in_channels % groups:
        raise ValueError(f"{op}: groups={groups} must divide the input channels "
                         f"(weight.shape[0]), got {in_channels}")
    if channels != in_channels:
        raise ValueError(f"{op}: x has {channels} channels but weight expects {in_channels} "
                         f"(weight.shape[0]; weight is (C_in, C_out // groups, KH, KW))")
    if min(height, width) < 1:
        raise ValueError(f"{op}: x must have a non-empty image, got shape {tuple(x_shape)}")
    kernel = (kernel_h, kernel_w)
    out_height = transposed_out_size(height, kernel_h, stride[0], padding[0], dilation[0],
                                     output_padding[0])
    out_width = transposed_out_size(width, kernel_w, stride[1], padding[1], dilation[1],
                                    output_padding[1])
    if min(out_height, out_width) < 1:
        raise ValueError(
            f"{op}: the output would be {out_height}x{out_width}, it must be at least 1x1: "
            f"(H - 1) * stride - 2 * padding + dilation * (KH - 1) + output_padding + 1 with "
            f"input {height}x{width}, kernel {kernel}, stride {stride}, padding {padding}, "
            f"dilation {dilation}, output_padding {output_padding}; reduce padding")
    out_channels = out_per_group * groups
    check_size((batch, out_channels, out_height, out_width), "the output", op)
    conv = conv2d_geometry((batch, out_channels, out_height, out_width), weight_shape, stride,
                           padding, dilation, groups, op)
    # floor((H_out + 2p - d(K-1) - 1) / s) + 1 = H + floor(output_padding / s) >= H
    assert conv.out_height >= height and conv.out_width >= width, (conv, x_shape)
    conv = conv._replace(out_height=height, out_width=width)
    return ConvTransposeGeometry(batch, in_channels, height, width, out_channels, kernel, stride,
                                 padding, output_padding, dilation, groups, out_height,
                                 out_width, conv)


def output_padding_for_size(input_hw, output_size, kernel, stride, padding, dilation, op):
    """The output_padding that makes a transposed convolution produce ``output_size``.

    As PyTorch's ``ConvTranspose2d(output_size=...)``: ``output_size`` is (H, W) or
    (N, C, H, W) (N and C ignored); per axis the valid sizes run from the size with
    output_padding 0 to that plus ``stride - 1``. Anything else raises ValueError with the range.
    """
    if isinstance(output_size, (str, bytes)) or not hasattr(output_size, "__len__"):
        raise TypeError(f"{op}: output_size must be a sequence of 2 (H, W) or 4 (N, C, H, W) "
                        f"ints, got {output_size!r}")
    sizes = tuple(output_size)
    if len(sizes) == 4:
        sizes = sizes[2:]
    if len(sizes) != 2:
        raise ValueError(f"{op}: output_size must have 2 (H, W) or 4 (N, C, H, W) elements, "
                         f"got {tuple(output_size)!r}")
    if not all(_is_int(s) for s in sizes):
        raise TypeError(f"{op}: output_size must contain ints, got {tuple(output_size)!r}")
    sizes = tuple(int(s) for s in sizes)
    min_sizes = tuple(transposed_out_size(input_hw[axis], kernel[axis], stride[axis],
                                          padding[axis], dilation[axis], 0) for axis in (0, 1))
    max_sizes = tuple(min_sizes[axis] + stride[axis] - 1 for axis in (0, 1))
    if any(not min_sizes[axis] <= sizes[axis] <= max_sizes[axis] for axis in (0, 1)):
        raise ValueError(f"{op}: requested an output size of {sizes}, but valid sizes range "
                         f"from {min_sizes} to {max_sizes} (for an input of "
                         f"{tuple(input_hw)})")
    return (sizes[0] - min_sizes[0], sizes[1] - min_sizes[1])
