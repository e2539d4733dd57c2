"""Mapper families: the `separable` mapper, multiply-add counts, and the cnn fast path."""

import importlib.util
import json
import os

import larq as lq
import numpy as np
import pytest
import tensorflow as tf
from conftest import set_batchnorm_statistics, tiny_bnn

import larq_noisy
from larq_noisy import NoisyMappedQuantizer, bake, mapped_layers, to_mapped
from larq_noisy.mappers import BatchStatNormalization, TapMixing, map_kernel, multiply_adds
from larq_noisy.losses import reduced_unbiased_loss
from larq_noisy.quantizers import filters_to_kernel, kernel_to_filters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(ROOT, "bench", "mapper_cost.py")
    spec = importlib.util.spec_from_file_location("bench_mapper_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_separable_identity_start_predicts_exactly_what_the_sign_model_predicts(toy_data):
    x, _ = toy_data
    tf.keras.utils.set_random_seed(0)
    model = tiny_bnn()
    mapped = to_mapped(model, mapper="separable")
    np.testing.assert_array_equal(mapped.predict(x, verbose=0), model.predict(x, verbose=0))
    for layer in mapped_layers(mapped):
        q = layer.kernel_quantizer
        kernel = layer.kernel.latent_variable
        np.testing.assert_array_equal(q.mapper_output(kernel), kernel)  # f(W) = W + 0, exactly


@pytest.fixture(scope="module")
def separable_model():
    """tiny_bnn with a plain (warm-up start) separable mapper: it departs from sign(W)."""
    tf.keras.utils.set_random_seed(0)
    model = to_mapped(set_batchnorm_statistics(tiny_bnn()), mapper="separable", width=0.5,
                      start="warmup")
    assert larq_noisy.size_weighted_mean(model, larq_noisy.flip_rates(model)) > 0.01
    return model


def test_separable_round_trips_config_h5_and_saved_model(separable_model, toy_data, tmp_path):
    x, _ = toy_data
    expected = separable_model.predict(x[:16], verbose=0)
    q = separable_model.get_layer("bconv1").kernel_quantizer
    assert NoisyMappedQuantizer.from_config(q.get_config()).get_config() == q.get_config()
    for path in (tmp_path / "model.h5", tmp_path / "saved_model"):
        separable_model.save(path)
        loaded = tf.keras.models.load_model(path)
        loaded_q = loaded.get_layer("bconv1").kernel_quantizer
        assert (loaded_q.mapper_kind, loaded_q.width) == ("separable", 0.5)
        np.testing.assert_allclose(loaded.predict(x[:16], verbose=0), expected, atol=1e-6)


def test_separable_bakes_and_exports_to_binary_convs(separable_model, toy_data, tmp_path):
    from larq_noisy import export

    x, _ = toy_data
    baked = bake(separable_model)
    assert not baked.losses
    np.testing.assert_allclose(baked.predict(x[:16], verbose=0),
                               separable_model.predict(x[:16], verbose=0), atol=1e-5)
    report = export.export_model(separable_model, tmp_path / "m.tflite", verify_images=16,
                                 verbose=False)
    assert report["ops"][export.BINARY_CONV_OP] == report["binarized_convs"] == 2
    assert report["agreement"]["threshold_hits"] == 0  # no rounding decides the outcome


def test_tap_mixing_is_one_map_over_the_taps_and_starts_as_the_identity():
    x = tf.random.normal((5, 3, 3, 4))
    mix = TapMixing()
    np.testing.assert_array_equal(mix(x), x)
    mix.kernel.assign(tf.random.normal((9, 9)))
    expected = np.einsum("pq,nqc->npc", mix.kernel.numpy(), x.numpy().reshape(5, 9, 4))
    np.testing.assert_allclose(mix(x), expected.reshape(5, 3, 3, 4), rtol=1e-5, atol=1e-5)
    again = TapMixing.from_config(mix.get_config())
    assert again.get_config() == mix.get_config()


def test_multiply_adds_match_a_hand_count():
    # 6 filters of 3x3x4; width 2 (cnn, mlp: 8 hidden units), 0.5 (separable: 2 units).
    def count(kind, width=None):
        q = NoisyMappedQuantizer(mapper=kind, width=width)
        q.build((3, 3, 4, 6))
        return multiply_adds(q.mapper, (6, 3, 3, 4))

    # cnn: 3x3 convs at 9 positions, 9 taps each (padding included), 4->8->8->4 channels.
    assert count("cnn") == 6 * 9 * 9 * (4 * 8 + 8 * 8 + 8 * 4)
    assert count("mlp") == 6 * (36 * 8 + 8 * 36)
    assert count("linear") == 6 * 36 * 36
    # separable: a 9x9 tap map per channel, then 4->2->4 at each of the 9 taps.
    assert count("separable", 0.5) == 6 * 4 * 81 + 6 * 9 * (4 * 2 + 2 * 4)


def test_bench_counts_a_network_by_hand(bench):
    # tiny_bnn per image: stem 3x3 conv 1->8 at 12x12, bconv1 8->16 at 12x12, bconv2
    # 16->16 at 6x6, bdense 16->16, head 16->10.
    tf.keras.utils.set_random_seed(0)
    network = 144 * 9 * 8 + 144 * 9 * 8 * 16 + 36 * 9 * 16 * 16 + 16 * 16 + 16 * 10
    assert bench.network_multiply_adds(tiny_bnn()) == network


def test_separable_meets_the_imagenet_targets_at_resnet18_shapes(bench):
    cost = bench.resnet18_mapper_cost("separable")
    assert cost["params"] <= 1_000_000
    assert cost["train_fraction"] <= 0.05  # of ResNet-18's training step at batch 256
    # ResNet-18 is 1.8 G multiply-adds per image forward; the mapper 3 x (k^2 + 2r) per
    # binary weight and pass, r = c_in / 4 (the cnn's: 72 c_in, 70% of the step).
    assert cost["network_train"] == pytest.approx(3 * 256 * 1.814e9, rel=1e-3)
    assert cost["train"] == 3 * sum(n * 9 * a * b * (9 + a // 2) for a, b, n in bench.RESNET18_CONVS)


@pytest.mark.parametrize(
    "kind, shape",
    [("cnn", (3, 3, 4, 6)), ("cnn", (3, 3, 16, 8)), ("separable", (3, 3, 8, 6)),
     ("separable", (12, 5)), ("separable", (3, 4, 6))],
)
@pytest.mark.parametrize("start", ["identity", "warmup"])
def test_kernel_layout_paths_change_no_numbers(kind, shape, start):
    tf.keras.utils.set_random_seed(5)
    q = NoisyMappedQuantizer(mapper=kind, width=0.5, start=start, rho_pos=0.01, rho_neg=0.03)
    q.build(shape)
    for v in q.mapper.weights:  # away from the identity start's zeros and ones
        v.assign(v + tf.random.normal(v.shape, stddev=0.3))
    kernel = tf.Variable(tf.random.uniform(shape, -1, 1))
    upstream = tf.random.normal(shape)
    variables = [kernel, *q.trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        fast = map_kernel(kind, q.mapper, kernel)
        stock = filters_to_kernel(q.mapper(kernel_to_filters(kernel)), shape)
        fast_loss, stock_loss = (tf.reduce_sum(m * upstream) for m in (fast, stock))
    assert fast is not None

    def assert_close(a, b):  # float32 rounding (sums in another order), at b's scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(tf.reduce_max(tf.abs(b))))

    assert_close(fast, stock)
    for a, b in zip(tape.gradient(fast_loss, variables), tape.gradient(stock_loss, variables)):
        assert_close(a, b)
    # The quantizer uses it: its f(W) is the stock path's.
    assert_close(q.mapper_output(kernel), stock + (kernel if start == "identity" else 0.0))


def test_kernel_layout_paths_only_where_they_are_exact():
    def fast(kind, shape, dtype="float32"):
        q = NoisyMappedQuantizer(mapper=kind, dtype=dtype)
        q.build(shape)
        return map_kernel(kind, q.mapper, tf.zeros(shape, q.compute_dtype))

    assert fast("cnn", (5, 5, 3, 4)) is None  # Toom-Cook for 3x3 kernels only
    assert fast("mlp", (3, 3, 3, 4)) is None and fast("linear", (3, 3, 3, 4)) is None
    assert fast("cnn", (3, 3, 3, 4), "mixed_float16") is None  # float32 only
    assert fast("separable", (3, 3, 3, 4)) is not None


@pytest.mark.parametrize("rho_pos, rho_neg", [(0.0, 0.0), (0.005, 0.005), (0.1, 0.02)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_as_one_quadratic_equals_the_two_squared_differences(rho_pos, rho_neg, reduction):
    t = tf.random.stateless_uniform((3, 3, 8, 16), (0, 1), -1, 1)
    y = lq.math.sign(tf.random.stateless_normal(t.shape, (0, 2)))
    reduce = tf.reduce_sum if reduction == "sum" else tf.reduce_mean
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(t)
        expected = reduce(larq_noisy.unbiased_loss(t, y, rho_pos, rho_neg))
        got = reduced_unbiased_loss(t, y, rho_pos, rho_neg, reduction)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(got, t), tape.gradient(expected, t), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "mixed_float16"])
def test_batch_stat_normalization_is_the_batch_formula(dtype):
    norm = BatchStatNormalization(dtype=dtype)
    x = tf.random.stateless_normal((16, 3, 3, 8), (1, 1)) * 3 + 1
    x = tf.cast(x, norm.compute_dtype)
    norm.build(x.shape)
    norm.gamma.assign(tf.random.stateless_normal((8,), (1, 2)))
    norm.beta.assign(tf.random.stateless_normal((8,), (1, 3)))
    x32 = tf.cast(x, tf.float32)
    mean, variance = np.mean(x32, axis=(0, 1, 2)), np.var(x32, axis=(0, 1, 2))
    expected = norm.gamma.numpy() * (x32 - mean) / np.sqrt(variance + 1e-3) + norm.beta.numpy()
    y = norm(x)
    assert y.dtype == x.dtype
    tolerance = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(tf.cast(y, tf.float32), expected, rtol=tolerance, atol=tolerance)


def test_bench_resumes_from_its_partial_file(bench, tmp_path, monkeypatch):
    done = {"ms_per_step": 500.0, "sign_ms_per_step": 400.0, "ratio_to_sign": 1.25,
            "cpu_ratio_to_sign": 1.2, "rounds": 20, "peak_rss_mib": 900.0, "params": 1}
    out = tmp_path / "cost.json"
    (tmp_path / "cost.json.partial").write_text(
        json.dumps({"cifar/cnn/batch128/steps20/jitFalse/aux_to_latentFalse": done}))

    def measure(kind, *args):  # only what is not in the partial file is measured
        assert kind == "separable"
        return {**done, "ratio_to_sign": 1.01}

    monkeypatch.setattr(bench, "_measure_in_subprocess", measure)
    bench.main(["--shapes", "cifar", "--kinds", "cnn", "separable", "--no-aux-to-latent",
                "--json", str(out)])
    report = json.loads(out.read_text())
    kinds = report["steps"]["cifar"]["kinds"]
    assert kinds["cnn"] == done and kinds["separable"]["ratio_to_sign"] == 1.01
    assert report["resnet18_imagenet"]["separable"]["params"] < 1_000_000
    assert not (tmp_path / "cost.json.partial").exists()  # complete: the final file only
