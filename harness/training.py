"""The protocol of the paper under `tf.distribute`: sign pretraining, then fine-tuning arms.

Phase 1 pretrains a sign-binarized BNN (the baseline). Phase 2 fine-tunes each arm
(`protocols.ARMS`) from that one checkpoint. Every arm starts from the same state,
whatever ran before it in the process: the same pretrained weights, the global RNG
reset to the run's seed, and the same batches (epoch `e` of a phase is drawn from
`(seed, phase, e)` alone, `datasets.load(epochs=...)`), with TensorFlow's op
determinism on. A phase cut off mid-way resumes from its last backup
(`tf.keras.callbacks.BackupAndRestore`) and reads exactly the batches it would have
read, so on the CPU a resumed run ends with the same weights as an uninterrupted one.
What a run writes, and where: `harness.rundir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import tempfile
import time
import types
import typing
import warnings

import larq as lq
import tensorflow as tf

import models
from harness import datasets, report
from harness.callbacks import (
    AtomicCheckpoint, CosineDecayPerStep, EpochLine, HistoryCSV, LearningRateScheduler,
    SlowCallbackFilter, StopOnNaN, TrainingDiverged, WallClock,
)
from harness.distribute import STRATEGIES, is_chief, make_strategy
from harness.protocols import ARMS, PRESETS, TUNED_ARMS, get_protocol, lr_at_epoch
from larq_noisy.conversion import bake, mapped_layers, to_mapped
from larq_noisy.monitoring import (
    FlipRateCallback, auxiliary_losses, flip_rates, mean_saturation, size_weighted_mean,
)
from larq_noisy.quantizers import OPTIONS, check_options
from harness.rundir import (
    CheckpointError, RunDir, atomic_path, backup_position, machine, pretrained_run,
    pretrained_weights_path, read_json, save_weights, weights_fingerprint, write_json,
)

#: larq's Bop's default gamma (the bop arm's when none is given).
BOP_GAMMA = inspect.signature(lq.optimizers.Bop).parameters["gamma"].default

__all__ = [
    "ARM_FIELDS", "CheckpointError", "Interrupted", "TrainConfig", "TrainingDiverged",
    "build_arm", "read_hparams", "run",
]

OPTIMIZERS = ("sgd", "adam")
#: The `TrainConfig` fields an arm may have its own value of (`Protocol.tuned`,
#: `--hparams ARM=FILE`): how it fine-tunes, nothing that would unpair the arms.
ARM_FIELDS = ("finetune_lr", "bop_threshold", "bop_gamma", "alpha", "rho_pos", "rho_neg",
              "mapper", "width", "start", "labels", "reduction", "clip", "aux_to_latent")
#: The data streams of a run: all arms share "finetune", so they see the same batches.
STREAMS = ("pretrain", "finetune", "warmup")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. `None` means the default, resolved once (`resolved`,
    `for_arm`) in this order: the value given here (train.py's flags, then a bare
    `--hparams FILE`) > the arm's `tuned` settings (`--hparams ARM=FILE`) > the dataset
    protocol's (`protocols.PROTOCOLS`, its `tuned` settings per arm first; `preset`
    replaces those) > `NoisyMappedQuantizer`'s and larq's Bop defaults."""

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
    # Fine-tuning's rate decays to 0 along a per-step cosine (Bop's gamma too), or
    # follows the protocol's milestones (constant without any).
    finetune_cosine: bool | None = None
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
    # Settings per tuned arm (`TUNED_ARMS` -> {`ARM_FIELDS` field: value}), over the
    # protocol's; the arms tuned as one (`Arm.tuned_as`) take its settings too.
    tuned: dict[str, dict] = dataclasses.field(default_factory=dict)
    seed: int = 0
    strategy: str = "auto"
    output_dir: str = "runs/fashion_mnist"
    pretrained: str | None = None
    # Pretrain here even where the protocol ships a pretrained checkpoint.
    pretrain_here: bool = False
    data_dir: str | None = None
    image_size: int | None = None
    mixed_precision: bool = False
    jit: bool = False
    deterministic: bool = True  # TensorFlow's op determinism (slower on GPUs)
    backup_every: int | None = None  # steps between backups; None: every epoch
    export: bool = False  # convert each finished arm with LCE (larq_noisy.export)
    verbose: int = 1  # 0: only where the results are; 1: progress bars; 2: a line per epoch
    # Set by `resolved` only; any change (`dataclasses.replace`) clears it.
    _resolved: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def resolved(self) -> TrainConfig:
        """A copy with the protocol's run-wide defaults filled in, every arm's settings
        checked; `ValueError` for any bad value. Resolving a resolved config returns it."""
        if self._resolved:
            return self
        self.check_types(self.to_json())
        protocol = get_protocol(self.dataset)
        filled = dataclasses.replace(self)
        filled.model = filled.model or protocol.model
        if (protocol.checkpoint and filled.model == protocol.tuned_model and not filled.pretrain_here
                and filled.pretrained is None and filled.pretrain_epochs is None
                and filled.kernel_quantizer is None and filled.image_size is None):
            filled.pretrained = shipped_checkpoint(filled.dataset)
        if protocol.tuned_model not in (None, filled.model) and filled.preset is None:
            filled.preset = "paper"  # the tuned settings belong to another model
        for field in ("model", "pretrain_epochs", "finetune_epochs", "batch_size", "optimizer",
                      "lr", "arms", "finetune_cosine"):
            if getattr(filled, field) is None:
                setattr(filled, field, getattr(protocol, field))
        filled.arms = tuple(filled.arms)
        filled.validate()
        filled._resolved = True
        return filled

    def for_arm(self, arm: str) -> TrainConfig:
        """This config with `arm`'s fine-tuning settings (`ARM_FIELDS`) filled in: the
        values given here win over the arm's `tuned` settings, which win over the
        protocol's for the arm (the preset's instead, if one is set) and then its
        `finetune_lr`. Options still `None` take the quantizer's or Bop's defaults."""
        source = ARMS[arm].tuned_as or arm
        protocol = get_protocol(self.dataset)
        defaults = {"finetune_lr": protocol.finetune_lr}
        defaults.update(PRESETS[self.preset] if self.preset else protocol.tuned.get(source, {}))
        defaults.update(self.tuned.get(source, {}))
        given = {f: getattr(self, f) for f in ARM_FIELDS if getattr(self, f) is not None}
        config = dataclasses.replace(self, **{**defaults, **given})
        config._resolved = self._resolved  # `validate` checked every arm's settings
        return config

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
        if self.preset not in (None, *PRESETS):
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of {list(PRESETS)}.")
        if self.verbose not in (0, 1, 2):
            raise ValueError(f"verbose={self.verbose} must be 0, 1 or 2.")
        if self.pretrain_here and self.pretrained:
            raise ValueError(f"pretrain_here (--pretrain) and pretrained={self.pretrained!r} "
                             "contradict each other: give one of them.")
        if self.pretrain_epochs == 0 and not self.pretrained:
            raise ValueError("pretrain_epochs=0 needs a pretrained checkpoint to fine-tune from.")
        for arm, values in self.tuned.items():
            if arm not in TUNED_ARMS:
                raise ValueError(f"tuned settings for {arm!r}, which is not a tuned arm; "
                                 f"give them for one of {list(TUNED_ARMS)}.")
            unknown = sorted(set(values) - set(ARM_FIELDS))
            if unknown:
                raise ValueError(f"the {arm} arm's settings {unknown} are not an arm's; "
                                 f"an arm may set {list(ARM_FIELDS)}.")
        for config in (self, *(self.for_arm(arm) for arm in self.arms)):
            for name in ("lr", "finetune_lr", "bop_threshold", "bop_gamma"):
                value = getattr(config, name)
                if value is not None and not value > 0:
                    raise ValueError(f"{name}={value} must be > 0.")
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
        """The `NoisyMappedQuantizer` options of `arm` (`None` for sign weights)."""
        if ARMS[arm].quantizer is None:
            return None
        config = self.for_arm(arm)
        options = {k: getattr(config, k) for k in OPTIONS if getattr(config, k, None) is not None}
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
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self) if f.init}

    def arm_settings(self, arm: str) -> dict:
        """What `arm` fine-tunes with, as it resolves: its learning rate, Bop's threshold
        and gamma (the bop arm; `None`: larq's defaults) and its quantizer options."""
        config = self.for_arm(arm)
        settings = {"finetune_lr": config.finetune_lr}
        if ARMS[arm].bop:
            settings.update(bop_threshold=config.bop_threshold, bop_gamma=config.bop_gamma)
        return {**settings, **(self.quantizer_options(arm) or {})}

    def recorded(self) -> dict:
        """What config.json records: every setting, and every arm's fine-tuning settings
        as they resolve (`"<arm>.<field>"`), so that a resumed run is checked against
        the values its arms use, wherever they came from."""
        record = {**self.to_json(), "machine": machine()}
        for arm in ARMS:
            record.update({f"{arm}.{k}": v for k, v in self.arm_settings(arm).items()})
        return record


_FIELD_TYPES = {k: v for k, v in typing.get_type_hints(TrainConfig).items() if k != "_resolved"}


def read_hparams(specs) -> tuple[dict, dict[str, dict]]:
    """`--hparams [ARM=]FILE ...` (tune.py's best_hparams.json files) as the settings of
    every arm (a bare FILE: any `TrainConfig` fields) and `{arm: settings}` (ARM=FILE:
    `ARM_FIELDS` of a tuned arm). `ValueError` naming the file for anything else, and
    for a setting given both ways."""
    common, tuned = {}, {}
    for spec in specs or ():
        arm, sep, path = spec.partition("=")
        arm, path = (arm, path) if sep else (None, spec)
        if arm is not None and arm not in TUNED_ARMS:
            raise ValueError(f"--hparams {spec!r}: {arm!r} is not a tuned arm; give ARM=FILE "
                             f"with ARM one of {list(TUNED_ARMS)}, or a bare FILE for every arm.")
        values = read_json(path, "give the best_hparams.json written by tune.py")
        if not isinstance(values, dict):
            raise ValueError(f"--hparams {path!r} must hold a JSON object of settings, "
                             f"not {type(values).__name__} {values!r}")
        fields = ARM_FIELDS if arm else tuple(_FIELD_TYPES)
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"--hparams {path!r} has keys {unknown} that "
                             + (f"are not an arm's; valid keys are {list(fields)}" if arm
                                else f"are not settings; valid keys are {sorted(fields)}"))
        try:
            TrainConfig.check_types(values)
        except ValueError as error:
            raise ValueError(f"--hparams {path!r}: {error}") from None
        if arm:
            tuned[arm] = values
        else:
            common.update(values)
    both = sorted(set(common) & {k for values in tuned.values() for k in values})
    if both:
        raise ValueError(f"--hparams: {both} given both for every arm (a bare FILE) and per "
                         "arm (ARM=FILE); give each in one of them.")
    return common, tuned


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
        if kind is dict and isinstance(value, dict):
            return None
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             tuple: "a list of strings", dict: "an object"}
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
            raise CheckpointError(_unloadable(config, weights, error)) from None
    return model


def _unloadable(config: TrainConfig, weights: str, error: Exception) -> str:
    """Why `weights` do not load into `config`'s model (`error`: Keras'), and what to do:
    they are another model's (a `ValueError`: layers or shapes that differ; their run's
    config.json names its model, dataset or image size) or the file is damaged. Never
    "delete it" for a file given as `--pretrained`."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not isinstance(error, ValueError):
        fix = ("give another pretrained checkpoint" if config.pretrained
               else "delete it to train it again")
        return f"{weights} is corrupted or truncated ({reason}): {fix}."
    run = pretrained_run(weights)
    saved = run.saved_settings() if run else {}
    differ = [k for k in ("model", "dataset", "image_size")
              if k in saved and saved[k] != getattr(config, k)]
    if not differ:
        return (
            f"{weights} does not fit model {config.model!r} with input {config.input_shape} and "
            f"{config.spec.num_classes} classes ({reason}): give a checkpoint of that model, or "
            "run with the --model and --dataset it was trained with."
        )

    def flags(values) -> str:
        return " ".join(f"--{k.replace('_', '-')} {values[k]}" if values[k] is not None
                        else f"no --{k.replace('_', '-')}" for k in differ)

    theirs, ours = saved, {k: getattr(config, k) for k in differ}
    return (
        f"{weights} holds the weights of " + ", ".join(f"{k} {theirs[k]!r}" for k in differ)
        + f" ({run.config} says so), not of " + ", ".join(f"{k} {ours[k]!r}" for k in differ)
        + f": give a checkpoint pretrained with {flags(ours)}, or run with {flags(theirs)}."
    )


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
    config = config.for_arm(arm)
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


# --------------------------------------------------------------------------- phases


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what it was doing and where."""


class Progress:
    """What a run is doing (`doing`, set as it goes); as a context manager, it turns a
    `KeyboardInterrupt` (Ctrl-C) into `Interrupted` saying so."""

    def __init__(self, root: str):
        self.root = root
        self.doing = "starting"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, Interrupted):
            raise Interrupted(
                f"interrupted while {self.doing} in {self.root}; finished phases and arms "
                "and the last backup are kept: run the same command again to resume."
            ) from None


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
    progress: Progress
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


def lr_schedule(c: TrainConfig, stream: str, lr: float, epochs: int):
    """The callback that schedules the learning rate of a phase reading `stream`
    ("pretrain", "finetune" or "warmup": constant), as the dataset's protocol says."""
    protocol = get_protocol(c.dataset)
    if stream == "finetune" and c.finetune_cosine:
        gamma = c.bop_gamma if c.bop_gamma is not None else BOP_GAMMA
        return CosineDecayPerStep(lr, epochs * c.steps_per_epoch_run, gamma=gamma)
    milestones, cosine = {
        "pretrain": (protocol.pretrain_milestones, protocol.pretrain_cosine),
        "finetune": (protocol.finetune_milestones, False),
    }.get(stream, ((), False))
    return LearningRateScheduler(lambda epoch: lr_at_epoch(epoch, lr, epochs, milestones, cosine))


def fit_phase(session: Session, model, phase_dir: str, name: str, stream: str, lr: float,
              epochs: int, extra=(), config: TrainConfig | None = None) -> tuple[float, bool]:
    """Train `model` for `epochs` epochs of `stream` (resuming a backup in `phase_dir`),
    its learning rate scheduled from `lr` as `config` (an arm's; default: the run's) says.

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
        lr_schedule(config or c, stream, lr, epochs),
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
        shipped = c.pretrained == shipped_checkpoint(c.dataset)
        session.header(f"Phase 1/2: skipped, fine-tuning from {path}" + (
            f" (shipped, pretrained {_epochs(c.pretrain_epochs)}; --pretrain pretrains here)"
            if shipped else ""))
        return path
    weights = run_dir.pretrained_weights
    if run_dir.read_result(run_dir.pretrain) is not None:
        if os.path.exists(weights):
            session.header(f"Phase 1/2: already done, reusing {weights}")
            return weights
        session.log(f"{weights} is missing: pretraining again")
    session.progress.doing = "pretraining"
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
                        c.pretrain_epochs)
    if not session.chief:  # its own copy: the chief may still be writing weights.h5
        weights = os.path.join(tempfile.mkdtemp(), "weights.h5")
    save_weights(model, weights)
    if session.chief:
        write_json(run_dir.result(run_dir.pretrain),
                   {"epochs": c.pretrain_epochs, "wall_seconds": wall})
    return weights


def warmup(session: Session, c: TrainConfig, model, arm_dir: str) -> float:
    """Train the mappers alone first (`c`: the arm's settings), BatchNorm frozen too
    (inference mode)."""
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
    c = session.config.for_arm(arm)
    arm_dir = session.run_dir.arm(arm)
    options = c.quantizer_options(arm)
    session.header(
        f"Phase 2/2: fine-tuning arm '{arm}' for {_epochs(c.finetune_epochs)}, "
        f"lr {c.finetune_lr:.3g}, "
        + ("sign weights" if options is None else f"mapper options: {report.describe(options)}")
        + (f", Bop {report.describe({'threshold': c.bop_threshold, 'gamma': c.bop_gamma})}"
           if ARMS[arm].bop else "")
    )
    if options is not None and options.get("alpha", 1) > 0:
        session.log("The loss is cross-entropy + aux_loss, the noisy-supervision term alpha * "
                    "sum_i l_i; its corrected squared loss is not bounded below, so the total "
                    "can be negative.")
    with session.strategy.scope():
        model = build_arm(c, arm, weights)
    session.summary(model, "sign" if options is None else "mapped")
    warm = warmup(session, c, model, arm_dir) if options is not None and c.warmup_epochs else 0.0
    flips = [FlipRateCallback(reference=reference)]
    wall, resumed = fit_phase(session, model, arm_dir, arm, "finetune", c.finetune_lr,
                              c.finetune_epochs, extra=flips, config=c)
    fitted = time.time()
    result = {
        **session.evaluate(model),
        "epochs": c.finetune_epochs,
        "resumed": resumed,
        "flip_rates": flip_rates(model, reference=reference),
        "finetune_lr": c.finetune_lr,
        "quantizer": options,
        "machine": machine(),  # where it finished: digits differ between CPU types
    }
    if ARMS[arm].bop:  # None: larq's default
        result["bop"] = {"threshold": c.bop_threshold, "gamma": c.bop_gamma}
    result["flip_rate"] = size_weighted_mean(model, result["flip_rates"])
    if options is not None:
        result["mapper_flip_rate"] = size_weighted_mean(model, flip_rates(model))
        result["saturation"] = mean_saturation(model)
        result["aux_loss"] = sum(auxiliary_losses(model).values())
        deployable = bake(model)
        _compile(deployable, c, c.finetune_lr)  # saved compiled, as the sign arm's model
    else:
        deployable = model
    path = RunDir.model(arm_dir if session.chief else tempfile.mkdtemp())
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


def pretraining(config: TrainConfig, run_dir: RunDir, weights: str) -> dict:
    """How the baseline's `weights` were pretrained: in which `run` directory, for how
    many `epochs` (as its config.json says); `None` for what is not known (`--pretrained`
    given a weights file of no run)."""
    if not config.pretrained:
        return {"run": run_dir.root, "epochs": config.pretrain_epochs}
    source = pretrained_run(weights)
    described_by = os.path.splitext(weights)[0] + ".json"  # a shipped checkpoint's card
    if source is None and os.path.isfile(described_by):
        card = read_json(described_by, "restore it from the repository")
        return {"run": None, "epochs": card.get("epochs"), "described_by": described_by}
    if source is None:
        return {"run": None, "epochs": None}
    return {"run": source.root, "epochs": source.saved_settings().get("pretrain_epochs")}


def collect_results(run_dir: RunDir, config: TrainConfig, baseline_scores: dict,
                    pretrained: dict) -> dict:
    """results.json: the baseline, how it was `pretrained` (`pretraining`) and every
    finished arm of the directory."""
    arms = {}
    for arm in ARMS:
        result = run_dir.read_result(run_dir.arm(arm))
        if result is not None:
            arms[arm] = result
    return {"config": config.to_json(), "dataset": config.dataset, "model": config.model,
            "machine": machine(), "baseline": baseline_scores, "pretraining": pretrained,
            "arms": arms}


def publish(run_dir: RunDir, results: dict) -> None:
    write_json(run_dir.path("results.json"), results)
    with atomic_path(run_dir.path("results.md")) as tmp:
        report.write_results_md(results, tmp)
    with atomic_path(run_dir.path("accuracy.png")) as tmp:
        report.plot_accuracy(run_dir.root, results, tmp)
    with atomic_path(run_dir.path("flip_rates.png")) as tmp:
        report.plot_flip_rates(results, tmp)


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
    quiet = SlowCallbackFilter()
    tf.get_logger().addFilter(quiet)
    try:
        yield
    finally:
        tf.get_logger().removeFilter(quiet)
        tf.keras.mixed_precision.set_global_policy(policy)
        if config.deterministic and not deterministic:
            tf_config.disable_op_determinism()


def shipped_checkpoint(dataset: str) -> str | None:
    """The weights file the dataset's protocol ships (models/weights/), if any."""
    name = get_protocol(dataset).checkpoint
    return os.path.join(models.WEIGHTS_DIR, name) if name else None


def settings_note(c: TrainConfig) -> str:
    """Which fine-tuning settings the run's arms take, and why."""
    protocol = get_protocol(c.dataset)
    if protocol.tuned_model not in (None, c.model) and c.preset == "paper":
        return (f"Fine-tuning settings: the paper's (--preset paper), as {c.dataset}'s tuned "
                f"settings belong to {protocol.tuned_model}, not {c.model}: with the sum "
                "reduction, alpha's scale grows with the size of the layers.")
    if c.preset:
        return f"Fine-tuning settings: the preset {c.preset!r}, one learning rate for every arm."
    if protocol.tuned_model:
        return (f"Fine-tuning settings: each arm's own, tuned for {c.model} on {c.dataset} "
                "(docs/RESULTS.md section 0); flags and --hparams win.")
    return f"Fine-tuning settings: {c.dataset}'s protocol ({protocol.note})."


def run(config: TrainConfig) -> dict:
    """Run the protocol described by `config`; returns the content of results.json.

    Bad settings raise `ValueError` before any work, and so does an output directory
    another process runs in (`rundir.RunInUse`: the directory is locked while the run
    runs); an unreadable file raises `rundir.RunFileError` naming it; a diverging loss
    raises `TrainingDiverged` and keeps the last good checkpoint; Ctrl-C raises
    `Interrupted` saying what the run was doing.
    """
    config = config.resolved()
    run_dir = RunDir(config.output_dir)
    run_dir.ensure_writable()
    # Every worker of a cluster writes to the same directory: only the chief locks it,
    # once it knows it is the chief.
    cluster = config.strategy == "multi_worker"
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(Progress(run_dir.root))
        if not cluster:
            stack.enter_context(run_dir.locked())
        run_dir.check_settings(config.recorded())
        stack.enter_context(run_environment(config))
        # The strategy first: multi-worker needs it before any other TensorFlow op.
        strategy = make_strategy(config.strategy)
        chief = is_chief(strategy)
        if cluster and chief:
            stack.enter_context(run_dir.locked())
        quiet = not (config.verbose and chief)
        session = Session(
            config, run_dir, strategy, chief,
            # Missing data fails here, before any training.
            validation=config.load_split("validation"), test=config.load_split("test"),
            log=(lambda *a, **k: None) if quiet else print, progress=progress,
        )
        session.log(settings_note(config))
        weights = pretrain(session)
        progress.doing = "evaluating the baseline"
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
        pretrained = pretraining(config, run_dir, weights)
        results = collect_results(run_dir, config, scores, pretrained)
        if chief:
            publish(run_dir, results)
        for arm in config.arms:
            arm_dir = run_dir.arm(arm)
            if run_dir.read_result(arm_dir) is not None:
                session.header(f"Phase 2/2: arm '{arm}' already done, skipping")
            else:
                progress.doing = f"fine-tuning arm {arm!r}"
                if chief:
                    os.makedirs(arm_dir, exist_ok=True)
                    write_json(run_dir.lineage(arm), {"weights": weights, "sha256": fingerprint})
                finetune(session, arm, weights, reference)
            if config.export and chief:
                from larq_noisy import export  # LCE only when exporting

                progress.doing = f"exporting arm {arm!r}"
                tflite = export.export_run(run_dir.root, arm=arm, verbose=bool(config.verbose))
                result = run_dir.read_result(arm_dir)
                write_json(run_dir.result(arm_dir), {**result, "tflite": tflite["tflite"]})
            results = collect_results(run_dir, config, scores, pretrained)
            if chief:
                publish(run_dir, results)
        session.header(f"Done: {run_dir.path('results.md')}")
        if chief and config.verbose:
            with open(run_dir.path("results.md")) as f:
                print(f.read())
        elif chief:
            print(f"results: {run_dir.path('results.md')}")
        return results
