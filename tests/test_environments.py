"""The library in unusual environments: a read-only install, absurd sizes."""
import os
import shutil
import stat
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


def _unprivileged_prefix():
    """Command prefix that runs a process as an ordinary user: file permissions do not bind
    root, so as root the child drops to 'nobody' with setpriv."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root without setpriv: cannot test a read-only install")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


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
    try:
        # cwd=install: `python -c` puts the working directory first on sys.path, and the test
        # must import the read-only copy, not the checkout
        done = subprocess.run(_unprivileged_prefix() + [sys.executable, "-c", SCRIPT], env=env,
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


@pytest.mark.skipif(os.name != "posix", reason="POSIX file permissions")
def test_no_writable_cache_anywhere_still_works_with_a_warning(tmp_path):
    """Read-only sources and no usable home: kernels are compiled uncached, with a warning."""
    import pathlib
    import tempfile
    base = pathlib.Path(tempfile.mkdtemp(prefix="numba_cnn_nocache_"))
    install = base / "site"
    shutil.copytree(os.path.dirname(numba_cnn.__file__), install / "numba_cnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(base, 0o755)
    for root, dirs, files in os.walk(install):
        for name in dirs + files + [""]:
            path = os.path.join(root, name)
            os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
    env = dict(os.environ, PYTHONPATH=str(install), HOME="/nonexistent",
               XDG_CACHE_HOME="/nonexistent/.cache", PYTHONDONTWRITEBYTECODE="1")
    env.pop("NUMBA_CACHE_DIR", None)
    try:
        done = subprocess.run(_unprivileged_prefix() + [sys.executable, "-c", SCRIPT], env=env,
                              cwd=install, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "cannot be cached" in done.stderr
        assert float(done.stdout.split()[-1]) > 0
    finally:
        for root, dirs, _ in os.walk(base):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(base, ignore_errors=True)


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
