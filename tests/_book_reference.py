"""References of the published behaviour of the "Deep Learning from Scratch" layers, for
``tests/test_compat.py``.

Written from the book's description, not from its code: convolution and pooling use the
im2col functions of ``numba_cnn.im2col`` on float64 (the book's im2col always builds float64
matrices); the other layers are written from their formulas, several in a different but
equivalent form from the one ``numba_cnn.compat`` uses (softmax through log-sum-exp, the
closed-form batch-norm gradient, sigmoid through tanh), so the two are independent checks of each
other. Same class names, constructors and attributes as the book's layers.
"""
import numpy as np

from numba_cnn import im2col

BATCH_NORM_EPS = 1e-6
LOG_EPS = 1e-7


class Convolution:
    def __init__(self, W, b, stride=1, pad=0):
        self.W, self.b, self.stride, self.pad = W, b, stride, pad
        self.dW = self.db = None

    def forward(self, x):
        y, col = im2col.conv2d(np.asarray(x, np.float64), self.W, self.b, self.stride, self.pad)
        self._state = (np.shape(x), col, self.W)
        return y

    def backward(self, dout):
        x_shape, col, weight = self._state
        dx, self.dW, self.db = im2col.conv2d_backward(dout, x_shape, col, weight, self.stride,
                                                      self.pad)
        return dx


class Pooling:
    """Max pooling; padding pads with zeros (the im2col matrix is built from a zero-padded
    input), ties go to the first maximum of each window."""

    def __init__(self, pool_h, pool_w, stride=1, pad=0):
        self.pool_h, self.pool_w, self.stride, self.pad = pool_h, pool_w, stride, pad

    def forward(self, x):
        y, self._state = im2col.pool2d(np.asarray(x, np.float64), self.pool_h, self.pool_w,
                                       self.stride, self.pad, "max")
        return y

    def backward(self, dout):
        return im2col.pool2d_backward(dout, self._state, self.pool_h, self.pool_w, self.stride,
                                      self.pad)


class Relu:
    def forward(self, x):
        self._positive = x > 0
        return np.maximum(x, 0)

    def backward(self, dout):
        return dout * self._positive


class Sigmoid:
    def forward(self, x):
        self.out = 0.5 * (1.0 + np.tanh(0.5 * x))
        return self.out

    def backward(self, dout):
        return dout * self.out * (1.0 - self.out)


class Affine:
    def __init__(self, W, b):
        self.W, self.b = W, b
        self.dW = self.db = None

    def forward(self, x):
        self._x = x
        return np.einsum("nd,dm->nm", x.reshape(len(x), -1), self.W) + self.b

    def backward(self, dout):
        flat = self._x.reshape(len(self._x), -1)
        self.dW = np.einsum("nd,nm->dm", flat, dout)
        self.db = dout.sum(axis=0)
        return np.einsum("nm,dm->nd", dout, self.W).reshape(self._x.shape)


class SoftmaxWithLoss:
    """Mean over the batch of -log(softmax(x)[label] + 1e-7); integer or one-hot labels."""

    def forward(self, x, t):
        log_norm = np.log(np.sum(np.exp(x - x.max(axis=1, keepdims=True)), axis=1,
                                 keepdims=True)) + x.max(axis=1, keepdims=True)
        self.y = np.exp(x - log_norm)
        t = np.asarray(t)
        self._labels = t.argmax(axis=1) if t.ndim == 2 else t
        picked = self.y[np.arange(len(x)), self._labels]
        self.loss = -np.mean(np.log(picked + LOG_EPS))
        return self.loss

    def backward(self, dout=1):
        onehot = np.eye(self.y.shape[1])[self._labels]
        return (self.y - onehot) / len(self.y)


class Dropout:
    """Keeps an element where a uniform draw from NumPy's global generator exceeds the ratio."""

    def __init__(self, dropout_ratio=0.5):
        self.dropout_ratio = dropout_ratio

    def forward(self, x, train_flg=True):
        if not train_flg:
            return x * (1.0 - self.dropout_ratio)
        self._keep = np.random.rand(*x.shape) > self.dropout_ratio
        return np.where(self._keep, x, 0.0)

    def backward(self, dout):
        return np.where(self._keep, dout, 0.0)


class BatchNormalization:
    """Per-feature normalisation of the (N, D)-flattened input; running statistics are
    exponential averages starting at zero; the closed-form input gradient."""

    def __init__(self, gamma, beta, momentum=0.9, running_mean=None, running_var=None):
        self.gamma, self.beta, self.momentum = gamma, beta, momentum
        self.running_mean, self.running_var = running_mean, running_var

    def forward(self, x, train_flg=True):
        flat = x.reshape(len(x), -1)
        if self.running_mean is None:
            self.running_mean = np.zeros(flat.shape[1])
            self.running_var = np.zeros(flat.shape[1])
        if train_flg:
            mean, var = flat.mean(axis=0), flat.var(axis=0)
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mean
            self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var
            self._std = np.sqrt(var + BATCH_NORM_EPS)
            self._normalized = (flat - mean) / self._std
            self._shape = x.shape
            normalized = self._normalized
        else:
            normalized = (flat - self.running_mean) / np.sqrt(self.running_var + BATCH_NORM_EPS)
        return (self.gamma * normalized + self.beta).reshape(x.shape)

    def backward(self, dout):
        dout = dout.reshape(len(dout), -1)
        xn, n = self._normalized, len(dout)
        self.dbeta = dout.sum(axis=0)
        self.dgamma = (dout * xn).sum(axis=0)
        dx = self.gamma / (n * self._std) * (n * dout - self.dbeta - xn * self.dgamma)
        return dx.reshape(self._shape)


class ConvNet:
    """A small network in the style of the book's SimpleConvNet, built from any module with
    the book's layer classes: conv-relu-pool-conv-relu-pool-affine-batchnorm-relu-dropout-affine,
    softmax cross-entropy. ``params`` holds the arrays the layers use (by reference)."""

    def __init__(self, layers, params, dropout_ratio=0.25):
        self.params = params
        p = params
        self.layers = [
            ("Conv1", layers.Convolution(p["W1"], p["b1"], stride=1, pad=1)),
            ("Relu1", layers.Relu()),
            ("Pool1", layers.Pooling(2, 2, stride=2)),
            ("Conv2", layers.Convolution(p["W2"], p["b2"], stride=1, pad=0)),
            ("Relu2", layers.Relu()),
            ("Pool2", layers.Pooling(2, 2, stride=1, pad=1)),
            ("Affine1", layers.Affine(p["W3"], p["b3"])),
            ("BatchNorm1", layers.BatchNormalization(p["gamma1"], p["beta1"])),
            ("Relu3", layers.Relu()),
            ("Dropout1", layers.Dropout(dropout_ratio)),
            ("Affine2", layers.Affine(p["W4"], p["b4"])),
        ]
        self.last_layer = layers.SoftmaxWithLoss()

    @staticmethod
    def init_params(rng, channels=2, size=8, filters=(3, 4), hidden=6, classes=3):
        c, (f1, f2) = channels, filters
        conv2_out = size // 2 - 1                      # after pool1 (size/2), conv2 2x2
        flat = f2 * (conv2_out + 1) * (conv2_out + 1)  # pool2 2x2/s1/pad1 grows it by one
        return {
            "W1": 0.3 * rng.standard_normal((f1, c, 3, 3)), "b1": 0.1 * rng.standard_normal(f1),
            "W2": 0.3 * rng.standard_normal((f2, f1, 2, 2)), "b2": 0.1 * rng.standard_normal(f2),
            "W3": 0.3 * rng.standard_normal((flat, hidden)), "b3": np.zeros(hidden),
            "gamma1": np.ones(hidden), "beta1": np.zeros(hidden),
            "W4": 0.3 * rng.standard_normal((hidden, classes)), "b4": np.zeros(classes),
        }

    def loss(self, x, t, train_flg=True):
        for name, layer in self.layers:
            x = layer.forward(x, train_flg) if name.startswith(("BatchNorm", "Dropout")) \
                else layer.forward(x)
        return self.last_layer.forward(x, t)

    def gradient(self, x, t):
        self.loss(x, t)
        dout = self.last_layer.backward(1)
        for _, layer in reversed(self.layers):
            dout = layer.backward(dout)
        grads = {}
        for name, layer in self.layers:
            if name.startswith(("Conv", "Affine")):
                index = 1 + ["Conv1", "Conv2", "Affine1", "Affine2"].index(name)
                grads[f"W{index}"], grads[f"b{index}"] = layer.dW, layer.db
            elif name.startswith("BatchNorm"):
                grads["gamma1"], grads["beta1"] = layer.dgamma, layer.dbeta
        return grads
