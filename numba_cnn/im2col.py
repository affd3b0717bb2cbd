"""im2col NumPy convolution, written from the published behaviour of the "Deep Learning from
Scratch" layers (``common/util.py`` im2col/col2im, ``common/layers.py`` Convolution).

This is the baseline users replace with numba_cnn: the benchmarks time it beside our kernels. It
is deliberately the plain NumPy algorithm (an im2col matrix and one matmul), float64 or float32
as given, with stride, symmetric padding and dilation.
"""
import numpy as np


def _out_size(size, kernel, stride, pad, dilation):
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def im2col(x, kernel_h, kernel_w, stride=1, pad=0, dilation=1):
    """(N, C, H, W) -> (N * OH * OW, C * KH * KW) matrix of receptive fields."""
    batch, channels, height, width = x.shape
    out_h = _out_size(height, kernel_h, stride, pad, dilation)
    out_w = _out_size(width, kernel_w, stride, pad, dilation)
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad), (pad, pad)])
    col = np.empty((batch, channels, kernel_h, kernel_w, out_h, out_w), dtype=x.dtype)
    for kh in range(kernel_h):
        for kw in range(kernel_w):
            top, left = kh * dilation, kw * dilation
            col[:, :, kh, kw] = padded[:, :, top:top + stride * out_h:stride,
                                       left:left + stride * out_w:stride]
    return col.transpose(0, 4, 5, 1, 2, 3).reshape(batch * out_h * out_w, -1)


def col2im(col, input_shape, kernel_h, kernel_w, stride=1, pad=0, dilation=1):
    """Inverse of ``im2col``: sums overlapping receptive fields back into (N, C, H, W)."""
    batch, channels, height, width = input_shape
    out_h = _out_size(height, kernel_h, stride, pad, dilation)
    out_w = _out_size(width, kernel_w, stride, pad, dilation)
    col = col.reshape(batch, out_h, out_w, channels, kernel_h, kernel_w).transpose(
        0, 3, 4, 5, 1, 2)
    padded = np.zeros((batch, channels, height + 2 * pad + stride - 1,
                       width + 2 * pad + stride - 1), dtype=col.dtype)
    for kh in range(kernel_h):
        for kw in range(kernel_w):
            top, left = kh * dilation, kw * dilation
            padded[:, :, top:top + stride * out_h:stride, left:left + stride * out_w:stride] += \
                col[:, :, kh, kw]
    return padded[:, :, pad:height + pad, pad:width + pad]


def conv2d(x, weight, bias, stride=1, pad=0, dilation=1):
    """Forward: returns (y, col) where col is kept for the backward pass."""
    filters, _, kernel_h, kernel_w = weight.shape
    batch, _, height, width = x.shape
    out_h = _out_size(height, kernel_h, stride, pad, dilation)
    out_w = _out_size(width, kernel_w, stride, pad, dilation)
    col = im2col(x, kernel_h, kernel_w, stride, pad, dilation)
    y = col @ weight.reshape(filters, -1).T + bias
    return y.reshape(batch, out_h, out_w, -1).transpose(0, 3, 1, 2), col


def conv2d_backward(dout, x_shape, col, weight, stride=1, pad=0, dilation=1):
    """Backward from ``conv2d``'s col: returns (dx, dW, db)."""
    filters, _, kernel_h, kernel_w = weight.shape
    dout = dout.transpose(0, 2, 3, 1).reshape(-1, filters)
    db = dout.sum(axis=0)
    dweight = (col.T @ dout).T.reshape(weight.shape)
    dcol = dout @ weight.reshape(filters, -1)
    dx = col2im(dcol, x_shape, kernel_h, kernel_w, stride, pad, dilation)
    return dx, dweight, db


def pool2d(x, pool_h, pool_w, stride, pad=0, mode="max"):
    """The book's Pooling forward (im2col, then max or mean over each window's row).

    Returns (y, state) where state is what ``pool2d_backward`` needs. Padding pads with zeros,
    as the book's im2col does.
    """
    batch, channels, height, width = x.shape
    out_h = (height + 2 * pad - pool_h) // stride + 1
    out_w = (width + 2 * pad - pool_w) // stride + 1
    col = im2col(x, pool_h, pool_w, stride, pad).reshape(-1, pool_h * pool_w)
    if mode == "max":
        arg = np.argmax(col, axis=1)
        y = np.max(col, axis=1)
    else:
        arg = None
        y = np.mean(col, axis=1)
    y = y.reshape(batch, out_h, out_w, channels).transpose(0, 3, 1, 2)
    return y, (x.shape, arg)


def pool2d_backward(dout, state, pool_h, pool_w, stride, pad=0):
    """The book's Pooling backward: scatter each window's gradient, then col2im."""
    x_shape, arg = state
    size = pool_h * pool_w
    dout = dout.transpose(0, 2, 3, 1)
    if arg is not None:
        dcol = np.zeros((dout.size, size), dtype=dout.dtype)
        dcol[np.arange(arg.size), arg.ravel()] = dout.ravel()
    else:
        dcol = np.repeat(dout.reshape(-1, 1) / size, size, axis=1)
    dcol = dcol.reshape(dout.shape[:3] + (-1,))
    return col2im(dcol.reshape(dcol.shape[0] * dcol.shape[1] * dcol.shape[2], -1), x_shape,
                  pool_h, pool_w, stride, pad)


def conv_transpose2d(x, weight, bias, stride=1, pad=0, output_padding=0):
    """Transposed convolution as the im2col layers would compute it: one matmul, then col2im.

    x : (N, C_in, H, W); weight : (C_in, C_out, KH, KW). Returns (y, x_matrix) for the backward.
    """
    batch, in_channels, height, width = x.shape
    _, out_channels, kernel_h, kernel_w = weight.shape
    out_h = (height - 1) * stride - 2 * pad + kernel_h + output_padding
    out_w = (width - 1) * stride - 2 * pad + kernel_w + output_padding
    x_matrix = x.transpose(0, 2, 3, 1).reshape(-1, in_channels)
    dcol = x_matrix @ weight.reshape(in_channels, -1)
    y = col2im(dcol, (batch, out_channels, out_h, out_w), kernel_h, kernel_w, stride, pad)
    return y + bias[None, :, None, None], x_matrix


def conv_transpose2d_backward(dout, x_shape, x_matrix, weight, stride=1, pad=0):
    """Backward of ``conv_transpose2d``: returns (dx, dW, db)."""
    batch, in_channels, height, width = x_shape
    _, _, kernel_h, kernel_w = weight.shape
    col = im2col(dout, kernel_h, kernel_w, stride, pad)
    dx = (col @ weight.reshape(in_channels, -1).T).reshape(batch, height, width, in_channels)
    dweight = (x_matrix.T @ col).reshape(weight.shape)
    return dx.transpose(0, 3, 1, 2), dweight, dout.sum(axis=(0, 2, 3))
