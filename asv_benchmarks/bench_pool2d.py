"""Max and average pooling, forward and forward+backward, on a 32x64x56x56 float32 input:
numba_cnn beside the book's im2col Pooling layer (``numba_cnn.im2col.pool2d``)."""
from .common import POOL_CASES, Benchmark, need, pool_arrays, runner_factory, warms


@runner_factory
def pool2d_runner(impl, case):
    """(forward, forward_backward) of POOL_CASES[case]; max pooling keeps its argmax indices for
    the backward pass in both implementations."""
    mode, k, s, p = POOL_CASES[case]
    x, grad_out = pool_arrays(case, "float32")
    if impl == "numba_cnn":
        if mode == "max":
            F = need("numba_cnn.functional", "max_pool2d", "max_pool2d_backward")

            def forward_backward():
                _, indices = F.max_pool2d(x, k, s, p, return_indices=True)
                return F.max_pool2d_backward(grad_out, indices, x.shape)
            return (lambda: F.max_pool2d(x, k, s, p)), forward_backward
        F = need("numba_cnn.functional", "avg_pool2d", "avg_pool2d_backward")

        def forward_backward():
            F.avg_pool2d(x, k, s, p)
            return F.avg_pool2d_backward(grad_out, x.shape, k, s, p)
        return (lambda: F.avg_pool2d(x, k, s, p)), forward_backward
    im2col = need("numba_cnn.im2col", "pool2d", "pool2d_backward")

    def forward_backward():
        _, state = im2col.pool2d(x, k, k, s, p, mode)
        return im2col.pool2d_backward(grad_out, state, k, k, s, p)
    return (lambda: im2col.pool2d(x, k, k, s, p, mode)), forward_backward


class Pool2D(Benchmark):
    """maxpool2: max 2x2 s2; maxpool3: max 3x3 s2 p1; avgpool2: avg 2x2 s2."""
    params = [list(POOL_CASES)]
    param_names = ["case"]

    def setup(self, case):
        self.ours = pool2d_runner("numba_cnn", case)
        self.im2col = pool2d_runner("im2col", case)

    @warms(pool2d_runner, "numba_cnn")
    def time_forward_numba_cnn(self, case):
        self.ours.forward()

    @warms(pool2d_runner, "im2col")
    def time_forward_im2col(self, case):
        self.im2col.forward()

    @warms(pool2d_runner, "numba_cnn")
    def time_forward_backward_numba_cnn(self, case):
        self.ours.forward_backward()

    @warms(pool2d_runner, "im2col")
    def time_forward_backward_im2col(self, case):
        self.im2col.forward_backward()

    @warms(pool2d_runner, "numba_cnn")
    def peakmem_forward_backward_numba_cnn(self, case):
        self.ours.forward_backward()

    @warms(pool2d_runner, "im2col")
    def peakmem_forward_backward_im2col(self, case):
        self.im2col.forward_backward()
