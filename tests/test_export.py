"""`larq_noisy.export`: baked, converted, verified LCE flatbuffers; `harness.exporting`
(an arm of a run) and the CLI."""

import json

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import larq_noisy
import models
from conftest import BINARY, set_batchnorm_statistics, tiny_bnn
from harness import datasets, exporting
from larq_compute_engine import convert_keras_model
from larq_noisy import export
from larq_noisy.conversion import rebuild
from export import main
from larq_noisy.export import VerificationError, export_model

FASHION_SHAPE = (28, 28, 1)


def _flip_rate(mapped):
    return larq_noisy.size_weighted_mean(mapped, larq_noisy.flip_rates(mapped))


@pytest.fixture(scope="module")
def fashion_test_images():
    batches, _ = datasets.load("fashion_mnist", "test", 128, limit=128)
    return np.concatenate([images.numpy() for images, _ in batches])


@pytest.fixture(scope="module")
def trained_small():
    """bnn_small, mapped and fitted for a few steps on Fashion-MNIST."""
    tf.keras.utils.set_random_seed(0)
    mapped = larq_noisy.to_mapped(models.build("bnn_small", FASHION_SHAPE, 10), start="warmup")
    mapped.compile("adam", "sparse_categorical_crossentropy", run_eagerly=True)  # no tracing
    train, _ = datasets.load("fashion_mnist", "train", 64, limit=160)  # 128 to train on
    mapped.fit(train, epochs=1, verbose=0)
    assert _flip_rate(mapped) > 0.01  # the mapper departs from sign(W)
    return mapped


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, trained_small):
    """A train.py run directory: config.json and the baked lns model (sign: a stand-in)."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(
        {"dataset": "fashion_mnist", "image_size": None, "data_dir": None, "limit": None}
    ))
    for arm in ("lns", "sign"):
        (run / "arms" / arm).mkdir(parents=True)
    larq_noisy.bake(trained_small).save(run / "arms" / "lns" / "model.h5")
    (run / "arms" / "sign" / "model.h5").write_bytes(b"")  # listed, never loaded
    (run / "arms" / "mapped").mkdir()  # an arm still training: no model.h5
    return run


def _float_input_bnn():
    """A BNN whose first binarized conv takes float inputs: LCE keeps it a float conv."""
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(16, 3, padding="same")(inputs)
    x = lq.layers.QuantConv2D(16, 3, padding="same", kernel_quantizer="ste_sign")(x)
    x = tf.keras.layers.BatchNormalization()(x)
    x = lq.layers.QuantConv2D(16, 3, padding="same", input_quantizer="ste_sign",
                              kernel_quantizer="ste_sign")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(10, activation="softmax")(x))


def _unbaked_bnn():
    """A mapped BNN whose binarized conv has a 3x3x64x64 kernel: left unbaked, the cnn
    mapper stays in the graph and LCE makes it a float conv."""
    inputs = tf.keras.Input((6, 6, 3))
    x = tf.keras.layers.Conv2D(64, 3, padding="same")(inputs)
    x = tf.keras.layers.BatchNormalization()(x)
    x = lq.layers.QuantConv2D(64, 3, padding="same", **BINARY)(x)
    x = tf.keras.layers.BatchNormalization()(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf.keras.layers.Dense(10, activation="softmax")(x)
    return larq_noisy.to_mapped(tf.keras.Model(inputs, outputs), mapper="cnn")


def _sign_of_latent(mapped):
    """`mapped` with each mapped kernel binarized as sign(W), not as the mapper's Q^:
    what LCE converts when the bake is left out and the mapper dropped."""
    ids = {id(layer) for layer in larq_noisy.mapped_layers(mapped)}
    return rebuild(mapped, lambda layer, config: (
        {**config, "kernel_quantizer": "ste_sign"} if id(layer) in ids else config))


def _random_images(count, shape):
    return np.random.default_rng(0).standard_normal((count, *shape)).astype("float32")


def test_small_mapped_model_exports_to_binary_convs_that_agree_on_fashion(
    trained_small, fashion_test_images, tmp_path
):
    out = tmp_path / "small.tflite"
    report = export_model(trained_small, out, verify_images=fashion_test_images,
                          verify_source="fashion_mnist test", verbose=False)

    convs = export.binarized_convs(trained_small)
    assert len(convs) == 6
    assert report["ops"][export.BINARY_CONV_OP] == len(convs) == report["binarized_convs"]
    assert export.BINARY_CONV_OP not in report["float_ops"]
    assert report["prepared"] == ["baked"]
    assert report["agreement"]["images"] == 128
    assert report["agreement"]["top1_agreement"] >= 0.99
    assert report["agreement"]["threshold_hits"] == 0  # trained BatchNorm: no exact ties
    assert report["size_ratio"] > 5
    assert out.read_bytes()[4:8] == b"TFL3" and out.stat().st_size == report["bytes"]
    assert json.loads((tmp_path / "small.tflite.json").read_text()) == report
    assert isinstance(convs[0].kernel_quantizer, larq_noisy.NoisyMappedQuantizer)  # untouched


def test_mapped_resnet20_exports_every_binarized_conv_as_lce_bconv(tmp_path):
    tf.keras.utils.set_random_seed(1)
    baseline = set_batchnorm_statistics(models.build("resnet20", (32, 32, 3), 10))
    mapped = larq_noisy.to_mapped(baseline, start="warmup")
    assert _flip_rate(mapped) > 0.01
    report = export_model(mapped, tmp_path / "r20.tflite", verify_images=16, verbose=False)
    assert report["agreement"]["threshold_hits"] == 0
    assert report["binarized_convs"] == 18
    assert report["ops"][export.BINARY_CONV_OP] == 18
    assert report["agreement"]["inputs"] == "16 random inputs"
    assert report["agreement"]["top1_agreement"] >= 0.99
    assert report["size_ratio"] > 5


def test_a_binarized_conv_left_in_float_fails_loudly_and_writes_nothing(tmp_path):
    out = tmp_path / "model.tflite"
    with pytest.raises(VerificationError, match=r"1 LceBconv2d ops .* 2 binarized convs"):
        export_model(_float_input_bnn(), out, verify_images=0, verbose=False)
    assert not out.exists() and not (tmp_path / "model.tflite.json").exists()


def test_a_report_with_nan_is_refused_before_the_flatbuffer_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "measure_agreement",
                        lambda *args, **kwargs: {"exact_images": 4, "max_abs_diff": np.nan})
    out = tmp_path / "model.tflite"
    with pytest.raises(ValueError, match="not JSON compliant"):
        export_model(tiny_bnn(), out, verify_images=4, verbose=False)
    assert not out.exists() and not (tmp_path / "model.tflite.json").exists()


def test_exact_zeros_at_binary_inputs_are_counted_and_named():
    """larq's sign maps 0 (and -0.0) to +1; LCE's fused BatchNorm threshold may not
    (docs/METHOD.md section 7). An untrained BatchNorm passes the integer sums of a
    binary conv on unchanged, so many reach the next sign as exact zeros: the export
    counts them, and names them when LCE disagrees."""
    np.testing.assert_array_equal(lq.quantizers.ste_sign(tf.constant([0.0, -0.0, 1e-30])),
                                  [1.0, 1.0, 1.0])
    tf.keras.utils.set_random_seed(0)
    untrained = tiny_bnn()
    images = np.random.default_rng(0).standard_normal((16, 12, 12, 1)).astype("float32")
    hits = export.threshold_hits(untrained, images)
    assert hits["binary_inputs"] == 16 * (12 * 12 * 8 + 6 * 6 * 16 + 16)  # bconv1, 2, bdense
    assert hits["threshold_hits"] > 100
    trained = export.threshold_hits(set_batchnorm_statistics(untrained), images)
    assert trained == {"threshold_hits": 0, "binary_inputs": hits["binary_inputs"]}
    agreement = {**_differing(images=16, exact=0), **hits}
    with pytest.raises(VerificationError,
                       match=rf"{hits['threshold_hits']} of the .* exactly 0.*train the model"):
        export.check_agreement(agreement)


def _differing(images, exact):
    """An agreement (`measure_agreement`) in which `exact` of `images` are exact."""
    return {"images": images, "exact_images": exact, "tolerance": export.TOLERANCE,
            "compared": "log_probabilities", "min_rel_diff": 0.0 if exact else 0.02,
            "max_rel_diff": 0.3, "top1_agreement": 0.95, "decisive_images": images,
            "decisive_top1_agreement": 0.95, "max_abs_diff": 0.04, "threshold_hits": 0,
            "binary_inputs": 1000 * images}


def test_too_few_exact_images_fail_loudly_naming_the_figures_and_the_fix():
    with pytest.raises(VerificationError) as error:
        export.check_agreement(_differing(images=100, exact=0))
    message = str(error.value)
    assert "to float32 rounding (0.00012 of the outputs' scale), on 0 of 100 images " \
           "(required: 1); the log-probabilities of an image differ by 0.02 to 0.3" in message
    assert "top-1 agreement 95.00%" in message and "must be baked" in message
    export.check_agreement(_differing(images=100, exact=0), min_exact=0)  # report only
    export.check_agreement(_differing(images=100, exact=3), min_exact=3)
    with pytest.raises(VerificationError, match="on 3 of 100 images .required: 4."):
        export.check_agreement(_differing(images=100, exact=3), min_exact=4)


def test_a_near_uniform_1000_class_model_is_verified_on_its_outputs_not_its_top1(tmp_path):
    """A barely trained 1000-class model's softmax is near uniform: the top-1 class is a
    near tie that rounding decides, as the former rule (top-1 agreement >= 99%) did not
    know. Its outputs match to rounding, and no image is decisive by construction: its
    logits are below 1e-5, its top-2 margins far below twice the tolerance."""
    tf.keras.utils.set_random_seed(0)
    model = set_batchnorm_statistics(tiny_bnn(num_classes=1000))
    head = model.get_layer("head")
    head.set_weights([head.kernel.numpy() * 1e-5, np.zeros(1000)])
    images = _random_images(16, (12, 12, 1))
    report = export_model(model, tmp_path / "uniform.tflite", verify_images=images,
                          verbose=False)
    agreement = report["agreement"]
    probabilities = model.predict(images, verbose=0)
    assert np.all(np.abs(probabilities * 1000 - 1) < 1e-3)  # near uniform
    assert agreement["compared"] == "log_probabilities"
    assert agreement["exact_images"] == agreement["images"] == 16
    assert agreement["max_rel_diff"] <= export.TOLERANCE
    assert agreement["decisive_images"] == 0 and agreement["decisive_top1_agreement"] is None
    assert (tmp_path / "uniform.tflite").exists()


def test_a_kernel_sign_bit_packed_at_negative_zero_is_refused():
    """larq binarizes a kernel weight of -0.0 to +1; LCE folds larq's sign and agrees.
    A conversion that bit-packed it by its sign bit (-1) moves every image."""
    tf.keras.utils.set_random_seed(0)
    model = set_batchnorm_statistics(tiny_bnn())
    kernel = model.get_layer("bdense").kernel
    signed_zero = kernel.numpy()
    signed_zero[0, 0] = -0.0
    kernel.assign(signed_zero)
    assert np.signbit(kernel.numpy()[0, 0]) and lq.quantizers.ste_sign(kernel.numpy())[0, 0] == 1
    images = _random_images(16, (12, 12, 1))
    export.check_agreement(export.measure_agreement(model, convert_keras_model(model), images))

    packed = tf.keras.models.clone_model(model)
    packed.set_weights(model.get_weights())
    signed_zero[0, 0] = -1.0
    packed.get_layer("bdense").kernel.assign(signed_zero)
    wrong = export.measure_agreement(model, convert_keras_model(packed), images)
    assert wrong["exact_images"] == 0 and wrong["min_rel_diff"] > 10 * export.TOLERANCE
    with pytest.raises(VerificationError, match=r"on 0 of 16 images .* must be baked"):
        export.check_agreement(wrong)


def test_a_mapped_model_converted_without_its_bake_is_refused(trained_small,
                                                              fashion_test_images):
    """Without the bake, the flatbuffer binarizes the latent weights, sign(W): the
    mapper's flips (over 1% of the weights, `trained_small`) are lost on every image."""
    flatbuffer = convert_keras_model(_sign_of_latent(trained_small))
    agreement = export.measure_agreement(trained_small, flatbuffer, fashion_test_images)
    assert agreement["exact_images"] == 0
    with pytest.raises(VerificationError, match=r"on 0 of 128 images .* must be baked"):
        export.check_agreement(agreement)


def test_a_mapped_model_left_unbaked_becomes_float_convs_and_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "bake", lambda model: model)  # the bake left out
    out = tmp_path / "unbaked.tflite"
    with pytest.raises(VerificationError,
                       match=r"0 LceBconv2d ops .* 1 binarized convs .* Bake mapped models"):
        export_model(_unbaked_bnn(), out, verify_images=0, verbose=False)
    assert not out.exists()


def test_more_exact_images_than_verified_are_refused_before_converting(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "convert_keras_model", lambda model: pytest.fail("converted"))
    with pytest.raises(ValueError, match="min_exact is 5 but only 4 images are verified"):
        export_model(_float_input_bnn(), tmp_path / "m.tflite", verify_images=4, min_exact=5,
                     verbose=False)


def test_prepare_bakes_a_mixed_precision_model_then_rebuilds_it_in_float32():
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tf.keras.utils.set_random_seed(2)
        mapped = larq_noisy.to_mapped(tiny_bnn(), start="warmup")
        baked_in_training = larq_noisy.bake(mapped)  # as train.py bakes it
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    prepared, steps = export.prepare_for_export(mapped)
    assert steps == ["baked", "float32"]
    assert not larq_noisy.mapped_layers(prepared)
    assert not export._is_mixed_precision(prepared)
    for layer in larq_noisy.binarized_layers(baked_in_training):
        np.testing.assert_array_equal(prepared.get_layer(layer.name).kernel, layer.kernel)
    x = np.random.default_rng(0).standard_normal((4, 12, 12, 1)).astype("float32")
    assert prepared.predict(x, verbose=0).dtype == np.float32


def test_cli_exports_the_lns_arm_of_a_run(run_dir, capsys):
    assert main([str(run_dir), "--verify", "64"]) == 0
    out = run_dir / "arms" / "lns" / "model.tflite"
    report = json.loads((run_dir / "arms" / "lns" / "model.tflite.json").read_text())
    assert out.stat().st_size == report["bytes"]
    assert report["prepared"] == []  # train.py saves baked models
    assert report["ops"][export.BINARY_CONV_OP] == 6
    assert report["agreement"]["inputs"] == "64 fashion_mnist test images"
    assert report["agreement"]["top1_agreement"] >= 0.99
    assert "6 binarized convs -> 6 LceBconv2d: ok" in capsys.readouterr().out


def test_cli_exits_1_and_writes_nothing_when_a_model_file_fails_a_check(tmp_path, capsys):
    source = tmp_path / "float_input.h5"
    _float_input_bnn().save(source)
    assert main([str(source), "--verify", "0"]) == 1
    assert "export failed, nothing written" in capsys.readouterr().err
    assert not (tmp_path / "float_input.tflite").exists()  # the default output


def test_missing_test_data_falls_back_to_random_inputs_and_says_so(tmp_path):
    images, source = exporting.dataset_images(_float_input_bnn(), "cifar10", 8, data_dir=tmp_path)
    assert images == 8 and source == "8 random inputs (cifar10 is not on this machine)"


def test_cli_exits_2_on_a_missing_source(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export.py: error: ") and "nowhere" in err


@pytest.mark.parametrize("name", ["model.h5", "notes.txt"])
def test_a_file_that_is_no_model_is_named_with_what_to_give(name, run_dir, tmp_path, capsys):
    model = run_dir / "arms" / "lns" / "model.h5"
    source = tmp_path / name  # a truncated model, or no model at all, outside any run
    source.write_bytes(model.read_bytes()[:2048] if name == "model.h5" else b"some notes\n")
    assert main([str(source), "--verify", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"export.py: error: {source} is not a readable Keras model (")
    assert err.rstrip().endswith("): give the path of a model saved by `model.save` (.h5, "
                                 ".keras or a SavedModel directory), or a train.py run directory.")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_unreadable_model_of_a_run_is_trained_again_by_train_py(run_dir, capsys):
    assert main([str(run_dir), "--arm", "sign", "--verify", "0"]) == 2  # its model.h5 is empty
    err = capsys.readouterr().err
    assert err.startswith(f"export.py: error: {run_dir / 'arms' / 'sign' / 'model.h5'} is not "
                          "a readable Keras model")
    arm_dir = run_dir / "arms" / "sign"
    assert err.rstrip().endswith(
        f"train.py writes it again if you delete {arm_dir} and rerun that run's train.py command.")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_untrained_arm_lists_the_trained_ones(run_dir):
    for arm in ("mapped", "lns_rho0"):
        with pytest.raises(ValueError, match=rf"Arm '{arm}' was not trained.*\['lns', 'sign'\]"):
            exporting.export_arm(run_dir, arm)


def test_a_model_without_binarized_layers_is_refused(tmp_path):
    inputs = tf.keras.Input(FASHION_SHAPE)
    x = tf.keras.layers.Flatten()(inputs)
    plain = tf.keras.Model(inputs, tf.keras.layers.Dense(10)(x), name="plain")
    with pytest.raises(ValueError, match="'plain' has no binarized layer"):
        export_model(plain, tmp_path / "plain.tflite", verbose=False)


@pytest.mark.parametrize("where", ["missing_dir", "parent_is_a_file", "a_directory"])
def test_an_unwritable_output_is_refused_before_converting(where, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    out = {
        "missing_dir": tmp_path / "missing" / "model.tflite",
        "parent_is_a_file": tmp_path / "file" / "model.tflite",
        "a_directory": tmp_path,
    }[where]
    monkeypatch.setattr(export, "convert_keras_model", lambda model: pytest.fail("converted"))
    with pytest.raises(ValueError, match="Output"):
        export_model(_float_input_bnn(), out, verbose=False)
