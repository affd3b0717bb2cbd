"""Numba kernels, one module per operation family. Kernels never validate their arguments."""
import hashlib
import warnings

from numba import njit

from . import _linking  # noqa: F401  (compiles our parallel kernels' wrappers once: see there)


def cached_njit(**options):
    """``numba.njit(cache=True, **options)``, or without the cache where none can be written.

    Numba caches beside the sources or, when that directory is read-only, in a user-wide cache
    directory; when neither is writable (a read-only install with no usable home directory)
    ``cache=True`` raises at import time. Then the kernels still work, compiled in every process,
    and a warning says how to get the cache back.
    """
    def decorate(function):
        try:
            return njit(cache=True, **options)(function)
        except RuntimeError as error:
            if "cannot cache" not in str(error):
                raise
            warnings.warn(f"numba_cnn: compiled kernels cannot be cached ({error}); they are "
                          "compiled again in every process. Set NUMBA_CACHE_DIR to a writable "
                          "directory to keep them.", RuntimeWarning, stacklevel=3)
            return njit(cache=False, **options)(function)
    return decorate


def source_digest(path):
    """The first 16 hex digits of the SHA-256 of the file at ``path`` ("unknown" if it cannot be
    read): part of the cache key of cached kernels that compile in code from another module
    (Numba keys a cached function on its own source file only)."""
    try:
        with open(path, "rb") as source:
            return hashlib.sha256(source.read()).hexdigest()[:16]
    except OSError:
        return "unknown"
