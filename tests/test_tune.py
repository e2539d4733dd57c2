"""tune.py: a tiny search that train.py can use, resuming, bad inputs, chief + workers."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import keras_tuner as kt
import pytest
import tensorflow as tf

import train
import tune
from harness import search_space, training, tuning
from harness.protocols import get_protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A few steps on a few real images per trial; the linear mapper traces fastest.
TINY = ["--limit", "64", "--batch-size", "16", "--steps-per-epoch", "2", "--epochs", "1",
        "--quiet"]


def _trials(out):
    """The keras-tuner trials of a search, by id."""
    search = os.path.join(out, tuning.PROJECT)
    trials = {}
    for name in sorted(os.listdir(search)):
        path = os.path.join(search, name, "trial.json")
        if name.startswith("trial_") and os.path.exists(path):
            with open(path) as f:
                trial = json.load(f)
            trials[trial["trial_id"]] = trial
    return trials


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pretrained") / "run")
    training.run(training.TrainConfig(
        dataset="fashion_mnist", arms=(), pretrain_epochs=1, steps_per_epoch=2, limit=64,
        batch_size=32, output_dir=out, verbose=0,
    ))
    return out


@pytest.fixture(scope="module")
def searched(pretrained, tmp_path_factory):
    """One trial, then the same search resumed with a budget of two."""
    out = str(tmp_path_factory.mktemp("search") / "tune")
    argv = TINY + ["--pretrained", pretrained, "--tuner", "random", "--search-mapper",
                   "linear", "mlp", "--output-dir", out]
    assert tune.main(argv + ["--max-trials", "1"]) == 0
    first = _trials(out)
    stamp = os.path.getmtime(os.path.join(out, tuning.PROJECT, "trial_0", "trial.json"))
    assert tune.main(argv + ["--max-trials", "2"]) == 0
    return {"out": out, "first": first, "stamp": stamp}


def test_search_writes_best_hparams_table_and_plot(searched):
    out = searched["out"]
    with open(os.path.join(out, "best_hparams.json")) as f:
        best = json.load(f)
    assert sorted(best) == ["alpha", "aux_to_latent", "clip", "finetune_lr", "mapper", "rho_neg",
                            "rho_pos"]
    assert 1e-3 <= best["alpha"] <= 10 and 0 <= best["rho_pos"] <= 0.2
    assert best["rho_pos"] == best["rho_neg"] and best["mapper"] in ("linear", "mlp")
    assert best["clip"] in ("hardtanh", "none") and isinstance(best["aux_to_latent"], bool)
    lr = get_protocol("fashion_mnist").finetune_lr
    assert lr / 10 <= best["finetune_lr"] <= lr * 10
    trials = _trials(out)
    assert len(trials) == 2 and all(t["status"] == "COMPLETED" for t in trials.values())
    top = max(trials.values(), key=lambda t: t["score"])
    assert best["alpha"] == pytest.approx(top["hyperparameters"]["values"]["alpha"])
    table = open(os.path.join(out, "trials.md")).read()
    assert len(re.findall(r"^\| [12] \| ", table, re.M)) == 2
    assert "validation split" in table and "| rank | trial | alpha | rho | mapper |" in table
    with open(os.path.join(out, "trials.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_without_redoing_trials(searched):
    assert list(searched["first"]) == ["0"]
    assert sorted(_trials(searched["out"])) == ["0", "1"]
    trial = os.path.join(searched["out"], tuning.PROJECT, "trial_0", "trial.json")
    assert os.path.getmtime(trial) == searched["stamp"]


def test_the_same_search_elsewhere_tries_the_same_settings(searched, pretrained, tmp_path):
    # keras-tuner draws a random oracle seed for seed 0: --search-seed (default 1) fixes it.
    out = str(tmp_path / "again")
    assert tune.main(TINY + ["--pretrained", pretrained, "--tuner", "random", "--search-mapper",
                             "linear", "mlp", "--output-dir", out, "--max-trials", "1"]) == 0
    again = _trials(out)["0"]
    first = searched["first"]["0"]
    assert again["hyperparameters"]["values"] == first["hyperparameters"]["values"]
    assert again["score"] == first["score"]


def test_train_py_accepts_and_runs_the_best_hparams(searched, pretrained, tmp_path):
    path = os.path.join(searched["out"], "best_hparams.json")
    with open(path) as f:
        best = json.load(f)
    config = train.parse_args(["--hparams", path, "--output-dir", str(tmp_path / "parsed")])
    assert (config.alpha, config.rho_pos, config.rho_neg, config.mapper, config.clip,
            config.aux_to_latent, config.finetune_lr) == (
        best["alpha"], best["rho_pos"], best["rho_neg"], best["mapper"], best["clip"],
        best["aux_to_latent"], best["finetune_lr"])
    out = str(tmp_path / "train")
    argv = ["--hparams", path, "--pretrained", pretrained, "--arms", "lns",
            "--finetune-epochs", "1", "--steps-per-epoch", "2", "--limit", "64",
            "--batch-size", "32", "--quiet", "--output-dir", out]
    assert train.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        quantizer = json.load(f)["arms"]["lns"]["quantizer"]
    assert quantizer["alpha"] == best["alpha"] and quantizer["mapper"] == best["mapper"]
    assert quantizer["clip"] == best["clip"] and quantizer["aux_to_latent"] == best["aux_to_latent"]


def _space(config) -> dict:
    """The search space of `config`, as keras-tuner holds it: each hyperparameter's config."""
    space = tuning.FineTuningHyperModel(config).space()
    return {c["name"]: c for c in (hp.get_config() for hp in space.space)}


def test_options_become_the_search_space():
    config, _ = tune.parse_args(["--asymmetric-rho", "--search-lr", "--rho-range", "0", "0.3",
                                 "--alpha-range", "0.01", "5"])
    space = {name: (c["min_value"], c["max_value"]) for name, c in _space(config).items()
             if "min_value" in c}
    assert space["alpha"] == (0.01, 5.0) and space["rho_pos"] == space["rho_neg"] == (0.0, 0.3)
    lr = get_protocol("fashion_mnist").finetune_lr
    assert space["finetune_lr"] == pytest.approx((lr / 10, lr * 10))  # a decade either side
    assert config.tuner == "hyperband" and config.epochs == tuning.SMALL_BUDGET["epochs"]
    hp = kt.HyperParameters()
    model = tuning.FineTuningHyperModel(config).build(hp)
    assert model.optimizer is not None  # compiled, ready for the tuner's fit
    assert sorted(hp.values) == ["alpha", "aux_to_latent", "clip", "finetune_lr", "rho_neg",
                                 "rho_pos"]
    values = {"alpha": 2.0, "rho_pos": 0.1, "rho_neg": 0.2, "finetune_lr": 3e-4,
              "clip": "none", "aux_to_latent": False}
    assert tuning.FineTuningHyperModel.settings(values) == values  # every key a TrainConfig field
    assert set(values) <= set(training.TrainConfig.__dataclass_fields__)


@pytest.mark.parametrize("arm, keys", [("sign", ["finetune_lr"]),
                                       ("bop", ["bop_gamma", "bop_threshold", "finetune_lr"])])
def test_sign_and_bop_searches_feed_train_py(arm, keys, pretrained, tmp_path):
    out = str(tmp_path / arm)
    assert tune.main(TINY + ["--arm", arm, "--pretrained", pretrained, "--tuner", "random",
                             "--max-trials", "1", "--output-dir", out]) == 0
    path = os.path.join(out, "best_hparams.json")
    with open(path) as f:
        best = json.load(f)
    assert sorted(best) == keys  # the arm's search space, nothing of lns'
    values = _trials(out)["0"]["hyperparameters"]["values"]
    assert best == pytest.approx({k: values[k] for k in keys})
    if arm == "bop":
        assert 1e-8 <= best["bop_threshold"] <= 1e-3 and 1e-5 <= best["bop_gamma"] <= 1e-1
    table = open(os.path.join(out, "trials.md")).read()
    assert f"Search of the `{arm}` arm" in table and f"--hparams {arm}=" in table
    config = train.parse_args(["--arms", arm, "--hparams", f"{arm}={path}", "--output-dir",
                               str(tmp_path / "parsed")])
    assert {k: getattr(config.for_arm(arm), k) for k in keys} == best
    if arm == "sign":  # a trial is the train.py run of its values: same batches, same weights
        out = str(tmp_path / "train")
        assert train.main(["--arms", arm, "--hparams", f"{arm}={path}", "--pretrained", pretrained,
                           "--finetune-epochs", "1", *TINY[:-3], "--quiet", "--output-dir", out]) == 0
        history = open(os.path.join(out, "arms", arm, "history.csv")).read().splitlines()
        loss = float(history[1].split(",")[history[0].split(",").index("loss")])
        trial = _trials(str(tmp_path / arm))["0"]["metrics"]["metrics"]
        assert loss == trial["loss"]["observations"][0]["value"][0]
    if arm == "bop":  # train.py's bop arm flips with the searched threshold and gamma
        weights = os.path.join(pretrained, "pretrain", "weights.h5")
        model = training.build_arm(config.resolved(), "bop", weights)
        bop = model.optimizer.optimizers[0].get_config()
        assert (bop["threshold"], bop["gamma"]) == pytest.approx(
            (best["bop_threshold"], best["bop_gamma"]))
        tf.keras.backend.clear_session()


def test_each_arm_searches_its_own_directory_from_one_pretraining():
    configs = {arm: tune.parse_args(["--arm", arm])[0] for arm in tuning.TUNED_ARMS}
    for arm, config in configs.items():
        assert config.output_dir == os.path.join("tune_runs", "fashion_mnist", arm)
        assert config.pretrain_dir == os.path.join("tune_runs", "fashion_mnist", "pretrain_run")
        assert config.train_config().arms == (arm,)
    assert list(_space(configs["sign"])) == ["finetune_lr"]
    threshold = _space(configs["bop"])["bop_threshold"]
    assert (threshold["min_value"], threshold["max_value"]) == search_space.DEFAULT_BOP_THRESHOLD_RANGE
    own = tune.parse_args(["--output-dir", "elsewhere"])[0]  # its own pretraining
    assert own.pretrain_dir == os.path.join("elsewhere", "pretrain_run")
    fixed = tune.parse_args(["--clip", "none", "--no-aux-to-latent"])[0]
    assert "clip" not in _space(fixed) and "aux_to_latent" not in _space(fixed)
    assert (fixed.train_config().clip, fixed.train_config().aux_to_latent) == ("none", False)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--alpha-range", "10", "1"], "alpha range 10 1 is inverted"),
        (["--alpha-range", "0", "1"], "low end must be > 0"),
        (["--rho-range", "0.3", "0.3"], "rho range 0.3 0.3 is empty"),
        (["--rho-range", "0", "0.5"], "rho_pos + rho_neg = 1 >= 1"),
        (["--asymmetric-rho", "--rho-range", "0", "0.6"], "rho_pos + rho_neg = 1.2 >= 1"),
        (["--rho-range", "-0.1", "0.2"], "reaches below 0"),
        (["--lr-range", "1e-3", "1e-5"], "finetune_lr range 0.001 1e-05 is inverted"),
        (["--tuner", "grid"], "invalid choice: 'grid' (choose from 'hyperband', 'bayesian', 'random')"),
        (["--search-mapper", "gru"], "invalid choice: 'gru'"),
        (["--search-mapper", "--mapper", "cnn"], "give one or the other"),
        (["--max-trials", "0"], "max_trials=0 must be >= 1"),
        (["--search-seed", "0"], "search_seed=0 must be an integer >= 1"),
        (["--pretrained", "/nonexistent/run"], "does not exist"),
        (["--arm", "sign", "--alpha-range", "0.1", "1"],
         "--alpha-range shapes the search of --arm lns, not of --arm sign"),
        (["--arm", "lns", "--bop-gamma-range", "1e-4", "1e-2"], "shapes the search of --arm bop"),
        (["--arm", "bop", "--no-aux-to-latent"], "--no-aux-to-latent shapes the search of --arm lns"),
        (["--arm", "bop", "--bop-threshold-range", "0", "1e-3"], "low end must be > 0"),
        (["--no-search-lr", "--lr-range", "1e-4", "1e-3"], "contradict each other"),
        (["--arm", "mapped"], "invalid choice: 'mapped' (choose from 'sign', 'bop', 'lns')"),
    ],
)
def test_bad_arguments_fail_before_any_trial(argv, needle, capsys, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        tune.main(argv + ["--output-dir", str(out)])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_bayesian_tuner_without_its_packages_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(tuning, "_missing_packages", lambda needs: ["scipy"])
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--tuner", "bayesian"])
    assert exit_info.value.code == 2
    assert "`pip install scipy`, or choose one of ['hyperband', 'random']" in capsys.readouterr().err


def test_incompatible_checkpoints_are_refused_before_any_trial(pretrained, tmp_path, capsys):
    other = str(tmp_path / "other_model.h5")  # the weights of another model
    tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3)]).save_weights(other)
    out = tmp_path / "search"
    assert tune.main(TINY + ["--pretrained", other, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert other in err and "does not fit model 'bnn_small'" in err
    assert "give a checkpoint of that model, or run with the --model" in err
    assert "delete" not in err  # the user's own file
    assert not (out / tuning.PROJECT).exists()
    notes = tmp_path / "notes.txt"  # not weights at all
    notes.write_text("lr 1e-3 looked best\n")
    assert tune.main(TINY + ["--pretrained", str(notes), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"tune.py: error: {str(notes)!r} is not an HDF5 weights file: give a train.py output "
        "directory whose pretraining finished, or its pretrain/weights.h5.\n"
    )
    # A train.py run of another model, told by its config.json: no model is even built.
    assert tune.main(TINY + ["--pretrained", pretrained, "--model", "resnet20",
                             "--output-dir", str(out)]) == 2
    assert "trained with model='bnn_small'" in capsys.readouterr().err


def test_changed_settings_on_a_resumed_search_are_refused(searched, capsys):
    argv = TINY + ["--tuner", "random", "--search-mapper", "linear", "mlp",
                   "--rho-range", "0", "0.1", "--output-dir", searched["out"]]
    assert tune.main(argv) == 2
    assert "holds a search with other settings" in capsys.readouterr().err


def test_a_search_whose_trials_keep_failing_exits_1_in_one_line(pretrained, tmp_path,
                                                                  monkeypatch, capsys):
    def fail(self, hp, model, *args, **kwargs):
        raise ValueError("no luck")

    monkeypatch.setattr(tuning.FineTuningHyperModel, "fit", fail)
    out = tmp_path / "failing"
    assert tune.main(TINY + ["--pretrained", pretrained, "--tuner", "random", "--max-trials", "5",
                             "--mapper", "linear", "--output-dir", str(out)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tune.py: Number of consecutive failures exceeded the limit of 3.")
    assert "The last failed with: ValueError: no luck. Each trial's traceback: " in last
    assert os.path.join(str(out), tuning.PROJECT, "trial_*", "trial.json") in last


def test_distributed_search_without_checkpoint_does_not_pretrain(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/fashion_mnist here
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "1")
    # A pretraining of its own asked for (not the protocol's shipped checkpoint).
    assert tune.main(TINY + ["--pretrain-epochs", "1", "--output-dir", str(tmp_path / "search")]) == 2
    assert "a distributed search does not pretrain" in capsys.readouterr().err
    assert not (tmp_path / "search" / "pretrain_run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chief_and_two_workers_finish_the_search(pretrained, tmp_path):
    out = tmp_path / "distributed"
    argv = [sys.executable, "tune.py", *TINY[:-1], "--pretrained", pretrained, "--tuner",
            "random", "--max-trials", "3", "--mapper", "linear", "--output-dir", str(out)]
    env = {**os.environ, "KERASTUNER_ORACLE_IP": "127.0.0.1",
           "KERASTUNER_ORACLE_PORT": str(_free_port()), "TF_CPP_MIN_LOG_LEVEL": "2"}
    procs, logs = {}, {}
    try:
        for tuner_id in ("chief", "tuner0", "tuner1"):
            logs[tuner_id] = tmp_path / f"{tuner_id}.log"
            with open(logs[tuner_id], "w") as log:
                procs[tuner_id] = subprocess.Popen(
                    argv, cwd=ROOT, env={**env, "KERASTUNER_TUNER_ID": tuner_id},
                    stdout=log, stderr=subprocess.STDOUT,
                )
        deadline = time.time() + 300
        for tuner_id, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{tuner_id} still running after 300 s:\n{logs[tuner_id].read_text()[-3000:]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = {k: v.read_text() for k, v in logs.items()}
    for tuner_id, proc in procs.items():
        assert proc.returncode == 0, f"{tuner_id}:\n{text[tuner_id][-3000:]}"

    trials = _trials(out)
    assert sorted(trials) == ["0", "1", "2"]
    assert all(t["status"] == "COMPLETED" and t["score"] is not None for t in trials.values())
    ran = {}
    for worker in ("tuner0", "tuner1"):
        match = re.search(rf"worker {worker} ran trials (\[.*\])", text[worker])
        assert match, text[worker][-3000:]
        ran[worker] = json.loads(match.group(1).replace("'", '"'))
        assert ran[worker], f"{worker} ran no trial"
        assert "best_hparams.json" not in text[worker]
    assert sorted(ran["tuner0"] + ran["tuner1"]) == ["0", "1", "2"]
    assert "wrote" in text["chief"] and "best_hparams.json" in text["chief"]
    with open(out / "best_hparams.json") as f:
        best = json.load(f)
    assert best["alpha"] == pytest.approx(
        max(trials.values(), key=lambda t: t["score"])["hyperparameters"]["values"]["alpha"])
