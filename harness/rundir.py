"""`RunDir`: every file a train.py run writes, and how it is read and written.

    config.json                  the settings, checked when a run is resumed
    baseline.json                the pretrained sign model's accuracy
    pretrain/weights.h5          the pretrained baseline (what --pretrained reuses)
    pretrain/result.json         written when phase 1 is done
    arms/<arm>/pretrained.json   the pretrained weights the arm started from (fingerprint)
    arms/<arm>/result.json       written when the arm is done: the arm is not redone
    arms/<arm>/model.h5          the baked, deployable model (a stock Larq model)
    arms/<arm>/model.tflite      its LCE flatbuffer and, in model.tflite.json, its report
    <phase>/checkpoint.h5        last good end-of-epoch weights of a phase
    <phase>/backup/              Keras' BackupAndRestore state of an unfinished phase
    <phase>/history.csv          per-epoch loss, accuracy, lr, flip rates, wall time
    <phase>/wall.json            the phase's wall time at its last backup
    tensorboard/<phase>/         the same in TensorBoard
    results.json, results.md     the arms side by side; accuracy.png, flip_rates.png
    lock                         the pid and host of the train.py process running here

Every file is written atomically (a temporary file, then a rename), so an interrupted
write or a full disk leaves the previous good file; every file that cannot be read is
named, with what to do, in one line. One process at a time runs in a directory
(`RunDir.locked`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import socket
import tempfile
import time

__all__ = [
    "CheckpointError", "RunDir", "RunFileError", "RunInUse", "atomic_path", "backup_position",
    "is_arm_model", "pretrained_run", "read_history_rows", "read_json", "save_weights",
    "write_history_rows", "write_json",
]


class RunFileError(ValueError):
    """A file of a run that cannot be read; the message names it and says what to do."""


class CheckpointError(RunFileError):
    """A checkpoint or backup that cannot be read."""


class RunInUse(ValueError):
    """Another process runs in the directory; the message names it and says what to do."""


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path to write, named as `path` (Keras picks the format from its
    extension) in a new folder beside it; it replaces `path` only if the block succeeds.
    Its writer creates the file, so it gets the mode of any new file (mkstemp's is 0600)."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path) or ".",
                                     prefix=f".{os.path.basename(path)}.") as directory:
        tmp = os.path.join(directory, os.path.basename(path))
        yield tmp
        os.replace(tmp, path)


def write_json(path: str, data) -> None:
    """Write `data` as JSON atomically (`allow_nan=False`: what is written reads back)."""
    text = json.dumps(data, indent=2, allow_nan=False)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def read_json(path: str, fix: str):
    """The JSON in `path`; `RunFileError` naming the file and `fix` if it is unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise RunFileError(f"{path} is unreadable ({reason}): {fix}.") from None


def weights_fingerprint(path: str, fix: str = "delete it to train it again") -> str:
    """A SHA-256 of the arrays in a Keras .h5 weights file (not of its bytes, which hold
    write times): equal for equal weights. `CheckpointError` naming the file and `fix`
    if it is unreadable."""
    import h5py
    import numpy as np

    digest = hashlib.sha256()
    try:
        with h5py.File(path, "r") as f:
            names = []
            f.visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
            for name in sorted(names):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(f[name][()]).tobytes())
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} is corrupted or truncated ({error}): {fix}.") from None
    return digest.hexdigest()


def read_history_rows(path: str) -> list[dict]:
    """The rows of a history.csv file, as written (strings)."""
    try:
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("epoch", "").isdigit()]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RunFileError(f"{path} is unreadable ({error}): delete it (only the log is lost).") from None


def write_history_rows(rows: list[dict], path: str) -> None:
    """Write history rows (dicts, `epoch` first) to `path` atomically."""
    columns = ["epoch", *sorted({k for row in rows for k in row} - {"epoch"})]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def save_weights(model, path: str, chief: bool = True) -> None:
    """`model.save_weights(path)` atomically on the chief; a discarded copy elsewhere."""
    if chief:
        with atomic_path(path) as tmp:
            model.save_weights(tmp)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            model.save_weights(os.path.join(scratch, os.path.basename(path)))


def backup_position(backup_dir: str) -> int:
    """The global training step a Keras `BackupAndRestore` backup resumes at (0 without
    one), after reading every tensor of it: `CheckpointError` names an unreadable file."""
    import tensorflow as tf

    directory = os.path.join(backup_dir, "chief")  # where every worker restores from
    fix = f"delete {backup_dir} to redo this phase from its start (finished phases are kept)"
    try:
        latest = tf.train.latest_checkpoint(directory) if os.path.isdir(directory) else None
    except (tf.errors.OpError, ValueError, OSError) as error:
        raise CheckpointError(f"{directory}/checkpoint is unreadable ({error}): {fix}.") from None
    if latest is None:
        return 0
    try:
        reader = tf.train.load_checkpoint(latest)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
        return int(reader.get_tensor("train_counter/.ATTRIBUTES/VARIABLE_VALUE"))
    except (tf.errors.OpError, ValueError, OSError, IndexError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"The backup {latest}.* is corrupted or truncated ({reason}): {fix}."
        ) from None


def _phase_file(name: str):
    """A `RunDir` accessor: the file `name` of a phase directory (pretrain/ or arms/<arm>/)."""
    return staticmethod(lambda phase_dir: os.path.join(phase_dir, name))


class RunDir:
    """The output directory of a train.py run: every path in it, and its checks."""

    #: Settings a resumed run may change without changing results; `machine` too (a
    #: preempted run may resume on another CPU: each arm's result.json says where it
    #: finished), and the path of the `classes` file (what it lists is checked).
    RESUMABLE = ("arms", "strategy", "verbose", "output_dir", "backup_every", "export", "machine",
                 "classes", "guard")

    #: The files of a run that hold no work (`trained_nothing`).
    _NOT_WORK = ("config.json", "lock", "pretrained.json")

    result = _phase_file("result.json")
    model = _phase_file("model.h5")  # an arm's baked, deployable model
    checkpoint = _phase_file("checkpoint.h5")
    backup = _phase_file("backup")
    history = _phase_file("history.csv")
    wall = _phase_file("wall.json")

    def __init__(self, root: str):
        self.root = root
        self.config = self.path("config.json")
        self.lock = self.path("lock")
        self.pretrain = self.path("pretrain")
        self.pretrained_weights = self.path("pretrain", "weights.h5")
        self.baseline = self.path("baseline.json")

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def arm(self, arm: str) -> str:
        return self.path("arms", arm)

    def lineage(self, arm: str) -> str:
        """The record of the pretrained weights `arm` started from."""
        return self.path("arms", arm, "pretrained.json")

    def tensorboard(self, name: str) -> str:
        return self.path("tensorboard", name)

    # ------------------------------------------------------------------ lock

    @contextlib.contextmanager
    def locked(self):
        """Hold the directory's lock while the block runs (call `ensure_writable_dir` first).

        The lock file is created atomically and holds this process' pid and host; a
        second process is refused with `RunInUse` naming the first. A lock left by a
        process of this host that no longer runs (killed with SIGKILL, say) is taken
        over.
        """
        while True:
            try:  # O_EXCL: only if there is none
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                self._remove_stale_lock()
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        try:
            yield
        finally:
            with contextlib.suppress(RunInUse):  # unreadable: not known to be ours
                holder = self._lock_holder()
                if holder is not None and holder[:2] == (os.getpid(), socket.gethostname()):
                    os.remove(self.lock)

    def _remove_stale_lock(self) -> None:
        """Remove the lock if its process, of this host, no longer runs; `RunInUse`
        naming the process if it runs (or may: another host's or another user's)."""
        holder = self._lock_holder()
        if holder is None:
            return  # released meanwhile
        pid, host, started = holder
        if host == socket.gethostname():
            try:
                os.kill(pid, 0)  # signal 0: nothing is sent, the process is only looked up
            except ProcessLookupError:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.lock)
                return
            except PermissionError:  # another user's process
                pass
        raise RunInUse(
            f"{self.root} is in use by process {pid} on host {host} (started {started}); "
            f"wait for it, or delete {self.lock} if no such process runs."
        )

    def _lock_holder(self) -> tuple[int, str, str] | None:
        """`(pid, host, started)` of the lock's holder, `None` without a lock;
        `RunInUse` if it stays unreadable (its holder writes it just after creating it)."""
        for delay in (0.1, 0.5, None):
            try:
                with open(self.lock) as f:
                    holder = json.load(f)
                pid, host = holder["pid"], holder["host"]
                if isinstance(pid, int) and pid > 0 and isinstance(host, str):
                    return pid, host, str(holder.get("started", "at an unknown time"))
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
                pass
            if delay is not None:
                time.sleep(delay)
        raise RunInUse(
            f"{self.lock} is unreadable, so {self.root} may be in use by another process: "
            f"delete {self.lock} if none runs there."
        )

    # ------------------------------------------------------------------ checks

    def check_settings(self, settings: dict, resumable=RESUMABLE, what: str = "a run",
                       config: str | None = None, record: bool = True,
                       replace_untrained: bool = False) -> str | None:
        """Refuse to resume the run saved here with other settings than `settings`
        (those named in `resumable` may change); then record `settings` (in `config`,
        by default config.json) unless `record` is false. With `replace_untrained`, a
        run that `trained_nothing` is replaced instead: the line that says so is returned."""
        path, note = config or self.config, None
        if os.path.exists(path):
            saved = read_json(
                path, f"it records the settings of {what} in {self.root}; restore it, or "
                "choose a new --output-dir",
            )
            # An arm's settings ("<arm>.<field>", `TrainConfig.recorded`; no other key has
            # a ".": the others are field names) are checked once the arm has run with them.
            changed = {
                k: (saved.get(k), v) for k, v in settings.items()
                if k not in resumable and saved.get(k) != v and ("." not in k or k in saved)
            }
            if changed:
                diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
                if not (replace_untrained and self.trained_nothing()):
                    raise ValueError(
                        f"{self.root!r} holds {what} with other settings ({diff}). Resume "
                        "it with the same settings, or choose a new --output-dir."
                    )
                note = (f"{self.root}: replacing the settings of {what} that stopped before "
                        f"its first checkpoint ({diff}).")
        if record:
            write_json(path, settings)
        return note

    def trained_nothing(self) -> bool:
        """Whether the run here has written no weights, backup or result (only its
        settings, lock, lineage records and TensorBoard logs): it stopped before its first
        checkpoint (on missing data, say), and starting it anew loses nothing."""
        for folder, _, files in os.walk(self.root):
            parts = os.path.relpath(folder, self.root).split(os.sep)
            logs = parts[0] == "tensorboard"
            # `.<name>.*` folders: an interrupted `atomic_path` write, not a written file.
            partial = any(p.startswith(".") and p != "." for p in parts)
            if not (logs or partial) and any(not f.startswith(".") and f not in self._NOT_WORK
                                             for f in files):
                return False
        return True

    def saved_settings(self) -> dict:
        """The settings config.json records; `{}` without a readable one."""
        try:
            saved = read_json(self.config, "")
        except RunFileError:
            return {}
        return saved if isinstance(saved, dict) else {}

    def is_run(self) -> bool:
        """Whether the directory holds a train.py run (its config.json or arms/)."""
        return os.path.isdir(self.path("arms")) or os.path.isfile(self.config)

    def read_config(self) -> dict:
        """The settings config.json records; `FileNotFoundError` without one."""
        if not os.path.isfile(self.config):
            raise FileNotFoundError(
                f"{self.config!r} does not exist: is {self.root!r} a train.py run?")
        return read_json(self.config, "restore it from the run, or export the model file itself")

    def trained_arms(self) -> list[str]:
        """The arms that have a model.h5, sorted."""
        arms = self.path("arms")
        listed = os.listdir(arms) if os.path.isdir(arms) else []
        return sorted(arm for arm in listed if os.path.isfile(self.model(self.arm(arm))))

    def arm_model(self, arm: str) -> str:
        """The baked model train.py saved for `arm`; `ValueError` naming the trained arms
        if it has none."""
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"Run directory {self.root!r} does not exist.")
        path = self.model(self.arm(arm))
        if not os.path.isfile(path):
            trained = self.trained_arms()
            choices = f"the trained arms are {trained}" if trained else "no arm has a model.h5 yet"
            raise ValueError(
                f"Arm {arm!r} was not trained in run {self.root!r} (no {path}); {choices}.")
        return path

    def read_result(self, phase_dir: str) -> dict | None:
        """The `result.json` of a finished phase or arm, `None` if it has none."""
        path = self.result(phase_dir)
        if not os.path.exists(path):
            return None
        return read_json(path, f"delete it to redo {os.path.relpath(phase_dir, self.root)}")


def machine() -> dict:
    """The CPU a run computes on: its model and widest x86 vector extension.

    TensorFlow's CPU kernels sum in an order that depends on the instruction set, so a
    run is reproducible to the last digit on one machine type, not across them: every
    result records this, and paired arms always share one machine (one run)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    vector = next((v for v in ("avx512f", "avx2", "avx", "sse4_2") if v in flags), None)
    return {"cpu": model, "vector": vector, "arch": platform.machine()}


def ensure_writable_dir(path: str) -> None:
    """Create `path` if needed; `ValueError` if nothing can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"Output directory {path!r} is not writable: {error.strerror}.") from error


def pretrained_run(weights: str) -> RunDir | None:
    """The train.py run whose pretrain/weights.h5 `weights` is; `None` for a weights
    file of no run."""
    run = RunDir(os.path.dirname(os.path.dirname(weights)) or ".")
    return run if os.path.abspath(run.pretrained_weights) == os.path.abspath(weights) else None


def is_arm_model(path: str) -> bool:
    """Whether `path` is the baked model.h5 of an arm of a train.py run (a directory
    with a config.json)."""
    arm_dir = os.path.dirname(path)
    run = RunDir(os.path.dirname(os.path.dirname(arm_dir)) or ".")
    mine = RunDir.model(run.arm(os.path.basename(arm_dir)))
    return os.path.abspath(mine) == os.path.abspath(path) and os.path.isfile(run.config)


def pretrained_weights_path(path: str) -> str:
    """A `--pretrained` value (a train.py output directory or a weights file) as a file;
    `ValueError` unless it is an HDF5 file (whether its weights fit: `load_weights`)."""
    import h5py

    if os.path.isdir(path):
        path = RunDir(path).pretrained_weights
    fix = "give a train.py output directory whose pretraining finished, or its pretrain/weights.h5"
    if not os.path.isfile(path):
        raise ValueError(f"No pretrained weights at {path!r}: {fix}.")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path!r} is not an HDF5 weights file: {fix}.")
    return path
