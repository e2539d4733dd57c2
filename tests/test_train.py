"""train.py end to end: all arms, resume, mocked CIFAR-10, bad inputs (ImageNet:
tests/test_imagenet.py).

A run killed mid-phase and resumed: tests/test_distributed.py."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from conftest import mocked_tfds

import train
from harness import protocols, training
from harness.protocols import get_protocol

# A smoke run of the offline default: a few steps on a few hundred real images. Its
# 3-step checkpoint is no pretrained model to guard (its mappers flip ~5% in 2 steps):
# the guard has tests of its own.
SMOKE = [
    "--dataset", "fashion_mnist", "--pretrain-epochs", "1", "--finetune-epochs", "1",
    "--steps-per-epoch", "3", "--limit", "128", "--batch-size", "32", "--quiet", "--no-guard",
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
    tuned = get_protocol("fashion_mnist").tuned  # each arm at its own tuned rate
    assert results["arms"]["sign"]["finetune_lr"] == tuned["sign"]["finetune_lr"]
    assert results["arms"]["mapped"]["finetune_lr"] == tuned["lns"]["finetune_lr"]
    assert results["arms"]["lns"]["quantizer"]["alpha"] == tuned["lns"]["alpha"]
    assert 0.0 <= results["baseline"]["test_accuracy"] <= 1.0
    for name in ("results.md", "accuracy.png", "flip_rates.png", "config.json",
                 "pretrain/weights.h5", "pretrain/checkpoint.h5"):
        assert os.path.exists(os.path.join(full_run, name)), name
    table = open(os.path.join(full_run, "results.md")).read()
    assert "| LNS (`lns`) |" in table and "baseline" in table
    assert not os.path.exists(os.path.join(full_run, "lock"))  # released at the end


def test_logs_hold_flip_rates_aux_loss_and_lr(full_run):
    header = open(os.path.join(full_run, "arms", "lns", "history.csv")).readline()
    for column in ("flip_rate", "aux_loss", "lr", "val_accuracy"):
        assert column in header.split(","), column
    assert any(c.startswith("flip_rate/") for c in header.split(","))
    events = os.listdir(os.path.join(full_run, "tensorboard", "lns", "train"))
    assert events


def test_baked_models_are_stock_larq_and_match_the_reported_accuracy(full_run):
    from harness import datasets
    from larq_noisy import mapped_layers

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
    # --pretrain-epochs is this run's setting, unused: results.md says what the checkpoint
    # was trained with (full_run: 1 epoch).
    argv = SMOKE + ["--arms", "lns", "--pretrain-epochs", "5", "--pretrained", full_run,
                    "--output-dir", out]
    assert train.main(argv) == 0
    assert not os.path.exists(os.path.join(out, "pretrain"))
    baseline = _results(out)["baseline"]
    assert baseline["test_accuracy"] == _results(full_run)["baseline"]["test_accuracy"]
    assert _results(out)["pretraining"] == {"run": full_run, "epochs": 1}
    table = open(os.path.join(out, "results.md")).read()
    assert f"Seed 0; pretraining 1 epoch (the run {full_run}, given as --pretrained), " in table


def test_pretrained_weights_of_another_model_or_no_weights_say_which(full_run, tmp_path, capsys):
    weights = os.path.join(full_run, "pretrain", "weights.h5")
    bare, notes = str(tmp_path / "weights.h5"), str(tmp_path / "notes.txt")
    shutil.copy(weights, bare)
    open(notes, "w").write("lr 1e-3 looked best\n")
    for pretrained, message in [
        (full_run, f"{weights} holds the weights of model 'bnn_small' ({full_run}/config.json "
                   "says so), not of model 'resnet20': give a checkpoint pretrained with "
                   "--model resnet20, or run with --model bnn_small."),
        (bare, f"{bare} does not fit model 'resnet20' with input (28, 28, 1) and 10 classes ("),
        (notes, f"{notes!r} is not an HDF5 weights file: give a train.py output directory whose "
                "pretraining finished, or its pretrain/weights.h5."),
    ]:
        out = str(tmp_path / f"out_{len(os.listdir(tmp_path))}")
        argv = [a for a in SMOKE if a != "--quiet"]  # default verbosity: what users run
        argv += ["--model", "resnet20", "--arms", "sign", "--pretrained", pretrained]
        assert train.main(argv + ["--output-dir", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"train.py: error: {message}"), err
        assert "delete" not in err and len(err.strip().splitlines()) == 1
        assert not os.path.exists(os.path.join(out, "results.json"))


def test_results_say_a_bare_weights_file_was_pretrained_for_unknown_epochs(full_run, tmp_path):
    weights = str(tmp_path / "weights.h5")
    shutil.copy(os.path.join(full_run, "pretrain", "weights.h5"), weights)
    out = str(tmp_path / "from_file")
    assert train.main(SMOKE + ["--arms", "sign", "--pretrained", weights, "--output-dir", out]) == 0
    assert _results(out)["pretraining"] == {"run": None, "epochs": None}
    table = open(os.path.join(out, "results.md")).read()
    assert (f"Seed 0; pretraining unknown: a weights file ({weights}, given as --pretrained), "
            in table)


def test_warmup_start_trains_the_mapper_alone_first(full_run, tmp_path):
    out = str(tmp_path / "warmup")
    argv = SMOKE + ["--arms", "lns", "--start", "warmup", "--warmup-epochs", "1",
                    "--pretrained", full_run, "--output-dir", out]
    assert train.main(argv) == 0
    assert os.path.exists(os.path.join(out, "arms", "lns", "warmup", "history.csv"))
    assert _results(out)["arms"]["lns"]["quantizer"]["start"] == "warmup"


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"lr": "abc"}', "lr='abc' must be a number"),
        ("42", "must hold a JSON object of settings, not int 42"),
        ('{"batch_size": 1.5}', "batch_size=1.5 must be a whole number"),
        ('{"alpha": NaN}', "alpha=nan must be a finite number"),
        ('{"arms": "lns"}', "arms='lns' must be a list of strings"),
        ("{not json", "is unreadable"),
    ],
)
def test_bad_hparams_are_named_before_any_work(content, needle, tmp_path, capsys):
    hparams = tmp_path / "best_hparams.json"
    hparams.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--hparams", str(hparams), "--output-dir", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and needle in err and str(hparams) in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "never")


def test_hparams_file_sets_defaults_and_flags_win(tmp_path):
    hparams = tmp_path / "best_hparams.json"
    hparams.write_text(json.dumps({"alpha": 0.25, "rho_pos": 0.01, "rho_neg": 0.02}))
    config = train.parse_args(["--hparams", str(hparams), "--alpha", "2"])
    assert (config.alpha, config.rho_pos, config.rho_neg) == (2.0, 0.01, 0.02)
    hparams.write_text(json.dumps({"alhpa": 1}))
    with pytest.raises(SystemExit):
        train.parse_args(["--hparams", str(hparams)])


def test_hparams_per_arm_set_that_arm_and_the_arms_tuned_as_it(tmp_path, capsys):
    def write(name, values):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(values))
        return str(path)

    sign = write("sign", {"finetune_lr": 1e-5})
    lns = write("lns", {"alpha": 0.5, "finetune_lr": 2e-3})
    config = train.parse_args(["--hparams", f"sign={sign}", f"lns={lns}", "--rho", "0.1"])
    assert config.for_arm("sign").finetune_lr == 1e-5
    assert (config.for_arm("lns").alpha, config.for_arm("lns").finetune_lr) == (0.5, 2e-3)
    assert config.for_arm("mapped").finetune_lr == 2e-3 and config.quantizer_options("mapped")["alpha"] == 0
    assert config.for_arm("lns").rho_pos == 0.1  # a flag wins
    bop = get_protocol("fashion_mnist").tuned["bop"]
    assert config.for_arm("bop").finetune_lr == bop["finetune_lr"]  # no file: the protocol's
    for argv, needle in (
        ([f"mapped={lns}"], "'mapped' is not a tuned arm"),
        ([f"sign={write('bad', {'seed': 1})}"], "keys ['seed'] that are not an arm's"),
        ([sign, f"sign={sign}"], "['finetune_lr'] given both for every arm"),
    ):
        with pytest.raises(SystemExit):
            train.parse_args(["--hparams", *argv])
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err


def test_mocked_cifar10_with_a_larq_zoo_model(tmp_path):
    """The tfds pipeline of small images and a larq-zoo model, end to end (ImageNet's, on
    real files: tests/test_imagenet.py)."""
    out = str(tmp_path / "cifar10")
    argv = [
        # The sign arm: an 18-layer mapper (82M parameters) would only add minutes here.
        "--dataset", "cifar10", "--model", "resnet_e18", "--image-size", "32", "--arms", "sign",
        "--pretrain-epochs", "1", "--finetune-epochs", "1", "--steps-per-epoch", "2",
        "--limit", "16", "--batch-size", "8", "--optimizer", "adam",
        "--quiet", "--output-dir", out, "--data-dir", str(tmp_path / "tfds"),
    ]
    with mocked_tfds("cifar10", tmp_path / "tfds", num_examples=64):
        assert train.main(argv) == 0
    assert _results(out)["model"] == "resnet_e18"


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
        # Floats that parse but are no setting: refused before any work, not after it.
        (["--alpha", "nan"], "alpha=nan must be a finite number"),
        (["--alpha", "inf"], "alpha=inf must be a finite number"),
        (["--width", "nan"], "width=nan must be a finite number"),
        (["--finetune-lr", "inf"], "finetune_lr=inf must be a finite number"),
        (["--rho", "nan"], "rho_pos=nan must be a finite number"),
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
    recorded = get_protocol("fashion_mnist").tuned["lns"]["alpha"]  # what the arm used
    assert f"lns.alpha: {recorded} -> 3.0" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(full_run, "lock"))  # released after an error too


def test_a_run_that_stopped_before_its_first_checkpoint_is_replaced(tmp_path, capsys):
    """A run that trained nothing (its data was not found) does not block the corrected
    command; once a run has written a result, other settings are refused again."""
    out, nowhere = str(tmp_path / "run"), tmp_path / "no_data"
    nowhere.mkdir()
    # The shipped checkpoint and no arm: the baseline is evaluated, nothing trained.
    evaluation = SMOKE + ["--arms", "--output-dir", out]
    assert train.main(evaluation + ["--data-dir", str(nowhere)]) == 2
    assert "fashion_mnist is not prepared" in capsys.readouterr().err
    assert os.path.exists(os.path.join(out, "config.json"))
    assert train.main([a for a in evaluation if a != "--quiet"]) == 0
    assert (f"{out}: replacing the settings of a run that stopped before its first "
            f"checkpoint (data_dir: {str(nowhere)!r} -> None).") in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["data_dir"] is None
    assert train.main(evaluation + ["--limit", "64"]) == 2
    assert "holds a run with other settings (limit: 128 -> 64)" in capsys.readouterr().err


def test_a_pretraining_only_run_resumes_under_new_tuned_settings(tmp_path, monkeypatch):
    # An arm's settings are checked once the arm has run with them: a checkpoint pretrained
    # before the protocol's tuned settings changed still fine-tunes with the new ones.
    out = str(tmp_path / "pretrain_only")
    assert train.main(SMOKE + ["--arms", "--output-dir", out]) == 0
    protocol = get_protocol("fashion_mnist")
    retuned = {**protocol.tuned, "sign": {**protocol.tuned["sign"], "finetune_lr": 1e-4}}
    monkeypatch.setitem(protocols.PROTOCOLS, "fashion_mnist",
                        dataclasses.replace(protocol, tuned=retuned))
    assert train.main(SMOKE + ["--arms", "sign", "--output-dir", out]) == 0
    assert _results(out)["arms"]["sign"]["finetune_lr"] == 1e-4
    with open(os.path.join(out, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["sign.finetune_lr"] == 1e-4 and "lns.alpha" not in recorded


def test_nan_loss_stops_with_a_message_and_keeps_what_was_written(full_run, tmp_path, capsys):
    out = str(tmp_path / "diverging")
    # --no-guard: past the guard's first steps, a diverging loss stops the whole run.
    argv = SMOKE + ["--arms", "lns", "--pretrained", full_run, "--optimizer", "sgd",
                    "--finetune-lr", "1e30", "--output-dir", out, "--no-guard"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "the loss became nan" in err.lower() and "lns" in err
    results = _results(out)  # the baseline written before the arm is still there
    assert "baseline" in results and "lns" not in results["arms"]
    # The checkpoint fine-tuning started from is intact.
    weights = training.pretrained_weights_path(full_run)
    model = training.build_baseline(training.TrainConfig().resolved(), weights)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_the_guard_stops_an_arm_that_scrambles_its_checkpoint_and_the_others_go_on(
        tmp_path, capfd):
    """The paper's `sum` on Bi-Real Net 18's layers (at 32x32: the kernels of ImageNet's)
    flips about half of the binary weights in a step: the guard stops that arm with one
    line, the checkpoint and the other arm stay, and the same command with the setting
    changed fine-tunes the arm again."""
    out = str(tmp_path / "scrambled")
    tiny = ["--model", "birealnet18", "--image-size", "32", "--pretrain-epochs", "1",
            "--finetune-epochs", "1", "--steps-per-epoch", "2", "--limit", "16",
            "--batch-size", "8", "--optimizer", "sgd", "--finetune-lr", "0.01",  # ImageNet's
            "--output-dir", out]
    paper = ["--arms", "lns", "sign", "--preset", "paper", "--mapper", "separable"]
    assert train.main(tiny + paper) == 0
    text = capfd.readouterr().err
    [line] = [l for l in text.splitlines() if "stopped by the guard" in l]
    assert "arm 'lns'" in line and "flipped since pretraining" in line
    assert "--preset per_weight" in line and "--no-guard" in line
    results = _results(out)
    assert list(results["arms"]) == ["sign"] and "lns" in results["stopped"]
    assert "| LNS (`lns`) | stopped |" in open(os.path.join(out, "results.md")).read()
    weights = os.path.join(out, "pretrain", "weights.h5")
    fingerprint = training.weights_fingerprint(weights)
    assert not os.path.exists(os.path.join(out, "arms", "lns"))
    # With the setting changed the same run fine-tunes the arm again, its pretraining
    # untouched. (This checkpoint saw one step: even sign-free mappers flip it a lot, so
    # whether per_weight holds is measured on pretrained ones, in bench/layer_size.py.)
    assert train.main(tiny + ["--arms", "lns", "sign", "--quiet", "--no-guard"]) == 0
    results = _results(out)
    assert results["arms"]["lns"]["quantizer"]["reduction"] == "mean" and not results["stopped"]
    assert training.weights_fingerprint(weights) == fingerprint


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


# --- files that cannot be read, recovery, output (issue: reproducible, robust runs) ----

ALL_ARMS = ["--arms", "sign", "mapped", "lns", "lns_rho0"]


def _copy(full_run, tmp_path, name):
    out = str(tmp_path / name)
    shutil.copytree(full_run, out)
    return out


@pytest.mark.parametrize(
    "name, fix",
    [("config.json", "choose a new --output-dir"),
     (os.path.join("arms", "lns", "result.json"), "delete it to redo")],
)
def test_unreadable_run_files_are_named_with_what_to_do(full_run, tmp_path, capsys, name, fix):
    out = _copy(full_run, tmp_path, "garbled")
    with open(os.path.join(out, name), "w") as f:
        f.write("\x00 not json")
    assert train.main(SMOKE + ALL_ARMS + ["--output-dir", out]) == 2
    err = capsys.readouterr().err
    assert f"{os.path.join(out, name)} is unreadable" in err and fix in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_garbage_results_json_is_rebuilt_from_the_arms(full_run, tmp_path):
    out = _copy(full_run, tmp_path, "rebuilt")
    with open(os.path.join(out, "results.json"), "w") as f:
        f.write("garbage")
    assert train.main(SMOKE + ALL_ARMS + ["--output-dir", out]) == 0
    assert _results(out)["arms"] == _results(full_run)["arms"]


def test_deleted_pretrained_weights_are_trained_again_and_the_arms_kept(full_run, tmp_path):
    out = _copy(full_run, tmp_path, "no_weights")
    weights = os.path.join(out, "pretrain", "weights.h5")
    os.remove(weights)
    marker = os.path.join(out, "arms", "lns", "result.json")
    before = os.path.getmtime(marker)
    assert train.main(SMOKE + ALL_ARMS + ["--output-dir", out]) == 0
    assert os.path.exists(weights)
    # Deterministic pretraining gives the same weights: the arms still belong to them.
    assert os.path.getmtime(marker) == before
    assert _results(out)["baseline"]["sha256"] == _results(full_run)["baseline"]["sha256"]


def test_arms_from_other_pretrained_weights_are_refused(full_run, tmp_path, capsys):
    out = _copy(full_run, tmp_path, "other_weights")
    weights = os.path.join(out, "pretrain", "weights.h5")
    model = training.build_baseline(training.TrainConfig().resolved(), weights)
    model.layers[-2].set_weights([w + 0.01 for w in model.layers[-2].get_weights()])
    model.save_weights(weights)
    assert train.main(SMOKE + ALL_ARMS + ["--output-dir", out]) == 2
    err = capsys.readouterr().err
    assert "fine-tuned from other pretrained weights" in err and "'lns'" in err
    assert os.path.join(out, "arms", "lns") in err


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    from harness.rundir import atomic_path, read_json, write_json

    path = str(tmp_path / "result.json")
    write_json(path, {"accuracy": 0.9})
    with pytest.raises(OSError):
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write('{"accu')
            raise OSError(28, "No space left on device", tmp)  # a full disk mid-write
    with pytest.raises(ValueError):
        write_json(path, {"alpha": float("nan")})  # what is written must read back
    assert read_json(path, "never") == {"accuracy": 0.9}
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left behind


def test_atomically_written_files_get_the_mode_the_umask_gives(tmp_path):
    from harness.rundir import write_json
    from larq_noisy.export import _write_atomically

    umask = os.umask(0o027)
    try:
        write_json(str(tmp_path / "result.json"), {})
        _write_atomically(str(tmp_path / "model.tflite"), b"")
    finally:
        os.umask(umask)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in os.listdir(tmp_path)}
    assert modes == {"result.json": 0o640, "model.tflite": 0o640}  # not mkstemp's 0600


def test_an_interrupted_atomic_write_is_not_work_done(tmp_path):
    """A write killed midway leaves `.<name>.*/<name>`: a run with only that trained nothing."""
    from harness.rundir import RunDir

    (tmp_path / "config.json").write_text("{}")
    partial = tmp_path / "pretrain" / ".checkpoint.h5.x1y2"
    partial.mkdir(parents=True)
    (partial / "checkpoint.h5").write_text("half")
    assert RunDir(str(tmp_path)).trained_nothing()
    (tmp_path / "pretrain" / "checkpoint.h5").write_text("whole")
    assert not RunDir(str(tmp_path)).trained_nothing()


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from harness.rundir import save_weights

    model = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(3,))])
    path = str(tmp_path / "checkpoint.h5")
    save_weights(model, path)
    good = open(path, "rb").read()

    def full_disk(target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\x89HDF partial")
        raise OSError(28, "No space left on device", target)

    monkeypatch.setattr(model, "save_weights", full_disk)
    with pytest.raises(OSError):
        save_weights(model, path)
    assert open(path, "rb").read() == good


def test_errors_are_one_line_with_the_right_exit_code():
    from harness import errors

    code, message = errors.exit_status(OSError(28, "No space left on device", "/runs/x/checkpoint.h5"))
    assert code == 1 and "/runs/x/checkpoint.h5" in message and "No space left" in message
    code, message = errors.exit_status(
        tf.errors.InternalError(None, None, "Collective instance 1 expected type 0\nmore detail"))
    assert code == 1 and "InternalError" in message and "corrupted" not in message
    assert "\n" not in message
    assert errors.exit_status(ValueError("bad"))[0] == 2
    assert errors.exit_status(KeyError("a bug"))[0] is None  # a bug keeps its traceback


def test_ctrl_c_in_any_script_is_one_line_and_exit_130(capsys):
    from harness import errors

    def interrupted():
        raise KeyboardInterrupt

    assert errors.run_script("export.py", interrupted) == 130
    err = capsys.readouterr().err
    assert err == ("export.py: interrupted; files already written are kept: run the same "
                   "command again.\n")
    where = errors.Interrupted("interrupted while pretraining in runs/x; ...")
    assert errors.exit_status(where) == (130, str(where))  # train.py's names the stage


def _lock(out, pid, host=None):
    out.mkdir(exist_ok=True)
    (out / "lock").write_text(json.dumps(
        {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-02 03:04:05"}))


@pytest.mark.parametrize("elsewhere", [False, True])
def test_a_locked_output_dir_is_refused_naming_the_process_before_any_work(elsewhere, tmp_path,
                                                                           capsys):
    out = tmp_path / "busy"
    other = subprocess.Popen(["sleep", "30"])  # a live process of this host, or any on another
    host = "another-host" if elsewhere else socket.gethostname()
    try:
        _lock(out, other.pid, host)
        loud = [a for a in SMOKE if a != "--quiet"]  # default verbosity: what users run
        assert train.main(loud + ["--arms", "sign", "--output-dir", str(out)]) == 2
    finally:
        other.kill()
        other.wait()
    out_text, err = capsys.readouterr()
    assert out_text == "" and err == (
        f"train.py: error: {out} is in use by process {other.pid} on host {host} (started "
        f"2026-01-02 03:04:05); wait for it, or delete {out / 'lock'} if no such process runs.\n"
    )
    assert os.listdir(out) == ["lock"]  # nothing written, the other process' lock kept


def test_a_lock_whose_process_no_longer_runs_is_taken_over(full_run, tmp_path, capsys):
    out = tmp_path / "stale"
    dead = subprocess.Popen(["true"])  # as a run killed with SIGKILL leaves it
    dead.wait()
    _lock(out, dead.pid)
    argv = SMOKE + ["--arms", "sign", "--pretrained", full_run, "--output-dir", str(out)]
    assert train.main(argv) == 0
    assert not (out / "lock").exists() and (out / "arms" / "sign" / "result.json").exists()
    assert capsys.readouterr().err == ""
    (out / "lock").write_text("\x00 garbled")  # not a lock this process can read: refused
    assert train.main(argv) == 2
    assert f"{out / 'lock'} is unreadable" in capsys.readouterr().err


def test_default_output_is_readable(full_run, tmp_path, capfd):
    out = str(tmp_path / "loud")
    argv = [a for a in SMOKE if a != "--quiet"]
    argv += ["--arms", "sign", "lns", "--pretrained", full_run, "--output-dir", out]
    assert train.main(argv) == 0
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert text.count("bnn_small summary") == 2  # once per model kind: sign, mapped
    assert text.count("can be negative") == 1  # the auxiliary loss, explained once
    for noise in ("Compiled the loaded model", "1 epochs", "is slow compared to",
                  "flip_rate/quant_conv2d:"):
        assert noise not in text, noise
    assert "fine-tuning with sign weights (`sign`)" in text  # results.md, printed


def test_quiet_says_where_the_results_are_and_verbose_2_prints_a_line_per_epoch(
        full_run, tmp_path, capfd):
    out = str(tmp_path / "quiet")
    argv = SMOKE + ["--arms", "sign", "--pretrained", full_run, "--output-dir", out]
    assert train.main(argv) == 0
    assert capfd.readouterr().out.strip() == f"results: {os.path.join(out, 'results.md')}"
    out2 = str(tmp_path / "lines")
    argv = [a for a in SMOKE if a != "--quiet"] + [
        "--verbose", "2", "--finetune-epochs", "2", "--arms", "lns", "--pretrained", full_run,
        "--output-dir", out2]
    assert train.main(argv) == 0
    text = capfd.readouterr().out
    lines = [l for l in text.splitlines() if l.startswith("lns epoch ")]
    assert [l.split(":")[0] for l in lines] == ["lns epoch 1/2", "lns epoch 2/2"]
    assert "cross-entropy + aux" in lines[0] and "val acc" in lines[0]
    assert "[====" not in text  # no progress bars


def test_plots_give_each_arm_one_colour_and_mark_test_accuracy(full_run, tmp_path, monkeypatch):
    from harness import report

    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    results = _results(full_run)
    report.plot_accuracy(full_run, results, str(tmp_path / "accuracy.png"))
    report.plot_flip_rates(results, str(tmp_path / "flip_rates.png"))
    accuracy, flips = ({l.get_label(): l for l in fig.axes[0].get_lines()} for fig in figures)
    for arm, result in results["arms"].items():
        title, colour = report.ARM_TITLES[arm], report.arm_color(arm)
        assert accuracy[f"{title}, val"].get_color() == colour == flips[title].get_color()
        assert list(accuracy[f"{title}, test"].get_ydata()) == [result["test_accuracy"]]
    assert len({report.arm_color(a) for a in results["arms"]}) == len(results["arms"])
