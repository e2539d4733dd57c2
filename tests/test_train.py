"""train.py end to end: all arms, resume, mocked CIFAR-10/ImageNet, bad inputs.

A run killed mid-phase and resumed: tests/test_distributed.py."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import mocked_tfds

import train
from larq_noisy import training
from larq_noisy.protocols import get_protocol

# A smoke run of the offline default: a few steps on a few hundred real images.
SMOKE = [
    "--dataset", "fashion_mnist", "--pretrain-epochs", "1", "--finetune-epochs", "1",
    "--steps-per-epoch", "3", "--limit", "128", "--batch-size", "32", "--quiet",
]


def _results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One smoke run through every arm, shared by the checks below."""
    out = str(tmp_path_factory.mktemp("run") / "all_arms")
    argv = SMOKE + ["--arms", "sign", "mapped", "lns", "lns_rho0", "--output-dir", out]
    assert train.main(argv) == 0
    return out


def test_all_arms_write_results(full_run):
    results = _results(full_run)
    assert list(results["arms"]) == ["sign", "mapped", "lns", "lns_rho0"]
    for arm, r in results["arms"].items():
        for key in ("test_accuracy", "val_accuracy", "epochs", "wall_seconds", "flip_rate"):
            assert key in r, (arm, key)
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["epochs"] == 1
    assert results["arms"]["sign"]["quantizer"] is None
    assert results["arms"]["mapped"]["quantizer"]["alpha"] == 0.0
    assert results["arms"]["lns_rho0"]["quantizer"]["rho_pos"] == 0.0
    assert results["arms"]["lns"]["aux_loss"] > 0
    assert 0.0 <= results["baseline"]["test_accuracy"] <= 1.0
    for name in ("results.md", "accuracy.png", "flip_rates.png", "config.json",
                 "pretrain/weights.h5", "pretrain/checkpoint.h5"):
        assert os.path.exists(os.path.join(full_run, name)), name
    table = open(os.path.join(full_run, "results.md")).read()
    assert "| LNS (`lns`) |" in table and "baseline" in table


def test_logs_hold_flip_rates_aux_loss_and_lr(full_run):
    header = open(os.path.join(full_run, "arms", "lns", "history.csv")).readline()
    for column in ("flip_rate", "aux_loss", "lr", "val_accuracy"):
        assert column in header.split(","), column
    assert any(c.startswith("flip_rate/") for c in header.split(","))
    events = os.listdir(os.path.join(full_run, "tensorboard", "lns", "train"))
    assert events


def test_baked_models_are_stock_larq_and_match_the_reported_accuracy(full_run):
    from larq_noisy import datasets, mapped_layers

    model = tf.keras.models.load_model(os.path.join(full_run, "arms", "lns", "model.h5"))
    assert not mapped_layers(model)
    model.compile(metrics=["accuracy"], loss="sparse_categorical_crossentropy")
    test, _ = datasets.load("fashion_mnist", "test", 32, limit=128)
    accuracy = model.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    assert accuracy == pytest.approx(_results(full_run)["arms"]["lns"]["test_accuracy"], abs=1e-6)


def test_rerun_skips_finished_work(full_run):
    marker = os.path.join(full_run, "arms", "sign", "result.json")
    weights = os.path.join(full_run, "pretrain", "weights.h5")
    before = os.path.getmtime(marker), os.path.getmtime(weights)
    argv = SMOKE + ["--arms", "sign", "mapped", "lns", "lns_rho0", "--output-dir", full_run]
    assert train.main(argv) == 0
    assert (os.path.getmtime(marker), os.path.getmtime(weights)) == before


def test_pretrained_checkpoint_skips_phase_one(full_run, tmp_path):
    out = str(tmp_path / "from_pretrained")
    argv = SMOKE + ["--arms", "lns", "--pretrained", full_run, "--output-dir", out]
    assert train.main(argv) == 0
    assert not os.path.exists(os.path.join(out, "pretrain"))
    baseline = _results(out)["baseline"]
    assert baseline["test_accuracy"] == _results(full_run)["baseline"]["test_accuracy"]


def test_warmup_start_trains_the_mapper_alone_first(full_run, tmp_path):
    out = str(tmp_path / "warmup")
    argv = SMOKE + ["--arms", "lns", "--start", "warmup", "--warmup-epochs", "1",
                    "--pretrained", full_run, "--output-dir", out]
    assert train.main(argv) == 0
    assert os.path.exists(os.path.join(out, "arms", "lns", "warmup", "history.csv"))
    assert _results(out)["arms"]["lns"]["quantizer"]["start"] == "warmup"


def test_hparams_file_sets_defaults_and_flags_win(tmp_path):
    hparams = tmp_path / "best_hparams.json"
    hparams.write_text(json.dumps({"alpha": 0.25, "rho_pos": 0.01, "rho_neg": 0.02}))
    config = train.parse_args(["--hparams", str(hparams), "--alpha", "2"])
    assert (config.alpha, config.rho_pos, config.rho_neg) == (2.0, 0.01, 0.02)
    hparams.write_text(json.dumps({"alhpa": 1}))
    with pytest.raises(SystemExit):
        train.parse_args(["--hparams", str(hparams)])


@pytest.mark.parametrize(
    "dataset, model, size",
    [("cifar10", "resnet_e18", 32), ("imagenet2012", "birealnet18", 32)],
)
def test_mocked_tfds_pipelines_with_larq_zoo_models(dataset, model, size, tmp_path):
    out = str(tmp_path / dataset)
    argv = [
        # The sign arm: these check the tfds pipelines and larq-zoo models end to end;
        # an 18-layer mapper (82M parameters) would only add minutes here.
        "--dataset", dataset, "--model", model, "--image-size", str(size), "--arms", "sign",
        "--pretrain-epochs", "1", "--finetune-epochs", "1", "--steps-per-epoch", "2",
        "--limit", "16", "--batch-size", "8", "--optimizer", "adam",
        "--quiet", "--output-dir", out, "--data-dir", str(tmp_path / "tfds"),
    ]
    with mocked_tfds(dataset, tmp_path / "tfds", num_examples=64):
        assert train.main(argv) == 0
    results = _results(out)
    assert results["model"] == model
    if dataset == "imagenet2012":
        assert "test_top5" in results["arms"]["sign"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset", "svhn"], "invalid choice: 'svhn'"),
        (["--model", "vgg"], "invalid choice: 'vgg'"),
        (["--arms", "sign", "dorefa"], "invalid choice: 'dorefa'"),
        (["--rho", "0.6"], "rho_pos + rho_neg"),
        (["--rho-pos", "1.2"], "rho_pos=1.2"),
        (["--alpha", "-1"], "alpha=-1.0"),
        (["--finetune-epochs", "-2"], "finetune_epochs=-2"),
        (["--pretrained", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_arguments_fail_before_any_work(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + ["--output-dir", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "never")


def test_unwritable_output_and_missing_data_get_clear_messages(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert train.main(SMOKE + ["--output-dir", str(blocker / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    argv = ["--dataset", "cifar10", "--data-dir", str(empty), "--output-dir", str(tmp_path / "c")]
    assert train.main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and str(empty) in err


def test_changed_settings_on_a_resumed_run_are_refused(full_run, capsys):
    argv = SMOKE + ["--arms", "lns", "--alpha", "3", "--output-dir", full_run]
    assert train.main(argv) == 2
    recorded = get_protocol("fashion_mnist").lns.get("alpha")  # the protocol's, in config.json
    assert f"alpha: {recorded} -> 3.0" in capsys.readouterr().err


def test_nan_loss_stops_with_a_message_and_keeps_what_was_written(full_run, tmp_path, capsys):
    out = str(tmp_path / "diverging")
    argv = SMOKE + ["--arms", "lns", "--pretrained", full_run, "--optimizer", "sgd",
                    "--finetune-lr", "1e30", "--output-dir", out]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "the loss became nan" in err.lower() and "lns" in err
    results = _results(out)  # the baseline written before the arm is still there
    assert "baseline" in results and "lns" not in results["arms"]
    # The checkpoint fine-tuning started from is intact.
    weights = training.pretrained_weights_path(full_run)
    model = training.build_baseline(training.TrainConfig().resolved(), weights)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_export_flag_converts_and_verifies_each_arm(full_run, tmp_path):
    out = str(tmp_path / "exported")
    argv = SMOKE + ["--arms", "lns", "--pretrained", full_run, "--export", "--output-dir", out]
    assert train.main(argv) == 0
    results = _results(out)
    for arm in ("lns",):
        tflite = results["arms"][arm]["tflite"]
        assert tflite == os.path.join(out, "arms", arm, "model.tflite")
        with open(tflite + ".json") as f:
            report = json.load(f)
        assert report["ops"]["LceBconv2d"] == report["binarized_convs"] == 6
