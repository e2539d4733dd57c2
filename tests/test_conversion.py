import csv
import io
import os
import warnings

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from conftest import BINARY, tiny_bnn

import larq_noisy
import models  # registers the "dorefa" quantizer
from larq_noisy import NoisyMappedQuantizer, bake, flip_rates, mapped_layers, to_mapped
from larq_noisy.quantizers import kernel_to_filters


def _compile(model, lr=0.01):
    model.compile(
        tf.keras.optimizers.Adam(lr),
        tf.keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    return model


def _mapped_tiny(kernel_quantizer="ste_sign", **options):
    tf.keras.utils.set_random_seed(0)
    return to_mapped(tiny_bnn(input_shape=(28, 28, 1), kernel_quantizer=kernel_quantizer), **options)


@pytest.fixture(scope="module")
def fashion_test_images():
    from harness import datasets

    dataset, _ = datasets.load("fashion_mnist", "test", batch_size=64, limit=64)
    images, labels = next(iter(dataset))
    return images.numpy(), labels.numpy()


def test_identity_start_predicts_exactly_what_the_sign_model_predicts(tiny_model, toy_data):
    x, _ = toy_data
    mapped = to_mapped(tiny_model)
    np.testing.assert_array_equal(mapped.predict(x, verbose=0), tiny_model.predict(x, verbose=0))
    assert [l.name for l in mapped_layers(mapped)] == ["bconv1", "bconv2", "bdense"]
    assert len(mapped.losses) == 3  # one auxiliary term per binarized layer


def test_to_mapped_copies_weights_and_leaves_the_original_alone(tiny_model):
    mapped = to_mapped(tiny_model, mapper="mlp", alpha=0.5)
    assert tiny_model.get_layer("bconv1").kernel_quantizer.__class__.__name__ == "SteSign"
    for name in ("stem", "bconv1", "bdense", "head"):
        np.testing.assert_array_equal(
            mapped.get_layer(name).get_weights()[0], tiny_model.get_layer(name).get_weights()[0]
        )
    bn, bn_mapped = tiny_model.layers[2], mapped.layers[2]
    np.testing.assert_array_equal(bn.moving_variance, bn_mapped.moving_variance)
    q = mapped.get_layer("bconv1").kernel_quantizer
    assert (q.mapper_kind, q.alpha) == ("mlp", 0.5)
    assert q is not mapped.get_layer("bconv2").kernel_quantizer  # one mapper per layer


def test_sequential_model_is_mapped(toy_data):
    x, _ = toy_data
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((12, 12, 1)),
            tf.keras.layers.Flatten(),
            lq.layers.QuantDense(8, kernel_quantizer="ste_sign", kernel_constraint="weight_clip"),
            tf.keras.layers.Dense(3),
        ]
    )
    mapped = to_mapped(model, mapper="linear")
    assert isinstance(mapped, tf.keras.Sequential)
    np.testing.assert_array_equal(mapped(x[:8]), model(x[:8]))


def test_birealnet_keeps_its_scaled_sign():
    import larq_zoo as lqz

    tf.keras.utils.set_random_seed(0)
    model = lqz.literature.BiRealNet(input_shape=(32, 32, 3), num_classes=5, weights=None)
    binarized = larq_noisy.binarized_layers(model)
    assert all(isinstance(l.kernel_quantizer, lq.quantizers.MagnitudeAwareSign) for l in binarized)
    mapped = to_mapped(model, width=0.25)
    assert {l.kernel_quantizer.scale for l in mapped_layers(mapped)} == {"channel"}
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(mapped(x, training=False), model(x, training=False))


@pytest.mark.parametrize(
    "mapper, start, variables_per_layer",
    [("cnn", "warmup", 8), ("cnn", "identity", 8),  # 3 convs, 2 norms (gamma, beta), 1 bias
     ("separable", "identity", 6)],  # taps, down, norm (gamma, beta), up kernel and bias
)
def test_gradients_reach_every_mapper_variable_and_latent_kernel(
        mapper, start, variables_per_layer, toy_data):
    x, y = toy_data
    tf.keras.utils.set_random_seed(0)
    model = to_mapped(tiny_bnn(), mapper=mapper, start=start)
    optimizer = tf.keras.optimizers.SGD(0.05)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()

    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y[:64], model(x[:64], training=True)) + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return grads

    if start == "identity":
        # The residual branch's last layer starts at zero, so its inner layers only get a
        # gradient once it has moved: take one step first.
        step()
    grads = dict(zip((v.name for v in model.trainable_variables), step()))
    mapper_vars = [v for l in mapped_layers(model) for v in l.kernel_quantizer.trainable_variables]
    kernels = [l.kernel.latent_variable for l in mapped_layers(model)]
    assert len(mapper_vars) == 3 * variables_per_layer
    for v in mapper_vars + kernels:
        g = grads[v.name]
        assert g is not None and float(tf.reduce_max(tf.abs(g))) > 0, v.name


def test_fit_lowers_the_loss_and_logs_flip_rates(toy_data, tmp_path):
    x, y = toy_data
    model = _compile(to_mapped(tiny_bnn(), alpha=1e-3))
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=4,
        verbose=0,
        callbacks=[
            larq_noisy.FlipRateCallback(),
            tf.keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
            tf.keras.callbacks.TensorBoard(str(tmp_path / "tb")),
        ],
    ).history
    assert history["loss"][-1] < history["loss"][0]
    assert set(history) >= {"flip_rate", "aux_loss", "flip_rate/bconv1", "flip_rate/bdense"}
    assert history["flip_rate/bconv1"][-1] == flip_rates(model)["bconv1"] > 0
    expected_aux = sum(larq_noisy.auxiliary_losses(model).values())
    assert history["aux_loss"][-1] == pytest.approx(expected_aux, rel=1e-5)
    with open(tmp_path / "log.csv") as f:
        assert "flip_rate/bconv2" in next(csv.reader(f))
    events = [f for _, _, fs in os.walk(tmp_path / "tb" / "train") for f in fs]
    assert events


def test_flip_rates_against_a_reference_model(tiny_model, toy_data):
    x, y = toy_data
    mapped = _compile(to_mapped(tiny_model, alpha=0.0), lr=0.05)
    assert set(flip_rates(mapped, reference=tiny_model).values()) == {0.0}
    mapped.fit(x, y, epochs=2, verbose=0)
    since_start = flip_rates(mapped, reference=tiny_model)
    assert max(since_start.values()) > 0
    assert set(flip_rates(tiny_model).values()) == {0.0}  # sign layers never flip vs sign(W)


def test_bake_after_training_matches_on_real_images(fashion_test_images):
    x, y = fashion_test_images
    mapped = _compile(_mapped_tiny("magnitude_aware_sign", mapper="cnn"), lr=0.05)
    assert {l.kernel_quantizer.scale for l in mapped_layers(mapped)} == {"channel"}
    mapped.fit(x, y, epochs=3, verbose=0)
    assert max(flip_rates(mapped).values()) > 0  # the mapper moved away from sign(W)
    baked = bake(mapped)
    assert not mapped_layers(baked)
    assert len(larq_noisy.binarized_layers(baked)) == 3
    assert not baked.losses
    diff = np.abs(baked.predict(x, verbose=0) - mapped.predict(x, verbose=0)).max()
    assert diff <= 1e-5


def test_save_and_load_round_trip(tmp_path, toy_data):
    x, y = toy_data
    model = _compile(to_mapped(tiny_bnn(), labels="frozen", mapper="mlp", start="warmup"))
    model.fit(x, y, epochs=1, verbose=0)
    expected = model.predict(x[:16], verbose=0)

    again = tf.keras.Model.from_config(model.get_config())
    again.set_weights(model.get_weights())
    np.testing.assert_array_equal(again.predict(x[:16], verbose=0), expected)

    for path in (tmp_path / "model.h5", tmp_path / "saved_model"):
        model.save(path)
        loaded = tf.keras.models.load_model(path)
        q = loaded.get_layer("bconv1").kernel_quantizer
        assert isinstance(q, NoisyMappedQuantizer) and q.labels == "frozen"
        np.testing.assert_allclose(loaded.predict(x[:16], verbose=0), expected, atol=1e-6)
        assert len(loaded.losses) == 3


def test_one_fit_step_under_mirrored_strategy(toy_data):
    x, y = toy_data
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        model = _compile(to_mapped(tiny_bnn()))
    history = model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    # Keras keeps BatchNorm moving statistics per replica (sync-on-read): outside the
    # replica context, as here and in bake, they read as their mean over replicas.
    np.testing.assert_array_equal(bake(model)(x[:8]), model(x[:8], training=False))


def test_mixed_precision_and_jit(toy_data):
    x, y = toy_data
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = to_mapped(tiny_bnn())
        model.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
        history = model.fit(x[:64], y[:64], epochs=2, verbose=0).history
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(history["loss"]).all()
    assert all(l.dtype == tf.float32 for l in model.losses)


def test_summary_counts_mapped_kernels_as_binary(tiny_model):
    lines = io.StringIO()
    lq.models.summary(to_mapped(tiny_model), print_fn=lambda s: lines.write(s + "\n"))
    table = lines.getvalue()
    binary_params = sum(int(np.prod(l.kernel.shape)) for l in larq_noisy.binarized_layers(tiny_model))
    total_row = next(r for r in table.splitlines() if r.startswith("| Total"))
    assert int(total_row.split()[2]) == binary_params  # the "# 1-bit" column


def test_bad_inputs(tiny_model):
    plain = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"no binarized layer to map.*\['Dense'"):
        to_mapped(plain)
    with pytest.raises(ValueError, match="no mapped layer"):
        bake(tiny_model)
    with pytest.raises(ValueError, match=r"rho_pos \+ rho_neg"):
        to_mapped(tiny_model, rho_pos=0.6, rho_neg=0.4)
    with pytest.raises(ValueError, match="'gru'"):
        to_mapped(tiny_model, mapper="gru")
    with pytest.raises(ValueError, match="already mapped"):
        to_mapped(to_mapped(tiny_model))


@pytest.mark.parametrize("function", [to_mapped, bake])
@pytest.mark.parametrize("given, named", [("model.h5", "the path 'model.h5'"), (3, "int 3")])
def test_anything_but_a_model_is_refused_with_how_to_load_one(function, given, named):
    with pytest.raises(TypeError) as error:
        function(given)
    message = str(error.value)
    assert message.startswith(f"{function.__name__} takes a tf.keras.Model, not {named}")
    assert "tf.keras.models.load_model(path)" in message and "\n" not in message


def test_mixed_precision_model_converts_under_a_float32_global_policy(toy_data):
    x, _ = toy_data
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny_bnn()
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    mapped = to_mapped(model, start="warmup")
    assert mapped.get_layer("bconv1").kernel_quantizer.dtype_policy.name == "mixed_float16"
    baked = bake(mapped)
    assert baked.get_layer("bconv1").kernel_quantizer.dtype_policy.name == "mixed_float16"
    np.testing.assert_array_equal(baked(x[:8]), mapped(x[:8], training=False))


# --- Every precision-1 kernel quantizer converts exactly, or is refused ----------------


@lq.utils.set_precision(1)
def _plain_sign(w):
    """An unregistered plain function: sign, unscaled."""
    return lq.quantizers.ste_sign(w)


@lq.utils.set_precision(1)
def _xnor_sign(w):
    """XNOR-Net as its paper: per-channel mean |W|, whose gradient reaches W."""
    return tf.reduce_mean(tf.abs(w), axis=list(range(len(w.shape) - 1))) * lq.quantizers.ste_sign(w)


@lq.utils.set_precision(1)
def _clipped_layer_sign(w):
    """One scale per layer, the mean of |W| clipped at 0.75."""
    scale = tf.reduce_mean(tf.abs(tf.clip_by_value(w, -0.75, 0.75)))
    return tf.stop_gradient(scale) * lq.quantizers.ste_sign(w)


@lq.utils.set_precision(1)
def _half_sign(w):
    """A constant scale: not a mean of |W|, so refused."""
    return 0.5 * lq.quantizers.ste_sign(w)


def _max_diff(a, b, x):
    return float(np.abs(a(x, training=False) - b(x, training=False)).max())


def _quietly(convert, *args, **options):
    """`convert(*args, **options)` (`to_mapped` or `bake`), asserting that it warns
    about nothing: no layer left alone, no scale or baked kernel off by a rounding."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(*args, **options)
    ours = [str(w.message) for w in caught if str(w.message).startswith(("to_mapped", "bake"))]
    assert not ours
    return converted


@pytest.mark.parametrize(
    "quantizer, expected",
    [
        ("ste_sign", (None, None, False)),
        (_plain_sign, (None, None, False)),
        ("magnitude_aware_sign", ("channel", None, False)),
        (_xnor_sign, ("channel", None, True)),
        ("dorefa", ("layer", None, False)),
        (_clipped_layer_sign, ("layer", 0.75, False)),
    ],
    ids=["ste_sign", "plain_function", "magnitude_aware_sign", "xnor_function", "dorefa",
         "clipped_layer_function"],
)
def test_every_scaled_sign_converts_exactly_at_step_0_and_after_bake(quantizer, expected, toy_data):
    x, y = toy_data
    tf.keras.utils.set_random_seed(0)
    model = tiny_bnn(kernel_quantizer=quantizer)
    mapped = _quietly(to_mapped, model, mapper="mlp", alpha=1e-3)
    for layer in mapped_layers(mapped):
        q = layer.kernel_quantizer
        assert (q.scale, q.scale_clip, q.scale_gradient) == expected, layer.name
        assert NoisyMappedQuantizer.from_config(q.get_config()).get_config() == q.get_config()
    assert _max_diff(mapped, model, x) < 1e-5

    # The same gradients as the source's quantizer at step 0, scale's gradient included.
    source, copy = model.get_layer("bconv2"), mapped.get_layer("bconv2")
    kernel = tf.convert_to_tensor(source.kernel)
    weights = tf.random.normal(kernel.shape, seed=1)
    grads = []
    for q in (source.kernel_quantizer, copy.kernel_quantizer):
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            out = tf.reduce_sum(q(kernel) * weights)
        grads.append(tape.gradient(out, kernel).numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)

    optimizer = tf.keras.optimizers.Adam(0.05)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
    for step in range(4):  # a few eager steps: the mappers move, bake has work to do
        with tf.GradientTape() as tape:
            batch = slice(64 * step, 64 * step + 64)
            loss = loss_fn(y[batch], mapped(x[batch], training=True)) + tf.add_n(mapped.losses)
        variables = mapped.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    assert max(flip_rates(mapped).values()) > 0
    baked = _quietly(bake, mapped)  # every baked kernel exactly the mapped one
    stock = {None: lq.quantizers.SteSign, "channel": lq.quantizers.MagnitudeAwareSign,
             "layer": models.DoReFaSign}[expected[0]]
    assert all(type(l.kernel_quantizer) is stock for l in larq_noisy.binarized_layers(baked))
    assert _max_diff(baked, mapped, x) < 1e-5


@pytest.mark.parametrize(
    "quantizer, needle",
    [(_half_sign, "function _half_sign"), ("ste_heaviside", "SteHeaviside")],
)
def test_a_quantizer_of_another_form_is_refused(quantizer, needle, tiny_model):
    model = tiny_bnn(kernel_quantizer=quantizer)
    with pytest.raises(ValueError, match=rf"^Layer 'bconv1': kernel quantizer {needle} does not "
                       r"compute s \* sign\(W\)") as info:
        to_mapped(model)
    assert "\n" not in str(info.value)


def test_scale_given_against_the_layer_warns():
    tf.keras.utils.set_random_seed(0)
    with pytest.warns(UserWarning, match=r"layer 'bconv1' gets \{'scale': 'channel'.*outputs differ"):
        mapped = to_mapped(tiny_bnn(), scale="channel")
    assert {l.kernel_quantizer.scale for l in mapped_layers(mapped)} == {"channel"}


def _unmapped_layers_model():
    """Convs of 4 and 1 filters, a depthwise conv (its binary weight is not a kernel,
    and its quantizer is an unregistered plain function), a dense layer of one unit."""
    inputs = tf.keras.Input((8, 8, 2))
    x = lq.layers.QuantConv2D(4, 3, padding="same", name="conv", **BINARY)(inputs)
    x = tf.keras.layers.BatchNormalization(name="bn")(x)
    x = lq.layers.QuantDepthwiseConv2D(
        3, padding="same", input_quantizer="ste_sign", depthwise_quantizer=_plain_sign,
        depthwise_constraint="weight_clip", use_bias=False, name="depthwise",
    )(x)
    x = lq.layers.QuantConv2D(1, 3, padding="same", name="one_filter", **BINARY)(x)
    x = tf.keras.layers.Flatten()(x)
    x = lq.layers.QuantDense(1, name="one_unit", **BINARY)(x)
    return tf.keras.Model(inputs, x, name="unmapped")


# A lone filter gives a mapper's batch statistics one value per channel where the
# normalisation sees no positions: cnn on a dense kernel (1x1 filters), mlp on any.
@pytest.mark.parametrize(
    "mapper, mapped_names",
    [("cnn", ["conv", "one_filter"]), ("mlp", ["conv"]), ("linear", ["conv", "one_filter", "one_unit"])],
)
def test_layers_that_are_not_mapped_are_left_alone_with_a_warning(mapper, mapped_names):
    tf.keras.utils.set_random_seed(0)
    model = _unmapped_layers_model()
    with pytest.warns(UserWarning) as caught:
        mapped = to_mapped(model, mapper=mapper)
    warned = {
        str(w.message).split("'")[1] for w in caught if str(w.message).startswith("to_mapped")
    }
    assert [l.name for l in mapped_layers(mapped)] == mapped_names
    assert warned == {"depthwise", "one_filter", "one_unit"} - set(mapped_names)
    assert mapped.get_layer("depthwise").depthwise_quantizer is _plain_sign
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 2)).astype("float32")
    assert _max_diff(mapped, model, x) < 1e-5
    assert _max_diff(bake(mapped), mapped, x) < 1e-5


@pytest.mark.parametrize(
    "mapper, kernel_shape, constant",
    [("cnn", (16, 1), True), ("mlp", (3, 3, 4, 1), True), ("cnn", (3, 3, 4, 1), False),
     ("linear", (16, 1), False)],
)
def test_one_filter_mappers_with_batch_statistics_are_constant(mapper, kernel_shape, constant):
    """Why those one-filter layers are left alone: their mapper would ignore W."""
    tf.keras.utils.set_random_seed(0)
    q = NoisyMappedQuantizer(mapper=mapper, start="warmup")
    q.build(kernel_shape)
    outputs = [q.mapper(kernel_to_filters(tf.random.normal(kernel_shape, seed=s))) for s in (1, 2)]
    assert np.array_equal(outputs[0], outputs[1]) == constant


def test_a_kernel_of_rank_5_is_left_alone_with_a_warning():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.Input((4, 4, 4, 1)),
        lq.layers.QuantConv3D(2, 3, name="conv3d", **BINARY),
        tf.keras.layers.Flatten(),
        lq.layers.QuantDense(3, name="dense", **BINARY),
    ])
    with pytest.warns(UserWarning, match=r"layer 'conv3d' keeps its own binarization.*rank 5"):
        mapped = to_mapped(model)
    assert [l.name for l in mapped_layers(mapped)] == ["dense"]
    x = np.random.default_rng(0).normal(size=(4, 4, 4, 4, 1)).astype("float32")
    assert _max_diff(mapped, model, x) < 1e-5


def test_resnet20_with_the_dorefa_baseline_converts_and_bakes_exactly():
    tf.keras.utils.set_random_seed(0)
    model = models.build("resnet20", (32, 32, 3), 10, kernel_quantizer="dorefa")
    assert all(isinstance(l.kernel_quantizer, models.DoReFaSign)
               for l in larq_noisy.binarized_layers(model))
    mapped = _quietly(to_mapped, model, mapper="linear")
    assert {l.kernel_quantizer.scale for l in mapped_layers(mapped)} == {"layer"}
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype("float32")
    assert _max_diff(mapped, model, x) < 1e-5
    baked = _quietly(bake, mapped)
    assert {type(l.kernel_quantizer) for l in larq_noisy.binarized_layers(baked)} == {
        models.DoReFaSign
    }
    assert _max_diff(baked, mapped, x) < 1e-5


def test_signs_are_taken_at_the_precision_the_layer_computes_with(toy_data):
    """Under mixed_float16 a weight of -1e-9 is -0 in float16, whose sign is +1."""
    x, _ = toy_data
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tf.keras.utils.set_random_seed(0)
        model = tiny_bnn()
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    layer = model.get_layer("bconv1")
    kernel = layer.kernel.numpy()
    kernel.flat[::7] = -1e-9
    layer.kernel.assign(kernel)
    float16_signs = np.where(kernel.astype("float16") >= 0, 1.0, -1.0)
    assert (float16_signs != np.sign(kernel)).sum() > 10

    mapped = to_mapped(model, labels="frozen")
    assert set(flip_rates(mapped).values()) == {0.0}
    assert set(flip_rates(mapped, reference=model).values()) == {0.0}
    q = mapped.get_layer("bconv1").kernel_quantizer
    np.testing.assert_array_equal(q.frozen_labels.numpy(), float16_signs)
    current = to_mapped(model)
    qc = current.get_layer("bconv1").kernel_quantizer
    np.testing.assert_array_equal(qc.noisy_labels(current.get_layer("bconv1").kernel), float16_signs)
    # The auxiliary loss from the float32 variable is the one the layer adds in float16.
    current(x[:2], training=True)
    in_call = [float(l) for l in current.losses]
    np.testing.assert_allclose(list(larq_noisy.auxiliary_losses(current).values()), in_call,
                               rtol=1e-6)
