"""Each parallel kernel's loop body optimised and compiled to machine code twice, not four times.

Numba lowers a ``prange`` loop into three code libraries: the loop body as a gufunc, a wrapper
that unpacks the gufunc's arguments, and a wrapper that hands that one to the thread pool. The
kernel's library links the last, which links the one before, which links the body. Linking a
library finalizes it, and finalizing runs LLVM's optimiser and code generator over everything
linked into it, so each wrapper optimised and compiled the whole body again. Of the four copies
of the body only two ever run: the kernel's own (the one that is cached and loaded by later
processes) and, in the process that compiled it, the body library's (the kernel's calls resolve
to it there).

So while Numba compiles a numba_cnn function, the two wrapper libraries are finalized without
optimisation and without machine code: they are linked, marked finalized, and their IR is
optimised and compiled in the kernel's library, which links it anyway. Cold compile of a
Conv2D forward and backward (fresh cache, first call of each) on the project machine: 32 -> 40
channels at 12x12 19.7 -> 14.8-15.2 s, 64 -> 64 at 32x32 stride 2 17.7 -> 13.5-14.2 s, 8 -> 8
9.5-9.9 -> 7.8-8.0 s. The kernels compute the same results (``correlate``'s machine code differs
in register allocation outside its tiles). Same-process A/B of the three passes on 13 shapes,
both copies loaded from the cache: 0.95-1.02, and the four below 0.98 did not repeat in longer
runs (z2dl's weight gradient, 0.96 twice, read 1.00 with the import order swapped).

The hook is narrow:
- it acts only while Numba compiles one of numba_cnn's functions (``numba:compile`` events, which
  Numba sends holding its global compiler lock; libraries are finalized only under that lock, so
  no other code is finalized meanwhile), and the class it patches is restored afterwards;
- it skips only libraries named as Numba names the two wrappers (a renamed wrapper is finalized as
  usual);
- only on the Numba versions of VERIFIED_NUMBA (others compile as usual, just slower);
- ``NUMBA_CNN_LINK_ONCE=0`` turns it off.
"""
import os

import numba
from numba.core import codegen, event

# Numba (major, minor) versions whose parfor lowering this was measured and tested with
VERIFIED_NUMBA = ((0, 68),)
# numba.np.ufunc.parallel.build_gufunc_kernel's library, and the str() of the
# numba.np.ufunc.wrappers._GufuncWrapper object that names the argument-unpacking one
_THREAD_POOL_WRAPPER = "parallelgufuncwrapper"
_ARGUMENT_WRAPPER_PREFIX = "<numba.np.ufunc.wrappers._GufuncWrapper object"
_PACKAGE = __name__.partition(".")[0] + "."  # numba_cnn, or the name of a vendored copy
_LIBRARY = codegen.CPUCodeLibrary
_NUMBA_FINALIZE = _LIBRARY.finalize


def _is_wrapper(library):
    name = library.name
    return name == _THREAD_POOL_WRAPPER or name.startswith(_ARGUMENT_WRAPPER_PREFIX)


def _skip_optimisation():
    pass


def _finalize(library):
    """``CPUCodeLibrary.finalize`` while a numba_cnn function compiles: as Numba's, but a
    wrapper library (see the module docstring) only links its libraries and is marked
    finalized. The instance attributes shadow the two expensive steps of Numba's own method."""
    if _is_wrapper(library):
        library._optimize_final_module = _skip_optimisation

        def mark_finalized():
            library._finalized = True
        library._finalize_final_module = mark_finalized
    _NUMBA_FINALIZE(library)


class _OurCompiles(event.Listener):
    """Installs ``_finalize`` for the outermost compile of a numba_cnn function, and puts
    Numba's method back when it ends (also when it raises)."""

    def __init__(self):
        self.depth = 0

    @staticmethod
    def _ours(ev):
        function = getattr(ev.data["dispatcher"], "py_func", None)
        return (getattr(function, "__module__", None) or "").startswith(_PACKAGE)

    def on_start(self, ev):
        if self._ours(ev):
            self.depth += 1
            _LIBRARY.finalize = _finalize

    def on_end(self, ev):
        if self._ours(ev):
            self.depth -= 1
            if self.depth == 0:
                _LIBRARY.finalize = _NUMBA_FINALIZE


def supported():
    """Whether this Numba is one the hook was verified with, and the user did not turn it off."""
    version = tuple(int(part) for part in numba.__version__.split(".")[:2])
    return (version in VERIFIED_NUMBA and os.environ.get("NUMBA_CNN_LINK_ONCE", "1") != "0"
            and all(hasattr(_LIBRARY, name) for name in (
                "_optimize_final_module", "_finalize_final_module", "_finalized")))


LISTENER = _OurCompiles()
if supported():
    event.register("numba:compile", LISTENER)
