"""conv2d forward and forward+backward: numba_cnn beside the im2col NumPy baseline.

The ``*_numba_cnn`` and ``*_im2col`` methods time the same case one after the other, so
``asv show`` / ``asv compare`` put our time next to the baseline's.
"""
from .common import (CONV_CASES, DTYPES, Benchmark, conv_arrays, need, need_dtype,
                     runner_factory, warms)


@runner_factory
def conv2d_runner(impl, case, dtype):
    """(forward, forward_backward) of conv2d on CONV_CASES[case]; backward includes the input,
    weight and bias gradients in both implementations."""
    stride, pad, dilation = CONV_CASES[case][6:]
    x, weight, bias, grad_out = conv_arrays(case, dtype)
    if impl == "numba_cnn":
        F = need("numba_cnn.functional", "conv2d", "conv2d_backward")

        def forward_backward():
            F.conv2d(x, weight, bias, stride, pad, dilation)
            return F.conv2d_backward(grad_out, x, weight, stride, pad, dilation)
        return (lambda: F.conv2d(x, weight, bias, stride, pad, dilation)), forward_backward
    im2col = need("numba_cnn.im2col", "conv2d", "conv2d_backward")

    def forward_backward():
        _, col = im2col.conv2d(x, weight, bias, stride, pad, dilation)
        return im2col.conv2d_backward(grad_out, x.shape, col, weight, stride, pad, dilation)
    return (lambda: im2col.conv2d(x, weight, bias, stride, pad, dilation)), forward_backward


class Conv2D(Benchmark):
    """One conv2d call per sample, per DESIGN.md shape and dtype (float64: mnist2, res28)."""
    params = [list(CONV_CASES), DTYPES]
    param_names = ["case", "dtype"]

    def setup(self, case, dtype):
        need_dtype(case, dtype)
        self.ours = conv2d_runner("numba_cnn", case, dtype)
        self.im2col = conv2d_runner("im2col", case, dtype)

    @warms(conv2d_runner, "numba_cnn")
    def time_forward_numba_cnn(self, case, dtype):
        self.ours.forward()

    @warms(conv2d_runner, "im2col")
    def time_forward_im2col(self, case, dtype):
        self.im2col.forward()

    @warms(conv2d_runner, "numba_cnn")
    def time_forward_backward_numba_cnn(self, case, dtype):
        self.ours.forward_backward()

    @warms(conv2d_runner, "im2col")
    def time_forward_backward_im2col(self, case, dtype):
        self.im2col.forward_backward()

    # Peak resident memory of the process after setup and one call: includes the interpreter,
    # NumPy, Numba and the compiled kernels, so compare the two columns, not absolute bytes.
    @warms(conv2d_runner, "numba_cnn")
    def peakmem_forward_backward_numba_cnn(self, case, dtype):
        self.ours.forward_backward()

    @warms(conv2d_runner, "im2col")
    def peakmem_forward_backward_im2col(self, case, dtype):
        self.im2col.forward_backward()
