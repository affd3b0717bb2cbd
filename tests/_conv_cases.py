"""Shared conv2d case grid and comparison helpers for the test suite.

Imported by test modules (``tests/conftest.py`` puts this directory on ``sys.path``).
"""
import warnings
from typing import NamedTuple

import numpy as np


class ConvCase(NamedTuple):
    N: int
    C: int
    H: int
    W: int
    F: int
    KH: int
    KW: int
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True

    @property
    def x_shape(self):
        return (self.N, self.C, self.H, self.W)

    @property
    def w_shape(self):
        return (self.F, self.C // self.groups, self.KH, self.KW)

    @property
    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)


# (id, case). Curated to cover each feature at least once without a combinatorial grid.
_CASES = [
    ("basic", ConvCase(2, 3, 6, 6, 4, 3, 3)),
    ("k1x1", ConvCase(2, 5, 4, 5, 7, 1, 1)),
    ("stride2", ConvCase(2, 3, 8, 7, 4, 3, 3, stride=2)),
    ("stride3_pad1", ConvCase(1, 2, 9, 10, 3, 3, 3, stride=3, padding=1)),
    ("stride_pair_2_1", ConvCase(2, 3, 7, 6, 2, 3, 2, stride=(2, 1))),
    ("stride_pair_1_3", ConvCase(1, 2, 6, 9, 3, 2, 3, stride=(1, 3), padding=(1, 0))),
    ("k1_stride3", ConvCase(2, 3, 8, 7, 5, 1, 1, stride=3)),
    ("k2_stride3", ConvCase(2, 2, 9, 8, 3, 2, 2, stride=3)),
    ("k2_stride3_pad1", ConvCase(1, 3, 7, 7, 2, 2, 2, stride=3, padding=1)),
    ("pad_int2", ConvCase(2, 2, 5, 5, 3, 3, 3, padding=2)),
    ("pad_pair", ConvCase(2, 3, 6, 5, 4, 3, 3, padding=(2, 1))),
    ("pad_pair_0_2", ConvCase(1, 2, 5, 6, 2, 3, 3, padding=(0, 2), stride=(2, 2))),
    ("pad_valid", ConvCase(2, 3, 7, 6, 2, 3, 3, padding="valid")),
    ("same_k3", ConvCase(2, 3, 6, 7, 4, 3, 3, padding="same")),
    ("same_even_k4", ConvCase(2, 2, 7, 6, 3, 4, 4, padding="same")),
    ("same_even_k2x3", ConvCase(1, 3, 5, 6, 2, 2, 3, padding="same")),
    ("same_dil2", ConvCase(2, 2, 8, 7, 3, 3, 3, padding="same", dilation=2)),
    ("same_even_k2_dil3", ConvCase(1, 2, 7, 8, 3, 2, 2, padding="same", dilation=(3, 1))),
    ("dil2", ConvCase(2, 3, 9, 9, 4, 3, 3, dilation=2)),
    ("dil_1_3_pad", ConvCase(2, 2, 6, 10, 3, 3, 3, dilation=(1, 3), padding=(1, 2))),
    ("dil2_stride2", ConvCase(1, 3, 11, 10, 2, 3, 2, dilation=2, stride=2, padding=1)),
    ("groups2", ConvCase(2, 4, 6, 6, 6, 3, 3, groups=2, padding=1)),
    ("groups3_stride2", ConvCase(1, 6, 7, 8, 9, 3, 2, groups=3, stride=2)),
    ("depthwise", ConvCase(2, 5, 6, 7, 5, 3, 3, groups=5, padding=1)),
    ("depthwise_mult2", ConvCase(2, 4, 7, 6, 8, 3, 3, groups=4, padding="same")),
    ("depthwise_mult2_dil", ConvCase(1, 3, 9, 9, 6, 3, 3, groups=3, dilation=2, stride=2)),
    ("nobias", ConvCase(2, 3, 6, 6, 4, 3, 3, bias=False)),
    ("nobias_groups", ConvCase(1, 4, 5, 6, 4, 2, 3, groups=2, bias=False, padding=(1, 1))),
    ("batch1", ConvCase(1, 3, 5, 5, 2, 3, 3, padding=1)),
    ("odd_7x5_k3x2", ConvCase(2, 3, 7, 5, 4, 3, 2)),
    ("k5x1_rect", ConvCase(2, 2, 9, 4, 3, 5, 1, padding=(2, 0))),
    ("c1_multi_f", ConvCase(3, 1, 8, 6, 5, 3, 3, padding=1)),
    ("c1_f1", ConvCase(2, 1, 5, 7, 1, 2, 3)),
    ("kernel_eq_input", ConvCase(2, 3, 5, 4, 3, 5, 4)),
    ("kernel_eq_padded", ConvCase(2, 2, 3, 4, 3, 5, 6, padding=1)),
    ("dil_kernel_eq_padded", ConvCase(1, 2, 5, 5, 2, 3, 3, dilation=3, padding=1, bias=True)),
    ("c_f_odd_7_11", ConvCase(2, 7, 6, 6, 11, 3, 3, padding=1)),
    ("c20_f36", ConvCase(2, 20, 8, 7, 36, 3, 3, padding=1)),
    ("c20_f36_g4_s2", ConvCase(1, 20, 9, 9, 36, 3, 3, groups=4, stride=2, padding="valid")),
    ("h1_w_wide", ConvCase(2, 3, 1, 9, 2, 1, 3, padding=(0, 1))),
    # found by fuzzing the channel-blocked input gradient: a column stride along a width of 1
    # (its one phase is all of grad_x), and reads that all lie in the left margin
    ("w1_stride3", ConvCase(3, 32, 7, 1, 32, 1, 3, stride=(1, 3), padding=2)),
    ("w1_reads_in_margin", ConvCase(2, 32, 4, 1, 16, 1, 3, stride=(1, 2), padding=(0, 3),
                                    dilation=(1, 2))),
    # x's only pixel lies in a stride phase without taps: its gradient is zero
    ("x1_in_tapless_phase", ConvCase(2, 3, 1, 1, 4, 1, 1, stride=2, padding=1)),
]

CASES = [case for _, case in _CASES]
CASE_IDS = [name for name, _ in _CASES]


def make_inputs(case, rng, dtype=np.float64):
    """Random normal x, weight, bias (or None) and grad_out for ``case`` (never all zeros/ones).

    grad_out's shape comes from the PyTorch output-size formula, computed here independently of
    the library.
    """
    x = rng.standard_normal(case.x_shape).astype(dtype)
    w = rng.standard_normal(case.w_shape).astype(dtype)
    b = rng.standard_normal(case.F).astype(dtype) if case.bias else None
    oh, ow = expected_out_hw(case)
    grad_out = rng.standard_normal((case.N, case.F, oh, ow)).astype(dtype)
    return x, w, b, grad_out


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def expected_out_hw(case):
    """Output (H, W) from PyTorch's documented formula; "same" gives the input size."""
    if case.padding == "same":
        return case.H, case.W
    pad = (0, 0) if case.padding == "valid" else _pair(case.padding)
    sh, sw = _pair(case.stride)
    dh, dw = _pair(case.dilation)
    oh = (case.H + 2 * pad[0] - dh * (case.KH - 1) - 1) // sh + 1
    ow = (case.W + 2 * pad[1] - dw * (case.KW - 1) - 1) // sw + 1
    return oh, ow


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (absolute error if the reference is all zero)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    scale = np.max(np.abs(expected))
    err = np.max(np.abs(actual - expected))
    return float(err / scale) if scale > 0 else float(err)


def assert_close(actual, expected, rtol, what=""):
    """Relative (to the largest reference magnitude) closeness, with a readable failure."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values in result"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def torch_conv2d(torch, case, x, w, b, grad_out):
    """Forward output and autograd gradients from ``torch.nn.functional.conv2d`` in float64.

    ``torch`` is the module (passed in so this file does not import it). Returns float64 NumPy
    arrays (y, grad_x, grad_weight, grad_bias or None).
    """
    xt = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
    wt = torch.tensor(np.asarray(w, dtype=np.float64), requires_grad=True)
    bt = None if b is None else torch.tensor(np.asarray(b, dtype=np.float64), requires_grad=True)
    with warnings.catch_warnings():  # "same" with an even kernel: a performance note only
        warnings.simplefilter("ignore", UserWarning)
        yt = torch.nn.functional.conv2d(xt, wt, bt, stride=case.stride, padding=case.padding,
                                        dilation=case.dilation, groups=case.groups)
    yt.backward(torch.tensor(np.asarray(grad_out, dtype=np.float64)))
    return (yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(),
            None if bt is None else bt.grad.numpy())


class PoisonedEmptyNumpy:
    """``numpy`` for ``monkeypatch.setattr(functional, "np", ...)``, except that ``empty``
    returns NaN-filled arrays: fresh pages are zero, so only poisoned memory reveals an output
    position the kernels never write."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float, **kwargs):
        return np.full(shape, np.nan, dtype=dtype, **kwargs)
