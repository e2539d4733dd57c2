"""The gradient paths of `clip` and `aux_to_latent`, and the saturation metric."""

import csv

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from conftest import BINARY

import larq_noisy
from larq_noisy import NoisyMappedQuantizer, mean_saturation, saturation, to_mapped

RHO = 0.1
TARGET = 1 / (1 - 2 * RHO)  # the corrected loss's optimum |t*| = 1.25 for equal rates
KERNEL = [  # a dense kernel (4 inputs, 3 outputs): |W| <= 1, well conditioned
    [0.5, -0.25, 0.75],
    [-0.5, 0.5, 0.25],
    [0.25, 0.75, -0.5],
    [-0.75, -0.5, -0.25],
]


def _dense(kernel=KERNEL, **options):
    # The paper's sum and aux_to_latent=True: the auxiliary loss's gradient on each W is
    # what is studied.
    options = {"alpha": 1.0, "rho_pos": RHO, "rho_neg": RHO, "aux_to_latent": True,
               "reduction": "sum", **options}
    kernel = np.asarray(kernel, "float32")
    layer = lq.layers.QuantDense(
        kernel.shape[1], **{**BINARY, "kernel_quantizer": NoisyMappedQuantizer(**options)}
    )
    layer(tf.zeros((1, kernel.shape[0])))  # builds the layer and its quantizer
    layer.kernel.assign(kernel)  # assign bypasses weight_clip: |W| > 1 is allowed here
    return layer


def _gradients(layer, x, task_weights):
    """The gradients of the auxiliary loss and of a task loss through the forward path."""
    variables = layer.trainable_weights
    with tf.GradientTape(persistent=True) as tape:
        out = layer(x)
        aux = tf.add_n(layer.losses)
        task = tf.reduce_sum(out * task_weights)
    zero = tf.UnconnectedGradients.ZERO
    return (
        float(aux),
        tape.gradient(aux, variables, unconnected_gradients=zero),
        tape.gradient(task, variables, unconnected_gradients=zero),
    )


@pytest.mark.parametrize("clip", ["hardtanh", "none"])
def test_hardtanh_has_a_dead_zone_past_one_and_clip_none_has_none(clip):
    # The identity start's mapper outputs 0 at step 0, so f(W) = W and t = clip(W).
    w = np.array([[1.5, -0.5, 0.5], [-1.5, 0.25, -0.75], [0.5, 1.25, -1.25], [0.75, -0.25, 1.0]])
    layer = _dense(w, mapper="linear", clip=clip)
    rng = np.random.default_rng(0)
    x, task_weights = rng.normal(size=(8, 4)), rng.normal(size=(8, 3))
    _, aux_grads, task_grads = _gradients(layer, tf.constant(x, "float32"), task_weights)
    past = np.abs(w) > 1  # at exactly 1 the clip still passes the gradient
    reachable = np.ones_like(w) if clip == "none" else ~past
    # d/dt (t - t*)^2 = 2 (t - t*), times d clip / d f (0 or 1); labels are sign(W).
    t = w if clip == "none" else np.clip(w, -1, 1)
    expected_aux = 2 * (t - np.sign(w) * TARGET) * reachable
    np.testing.assert_allclose(aux_grads[0], expected_aux, rtol=1e-5, atol=1e-6)
    # The task loss's STE: d out / d W_ij = sum_b sign(x_bi) c_bj where reachable.
    ste = np.sign(x).T @ task_weights
    assert np.all(ste != 0)  # so a 0 below is the clip's doing
    np.testing.assert_allclose(task_grads[0], ste * reachable, rtol=1e-5, atol=1e-6)
    expected = past if clip == "hardtanh" else np.zeros_like(past)
    np.testing.assert_array_equal(layer.kernel_quantizer.saturated(layer.kernel), expected)


@pytest.mark.parametrize("aux_to_latent", [True, False])
def test_clip_none_reaches_the_corrected_optimum_and_hardtanh_cannot(aux_to_latent):
    errors = {}
    for clip in ("none", "hardtanh"):
        tf.keras.utils.set_random_seed(0)
        layer = _dense(mapper="linear", clip=clip, aux_to_latent=aux_to_latent)
        quantizer, variables = layer.kernel_quantizer, layer.trainable_weights
        optimizer = tf.keras.optimizers.SGD(0.1)
        for _ in range(50):  # only the auxiliary loss
            with tf.GradientTape() as tape:
                loss = quantizer.auxiliary_loss(layer.kernel)
            gradients = tape.gradient(loss, variables, unconnected_gradients="zero")
            optimizer.apply_gradients(zip(gradients, variables))
        t = quantizer.clipped_output(layer.kernel)
        errors[clip] = np.abs(t - lq.math.sign(layer.kernel) * TARGET).max()
        np.testing.assert_array_equal(lq.math.sign(layer.kernel), np.sign(KERNEL))
    assert errors["none"] < 1e-2
    assert errors["hardtanh"] >= TARGET - 1 - 1e-6  # |t| <= 1 < t*


def test_aux_to_latent_false_trains_the_mapper_only():
    tf.keras.utils.set_random_seed(5)
    x = tf.random.normal((8, 4))
    task_weights = tf.random.normal((8, 3))
    runs = {}
    for aux_to_latent in (True, False):
        # A warmup (plain) mlp mapper: f(W) depends on W through the mapper too.
        layer = _dense(mapper="mlp", start="warmup", aux_to_latent=aux_to_latent)
        if runs:
            layer.set_weights(runs[True][0].get_weights())
        runs[aux_to_latent] = (layer, *_gradients(layer, x, task_weights))
    (_, aux_on, aux_grads_on, task_grads_on) = runs[True]
    (_, aux_off, aux_grads_off, task_grads_off) = runs[False]
    assert aux_off == pytest.approx(aux_on, rel=1e-6)  # same loss value
    assert np.all(aux_grads_off[0].numpy() == 0.0)  # exactly none on the latent weights
    assert np.abs(aux_grads_on[0]).max() > 0  # (the paper's way: some)
    for off, on in zip(aux_grads_off[1:], aux_grads_on[1:]):  # the mapper's: unchanged
        np.testing.assert_allclose(off, on, rtol=1e-5, atol=1e-7)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in aux_grads_off[1:]) > 0
    for off, on in zip(task_grads_off, task_grads_on):  # the forward path: unchanged
        np.testing.assert_allclose(off, on, rtol=1e-5, atol=1e-7)
    assert np.abs(task_grads_off[0]).max() > 0


def _force_past_one(model, layer_name, positions):
    """Add 2 to the linear mapper's output at `positions` of every filter."""
    layer = model.get_layer(layer_name)
    dense = next(l for l in layer.kernel_quantizer.mapper.layers if l.weights)
    bias = np.zeros(dense.bias.shape, "float32")
    bias[:positions] = 2.0  # f(W) = W + 2 > 1 there, as |W| < 1
    dense.bias.assign(bias)
    return positions / bias.size


@pytest.mark.parametrize("clip", ["hardtanh", "none"])
def test_saturation_counts_mapper_outputs_past_the_clip(tiny_model, clip):
    mapped = to_mapped(tiny_model, mapper="linear", clip=clip)
    assert set(saturation(mapped).values()) == {0.0}  # the identity start: f(W) = W
    fraction = _force_past_one(mapped, "bconv1", positions=18)  # 18 of 3 * 3 * 8
    assert fraction == 0.25
    expected = {"bconv1": fraction if clip == "hardtanh" else 0.0, "bconv2": 0.0, "bdense": 0.0}
    assert saturation(mapped) == expected
    sizes = {"bconv1": 3 * 3 * 8 * 16, "bconv2": 3 * 3 * 16 * 16, "bdense": 16 * 16}
    weighted = expected["bconv1"] * sizes["bconv1"] / sum(sizes.values())
    assert mean_saturation(mapped) == pytest.approx(weighted)
    assert mean_saturation(mapped, saturation(mapped)) == pytest.approx(weighted)
    with pytest.raises(ValueError, match="no mapped layer"):
        saturation(tiny_model)


def test_flip_rate_callback_logs_saturation(tiny_model, toy_data, tmp_path):
    callback = larq_noisy.FlipRateCallback()
    callback.set_model(tiny_model)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert "flip_rate" in logs and not any(k.startswith("saturation") for k in logs)

    mapped = to_mapped(tiny_model, mapper="linear", alpha=0.0)
    _force_past_one(mapped, "bconv1", positions=18)
    callback.set_model(mapped)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs["saturation/bconv1"] == 0.25
    assert logs["saturation/bdense"] == 0.0
    assert logs["saturation"] == pytest.approx(mean_saturation(mapped))

    mapped.compile("sgd", "sparse_categorical_crossentropy")
    x, y = toy_data
    csv_path = tmp_path / "history.csv"
    history = mapped.fit(
        x[:64], y[:64], batch_size=32, epochs=1, verbose=0,
        callbacks=[callback, tf.keras.callbacks.CSVLogger(str(csv_path))],
    ).history
    assert history["saturation/bconv1"][-1] == saturation(mapped)["bconv1"] > 0
    with open(csv_path) as f:
        assert {"saturation", "saturation/bconv2"} <= set(next(csv.reader(f)))
