"""Each parallel kernel's loop body compiled to machine code once, not four times.

Numba lowers a ``prange`` loop into three code libraries: the loop body as a gufunc, a wrapper
that unpacks the gufunc's arguments, and a wrapper that hands that one to the thread pool. The
kernel's library links the last, which links the one before, which links the body. Linking a
library finalizes it, and finalizing runs LLVM's optimiser and code generator over everything
linked into it, so each wrapper optimised and compiled the whole body again; and the body was
compiled to machine code on its own, with a CPython wrapper, when Numba lowered it. Of the four
copies of the body only the kernel's runs in later processes (it is the one that is cached), and
nothing calls the body from Python.

So while Numba compiles a numba_cnn function:
- the loop body is lowered with Numba's ``no_compile`` flag (and without CPython or C wrappers):
  its IR is built and function-optimised as usual, but Numba neither finalizes it nor asks for
  its machine code;
- the body's library is then finalized without machine code: LLVM's optimiser runs over it
  as before, and it is marked finalized;
- the two wrapper libraries are finalized by linking alone, without optimisation or machine
  code of their own;
- the kernel's library, which links all three anyway, optimises and compiles their IR.

The body keeps its own optimisation because the kernels were tuned with it. Without it, with the
body optimised once in the kernel, the machine code around the register tiles came out different
(e.g. ``unblock_grad_weight`` 1,970 instructions instead of 2,597), and res14 stride 2's input
gradient measured 1-2% slower in same-process A/B runs, 0-0.25% with the body optimised; that
costs 0.3-0.5 s of cold compile per layer. The code still differs from Numba's own (2,487
instructions against 2,597): the kernel used to link the body's IR after the code generator had
run over it in place, which we skip. Measured effect, same-process A/B against 61a2638, both
orders: res14 stride 2's weight gradient 1-2% slower; every other pass of the 13 bench shapes
and the transposed ones within 2% either way (mnist1's forward 5-7% faster).

Cold compile of a Conv2D forward and backward (fresh cache, first call of each) on the project
machine, wrappers only (06495ae): 32 -> 40 channels at 12x12 19.7 -> 14.8-15.2 s, 64 -> 64 at
32x32 stride 2 17.7 -> 13.5-14.2 s, 8 -> 8 9.5-9.9 -> 7.8-8.0 s; and the body too, alternating
runs: 1-4 s less per layer (32 -> 40 at stride 2 18.3-18.5 -> 14.3-17.5 s on a loaded
machine; see the README's compile table).

In the process that compiled a kernel its body's environment (Numba's ``NumbaEnv`` global) is
then never set, just as in every process that loads the kernel from the cache.

The hook is narrow:
- it acts only while Numba compiles one of numba_cnn's functions (``numba:compile`` events, which
  Numba sends holding its global compiler lock; libraries are finalized only under that lock, so
  no other code is finalized meanwhile), and the function and method it patches are restored
  afterwards;
- it skips only the two wrappers (by the names Numba gives them) and the bodies it lowered itself
  without machine code (a body lowered any other way is finalized as usual: its machine code is
  needed then);
- only on the Numba versions of VERIFIED_NUMBA (others compile as usual, just slower);
- ``NUMBA_CNN_LINK_ONCE=0`` turns it off.
"""
import os

import numba
from numba.core import codegen, compiler, event

# Numba (major, minor) versions whose parfor lowering this was measured and tested with
VERIFIED_NUMBA = ((0, 68),)
# numba.np.ufunc.parallel.build_gufunc_kernel's library, and the str() of the
# numba.np.ufunc.wrappers._GufuncWrapper object that names the argument-unpacking one
_THREAD_POOL_WRAPPER = "parallelgufuncwrapper"
_ARGUMENT_WRAPPER_PREFIX = "<numba.np.ufunc.wrappers._GufuncWrapper object"
_PACKAGE = __name__.partition(".")[0] + "."  # numba_cnn, or the name of a vendored copy
# the name numba.parfors.parfor_lowering gives a prange loop's body (its function and library)
_LOOP_BODY_PREFIX = "__numba_parfor_gufunc_"
_LIBRARY = codegen.CPUCodeLibrary
_NUMBA_FINALIZE = _LIBRARY.finalize
_NUMBA_COMPILE_IR = compiler.compile_ir
# the loop bodies lowered without machine code during the current compile: _finalize optimises
# and links them, and generates no code
_bodies_to_link = set()


def _is_wrapper(library):
    name = library.name
    return name == _THREAD_POOL_WRAPPER or name.startswith(_ARGUMENT_WRAPPER_PREFIX)


def _compile_ir(typingctx, targetctx, func_ir, args, return_type, flags, *more, **options):
    """``numba.core.compiler.compile_ir`` while a numba_cnn function compiles: as Numba's, but a
    prange loop's body is lowered without machine code or wrappers (see the module docstring),
    and its library is left to ``_finalize``."""
    if not func_ir.func_id.func_qualname.startswith(_LOOP_BODY_PREFIX):
        return _NUMBA_COMPILE_IR(typingctx, targetctx, func_ir, args, return_type, flags, *more,
                                 **options)
    flags = flags.copy()
    flags.no_compile = True
    flags.no_cpython_wrapper = True
    flags.no_cfunc_wrapper = True
    result = _NUMBA_COMPILE_IR(typingctx, targetctx, func_ir, args, return_type, flags, *more,
                               **options)
    _bodies_to_link.add(result.library)
    return result


def _skip_optimisation():
    pass


def _finalize(library):
    """``CPUCodeLibrary.finalize`` while a numba_cnn function compiles: as Numba's, but a loop
    body lowered by ``_compile_ir`` gets no machine code, and a wrapper library is not
    optimised either (see the module docstring): they are marked finalized. The instance
    attributes shadow the expensive steps of Numba's own method."""
    wrapper = _is_wrapper(library)
    if wrapper or library in _bodies_to_link:
        def mark_finalized():
            library._finalized = True
        library._finalize_final_module = mark_finalized
    if wrapper:
        library._optimize_final_module = _skip_optimisation
    _NUMBA_FINALIZE(library)


class _OurCompiles(event.Listener):
    """Installs ``_finalize`` and ``_compile_ir`` for the outermost compile of a numba_cnn
    function, and puts Numba's back when it ends (also when it raises)."""

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
            compiler.compile_ir = _compile_ir

    def on_end(self, ev):
        if self._ours(ev):
            self.depth -= 1
            if self.depth == 0:
                _LIBRARY.finalize = _NUMBA_FINALIZE
                compiler.compile_ir = _NUMBA_COMPILE_IR
                _bodies_to_link.clear()


def supported():
    """Whether this Numba is one the hook was verified with, and the user did not turn it off."""
    version = tuple(int(part) for part in numba.__version__.split(".")[:2])
    return (version in VERIFIED_NUMBA and os.environ.get("NUMBA_CNN_LINK_ONCE", "1") != "0"
            and all(hasattr(_LIBRARY, name) for name in (
                "_optimize_final_module", "_finalize_final_module", "_finalized"))
            and all(hasattr(compiler.Flags, name) for name in (
                "no_compile", "no_cpython_wrapper", "no_cfunc_wrapper")))


LISTENER = _OurCompiles()
if supported():
    event.register("numba:compile", LISTENER)
