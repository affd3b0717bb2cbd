"""One SGD training step (forward, softmax cross-entropy, backward, update) of the Keras MNIST
example network on a 64x1x28x28 float32 batch:

    Conv2D(1, 32, 3) - ReLU - MaxPool2D(2) - Conv2D(32, 64, 3) - ReLU - MaxPool2D(2)
    - Dense(1600, 10)

built from ``numba_cnn.layers`` beside the same network on the im2col NumPy layers. ReLU, the
dense layer and the loss are plain NumPy in both, so the difference is the conv and pool layers.
"""
import numpy as np

from .common import Benchmark, mnist_batch, need, runner_factory, warms

LEARNING_RATE = 0.01


class _Relu:
    params = grads = {}

    def forward(self, x):
        self._mask = x > 0
        return x * self._mask

    def backward(self, dout):
        return dout * self._mask


class _Dense:
    """Flatten, then y = x @ W + b."""

    def __init__(self, fan_in, fan_out, rng):
        self.W = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        self.b = np.zeros(fan_out, np.float32)
        self.params = {"W": self.W, "b": self.b}

    def forward(self, x):
        self._shape = x.shape
        self._x = x.reshape(x.shape[0], -1)
        return self._x @ self.W + self.b

    def backward(self, dout):
        self.grads = {"W": self._x.T @ dout, "b": dout.sum(axis=0)}
        return (dout @ self.W.T).reshape(self._shape)


class _Im2colConv:
    """The im2col NumPy Convolution layer, with the same initial weights as ours."""

    def __init__(self, im2col, weight):
        self.im2col, self.W = im2col, weight.copy()
        self.b = np.zeros(weight.shape[0], weight.dtype)
        self.params = {"W": self.W, "b": self.b}

    def forward(self, x):
        y, self._col = self.im2col.conv2d(x, self.W, self.b)
        self._shape = x.shape
        return y

    def backward(self, dout):
        dx, dW, db = self.im2col.conv2d_backward(dout, self._shape, self._col, self.W)
        self.grads = {"W": dW, "b": db}
        return dx


class _Im2colMaxPool:
    params = grads = {}

    def __init__(self, im2col, size):
        self.im2col, self.size = im2col, size

    def forward(self, x):
        y, self._state = self.im2col.pool2d(x, self.size, self.size, self.size, 0, "max")
        return y

    def backward(self, dout):
        return self.im2col.pool2d_backward(dout, self._state, self.size, self.size, self.size, 0)


def _softmax_cross_entropy_grad(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(labels.size), labels] -= 1
    return probs / labels.size


@runner_factory
def training_runner(impl):
    """(forward, train_step) of the network built on ``impl``'s conv and pool layers."""
    layers = need("numba_cnn.layers", "Conv2D", "MaxPool2D")
    conv1 = layers.Conv2D(1, 32, 3, rng=0)
    conv2 = layers.Conv2D(32, 64, 3, rng=1)
    if impl == "numba_cnn":
        net = [conv1, _Relu(), layers.MaxPool2D(2), conv2, _Relu(), layers.MaxPool2D(2)]
    else:
        im2col = need("numba_cnn.im2col", "conv2d", "conv2d_backward", "pool2d",
                      "pool2d_backward")
        net = [_Im2colConv(im2col, conv1.W), _Relu(), _Im2colMaxPool(im2col, 2),
               _Im2colConv(im2col, conv2.W), _Relu(), _Im2colMaxPool(im2col, 2)]
    net.append(_Dense(64 * 5 * 5, 10, np.random.default_rng(2)))
    x, labels = mnist_batch()

    def forward():
        out = x
        for layer in net:
            out = layer.forward(out)
        return out

    def train_step():
        grad = _softmax_cross_entropy_grad(forward(), labels)
        for layer in reversed(net):
            grad = layer.backward(grad)
        for layer in net:
            for name, param in layer.params.items():
                param -= LEARNING_RATE * layer.grads[name]
    return forward, train_step


class TrainingStep(Benchmark):
    """Inference forward pass and full SGD training step of the MNIST example network."""

    def setup(self):
        self.ours = training_runner("numba_cnn")
        self.im2col = training_runner("im2col")

    @warms(training_runner, "numba_cnn")
    def time_forward_numba_cnn(self):
        self.ours.forward()

    @warms(training_runner, "im2col")
    def time_forward_im2col(self):
        self.im2col.forward()

    @warms(training_runner, "numba_cnn")
    def time_train_step_numba_cnn(self):
        self.ours.forward_backward()

    @warms(training_runner, "im2col")
    def time_train_step_im2col(self):
        self.im2col.forward_backward()

    @warms(training_runner, "numba_cnn")
    def peakmem_train_step_numba_cnn(self):
        self.ours.forward_backward()

    @warms(training_runner, "im2col")
    def peakmem_train_step_im2col(self):
        self.im2col.forward_backward()
