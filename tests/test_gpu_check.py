"""bench/gpu_check.py on the CPU at a tiny size: Fashion-MNIST from the shipped checkpoint,
as a user runs it (a subprocess), and its refusal to pretrain a whole protocol."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def test_the_check_writes_speed_memory_and_accuracy_per_arm(tmp_path):
    out, path = tmp_path / "run", tmp_path / "check.json"
    command = [sys.executable, SCRIPT, "--dataset", "fashion_mnist", "--limit", "128",
               "--steps-per-epoch", "2", "--batch-size", "32", "--output-dir", str(out),
               "--json", str(path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(path.read_text())
    assert report["device"].startswith("CPU") and report["tensorflow"] == tf.__version__
    assert report["command"].startswith("bench/gpu_check.py --dataset fashion_mnist")
    assert (report["dataset"], report["batch_size"], report["steps_per_epoch"]) == (
        "fashion_mnist", 32, 2)
    assert set(report["arms"]) == {"sign", "lns"}
    for arm, a in report["arms"].items():
        assert a["peak_gpu_memory_bytes"] is None  # no GPU
        assert len(a["epoch_train_seconds"]) == 2 and a["steps_per_s"] > 0
        assert a["steps_per_s"] == pytest.approx(2 / a["epoch_train_seconds"][-1])
        assert a["images_per_s"] == pytest.approx(32 * a["steps_per_s"])
        # Four small steps from the converged checkpoint keep it far above chance (10%).
        assert 0.5 < a["val_accuracy"] <= 1 and 0.5 < a["test_accuracy"] <= 1
        assert not a["resumed"]
    assert report["overhead_vs_sign"]["lns"] == pytest.approx(
        report["arms"]["sign"]["steps_per_s"] / report["arms"]["lns"]["steps_per_s"])
    assert 0.5 < report["baseline"]["val_accuracy"] <= 1
    assert "lns" in json.loads((out / "results.json").read_text())["arms"]  # the run's own


def test_a_dataset_without_a_checkpoint_needs_one_or_pretraining_epochs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    with pytest.raises(SystemExit) as error:
        gpu_check.parse_args(["--output-dir", str(tmp_path)])  # imagenet2012, nothing given
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert "--pretrained" in message and "--pretrain-epochs" in message
    assert not os.listdir(tmp_path)  # refused before any work
