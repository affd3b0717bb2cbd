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
                     ("pack_phases", layout.pack_phases),
                     ("gather_phase_weights", layout.gather_phase_weights)]:
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


def test_cache_key_covers_the_inlined_register_tiles_and_layout_helpers():
    """Numba keys a cached kernel on its own source file and closure values only. The drivers
    inline IR tiles from register_tile.py and call packing helpers from layout.py, so they close
    over fingerprints of those files (and over the bounds-check flag): editing either must not
    load stale cached drivers."""
    import hashlib

    from numba_cnn._kernels import conv2d, layout, register_tile

    digests = []
    for module in (register_tile, layout):
        with open(module.__file__, "rb") as source:
            digests.append(hashlib.sha256(source.read()).hexdigest()[:16])
    assert register_tile.SOURCE_FINGERPRINT.startswith(digests[0])
    assert layout.SOURCE_DIGEST == digests[1]
    for kernel in (conv2d.correlate, conv2d.correlate_grad_weight, conv2d.blocked_correlate,
                   conv2d.blocked_grad_weight):
        cells = [cell.cell_contents for cell in kernel.py_func.__closure__]
        assert (conv2d.CHECK_BOUNDS, register_tile.SOURCE_FINGERPRINT,
                layout.SOURCE_DIGEST) in cells, kernel


EDITED_SCRIPT = """
import json, numpy as np, numba_cnn
from numba_cnn import functional as F
from numba_cnn._kernels import conv2d
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
F.conv2d(x, w, padding=1)
print(json.dumps([numba_cnn.__file__, sum(conv2d.correlate.stats.cache_hits.values()),
                  sum(conv2d.correlate.stats.cache_misses.values())]))
"""


def test_an_edited_layout_module_makes_the_drivers_compile_again(tmp_path):
    # (before the layout digest was in their key, the second process below loaded the drivers
    # compiled with the old helpers: a broken pack_grid_image went unnoticed with a warm cache)
    import pathlib
    import shutil

    import numba_cnn

    copy = tmp_path / "copy"
    shutil.copytree(pathlib.Path(numba_cnn.__file__).parent, copy / "numba_cnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("NUMBA_DISABLE_JIT", None)

    def run():
        done = subprocess.run([sys.executable, "-c", EDITED_SCRIPT], env=env, cwd=copy,
                              capture_output=True, text=True, check=True)
        path, hits, misses = json.loads(done.stdout.strip().splitlines()[-1])
        assert pathlib.Path(path).is_relative_to(copy), path  # the copy, not the install
        return hits, misses

    assert run() == (0, 1)
    assert run() == (1, 0)  # unchanged: loaded from the cache
    layout = copy / "numba_cnn" / "_kernels" / "layout.py"
    layout.write_text(layout.read_text() + "# edited\n")
    assert run() == (0, 1)
