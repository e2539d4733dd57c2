"""The model registry: architectures, binarization, mixed precision, LNS conversion."""

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import larq_noisy
import models

# name -> (test input shape, binarized convs, full-precision convs (stem + shortcuts))
ARCHITECTURES = {
    "bnn_small": ((28, 28, 1), 6, 3),
    "resnet20": ((32, 32, 3), 18, 3),
    "birealnet18": ((32, 32, 3), 16, 4),
    "resnet_e18": ((32, 32, 3), 16, 4),
}
DEFAULT_QUANTIZER = {
    "bnn_small": lq.quantizers.SteSign,
    "resnet20": lq.quantizers.SteSign,
    "birealnet18": lq.quantizers.MagnitudeAwareSign,
    "resnet_e18": lq.quantizers.SteSign,
}
QUANTIZER_CLASS = {
    "ste_sign": lq.quantizers.SteSign,
    "magnitude_aware_sign": lq.quantizers.MagnitudeAwareSign,
    "dorefa": models.DoReFaSign,
}


def _images(shape, n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def _is_binary(quantizer):
    return getattr(quantizer, "precision", None) == 1


def _full_precision_kernels(model):
    """Conv and dense layers that compute with real-valued weights and inputs."""
    return [
        layer
        for layer in model.layers
        if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense))
        and not _is_binary(getattr(layer, "kernel_quantizer", None))
        and not _is_binary(getattr(layer, "input_quantizer", None))
    ]


def test_an_unknown_weight_quantizer_names_the_choices():
    with pytest.raises(ValueError, match=r"'sign_of_the_times'.*ste_sign"):
        models.build("bnn_small", (28, 28, 1), 10, kernel_quantizer="sign_of_the_times")


@pytest.mark.parametrize(
    "name, shape",
    [(name, spec[0]) for name, spec in ARCHITECTURES.items()]
    + [("birealnet18", (64, 64, 3)), ("resnet_e18", (64, 64, 3)), ("bnn_small", (32, 32, 3))],
)
def test_architecture(name, shape):
    _, n_binary, n_fp_convs = ARCHITECTURES[name]
    tf.keras.utils.set_random_seed(0)
    model = models.build(name, shape, 7)

    # A functional model with a softmax over 7 classes.
    assert model._is_graph_network
    probs = model(_images(shape), training=False).numpy()
    assert probs.shape == (4, 7) and model.output_shape == (None, 7)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    # Binary activations and binary, clipped weights in every binarized conv.
    binary = larq_noisy.binarized_layers(model)
    assert len(binary) == n_binary
    for layer in binary:
        assert isinstance(layer, lq.layers.QuantConv2D)
        assert layer.kernel_size == (3, 3)
        assert _is_binary(layer.input_quantizer)
        assert isinstance(layer.kernel_constraint, lq.constraints.WeightClip)
        assert isinstance(layer.kernel_quantizer, DEFAULT_QUANTIZER[name])

    # Full precision: the stem conv, the 1x1 downsampling shortcuts, the last dense.
    fp = _full_precision_kernels(model)
    convs = [layer for layer in fp if isinstance(layer, tf.keras.layers.Conv2D)]
    dense = [layer for layer in fp if isinstance(layer, tf.keras.layers.Dense)]
    assert len(convs) == n_fp_convs and len(dense) == 1
    assert convs[0].kernel.shape[2] == shape[-1]  # the stem sees the image
    assert all(c.kernel_size == (1, 1) for c in convs[1:])
    assert dense[0].units == 7
    assert len(binary) + len(fp) == sum(
        isinstance(l, (tf.keras.layers.Conv2D, tf.keras.layers.Dense)) for l in model.layers
    )
    final = model.layers[-1]
    assert isinstance(final, tf.keras.layers.Activation) and final.dtype == "float32"


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("kernel_quantizer", models.WEIGHT_QUANTIZERS)
def test_kernel_quantizer_choice(name, kernel_quantizer):
    shape = ARCHITECTURES[name][0]
    model = models.build(name, shape, 3, kernel_quantizer=kernel_quantizer)
    for layer in larq_noisy.binarized_layers(model):
        assert type(layer.kernel_quantizer) is QUANTIZER_CLASS[kernel_quantizer]
        assert layer.kernel_quantizer.clip_value == 1.0
        assert layer.kernel_constraint.clip_value == 1.0


def test_resnet_e18_default_keeps_larq_zoo_clip():
    model = models.build("resnet_e18", (32, 32, 3), 3)
    for layer in larq_noisy.binarized_layers(model):
        assert layer.kernel_quantizer.clip_value == 1.25
        assert layer.kernel_constraint.clip_value == 1.25


def test_magnitude_aware_sign_scales_per_channel():
    """Same latent weights, different binarization: outputs change."""
    tf.keras.utils.set_random_seed(1)
    sign = models.build("resnet20", (32, 32, 3), 5, kernel_quantizer="ste_sign")
    scaled = models.build("resnet20", (32, 32, 3), 5, kernel_quantizer="magnitude_aware_sign")
    scaled.set_weights(sign.get_weights())
    x = _images((32, 32, 3))
    assert not np.allclose(sign(x, training=False), scaled(x, training=False), atol=1e-4)


def test_dorefa_scales_the_sign_by_the_layers_mean_absolute_weight():
    quantizer = lq.quantizers.get("dorefa")
    assert isinstance(quantizer, models.DoReFaSign) and quantizer.precision == 1
    w = tf.constant(np.random.default_rng(2).uniform(-1.5, 1.5, (3, 3, 4, 5)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(w)
        q = quantizer(w)
    scale = np.abs(w.numpy()).mean()  # one mean over the whole kernel
    np.testing.assert_allclose(q, scale * np.where(w.numpy() >= 0, 1, -1), rtol=1e-6)
    # Straight-through, zero past clip_value (1), times the (constant) mean.
    np.testing.assert_allclose(tape.gradient(q, w), scale * (np.abs(w.numpy()) <= 1), rtol=1e-6)
    again = tf.keras.utils.deserialize_keras_object(tf.keras.utils.serialize_keras_object(quantizer))
    assert type(again) is models.DoReFaSign and again.get_config() == quantizer.get_config()


def test_mixed_float16_outputs_float32_probabilities():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        for name, (shape, _, _) in ARCHITECTURES.items():
            model = models.build(name, shape, 4, kernel_quantizer="magnitude_aware_sign")
            assert larq_noisy.binarized_layers(model)[0].compute_dtype == "float16"
            probs = model(_images(shape, n=2), training=False)
            assert model.output.dtype == tf.float32 and probs.dtype == tf.float32
            np.testing.assert_allclose(probs.numpy().sum(axis=1), 1.0, rtol=1e-3)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize(
    "name, kernel_quantizer",
    [("bnn_small", "ste_sign"), ("bnn_small", "magnitude_aware_sign"), ("resnet20", "ste_sign")],
)
def test_to_mapped_starts_at_identity(name, kernel_quantizer):
    shape, n_binary, _ = ARCHITECTURES[name]
    tf.keras.utils.set_random_seed(2)
    model = models.build(name, shape, 10, kernel_quantizer=kernel_quantizer)
    # As if pretrained: BatchNorm parameters and statistics away from their init.
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 2.0, gamma.shape), rng.normal(size=beta.shape),
                rng.normal(size=mean.shape), rng.uniform(0.5, 2.0, var.shape),
            ])

    mapped = larq_noisy.to_mapped(model)
    assert len(larq_noisy.mapped_layers(mapped)) == n_binary
    x = _images(shape, n=8, seed=3)
    expected = model(x, training=False).numpy()
    assert expected.std(axis=0).max() > 1e-3  # predictions depend on the input
    np.testing.assert_allclose(mapped(x, training=False).numpy(), expected, atol=1e-6)


def test_few_fit_steps_lower_the_loss_of_bnn_small():
    tf.keras.utils.set_random_seed(4)
    model = models.build("bnn_small", (28, 28, 1), 10)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    x = _images((28, 28, 1), n=64, seed=5)
    y = np.random.default_rng(5).integers(0, 10, size=64)
    losses = model.fit(x, y, batch_size=32, epochs=8, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0]


def test_weights_from_a_local_file(tmp_path):
    tf.keras.utils.set_random_seed(6)
    model = models.build("bnn_small", (28, 28, 1), 10)
    path = str(tmp_path / "weights.h5")
    model.save_weights(path)
    tf.keras.utils.set_random_seed(7)
    loaded = models.build("bnn_small", (28, 28, 1), 10, weights=path)
    x = _images((28, 28, 1))
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"name": "resnet21"}, ["'resnet21'", "'resnet20'", "'bnn_small'", "'birealnet18'"]),
        ({"kernel_quantizer": "xnor"}, ["'xnor'", "'ste_sign'", "'magnitude_aware_sign'", "'dorefa'"]),
        ({"weights": "imagenet"}, ["imagenet", "offline"]),
        ({"weights": "/nonexistent/weights.h5"}, ["/nonexistent/weights.h5", "does not exist"]),
    ],
)
def test_bad_arguments_name_the_choices(kwargs, needles):
    args = {"name": "resnet20", "input_shape": (32, 32, 3), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError) as error:
        models.build(**args)
    for needle in needles:
        assert needle in str(error.value)
