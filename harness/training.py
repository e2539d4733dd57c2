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
import functools
import inspect
import os
import shutil
import sys
import tempfile
import time
import typing
import warnings

import larq as lq
import tensorflow as tf

import models
from harness import report
from harness.callbacks import (
    AtomicCheckpoint, CosineDecayPerStep, EpochLine, HistoryCSV, LearningRateScheduler,
    SlowCallbackFilter, StopOnNaN, TrainingDiverged, WallClock,
)
from harness.distribute import is_chief, make_strategy
from harness.errors import Progress
from harness.protocols import ARMS, get_protocol, lr_at_epoch
from harness.rundir import (
    CheckpointError, RunDir, atomic_path, backup_position, ensure_writable_dir, machine,
    pretrained_run, pretrained_weights_path, read_json, save_weights, weights_fingerprint,
    write_json,
)
from harness.settings import (
    ARM_FIELDS, TrainConfig, checkpoint_mismatch, settings_note, shipped_checkpoint,
)
from larq_noisy.conversion import bake, mapped_layers, to_mapped
from larq_noisy.monitoring import (
    FlipGuard, FlipRateCallback, GuardStopped, auxiliary_losses, flip_rates, mean_saturation,
    size_weighted_mean,
)

__all__ = ["BOP_GAMMA", "CheckpointError", "TrainingDiverged", "build_arm", "build_baseline",
           "lr_schedule", "run", "run_environment"]

#: larq's Bop's default gamma (the bop arm's when none is given).
BOP_GAMMA = inspect.signature(lq.optimizers.Bop).parameters["gamma"].default


def _compile(model, config: TrainConfig, lr: float, bop: bool = False) -> None:
    """Compile `model` with the run's optimizer; with `bop`, larq's Bop for the binary
    kernels and the run's optimizer for every other variable (larq's `CaseOptimizer`,
    which takes Keras' legacy optimizers)."""
    optimizers = tf.keras.optimizers.legacy if bop else tf.keras.optimizers
    sgd = config.optimizer == "sgd"
    optimizer = optimizers.SGD(lr, momentum=0.9) if sgd else optimizers.Adam(lr)
    if bop:
        options = {"threshold": config.bop_threshold, "gamma": config.bop_gamma}
        flips = lq.optimizers.Bop(**{k: v for k, v in options.items() if v is not None})
        optimizer = lq.optimizers.CaseOptimizer(
            (lq.optimizers.Bop.is_binary_variable, flips), default_optimizer=optimizer)
    metrics = ["accuracy"]
    if config.num_classes >= 100:
        metrics.append(tf.keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5"))
    model.compile(optimizer, tf.keras.losses.SparseCategoricalCrossentropy(), metrics=metrics,
                  jit_compile=config.jit)


def build_baseline(config: TrainConfig, weights: str | None = None):
    """The sign-binarized model, with `weights` (an .h5 file) loaded if given."""
    # The same layer names in every build, so that logs line up across phases and arms.
    tf.keras.backend.reset_uids()
    model = models.build(config.model, config.input_shape, config.num_classes,
                         kernel_quantizer=config.kernel_quantizer)
    if weights:
        try:
            model.load_weights(weights)
        except (ValueError, OSError) as error:
            raise CheckpointError(checkpoint_mismatch(config, weights, error)) from None
    return model


def build_arm(config: TrainConfig, arm: str, weights: str):
    """The compiled model of `arm`, fine-tuning from the pretrained `weights`, with the
    global RNG reset to the run's seed (the same mapper initialisation in every arm). Call
    it inside the strategy's scope."""
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
        if kind not in self.summaries_shown:
            self.summaries_shown.add(kind)
            lq.models.summary(model, print_fn=self.log)

    def evaluate(self, model) -> dict:
        scores = {}
        for split, data in (("val", self.validation), ("test", self.test)):
            logs = model.evaluate(data, verbose=0, return_dict=True)
            scores.update({f"{split}_{k}": float(v) for k, v in logs.items()
                           if k in ("accuracy", "top5")})
        return scores


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


def fit_phase(session: Session, c: TrainConfig, model, phase_dir: str, name: str, stream: str,
              lr: float, epochs: int, extra=(), guard=None) -> tuple[float, bool]:
    """Train `model` for `epochs` epochs of `stream` (resuming a backup in `phase_dir`),
    its learning rate scheduled from `lr` as `c` (the run's or an arm's settings) says;
    the phase's wall time (sessions before a resumption included) and whether it resumed.
    `guard(start=steps done)`: a `FlipGuard` to watch the phase's first steps."""
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
        *([guard(start=position)] if guard else []),  # first: it stops before any save
        StopOnNaN(name, RunDir.checkpoint(phase_dir)),
        lr_schedule(c, stream, lr, epochs),
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
    model.fit(c.train_stream(stream, epochs, position), epochs=epochs, steps_per_epoch=steps,
              validation_data=session.validation, callbacks=callbacks, verbose=1 if bars else 0)
    return clock.total, position > 0


def run_pretraining(session: Session) -> str:
    """Phase 1: the sign baseline's weights file, trained now or found done."""
    c, run_dir = session.config, session.run_dir
    if c.pretrained:
        path = pretrained_weights_path(c.pretrained)
        shipped = c.pretrained == shipped_checkpoint(c.dataset)
        session.header(f"Phase 1/2: skipped, fine-tuning from {path}" + (
            f" (shipped, pretrained {report._epochs(c.pretrain_epochs)}; --pretrain pretrains here)"
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
        f"{report._epochs(c.pretrain_epochs)}, {c.optimizer} lr {c.lr}, batch {c.batch_size}"
    )
    with session.strategy.scope():
        tf.keras.utils.set_random_seed(c.seed)
        model = build_baseline(c)
        _compile(model, c, c.lr)
    session.summary(model, "sign")
    wall, _ = fit_phase(session, c, model, run_dir.pretrain, "pretrain", "pretrain", c.lr,
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
    session.log(f"warm-up: {report._epochs(c.warmup_epochs)} of the mappers alone")
    batchnorms = [l for l in model.layers if isinstance(l, tf.keras.layers.BatchNormalization)]
    for layer in batchnorms:
        layer.trainable = False
    with session.strategy.scope():
        warm = _MapperWarmup(model.inputs, model.outputs)
        _compile(warm, c, c.finetune_lr)
    wall, _ = fit_phase(session, c, warm, os.path.join(arm_dir, "warmup"),
                        f"{model.name}_warmup", "warmup", c.finetune_lr, c.warmup_epochs)
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
    bop = {"threshold": c.bop_threshold, "gamma": c.bop_gamma}  # None: larq's default
    session.header(
        f"Phase 2/2: fine-tuning arm '{arm}' for {report._epochs(c.finetune_epochs)}, "
        f"lr {c.finetune_lr:.3g}, "
        + ("sign weights" if options is None else f"mapper options: {report.describe(options)}")
        + (f", Bop {report.describe(bop)}" if ARMS[arm].bop else ""))
    if options is not None and options.get("alpha", 1) > 0:
        session.log("The loss is cross-entropy + aux_loss, the noisy-supervision term alpha * "
                    "sum_i l_i; its corrected squared loss is not bounded below, so the total "
                    "can be negative.")
    with session.strategy.scope():
        model = build_arm(c, arm, weights)
    session.summary(model, "sign" if options is None else "mapped")
    warm = warmup(session, c, model, arm_dir) if options is not None and c.warmup_epochs else 0.0
    flips = [FlipRateCallback(reference=reference)]
    guard = functools.partial(FlipGuard, reference, name=f"arm '{arm}'",
                              advice=guard_advice(options)) if c.guard else None
    wall, resumed = fit_phase(session, c, model, arm_dir, arm, "finetune", c.finetune_lr,
                              c.finetune_epochs, extra=flips, guard=guard)
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
    if ARMS[arm].bop:
        result["bop"] = bop
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


def guard_advice(options: dict | None) -> str:
    """What to change when `FlipGuard` stops an arm with quantizer `options` (None: sign
    weights), as measured in docs/RESULTS.md section 1."""
    if options and options.get("reduction") == "sum":
        fix = "set --preset per_weight (the loss averaged per weight, the separable mapper)"
    elif options and options.get("mapper") == "cnn":
        fix = "set --mapper separable, or a lower --finetune-lr"
    else:
        fix = "set a lower --finetune-lr" + (" or --alpha" if options else "")
    return f"{fix}; the pretrained checkpoint is untouched (--no-guard turns the guard off)"


def stop_arm(session: Session, arm: str, stop: GuardStopped) -> str:
    """An arm the guard stopped: its one line (on stderr, whatever the verbosity), and its
    directory and recorded settings gone, so that the command, with the setting changed,
    fine-tunes it again; the run's other files stay as they are."""
    message = str(stop)
    print(f"train.py: {message}", file=sys.stderr, flush=True)
    run_dir = session.run_dir
    if session.chief:
        shutil.rmtree(run_dir.arm(arm), ignore_errors=True)
        saved = run_dir.saved_settings()
        write_json(run_dir.config, {k: v for k, v in saved.items()
                                    if not k.startswith(arm + ".")})
    return message


def check_lineage(run_dir: RunDir, fingerprint: str) -> None:
    """Refuse arms that were started from other pretrained weights than these."""
    arms_dir = run_dir.path("arms")
    stale = []
    for arm in sorted(os.listdir(arms_dir)) if os.path.isdir(arms_dir) else []:
        path, fix = run_dir.lineage(arm), f"delete {run_dir.arm(arm)} to redo the arm"
        if os.path.exists(path) and read_json(path, fix).get("sha256") != fingerprint:
            stale.append(arm)
    if stale:
        raise ValueError(
            f"Arms {stale} in {arms_dir} were fine-tuned from other pretrained weights than "
            f"the current ones: delete {', '.join(run_dir.arm(a) for a in stale)} to redo "
            "them from these weights, or choose a new --output-dir."
        )


def evaluate_baseline(session: Session, weights: str, fingerprint: str, reference) -> dict:
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


def pretraining_origin(config: TrainConfig, run_dir: RunDir, weights: str) -> dict:
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


def write_results(session: Session, baseline_scores: dict, pretrained: dict,
                  stopped: dict | None = None) -> dict:
    """results.json: the baseline, how it was `pretrained` (`pretraining_origin`), every
    finished arm of the directory and the arms the guard `stopped` ({arm: its line});
    written by the chief, with results.md and the plots."""
    config, run_dir = session.config, session.run_dir
    arms = {arm: run_dir.read_result(run_dir.arm(arm)) for arm in ARMS}
    results = {"config": config.to_json(), "dataset": config.dataset, "model": config.model,
               "machine": machine(), "baseline": baseline_scores, "pretraining": pretrained,
               "arms": {arm: result for arm, result in arms.items() if result is not None},
               "stopped": dict(stopped or {})}
    if not session.chief:
        return results
    write_json(run_dir.path("results.json"), results)
    with atomic_path(run_dir.path("results.md")) as tmp:
        report.write_results_md(results, tmp)
    with atomic_path(run_dir.path("accuracy.png")) as tmp:
        report.plot_accuracy(run_dir.root, results, tmp)
    with atomic_path(run_dir.path("flip_rates.png")) as tmp:
        report.plot_flip_rates(results, tmp)
    return results


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


def run(config: TrainConfig) -> dict:
    """Run the protocol described by `config`; returns the content of results.json. Bad
    settings raise `ValueError` before any work, and so does an output directory another
    process runs in (`rundir.RunInUse`: it is locked while the run runs); an unreadable
    file raises `rundir.RunFileError` naming it; a diverging loss raises `TrainingDiverged`
    and keeps the last good checkpoint; Ctrl-C raises `errors.Interrupted` saying what the
    run was doing."""
    config = config.resolved()
    run_dir = RunDir(config.output_dir)
    ensure_writable_dir(run_dir.root)
    # Every worker of a cluster writes to the same directory: only the chief locks it,
    # once it knows it is the chief.
    cluster = config.strategy == "multi_worker"
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(Progress(run_dir.root))
        if not cluster:
            stack.enter_context(run_dir.locked())
        # A run that stopped before its first checkpoint is replaced, its arms' records too.
        # The settings an arm may have its own value of are checked in the arm's record
        # ("<arm>.<field>") once it has run: an arm the guard stopped runs again changed.
        saved = {} if run_dir.trained_nothing() else run_dir.saved_settings()
        replaced = run_dir.check_settings(
            config.recorded(saved), replace_untrained=True,
            resumable=(*RunDir.RESUMABLE, *ARM_FIELDS, "preset", "tuned"))
        if replaced and config.verbose:
            print(replaced)
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
        weights = run_pretraining(session)
        progress.doing = "evaluating the baseline"
        fingerprint = weights_fingerprint(
            weights, "give another pretrained checkpoint" if config.pretrained
            else "delete it and run again to pretrain again",
        )
        check_lineage(run_dir, fingerprint)
        reference = build_baseline(config, weights)
        _compile(reference, config, config.lr)
        scores = evaluate_baseline(session, weights, fingerprint, reference)
        session.log(f"baseline (pretrained sign model): val accuracy {scores['val_accuracy']:.4f}, "
                    f"test accuracy {scores['test_accuracy']:.4f}")
        pretrained = pretraining_origin(config, run_dir, weights)
        results = write_results(session, scores, pretrained)
        stopped = {}
        for arm in config.arms:
            arm_dir = run_dir.arm(arm)
            if run_dir.read_result(arm_dir) is not None:
                session.header(f"Phase 2/2: arm '{arm}' already done, skipping")
            else:
                progress.doing = f"fine-tuning arm {arm!r}"
                if chief:
                    os.makedirs(arm_dir, exist_ok=True)
                    write_json(run_dir.lineage(arm), {"weights": weights, "sha256": fingerprint})
                try:
                    finetune(session, arm, weights, reference)
                except GuardStopped as stop:
                    stopped[arm] = stop_arm(session, arm, stop)
                    results = write_results(session, scores, pretrained, stopped)
                    continue
            if config.export and chief:
                from harness.exporting import export_arm  # LCE only when exporting

                progress.doing = f"exporting arm {arm!r}"
                tflite = export_arm(run_dir.root, arm, verbose=bool(config.verbose))
                result = run_dir.read_result(arm_dir)
                write_json(run_dir.result(arm_dir), {**result, "tflite": tflite["tflite"]})
            results = write_results(session, scores, pretrained, stopped)
        session.header(f"Done: {run_dir.path('results.md')}")
        if chief and config.verbose:
            with open(run_dir.path("results.md")) as f:
                print(f.read())
        elif chief:
            print(f"results: {run_dir.path('results.md')}")
        return results
