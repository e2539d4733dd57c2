"""bench/accuracy.py: the rows, their tuned settings, the statistics docs/RESULTS.md is made of."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from harness.protocols import ARMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", os.path.join(ROOT, "bench", "accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# Test accuracies per seed, as train.py's results.json would hold them.
SIGN = [0.850, 0.855, 0.852]
LNS = [0.853, 0.854, 0.858]
WARMUP = [0.840, 0.845, 0.842]


def _write_runs(root, rows, seeds=(0, 1, 2)):
    """train.py's results.json of each seed's pretraining and of `rows` ({row: (arm, accs)})."""
    for seed in seeds:
        pretrain = os.path.join(root, f"seed{seed}", "pretrain")
        os.makedirs(pretrain)
        with open(os.path.join(pretrain, "results.json"), "w") as f:
            json.dump({"baseline": {"test_accuracy": 0.84, "val_accuracy": 0.83}, "arms": {}}, f)
        for name, (arm, accs) in rows.items():
            run = os.path.join(root, f"seed{seed}", name)
            os.makedirs(run)
            result = {"test_accuracy": accs[seed], "val_accuracy": accs[seed] - 0.01,
                      "flip_rate": 0.02, "wall_seconds": 60.0}
            if arm != "sign":
                result["saturation"] = 0.25
            with open(os.path.join(run, "results.json"), "w") as f:
                json.dump({"arms": {arm: result}}, f)


def test_report_statistics_and_paired_differences(accuracy, tmp_path, capsys):
    out = tmp_path / "runs"
    _write_runs(str(out), {"sign": ("sign", SIGN), "lns": ("lns", LNS), "warmup": ("lns", WARMUP)})
    accuracy.main(["--report-only", "--output-dir", str(out), "--plots", str(tmp_path / "png"),
                   "--seeds", "0", "1", "2", "--studies", "sign", "lns", "warmup"])
    summary = json.loads((out / "summary.json").read_text())
    # No --hparams: the short-pretraining study's tuned settings and schedule.
    study = accuracy.SHORT_PRETRAINING_TUNED
    assert summary["settings"]["sign"] == study["sign"]
    lns = summary["settings"]["lns"]
    assert {k: lns[k] for k in study["lns"]} == study["lns"]
    assert summary["settings"]["warmup"]["start"] == "warmup"
    assert sorted(summary["rows"]) == ["baseline", "lns", "sign", "warmup"]
    assert summary["finetune_epochs"] == accuracy.SHORT_PRETRAINING["finetune_epochs"] == 3

    text = (out / "summary.md").read_text()
    lns = 100 * np.array(LNS)
    assert f"| LNS (`lns`) | 3 | {lns.max():.2f} ({lns.mean():.2f} +- {lns.std(ddof=1):.2f}) |" in text
    assert f"| {ARMS['sign'].title} (`sign`) | 3 |" in text  # the arms' own titles
    assert "| 2.00 | 25.00 | 60 |" in text and "| 2.00 | - | 60 |" in text  # flips, saturation

    paired = {(c["a"], c["b"]): c for c in summary["paired"]}
    diff = 100 * (np.array(LNS) - np.array(SIGN))
    assert paired["lns", "sign"]["diff"] == pytest.approx(diff, abs=1e-3)
    assert paired["lns", "sign"]["mean"] == pytest.approx(diff.mean())
    assert paired["lns", "sign"]["wins"] == 2
    from scipy import stats

    assert paired["lns", "sign"]["p_value"] == pytest.approx(stats.ttest_rel(LNS, SIGN).pvalue)
    assert paired["warmup", "lns"]["wins"] == 0
    assert ("lns", "bop") not in paired and ("lns", "mapped") not in paired  # no data
    assert (tmp_path / "png" / "accuracy_arms_fashion_mnist.png").stat().st_size > 0
    assert (tmp_path / "png" / "accuracy_ablations_fashion_mnist.png").stat().st_size > 0
    assert (tmp_path / "png" / "accuracy_paired_fashion_mnist.png").stat().st_size > 0
    assert "lns - sign: +0.27" in capsys.readouterr().out


def _hparams(tmp_path, name, values):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_each_arm_runs_with_its_own_tuned_settings(accuracy, tmp_path, capsys):
    files = {
        "sign": _hparams(tmp_path, "sign", {"finetune_lr": 1e-3}),
        "bop": _hparams(tmp_path, "bop", {"bop_threshold": 1e-5, "bop_gamma": 1e-3,
                                          "finetune_lr": 2e-4}),
        "lns": _hparams(tmp_path, "lns", {"alpha": 0.01, "rho_pos": 0.1, "rho_neg": 0.1,
                                          "clip": "none", "aux_to_latent": False,
                                          "finetune_lr": 5e-4}),
    }
    out = tmp_path / "r"
    accuracy.main(["--report-only", "--output-dir", str(out), "--plots", "", "--seeds", "3",
                   "--hparams", *(f"{arm}={path}" for arm, path in files.items())])
    summary = json.loads((out / "summary.json").read_text())
    settings = summary["settings"]
    # Every row of the issue, the tuned lns' own clip x aux_to_latent combination once.
    assert list(settings) == ["sign", "bop", "mapped", "lns_rho0", "lns",
                              "lns_clip-hardtanh_aux-latent", "lns_clip-hardtanh_aux-mapper",
                              "lns_clip-none_aux-latent"]
    assert settings["sign"] == {"finetune_lr": 1e-3}
    assert settings["bop"] == {"finetune_lr": 2e-4, "bop_threshold": 1e-5, "bop_gamma": 1e-3}
    lns = settings["lns"]
    assert (lns["alpha"], lns["rho_pos"], lns["clip"], lns["aux_to_latent"], lns["finetune_lr"]) == (
        0.01, 0.1, "none", False, 5e-4)
    # mapped and lns_rho0 are lns' tuned settings with alpha = 0 and rho = 0.
    assert settings["mapped"] == {**lns, "alpha": 0.0}
    assert settings["lns_rho0"] == {**lns, "rho_pos": 0.0, "rho_neg": 0.0}
    assert settings["lns_clip-hardtanh_aux-latent"] == {**lns, "clip": "hardtanh",
                                                        "aux_to_latent": True}
    assert summary["rows"] == {} and summary["tuned"]["bop"]["bop_threshold"] == 1e-5
    text = (out / "summary.md").read_text()
    assert f"bop={files['bop']}" in text and "Total time: 0.0 min over 0 session(s)" in text

    # Each row is a train.py run of its arm, from its seed's one pretraining.
    args = accuracy.main.__globals__["argparse"].Namespace(
        dataset="fashion_mnist", data_dir=None, verbose=0, limit=None, steps_per_epoch=None,
        pretrain_epochs=3, strategy="auto", mixed_precision=False, seeds=[0, 1],
        output_dir=str(tmp_path / "c"), studies=list(accuracy.DEFAULT_STUDIES), mapper=None,
        finetune_epochs=3, finetune_cosine=False)
    runs = accuracy.configs(args, {}, {})
    assert sorted({seed for seed, _ in runs}) == [0, 1]
    bop = runs[1, "bop"]
    assert bop.arms == ("bop",) and bop.finetune_epochs == 3 and bop.seed == 1
    assert bop.pretrained == runs[1, "pretrain"].output_dir == str(tmp_path / "c" / "seed1" / "pretrain")
    assert runs[1, "pretrain"].arms == ()


@pytest.mark.parametrize("spec, values, needle", [
    ("mapped={}", {"alpha": 0.1}, "'mapped' is not a tuned arm"),
    ("sign={}", {"seed": 3}, "keys ['seed'] that are not an arm's"),
    ("lns={}", {"clip": 1}, "clip=1 must be a string"),
    ("{}", {"alpha": -1.0}, "alpha=-1.0 must be a finite number >= 0"),  # a bare file: all
])
def test_bad_hparams_are_refused_before_any_training(accuracy, tmp_path, capsys, spec, values, needle):
    path = _hparams(tmp_path, "bad", values)
    with pytest.raises(SystemExit):
        accuracy.main(["--output-dir", str(tmp_path / "r"), "--hparams", spec.format(path)])
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_study_that_repeats_the_tuned_lns_is_skipped(accuracy, tmp_path):
    import argparse

    def studies(lns, names=(*accuracy.DEFAULT_STUDIES, *accuracy.ABLATIONS)):
        args = argparse.Namespace(
            dataset="fashion_mnist", data_dir=None, verbose=0, limit=None, steps_per_epoch=None,
            pretrain_epochs=3, strategy="auto", mixed_precision=False, seeds=[0, 1],
            output_dir=str(tmp_path), studies=list(names), mapper=None, finetune_epochs=3, finetune_cosine=False)
        # As main() makes them: this regime's tuned lns, under the values given.
        runs = accuracy.configs(args, {}, {"lns": {**accuracy.SHORT_PRETRAINING_TUNED["lns"], **lns}})
        assert {s for s, _ in runs} == {0, 1}  # every seed
        return {study for seed, study in runs if seed == 1}

    main = {"pretrain", *accuracy.MAIN_ROWS}
    # The paper's alpha and rho with cnn over the regime's tuned lns (hardtanh, aux to
    # the mapper): the rows "paper" and "cnn" and that variant repeat the tuned lns.
    assert studies({**accuracy.PAPER, "mapper": "cnn"}) == main | {
        "lns_clip-hardtanh_aux-latent", "lns_clip-none_aux-latent", "lns_clip-none_aux-mapper",
        "mean", "warmup", "mlp", "linear", "separable"}
    # Unset options are the regime's tuned lns' (aux_to_latent False).
    assert studies({"mapper": "mlp", "alpha": 0.5, "clip": "none"}) == main | {
        "lns_clip-hardtanh_aux-latent", "lns_clip-hardtanh_aux-mapper", "lns_clip-none_aux-latent",
        "paper", "mean", "warmup", "cnn", "linear", "separable"}
    # Without the lns row, nothing is a repeat.
    assert "lns_clip-hardtanh_aux-latent" in studies({}, names=accuracy.VARIANTS)


def test_identical_rows_have_no_p_value(accuracy):
    rows = {"a": {0: {"test_accuracy": 0.5}, 1: {"test_accuracy": 0.75}},
            "b": {0: {"test_accuracy": 0.5}, 1: {"test_accuracy": 0.75}}}
    c = accuracy.paired(rows, "a", "b")
    assert c["diff"] == [0.0, 0.0] and c["std"] == 0 and c["wins"] == 0
    assert c["p_value"] is None  # the t statistic is 0 / 0: undefined, not 0 or 1
    json.dumps(c, allow_nan=False)  # summary.json stays valid JSON


def test_finished_runs_are_skipped_and_changed_settings_refused(accuracy, tmp_path, capsys):
    import argparse

    args = argparse.Namespace(
        dataset="fashion_mnist", data_dir=None, verbose=0, limit=None, steps_per_epoch=None,
        pretrain_epochs=3, strategy="auto", mixed_precision=False, seeds=[0],
        output_dir=str(tmp_path), studies=["sign"], mapper=None, finetune_epochs=3, finetune_cosine=False)
    runs = accuracy.configs(args, {}, accuracy.SHORT_PRETRAINING_TUNED)  # as main() makes them
    pretrain, sign = runs[0, "pretrain"], runs[0, "sign"]
    os.makedirs(os.path.join(pretrain.output_dir, "pretrain"))  # as train.py leaves them
    os.makedirs(os.path.join(sign.output_dir, "arms", "sign"))
    for config, phase in ((pretrain, "pretrain"), (sign, os.path.join("arms", "sign"))):
        for name, data in (("config.json", config.resolved().recorded()),
                           (os.path.join(phase, "result.json"), {}), ("results.json", {})):
            with open(os.path.join(config.output_dir, name), "w") as f:
                json.dump(data, f)
    assert accuracy._finished(pretrain) and accuracy._finished(sign)
    with pytest.raises(SystemExit):  # the same directory, another schedule
        accuracy.main(["--output-dir", str(tmp_path), "--seeds", "0", "--studies", "sign",
                       "--finetune-epochs", "4", "--plots", ""])
    assert "holds a run with other settings (finetune_epochs: 3 -> 4)" in capsys.readouterr().err
