"""Long training loops must not leak: resident memory stays flat over 1,000 iterations."""
import resource
import sys

import numpy as np
import pytest

from numba_cnn import Conv2D, MaxPool2D


def _resident_bytes():
    """Current resident set size (Linux /proc), falling back to the peak from getrusage."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_forward_backward_loop_does_not_grow_resident_memory(rng):
    conv = Conv2D(3, 8, 3, stride=2, padding=1, rng=0)
    pool = MaxPool2D(2)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)

    def step():
        y = pool.forward(conv.forward(x))
        conv.backward(pool.backward(np.ones_like(y)))

    for _ in range(100):  # warm-up: compilation, caches, allocator pools
        step()
    before = _resident_bytes()
    for _ in range(1000):
        step()
    growth = _resident_bytes() - before
    # one iteration allocates ~40 KB; a leak of even one array per step would add > 10 MB
    assert growth < 8 * 2 ** 20, f"resident memory grew by {growth / 2 ** 20:.1f} MiB"
