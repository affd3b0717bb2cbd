"""numba_cnn._kernels._linking: while our parallel kernels compile, their loop bodies and the
wrapper libraries around them get no machine code of their own; other code compiles as Numba
does it."""
import json
import os
import subprocess
import sys

SCRIPT = """
import json
import numba
import numpy as np
from numba.core import codegen, compiler
from numba_cnn._kernels import _linking, elementwise

# every library Numba generates machine code for, by name
generated = []
numba_generate = codegen.JITCodeLibrary._finalize_specific
def record(library):
    generated.append(library.name)
    numba_generate(library)
codegen.JITCodeLibrary._finalize_specific = record

x = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
out, mask = np.empty_like(x), np.empty(x.shape, dtype=bool)
elementwise.relu_forward(x, out, mask)
ours = list(generated)
generated.clear()

@numba.njit(parallel=True)
def users_kernel(x, out):
    for i in numba.prange(x.shape[0]):
        out[i] = 2 * x[i]

users_out = np.empty_like(x)
users_kernel(x, users_out)
print(json.dumps({
    "ours": ours, "users": list(generated), "supported": _linking.supported(),
    "ours_right": bool(np.array_equal(out, np.where(x <= 0, 0, x))
                       and np.array_equal(mask, x <= 0)),
    "users_right": bool(np.array_equal(users_out, 2 * x)),
    "ours_loaded": sum(elementwise.relu_forward.stats.cache_hits.values()),
    "numba_finalize_back": codegen.CPUCodeLibrary.finalize is _linking._NUMBA_FINALIZE,
    "numba_compile_ir_back": compiler.compile_ir is _linking._NUMBA_COMPILE_IR}))
"""


def _run(cache_dir, **environment):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **environment)
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wrappers(names):
    return [name for name in names if name == "parallelgufuncwrapper"
            or name.startswith("<numba.np.ufunc.wrappers._GufuncWrapper")]


def _bodies(names):
    return [name for name in names if name.startswith("__numba_parfor_gufunc_")]


def test_our_parallel_kernels_generate_no_body_or_wrapper_code_and_others_are_untouched(
        tmp_path):
    compiled = _run(tmp_path / "cache")
    assert compiled["ours_right"] and compiled["users_right"]
    assert compiled["numba_finalize_back"] and compiled["numba_compile_ir_back"]
    assert any("relu_forward" in name for name in compiled["ours"]), compiled["ours"]
    # a user's parallel function, compiled after ours, goes through Numba's own lowering and
    # finalize
    assert len(_wrappers(compiled["users"])) == 2, compiled["users"]
    assert len(_bodies(compiled["users"])) == 1, compiled["users"]
    if compiled["supported"]:
        assert _wrappers(compiled["ours"]) == [] and _bodies(compiled["ours"]) == [], (
            compiled["ours"])
    else:  # a Numba the hook was not verified with: as Numba does it
        assert len(_wrappers(compiled["ours"])) == 2, compiled["ours"]
        assert len(_bodies(compiled["ours"])) == 1, compiled["ours"]
    # the kernel compiled that way is cached, and a second process computes the same with it
    loaded = _run(tmp_path / "cache")
    assert loaded["ours_right"] and loaded["users_right"]
    assert compiled["ours_loaded"] == 0 and loaded["ours_loaded"] == 1


def test_numba_cnn_link_once_0_turns_the_hook_off(tmp_path):
    compiled = _run(tmp_path, NUMBA_CNN_LINK_ONCE="0")
    assert not compiled["supported"]
    assert compiled["ours_right"]
    assert len(_wrappers(compiled["ours"])) == 2, compiled["ours"]
    assert len(_bodies(compiled["ours"])) == 1, compiled["ours"]
