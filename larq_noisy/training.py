"""The protocol of the paper under `tf.distribute`: sign pretraining, then fine-tuning arms.

Phase 1 pretrains a sign-binarized BNN (the baseline). Phase 2 fine-tunes each arm
(`protocols.ARMS`) from that one checkpoint with the same schedule and seed. Everything
a run writes lives under its output directory:

    config.json                  the settings, checked when a run is resumed
    pretrain/weights.h5          the pretrained baseline (what --pretrained reuses)
    pretrain/checkpoint.h5       last good end-of-epoch weights of the phase
    arms/<arm>/checkpoint.h5     likewise, per arm
    arms/<arm>/model.h5          the baked, deployable model (a stock Larq model)
    arms/<arm>/result.json       written when the arm is done: the arm is not redone
    */history.csv                per-epoch loss, accuracy, lr, flip rates, aux loss
    tensorboard/<phase>/         the same in TensorBoard
    results.json, results.md     the arms side by side; accuracy.png, flip_rates.png

Running the same settings again resumes: finished phases are skipped, and a phase cut
off mid-way continues from its last backup (`tf.keras.callbacks.BackupAndRestore`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import warnings

import larq as lq
import numpy as np
import tensorflow as tf

import models
from larq_noisy import datasets, export, report
from larq_noisy.callbacks import FlipRateCallback, auxiliary_losses
from larq_noisy.conversion import bake, flip_rates, mapped_layers, mean_flip_rate, to_mapped
from larq_noisy.distribute import STRATEGIES, is_chief, make_strategy
from larq_noisy.protocols import ARMS, get_protocol, lr_at_epoch
from larq_noisy.quantizers import OPTIONS, check_options

__all__ = ["CheckpointError", "TrainConfig", "TrainingDiverged", "build_arm", "run"]

OPTIMIZERS = ("sgd", "adam")
# Settings that may change between a run and its resumption without changing results.
_RESUMABLE = ("arms", "strategy", "verbose", "output_dir", "backup_every", "export")


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
    kernel_quantizer: str | None = None  # None: the model's own (models.DEFAULT_KERNEL_QUANTIZERS)
    alpha: float | None = None
    rho_pos: float | None = None
    rho_neg: float | None = None
    mapper: str | None = None
    width: float | None = None
    start: str | None = None
    labels: str | None = None
    reduction: str | None = None
    seed: int = 0
    strategy: str = "auto"
    output_dir: str = "runs/fashion_mnist"
    pretrained: str | None = None
    data_dir: str | None = None
    image_size: int | None = None
    mixed_precision: bool = False
    jit: bool = False
    backup_every: int | None = None  # steps between backups; None: every epoch
    export: bool = False  # convert each finished arm with LCE (larq_noisy.export)
    verbose: int = 1

    def resolved(self) -> TrainConfig:
        """A copy with the protocol's defaults filled in, checked for bad values."""
        protocol = get_protocol(self.dataset)
        filled = dataclasses.replace(self)
        for field in ("model", "pretrain_epochs", "finetune_epochs", "batch_size", "optimizer",
                      "lr", "finetune_lr", "arms"):
            if getattr(filled, field) is None:
                setattr(filled, field, getattr(protocol, field))
        filled.arms = tuple(filled.arms)
        for option, value in protocol.lns.items():  # recorded in config.json, so checked on resume
            if getattr(filled, option) is None:
                setattr(filled, option, value)
        filled.validate()
        return filled

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
        for name in ("pretrain_epochs", "finetune_epochs", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        for name in ("batch_size", "steps_per_epoch", "limit", "image_size", "backup_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1.")
        for name in ("lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
        if self.pretrain_epochs == 0 and not self.pretrained:
            raise ValueError("pretrain_epochs=0 needs a --pretrained checkpoint to fine-tune from.")
        for arm in self.arms:  # every arm's quantizer options are valid
            options = self.quantizer_options(arm)
            if options is not None:
                check_options(**options)
        if self.pretrained and not os.path.exists(self.pretrained):
            raise ValueError(
                f"--pretrained {self.pretrained!r} does not exist: give a train.py output "
                "directory or its pretrain/weights.h5."
            )

    def quantizer_options(self, arm: str) -> dict | None:
        """The `NoisyMappedQuantizer` options of `arm` (`None` for the sign arm)."""
        if ARMS[arm] is None:
            return None
        options = {k: getattr(self, k) for k in OPTIONS if getattr(self, k, None) is not None}
        return {**options, **ARMS[arm]}

    @property
    def spec(self):
        return datasets.get_spec(self.dataset)

    @property
    def input_shape(self) -> tuple:
        h, w, c = self.spec.image_shape
        return (self.image_size, self.image_size, c) if self.image_size else (h, w, c)

    def load_split(self, split: str):
        """The batched dataset of `split` ("train", "validation" or "test") for this run."""
        dataset, _ = datasets.load(
            self.dataset, split, self.batch_size, seed=self.seed, data_dir=self.data_dir,
            image_size=self.image_size, limit=self.limit,
        )
        return dataset

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- files


def write_json(path, data) -> None:
    """Write atomically: an interrupted write never loses the previous file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def ensure_writable_dir(path: str) -> None:
    """Create `path` if needed; `ValueError` if nothing can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"Output directory {path!r} is not writable: {error.strerror}.") from error


def prepare_output_dir(config: TrainConfig) -> None:
    """Create the output directory, or check that it holds a run with the same settings."""
    out = config.output_dir
    ensure_writable_dir(out)
    path = os.path.join(out, "config.json")
    current = config.to_json()
    check_same_settings(path, current, _RESUMABLE, "a run")
    write_json(path, current)


def check_same_settings(path: str, current: dict, resumable, what: str) -> None:
    """Refuse to resume the `what` saved at `path` with other settings than `current`
    (those named in `resumable` may change)."""
    if not os.path.exists(path):
        return
    saved = read_json(path)
    changed = {
        k: (saved.get(k), v) for k, v in current.items()
        if k not in resumable and saved.get(k) != v
    }
    if changed:
        diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(
            f"{os.path.dirname(path)!r} holds {what} with other settings ({diff}). Resume "
            "it with the same settings, or choose a new --output-dir."
        )


def pretrained_weights_path(path: str) -> str:
    """A `--pretrained` value (a train.py output directory or a weights file) as a file."""
    if os.path.isdir(path):
        path = os.path.join(path, "pretrain", "weights.h5")
    if not os.path.isfile(path):
        raise ValueError(
            f"No pretrained weights at {path!r}: give a train.py output directory whose "
            "pretraining finished, or its pretrain/weights.h5."
        )
    return path


# --------------------------------------------------------------------------- models


def _compile(model, config: TrainConfig, lr: float) -> None:
    if config.optimizer == "sgd":
        optimizer = tf.keras.optimizers.SGD(lr, momentum=0.9)
    else:
        optimizer = tf.keras.optimizers.Adam(lr)
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
                f"Checkpoint {weights!r} is corrupted, truncated or does not fit model {config.model!r} with input "
                f"{config.input_shape} and {config.spec.num_classes} classes: {error}"
            ) from error
    return model


def build_arm(config: TrainConfig, arm: str, weights: str):
    """The compiled model of `arm`, fine-tuning from the pretrained `weights`.

    Call it inside the strategy's scope.
    """
    tf.keras.utils.set_random_seed(config.seed)
    model = build_baseline(config, weights)
    options = config.quantizer_options(arm)
    if options is not None:
        model = to_mapped(model, **options)
    _compile(model, config, config.finetune_lr)
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
                "(--lr / --finetune-lr) or a lower --alpha."
            )


class CheckpointError(ValueError):
    """A checkpoint or backup that cannot be read."""


class BackupAndRestore(tf.keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore`, with a clear error for a corrupted or truncated backup."""

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (tf.errors.OpError, ValueError, OSError) as error:
            raise CheckpointError(
                f"The backup in {self.backup_dir!r} is corrupted or truncated and cannot be "
                f"restored ({type(error).__name__}). Delete that directory to redo this "
                "phase from its start; finished phases and arms are kept."
            ) from error


def _callbacks(config, phase_dir, tb_name, lr, epochs, milestones, cosine, chief, extra=()):
    # ModelCheckpoint, BackupAndRestore and TensorBoard know multi-worker training: the
    # chief writes the files, the other workers write to temporary copies.
    checkpoint = os.path.join(phase_dir, "checkpoint.h5")
    callbacks = [
        StopOnNaN(os.path.basename(phase_dir), checkpoint),
        tf.keras.callbacks.LearningRateScheduler(
            lambda epoch: lr_at_epoch(epoch, lr, epochs, milestones, cosine)
        ),
        *extra,  # before the loggers: they add to the epoch logs
        BackupAndRestore(os.path.join(phase_dir, "backup"), save_freq=config.backup_every or "epoch"),
        tf.keras.callbacks.ModelCheckpoint(checkpoint, save_weights_only=True),
        tf.keras.callbacks.TensorBoard(os.path.join(config.output_dir, "tensorboard", tb_name)),
    ]
    if chief:
        callbacks.append(
            tf.keras.callbacks.CSVLogger(os.path.join(phase_dir, "history.csv"), append=True)
        )
    return callbacks


# --------------------------------------------------------------------------- run


class _Run:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.out = config.output_dir
        self.log = print if config.verbose else (lambda *a, **k: None)

    def header(self, text):
        self.log(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)

    def summary(self, model):
        if self.chief and self.config.verbose:
            lq.models.summary(model)

    def load_data(self):
        c = self.config
        self.train = c.load_split("train")
        if c.steps_per_epoch:
            self.train = self.train.take(c.steps_per_epoch)
        self.validation = c.load_split("validation")
        self.test = c.load_split("test")

    def evaluate(self, model) -> dict:
        scores = {}
        for split, data in (("val", self.validation), ("test", self.test)):
            logs = model.evaluate(data, verbose=0, return_dict=True)
            scores[f"{split}_accuracy"] = float(logs["accuracy"])
            if "top5" in logs:
                scores[f"{split}_top5"] = float(logs["top5"])
        return scores

    def fit(self, model, phase_dir, tb_name, lr, epochs, milestones, cosine, extra=()):
        os.makedirs(phase_dir, exist_ok=True)
        callbacks = _callbacks(
            self.config, phase_dir, tb_name, lr, epochs, milestones, cosine, self.chief, extra
        )
        return model.fit(
            self.train,
            epochs=epochs,
            validation_data=self.validation,
            callbacks=callbacks,
            verbose=2 if self.config.verbose and not self.chief else self.config.verbose,
        )

    # Phase 1 ---------------------------------------------------------------
    def pretrain(self) -> str:
        c, protocol = self.config, get_protocol(self.config.dataset)
        if c.pretrained:
            path = pretrained_weights_path(c.pretrained)
            self.header(f"Phase 1/2: skipped, fine-tuning from {path}")
            return path
        phase_dir = os.path.join(self.out, "pretrain")
        weights = os.path.join(phase_dir, "weights.h5")
        if os.path.exists(os.path.join(phase_dir, "result.json")):
            self.header(f"Phase 1/2: already done, reusing {weights}")
            return weights
        self.header(
            f"Phase 1/2: pretraining the sign baseline: {c.model} on {c.dataset}, "
            f"{c.pretrain_epochs} epochs, {c.optimizer} lr {c.lr}, batch {c.batch_size}"
        )
        with self.strategy.scope():
            tf.keras.utils.set_random_seed(c.seed)
            model = build_baseline(c)
            _compile(model, c, c.lr)
        self.summary(model)
        start = time.time()
        self.fit(model, phase_dir, "pretrain", c.lr, c.pretrain_epochs,
                 protocol.pretrain_milestones, protocol.pretrain_cosine)
        if self.chief:
            model.save_weights(weights)
            write_json(os.path.join(phase_dir, "result.json"),
                        {"epochs": c.pretrain_epochs, "wall_seconds": time.time() - start})
        else:  # its own copy: the chief may still be writing weights.h5
            weights = os.path.join(tempfile.mkdtemp(), "weights.h5")
            model.save_weights(weights)
        return weights

    # Phase 2 ---------------------------------------------------------------
    def finetune(self, arm: str, weights: str, reference) -> dict:
        c, protocol = self.config, get_protocol(self.config.dataset)
        arm_dir = os.path.join(self.out, "arms", arm)
        options = c.quantizer_options(arm)
        self.header(
            f"Phase 2/2: fine-tuning arm '{arm}' for {c.finetune_epochs} epochs, "
            f"lr {c.finetune_lr}"
            + (", sign weights" if options is None else f", mapper options {options or 'default'}")
        )
        with self.strategy.scope():
            model = build_arm(c, arm, weights)
        self.summary(model)
        start = time.time()
        if options is not None and c.warmup_epochs:
            self.warmup(model, arm_dir)
        flips = [FlipRateCallback(reference=reference)]
        history = self.fit(model, arm_dir, arm, c.finetune_lr, c.finetune_epochs,
                           protocol.finetune_milestones, False, extra=flips)
        wall = time.time() - start
        result = {
            **self.evaluate(model),
            "epochs": c.finetune_epochs,
            "wall_seconds": wall,
            "resumed": len(history.epoch) < c.finetune_epochs,
            "flip_rates": flip_rates(model, reference=reference),
            "quantizer": options,
        }
        result["flip_rate"] = mean_flip_rate(model, result["flip_rates"])
        if options is not None:
            result["mapper_flip_rate"] = mean_flip_rate(model, flip_rates(model))
            result["aux_loss"] = sum(auxiliary_losses(model).values())
            deployable = bake(model)
        else:
            deployable = model
        # Every worker saves (a distributed model's variables are read with collectives);
        # only the chief's copy is kept.
        saved = os.path.join(arm_dir if self.chief else tempfile.mkdtemp(), "model.h5")
        with warnings.catch_warnings():  # h5 is what LCE's tooling and larq expect
            warnings.filterwarnings("ignore", message="You are saving your model as an HDF5")
            deployable.save(saved, include_optimizer=False)
        if self.chief:
            write_json(os.path.join(arm_dir, "result.json"), result)
        self.log(
            f"arm '{arm}': val accuracy {result['val_accuracy']:.4f}, test accuracy "
            f"{result['test_accuracy']:.4f}, flipped {result['flip_rate']:.2%} of the binary "
            f"weights since pretraining, {wall:.0f} s"
        )
        return result

    def warmup(self, model, arm_dir):
        """Train the mappers alone first, BatchNorm frozen too (inference mode)."""
        c = self.config
        self.log(f"warm-up: {c.warmup_epochs} epochs of the mappers alone")
        batchnorms = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
        for layer in batchnorms:
            layer.trainable = False
        with self.strategy.scope():
            warm = _MapperWarmup(model.inputs, model.outputs)
            _compile(warm, c, c.finetune_lr)
        self.fit(warm, os.path.join(arm_dir, "warmup"), f"{model.name}_warmup",
                 c.finetune_lr, c.warmup_epochs, (), False)
        for layer in batchnorms:
            layer.trainable = True
        with self.strategy.scope():
            _compile(model, c, c.finetune_lr)

    def publish(self, results):
        if not self.chief:
            return
        write_json(os.path.join(self.out, "results.json"), results)
        report.write_results_md(results, os.path.join(self.out, "results.md"))
        report.plot_accuracy(self.out, os.path.join(self.out, "accuracy.png"))
        report.plot_flip_rates(results, os.path.join(self.out, "flip_rates.png"))

    def __call__(self) -> dict:
        c = self.config
        # The strategy first: multi-worker needs it before any other TensorFlow op.
        self.strategy = make_strategy(c.strategy)
        self.chief = is_chief(self.strategy)
        self.load_data()  # missing data fails here, before any training
        results_path = os.path.join(self.out, "results.json")
        results = read_json(results_path) if os.path.exists(results_path) else {}
        results.update(config=c.to_json(), dataset=c.dataset, model=c.model)
        results.setdefault("arms", {})

        weights = self.pretrain()
        reference = build_baseline(c, weights)
        _compile(reference, c, c.lr)
        if "baseline" not in results:
            results["baseline"] = {**self.evaluate(reference), "weights": weights}
            self.publish(results)
        self.log(f"baseline (pretrained sign model): val accuracy "
                 f"{results['baseline']['val_accuracy']:.4f}, test accuracy "
                 f"{results['baseline']['test_accuracy']:.4f}")
        for arm in c.arms:
            result_path = os.path.join(self.out, "arms", arm, "result.json")
            if os.path.exists(result_path):
                self.header(f"Phase 2/2: arm '{arm}' already done, skipping")
                results["arms"][arm] = read_json(result_path)
            else:
                results["arms"][arm] = self.finetune(arm, weights, reference)
            if c.export and self.chief:
                report = export.export_run(self.out, arm=arm, verbose=bool(c.verbose))
                results["arms"][arm]["tflite"] = report["tflite"]
            self.publish(results)
        self.header(f"Done: {os.path.join(self.out, 'results.md')}")
        if self.chief and c.verbose:
            with open(os.path.join(self.out, "results.md")) as f:
                self.log(f.read())
        return results


def run(config: TrainConfig) -> dict:
    """Run the protocol described by `config`; returns the content of results.json.

    Bad settings raise `ValueError` before any work; a diverging loss raises
    `TrainingDiverged` and keeps the last good checkpoint.
    """
    config = config.resolved()
    prepare_output_dir(config)
    policy = tf.keras.mixed_precision.global_policy()
    if config.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return _Run(config)()
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
