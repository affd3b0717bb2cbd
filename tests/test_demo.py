"""Tests of the demo (``numba_cnn.demo``) and the ``numba-cnn`` command (``numba_cnn.cli``).

The end-to-end runs are one epoch on a few hundred images (float32 kernels, which the other test
modules compile too). The scikit-learn digits runs skip when the ``demo`` extra is not installed;
the MNIST-file runs need neither scikit-learn nor tqdm.
"""
import gzip
import io
import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from numba_cnn import cli, demo


def _write_idx(path, array, type_code=0x08):
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    data = header + np.asarray(array, dtype[type_code]).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(data)


def _write_mnist(directory, rng, train=96, test=40, gz=True):
    """MNIST-shaped idx files whose images encode their label (a bright row), so that a short
    run can learn them."""
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        images[np.arange(count), 4 + 2 * labels, 4:24] = 255
        suffix = ".gz" if gz else ""
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


@pytest.mark.parametrize("type_code, dtype", [(0x08, np.uint8), (0x09, np.int8),
                                              (0x0B, np.int16), (0x0C, np.int32),
                                              (0x0D, np.float32), (0x0E, np.float64)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(type_code, dtype, suffix, tmp_path, rng):
    low = 0 if dtype == np.uint8 else -100
    array = (rng.integers(low, 100, (3, 4, 5)) * (1.25 if type_code > 0x0C else 1)).astype(dtype)
    path = tmp_path / f"data.idx{suffix}"
    _write_idx(path, array, type_code)
    result = demo.read_idx(path)
    assert result.shape == array.shape and result.dtype == dtype
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        demo.read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 1, 2]))
    with pytest.raises(ValueError, match="holds 2 bytes"):
        demo.read_idx(truncated)


def test_load_mnist(tmp_path, rng):
    _write_mnist(tmp_path, rng, train=5, test=3, gz=False)
    os.rename(tmp_path / "t10k-labels-idx1-ubyte", tmp_path / "t10k-labels.idx1-ubyte")
    x_train, t_train, x_test, t_test = demo.load_mnist(tmp_path)
    assert x_train.shape == (5, 1, 28, 28) and x_test.shape == (3, 1, 28, 28)
    assert x_train.dtype == np.float64 and 0 <= x_train.min() and x_train.max() == 1.0
    assert t_train.shape == (5,) and t_test.dtype == np.int64
    os.remove(tmp_path / "t10k-labels.idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        demo.load_mnist(tmp_path)


def test_demo_on_mnist_files_end_to_end(tmp_path, rng):
    _write_mnist(tmp_path, rng)
    out = io.StringIO()
    result = demo.run(epochs=1, batch_size=16, seed=1, mnist_dir=str(tmp_path), progress=False,
                      out=out)
    text = out.getvalue()
    assert "compiles the kernels (tens of seconds)" in text and "from Numba's cache" in text
    assert "96 training, 40 test images (MNIST files in" in text
    assert "test accuracy" in text and "faster" in text
    assert len(result["epoch_losses"]) == 1 and np.isfinite(result["epoch_losses"][0])
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert result["speedup"] == pytest.approx(result["im2col_step_seconds"]
                                              / result["step_seconds"])


def test_demo_is_deterministic_for_a_seed(tmp_path, rng):
    _write_mnist(tmp_path, rng)
    kwargs = dict(epochs=2, batch_size=16, mnist_dir=str(tmp_path), subset=64, progress=False,
                  compare=False, out=io.StringIO())
    first = demo.run(seed=3, **kwargs)
    threads = numba.get_num_threads()
    try:
        again = demo.run(seed=3, threads=1, **kwargs)  # and whatever the thread count
    finally:
        numba.set_num_threads(threads)
    other = demo.run(seed=4, **kwargs)
    assert first["epoch_losses"] == again["epoch_losses"]
    assert first["test_accuracy"] == again["test_accuracy"]
    assert first["epoch_losses"] != other["epoch_losses"]


def test_demo_on_digits_end_to_end(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    result = demo.run(epochs=1, subset=300, seed=0, compare=False)
    captured = capsys.readouterr()
    assert "300 training, 360 test images (scikit-learn digits" in captured.out
    assert "epoch 1/1" in captured.err and "loss=" in captured.err and "acc=" in captured.err
    assert result["test_accuracy"] > 0.5  # 66% with this seed; chance is 10%


def test_digits_data():
    pytest.importorskip("sklearn")
    x_train, t_train, x_test, t_test = demo.load_digits_28()
    assert x_train.shape == (1437, 1, 28, 28) and x_test.shape == (360, 1, 28, 28)
    assert np.all(x_train[:, :, :2] == 0) and np.all(x_train[:, :, -2:] == 0)
    assert x_train.max() == 1.0 and set(np.unique(t_test)) == set(range(10))
    again = demo.load_digits_28()
    np.testing.assert_array_equal(again[3], t_test)  # the split does not depend on any seed


def test_network_shapes_and_im2col_baseline_agree(rng):
    params = demo.init_params((1, 28, 28), 10, rng, np.float64)
    assert params["W3"].shape == (64 * 5 * 5, 10)  # the Keras MNIST example's flatten size
    x, t = rng.random((4, 1, 28, 28)), rng.integers(0, 10, 4)
    ours = demo.ConvNet({k: v.copy() for k, v in params.items()})
    baseline = demo.ConvNet(params, demo.Im2colConvolution, demo.Im2colPooling)
    loss, correct, grads = ours.gradient(x, t)
    loss_ref, correct_ref, grads_ref = baseline.gradient(x, t)
    assert loss == pytest.approx(loss_ref, rel=1e-12) and correct == correct_ref
    for key in grads:
        np.testing.assert_allclose(grads[key], grads_ref[key], rtol=1e-9, atol=1e-12)


def _capture_run(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run", lambda **kwargs: calls.append(kwargs))
    return calls


def test_cli_demo_arguments(monkeypatch):
    calls = _capture_run(monkeypatch)
    assert cli.main([]) == 0
    assert cli.main(["demo", "--epochs", "3", "--batch-size", "64", "--threads", "1", "--seed",
                     "7", "--mnist-dir", "/data/mnist", "--subset", "500", "--dtype", "float64",
                     "--no-compare"]) == 0
    assert cli.main(["--epochs", "2"]) == 0
    default, explicit, implicit = calls
    assert default == dict(epochs=demo.DEFAULT_EPOCHS, batch_size=demo.DEFAULT_BATCH_SIZE,
                           threads=None, seed=0, mnist_dir=None, subset=None, dtype="float32",
                           compare=True)
    assert explicit == dict(epochs=3, batch_size=64, threads=1, seed=7, mnist_dir="/data/mnist",
                            subset=500, dtype="float64", compare=False)
    assert implicit["epochs"] == 2


def test_cli_rejects_bad_arguments(monkeypatch, capsys):
    _capture_run(monkeypatch)
    for argv in (["--epochs", "0"], ["demo", "--threads", "x"], ["--threads", "100000"],
                 ["--unknown"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "numba-cnn bench" in capsys.readouterr().out


def test_cli_forwards_bench_arguments(monkeypatch):
    from numba_cnn import bench
    received = []
    monkeypatch.setattr(bench, "main", lambda argv: received.append(argv) or 0)
    assert cli.main(["bench", "--quick", "--cases", "mnist1", "--threads", "2"]) == 0
    assert received == [["--quick", "--cases", "mnist1", "--threads", "2"]]


def test_python_dash_m_numba_cnn():
    done = subprocess.run([sys.executable, "-m", "numba_cnn", "demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--mnist-dir" in done.stdout and "--threads" in done.stdout
