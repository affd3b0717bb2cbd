"""conv_transpose2d forward and forward+backward: numba_cnn beside an im2col NumPy baseline
(a matmul then col2im, the input gradient of a conv2d). Skipped at commits without
``numba_cnn.functional.conv_transpose2d``."""
from .common import (CONV_TRANSPOSE_CASES, Benchmark, conv_transpose_arrays,
                     im2col_conv_transpose2d, im2col_conv_transpose2d_backward, need,
                     runner_factory, warms)


@runner_factory
def conv_transpose2d_runner(impl, case):
    """(forward, forward_backward) of a float32 transposed convolution on
    CONV_TRANSPOSE_CASES[case] (input, weight and bias gradients)."""
    stride, pad = CONV_TRANSPOSE_CASES[case][6:]
    x, weight, bias, grad_out = conv_transpose_arrays(case, "float32")
    if impl == "numba_cnn":
        F = need("numba_cnn.functional", "conv_transpose2d", "conv_transpose2d_backward")

        def forward_backward():
            F.conv_transpose2d(x, weight, bias, stride, pad)
            return F.conv_transpose2d_backward(grad_out, x, weight, stride, pad)
        return (lambda: F.conv_transpose2d(x, weight, bias, stride, pad)), forward_backward
    im2col = need("numba_cnn.im2col", "im2col", "col2im")

    def forward_backward():
        im2col_conv_transpose2d(im2col, x, weight, bias, stride, pad)
        return im2col_conv_transpose2d_backward(im2col, grad_out, x, weight, stride, pad)
    return (lambda: im2col_conv_transpose2d(im2col, x, weight, bias, stride, pad)), \
        forward_backward


class ConvTranspose2D(Benchmark):
    """dcgan: 16x128x16x16 -> 64, 4x4 s2 p1 (-> 32x32); ct28: 8x64x28x28 -> 64, 3x3 s1 p1."""
    params = [list(CONV_TRANSPOSE_CASES)]
    param_names = ["case"]

    def setup(self, case):
        # the baseline alone says nothing about us: skip both before conv_transpose2d exists
        need("numba_cnn.functional", "conv_transpose2d", "conv_transpose2d_backward")
        self.ours = conv_transpose2d_runner("numba_cnn", case)
        self.im2col = conv_transpose2d_runner("im2col", case)

    @warms(conv_transpose2d_runner, "numba_cnn")
    def time_forward_numba_cnn(self, case):
        self.ours.forward()

    @warms(conv_transpose2d_runner, "im2col")
    def time_forward_im2col(self, case):
        self.im2col.forward()

    @warms(conv_transpose2d_runner, "numba_cnn")
    def time_forward_backward_numba_cnn(self, case):
        self.ours.forward_backward()

    @warms(conv_transpose2d_runner, "im2col")
    def time_forward_backward_im2col(self, case):
        self.im2col.forward_backward()

    @warms(conv_transpose2d_runner, "numba_cnn")
    def peakmem_forward_backward_numba_cnn(self, case):
        self.ours.forward_backward()

    @warms(conv_transpose2d_runner, "im2col")
    def peakmem_forward_backward_im2col(self, case):
        self.im2col.forward_backward()
