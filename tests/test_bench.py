"""bench/accuracy.py's report: the statistics docs/RESULTS.md is made of."""

import importlib.util
import json
import os

import numpy as np
import pytest

from larq_noisy.protocols import get_protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", os.path.join(ROOT, "bench", "accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Test accuracies per seed, as train.py's results.json would hold them.
SIGN = [0.850, 0.855, 0.852]
LNS = [0.853, 0.854, 0.858]
WARMUP = [0.840, 0.845, 0.842]


def _write_runs(root, seeds=(0, 1, 2)):
    for seed in seeds:
        arm = lambda acc: {"test_accuracy": acc, "val_accuracy": acc - 0.01,  # noqa: E731
                           "flip_rate": 0.02, "wall_seconds": 60.0}
        main = os.path.join(root, f"seed{seed}", "arms")
        os.makedirs(main)
        with open(os.path.join(main, "results.json"), "w") as f:
            json.dump({"baseline": {"test_accuracy": 0.84, "val_accuracy": 0.83},
                       "arms": {"sign": arm(SIGN[seed]), "lns": arm(LNS[seed])}}, f)
        warm = os.path.join(root, f"seed{seed}", "warmup")
        os.makedirs(warm)
        with open(os.path.join(warm, "results.json"), "w") as f:
            json.dump({"arms": {"lns": arm(WARMUP[seed])}}, f)


def test_report_statistics_and_paired_differences(accuracy, tmp_path, capsys):
    out = tmp_path / "runs"
    _write_runs(str(out))
    accuracy.main(["--report-only", "--output-dir", str(out), "--plots", str(tmp_path / "png"),
                   "--seeds", "0", "1", "2", "--studies", "arms", "warmup"])
    summary = json.loads((out / "summary.json").read_text())
    fashion = get_protocol("fashion_mnist").lns  # no --hparams: the protocol's options
    assert summary["lns_options"] == {"mapper": "cnn", **accuracy.PAPER, **fashion}
    assert sorted(summary["rows"]) == ["baseline", "lns", "sign", "warmup"]

    text = (out / "summary.md").read_text()
    lns = 100 * np.array(LNS)
    assert f"| LNS (`lns`) | 3 | {lns.max():.2f} ({lns.mean():.2f} +- {lns.std(ddof=1):.2f}) |" in text

    paired = {(c["a"], c["b"]): c for c in summary["paired"]}
    diff = 100 * (np.array(LNS) - np.array(SIGN))
    assert paired["lns", "sign"]["diff"] == pytest.approx(diff, abs=1e-3)
    assert paired["lns", "sign"]["mean"] == pytest.approx(diff.mean())
    assert paired["lns", "sign"]["wins"] == 2
    from scipy import stats

    assert paired["lns", "sign"]["p_value"] == pytest.approx(stats.ttest_rel(LNS, SIGN).pvalue)
    assert paired["warmup", "lns"]["wins"] == 0
    assert ("mapped", "sign") not in paired and ("lns", "mapped") not in paired  # no data
    assert (tmp_path / "png" / "accuracy_arms_fashion_mnist.png").stat().st_size > 0
    assert (tmp_path / "png" / "accuracy_ablations_fashion_mnist.png").stat().st_size > 0
    assert (tmp_path / "png" / "accuracy_paired_fashion_mnist.png").stat().st_size > 0
    assert "lns - sign: +0.27" in capsys.readouterr().out


def test_tuned_hparams_feed_the_lns_arm_and_bad_files_are_refused(accuracy, tmp_path, capsys):
    hparams = tmp_path / "best_hparams.json"
    hparams.write_text(json.dumps({"alpha": 0.01, "rho_pos": 0.1, "rho_neg": 0.1}))
    accuracy.main(["--report-only", "--output-dir", str(tmp_path / "r"), "--plots", "",
                   "--hparams", str(hparams), "--seeds", "3"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    mapper = get_protocol("fashion_mnist").lns.get("mapper", "cnn")  # not in the file
    assert summary["lns_options"] == {"alpha": 0.01, "rho_pos": 0.1, "rho_neg": 0.1,
                                      "mapper": mapper}
    assert summary["rows"] == {}  # nothing has run yet

    hparams.write_text(json.dumps({"alpha": -1.0}))  # refused before any training
    with pytest.raises(SystemExit):
        accuracy.main(["--output-dir", str(tmp_path / "r"), "--hparams", str(hparams)])
    assert "alpha=-1.0 must be a finite number >= 0" in capsys.readouterr().err


def test_a_study_that_repeats_the_main_arm_is_skipped(accuracy, tmp_path):
    import argparse

    def studies(lns):
        args = argparse.Namespace(
            dataset="fashion_mnist", data_dir=None, verbose=0, limit=None, steps_per_epoch=None,
            pretrain_epochs=None, strategy="auto", mixed_precision=False, seeds=[0, 1],
            output_dir=str(tmp_path), studies=["arms", *accuracy.STUDIES])
        runs = accuracy.configs(args, lns)
        assert (1, "arms") in runs  # every seed's main study
        return {study for _, study in runs}

    assert studies(dict(accuracy.PAPER, mapper="cnn")) == {"arms", "mean", "warmup", "mlp", "linear"}
    assert studies({"mapper": "mlp", "alpha": 0.5}) == {"arms", "paper", "mean", "warmup", "cnn",
                                                        "linear"}
