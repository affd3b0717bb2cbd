"""The demo: train a small CNN on real handwritten digits with numba_cnn, then time one
training step against the same network built from the im2col NumPy layers.

    numba-cnn demo [--epochs 10] [--batch-size 32] [--threads N] [--seed 0] [--dtype float32]
                   [--mnist-dir DIR] [--subset N]

Data: scikit-learn's ``load_digits`` (1,797 8x8 images, 0-16 grey levels), upsampled 3x to 24x24
and framed with 2 blank pixels to 28x28 as MNIST digits are; a fixed stratified split (360 test
images) that does not depend on ``--seed``. ``--mnist-dir`` trains on MNIST idx files instead
(``train-images-idx3-ubyte`` etc., optionally ``.gz``).

Network: the Keras MNIST example's stack, conv3x3(32)-relu-maxpool2-conv3x3(64)-relu-maxpool2-
dense(10)-softmax (without its dropout), built from ``numba_cnn.compat``: the "Deep Learning from
Scratch" layers whose convolution and pooling run on numba_cnn's kernels. Adam (lr 1e-3),
He-normal initialisation. Everything random comes from ``np.random.default_rng(seed)``, so a seed
gives the same losses on every run.

Needs the ``demo`` extra (``pip install "numba-cnn[demo]"``: scikit-learn and tqdm); with
``--mnist-dir`` scikit-learn is not needed.
"""
import argparse
import gzip
import math
import os
import struct
import sys
import time

import numba
import numpy as np

from . import compat, im2col

DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 32
DIGITS_TEST_SIZE = 360
DIGITS_UPSAMPLE = 3
DIGITS_BORDER = 2
LEARNING_RATE = 1e-3
EVAL_BATCH = 500


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

# IDX type codes (http://yann.lecun.com/exdb/mnist/): all big-endian
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Read an IDX file (MNIST's format, gzipped if the name ends in ``.gz``) into an array of
    the file's shape and element type, in native byte order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (expected the magic bytes 00 00 <type> "
                         f"<ndim>, got {data[:4].hex(' ')})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(shape)
    if len(data) != header + count * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes of "
                         f"data) but the file holds {len(data) - header} bytes after it")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte", "t_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "t_test": "t10k-labels-idx1-ubyte",
}


def _find_mnist_file(directory, stem):
    # the files are also distributed as "train-images.idx3-ubyte"
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (name, name + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory}; --mnist-dir needs "
                            f"{', '.join(MNIST_FILES.values())} (each optionally .gz)")


def load_mnist(directory):
    """MNIST from its four idx files: (x_train, t_train, x_test, t_test), images as float64
    (N, 1, 28, 28) in [0, 1], labels int64."""
    arrays = {key: read_idx(_find_mnist_file(directory, stem))
              for key, stem in MNIST_FILES.items()}
    images = {key: (arrays[key][:, None] / 255.0) for key in ("x_train", "x_test")}
    return (images["x_train"], arrays["t_train"].astype(np.int64), images["x_test"],
            arrays["t_test"].astype(np.int64))


def load_digits_28():
    """scikit-learn's digits as MNIST-sized images: (x_train, t_train, x_test, t_test), images
    float64 (N, 1, 28, 28) in [0, 1] (8x8 pixels repeated 3x3, 2 blank pixels around)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError('the demo needs scikit-learn for its data set: pip install '
                          '"numba-cnn[demo]" (or train on MNIST files with --mnist-dir)') from None
    digits = load_digits()
    images = digits.images / 16.0
    images = images.repeat(DIGITS_UPSAMPLE, axis=1).repeat(DIGITS_UPSAMPLE, axis=2)
    border = DIGITS_BORDER
    images = np.pad(images, ((0, 0), (border, border), (border, border)))[:, None]
    x_train, x_test, t_train, t_test = train_test_split(
        images, digits.target.astype(np.int64), test_size=DIGITS_TEST_SIZE, random_state=0,
        stratify=digits.target)
    return x_train, t_train, x_test, t_test


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

class Im2colConvolution(compat.Convolution):
    """The book's im2col Convolution (``numba_cnn.im2col``): the baseline the demo times."""

    def forward(self, x):
        out, col = im2col.conv2d(x, self.W, self.b, self.stride, self.pad)
        self._saved = (x.shape, col, self.W)
        return out

    def backward(self, dout):
        x_shape, col, weight = self._saved
        dx, self.dW, self.db = im2col.conv2d_backward(dout, x_shape, col, weight, self.stride,
                                                      self.pad)
        return dx


class Im2colPooling(compat.Pooling):
    """The book's im2col max Pooling (``numba_cnn.im2col``): the baseline the demo times."""

    def forward(self, x):
        out, self._saved = im2col.pool2d(x, self.pool_h, self.pool_w, self.stride, self.pad)
        return out

    def backward(self, dout):
        return im2col.pool2d_backward(dout, self._saved, self.pool_h, self.pool_w, self.stride,
                                      self.pad)


def init_params(input_shape, classes, rng, dtype=np.float32, filters=(32, 64)):
    """He-normal weights (std sqrt(2 / fan_in)) and zero biases for ``ConvNet``."""
    channels, height, width = input_shape
    shapes = {"W1": (filters[0], channels, 3, 3), "W2": (filters[1], filters[0], 3, 3)}
    for _ in range(2):  # conv 3x3 (valid), then max pool 2x2 / 2
        height, width = (height - 2) // 2, (width - 2) // 2
    shapes["W3"] = (filters[1] * height * width, classes)
    params = {}
    for index, key in enumerate(("W1", "W2", "W3"), start=1):
        shape = shapes[key]
        fan_in = math.prod(shape[1:]) if len(shape) == 4 else shape[0]
        params[key] = (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)
        params[f"b{index}"] = np.zeros(shape[0] if len(shape) == 4 else shape[1], dtype)
    return params


class ConvNet:
    """conv3x3-relu-pool-conv3x3-relu-pool-affine-softmax from the book's layer classes;
    ``convolution`` and ``pooling`` choose the implementation (numba_cnn or im2col)."""

    def __init__(self, params, convolution=compat.Convolution, pooling=compat.Pooling):
        self.params = params
        self.layers = [
            convolution(params["W1"], params["b1"]), compat.Relu(), pooling(2, 2, stride=2),
            convolution(params["W2"], params["b2"]), compat.Relu(), pooling(2, 2, stride=2),
            compat.Affine(params["W3"], params["b3"]),
        ]
        self._weighted = {1: self.layers[0], 2: self.layers[3], 3: self.layers[6]}
        self.last_layer = compat.SoftmaxWithLoss()

    def predict(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def gradient(self, x, t):
        """Forward and backward on a batch: (loss, correct predictions, grads by param name)."""
        scores = self.predict(x)
        loss = self.last_layer.forward(scores, t)
        dout = self.last_layer.backward()
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        grads = {}
        for index, layer in self._weighted.items():
            grads[f"W{index}"], grads[f"b{index}"] = layer.dW, layer.db
        return float(loss), int(np.sum(scores.argmax(axis=1) == t)), grads

    def accuracy(self, x, t):
        correct = sum(int(np.sum(self.predict(x[i:i + EVAL_BATCH]).argmax(axis=1)
                                 == t[i:i + EVAL_BATCH])) for i in range(0, len(x), EVAL_BATCH))
        return correct / len(x)


class Adam:
    """Adam (Kingma & Ba) updating the parameter arrays in place."""

    def __init__(self, lr=LEARNING_RATE, beta1=0.9, beta2=0.999, eps=1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.steps, self.m, self.v = 0, {}, {}

    def update(self, params, grads):
        self.steps += 1
        scale = self.lr * math.sqrt(1 - self.beta2 ** self.steps) / (1 - self.beta1 ** self.steps)
        for key, param in params.items():
            grad = grads[key]
            m = self.m.setdefault(key, np.zeros_like(param))
            v = self.v.setdefault(key, np.zeros_like(param))
            m += (1 - self.beta1) * (grad - m)
            v += (1 - self.beta2) * (grad * grad - v)
            param -= (scale * m / (np.sqrt(v) + self.eps)).astype(param.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Training and timing
# ---------------------------------------------------------------------------------------------

def _progress_bar(total, description):
    try:
        from tqdm import tqdm
    except ImportError:
        raise ImportError('the demo\'s progress bar needs tqdm: pip install "numba-cnn[demo]" '
                          '(or pass progress=False)') from None
    return tqdm(total=total, desc=description, unit="batch")


def train(net, x_train, t_train, x_test, t_test, epochs, batch_size, rng, progress=True):
    """Mini-batch Adam over shuffled batches; returns the mean training loss of each epoch."""
    optimizer = Adam()
    batches = math.ceil(len(x_train) / batch_size)
    epoch_losses = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        bar = _progress_bar(batches, f"epoch {epoch}/{epochs}") if progress else None
        loss_sum = correct = seen = 0
        for step in range(batches):
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss, batch_correct, grads = net.gradient(x_train[batch], t_train[batch])
            optimizer.update(net.params, grads)
            loss_sum += loss * len(batch)
            correct += batch_correct
            seen += len(batch)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                                refresh=False)
                bar.update()
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                            test_acc=f"{net.accuracy(x_test, t_test):.3f}")
            bar.close()
        epoch_losses.append(loss_sum / seen)
    return epoch_losses


def _step_seconds(net, x, t, repeats=3):
    """Best of ``repeats`` forward+backward+update steps on one batch (after one warm-up)."""
    optimizer = Adam()
    best = math.inf
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        _, _, grads = net.gradient(x, t)
        optimizer.update(net.params, grads)
        if repeat:
            best = min(best, time.perf_counter() - start)
    return best


def run(epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH_SIZE, threads=None, seed=0,
        mnist_dir=None, subset=None, dtype="float32", progress=True, compare=True, out=None):
    """Train the demo network, test it and time it against the im2col layers.

    Args:
        epochs, batch_size, seed, mnist_dir, subset, dtype: as the command-line options.
        threads: ``numba.set_num_threads`` (None: leave Numba's setting).
        progress: show a tqdm progress bar (on stderr) per epoch.
        compare: time one training step with numba_cnn and with the im2col NumPy layers.
        out: where the report goes (default: ``sys.stdout``).

    Returns:
        dict with ``epoch_losses`` (mean training loss of each epoch), ``test_accuracy``,
        ``train_seconds`` and, when comparing, ``step_seconds``, ``im2col_step_seconds`` and
        ``speedup``.
    """
    def say(text=""):
        print(text, file=sys.stdout if out is None else out, flush=True)

    if threads is not None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"threads must be in [1, {numba.config.NUMBA_NUM_THREADS}] (the "
                             f"cores Numba can use here), got {threads}")
        numba.set_num_threads(threads)
    dtype = np.dtype(dtype)
    if mnist_dir is not None:
        x_train, t_train, x_test, t_test = load_mnist(mnist_dir)
        source = f"MNIST files in {mnist_dir}"
    else:
        x_train, t_train, x_test, t_test = load_digits_28()
        source = "scikit-learn digits, 8x8 -> 28x28"
    if subset is not None:
        x_train, t_train = x_train[:subset], t_train[:subset]
    x_train, x_test = x_train.astype(dtype), x_test.astype(dtype)
    classes = int(max(t_train.max(), t_test.max())) + 1
    rng = np.random.default_rng(seed)
    params = init_params(x_train.shape[1:], classes, rng, dtype)
    net = ConvNet(params)
    say(f"numba_cnn demo: {len(x_train)} training, {len(x_test)} test images ({source})")
    say(f"network: conv3x3({params['W1'].shape[0]})-relu-maxpool2-"
        f"conv3x3({params['W2'].shape[0]})-relu-maxpool2-dense({classes}), "
        f"{sum(p.size for p in params.values()):,} parameters")
    say(f"training: Adam, batch {batch_size}, {epochs} epoch{'s' * (epochs != 1)}, "
        f"{dtype.name}, {numba.get_num_threads()} Numba threads, seed {seed}")
    say("The first run compiles the kernels (tens of seconds); later runs load them from "
        "Numba's cache.")
    start = time.perf_counter()
    net.gradient(x_train[:2], t_train[:2])  # compiles or loads every kernel; no update
    say(f"kernels ready in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    epoch_losses = train(net, x_train, t_train, x_test, t_test, epochs, batch_size, rng,
                         progress)
    train_seconds = time.perf_counter() - start
    accuracy = net.accuracy(x_test, t_test)
    say(f"test accuracy: {100 * accuracy:.2f}% ({round(accuracy * len(x_test))}/{len(x_test)}), "
        f"training took {train_seconds:.1f} s")
    result = {"epoch_losses": epoch_losses, "test_accuracy": accuracy,
              "train_seconds": train_seconds}
    if compare:
        x, t = x_train[:batch_size], t_train[:batch_size]
        ours = _step_seconds(ConvNet({k: v.copy() for k, v in params.items()}), x, t)
        baseline = _step_seconds(ConvNet({k: v.copy() for k, v in params.items()},
                                         Im2colConvolution, Im2colPooling), x, t)
        say(f"one training step (forward + backward + Adam, batch {len(x)}, best of 3):\n"
            f"  numba_cnn {ours * 1e3:.1f} ms, im2col NumPy layers {baseline * 1e3:.1f} ms: "
            f"{baseline / ours:.1f}x faster")
        result.update(step_seconds=ours, im2col_step_seconds=baseline, speedup=baseline / ours)
    return result


def build_parser(prog="numba-cnn demo"):
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a small CNN with numba_cnn on handwritten digits and compare one "
                    "training step with the im2col NumPy layers of \"Deep Learning from Scratch\".",
        epilog="The first run compiles the kernels (tens of seconds); later runs load them from "
               "Numba's cache.")
    parser.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS,
                        help=f"passes over the training set (default {DEFAULT_EPOCHS})")
    parser.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per training step (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="Numba threads (default: Numba's, all cores)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialisation and the shuffling (default 0)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="parameters and images (default float32; the book uses float64)")
    parser.add_argument("--mnist-dir", metavar="DIR",
                        help="train on MNIST idx files in DIR (train-images-idx3-ubyte[.gz], "
                             "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                             "t10k-labels-idx1-ubyte) instead of scikit-learn's digits")
    parser.add_argument("--subset", type=_positive_int, metavar="N",
                        help="train on the first N training images only (quick runs)")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip timing the im2col NumPy layers")
    return parser


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None, prog="numba-cnn demo"):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads > numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads {args.threads}: Numba can use at most "
                     f"{numba.config.NUMBA_NUM_THREADS} threads here (NUMBA_NUM_THREADS)")
    run(epochs=args.epochs, batch_size=args.batch_size, threads=args.threads, seed=args.seed,
        mnist_dir=args.mnist_dir, subset=args.subset, dtype=args.dtype, compare=args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m numba_cnn.demo"))
