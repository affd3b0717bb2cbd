"""Per-call overhead: a convolution so small that validation, packing and thread start-up are all
there is to time (issue 7 asks for <= 50 us per 1x1x8x8 forward)."""
import numpy as np

from .common import need


class Overhead:
    """Plain asv timing (asv picks how many calls make a sample): a call takes microseconds."""
    timeout = 120

    def setup(self):
        F = need("numba_cnn.functional", "conv2d")
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
        self.weight = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
        self.conv2d = F.conv2d
        self.conv2d(self.x, self.weight)  # compiled or loaded from the cache before timing

    def time_tiny_conv2d_forward(self):
        self.conv2d(self.x, self.weight)
