"""The protocol of the paper under `tf.distribute`: sign pretraining, then fine-tuning arms.

Phase 1 pretrains a sign-binarized BNN (the baseline). Phase 2 fine-tunes each arm
(`protocols.ARMS`) from that one checkpoint. Every arm starts from the same state,
whatever ran before it in the process: the same pretrained weights, the global RNG
reset to the run's seed, and the same batches (epoch `e` of a phase is drawn from
`(seed, phase, e)` alone, `datasets.load(epochs=...)`), with TensorFlow's op
determinism on. A phase cut off mid-way resumes from its last backup
(`tf.keras.callbacks.BackupAndRestore`) and reads exactly the batches it would have
read, so on the CPU a resumed run ends with the same weights as an uninterrupted one.
What a run writes, and where: `larq_noisy.rundir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import time
import types
import typing
import warnings

import larq as lq
import numpy as np
import tensorflow as tf

import models
from larq_noisy import datasets, report
from larq_noisy.callbacks import FlipRateCallback, auxiliary_losses
from larq_noisy.conversion import (
    bake, flip_rates, mapped_layers, mean_flip_rate, mean_saturation, to_mapped,
)
from larq_noisy.distribute import STRATEGIES, is_chief, make_strategy
from larq_noisy.protocols import ARMS, PRESETS, get_protocol, lr_at_epoch
from larq_noisy.quantizers import OPTIONS, check_options
from larq_noisy.rundir import (
    CheckpointError, RunDir, atomic_path, pretrained_weights_path, read_json, weights_fingerprint,
    write_json,
)

__all__ = ["CheckpointError", "TrainConfig", "TrainingDiverged", "build_arm", "run"]

OPTIMIZERS = ("sgd", "adam")
#: The data streams of a run: all arms share "finetune", so they see the same batches.
STREAMS = ("pretrain", "finetune", "warmup")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. `None` means the dataset's protocol default
    (`protocols.PROTOCOLS`, including its `lns` options) or else, for the LNS options,
    `NoisyMappedQuantizer`'s default."""

    dataset: str = "fashion_mnist"
    model: str | None = None
    arms: tuple[str, ...] | None = None
    pretrain_epochs: int | None = None
    finetune_epochs: int | None = None
    warmup_epochs: int = 0
    steps_per_epoch: int | None = None
    limit: int | None = None  # examples per split, for smoke runs
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    finetune_lr: float | None = None
    kernel_quantizer: str | None = None  # None: the model's own
    alpha: float | None = None
    rho_pos: float | None = None
    rho_neg: float | None = None
    mapper: str | None = None
    width: float | None = None
    start: str | None = None
    labels: str | None = None
    reduction: str | None = None
    clip: str | None = None
    aux_to_latent: bool | None = None
    bop_threshold: float | None = None  # the bop arm's; None: larq's Bop defaults
    bop_gamma: float | None = None
    preset: str | None = None  # "paper": the paper's LNS options instead of the protocol's
    seed: int = 0
    strategy: str = "auto"
    output_dir: str = "runs/fashion_mnist"
    pretrained: str | None = None
    data_dir: str | None = None
    image_size: int | None = None
    mixed_precision: bool = False
    jit: bool = False
    deterministic: bool = True  # TensorFlow's op determinism (slower on GPUs)
    backup_every: int | None = None  # steps between backups; None: every epoch
    export: bool = False  # convert each finished arm with LCE (larq_noisy.export)
    verbose: int = 1  # 0: only where the results are; 1: progress bars; 2: a line per epoch

    def resolved(self) -> TrainConfig:
        """A copy with the protocol's defaults filled in, checked for bad values."""
        self.check_types(dataclasses.asdict(self))
        protocol = get_protocol(self.dataset)
        filled = dataclasses.replace(self)
        for field in ("model", "pretrain_epochs", "finetune_epochs", "batch_size", "optimizer",
                      "lr", "finetune_lr", "arms"):
            if getattr(filled, field) is None:
                setattr(filled, field, getattr(protocol, field))
        filled.arms = tuple(filled.arms)
        lns = PRESETS[filled.preset] if filled.preset in PRESETS else protocol.lns
        for option, value in lns.items():  # recorded in config.json, so checked on resume
            if getattr(filled, option) is None:
                setattr(filled, option, value)
        filled.validate()
        return filled

    @classmethod
    def check_types(cls, values: dict) -> None:
        """`ValueError` naming the first of `values` (field -> value) that is not of its
        field's type, or a float that is not finite."""
        for name, value in values.items():
            error = _type_error(name, value, _FIELD_TYPES[name]) if name in _FIELD_TYPES else (
                f"unknown setting {name!r}"
            )
            if error:
                raise ValueError(error)

    def validate(self) -> None:
        """Raise `ValueError` for any bad value, before any expensive work."""
        datasets.get_spec(self.dataset)
        if self.model not in models.MODELS:
            raise ValueError(f"Unknown model {self.model!r}; choose one of {sorted(models.MODELS)}.")
        unknown = [a for a in self.arms if a not in ARMS]  # no arm: pretraining only
        if unknown:
            raise ValueError(f"Unknown arms {unknown}; choose from {list(ARMS)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of {list(OPTIMIZERS)}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; choose one of {list(STRATEGIES)}.")
        if self.kernel_quantizer not in (None, *models.WEIGHT_QUANTIZERS):
            raise ValueError(
                f"Unknown kernel quantizer {self.kernel_quantizer!r}; "
                f"choose one of {list(models.WEIGHT_QUANTIZERS)}."
            )
        for name in ("pretrain_epochs", "finetune_epochs", "warmup_epochs", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("batch_size", "steps_per_epoch", "limit", "image_size", "backup_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1.")
        for name in ("lr", "finetune_lr", "bop_threshold", "bop_gamma"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value} must be > 0.")
        if self.preset not in (None, *PRESETS):
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of {list(PRESETS)}.")
        if self.verbose not in (0, 1, 2):
            raise ValueError(f"verbose={self.verbose} must be 0, 1 or 2.")
        if self.pretrain_epochs == 0 and not self.pretrained:
            raise ValueError("pretrain_epochs=0 needs a pretrained checkpoint to fine-tune from.")
        for arm in self.arms:  # every arm's quantizer options are valid
            options = self.quantizer_options(arm)
            if options is not None:
                check_options(**options)
        if self.pretrained and not os.path.exists(self.pretrained):
            raise ValueError(
                f"pretrained={self.pretrained!r} does not exist: give a train.py output "
                "directory or its pretrain/weights.h5."
            )

    def quantizer_options(self, arm: str) -> dict | None:
        """The `NoisyMappedQuantizer` options of `arm` (`None` for the sign arm)."""
        if ARMS[arm].quantizer is None:
            return None
        options = {k: getattr(self, k) for k in OPTIONS if getattr(self, k, None) is not None}
        return {**options, **ARMS[arm].quantizer}

    @property
    def spec(self):
        return datasets.get_spec(self.dataset)

    @property
    def input_shape(self) -> tuple:
        h, w, c = self.spec.image_shape
        return (self.image_size, self.image_size, c) if self.image_size else (h, w, c)

    @property
    def steps_per_epoch_run(self) -> int:
        """Training steps in one epoch of this run (the split's batches, capped)."""
        steps = datasets.batches_per_epoch(self.dataset, "train", self.batch_size, self.limit)
        return min(steps, self.steps_per_epoch) if self.steps_per_epoch else steps

    def load_split(self, split: str):
        """The batched dataset of `split` ("validation" or "test"; "train": one epoch
        per iteration, see `train_stream` for a run's reproducible epochs)."""
        dataset, _ = datasets.load(
            self.dataset, split, self.batch_size, seed=self.seed, data_dir=self.data_dir,
            image_size=self.image_size, limit=self.limit,
        )
        return dataset

    def train_stream(self, stream: str, epochs: int, position: int = 0):
        """Epochs `0 .. epochs - 1` of `stream` (one of `STREAMS`) from global step
        `position` on: the batches are a function of (seed, stream, epoch) alone."""
        first, skip = divmod(position, self.steps_per_epoch_run)
        dataset, _ = datasets.load(
            self.dataset, "train", self.batch_size, data_dir=self.data_dir,
            seed=self.seed * len(STREAMS) + STREAMS.index(stream), image_size=self.image_size,
            limit=self.limit, epochs=(first, epochs), skip=skip,
            steps_per_epoch=self.steps_per_epoch,
        )
        return dataset

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _type_error(name: str, value, hint) -> str | None:
    """Why `value` is not of type `hint` (or not finite), or `None`."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if value is None:
        return None if type(None) in options else f"{name} must be set, not null"
    for option in options:
        kind = typing.get_origin(option) or option
        if kind is bool and isinstance(value, bool):
            return None
        if isinstance(value, bool):
            continue
        if kind is int and isinstance(value, int):
            return None
        if kind is float and isinstance(value, (int, float)):
            return None if math.isfinite(value) else f"{name}={value!r} must be a finite number"
        if kind is str and isinstance(value, str):
            return None
        if kind is tuple and isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
            return None
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             tuple: "a list of strings"}
    wanted = " or ".join(names[typing.get_origin(o) or o] for o in options if o is not type(None))
    return f"{name}={value!r} must be {wanted}"


# --------------------------------------------------------------------------- models


def _optimizer(config: TrainConfig, lr: float, bop: bool = False):
    """The run's optimizer; with `bop`, larq's Bop for the binary kernels and the run's
    optimizer for every other variable (larq's `CaseOptimizer`, which takes Keras'
    legacy optimizers)."""
    optimizers = tf.keras.optimizers.legacy if bop else tf.keras.optimizers
    if config.optimizer == "sgd":
        optimizer = optimizers.SGD(lr, momentum=0.9)
    else:
        optimizer = optimizers.Adam(lr)
    if not bop:
        return optimizer
    options = {"threshold": config.bop_threshold, "gamma": config.bop_gamma}
    flips = lq.optimizers.Bop(**{k: v for k, v in options.items() if v is not None})
    return lq.optimizers.CaseOptimizer(
        (lq.optimizers.Bop.is_binary_variable, flips), default_optimizer=optimizer
    )


def _compile(model, config: TrainConfig, lr: float, bop: bool = False) -> None:
    optimizer = _optimizer(config, lr, bop)
    metrics = ["accuracy"]
    if config.spec.num_classes >= 100:
        metrics.append(tf.keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5"))
    model.compile(
        optimizer,
        tf.keras.losses.SparseCategoricalCrossentropy(),
        metrics=metrics,
        jit_compile=config.jit,
    )


def build_baseline(config: TrainConfig, weights: str | None = None):
    """The sign-binarized model, with `weights` (an .h5 file) loaded if given."""
    # The same layer names in every build, so that logs line up across phases and arms.
    tf.keras.backend.reset_uids()
    model = models.build(
        config.model, config.input_shape, config.spec.num_classes,
        kernel_quantizer=config.kernel_quantizer,
    )
    if weights:
        try:
            model.load_weights(weights)
        except (ValueError, OSError) as error:
            raise CheckpointError(
                f"{weights} is corrupted, truncated or does not fit model {config.model!r} "
                f"with input {config.input_shape} and {config.spec.num_classes} classes "
                f"({error}): delete it to train it again."
            ) from None
    return model


def build_arm(config: TrainConfig, arm: str, weights: str):
    """The compiled model of `arm`, fine-tuning from the pretrained `weights`, with the
    global RNG reset to the run's seed (the same mapper initialisation in every arm).

    Call it inside the strategy's scope.
    """
    tf.keras.utils.set_random_seed(config.seed)
    model = build_baseline(config, weights)
    options = config.quantizer_options(arm)
    if options is not None:
        model = to_mapped(model, **options)
    _compile(model, config, config.finetune_lr, bop=ARMS[arm].bop)
    return model


class _MapperWarmup(tf.keras.Model):
    """Trains the mappers alone, every other weight frozen (the paper's warm-up)."""

    def train_step(self, data):
        x, y = data
        variables = [v for l in mapped_layers(self) for v in l.kernel_quantizer.trainable_variables]
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred)
        self.optimizer.minimize(loss, variables, tape=tape)
        return self.compute_metrics(x, y, y_pred, None)


# --------------------------------------------------------------------------- callbacks


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


class LearningRateScheduler(tf.keras.callbacks.LearningRateScheduler):
    """Keras' scheduler, which under larq's `CaseOptimizer` (the bop arm) schedules the
    default optimizer: Bop's threshold and gamma stay as they are."""

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        if isinstance(optimizer, lq.optimizers.CaseOptimizer):
            tf.keras.backend.set_value(optimizer.default.lr, self.schedule(epoch))
        else:
            super().on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        optimizer = getattr(optimizer, "default", optimizer)
        if logs is not None:
            logs["lr"] = float(tf.keras.backend.get_value(optimizer.lr))


class WallClock(tf.keras.callbacks.Callback):
    """Adds `wall_seconds` to the epoch logs: the phase's time so far, the sessions
    before a resumption included. The chief records it in `path` whenever
    `BackupAndRestore` backs up (`save_freq`), so a resumed phase starts from the time
    of the backup it resumes."""

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

    def on_train_batch_end(self, batch, logs=None):
        self.position += 1
        if isinstance(self.save_freq, int) and self.position % self.save_freq == 0:
            self._record()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["wall_seconds"] = self.total
        self._record()


class HistoryCSV(tf.keras.callbacks.Callback):
    """Keras' `CSVLogger`, written atomically: a resumed phase keeps the rows of the
    epochs before it, and a failed write leaves the previous file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.rows = report.read_history_rows(path) if os.path.exists(path) else []

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, **{k: _scalar(v) for k, v in (logs or {}).items()}}
        self.rows = [r for r in self.rows if int(r["epoch"]) < epoch] + [row]
        report.write_history_rows(self.rows, self.path)


def _scalar(value):
    return float(value) if np.ndim(value) == 0 else value


class AtomicCheckpoint(tf.keras.callbacks.Callback):
    """The weights at each epoch end, written atomically. Every worker saves (reading
    distributed variables may need collectives); only the chief keeps the file."""

    def __init__(self, path: str, chief: bool):
        super().__init__()
        self.path, self.chief = path, chief

    def on_epoch_end(self, epoch, logs=None):
        save_weights(self.model, self.path, self.chief)


def save_weights(model, path: str, chief: bool = True) -> None:
    """`model.save_weights(path)` atomically on the chief; a discarded copy elsewhere."""
    if chief:
        with atomic_path(path) as tmp:
            model.save_weights(tmp)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            model.save_weights(os.path.join(scratch, os.path.basename(path)))


class EpochLine(tf.keras.callbacks.Callback):
    """One line per epoch (`verbose=2`): the losses, accuracies, flips, lr and time."""

    def __init__(self, name: str, epochs: int, log):
        super().__init__()
        self.name, self.epochs, self.log = name, epochs, log

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"{self.name} epoch {epoch + 1}/{self.epochs}:"]
        if "aux_loss" in logs:
            parts.append(f"loss {logs['loss']:.4f} = cross-entropy + aux_loss ({logs['aux_loss']:.4g})")
        else:
            parts.append(f"loss {logs.get('loss', float('nan')):.4f}")
        for key, label in (("accuracy", "acc"), ("val_accuracy", "val acc")):
            if key in logs:
                parts.append(f"{label} {logs[key]:.4f}")
        if "flip_rate" in logs:
            parts.append(f"flipped {logs['flip_rate']:.2%}")
        if "lr" in logs:
            parts.append(f"lr {logs['lr']:.3g}")
        parts.append(f"{time.time() - self.start:.0f} s")
        self.log(" ".join(parts), flush=True)


def backup_position(backup_dir: str) -> int:
    """The global training step a Keras `BackupAndRestore` backup resumes at (0 without
    one), after reading every tensor of it: `CheckpointError` names an unreadable file."""
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


# --------------------------------------------------------------------------- phases


@dataclasses.dataclass(frozen=True)
class Session:
    """What every phase of one `run` shares: set once, at its start."""

    config: TrainConfig
    run_dir: RunDir
    strategy: tf.distribute.Strategy
    chief: bool
    validation: tf.data.Dataset
    test: tf.data.Dataset
    log: typing.Callable
    summaries_shown: set = dataclasses.field(default_factory=set)

    def header(self, text: str) -> None:
        self.log(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)

    def summary(self, model, kind: str) -> None:
        """`lq.models.summary` once per model kind. Every worker computes it (it reads
        distributed variables, with collectives); the chief prints it."""
        show = kind not in self.summaries_shown
        self.summaries_shown.add(kind)
        if show:
            lq.models.summary(model, print_fn=self.log)

    def evaluate(self, model) -> dict:
        scores = {}
        for split, data in (("val", self.validation), ("test", self.test)):
            logs = model.evaluate(data, verbose=0, return_dict=True)
            scores[f"{split}_accuracy"] = float(logs["accuracy"])
            if "top5" in logs:
                scores[f"{split}_top5"] = float(logs["top5"])
        return scores


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def fit_phase(session: Session, model, phase_dir: str, name: str, stream: str, lr: float,
              epochs: int, milestones=(), cosine=False, extra=()) -> tuple[float, bool]:
    """Train `model` for `epochs` epochs of `stream` (resuming a backup in `phase_dir`).

    Returns the phase's wall time (sessions before a resumption included) and whether
    it resumed a backup."""
    c = session.config
    os.makedirs(phase_dir, exist_ok=True)
    backup = RunDir.backup(phase_dir)
    position = backup_position(backup)
    steps = c.steps_per_epoch_run
    save_freq = c.backup_every or "epoch"
    clock = WallClock(RunDir.wall(phase_dir), position, save_freq, session.chief)
    if position:
        session.log(f"{name}: resuming at epoch {position // steps + 1}, step {position % steps + 1}")
    bars = c.verbose == 1 and session.chief
    callbacks = [
        StopOnNaN(name, RunDir.checkpoint(phase_dir)),
        LearningRateScheduler(lambda epoch: lr_at_epoch(epoch, lr, epochs, milestones, cosine)),
        # Before `extra`: the bar ends its line without the per-layer flip rates.
        *([tf.keras.callbacks.ProgbarLogger(count_mode="steps")] if bars else []),
        *extra,  # before the loggers: they add to the epoch logs
        clock,
        # BackupAndRestore and TensorBoard know multi-worker training: the chief writes
        # the files, the other workers temporary copies.
        tf.keras.callbacks.BackupAndRestore(backup, save_freq=save_freq),
        AtomicCheckpoint(RunDir.checkpoint(phase_dir), session.chief),
        tf.keras.callbacks.TensorBoard(session.run_dir.tensorboard(name)),
    ]
    if session.chief:
        callbacks.append(HistoryCSV(RunDir.history(phase_dir)))
    if c.verbose == 2 or (c.verbose and not session.chief):
        callbacks.append(EpochLine(name, epochs, print))
    model.fit(
        c.train_stream(stream, epochs, position),
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=session.validation,
        callbacks=callbacks,
        verbose=1 if bars else 0,
    )
    return clock.total, position > 0


def pretrain(session: Session) -> str:
    """Phase 1: the sign baseline's weights file, trained now or found done."""
    c, run_dir = session.config, session.run_dir
    if c.pretrained:
        path = pretrained_weights_path(c.pretrained)
        session.header(f"Phase 1/2: skipped, fine-tuning from {path}")
        return path
    weights = run_dir.pretrained_weights
    if run_dir.read_result(run_dir.pretrain) is not None:
        if os.path.exists(weights):
            session.header(f"Phase 1/2: already done, reusing {weights}")
            return weights
        session.log(f"{weights} is missing: pretraining again")
    protocol = get_protocol(c.dataset)
    session.header(
        f"Phase 1/2: pretraining the sign baseline: {c.model} on {c.dataset}, "
        f"{_epochs(c.pretrain_epochs)}, {c.optimizer} lr {c.lr}, batch {c.batch_size}"
    )
    with session.strategy.scope():
        tf.keras.utils.set_random_seed(c.seed)
        model = build_baseline(c)
        _compile(model, c, c.lr)
    session.summary(model, "sign")
    wall, _ = fit_phase(session, model, run_dir.pretrain, "pretrain", "pretrain", c.lr,
                        c.pretrain_epochs, protocol.pretrain_milestones, protocol.pretrain_cosine)
    if not session.chief:  # its own copy: the chief may still be writing weights.h5
        weights = os.path.join(tempfile.mkdtemp(), "weights.h5")
    save_weights(model, weights)
    if session.chief:
        write_json(run_dir.result(run_dir.pretrain),
                   {"epochs": c.pretrain_epochs, "wall_seconds": wall})
    return weights


def warmup(session: Session, model, arm_dir: str) -> float:
    """Train the mappers alone first, BatchNorm frozen too (inference mode)."""
    c = session.config
    session.log(f"warm-up: {_epochs(c.warmup_epochs)} of the mappers alone")
    batchnorms = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    for layer in batchnorms:
        layer.trainable = False
    with session.strategy.scope():
        warm = _MapperWarmup(model.inputs, model.outputs)
        _compile(warm, c, c.finetune_lr)
    wall, _ = fit_phase(session, warm, os.path.join(arm_dir, "warmup"), f"{model.name}_warmup",
                        "warmup", c.finetune_lr, c.warmup_epochs)
    for layer in batchnorms:
        layer.trainable = True
    with session.strategy.scope():
        _compile(model, c, c.finetune_lr)
    return wall


def finetune(session: Session, arm: str, weights: str, reference) -> dict:
    """Phase 2 for one arm: fine-tune from `weights`, evaluate, bake and save."""
    c, protocol = session.config, get_protocol(session.config.dataset)
    arm_dir = session.run_dir.arm(arm)
    options = c.quantizer_options(arm)
    session.header(
        f"Phase 2/2: fine-tuning arm '{arm}' for {_epochs(c.finetune_epochs)}, "
        f"lr {c.finetune_lr}"
        + (", sign weights" if options is None else f", mapper options {options or 'default'}")
    )
    if options is not None and options.get("alpha", 1) > 0:
        session.log("The loss is cross-entropy + aux_loss, the noisy-supervision term alpha * "
                    "sum_i l_i; its corrected squared loss is not bounded below, so the total "
                    "can be negative.")
    with session.strategy.scope():
        model = build_arm(c, arm, weights)
    session.summary(model, "sign" if options is None else "mapped")
    warm = warmup(session, model, arm_dir) if options is not None and c.warmup_epochs else 0.0
    flips = [FlipRateCallback(reference=reference)]
    wall, resumed = fit_phase(session, model, arm_dir, arm, "finetune", c.finetune_lr,
                              c.finetune_epochs, protocol.finetune_milestones, extra=flips)
    fitted = time.time()
    result = {
        **session.evaluate(model),
        "epochs": c.finetune_epochs,
        "resumed": resumed,
        "flip_rates": flip_rates(model, reference=reference),
        "quantizer": options,
    }
    result["flip_rate"] = mean_flip_rate(model, result["flip_rates"])
    if options is not None:
        result["mapper_flip_rate"] = mean_flip_rate(model, flip_rates(model))
        result["saturation"] = mean_saturation(model)
        result["aux_loss"] = sum(auxiliary_losses(model).values())
        deployable = bake(model)
        _compile(deployable, c, c.finetune_lr)  # saved compiled, as the sign arm's model
    else:
        deployable = model
    path = os.path.join(arm_dir if session.chief else tempfile.mkdtemp(), "model.h5")
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # h5 is what LCE's tooling and larq expect.
        warnings.filterwarnings("ignore", message="You are saving your model as an HDF5")
        deployable.save(tmp, include_optimizer=False)
    result["wall_seconds"] = warm + wall + time.time() - fitted  # resumptions included
    if session.chief:
        write_json(session.run_dir.result(arm_dir), result)
    session.log(
        f"arm '{arm}': val accuracy {result['val_accuracy']:.4f}, test accuracy "
        f"{result['test_accuracy']:.4f}, flipped {result['flip_rate']:.2%} of the binary "
        f"weights since pretraining, {result['wall_seconds']:.0f} s"
    )
    return result


# --------------------------------------------------------------------------- run


def check_lineage(run_dir: RunDir, fingerprint: str) -> None:
    """Refuse arms that were started from other pretrained weights than these."""
    arms_dir = run_dir.path("arms")
    stale = []
    for arm in sorted(os.listdir(arms_dir)) if os.path.isdir(arms_dir) else []:
        path = run_dir.lineage(arm)
        if os.path.exists(path):
            fix = f"delete {run_dir.arm(arm)} to redo the arm"
            if read_json(path, fix).get("sha256") != fingerprint:
                stale.append(arm)
    if stale:
        raise ValueError(
            f"Arms {stale} in {arms_dir} were fine-tuned from other pretrained weights than "
            f"the current ones: delete {', '.join(run_dir.arm(a) for a in stale)} to redo "
            "them from these weights, or choose a new --output-dir."
        )


def baseline(session: Session, weights: str, fingerprint: str, reference) -> dict:
    """The pretrained model's accuracy, evaluated once per pretrained checkpoint."""
    path = session.run_dir.baseline
    if os.path.exists(path):
        saved = read_json(path, "delete it: it is evaluated again")
        if saved.get("sha256") == fingerprint:
            return saved
    scores = {**session.evaluate(reference), "weights": weights, "sha256": fingerprint}
    if session.chief:
        write_json(path, scores)
    return scores


def collect_results(run_dir: RunDir, config: TrainConfig, baseline_scores: dict) -> dict:
    """results.json: the baseline and every finished arm of the directory."""
    arms = {}
    for arm in ARMS:
        result = run_dir.read_result(run_dir.arm(arm))
        if result is not None:
            arms[arm] = result
    return {"config": config.to_json(), "dataset": config.dataset, "model": config.model,
            "baseline": baseline_scores, "arms": arms}


def publish(run_dir: RunDir, results: dict) -> None:
    write_json(run_dir.path("results.json"), results)
    with atomic_path(run_dir.path("results.md")) as tmp:
        report.write_results_md(results, tmp)
    with atomic_path(run_dir.path("accuracy.png")) as tmp:
        report.plot_accuracy(run_dir.root, results, tmp)
    with atomic_path(run_dir.path("flip_rates.png")) as tmp:
        report.plot_flip_rates(results, tmp)


class _NothingToActOn(logging.Filter):
    """Keras' notes that a callback is slow against a tiny batch: backups and flip rates
    are, and the user can do nothing about it."""

    def filter(self, record):
        return "is slow compared to the batch time" not in record.getMessage()


@contextlib.contextmanager
def run_environment(config: TrainConfig):
    """Mixed precision, op determinism and quieter logs for the run; as they were after."""
    from tensorflow.python.framework import config as tf_config  # the public API cannot undo it

    policy = tf.keras.mixed_precision.global_policy()
    deterministic = tf_config.is_op_determinism_enabled()
    if config.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    quiet = _NothingToActOn()
    tf.get_logger().addFilter(quiet)
    try:
        yield
    finally:
        tf.get_logger().removeFilter(quiet)
        tf.keras.mixed_precision.set_global_policy(policy)
        if config.deterministic and not deterministic:
            tf_config.disable_op_determinism()


def run(config: TrainConfig) -> dict:
    """Run the protocol described by `config`; returns the content of results.json.

    Bad settings raise `ValueError` before any work; an unreadable file raises
    `rundir.RunFileError` naming it; a diverging loss raises `TrainingDiverged` and
    keeps the last good checkpoint.
    """
    config = config.resolved()
    run_dir = RunDir(config.output_dir)
    run_dir.ensure_writable()
    run_dir.check_settings(config.to_json())
    with run_environment(config):
        # The strategy first: multi-worker needs it before any other TensorFlow op.
        strategy = make_strategy(config.strategy)
        chief = is_chief(strategy)
        quiet = not (config.verbose and chief)
        session = Session(
            config, run_dir, strategy, chief,
            # Missing data fails here, before any training.
            validation=config.load_split("validation"), test=config.load_split("test"),
            log=(lambda *a, **k: None) if quiet else print,
        )
        weights = pretrain(session)
        fingerprint = weights_fingerprint(
            weights, "give another pretrained checkpoint" if config.pretrained
            else "delete it and run again to pretrain again",
        )
        check_lineage(run_dir, fingerprint)
        reference = build_baseline(config, weights)
        _compile(reference, config, config.lr)
        scores = baseline(session, weights, fingerprint, reference)
        session.log(f"baseline (pretrained sign model): val accuracy {scores['val_accuracy']:.4f}, "
                    f"test accuracy {scores['test_accuracy']:.4f}")
        results = collect_results(run_dir, config, scores)
        if chief:
            publish(run_dir, results)
        for arm in config.arms:
            arm_dir = run_dir.arm(arm)
            if run_dir.read_result(arm_dir) is not None:
                session.header(f"Phase 2/2: arm '{arm}' already done, skipping")
            else:
                if chief:
                    os.makedirs(arm_dir, exist_ok=True)
                    write_json(run_dir.lineage(arm), {"weights": weights, "sha256": fingerprint})
                finetune(session, arm, weights, reference)
            if config.export and chief:
                from larq_noisy import export  # LCE only when exporting

                tflite = export.export_run(run_dir.root, arm=arm, verbose=bool(config.verbose))
                result = run_dir.read_result(arm_dir)
                write_json(run_dir.result(arm_dir), {**result, "tflite": tflite["tflite"]})
            results = collect_results(run_dir, config, scores)
            if chief:
                publish(run_dir, results)
        session.header(f"Done: {run_dir.path('results.md')}")
        if chief and config.verbose:
            with open(run_dir.path("results.md")) as f:
                print(f.read())
        elif chief:
            print(f"results: {run_dir.path('results.md')}")
        return results
