"""Scale-out and fault tolerance: two workers on 127.0.0.1, SIGKILL mid-phase, bad files."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # --no-guard: a 1-epoch checkpoint is no pretrained model to guard
    "--dataset", "fashion_mnist", "--pretrain-epochs", "1", "--finetune-epochs", "1",
    "--limit", "320", "--batch-size", "32", "--quiet", "--no-guard",  # 256 to train: 8 steps
]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env(**extra):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _wait_for_first_epoch(proc, history: str, timeout: float = 300) -> None:
    """Until the run of `proc` has finished an epoch (its history.csv has a row)."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(history) and len(open(history).readlines()) >= 2:
            return
        time.sleep(0.05)


def test_two_workers_train_and_only_the_chief_writes_results(tmp_path):
    out = str(tmp_path / "mw")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    # Default verbosity (progress bars, summaries): what users run.
    argv = [sys.executable, "train.py", *[a for a in TINY if a != "--quiet"],
            "--steps-per-epoch", "3", "--arms", "lns", "--strategy", "multi_worker",
            "--output-dir", out]
    procs = []
    try:
        for index in range(2):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            procs.append(subprocess.Popen(
                argv, cwd=ROOT, env=_env(TF_CONFIG=json.dumps(tf_config)),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        outputs = [p.communicate(timeout=420)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert list(results["arms"]) == ["lns"]
    # Nothing but the chief's files: no second results file, no worker copies left.
    found = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert sum(f.endswith("results.json") for f in found) == 1
    assert not [f for f in found if "workertemp" in f], found
    assert "lock" not in found  # the chief's, removed at its end


def _arm_weights(out, arm):
    import tensorflow as tf

    return tf.keras.models.load_model(os.path.join(out, "arms", arm, "model.h5")).get_weights()


def test_an_arm_is_the_same_alone_after_other_arms_and_after_sigkill(pretrained_run, tmp_path):
    """Same checkpoint, seed and batches: the same weights, whatever ran before."""
    common = [*TINY, "--steps-per-epoch", "8", "--finetune-epochs", "2",
              "--pretrained", pretrained_run]
    alone, after, killed = (str(tmp_path / name) for name in ("alone", "after", "killed"))
    assert train.main([*common, "--arms", "sign", "mapped", "lns", "--output-dir", after]) == 0
    assert train.main([*common, "--arms", "lns", "--output-dir", alone]) == 0

    argv = [*common, "--arms", "lns", "--backup-every", "2", "--output-dir", killed]
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once the lns arm has finished its first epoch (its CSV has a row).
    history = os.path.join(killed, "arms", "lns", "history.csv")
    try:
        _wait_for_first_epoch(proc, history)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert os.listdir(os.path.join(killed, "arms", "lns", "backup"))
    assert not os.path.exists(os.path.join(killed, "arms", "lns", "result.json"))
    with open(os.path.join(killed, "arms", "lns", "wall.json")) as f:
        wall_before_kill = json.load(f)["wall_seconds"]

    assert train.main(argv) == 0
    results = {}
    for out in (alone, after, killed):
        with open(os.path.join(out, "results.json")) as f:
            results[out] = json.load(f)["arms"]["lns"]
    assert results[killed]["resumed"] is True and results[alone]["resumed"] is False
    # Exactly equal on the CPU: test accuracy and every weight of the baked model.
    assert results[alone]["test_accuracy"] == results[after]["test_accuracy"]
    assert results[alone]["test_accuracy"] == results[killed]["test_accuracy"]
    for out in (after, killed):
        for a, b in zip(_arm_weights(alone, "lns"), _arm_weights(out, "lns")):
            assert (a == b).all()
    # The resumed arm's wall time counts the session that was killed.
    assert results[killed]["wall_seconds"] > wall_before_kill
    with open(history) as f:
        epochs = sorted({int(row["epoch"]) for row in csv.DictReader(f)})
    assert epochs == [0, 1]  # epoch 1 continued after the backup, not from scratch
    backup = os.path.join(killed, "arms", "lns", "backup")  # done: its checkpoints are removed
    assert not [f for _, _, fs in os.walk(backup) for f in fs]


def test_ctrl_c_ends_with_one_line_saying_where_and_the_same_command_resumes(pretrained_run,
                                                                              tmp_path):
    out = str(tmp_path / "interrupted")
    # Default verbosity (progress bars): what users run.
    argv = [*[a for a in TINY if a != "--quiet"], "--steps-per-epoch", "8", "--finetune-epochs",
            "3", "--arms", "lns", "--pretrained", pretrained_run, "--output-dir", out]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *argv], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
        # Ctrl-C as in a terminal, even if these tests run where SIGINT is ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    history = os.path.join(out, "arms", "lns", "history.csv")
    try:
        _wait_for_first_epoch(proc, history)
        with open(os.path.join(out, "lock")) as f:
            assert json.load(f)["pid"] == proc.pid  # the run holds its directory
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"train.py: interrupted while fine-tuning arm 'lns' in {out}; finished phases and arms "
        "and the last backup are kept: run the same command again to resume."
    )
    assert os.listdir(os.path.join(out, "arms", "lns", "backup"))
    assert not os.path.exists(os.path.join(out, "lock"))

    assert train.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)["arms"]["lns"]
    assert result["resumed"] is True and result["epochs"] == 3


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pre") / "run")
    assert train.main([*TINY, "--steps-per-epoch", "2", "--arms", "sign", "--output-dir", out]) == 0
    return out


def test_truncated_checkpoint_gets_an_error_naming_the_file(pretrained_run, tmp_path, capsys):
    weights = os.path.join(pretrained_run, "pretrain", "weights.h5")
    truncated = tmp_path / "weights.h5"
    truncated.write_bytes(open(weights, "rb").read()[:4096])
    argv = [*TINY, "--steps-per-epoch", "2", "--arms", "lns", "--pretrained", str(truncated),
            "--output-dir", str(tmp_path / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert str(truncated) in err and "is corrupted or truncated" in err
    assert "give another pretrained checkpoint" in err
    assert "Traceback" not in err


def test_corrupted_backup_gets_an_error_naming_the_directory(pretrained_run, tmp_path, capsys):
    out = tmp_path / "resume"
    argv = [*TINY, "--steps-per-epoch", "2", "--arms", "sign", "--pretrained", pretrained_run,
            "--output-dir", str(out)]
    backup = out / "arms" / "sign" / "backup" / "chief"
    backup.mkdir(parents=True)
    (backup / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (backup / "ckpt-1.index").write_bytes(b"\x00garbage" * 16)
    (backup / "ckpt-1.data-00000-of-00001").write_bytes(b"\x00garbage")
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out / "arms" / "sign" / "backup") in err and "corrupted or truncated" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_truncated_backup_data_file_is_named(pretrained_run, tmp_path, capsys):
    out = tmp_path / "truncated_backup"
    argv = [*TINY, "--steps-per-epoch", "4", "--finetune-epochs", "2", "--arms", "sign",
            "--pretrained", pretrained_run, "--backup-every", "2", "--output-dir", str(out)]
    assert train.main(argv) == 0
    # A backup as a killed run leaves it: written, then its data file cut short.
    import tensorflow as tf

    model = tf.keras.models.load_model(out / "arms" / "sign" / "model.h5")
    backup = out / "arms" / "sign" / "backup"
    checkpoint = tf.train.Checkpoint(model=model, train_counter=tf.Variable(2, dtype=tf.int64))
    tf.train.CheckpointManager(checkpoint, str(backup / "chief"), max_to_keep=1).save()
    (data,) = (backup / "chief").glob("ckpt-*.data-*")
    data.write_bytes(data.read_bytes()[:64])
    os.remove(out / "arms" / "sign" / "result.json")
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "corrupted or truncated" in err and str(backup) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "tf_config, needle",
    [
        ("[1, 2]", "is not a JSON object"),
        ("3", "is not a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', 'has no "cluster"'),
        ('{"cluster": ["127.0.0.1:1"]}', 'has "cluster": ["127.0.0.1:1"], not an object'),
        ('{"cluster": {"worker": "127.0.0.1:1"}}', 'has "cluster": {"worker": "127.0.0.1:1"}'),
        ('{"cluster": {"worker": [1]}}', 'not a list of "host:port" addresses'),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": [0]}', 'has "task": [0], not an object'),
        ("{not json", "is not valid JSON"),
    ],
)
def test_a_tf_config_of_the_wrong_shape_is_one_line_before_any_work(tf_config, needle, tmp_path,
                                                                     capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    argv = [*TINY, "--strategy", "multi_worker", "--output-dir", str(tmp_path / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and repr(tf_config) in err and '"cluster": {"worker": [' in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
