"""The library in unusual environments: a read-only install, absurd sizes."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import numba_cnn
from numba_cnn import functional as F

SCRIPT = """
import numpy as np
from numba_cnn import functional as F
x = np.arange(2 * 3 * 6 * 5, dtype=np.float64).reshape(2, 3, 6, 5)
w = np.ones((4, 3, 3, 3))
print(float(F.conv2d(x, w, padding=1).sum()))
"""


def _read_only_child(env):
    """Command prefix and environment for a child that really cannot write the install.

    File permissions do not bind root: as root the child drops to 'nobody' with setpriv when
    'nobody' can run this interpreter. Where it cannot (a virtualenv inside a private
    directory, as in CI), the child stays root and Numba is told to skip the in-tree cache
    locator -- exactly the decision it takes for an unwritable source directory.
    """
    if os.geteuid() != 0:
        return [], env
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run(prefix + [sys.executable, "-c", "import numpy, numba"],
                               capture_output=True, cwd="/")
        if probe.returncode == 0:
            return prefix, env
    return [], dict(env, NUMBA_CACHE_LOCATOR_CLASSES="UserWideCacheLocator")


@pytest.mark.skipif(not os.path.exists(os.path.join(sys.prefix, "lib", "libtbb.so.12")),
                    reason="the tbb wheel is not installed (it comes with the test extra)")
def test_numba_threading_layer_tbb_set_by_the_user_finds_the_tbb_wheel():
    # the tbb wheel's library is where the dynamic loader does not look; numba_cnn loads it by
    # path, also when the user asks for TBB by name (before, that failed: "Intel TBB is
    # required")
    script = SCRIPT + "import numba; print(numba.threading_layer())\n"
    env = dict(os.environ, NUMBA_THREADING_LAYER="tbb")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "tbb"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file permissions")
def test_read_only_install_falls_back_to_a_user_cache(tmp_path):
    """Numba cannot write its cache beside read-only sources: it must use a user cache dir."""
    import pathlib
    import tempfile
    # pytest's tmp_path sits in a directory only its owner can enter: use a fresh one in /tmp
    base = pathlib.Path(tempfile.mkdtemp(prefix="numba_cnn_readonly_"))
    install = base / "site"
    home = base / "home"
    shutil.copytree(os.path.dirname(numba_cnn.__file__), install / "numba_cnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    home.mkdir()
    for path in [base, home]:
        os.chmod(path, 0o777)  # the unprivileged child must reach and write its home
    for root, dirs, files in os.walk(install):
        for name in dirs + files + [""]:
            path = os.path.join(root, name)
            os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
    env = dict(os.environ, PYTHONPATH=str(install), HOME=str(home),
               XDG_CACHE_HOME=str(home / ".cache"), PYTHONDONTWRITEBYTECODE="1")
    env.pop("NUMBA_CACHE_DIR", None)
    prefix, env = _read_only_child(env)
    try:
        # cwd=install: `python -c` puts the working directory first on sys.path, and the test
        # must import the read-only copy, not the checkout
        done = subprocess.run(prefix + [sys.executable, "-c", SCRIPT], env=env,
                              cwd=install, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "cannot be cached" not in done.stderr, done.stderr[-2000:]
        assert not any(install.rglob("*.nbi")), "the cache was written beside read-only sources"
        assert any(home.rglob("*.nbi")), "no user-wide cache was written"
    finally:
        for root, dirs, _ in os.walk(base):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_no_usable_cache_location_still_works_with_a_warning(tmp_path):
    """No locator can cache (read-only sources, no usable home): Numba's cache=True raises at
    import; the kernels must then compile uncached, with a warning."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(numba_cnn.__file__)),
               # no cache location applies to a plain module: what Numba finds when neither
               # the sources nor a user cache directory are writable
               NUMBA_CACHE_LOCATOR_CLASSES="IPythonCacheLocator")
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cannot be cached" in done.stderr
    assert float(done.stdout.split()[-1]) > 0


def test_read_only_input_arrays_work(rng):
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    expected = F.conv2d(x, w)
    x.flags.writeable = False
    w.flags.writeable = False
    np.testing.assert_array_equal(F.conv2d(x, w), expected)


@pytest.mark.parametrize("call", [
    lambda x: F.conv2d(x, np.ones((64, 1, 1, 1), np.float32)),
    lambda x: F.max_pool2d(x, 1),
    lambda x: F.avg_pool2d(x, 1),
    lambda x: F.conv_transpose2d(x, np.ones((1, 64, 1, 1), np.float32)),
])
def test_outputs_too_large_for_memory_raise_memory_error_before_allocating(call):
    # a zero-stride view: 10^12 logical elements backed by 4 bytes
    x = np.broadcast_to(np.float32(1), (1, 1, 10 ** 6, 10 ** 6))
    with pytest.raises(MemoryError, match="elements"):
        call(x)
