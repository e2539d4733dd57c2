"""The Keras callbacks of a train.py run: they schedule, time, log and save each phase,
and stop it when the loss diverges (the flip rates are `larq_noisy.FlipRateCallback`'s)."""

from __future__ import annotations

import logging
import os
import time

import larq as lq
import numpy as np
import tensorflow as tf

from harness.rundir import (
    read_history_rows, read_json, save_weights, write_history_rows, write_json,
)

__all__ = [
    "AtomicCheckpoint", "CosineDecayPerStep", "EpochLine", "HistoryCSV", "LearningRateScheduler",
    "SlowCallbackFilter", "StopOnNaN", "TrainingDiverged", "WallClock",
]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class StopOnNaN(tf.keras.callbacks.Callback):
    """Stops at the first non-finite loss, before anything saves the broken weights."""

    def __init__(self, phase: str, checkpoint: str):
        super().__init__()
        self.phase, self.checkpoint = phase, checkpoint
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            kept = (
                f"the last good checkpoint is kept at {self.checkpoint}"
                if os.path.exists(self.checkpoint)
                else "no epoch finished, so there is no checkpoint of this phase yet"
            )
            raise TrainingDiverged(
                f"{self.phase}: the loss became {loss} at epoch {self.epoch + 1}, step "
                f"{batch + 1}; training stopped and {kept}. Try a lower learning rate "
                "or a lower alpha."
            )


def _optimizers(model):
    """`(the optimizer a learning rate schedules, Bop or None)`: under larq's
    `CaseOptimizer` (the bop arm) the default optimizer and the Bop beside it, through a
    mixed-precision wrapper."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if isinstance(optimizer, lq.optimizers.CaseOptimizer):
        bop = next((o for o in optimizer.optimizers if isinstance(o, lq.optimizers.Bop)), None)
        return optimizer.default, bop
    return optimizer, None


class LearningRateScheduler(tf.keras.callbacks.LearningRateScheduler):
    """Keras' scheduler (`schedule(epoch) -> lr`), which under larq's `CaseOptimizer` (the
    bop arm) schedules the default optimizer: Bop's threshold and gamma stay as they are."""

    def on_epoch_begin(self, epoch, logs=None):
        tf.keras.backend.set_value(_optimizers(self.model)[0].lr, self.schedule(epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(tf.keras.backend.get_value(_optimizers(self.model)[0].lr))


class CosineDecayPerStep(tf.keras.callbacks.Callback):
    """`lr_t = lr * (1 + cos(pi * min(t, steps) / steps)) / 2`, set before every step `t`.

    Under larq's `CaseOptimizer` (the bop arm) Bop's `gamma`, the rate of its gradient
    average (its learning rate, which Bop's authors decay), decays by the same factor, so
    that Bop's flips settle as the other arms' latent weights do; its threshold stays. A
    resumed phase continues from the optimizer's restored step count."""

    def __init__(self, lr: float, steps: int, gamma: float | None = None):
        super().__init__()
        self.lr, self.steps, self.gamma = lr, max(1, steps), gamma
        self.step = None

    def on_train_batch_begin(self, batch, logs=None):
        default, bop = _optimizers(self.model)
        if self.step is None:  # after BackupAndRestore has restored the optimizer
            self.step = int(tf.keras.backend.get_value(default.iterations))
        factor = 0.5 * (1 + np.cos(np.pi * min(self.step, self.steps) / self.steps))
        tf.keras.backend.set_value(default.lr, self.lr * factor)
        if bop is not None and self.gamma is not None:
            bop._set_hyper("gamma", self.gamma * factor)
        self.step += 1

    on_epoch_end = LearningRateScheduler.on_epoch_end  # the rate the epoch ended with


class WallClock(tf.keras.callbacks.Callback):
    """Adds `wall_seconds` to the epoch logs: the phase's time so far, the sessions
    before a resumption included; and `train_seconds`: the epoch's training steps alone,
    its validation excluded (what steps/s are measured by: bench/gpu_check.py). The
    chief records the wall time in `path` whenever `BackupAndRestore` backs up
    (`save_freq`), so a resumed phase starts from the time of the backup it resumes."""

    def __init__(self, path: str, position: int, save_freq, chief: bool):
        super().__init__()
        self.path, self.position, self.save_freq, self.chief = path, position, save_freq, chief
        saved = read_json(path, "delete it (only the wall time is lost)") if (
            position and os.path.exists(path)) else {}
        self.offset = saved.get("wall_seconds", 0.0) if saved.get("position") == position else 0.0
        self.start = time.time()

    @property
    def total(self) -> float:
        return self.offset + time.time() - self.start

    def _record(self):
        if self.chief:
            write_json(self.path, {"position": self.position, "wall_seconds": self.total})

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start, self.trained = time.time(), None

    def on_train_batch_end(self, batch, logs=None):
        self.position += 1
        if isinstance(self.save_freq, int) and self.position % self.save_freq == 0:
            self._record()

    def on_test_begin(self, logs=None):  # within `fit`: the epoch's validation starts
        self.trained = time.time() - self.epoch_start

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["wall_seconds"] = self.total
            logs["train_seconds"] = self.trained or time.time() - self.epoch_start
        self._record()


class HistoryCSV(tf.keras.callbacks.Callback):
    """Keras' `CSVLogger`, written atomically: a resumed phase keeps the rows of the
    epochs before it, and a failed write leaves the previous file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.rows = read_history_rows(path) if os.path.exists(path) else []

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, **{k: float(v) if np.ndim(v) == 0 else v
                                  for k, v in (logs or {}).items()}}
        self.rows = [r for r in self.rows if int(r["epoch"]) < epoch] + [row]
        write_history_rows(self.rows, self.path)


class AtomicCheckpoint(tf.keras.callbacks.Callback):
    """The weights at each epoch end, written atomically. Every worker saves (reading
    distributed variables may need collectives); only the chief keeps the file."""

    def __init__(self, path: str, chief: bool):
        super().__init__()
        self.path, self.chief = path, chief

    def on_epoch_end(self, epoch, logs=None):
        save_weights(self.model, self.path, self.chief)


class EpochLine(tf.keras.callbacks.Callback):
    """One line per epoch (`verbose=2`): the losses, accuracies, flips, lr and time."""

    #: `(log key, label, format)` of the figures after the loss.
    FIELDS = (("accuracy", "acc", ".4f"), ("val_accuracy", "val acc", ".4f"),
              ("flip_rate", "flipped", ".2%"), ("lr", "lr", ".3g"))

    def __init__(self, name: str, epochs: int, log):
        super().__init__()
        self.name, self.epochs, self.log = name, epochs, log

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = f"loss {logs.get('loss', float('nan')):.4f}"
        if "aux_loss" in logs:
            loss += f" = cross-entropy + aux_loss ({logs['aux_loss']:.4g})"
        parts = [f"{self.name} epoch {epoch + 1}/{self.epochs}:", loss]
        parts += [f"{label} {logs[key]:{spec}}" for key, label, spec in self.FIELDS if key in logs]
        parts.append(f"{time.time() - self.start:.0f} s")
        self.log(" ".join(parts), flush=True)


class SlowCallbackFilter(logging.Filter):
    """Drops Keras' notes that a callback is slow against a tiny batch: backups and flip rates
    are, and the user can do nothing about it."""

    def filter(self, record):
        return "is slow compared to the batch time" not in record.getMessage()
