"""Determinism and thread safety of the kernels.

Every output element (and every weight-gradient entry) is reduced by exactly one task in a fixed
order, so results must be bitwise identical across repeated calls, across Numba thread counts,
and when several Python threads call the library at once.
"""
import threading

import numba
import numpy as np
import pytest

from numba_cnn import _args, _conv_plan, _threads
from numba_cnn import functional as F
from numba_cnn.layers import AvgPool2D, Conv2D, ConvTranspose2D, MaxPool2D


@pytest.fixture(autouse=True)
def _parallel_even_when_small(monkeypatch):
    """The shapes here are small, which would run on one thread (numba_cnn._threads); these
    tests are about the parallel kernels, so every call shares the work."""
    monkeypatch.setattr(_threads, "SERIAL_WORK", 0)


def test_small_calls_run_on_one_thread_and_restore_the_setting(monkeypatch):
    monkeypatch.setattr(_threads, "SERIAL_WORK", 100)
    threads = numba.get_num_threads()
    with _threads.threads_for(99):
        inside = numba.get_num_threads()
    assert inside == 1 and numba.get_num_threads() == threads
    with _threads.threads_for(100):
        assert numba.get_num_threads() == threads
    with pytest.raises(RuntimeError):
        with _threads.threads_for(1):
            raise RuntimeError("inside")
    assert numba.get_num_threads() == threads


def _conv_case(rng, dtype):
    x = rng.standard_normal((3, 5, 11, 9)).astype(dtype)
    w = rng.standard_normal((7, 5, 3, 2)).astype(dtype)
    g = rng.standard_normal((3, 7, 6, 5)).astype(dtype)
    return x, w, g


def _conv_results(x, w, g):
    y = F.conv2d(x, w, stride=2, padding=1, dilation=1)
    return (y,) + F.conv2d_backward(g, x, w, stride=2, padding=1)


def _pool_results(x):
    y, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    avg = F.avg_pool2d(x, 2)
    return (y, indices, F.max_pool2d_backward(np.ones_like(y), indices, x.shape), avg,
            F.avg_pool2d_backward(np.ones_like(avg), x.shape, 2))


def _assert_bitwise_equal(first, second):
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_repeated_calls_are_bitwise_identical(rng, dtype):
    x, w, g = _conv_case(rng, dtype)
    _assert_bitwise_equal(_conv_results(x, w, g), _conv_results(x, w, g))
    _assert_bitwise_equal(_pool_results(x), _pool_results(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
# the small case runs on one thread whatever the setting; the large ones (2.6M multiply-adds)
# on both layouts, whose task splits follow the thread count; the wide one's channel-blocked
# weight gradient sums each half of the batch apart (ChannelBlockedPlan.batch_parts)
@pytest.mark.parametrize("shape, channel_blocked", [("small", None), ("large", False),
                                                    ("large", True), ("wide", True)],
                         ids=["small", "large_grid", "large_channel_blocked",
                              "wide_channel_blocked"])
def test_results_do_not_depend_on_the_thread_count(rng, dtype, shape, channel_blocked,
                                                   monkeypatch):
    monkeypatch.setattr(_conv_plan, "FORCE_CHANNEL_BLOCKED", channel_blocked)
    if shape == "small":
        x, w, g = _conv_case(rng, dtype)
    else:
        channels, size = (32, 12) if shape == "large" else (16, 24)
        x = rng.standard_normal((2, channels, size, size)).astype(dtype)
        w = rng.standard_normal((channels, channels, 3, 3)).astype(dtype)
        g = rng.standard_normal((2, channels, size // 2, size // 2)).astype(dtype)
        geometry = _args.conv2d_geometry(x.shape, w.shape, 2, 1, 1, 1, "test")
        parts = _conv_plan.ChannelBlockedPlan(geometry, x.itemsize).batch_parts
        assert parts == (2 if shape == "wide" else 1)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = _conv_results(x, w, g) + _pool_results(x)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        several = _conv_results(x, w, g) + _pool_results(x)
    finally:
        numba.set_num_threads(threads)
    _assert_bitwise_equal(single, several)


def _run_in_threads(make_step, count):
    """Call ``make_step(index)()`` 5 times in each of ``count`` threads at once; the step is made
    inside its thread (so per-thread state, such as layer instances, stays there). Returns each
    thread's last result."""
    results = [None] * count
    errors = []

    def work(index):
        try:
            step = make_step(index)
            for _ in range(5):
                results[index] = step()
        except Exception as error:  # reported below, a thread cannot fail the test itself
            errors.append(error)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(worker.is_alive() for worker in workers), "a worker thread hung"
    assert not errors, errors
    return results


def test_concurrent_python_threads_match_serial_calls(rng):
    cases = [_conv_case(np.random.default_rng(seed), np.float32) for seed in range(4)]
    expected = [_conv_results(*case) + _pool_results(case[0]) for case in cases]
    results = _run_in_threads(
        lambda i: lambda: _conv_results(*cases[i]) + _pool_results(cases[i][0]), len(cases))
    for got, want in zip(results, expected):
        _assert_bitwise_equal(got, want)


def _layer_stack(seed):
    """A small network of separate layer instances (their own parameters and saved state)."""
    rng = np.random.default_rng(seed)
    return [Conv2D(3, 6, 3, padding=1, rng=rng), MaxPool2D(2), ConvTranspose2D(6, 4, 3, stride=2,
            padding=1, output_padding=1, rng=rng), AvgPool2D(3, 2, 1)]


def _layer_step(layers, x):
    """Forward through the stack, backward with a fixed gradient; outputs and all gradients."""
    out = x
    for layer in layers:
        out = layer.forward(out)
    grad = np.cos(np.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    results = [out]
    for layer in reversed(layers):
        grad = layer.backward(grad)
        results.append(grad)
        results.extend(getattr(layer, "grads", {}).values())
    return results


def test_separate_layer_instances_in_concurrent_threads_match_serial_runs():
    inputs = [np.random.default_rng(10 + i).standard_normal((2, 3, 15, 13)).astype(np.float32)
              for i in range(4)]
    expected = [_layer_step(_layer_stack(i), inputs[i]) for i in range(4)]

    def make_step(index):
        layers = _layer_stack(index)  # each thread owns its instances
        return lambda: _layer_step(layers, inputs[index])

    results = _run_in_threads(make_step, 4)
    for got, want in zip(results, expected):
        assert len(got) == len(want)
        _assert_bitwise_equal(got, want)


def _threading_layer():
    F.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))  # starts Numba's threads
    return numba.threading_layer()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no os.fork on this platform")
def test_kernels_work_in_a_forked_child(rng):
    import os
    if _threading_layer() == "omp":
        pytest.skip("Numba runs on GNU OpenMP, which is not fork-safe: install the tbb extra "
                    "(pip install 'numba-cnn[tbb]')")
    x, w, g = _conv_case(rng, np.float32)
    expected = _conv_results(x, w, g)
    pid = os.fork()
    if pid == 0:  # the child: exit code says whether it reproduced the parent's results
        try:
            same = all(np.array_equal(a, b) for a, b in zip(_conv_results(x, w, g), expected))
            os._exit(0 if same else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
