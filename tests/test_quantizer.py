import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from conftest import BINARY

import larq_noisy
from larq_noisy import NoisyMappedQuantizer
from larq_noisy.quantizers import filters_to_kernel, kernel_to_filters


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (7, 6), (5, 4, 3)])
def test_filter_layout_round_trips(shape):
    kernel = tf.random.normal(shape)
    filters = kernel_to_filters(kernel)
    assert filters.shape[0] == shape[-1] and filters.shape[-1] == shape[-2]
    # Filter j is W[..., j].
    np.testing.assert_array_equal(
        tf.reshape(filters[2], [-1]), tf.reshape(kernel[..., 2], [-1])
    )
    np.testing.assert_array_equal(filters_to_kernel(filters, shape), kernel)


def _layer(quantizer, filters=6):
    return lq.layers.QuantConv2D(
        filters, 3, padding="same", **{**BINARY, "kernel_quantizer": quantizer}
    )


@pytest.mark.parametrize("mapper", sorted(larq_noisy.MAPPERS))
def test_binary_kernel_is_binary_and_deterministic(mapper):
    tf.keras.utils.set_random_seed(1)
    layer = _layer(NoisyMappedQuantizer(mapper=mapper, start="warmup"))
    x = tf.random.normal((2, 5, 5, 4))
    out_train, out_eval = layer(x, training=True), layer(x, training=False)
    np.testing.assert_array_equal(out_train, out_eval)
    kernel = layer.kernel_quantizer.scaled_signs(layer.kernel)
    assert set(np.unique(kernel)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(kernel, layer.kernel_quantizer.scaled_signs(layer.kernel))


def test_identity_start_is_sign_binarization():
    tf.keras.utils.set_random_seed(2)
    layer = _layer(NoisyMappedQuantizer(mapper="cnn", start="identity"))
    layer.build((None, 5, 5, 4))
    np.testing.assert_array_equal(
        layer.kernel_quantizer.scaled_signs(layer.kernel), lq.math.sign(layer.kernel)
    )


def test_channel_scale_is_mean_absolute_latent_weight():
    tf.keras.utils.set_random_seed(3)
    layer = _layer(NoisyMappedQuantizer(scale="channel"))
    layer.build((None, 5, 5, 4))
    kernel = layer.kernel_quantizer.scaled_signs(layer.kernel)
    np.testing.assert_allclose(
        np.abs(kernel).max(axis=(0, 1, 2)),
        np.abs(layer.kernel.numpy()).mean(axis=(0, 1, 2)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("gradient", [False, True])
@pytest.mark.parametrize("scale, axes", [("layer", None), ("channel", (0, 1, 2))])
def test_binary_scale_is_a_clipped_mean_with_or_without_gradient(scale, axes, gradient):
    from larq_noisy.quantizers import binary_scale

    w = tf.constant(np.random.default_rng(5).uniform(-2, 2, (3, 3, 4, 6)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(w)
        s = binary_scale(w, scale, clip=1.25, gradient=gradient)
    clipped = np.abs(np.clip(w.numpy(), -1.25, 1.25))
    np.testing.assert_allclose(s, clipped.mean(axis=axes), rtol=1e-6)
    grad = tape.gradient(s, w)
    if not gradient:
        assert grad is None or not np.any(grad)
    else:  # d mean|clip(W)| / dW = sign(W) / n inside the clip, 0 past it
        n = w.numpy().size if axes is None else 36
        expected = np.sign(w.numpy()) * (np.abs(w.numpy()) < 1.25) / n
        np.testing.assert_allclose(grad, expected, rtol=1e-6)


def test_layer_scale_of_a_float16_kernel_does_not_overflow():
    from larq_noisy.quantizers import binary_scale

    w = tf.fill((3, 3, 256, 256), tf.constant(0.5, tf.float16))  # sums to 294912 > 65504
    assert float(binary_scale(w, "layer")) == 0.5


@pytest.mark.parametrize("mapper", sorted(larq_noisy.MAPPERS))
def test_mapper_width_sets_hidden_size(mapper):
    narrow = NoisyMappedQuantizer(mapper=mapper, width=0.5)
    wide = NoisyMappedQuantizer(mapper=mapper, width=2.0)
    narrow.build((3, 3, 8, 4))
    wide.build((3, 3, 8, 4))
    if mapper == "linear":  # no hidden layer
        assert narrow.count_params() == wide.count_params() == 72 * 72 + 72
    else:
        assert narrow.count_params() < wide.count_params()
    if mapper == "cnn":  # the paper's 72 c^2 weights for width 2 (3x3 convs, c=8)
        conv_weights = sum(
            int(np.prod(w.shape)) for w in wide.weights if "kernel" in w.name
        )
        assert conv_weights == 72 * 8 * 8


def test_auxiliary_loss_matches_definition():
    tf.keras.utils.set_random_seed(4)
    q = NoisyMappedQuantizer(alpha=0.5, rho_pos=0.01, rho_neg=0.02, start="warmup",
                             reduction="sum")
    kernel = tf.random.uniform((3, 3, 4, 6), -1, 1)
    q.build(kernel.shape)
    t = q.clipped_output(kernel)
    y = lq.math.sign(kernel)
    expected = 0.5 * tf.reduce_sum(larq_noisy.unbiased_loss(t, y, 0.01, 0.02))
    np.testing.assert_allclose(q.auxiliary_loss(kernel), expected, rtol=1e-5)
    q_mean = NoisyMappedQuantizer.from_config({**q.get_config(), "reduction": "mean"})
    q_mean.build(kernel.shape)
    q_mean.set_weights(q.get_weights())
    np.testing.assert_allclose(
        q_mean.auxiliary_loss(kernel), expected / np.prod(kernel.shape), rtol=1e-5
    )


def test_frozen_labels_keep_the_captured_signs():
    q = NoisyMappedQuantizer(labels="frozen")
    kernel = tf.Variable(tf.random.uniform((3, 3, 2, 4), -1, 1))
    q.build(kernel.shape)
    np.testing.assert_array_equal(q.noisy_labels(kernel), lq.math.sign(kernel))  # not captured
    q.freeze_labels(kernel)
    captured = lq.math.sign(kernel).numpy()
    kernel.assign(-kernel)
    np.testing.assert_array_equal(q.noisy_labels(kernel), captured)
    current = NoisyMappedQuantizer(labels="current")
    current.build(kernel.shape)
    np.testing.assert_array_equal(current.noisy_labels(kernel), lq.math.sign(kernel))
    with pytest.raises(ValueError, match="labels='frozen'"):
        current.freeze_labels(kernel)


def test_config_round_trip():
    q = NoisyMappedQuantizer(
        mapper="mlp", alpha=0.3, rho_pos=0.01, rho_neg=0.02, width=1.5,
        reduction="mean", labels="frozen", start="warmup", scale="channel",
        clip="none", aux_to_latent=False,
    )
    config = q.get_config()
    assert (config["clip"], config["aux_to_latent"]) == ("none", False)
    again = NoisyMappedQuantizer.from_config(config)
    assert again.get_config() == config
    assert again.precision == 1
    serialized = tf.keras.utils.serialize_keras_object(q)
    assert isinstance(tf.keras.utils.deserialize_keras_object(serialized), NoisyMappedQuantizer)
    assert isinstance(lq.quantizers.get(serialized), NoisyMappedQuantizer)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(rho_pos=1.0), r"rho_pos=1.0 .*\[0, 1\)"),
        (dict(rho_neg=-0.01), r"rho_neg=-0.01 .*\[0, 1\)"),
        (dict(rho_pos=0.5, rho_neg=0.5), "must be < 1"),
        (dict(alpha=-1.0), r"alpha=-1.0 must be a finite number >= 0"),
        (dict(mapper="transformer"), r"'transformer'.*\['cnn', 'mlp', 'linear', 'separable'\]"),
        (dict(reduction="max"), r"'max'.*\['sum', 'mean'\]"),
        (dict(labels="clean"), r"'clean'.*\['current', 'frozen'\]"),
        (dict(start="cold"), r"'cold'.*\['identity', 'warmup'\]"),
        (dict(scale="filter"), r"'filter'.*\[None, 'layer', 'channel'\]"),
        (dict(scale_clip=0.0), r"scale_clip=0.0 must be a number > 0"),
        (dict(scale_gradient="yes"), r"scale_gradient='yes' must be True or False"),
        (dict(width=0), r"width=0 must be a finite number > 0"),
        (dict(clip="tanh"), r"'tanh'.*\['hardtanh', 'none'\]"),
        (dict(aux_to_latent="no"), r"aux_to_latent='no' must be True or False"),
    ],
)
def test_bad_options_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        NoisyMappedQuantizer(**kwargs)


def test_check_options_uses_the_quantizer_defaults_and_names_unknown_options():
    from larq_noisy.quantizers import check_options

    check_options(rho_pos=0.9)  # with the default rho_neg (0.005) the sum is < 1
    with pytest.raises(ValueError, match=r"rho_pos \+ rho_neg"):
        check_options(rho_pos=0.996)
    with pytest.raises(ValueError, match=r"\['temperature'\]"):
        check_options(temperature=2.0)


@pytest.mark.parametrize("reduction, ratio", [("mean", 1.0), ("sum", 64.0)])
def test_alpha_means_the_same_at_every_layer_size_with_the_mean_reduction(reduction, ratio):
    """ResNet-20's largest binary conv (3x3x64x64: 36,864 weights) and ResNet-18's
    (3x3x512x512: 2,359,296) holding the same per-weight values: with `mean` the auxiliary
    loss, and the step it gives a parameter shared by the whole layer (a gain on the
    kernel: a step of it moves every weight's t alike), are the same; with the paper's
    `sum` they are 64 times as large on the larger layer."""
    small = np.random.default_rng(0).uniform(-0.05, 0.05, (3, 3, 64, 64)).astype("float32")
    large = np.tile(small, (1, 1, 8, 8))  # the same values, 64 times

    def loss_and_step(kernel):
        quantizer = NoisyMappedQuantizer(mapper="separable", reduction=reduction,
                                         aux_to_latent=True)
        quantizer.build(kernel.shape)
        gain = tf.Variable(1.0)
        with tf.GradientTape() as tape:
            loss = quantizer.auxiliary_loss(gain * tf.constant(kernel))
        return float(loss), float(tape.gradient(loss, gain))

    (small_loss, small_step), (large_loss, large_step) = map(loss_and_step, (small, large))
    assert abs(small_step) > 0
    np.testing.assert_allclose([large_loss / small_loss, large_step / small_step],
                               [ratio, ratio], rtol=1e-3)
