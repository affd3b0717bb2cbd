"""Numba compile cost, per kernel family, measured in fresh subprocesses (float32).

- ``track_cold_compile_seconds``: the first forward+backward call of a process whose
  ``NUMBA_CACHE_DIR`` is an empty directory, so every kernel it needs is compiled (the first
  call's compute is milliseconds; the rest is compilation).
- ``track_warm_first_result_seconds``: wall time from launching a fresh interpreter to its first
  forward+backward result, with the on-disk cache already filled by a previous process: what a
  user waits for when starting a training script the second time.

The subprocess runs the interpreter of the benchmark environment (``sys.executable``) from a
temporary directory, so it imports the installed numba_cnn of the commit being measured.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .common import Benchmark, need

# family: (numba_cnn module, names it must define, forward+backward code on float32 data)
_FAMILIES = {
    "conv2d": ("numba_cnn.layers", ("Conv2D",), """
from numba_cnn.layers import Conv2D
layer = Conv2D(16, 32, 3, padding=1, rng=0)
x = rng.standard_normal((4, 16, 28, 28)).astype(np.float32)
y = layer.forward(x); layer.backward(np.ones_like(y))
"""),
    # a strided layer wider than 28: channel-blocked forward, grid input gradient (a layer whose
    # passes use both layouts compiles both correlation kernels)
    "conv2d_stride2": ("numba_cnn.layers", ("Conv2D",), """
from numba_cnn.layers import Conv2D
layer = Conv2D(64, 64, 3, stride=2, padding=1, rng=0)
x = rng.standard_normal((2, 64, 32, 32)).astype(np.float32)
y = layer.forward(x); layer.backward(np.ones_like(y))
"""),
    "conv_transpose2d": ("numba_cnn.functional", ("conv_transpose2d",
                                                  "conv_transpose2d_backward"), """
from numba_cnn import functional as F
x = rng.standard_normal((4, 32, 14, 14)).astype(np.float32)
w = rng.standard_normal((32, 16, 4, 4)).astype(np.float32)
y = F.conv_transpose2d(x, w, None, 2, 1); F.conv_transpose2d_backward(np.ones_like(y), x, w, 2, 1)
"""),
    "max_pool2d": ("numba_cnn.layers", ("MaxPool2D",), """
from numba_cnn.layers import MaxPool2D
layer = MaxPool2D(2)
x = rng.standard_normal((4, 16, 28, 28)).astype(np.float32)
y = layer.forward(x); layer.backward(np.ones_like(y))
"""),
    "avg_pool2d": ("numba_cnn.layers", ("AvgPool2D",), """
from numba_cnn.layers import AvgPool2D
layer = AvgPool2D(2)
x = rng.standard_normal((4, 16, 28, 28)).astype(np.float32)
y = layer.forward(x); layer.backward(np.ones_like(y))
"""),
}

# The child prints the wall-clock instant of its first result and how long that call took.
_CHILD = """
import json, time
import numpy as np
import numba_cnn
rng = np.random.default_rng(0)
start = time.perf_counter()
{code}
print(json.dumps({{"done_at": time.time(), "call_seconds": time.perf_counter() - start}}))
"""


def _run_child(family, cache_dir):
    """Run one fresh process on ``family``; returns (launch time, its JSON report)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("NUMBA_DISABLE_JIT", None)
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", _CHILD.format(code=_FAMILIES[family][2])],
                          env=env, cwd=cache_dir, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{family} child failed:\n{done.stderr[-3000:]}")
    return launched, json.loads(done.stdout.strip().splitlines()[-1])


class Compile(Benchmark):
    """Cold compile and warm-cache first-result seconds per kernel family."""
    params = [list(_FAMILIES)]
    param_names = ["family"]
    unit = "seconds"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 900

    cache_dir = None

    def setup(self, family):
        module, names, _ = _FAMILIES[family]
        need(module, *names)
        self.cache_dir = tempfile.mkdtemp(prefix="numba_cnn_asv_cache_")

    def teardown(self, family):
        # asv also calls teardown after a setup that skipped (raised NotImplementedError)
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def track_cold_compile_seconds(self, family):
        return _run_child(family, self.cache_dir)[1]["call_seconds"]

    def track_warm_first_result_seconds(self, family):
        _run_child(family, self.cache_dir)  # fills the cache
        launched, report = _run_child(family, self.cache_dir)
        return report["done_at"] - launched
