"""Tests of ``numba_cnn.compat``, the drop-in replacement for the "Deep Learning from Scratch"
layers, against the references of the book's published behaviour in ``_book_reference``.

Inputs are tiny; the Numba kernels compile for float64 and float32 only (float16 inputs with
float64 weights compute in float64, float16 alone in float32).
"""
import inspect

import numpy as np
import pytest

import _book_reference as book
from numba_cnn import compat

TIGHT = 1e-12  # float64 on both sides, only the summation order differs


def _close(actual, expected, rtol=TIGHT, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    error = float(np.max(np.abs(actual - expected), initial=0.0)) / scale
    assert error <= rtol, f"{what}: error {error:.2e} > {rtol:.0e}"


def _normal(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def _strided(array):
    """The same values as a non-contiguous view (channels-last storage, then transposed)."""
    view = np.ascontiguousarray(array.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not view.flags.c_contiguous
    return view


# (N, C, H, W), (FN, FH, FW), stride, pad
CONV_CASES = [
    ((2, 3, 7, 7), (4, 3, 3), 1, 0),
    ((2, 3, 8, 6), (5, 3, 2), 2, 1),
    ((1, 2, 9, 10), (3, 5, 5), 3, 2),
    ((3, 1, 5, 5), (2, 1, 1), 1, 0),
]


def _conv_pair(rng, case, w_dtype=np.float64):
    x_shape, (filters, kh, kw), stride, pad = case
    weight = _normal(rng, (filters, x_shape[1], kh, kw), w_dtype)
    bias = _normal(rng, filters, w_dtype)
    return (compat.Convolution(weight, bias, stride, pad),
            book.Convolution(weight.copy(), bias.copy(), stride, pad))


def _run(layer, x, dout_of):
    y = layer.forward(x)
    return y, layer.backward(dout_of(y))


@pytest.mark.parametrize("case", CONV_CASES, ids=[f"conv{i}" for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("x_dtype", [np.float64, np.float32, np.float16])
def test_convolution_matches_book(case, x_dtype, rng):
    ours, ref = _conv_pair(rng, case)
    x = _normal(rng, case[0], x_dtype)
    y_ref = ref.forward(x)
    dout = _normal(rng, y_ref.shape)
    y = ours.forward(x)
    assert y.dtype == np.float64  # float64 weights promote, as in the book's networks
    _close(y, y_ref, what="y")
    dx = ours.backward(dout)
    _close(dx, ref.backward(dout), what="dx")
    _close(ours.dW, ref.dW, what="dW")
    _close(ours.db, ref.db, what="db")
    assert dx.dtype == ours.dW.dtype == ours.db.dtype == np.float64
    assert ours.dW.shape == ours.W.shape and ours.db.shape == ours.b.shape


def test_convolution_float32_stays_float32(rng):
    ours, ref = _conv_pair(rng, CONV_CASES[1], np.float32)
    x = _normal(rng, CONV_CASES[1][0], np.float32)
    y = ours.forward(x)
    dout = _normal(rng, y.shape, np.float32)
    dx = ours.backward(dout)
    assert y.dtype == dx.dtype == ours.dW.dtype == ours.db.dtype == np.float32
    _close(y, ref.forward(x), 1e-5, "y")
    _close(dx, ref.backward(dout), 1e-5, "dx")
    _close(ours.dW, ref.dW, 1e-5, "dW")


def test_convolution_non_contiguous_and_inputs_untouched(rng):
    ours, ref = _conv_pair(rng, CONV_CASES[0])
    x = _strided(_normal(rng, CONV_CASES[0][0]))
    weight_before, bias_before, x_before = ours.W.copy(), ours.b.copy(), x.copy()
    y = ours.forward(x)
    dout = _strided(_normal(rng, y.shape))
    dout_before = dout.copy()
    _close(y, ref.forward(x), what="y")
    _close(ours.backward(dout), ref.backward(dout), what="dx")
    _close(ours.dW, ref.dW, what="dW")
    for array, before in ((x, x_before), (dout, dout_before), (ours.W, weight_before),
                          (ours.b, bias_before)):
        np.testing.assert_array_equal(array, before)


def test_convolution_parameters_by_reference(rng):
    weight, bias = _normal(rng, (3, 2, 3, 3)), _normal(rng, 3)
    layer = compat.Convolution(weight, bias, pad=1)
    assert layer.W is weight and layer.b is bias
    x = _normal(rng, (2, 2, 5, 5))
    layer.forward(x)
    weight -= 0.5  # an optimizer's in-place update
    bias *= 2.0
    expected = book.Convolution(weight.copy(), bias.copy(), pad=1)
    _close(layer.forward(x), expected.forward(x), what="after in-place update")
    layer.W, layer.b = _normal(rng, (4, 2, 3, 3)), _normal(rng, 4)  # load_params rebinds
    expected = book.Convolution(layer.W, layer.b, pad=1)
    y = layer.forward(x)
    assert y.shape == (2, 4, 5, 5)
    _close(y, expected.forward(x), what="after rebinding")
    dout = _normal(rng, y.shape)
    _close(layer.backward(dout), expected.backward(dout), what="dx after rebinding")
    _close(layer.dW, expected.dW, what="dW after rebinding")


def test_convolution_scalar_bias(rng):
    weight = _normal(rng, (3, 2, 3, 3))
    layer, ref = compat.Convolution(weight, 0), book.Convolution(weight, 0)
    x = _normal(rng, (2, 2, 6, 6))
    y = layer.forward(x)
    _close(y, ref.forward(x), what="y")
    dout = _normal(rng, y.shape)
    _close(layer.backward(dout), ref.backward(dout), what="dx")
    assert layer.db.shape == (3,) and layer.db.dtype == np.float64
    _close(layer.db, dout.sum(axis=(0, 2, 3)), what="db")


# (N, C, H, W), pool_h, pool_w, stride, pad
POOL_CASES = [
    ((2, 3, 8, 8), 2, 2, 2, 0),
    ((2, 2, 7, 9), 3, 3, 2, 1),
    ((1, 2, 6, 5), 3, 3, 1, 0),
    ((2, 1, 5, 7), 2, 3, 1, 1),
    ((1, 1, 4, 4), 2, 2, 1, 2),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[f"pool{i}" for i in range(len(POOL_CASES))])
@pytest.mark.parametrize("x_dtype", [np.float64, np.float32, np.float16])
def test_pooling_matches_book(case, x_dtype, rng):
    x_shape, pool_h, pool_w, stride, pad = case
    ours = compat.Pooling(pool_h, pool_w, stride, pad)
    ref = book.Pooling(pool_h, pool_w, stride, pad)
    x = _normal(rng, x_shape, x_dtype)
    y = ours.forward(x)
    y_ref = ref.forward(x)
    np.testing.assert_array_equal(y, y_ref)  # a maximum is exact in any dtype
    dout = _normal(rng, y.shape)
    # overlapping windows add gradients in another order
    _close(ours.backward(dout), ref.backward(dout), what="dx")


def test_pooling_ties_go_to_the_first_maximum(rng):
    x = rng.integers(0, 3, (2, 3, 7, 7)).astype(np.float64)  # most windows hold ties
    for pool, stride, pad in ((2, 2, 0), (3, 1, 1), (3, 2, 1)):
        ours, ref = compat.Pooling(pool, pool, stride, pad), book.Pooling(pool, pool, stride, pad)
        y = ours.forward(x)
        np.testing.assert_array_equal(y, ref.forward(x))
        dout = rng.integers(1, 5, y.shape).astype(np.float64)
        np.testing.assert_array_equal(ours.backward(dout), ref.backward(dout))


def test_pooling_pads_with_zeros():
    x = -np.ones((1, 1, 2, 2))
    layer = compat.Pooling(2, 2, stride=2, pad=1)
    y = layer.forward(x)
    np.testing.assert_array_equal(y, np.zeros((1, 1, 2, 2)))  # every window holds a pad zero
    # the first maximum of each window is a padding zero: no gradient reaches x
    np.testing.assert_array_equal(layer.backward(np.ones_like(y)), np.zeros_like(x))


def test_pooling_non_contiguous_and_default_stride(rng):
    # the book's Pooling defaults to stride=1 (its networks pass stride=2 explicitly)
    assert inspect.signature(compat.Pooling).parameters["stride"].default == 1
    ours, ref = compat.Pooling(2, 2), book.Pooling(2, 2)
    x = _strided(_normal(rng, (2, 3, 6, 5)))
    x_before = x.copy()
    y = ours.forward(x)
    assert y.shape == (2, 3, 5, 4)
    np.testing.assert_array_equal(y, ref.forward(x))
    dout = _strided(_normal(rng, y.shape))
    _close(ours.backward(dout), ref.backward(dout), what="dx")
    np.testing.assert_array_equal(x, x_before)


def test_constructor_signatures_match_the_book():
    expected = {
        "Convolution": "(W, b, stride=1, pad=0)",
        "Pooling": "(pool_h, pool_w, stride=1, pad=0)",
        "Relu": "()", "Sigmoid": "()", "Affine": "(W, b)", "SoftmaxWithLoss": "()",
        "Dropout": "(dropout_ratio=0.5)",
        "BatchNormalization": "(gamma, beta, momentum=0.9, running_mean=None, running_var=None)",
    }
    for name, signature in expected.items():
        assert str(inspect.signature(getattr(compat, name))) == signature, name
    assert str(inspect.signature(compat.SoftmaxWithLoss.backward)) == "(self, dout=1)"
    assert str(inspect.signature(compat.Dropout.forward)) == "(self, x, train_flg=True)"
    assert sorted(compat.__all__) == sorted(expected)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_relu_and_sigmoid(dtype, rng):
    x = _strided(_normal(rng, (2, 3, 4, 5), dtype))
    x[0, 0, 0, :2] = 0.0
    dout = _strided(_normal(rng, x.shape, dtype))
    x_before, dout_before = x.copy(), dout.copy()
    rtol = TIGHT if dtype == np.float64 else 1e-6
    for ours, ref in ((compat.Relu(), book.Relu()), (compat.Sigmoid(), book.Sigmoid())):
        y = ours.forward(x)
        assert y.dtype == dtype
        _close(y, ref.forward(x), rtol, type(ours).__name__)
        dx = ours.backward(dout)
        _close(dx, ref.backward(dout), rtol, type(ours).__name__ + " dx")
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dout, dout_before)  # the book's Relu.backward writes here


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_relu_kernel_path_is_bitwise_the_books(dtype, rng):
    # >= 16k elements: Relu runs the Numba kernels (smaller arrays take np.where)
    from numba_cnn._activations import KERNEL_MIN_SIZE
    shape = (4, 8, 32, 33)
    assert np.prod(shape) >= KERNEL_MIN_SIZE
    x = _normal(rng, shape, dtype)
    x.reshape(-1)[:6] = [0.0, -0.0, np.nan, np.inf, -np.inf, -1e-30]
    dout = _normal(rng, shape, dtype)
    dout.reshape(-1)[6:9] = [np.nan, np.inf, -0.0]
    for x_in, dout_in in ((x, dout), (_strided(x), _strided(dout))):
        x_before = x_in.copy()
        # the book's Relu: mask = (x <= 0); out = x.copy(); out[mask] = 0; dout[mask] = 0
        mask = x_in <= 0
        y_ref, dx_ref = x_in.copy(), dout_in.copy()
        y_ref[mask] = 0
        dx_ref[mask] = 0
        ours = compat.Relu()
        y = ours.forward(x_in)
        assert y.dtype == dtype and y.shape == shape
        np.testing.assert_array_equal(ours.mask, mask)
        assert np.array_equal(np.ascontiguousarray(y).view(np.uint8),
                              np.ascontiguousarray(y_ref).view(np.uint8))  # NaN, -0.0 too
        dx = ours.backward(dout_in)
        assert np.array_equal(np.ascontiguousarray(dx).view(np.uint8),
                              np.ascontiguousarray(dx_ref).view(np.uint8))
        np.testing.assert_array_equal(x_in, x_before)


def test_affine_with_4d_non_contiguous_input(rng):
    weight, bias = _normal(rng, (60, 7)), _normal(rng, 7)
    ours, ref = compat.Affine(weight, bias), book.Affine(weight, bias)
    assert ours.W is weight and ours.b is bias
    x = _strided(_normal(rng, (4, 3, 4, 5), np.float32))
    y = ours.forward(x)
    assert y.dtype == np.float64
    _close(y, ref.forward(x), what="y")
    dout = _normal(rng, y.shape).T.copy().T  # Fortran order
    dx = ours.backward(dout)
    assert dx.shape == x.shape
    _close(dx, ref.backward(dout), what="dx")
    _close(ours.dW, ref.dW, what="dW")
    _close(ours.db, ref.db, what="db")


@pytest.mark.parametrize("one_hot", [False, True])
def test_softmax_with_loss(one_hot, rng):
    x = 3.0 * _normal(rng, (6, 5))
    labels = rng.integers(0, 5, 6)
    t = np.eye(5)[labels] if one_hot else labels
    ours, ref = compat.SoftmaxWithLoss(), book.SoftmaxWithLoss()
    loss = ours.forward(x, t)
    assert ours.loss == loss and np.ndim(loss) == 0
    _close(loss, ref.forward(x, labels), what="loss")
    _close(ours.y, ref.y, what="softmax")
    _close(ours.backward(), ref.backward(), what="dx")
    _close(ours.backward(1), ref.backward(), what="dx with dout=1")


def test_dropout_draws_from_the_global_generator(rng):
    x = _normal(rng, (3, 4, 5))
    ours, ref = compat.Dropout(0.3), book.Dropout(0.3)
    np.random.seed(7)
    y = ours.forward(x)
    np.random.seed(7)
    np.testing.assert_array_equal(y, ref.forward(x))
    dout = _normal(rng, x.shape)
    np.testing.assert_array_equal(ours.backward(dout), ref.backward(dout))
    np.testing.assert_array_equal(ours.forward(x, train_flg=False), x * 0.7)
    assert 0.5 < np.mean(y != 0) < 0.9


@pytest.mark.parametrize("shape", [(8, 5), (6, 2, 3, 3)])
def test_batch_normalization(shape, rng):
    features = int(np.prod(shape[1:]))
    gamma, beta = 1.0 + 0.1 * _normal(rng, features), 0.1 * _normal(rng, features)
    mean0, var0 = 0.1 * _normal(rng, features), np.ones(features)
    ours = compat.BatchNormalization(gamma, beta, 0.8, mean0, var0)
    ref = book.BatchNormalization(gamma, beta, 0.8, mean0.copy(), var0.copy())
    assert ours.gamma is gamma and ours.beta is beta
    for step in range(2):
        x = _strided(_normal(rng, shape)) if len(shape) == 4 else 2.0 + _normal(rng, shape)
        _close(ours.forward(x), ref.forward(x), what=f"train forward {step}")
        dout = _normal(rng, shape)
        _close(ours.backward(dout), ref.backward(dout), 1e-10, f"dx {step}")
        _close(ours.dgamma, ref.dgamma, what="dgamma")
        _close(ours.dbeta, ref.dbeta, what="dbeta")
        _close(ours.running_mean, ref.running_mean, what="running_mean")
        _close(ours.running_var, ref.running_var, what="running_var")
    np.testing.assert_array_equal(var0, 1.0)  # replaced, not updated in place
    x = _normal(rng, shape)
    _close(ours.forward(x, train_flg=False), ref.forward(x, train_flg=False), what="test mode")
    fresh = compat.BatchNormalization(gamma, beta)
    fresh.forward(x)
    _close(fresh.running_mean, 0.1 * x.reshape(len(x), -1).mean(axis=0), what="zero start")


def test_only_dropout_touches_the_global_generator(rng):
    np.random.seed(3)
    state = np.random.get_state()[1].copy()
    params = book.ConvNet.init_params(rng)
    net = book.ConvNet(compat, params, dropout_ratio=0.0)
    net.layers = [(name, layer) for name, layer in net.layers if name != "Dropout1"]
    net.gradient(_normal(rng, (4, 2, 8, 8)), rng.integers(0, 3, 4))
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_network_gradients_match_finite_differences(rng):
    """conv(pad 1)-relu-pool-conv(stride 2)-sigmoid-affine-softmax, float64: every parameter
    and 16 input entries against central differences."""
    params = {"W1": 0.5 * _normal(rng, (2, 2, 3, 3)), "b1": 0.1 * _normal(rng, 2),
              "W2": 0.5 * _normal(rng, (3, 2, 2, 2)), "b2": 0.1 * _normal(rng, 3),
              "W3": 0.5 * _normal(rng, (12, 3)), "b3": 0.1 * _normal(rng, 3)}
    layers = [compat.Convolution(params["W1"], params["b1"], stride=1, pad=1), compat.Relu(),
              compat.Pooling(2, 2, stride=2),
              compat.Convolution(params["W2"], params["b2"], stride=2, pad=1), compat.Sigmoid(),
              compat.Affine(params["W3"], params["b3"])]
    last = compat.SoftmaxWithLoss()
    x, t = _normal(rng, (2, 2, 6, 6)), np.array([0, 2])

    def loss(inputs):
        for layer in layers:
            inputs = layer.forward(inputs)
        return last.forward(inputs, t)

    loss(x)
    dout = last.backward()
    for layer in reversed(layers):
        dout = layer.backward(dout)
    grads = {"x": dout, "W1": layers[0].dW, "b1": layers[0].db, "W2": layers[3].dW,
             "b2": layers[3].db, "W3": layers[5].dW, "b3": layers[5].db}
    x_entries = [np.unravel_index(i, x.shape) for i in rng.choice(x.size, 16, replace=False)]
    step = 1e-6
    for name, array in dict(params, x=x).items():
        entries = x_entries if name == "x" else list(np.ndindex(array.shape))
        numeric = np.zeros_like(array)
        for index in entries:
            original = array[index]
            array[index] = original + step
            plus = loss(x)
            array[index] = original - step
            minus = loss(x)
            array[index] = original
            numeric[index] = (plus - minus) / (2 * step)
        # 1e-6: the book's loss is -log(y + 1e-7) but its gradient is that of -log(y)
        checked = tuple(np.array(entries).T)
        _close(grads[name][checked], numeric[checked], 1e-6, name)


def test_training_loop_matches_the_book_network(rng):
    """A Trainer-style loop (shuffled mini-batches, momentum SGD updating params in place,
    dropout from the seeded global generator): the loss curves of a network built from compat
    and one built from the reference layers agree to 1e-10."""
    x_all = _normal(rng, (24, 2, 8, 8))
    t_all = rng.integers(0, 3, 24)
    init = book.ConvNet.init_params(rng)
    curves = []
    for layers in (compat, book):
        params = {key: value.copy() for key, value in init.items()}
        net = book.ConvNet(layers, params)
        velocity = {key: np.zeros_like(value) for key, value in params.items()}
        batches = np.random.default_rng(1)
        np.random.seed(5)
        losses = []
        for _ in range(6):
            batch = batches.choice(len(x_all), 8, replace=False)
            grads = net.gradient(x_all[batch], t_all[batch])
            losses.append(net.last_layer.loss)
            for key in params:
                velocity[key] = 0.9 * velocity[key] - 0.1 * grads[key]
                params[key] += velocity[key]
        losses.append(net.loss(x_all, t_all, train_flg=False))
        curves.append((np.array(losses), params))
    (ours, our_params), (ref, ref_params) = curves
    assert ours[1:-1].min() < ours[0]  # it learns (the labels are random: it can only fit)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=0)
    for key in our_params:
        _close(our_params[key], ref_params[key], 1e-10, key)


@pytest.mark.parametrize("make", [
    lambda: compat.Convolution(np.ones((2, 1, 3, 3)), np.zeros(2)),
    lambda: compat.Pooling(2, 2, 2),
    lambda: compat.Relu(),
    lambda: compat.Sigmoid(),
    lambda: compat.Affine(np.ones((4, 2)), np.zeros(2)),
    lambda: compat.SoftmaxWithLoss(),
    lambda: compat.Dropout(),
    lambda: compat.BatchNormalization(np.ones(4), np.zeros(4)),
])
def test_backward_before_forward_raises_a_clear_error(make):
    layer = make()
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((1, 2, 2, 2)))
