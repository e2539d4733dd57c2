"""The converged protocol: the shipped checkpoint, settings that belong to their model,
fine-tuning's cosine (Bop's gamma with it), and bench/converged.py's statistics."""

import argparse
import hashlib
import json
import math
import os
import sys

import larq as lq
import numpy as np
import pytest
import tensorflow as tf

import models
from harness import training
from harness.callbacks import CosineDecayPerStep
from harness.protocols import get_protocol
from harness.rundir import weights_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(models.WEIGHTS_DIR, get_protocol("fashion_mnist").checkpoint)


def test_the_shipped_checkpoint_is_what_its_json_says():
    with open(SHIPPED[:-3] + ".json") as f:
        info = json.load(f)
    with open(SHIPPED, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == info["sha256"]
    assert weights_fingerprint(SHIPPED) == info["weights_sha256"]
    assert (info["model"], info["dataset"], info["epochs"]) == (
        "bnn_small", "fashion_mnist", get_protocol("fashion_mnist").pretrain_epochs)
    assert "--pretrain" in info["command"]
    model = models.build("bnn_small", (28, 28, 1), 10)
    model.load_weights(SHIPPED)  # it fits the model it is shipped for


@pytest.mark.parametrize("given, ships", [
    ({}, True),
    ({"pretrain_here": True}, False),          # --pretrain: phase 1 here
    ({"pretrain_epochs": 2}, False),           # a pretraining of one's own
    ({"kernel_quantizer": "dorefa"}, False),   # another baseline
    ({"model": "resnet20"}, False),            # another model
    ({"dataset": "mnist"}, False),             # another dataset
])
def test_the_protocol_fine_tunes_its_shipped_checkpoint_unless_the_run_changes_the_baseline(
        given, ships):
    config = training.TrainConfig(**given).resolved()
    assert (config.pretrained == SHIPPED) is ships
    assert config.pretrain_epochs == get_protocol(config.dataset).pretrain_epochs or given


def test_pretrain_and_pretrained_together_are_refused():
    with pytest.raises(ValueError, match="contradict"):
        training.TrainConfig(pretrain_here=True, pretrained=SHIPPED).resolved()


def test_tuned_settings_belong_to_their_model_and_the_run_says_so():
    small = training.TrainConfig().resolved()
    tuned = get_protocol("fashion_mnist").tuned["lns"]
    assert small.preset is None and small.arm_settings("lns")["alpha"] == tuned["alpha"]
    assert "measured on bnn_small" in training.settings_note(small)
    other = training.TrainConfig(model="resnet20", arms=("lns",)).resolved()
    assert other.preset == "per_weight"
    assert other.quantizer_options("lns")["reduction"] == "mean"  # not bnn_small's sum
    note = training.settings_note(other)
    assert "per_weight" in note and "bnn_small, not resnet20" in note


def test_the_protocol_fine_tunes_with_what_the_benchmark_tuned_from_its_checkpoint():
    """The protocol's tuned settings are the 240-epoch benchmark's best_hparams.json files
    (so `python train.py` is that benchmark's checkpoint 0 / seed 0 sample)."""
    protocol = get_protocol("fashion_mnist")
    state = os.path.join(ROOT, "bench", "state", "converged240_fashion_mnist")
    for arm in ("sign", "bop", "lns"):
        with open(os.path.join(state, f"tuned_{arm}.json")) as f:
            searched = json.load(f)
        assert {k: protocol.tuned[arm][k] for k in searched} == searched
    # What the lns search did not search is the protocol's own: the linear mapper, and
    # the sum reduction it searched alpha with (then the quantizer's default).
    assert protocol.tuned["lns"].keys() - searched.keys() == {"mapper", "reduction"}
    assert protocol.tuned["lns"]["reduction"] == "sum"


def _tiny_bop_model():
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((4,))
    x = lq.layers.QuantDense(3, kernel_quantizer="ste_sign", kernel_constraint="weight_clip")(inputs)
    model = tf.keras.Model(inputs, x)
    bop = lq.optimizers.Bop(threshold=1e-8, gamma=1e-3)
    model.compile(lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, bop),
        default_optimizer=tf.keras.optimizers.legacy.Adam(1.0)), "mse")
    return model, bop


class _Record(tf.keras.callbacks.Callback):
    def __init__(self, bop):
        super().__init__()
        self.bop, self.values = bop, []

    def on_train_batch_end(self, batch, logs=None):
        default = self.model.optimizer.default
        self.values.append((float(tf.keras.backend.get_value(default.lr)),
                            float(tf.keras.backend.get_value(self.bop._get_hyper("gamma")))))


def test_finetuning_cosine_decays_the_rate_and_bops_gamma_step_by_step_and_resumes():
    model, bop = _tiny_bop_model()
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 3), "float32")
    record = _Record(bop)
    history = model.fit(x, y, batch_size=2, epochs=2, verbose=0,
                        callbacks=[CosineDecayPerStep(0.1, 8, gamma=1e-3), record])
    factors = [0.5 * (1 + math.cos(math.pi * step / 8)) for step in range(8)]
    np.testing.assert_allclose([lr for lr, _ in record.values], [0.1 * f for f in factors], rtol=1e-6)
    np.testing.assert_allclose([g for _, g in record.values], [1e-3 * f for f in factors], rtol=1e-6)
    np.testing.assert_allclose(history.history["lr"], [0.1 * factors[3], 0.1 * factors[7]], rtol=1e-6)
    # A new fit over the same optimizer (as after BackupAndRestore) goes on at step 8.
    again = _Record(bop)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0,
              callbacks=[CosineDecayPerStep(0.1, 12, gamma=1e-3), again])
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * step / 12)) for step in range(8, 12)]
    np.testing.assert_allclose([lr for lr, _ in again.values], expected, rtol=1e-6)


def test_the_fashion_mnist_protocol_fine_tunes_with_the_cosine_and_others_keep_theirs():
    run = training.TrainConfig().resolved()
    bop = training.lr_schedule(run.for_arm("bop"), "finetune", 1e-3, 2)
    assert isinstance(bop, CosineDecayPerStep)
    assert bop.steps == 2 * 390  # per step, over the phase
    assert bop.gamma == get_protocol("fashion_mnist").tuned["bop"]["bop_gamma"]  # the arm's
    assert training.lr_schedule(run, "finetune", 1e-3, 2).gamma == training.BOP_GAMMA
    constant = training.TrainConfig(finetune_cosine=False).resolved()
    assert not isinstance(training.lr_schedule(constant, "finetune", 1e-3, 2), CosineDecayPerStep)
    cifar = training.TrainConfig(dataset="cifar10").resolved()
    assert not isinstance(training.lr_schedule(cifar, "finetune", 1e-3, 2), CosineDecayPerStep)
    for stream in ("pretrain", "warmup"):
        assert not isinstance(training.lr_schedule(training.TrainConfig().resolved(), stream, 1e-3, 2),
                              CosineDecayPerStep)


# bench/converged.py's statistics ----------------------------------------------------


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import converged_report

    yield converged_report
    sys.path.remove(os.path.join(ROOT, "bench"))


@pytest.mark.parametrize("low, high, expected", [
    (0.3, 0.9, "better"),
    (0.05, 0.2, "better (by less than the margin, 0.25)"),
    (-0.9, -0.3, "worse"),
    (-0.2, 0.2, "equivalent within +-0.25"),
    (-0.3, 0.1, "undecided"),
    (-0.1, 0.4, "undecided"),
])
def test_each_comparison_gets_one_verdict_against_the_margin(report, low, high, expected):
    assert report.verdict(low, high, 0.25) == expected


def _rows(diff_by_sample, machine="m"):
    rows = []
    for (ckpt, seed), diff in diff_by_sample.items():
        for name, acc in (("sign", 0.9), ("lns", 0.9 + diff / 100)):
            rows.append({"checkpoint": ckpt, "seed": seed, "row": name, "test_accuracy": acc,
                         "val_accuracy": acc, "machine": {"cpu": machine, "vector": "avx2"}})
    return rows


def test_paired_differences_have_a_t_interval_and_say_how_many_samples_would_decide(report):
    diffs = {(c, s): d for (c, s), d in zip([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)],
                                            [0.3, -0.1, 0.2, 0.0, 0.4, -0.2])}
    result = report.paired(_rows(diffs), "lns", "sign", 0.25)
    d = np.array(list(diffs.values()))
    half = 2.5706 * d.std(ddof=1) / math.sqrt(6)  # t(0.975, 5)
    np.testing.assert_allclose(result["ci95"], [d.mean() - half, d.mean() + half], atol=1e-3)
    assert (result["n"], result["wins"], result["losses"]) == (6, 3, 2)
    assert result["verdict"] == "undecided"
    n = result["samples_to_decide"]
    assert n > 6 and report.t_quantile(n) * d.std(ddof=1) / math.sqrt(n) < max(
        abs(d.mean()), 0.25 - abs(d.mean()))


def test_the_variance_splits_between_checkpoints_and_seeds(report):
    # Checkpoint means 0, 1, 2 (between) and +-0.5 around them (within).
    diffs = {(c, s): c + (0.5 if s else -0.5) for c in range(3) for s in range(2)}
    split = report.variance_split(diffs)
    assert split["within_checkpoint_var"] == pytest.approx(0.5)
    assert split["between_checkpoint_var"] == pytest.approx(1.0 - 0.5 / 2)


def test_the_variance_split_takes_checkpoints_with_different_numbers_of_seeds(report):
    diffs = {(0, 0): 0.0, (0, 1): 1.0, (0, 2): 2.0, (1, 0): 3.0, (1, 1): 5.0}
    split = report.variance_split(diffs)
    # Mean squares: within (2 * 1 + 1 * 2) / 3, between 3 * 1.2^2 + 2 * 1.8^2 = 10.8;
    # the group size of an unequal design, n0 = 5 - (3^2 + 2^2) / 5 = 2.4.
    assert split["within_checkpoint_var"] == pytest.approx(4 / 3)
    assert split["between_checkpoint_var"] == pytest.approx((10.8 - 4 / 3) / 2.4)
    assert split["checkpoint_means"] == {"0": 1.0, "1": 4.0} and split["seeds"] == [3, 2]
    assert split["checkpoints_differ_p"] == pytest.approx(0.0653, abs=1e-3)  # F(1, 3) = 8.1


def test_the_convergence_rule_reads_each_seeds_run_twice_as_long(report):
    def curve(seed, epochs, values):
        return {"seed": seed, "epochs": epochs, "val_accuracy_by_epoch": values,
                "val_accuracy": values[-1]}

    curves = {"seed0_2ep": curve(0, 2, [0.90, 0.92]), "seed0_4ep": curve(0, 4, [.9, .921, .919, .91]),
              "seed1_2ep": curve(1, 2, [0.90, 0.91]), "seed1_4ep": curve(1, 4, [.9, .91, .915, .91]),
              "seed2_2ep": curve(2, 2, [0.90, 0.91])}
    checks = report.convergence(curves, 2, 0.2)
    assert [(c["seed"], c["converged"]) for c in checks] == [(0, True), (1, False)]
    assert checks[1]["gap_points"] == pytest.approx(0.5)  # 91.5 best of 4 epochs - 91.0
    # The second reading: each run's last tenth (here its last epoch) against the other's.
    assert [c["converged_by_last_tenth"] for c in checks] == [True, True]
    assert checks[0]["last_tenth_gap_points"] == pytest.approx(-1.0)  # 91 - 92
    assert report.unchecked(curves, 2, checks) == [2]


def test_the_verdicts_over_only_the_converged_checkpoints_stand_beside_those_over_all(
        report, tmp_path):
    def curve(seed, epochs, values):
        return {"seed": seed, "epochs": epochs, "val_accuracy_by_epoch": values,
                "val_accuracy": values[-1]}

    rows = _rows({(0, 0): 0.3, (0, 1): 0.1, (0, 2): 0.2, (1, 0): -0.4, (1, 1): -0.6,
                  (2, 0): 0.5, (2, 1): 0.7})
    pretraining = {"seed0_2ep": curve(0, 2, [.90, .92]), "seed0_4ep": curve(0, 4, [.9, .92, .92, .92]),
                   "seed1_2ep": curve(1, 2, [.90, .91]), "seed1_4ep": curve(1, 4, [.9, .92, .92, .92]),
                   "seed2_2ep": curve(2, 2, [.90, .91])}  # 1 fails the rule, 2 is unchecked
    args = argparse.Namespace(state=str(tmp_path / "study"), docs=str(tmp_path), pretrain_epochs=2,
                              finetune_epochs=1)
    analysis = report.report({"rows": rows, "pretraining": pretraining}, args)
    assert analysis["converged_checkpoints"] == [0]
    (every,), (converged,) = analysis["comparisons"], analysis["comparisons_of_converged_checkpoints"]
    assert (every["n"], converged["n"]) == (7, 3)
    assert converged["mean"] == pytest.approx(0.2) and set(converged["diffs"]) == {
        "ckpt0_seed0", "ckpt0_seed1", "ckpt0_seed2"}
    assert "Only the checkpoints checked and converged by the rule (0)" in (
        tmp_path / "data" / "study.md").read_text()
    # None converged: said.
    pretraining["seed0_4ep"]["val_accuracy_by_epoch"] = [.9, .95, .95, .95]
    analysis = report.report({"rows": rows, "pretraining": pretraining}, args)
    assert analysis["converged_checkpoints"] == [] == analysis["comparisons_of_converged_checkpoints"]
    assert "No sampled checkpoint is yet checked and converged" in (
        tmp_path / "data" / "study.md").read_text()
    pretraining["seed0_4ep"]["val_accuracy_by_epoch"] = [.9, .92, .92, .92]
    # All converged: one set of verdicts.
    pretraining["seed1_4ep"]["val_accuracy_by_epoch"] = [.9, .91, .91, .91]
    rows = [r for r in rows if r["checkpoint"] != 2]
    analysis = report.report({"rows": rows, "pretraining": pretraining}, args)
    assert analysis["converged_checkpoints"] == [0, 1]
    assert analysis["comparisons_of_converged_checkpoints"] == []


def test_the_last_tenth_averages_a_tenth_of_the_epochs_at_least_one(report):
    assert report.last_tenth({"val_accuracy_by_epoch": [0.5] * 18 + [0.8, 0.9]}) == pytest.approx(0.85)
    assert report.last_tenth({"val_accuracy_by_epoch": [0.5, 0.7]}) == pytest.approx(0.7)


def test_rows_from_different_machines_are_not_paired(report):
    rows = _rows({(0, 0): 0.3, (0, 1): 0.1, (1, 0): 0.2})
    rows[-1]["machine"] = {"cpu": "other", "vector": "avx512f"}  # lns of sample (1, 0)
    result = report.paired(rows, "lns", "sign", 0.25)
    assert result["n"] == 2 and result["skipped_mixed_machines"] == 1


def test_tune_py_fine_tunes_the_shipped_checkpoint_when_given_none(tmp_path, monkeypatch):
    from harness import tuning

    monkeypatch.chdir(tmp_path)  # no runs/fashion_mnist, no search to resume
    weights, why = tuning.locate_checkpoint(tuning.TuneConfig())
    assert weights == SHIPPED and "shipped" in why
    own, _ = tuning.locate_checkpoint(tuning.TuneConfig(pretrain_epochs=1))
    assert own is None  # a pretraining of its own was asked for


def test_converged_py_refuses_a_shipped_checkpoint_of_another_length(tmp_path, capsys):
    """The shipped checkpoint is the 240-epoch study's checkpoint 0; a study of another
    length must keep its own in --state, and is told so before any work."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import converged
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    state = tmp_path / "state"
    with pytest.raises(SystemExit, match=r"is a 240-epoch checkpoint, not 60; give --ship \"\""):
        converged.main(["--pretrain-epochs", "60", "--state", str(state),
                        "--output-dir", str(tmp_path / "out"), "--report-only"])
    assert not state.exists()  # nothing written


def test_converged_py_keeps_an_unfinished_pretraining_for_the_next_session(tmp_path, monkeypatch):
    """--save-unfinished keeps what train.py resumes from (not TensorBoard's logs, not
    while train.py runs there); the next session's bench restores it before it calls
    train.py, and drops it once the run has finished."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import converged
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    out, state = tmp_path / "out", tmp_path / "state"
    args = ["--output-dir", str(out), "--state", str(state), "--ship", "",
            "--pretrain-epochs", "2", "--docs", str(tmp_path / "docs")]
    run = out / "pretrain" / "seed1_4ep"
    for name, text in [("config.json", "{}"), ("pretrain/backup/chief/checkpoint", "ckpt"),
                       ("pretrain/history.csv", "epoch,val_accuracy\n0,0.5\n"),
                       ("tensorboard/pretrain/events", "logs"),
                       ("lock", json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname()}))]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    from harness.rundir import RunInUse

    with pytest.raises(RunInUse, match="in use by process"):  # train.py runs there
        converged.main([*args, "--save-unfinished"])
    (run / "lock").unlink()
    converged.main([*args, "--save-unfinished"])
    archive = state / "unfinished" / "seed1_4ep.tar.gz"
    import tarfile

    with tarfile.open(archive) as tar:
        kept = sorted(tar.getnames())
    assert "seed1_4ep/pretrain/backup/chief/checkpoint" in kept and "seed1_4ep/config.json" in kept
    assert not [name for name in kept if "tensorboard" in name or name.endswith("lock")]

    import shutil

    shutil.rmtree(out)  # a fresh work tree
    seen = []

    def train(what, script, run_dir, argv):  # what train.py finds, then it finishes
        seen.append((run / "pretrain" / "backup" / "chief" / "checkpoint").read_text())
        (run / "pretrain" / "weights.h5").write_text("")
        (run / "pretrain" / "history.csv").write_text("epoch,val_accuracy\n0,0.5\n1,0.6\n")
        (run / "results.json").write_text(json.dumps(
            {"baseline": {"val_accuracy": 0.6, "test_accuracy": 0.59}}))

    monkeypatch.setattr(converged, "call", train)
    bench = converged.Bench(converged.build_parser().parse_args(args))
    bench.pretrain(1, 4)
    assert seen == ["ckpt"] and not archive.exists()
    assert bench.rows["pretraining"]["seed1_4ep"]["val_accuracy_by_epoch"] == [0.5, 0.6]
