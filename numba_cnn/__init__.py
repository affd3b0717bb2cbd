"""numba_cnn: Numba-compiled convolution and pooling layers for NumPy-style CNN training code.

Public modules: ``functional`` (also ``F``), ``layers`` (its classes are re-exported here) and
``reference`` (slow NumPy references used by the tests and as a benchmark baseline).
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys


def _prefer_512_bit_vectors():
    """Let LLVM vectorise our kernels with 512-bit registers on AVX-512 machines.

    LLVM tunes Intel server cores (Skylake-X to Emerald Rapids) with "prefer-256-bit", so the
    kernels' pixel loops get ymm registers: measured on this project's machine, res28 forward at
    111-141 GFLOP/s with ymm against 153-178 with zmm. Numba fixes its CPU features when it is
    first imported, from NUMBA_CPU_FEATURES, so this only acts when numba_cnn is imported before
    numba, and never when the user set NUMBA_CPU_FEATURES, NUMBA_CPU_NAME or
    NUMBA_CNN_PREFER_512=0. It applies
    to all Numba code compiled in the process (it changes only the preferred vector width).
    """
    if ("numba" in _sys.modules or "NUMBA_CPU_FEATURES" in _os.environ
            or "NUMBA_CPU_NAME" in _os.environ  # a chosen (e.g. portable) target: keep it
            or _os.environ.get("NUMBA_CNN_PREFER_512", "1") == "0"):
        return
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features().flatten()
    if "+avx512f" not in features.split(","):
        return
    _os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"
    try:
        import numba  # noqa: F401  (reads the environment once, at import)
    finally:
        del _os.environ["NUMBA_CPU_FEATURES"]


_prefer_512_bit_vectors()


def _make_tbb_loadable():
    """Let Numba pick its TBB threading layer when the ``tbb`` wheel is installed.

    Numba tries TBB first, but a pip-installed ``tbb`` puts ``libtbb.so.12`` in
    ``<prefix>/lib``, where the dynamic loader does not look, so Numba silently falls back to
    GNU OpenMP, which kills a forked child that runs a kernel ("fork() called from a process
    already using GNU OpenMP"). Loading the library by path first fixes that; TBB is also safe
    for concurrent calls from several Python threads. It also lets a user's
    NUMBA_THREADING_LAYER=tbb (or safe, threadsafe, forksafe) find TBB: without it, that setting
    failed on the first parallel call ("Intel TBB is required"). Does nothing once Numba has
    started its threads, or when the user chose a layer other than TBB (omp, workqueue).
    """
    chosen = _os.environ.get("NUMBA_THREADING_LAYER", "default").strip().lower()
    if chosen in ("omp", "workqueue") or not _sys.platform.startswith("linux"):
        return
    from numba.np.ufunc import parallel
    library = _os.path.join(_sys.prefix, "lib", "libtbb.so.12")
    if parallel._is_initialized or not _os.path.exists(library):
        return
    import ctypes
    try:
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass  # Numba then chooses another layer, as it would have anyway


_make_tbb_loadable()

from . import functional  # noqa: E402
from . import functional as F  # noqa: E402
from . import layers  # noqa: E402
from .layers import AvgPool2D, Conv2D, ConvTranspose2D, GlobalAvgPool2D, MaxPool2D  # noqa: E402

__all__ = ["functional", "F", "layers", "Conv2D", "ConvTranspose2D", "MaxPool2D", "AvgPool2D",
           "GlobalAvgPool2D", "__version__"]
