"""Plain NumPy reference implementations (test oracles), computed in float64.

These functions are deliberately simple and slow-but-obviously-correct: no Numba, no clever
memory layout, just explicit loops over groups and kernel taps with the batch, channel and pixel
dimensions vectorised by NumPy. They exist so that the test suite (and anyone debugging a kernel)
has an independent answer to compare the optimised ``numba_cnn.functional`` operations against.
They are themselves validated against PyTorch and finite differences in ``tests/test_reference.py``.

Every function casts its array inputs to float64 and returns float64 arrays, whatever the input
dtype. Argument semantics (int-or-pair hyper-parameters, ``padding="same"``/``"valid"``, groups)
are those of the public API (see ``numba_cnn.functional``); geometry is normalised and validated by
``numba_cnn._args`` so that both sides agree on what a call means.

Not part of the public API; not tuned for speed. Use small shapes.
"""
import numpy as np

from numba_cnn import _args

__all__ = ["conv2d", "conv2d_backward", "conv_transpose2d", "conv_transpose2d_backward"]


# ---------------------------------------------------------------------------------------------
# Convolution (conv2d)
# ---------------------------------------------------------------------------------------------

def _conv2d_setup(x, weight, stride, padding, dilation, groups, op):
    """Cast to float64, validate and return (x, weight, geometry)."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    geo = _args.conv2d_geometry(x.shape, weight.shape, stride, padding, dilation, groups, op=op)
    return x, weight, geo


def _pad_nchw(x, pad):
    """Zero-pad the two spatial dimensions of an NCHW array; pad = (top, bottom, left, right)."""
    top, bottom, left, right = pad
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def _tap_slices(geo, kh, kw):
    """Slices into the *padded* input selecting, for kernel tap (kh, kw), the input pixel that
    meets that tap for every output pixel: rows kh*dil_h + oh*stride_h, oh in range(out_height)
    (same for columns)."""
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    row0, col0 = kh * dh, kw * dw
    rows = slice(row0, row0 + sh * (geo.out_height - 1) + 1, sh)
    cols = slice(col0, col0 + sw * (geo.out_width - 1) + 1, sw)
    return rows, cols


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Reference 2-D cross-correlation (PyTorch ``conv2d`` semantics), float64.

    x: (N, C, H, W); weight: (F, C // groups, KH, KW); bias: (F,) or None.
    Returns y: (N, F, H_out, W_out) float64 with

        y[n, f, oh, ow] = bias[f] + sum_{c in group(f), kh, kw}
                          weight[f, c - c0(f), kh, kw] * xpad[n, c, oh*sh + kh*dh, ow*sw + kw*dw]
    """
    x, weight, geo = _conv2d_setup(x, weight, stride, padding, dilation, groups, "conv2d")
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (geo.out_channels,):
            raise ValueError(f"conv2d: bias must have shape ({geo.out_channels},), "
                             f"got shape {bias.shape}")
    xp = _pad_nchw(x, geo.pad)
    cg = geo.in_channels // geo.groups        # input channels per group
    fg = geo.out_channels // geo.groups       # output channels per group
    y = np.zeros(geo.output_shape, dtype=np.float64)
    for g in range(geo.groups):
        cs = slice(g * cg, (g + 1) * cg)
        fs = slice(g * fg, (g + 1) * fg)
        for kh in range(geo.kernel[0]):
            for kw in range(geo.kernel[1]):
                rows, cols = _tap_slices(geo, kh, kw)
                patch = xp[:, cs, rows, cols]                 # (N, cg, OH, OW)
                y[:, fs] += np.einsum("nchw,fc->nfhw", patch, weight[fs, :, kh, kw])
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, dilation=1, groups=1,
                    need_bias=True):
    """Reference gradients of :func:`conv2d`, float64.

    grad_out: (N, F, H_out, W_out), the gradient of a scalar loss with respect to y.
    Returns (grad_x, grad_weight, grad_bias) with the shapes of x, weight and (F,);
    grad_bias is None when ``need_bias`` is false. Every tap that reads xpad in the forward
    pass scatters back into grad_xpad here; the padding border is then cropped away.
    """
    x, weight, geo = _conv2d_setup(x, weight, stride, padding, dilation, groups,
                                   "conv2d_backward")
    grad_out = np.asarray(grad_out, dtype=np.float64)
    if grad_out.shape != geo.output_shape:
        raise ValueError(f"conv2d_backward: grad_out has shape {grad_out.shape}, "
                         f"expected {geo.output_shape}")
    xp = _pad_nchw(x, geo.pad)
    grad_xp = np.zeros_like(xp)
    grad_weight = np.zeros(weight.shape, dtype=np.float64)
    cg = geo.in_channels // geo.groups
    fg = geo.out_channels // geo.groups
    for g in range(geo.groups):
        cs = slice(g * cg, (g + 1) * cg)
        fs = slice(g * fg, (g + 1) * fg)
        go = grad_out[:, fs]                                  # (N, fg, OH, OW)
        for kh in range(geo.kernel[0]):
            for kw in range(geo.kernel[1]):
                rows, cols = _tap_slices(geo, kh, kw)
                patch = xp[:, cs, rows, cols]                 # (N, cg, OH, OW)
                grad_weight[fs, :, kh, kw] = np.einsum("nfhw,nchw->fc", go, patch)
                grad_xp[:, cs, rows, cols] += np.einsum("nfhw,fc->nchw", go,
                                                        weight[fs, :, kh, kw])
    top, _, left, _ = geo.pad
    grad_x = np.ascontiguousarray(grad_xp[:, :, top:top + geo.height, left:left + geo.width])
    grad_bias = grad_out.sum(axis=(0, 2, 3)) if need_bias else None
    return grad_x, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# Transposed convolution (conv_transpose2d), written as a direct scatter, independently of the
# conv2d reference above
# ---------------------------------------------------------------------------------------------

def _conv_transpose2d_setup(x, weight, stride, padding, output_padding, dilation, groups, op):
    """Cast to float64, validate and return (x, weight, geometry)."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    geo = _args.conv_transpose2d_geometry(x.shape, weight.shape, stride, padding,
                                          output_padding, dilation, groups, op=op)
    return x, weight, geo


def _scatter_slices(geo, kh, kw):
    """Slices into the full output hit by kernel tap (kh, kw): input row ih goes to full row
    ih*stride_h + kh*dil_h, ih in range(H) (same for columns)."""
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    row0, col0 = kh * dh, kw * dw
    rows = slice(row0, row0 + sh * (geo.height - 1) + 1, sh)
    cols = slice(col0, col0 + sw * (geo.width - 1) + 1, sw)
    return rows, cols


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """Reference 2-D transposed convolution (PyTorch ``conv_transpose2d`` semantics), float64.

    x: (N, C_in, H, W); weight: (C_in, C_out // groups, KH, KW); bias: (C_out,) or None.
    Every input pixel scatters into a full output of (H - 1) * sh + dh * (KH - 1) + 1 +
    output_padding_h rows (likewise columns):

        full[n, f0(c) + f, ih*sh + kh*dh, iw*sw + kw*dw] += x[n, c, ih, iw] * weight[c, f, kh, kw]

    and y is ``full`` with ``padding`` rows/columns cropped from each side, plus the bias.
    """
    x, weight, geo = _conv_transpose2d_setup(x, weight, stride, padding, output_padding,
                                             dilation, groups, "conv_transpose2d")
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (geo.out_channels,):
            raise ValueError(f"conv_transpose2d: bias must have shape ({geo.out_channels},), "
                             f"got shape {bias.shape}")
    full_h = geo.out_height + 2 * geo.padding[0]
    full_w = geo.out_width + 2 * geo.padding[1]
    full = np.zeros((geo.batch, geo.out_channels, full_h, full_w), dtype=np.float64)
    cg = geo.in_channels // geo.groups        # input channels per group
    fg = geo.out_channels // geo.groups       # output channels per group
    for g in range(geo.groups):
        cs = slice(g * cg, (g + 1) * cg)
        fs = slice(g * fg, (g + 1) * fg)
        for kh in range(geo.kernel[0]):
            for kw in range(geo.kernel[1]):
                rows, cols = _scatter_slices(geo, kh, kw)
                full[:, fs, rows, cols] += np.einsum("nchw,cf->nfhw", x[:, cs],
                                                     weight[cs, :, kh, kw])
    ph, pw = geo.padding
    y = np.ascontiguousarray(full[:, :, ph:ph + geo.out_height, pw:pw + geo.out_width])
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def conv_transpose2d_backward(grad_out, x, weight, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1, need_bias=True):
    """Reference gradients of :func:`conv_transpose2d`, float64.

    grad_out: (N, C_out, H_out, W_out). Returns (grad_x, grad_weight, grad_bias) with the shapes
    of x, weight and (C_out,); grad_bias is None when ``need_bias`` is false. grad_out is placed
    back into the full (uncropped) output, zero on the cropped border; each scatter of the
    forward pass then becomes a gather.
    """
    x, weight, geo = _conv_transpose2d_setup(x, weight, stride, padding, output_padding,
                                             dilation, groups, "conv_transpose2d_backward")
    grad_out = np.asarray(grad_out, dtype=np.float64)
    if grad_out.shape != geo.output_shape:
        raise ValueError(f"conv_transpose2d_backward: grad_out has shape {grad_out.shape}, "
                         f"expected {geo.output_shape}")
    ph, pw = geo.padding
    grad_full = np.zeros((geo.batch, geo.out_channels, geo.out_height + 2 * ph,
                          geo.out_width + 2 * pw), dtype=np.float64)
    grad_full[:, :, ph:ph + geo.out_height, pw:pw + geo.out_width] = grad_out
    grad_x = np.zeros(x.shape, dtype=np.float64)
    grad_weight = np.zeros(weight.shape, dtype=np.float64)
    cg = geo.in_channels // geo.groups
    fg = geo.out_channels // geo.groups
    for g in range(geo.groups):
        cs = slice(g * cg, (g + 1) * cg)
        fs = slice(g * fg, (g + 1) * fg)
        for kh in range(geo.kernel[0]):
            for kw in range(geo.kernel[1]):
                rows, cols = _scatter_slices(geo, kh, kw)
                patch = grad_full[:, fs, rows, cols]           # (N, fg, H, W)
                grad_x[:, cs] += np.einsum("nfhw,cf->nchw", patch, weight[cs, :, kh, kw])
                grad_weight[cs, :, kh, kw] = np.einsum("nchw,nfhw->cf", x[:, cs], patch)
    grad_bias = grad_out.sum(axis=(0, 2, 3)) if need_bias else None
    return grad_x, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------
# Pooling references (max, average, global average) live in their own module; re-exported here
# so that ``numba_cnn.reference`` is the one place the tests and benchmarks take references from.
from ._reference_pool import (avg_pool2d, avg_pool2d_backward, global_avg_pool2d,  # noqa: E402
                              global_avg_pool2d_backward, max_pool2d, max_pool2d_backward)
