"""Shared pieces of the asv suite: the DESIGN.md shapes, seeded cached data, import guards, and the
``Benchmark`` base class.

History across commits is the point of this suite, so two rules hold everywhere:

- Every ``numba_cnn`` name is looked up through ``need`` / ``has``, never imported at module
  level: at a commit where a name does not exist yet, the benchmark's ``setup`` raises
  ``NotImplementedError`` and asv records it as skipped instead of failing the whole suite.
- The parameter grids are defined here, not imported from ``numba_cnn.bench``: asv discovers the
  suite once and re-imports it in the environment of every commit, so the grids must be the same
  at every commit. They mirror ``numba_cnn.bench.CASES`` / ``POOL_CASES`` (the one-run
  comparison) and the "Performance protocol" of DESIGN.md.

Each implementation of an operation on one case is a ``Runner``: its ``forward`` and
``forward_backward`` closures are built (and compiled, for Numba) once per benchmark process by
the benchmark method's own setup hook (``warms``), which asv runs after the class ``setup``. A
method therefore compiles and touches only the implementation it measures: that keeps Numba's
compile time out of ``time_`` methods and the other implementation's memory out of ``peakmem_``.
"""
import functools
import importlib
import os

import numpy as np

# name: (N, C, H, W, F, kernel, stride, padding, dilation), float32 unless named in FLOAT64_CASES
CONV_CASES = {
    "mnist1": (64, 1, 28, 28, 32, 3, 1, 0, 1),     # Keras MNIST example, first layer
    "mnist2": (64, 32, 13, 13, 64, 3, 1, 0, 1),    # Keras MNIST example, second layer
    "z2dl": (100, 1, 28, 28, 30, 5, 1, 0, 1),      # Deep Learning from Scratch SimpleConvNet
    "res56": (8, 64, 56, 56, 64, 3, 1, 1, 1),
    "res28": (8, 128, 28, 28, 128, 3, 1, 1, 1),
    "res14": (8, 256, 14, 14, 256, 3, 1, 1, 1),
    "dil56": (8, 64, 56, 56, 64, 3, 1, 2, 2),
}
# conv2d cases also measured in float64 (the others raise NotImplementedError for float64)
FLOAT64_CASES = ("mnist2", "res28")
DTYPES = ["float32", "float64"]

# name: (N, C_in, H, W, C_out, kernel, stride, padding); weight (C_in, C_out, k, k)
CONV_TRANSPOSE_CASES = {
    "dcgan": (16, 128, 16, 16, 64, 4, 2, 1),       # -> (16, 64, 32, 32)
    "ct28": (8, 64, 28, 28, 64, 3, 1, 1),          # stride 1 -> (8, 64, 28, 28)
}

# name: (mode, kernel, stride, padding) on a POOL_INPUT float32 input
POOL_CASES = {
    "maxpool2": ("max", 2, 2, 0),
    "maxpool3": ("max", 3, 2, 1),
    "avgpool2": ("avg", 2, 2, 0),
}
POOL_INPUT = (32, 64, 56, 56)


class Benchmark:
    """Base of every benchmark class (timing knobs only; no behaviour).

    asv re-runs ``setup`` before every sample, so setups here are idempotent and cheap after the
    first call (runners are cached per process). ``repeat`` = (min samples, max samples, max
    seconds) per round keeps a full ``asv run`` of one commit within about ten minutes on two
    cores; every sample is a single call (asv uses number = 1 when setup hooks exist).
    """
    rounds = 2
    repeat = (2, 10, 2.0)
    warmup_time = 0.0   # setup already ran each call once
    timeout = 180


# ---------------------------------------------------------------------------------------------
# Import guards
# ---------------------------------------------------------------------------------------------

# Set by .ci/asv-smoke: the code under test is the current one, where every name exists, so a
# missing name or a failing import is an error there rather than a skip.
STRICT = os.environ.get("NUMBA_CNN_ASV_STRICT", "0") == "1"


def _module(module_name):
    try:
        return importlib.import_module(module_name)
    except Exception:  # noqa: BLE001  (an older commit may not even import)
        if STRICT:
            raise
        return None


def has(module_name, *names):
    """True if ``module_name`` imports and defines every one of ``names``."""
    module = _module(module_name)
    return module is not None and all(hasattr(module, name) for name in names)


def need(module_name, *names):
    """Return ``module_name`` if it defines ``names``; else raise NotImplementedError (asv skip)
    or, under NUMBA_CNN_ASV_STRICT=1, AttributeError (a failure)."""
    if not has(module_name, *names):
        message = f"{module_name} has no {', '.join(names) or 'module'} at this commit"
        raise AttributeError(message) if STRICT else NotImplementedError(message)
    return _module(module_name)


def need_dtype(case, dtype, float64_cases=FLOAT64_CASES):
    if dtype == "float64" and case not in float64_cases:
        raise NotImplementedError(f"{case} is measured in float32 only")


# ---------------------------------------------------------------------------------------------
# Seeded, cached data
# ---------------------------------------------------------------------------------------------

def out_size(size, kernel, stride, pad, dilation=1):
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


@functools.lru_cache(maxsize=None)
def conv_arrays(case, dtype):
    """(x, weight, bias, grad_out) for CONV_CASES[case], seeded; callers must not modify them."""
    n, c, h, w, f, k, s, p, d = CONV_CASES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = (rng.standard_normal((f, c, k, k)) / np.sqrt(c * k * k)).astype(dtype)
    bias = rng.standard_normal(f).astype(dtype)
    grad_out = rng.standard_normal((n, f, out_size(h, k, s, p, d),
                                    out_size(w, k, s, p, d))).astype(dtype)
    return x, weight, bias, grad_out


@functools.lru_cache(maxsize=None)
def conv_transpose_arrays(case, dtype):
    """(x, weight, bias, grad_out) for CONV_TRANSPOSE_CASES[case], seeded."""
    n, c_in, h, w, c_out, k, s, p = CONV_TRANSPOSE_CASES[case]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    weight = (rng.standard_normal((c_in, c_out, k, k)) / np.sqrt(c_in * k * k)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    out_h, out_w = (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
    grad_out = rng.standard_normal((n, c_out, out_h, out_w)).astype(dtype)
    return x, weight, bias, grad_out


@functools.lru_cache(maxsize=None)
def pool_arrays(case, dtype):
    """(x, grad_out) for POOL_CASES[case] on POOL_INPUT, seeded."""
    _, k, s, p = POOL_CASES[case]
    n, c, h, w = POOL_INPUT
    rng = np.random.default_rng(2)
    x = rng.standard_normal(POOL_INPUT).astype(dtype)
    grad_out = rng.standard_normal((n, c, out_size(h, k, s, p), out_size(w, k, s, p))).astype(dtype)
    return x, grad_out


@functools.lru_cache(maxsize=None)
def mnist_batch(batch=64, dtype="float32"):
    """(x, labels): a seeded (batch, 1, 28, 28) image batch in [0, 1) and integer labels 0..9."""
    rng = np.random.default_rng(3)
    return (rng.random((batch, 1, 28, 28)).astype(dtype),
            rng.integers(0, 10, size=batch))


# ---------------------------------------------------------------------------------------------
# Runners: one implementation of one op on one case
# ---------------------------------------------------------------------------------------------

class Runner:
    """Lazily built ``forward`` / ``forward_backward`` closures of one implementation.

    ``build()`` returns the two closures, raising NotImplementedError when the implementation is
    missing at this commit. ``warm()`` builds them and calls each once (Numba compiles, pages are
    touched); later calls are no-ops, so asv's per-sample setup stays cheap.
    """

    def __init__(self, build):
        self._build = build
        self.forward = self.forward_backward = None

    def warm(self):
        if self.forward is None:
            forward, forward_backward = self._build()
            forward_backward()
            forward()
            self.forward, self.forward_backward = forward, forward_backward
        return self


def runner_factory(build):
    """Decorate ``build(impl, *params) -> (forward, forward_backward)`` into a cached factory of
    ``Runner`` objects: one per (impl, *params) per process."""
    @functools.lru_cache(maxsize=None)
    def factory(impl, *params):
        return Runner(functools.partial(build, impl, *params))
    factory.__name__ = build.__name__
    factory.__doc__ = build.__doc__
    return factory


def warms(factory, impl):
    """Give a benchmark method its own setup hook: build and warm ``factory(impl, *params)``.

    asv runs a method's ``setup`` attribute after the class ``setup`` (and skips the method when
    it raises NotImplementedError), so a method compiles only what it measures.
    """
    def hook(*params):
        factory(impl, *params).warm()

    def mark(method):
        method.setup = hook
        return method
    return mark


# ---------------------------------------------------------------------------------------------
# im2col NumPy baseline of transposed convolution (numba_cnn.im2col has conv2d only)
# ---------------------------------------------------------------------------------------------

def im2col_conv_transpose2d(im2col, x, weight, bias, stride, pad):
    """Transposed convolution as the input gradient of a conv2d: one matmul, then col2im.

    weight (C_in, C_out, k, k) is the weight of a conv2d from C_out to C_in channels, so the
    columns ``x @ weight.reshape(C_in, -1)`` are exactly that conv2d's input-gradient columns.
    """
    n, c_in, h, w = x.shape
    _, c_out, k, _ = weight.shape
    out_h, out_w = (h - 1) * stride - 2 * pad + k, (w - 1) * stride - 2 * pad + k
    columns = x.transpose(0, 2, 3, 1).reshape(-1, c_in) @ weight.reshape(c_in, -1)
    y = im2col.col2im(columns, (n, c_out, out_h, out_w), k, k, stride, pad)
    if bias is not None:
        y = y + bias[:, None, None]
    return y


def im2col_conv_transpose2d_backward(im2col, grad_out, x, weight, stride, pad):
    """(grad_x, grad_weight, grad_bias) of ``im2col_conv_transpose2d``: a conv2d of grad_out."""
    n, c_in, h, w = x.shape
    k = weight.shape[2]
    columns = im2col.im2col(grad_out, k, k, stride, pad)            # (N*H*W, C_out*k*k)
    grad_x = (columns @ weight.reshape(c_in, -1).T).reshape(n, h, w, c_in).transpose(0, 3, 1, 2)
    grad_weight = (x.transpose(0, 2, 3, 1).reshape(-1, c_in).T @ columns).reshape(weight.shape)
    return grad_x, grad_weight, grad_out.sum(axis=(0, 2, 3))
