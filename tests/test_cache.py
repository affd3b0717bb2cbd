"""The kernels are cacheable: a second process loads them from Numba's cache instead of
compiling them again."""
import json
import os
import subprocess
import sys

SCRIPT = """
import json, numpy as np
from numba_cnn import functional as F
from numba_cnn._kernels import conv2d as kernels, layout
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
y = F.conv2d(x, w, stride=2, padding=1)
F.conv2d_backward(np.ones_like(y), x, w, stride=2, padding=1)
stats = {}
for name, kernel in [("correlate", kernels.correlate),
                     ("correlate_grad_weight", kernels.correlate_grad_weight),
                     ("pack_phases", layout.pack_phases), ("unpack_phase", layout.unpack_phase)]:
    stats[name] = [sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values())]
print(json.dumps(stats))
"""


def _run(cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_kernels_from_cache(tmp_path):
    first = _run(tmp_path)
    second = _run(tmp_path)
    for name, (hits, misses) in first.items():
        assert misses >= 1 and hits == 0, (name, first)
    for name, (hits, misses) in second.items():
        assert hits >= 1 and misses == 0, (name, second)
    assert any(tmp_path.rglob("*.nbi")), "no cache index was written"
