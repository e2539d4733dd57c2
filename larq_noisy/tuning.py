"""Searching LNS' hyperparameters with keras-tuner, scored on the validation split.

Every trial fine-tunes the `lns` arm (`training.build_arm`) from one pretrained sign
checkpoint and is scored by its best validation accuracy (`datasets.load(...,
"validation")`, held out of the training set; the test split is never used here).
The whole search space is `LNSHyperModel.build(hp)`:

    alpha        log-uniform in `SearchSpace.alpha`          (default 1e-3 .. 10)
    rho          uniform in `SearchSpace.rho`, rho_pos = rho_neg = rho (default 0 .. 0.2);
                 with `asymmetric_rho`, `rho_pos` and `rho_neg` separately
    mapper       a choice among `SearchSpace.mappers`       (only when given)
    finetune_lr  log-uniform in `SearchSpace.finetune_lr`   (only when given)

`search(config)` runs the whole thing and writes into `config.output_dir`:

    best_hparams.json   the best trial's values, as `TrainConfig` fields
                        (what `train.py --hparams` reads)
    trials.md           the top trials
    trials.png          validation accuracy against alpha and rho
    search/             keras-tuner's project (oracle, trials): re-running resumes it
    tune_config.json    the settings, checked when a search is resumed
    pretrain_run/       the pretraining, when no checkpoint was found

Distributed tuning is keras-tuner's: with `KERASTUNER_TUNER_ID`,
`KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT` set, the process whose tuner id
contains "chief" serves the oracle and writes the files above; the others (workers)
run trials.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time

import keras_tuner as kt
import tensorflow as tf

from larq_noisy import datasets, training
from larq_noisy.rundir import (
    RunDir, ensure_writable_dir, pretrained_weights_path, read_json, write_json,
)
from larq_noisy.distribute import STRATEGIES, make_strategy
from larq_noisy.mappers import MAPPERS
from larq_noisy.protocols import get_protocol, lr_at_epoch
from larq_noisy.quantizers import check_options

__all__ = [
    "DEFAULT_ALPHA_RANGE",
    "DEFAULT_RHO_RANGE",
    "TUNERS",
    "LNSHyperModel",
    "SearchSpace",
    "SetupError",
    "TuneConfig",
    "locate_checkpoint",
    "prepare_checkpoint",
    "search",
]

TUNERS = ("hyperband", "bayesian", "random")
OBJECTIVE = "val_accuracy"
PROJECT = "search"  # keras-tuner's project directory, inside the output directory
DEFAULT_ALPHA_RANGE = (1e-3, 10.0)
DEFAULT_RHO_RANGE = (0.0, 0.2)
PAPER = {"alpha": 1.0, "rho": 0.005}  # the paper's CIFAR-10 values, for reference

# Search budgets per dataset, for when --epochs / --steps-per-epoch / --max-trials are
# not given: the offline default finishes, one-time pretraining included, in under 15
# minutes on 2 CPU cores (measured, see the README). Elsewhere: a trial fine-tunes for
# the protocol's whole schedule, and Hyperband runs one full iteration.
# [project decision]
SMALL_BUDGET = {"epochs": 3, "steps_per_epoch": 50, "max_trials": None}
BUDGETS = {"fashion_mnist": SMALL_BUDGET, "mnist": SMALL_BUDGET}
DEFAULT_MAX_TRIALS = 10  # bayesian and random, when the budget does not say

# Settings that may change when a search is resumed without changing its results.
_RESUMABLE = ("max_trials", "strategy", "verbose", "pretrained", "pretrain_epochs", "data_dir",
              "output_dir")


# keras-tuner's BayesianOptimization imports these (its "bayesian" extra): module -> package.
BAYESIAN_NEEDS = {"scipy": "scipy", "sklearn": "scikit-learn"}


def _missing_packages(needs: dict) -> list[str]:
    return [package for module, package in needs.items() if importlib.util.find_spec(module) is None]


class SetupError(ValueError):
    """A bad setting or checkpoint, found before any trial started."""


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_range(name: str, bounds, *, positive: bool = False) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} range {bounds!r} must be two numbers, LOW HIGH.") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} range {_fmt(low)} {_fmt(high)} must be finite.")
    if low >= high:
        raise ValueError(
            f"{name} range {_fmt(low)} {_fmt(high)} is "
            + ("empty" if low == high else "inverted")
            + ": the low end must be below the high end."
        )
    if positive and low <= 0:
        raise ValueError(
            f"{name} range {_fmt(low)} {_fmt(high)} is sampled log-uniformly: its low end "
            "must be > 0."
        )
    return low, high


@dataclasses.dataclass
class SearchSpace:
    """What `LNSHyperModel.build` searches; `None` means "not searched"."""

    alpha: tuple[float, float] = DEFAULT_ALPHA_RANGE
    rho: tuple[float, float] = DEFAULT_RHO_RANGE
    asymmetric_rho: bool = False
    mappers: tuple[str, ...] | None = None  # () means all of `MAPPERS`
    # "protocol": a decade either side of the protocol's finetune_lr (`TuneConfig.resolved`)
    finetune_lr: tuple[float, float] | str | None = None

    def validate(self) -> None:
        """Raise `ValueError` naming the bad range or choice."""
        self.alpha = _check_range("alpha", self.alpha, positive=True)
        self.rho = low, high = _check_range("rho", self.rho)
        if low < 0:
            raise ValueError(
                f"rho range {_fmt(low)} {_fmt(high)} reaches below 0: rho is a flip "
                "probability, in [0, 0.5)."
            )
        if 2 * high >= 1:
            sides = "rho_pos and rho_neg each reach" if self.asymmetric_rho else "rho_pos = rho_neg ="
            raise ValueError(
                f"rho range {_fmt(low)} {_fmt(high)} reaches {_fmt(high)} >= 0.5: with "
                f"{sides} {_fmt(high)}, rho_pos + rho_neg = {_fmt(2 * high)} >= 1 and the "
                "unbiased estimator is undefined. Keep the high end below 0.5."
            )
        if self.mappers is not None:
            self.mappers = tuple(dict.fromkeys(self.mappers)) or tuple(MAPPERS)
            unknown = [m for m in self.mappers if m not in MAPPERS]
            if unknown:
                raise ValueError(f"Unknown mapper {unknown[0]!r}; choose from {list(MAPPERS)}.")
        if self.finetune_lr is not None:
            self.finetune_lr = _check_range("finetune_lr", self.finetune_lr, positive=True)

    @property
    def rho_names(self) -> tuple[str, ...]:
        return ("rho_pos", "rho_neg") if self.asymmetric_rho else ("rho",)

    def hparams(self, values: dict) -> dict:
        """A trial's values as `TrainConfig` fields (what `train.py --hparams` reads)."""
        out = {"alpha": float(values["alpha"])}
        if self.asymmetric_rho:
            out["rho_pos"], out["rho_neg"] = float(values["rho_pos"]), float(values["rho_neg"])
        else:
            out["rho_pos"] = out["rho_neg"] = float(values["rho"])
        if self.mappers is not None:
            out["mapper"] = values["mapper"]
        if self.finetune_lr is not None:
            out["finetune_lr"] = float(values["finetune_lr"])
        return out

    def corners(self):
        """Every extreme combination, to check the quantizer accepts the whole space."""
        for alpha in self.alpha:
            for rho_pos in self.rho:
                for rho_neg in self.rho if self.asymmetric_rho else (rho_pos,):
                    for mapper in self.mappers or (None,):
                        corner = {"alpha": alpha, "rho_pos": rho_pos, "rho_neg": rho_neg}
                        if mapper is not None:
                            corner["mapper"] = mapper
                        yield corner

    def describe(self) -> str:
        parts = [f"alpha log-uniform in [{_fmt(self.alpha[0])}, {_fmt(self.alpha[1])}]"]
        rho = f"[{_fmt(self.rho[0])}, {_fmt(self.rho[1])}]"
        if self.asymmetric_rho:
            parts.append(f"rho_pos and rho_neg each uniform in {rho}")
        else:
            parts.append(f"rho uniform in {rho} (rho_pos = rho_neg = rho)")
        if self.mappers is not None:
            parts.append(f"mapper in {list(self.mappers)}")
        if self.finetune_lr is not None:
            lo, hi = self.finetune_lr
            parts.append(f"finetune_lr log-uniform in [{_fmt(lo)}, {_fmt(hi)}]")
        return "; ".join(parts)


@dataclasses.dataclass
class TuneConfig:
    """Every setting of a search. `None` means the dataset's default (`BUDGETS`,
    `protocols.PROTOCOLS`); `output_dir=None` means `tune_runs/<dataset>`."""

    dataset: str = "fashion_mnist"
    model: str | None = None
    pretrained: str | None = None  # a train.py output dir or a weights file
    output_dir: str | None = None
    tuner: str = "hyperband"
    max_trials: int | None = None  # hyperband: a cap (default: one full iteration)
    epochs: int | None = None  # per trial (hyperband: the most a trial trains)
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    limit: int | None = None
    seed: int = 0
    strategy: str = "auto"
    data_dir: str | None = None
    space: SearchSpace = dataclasses.field(default_factory=SearchSpace)
    mapper: str | None = None  # the fixed mapper when the mapper is not searched
    pretrain_epochs: int | None = None  # for the one-time pretraining
    verbose: int = 1

    def resolved(self) -> TuneConfig:
        """A copy with the defaults filled in; `ValueError` for any bad value."""
        c = dataclasses.replace(self, space=dataclasses.replace(self.space))
        datasets.get_spec(c.dataset)
        protocol = get_protocol(c.dataset)
        budget = BUDGETS.get(c.dataset, {"epochs": protocol.finetune_epochs})
        if c.tuner not in TUNERS:
            raise ValueError(f"Unknown tuner {c.tuner!r}; choose one of {list(TUNERS)}.")
        missing = _missing_packages(BAYESIAN_NEEDS) if c.tuner == "bayesian" else []
        if missing:
            raise ValueError(
                f"tuner 'bayesian' needs {' and '.join(missing)} (keras-tuner's Gaussian "
                f"process), not installed here: `pip install {' '.join(missing)}`, or choose "
                f"one of {[t for t in TUNERS if t != 'bayesian']}."
            )
        c.epochs = c.epochs if c.epochs is not None else budget["epochs"]
        if c.steps_per_epoch is None:
            c.steps_per_epoch = budget.get("steps_per_epoch")
        if c.max_trials is None and c.tuner != "hyperband":
            c.max_trials = budget.get("max_trials") or DEFAULT_MAX_TRIALS
        c.output_dir = c.output_dir or os.path.join("tune_runs", c.dataset)
        for name in ("max_trials", "epochs", "steps_per_epoch"):
            value = getattr(c, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1.")
        if c.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {c.strategy!r}; choose one of {list(STRATEGIES)}.")
        if c.space.finetune_lr == "protocol":  # a decade either side of the protocol's
            lr = protocol.finetune_lr
            c.space.finetune_lr = (lr / 10, lr * 10)
        c.space.validate()
        if c.mapper is not None and c.space.mappers is not None:
            raise ValueError(
                f"mapper={c.mapper!r} fixes the mapper, which the search also searches: "
                "give one or the other."
            )
        base = c.train_config()  # checks dataset, model, batch size, limit, mapper, ...
        options = base.quantizer_options("lns")
        for corner in c.space.corners():
            check_options(**{**options, **corner})
        return c

    def train_config(self, weights: str | None = None, **overrides) -> training.TrainConfig:
        """The resolved `TrainConfig` every trial starts from (`arms=("lns",)`)."""
        settings = dict(
            dataset=self.dataset, model=self.model, arms=("lns",), batch_size=self.batch_size,
            limit=self.limit, seed=self.seed, strategy=self.strategy, data_dir=self.data_dir,
            mapper=self.mapper, pretrained=weights or self.pretrained,
            finetune_epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
            output_dir=self.output_dir or "", verbose=0,
        )
        if not settings["pretrained"] and self.pretrain_epochs is not None:
            settings["pretrain_epochs"] = self.pretrain_epochs
        settings.update(overrides)
        return training.TrainConfig(**settings).resolved()

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["space"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["space"].items()}
        return data


# --------------------------------------------------------------------------- the model


class LNSHyperModel(kt.HyperModel):
    """The LNS arm fine-tuned from `weights`, with the whole search space in `build`."""

    def __init__(self, config: training.TrainConfig, weights: str, space: SearchSpace,
                 epochs: int):
        super().__init__(name="lns")
        self.config, self.weights, self.space, self.epochs = config, weights, space, epochs

    def build(self, hp):
        s = self.space
        alpha = min(max(PAPER["alpha"], s.alpha[0]), s.alpha[1])
        rho = min(max(PAPER["rho"], s.rho[0]), s.rho[1])
        values = {"alpha": hp.Float("alpha", *s.alpha, sampling="log", default=alpha)}
        if s.asymmetric_rho:
            values["rho_pos"] = hp.Float("rho_pos", *s.rho, default=rho)
            values["rho_neg"] = hp.Float("rho_neg", *s.rho, default=rho)
        else:
            values["rho_pos"] = values["rho_neg"] = hp.Float("rho", *s.rho, default=rho)
        if s.mappers is not None:
            values["mapper"] = hp.Choice("mapper", list(s.mappers))
        if s.finetune_lr is not None:
            lo, hi = s.finetune_lr
            lr = min(max(self.config.finetune_lr, lo), hi)
            values["finetune_lr"] = hp.Float("finetune_lr", lo, hi, sampling="log", default=lr)
        config = dataclasses.replace(self.config, **values)
        return training.build_arm(config, "lns", self.weights)

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        # Every trial reads the batches train.py's arms read, from its first epoch on
        # (Hyperband continues some trials at `initial_epoch`).
        steps = self.config.steps_per_epoch_run
        first = kwargs.get("initial_epoch", 0)
        kwargs["steps_per_epoch"] = steps
        args = (self.config.train_stream("finetune", kwargs["epochs"], first * steps), *args)
        lr = hp.values.get("finetune_lr", self.config.finetune_lr)
        milestones = get_protocol(self.config.dataset).finetune_milestones
        schedule = tf.keras.callbacks.LearningRateScheduler(
            lambda epoch: lr_at_epoch(epoch, lr, self.epochs, milestones)
        )
        # A diverging trial stops and is scored by its (poor) validation accuracy.
        callbacks = [*(callbacks or []), schedule, tf.keras.callbacks.TerminateOnNaN()]
        return model.fit(*args, callbacks=callbacks, **kwargs)


# --------------------------------------------------------------------------- checkpoint


def _role() -> str:
    """"standalone", "chief" or "worker" (keras-tuner's distributed tuning)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "standalone"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


def _run_settings(weights: str) -> dict:
    """The train.py settings (config.json) of the run that wrote `weights`, if known."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(weights)))
    path = os.path.join(run_dir, "config.json")
    if os.path.basename(os.path.dirname(os.path.abspath(weights))) != "pretrain":
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def _mismatch(config: TuneConfig, weights: str) -> str | None:
    """Why the checkpoint's run does not fit this search (by its config.json), or None."""
    saved = _run_settings(weights)
    if not saved:
        return None
    wanted = config.train_config(weights)
    for key in ("dataset", "model", "kernel_quantizer", "image_size"):
        if key in saved and saved[key] != getattr(wanted, key):
            return f"it was trained with {key}={saved[key]!r}, this search uses {getattr(wanted, key)!r}"
    return None


def _pretrain_dir(config: TuneConfig) -> str:
    return os.path.join(config.output_dir, "pretrain_run")


def locate_checkpoint(config: TuneConfig) -> tuple[str | None, str]:
    """The pretrained weights to fine-tune from, and what was decided, in words.

    In order: `config.pretrained`; the checkpoint a resumed search used; train.py's
    default output `runs/<dataset>`; this search's own `pretrain_run`. `None` when
    there is none: `search` then pretrains into `<output_dir>/pretrain_run`.
    """
    config = config.resolved()
    if config.pretrained:
        weights = pretrained_weights_path(config.pretrained)
        reason = _mismatch(config, weights)
        if reason:
            raise ValueError(f"--pretrained {config.pretrained!r} does not fit: {reason}.")
        return weights, f"fine-tuning from --pretrained {weights}"
    saved = os.path.join(config.output_dir, "tune_config.json")
    if os.path.exists(saved):
        previous = read_json(saved, "delete it to start the search anew").get("weights")
        if previous and os.path.isfile(previous):
            return previous, f"resuming the search: fine-tuning from {previous}, as before"
    notes = []
    for run_dir, what in ((os.path.join("runs", config.dataset), "train.py's default output"),
                          (_pretrain_dir(config), "this search's own pretraining")):
        weights = RunDir(run_dir).pretrained_weights
        if not os.path.isfile(weights):
            notes.append(f"no {weights}")
            continue
        reason = _mismatch(config, weights)
        if reason:
            notes.append(f"{weights} not reused: {reason}")
            continue
        return weights, f"reusing {weights} ({what})"
    return None, (
        f"{'; '.join(notes)}: pretraining once into {_pretrain_dir(config)} "
        "(later runs reuse it)"
    )


def pretrain(config: TuneConfig) -> str:
    """Pretrain the sign baseline once into `<output_dir>/pretrain_run`."""
    run_dir = _pretrain_dir(config)
    c = config.train_config()
    train_config = training.TrainConfig(
        dataset=c.dataset, model=c.model, arms=(), pretrain_epochs=c.pretrain_epochs,
        batch_size=c.batch_size, limit=c.limit, seed=c.seed, strategy=c.strategy,
        data_dir=c.data_dir, output_dir=run_dir, verbose=2 if config.verbose else 0,
    )  # verbose 2: one line per epoch, no progress bar
    training.run(train_config)
    return RunDir(run_dir).pretrained_weights


def check_checkpoint(config: training.TrainConfig, weights: str) -> None:
    """Raise `training.CheckpointError` unless `weights` loads into the search's model."""
    training.build_baseline(config, weights)
    tf.keras.backend.clear_session()


# --------------------------------------------------------------------------- search


def _tuner_class(name: str):
    base = {"hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization,
            "random": kt.RandomSearch}[name]

    class Tuner(base):
        """Remembers the trials this process ran (a worker's share of the search)."""

        ran: list

        def on_trial_end(self, trial):
            self.ran.append(trial.trial_id)
            super().on_trial_end(trial)

    Tuner.__name__ = base.__name__
    return Tuner


def make_tuner(config: TuneConfig, hypermodel: LNSHyperModel, strategy):
    """The keras-tuner tuner of `config.tuner`; resumes a search in `output_dir`."""
    common = dict(
        hypermodel=hypermodel, objective=kt.Objective(OBJECTIVE, "max"), seed=config.seed,
        directory=config.output_dir, project_name=PROJECT, overwrite=False,
        distribution_strategy=strategy,
    )
    cls = _tuner_class(config.tuner)
    if config.tuner == "hyperband":
        tuner = cls(max_epochs=config.epochs, factor=3, **common)
        tuner.oracle.max_trials = config.max_trials  # a cap; None: one full iteration
    else:
        tuner = cls(max_trials=config.max_trials, **common)
    tuner.ran = []
    return tuner


def _check_resume(config: TuneConfig, weights: str) -> None:
    path = os.path.join(config.output_dir, "tune_config.json")
    current = {**config.to_json(), "weights": os.path.abspath(weights)}
    RunDir(config.output_dir).check_settings(
        current, _RESUMABLE, "a search", config=path, record=_role() != "worker"
    )


def _logger(config: TuneConfig, log):
    if log is not None:
        return log
    return print if config.verbose else (lambda *args, **kwargs: None)


def prepare_checkpoint(config: TuneConfig, log=None) -> str:
    """The checkpoint to fine-tune from: found (`locate_checkpoint`) or pretrained now.

    Raises `SetupError` for a bad setting or checkpoint path, and when a distributed
    search has no checkpoint (its processes must not all pretrain).
    """
    log = _logger(config, log)
    try:
        config = config.resolved()
        ensure_writable_dir(config.output_dir)
        weights, decision = locate_checkpoint(config)
        if weights is None and (_role() != "standalone" or config.strategy == "multi_worker"):
            raise ValueError(
                "no pretrained checkpoint to fine-tune from, and a distributed search does not "
                f"pretrain ({decision}). Pretrain first with `python tune.py --pretrain-only` "
                "(same flags, no KERASTUNER_* variables) or train.py, then pass --pretrained "
                "to every process."
            )
        log(f"tune: {decision}", flush=True)
        if weights is None:
            # Refuse changed settings now, not after the pretraining.
            _check_resume(config, RunDir(_pretrain_dir(config)).pretrained_weights)
            weights = pretrain(config)
        return weights
    except (ValueError, FileNotFoundError) as error:
        raise SetupError(str(error)) from error


def search(config: TuneConfig, log=None) -> dict:
    """Run (or resume) the search of `config`; returns a summary of it.

    Everything that can be wrong with the settings, the data or the checkpoint raises
    `SetupError` before any trial starts. On a keras-tuner worker the summary holds
    only the trials this process ran; the chief (or a standalone search) also writes
    best_hparams.json, trials.md and trials.png.
    """
    role = _role()
    log = _logger(config, log)
    try:
        config = config.resolved()
        weights = prepare_checkpoint(config, log)
        _check_resume(config, weights)
        strategy = make_strategy(config.strategy)
        base = config.train_config(weights)
        check_checkpoint(base, weights)
        validation = base.load_split("validation")  # missing data fails here
    except (ValueError, FileNotFoundError) as error:
        raise SetupError(str(error)) from error

    hypermodel = LNSHyperModel(base, weights, config.space, config.epochs)
    tuner = make_tuner(config, hypermodel, strategy)
    budget = (f"at most {config.max_trials} trials" if config.max_trials
              else "one Hyperband iteration")
    steps = f"{config.steps_per_epoch} steps" if config.steps_per_epoch else "full epochs"
    log(f"tune: {config.tuner} search ({role}), {budget}, up to {config.epochs} epochs of "
        f"{steps} per trial, batch {base.batch_size}; {config.space.describe()}", flush=True)
    start = time.time()
    tuner.search(  # the training data: LNSHyperModel.fit
        validation_data=validation, epochs=config.epochs, verbose=2 if config.verbose else 0,
    )
    summary = {"role": role, "ran": list(tuner.ran), "weights": weights,
               "output_dir": config.output_dir, "wall_seconds": time.time() - start}
    if role == "worker":
        log(f"tune: worker {os.environ.get('KERASTUNER_TUNER_ID')} ran trials "
            f"{summary['ran']}", flush=True)
        return summary
    summary.update(publish(config, tuner.oracle, weights))
    best = summary.get("best")
    if not best:
        log(f"tune: no trial completed ({summary['failed']} failed): nothing to report",
            flush=True)
    else:
        log(f"tune: best val accuracy {best['val_accuracy']:.4f} (trial {best['trial']}) with "
            f"{json.dumps(summary['best_hparams'])}; wrote {summary['files']}", flush=True)
    return summary


# --------------------------------------------------------------------------- reports


_HPARAM_KEYS = ("alpha", "rho_pos", "rho_neg", "mapper", "finetune_lr")


def trial_rows(oracle, space: SearchSpace) -> list[dict]:
    """The completed trials, best first: their values, epochs and validation accuracy."""
    rows = []
    for trial in oracle.trials.values():
        if trial.status != "COMPLETED" or trial.score is None or math.isnan(trial.score):
            continue
        values = trial.hyperparameters.values
        rows.append({
            "trial": trial.trial_id,
            **space.hparams(values),
            "epochs": values.get("tuner/epochs"),
            "val_accuracy": float(trial.score),
        })
    rows.sort(key=lambda r: r["val_accuracy"], reverse=True)
    return rows


def publish(config: TuneConfig, oracle, weights: str, top: int = 10) -> dict:
    """Write best_hparams.json, trials.md and trials.png from the oracle's trials."""
    rows = trial_rows(oracle, config.space)
    out = config.output_dir
    failed = sum(t.status in ("FAILED", "INVALID") for t in oracle.trials.values())
    if not rows:
        return {"trials": 0, "failed": failed, "files": []}
    best = rows[0]
    hparams = {k: best[k] for k in _HPARAM_KEYS if k in best}
    files = [os.path.join(out, name) for name in ("best_hparams.json", "trials.md", "trials.png")]
    write_json(files[0], hparams)
    write_trials_md(config, rows, weights, failed, files[1], top)
    plot_trials(config.space, rows, files[2])
    return {"trials": len(rows), "failed": failed, "best": best, "best_hparams": hparams,
            "files": files}


def write_trials_md(config: TuneConfig, rows, weights, failed, path, top=10) -> None:
    space = config.space
    columns = ["alpha", *(("rho_pos", "rho_neg") if space.asymmetric_rho else ("rho_pos",))]
    if space.mappers is not None:
        columns.append("mapper")
    if space.finetune_lr is not None:
        columns.append("finetune_lr")
    titles = {"rho_pos": "rho_pos" if space.asymmetric_rho else "rho"}
    head = ["rank", "trial", *(titles.get(c, c) for c in columns), "epochs", "val acc %"]
    lines = [
        f"# LNS search: {config.train_config(weights).model} on {config.dataset}",
        "",
        f"{config.tuner} tuner; {len(rows)} completed trials"
        + (f", {failed} failed" if failed else "")
        + f". Each fine-tunes the `lns` arm from `{weights}` for up to {config.epochs} epochs"
        + (f" of {config.steps_per_epoch} steps" if config.steps_per_epoch else "")
        + ", scored by its best accuracy on the validation split (held out of train; the "
        "test split is not used).",
        "",
        f"Search space: {space.describe()}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for rank, row in enumerate(rows[:top], 1):
        cells = [str(rank), row["trial"]]
        cells += [row[c] if isinstance(row[c], str) else f"{row[c]:.4g}" for c in columns]
        cells += [str(row["epochs"] or config.epochs), f"{100 * row['val_accuracy']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Feed the best values to train.py: "
              f"`python train.py --hparams {os.path.join(config.output_dir, 'best_hparams.json')}`", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot_trials(space: SearchSpace, rows, path) -> None:
    """Validation accuracy (colour) against alpha (log x) and rho, one panel per rho."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    # Hyperband trains some values in several trials: plot each values' best score.
    best = {}
    for row in rows:
        key = tuple(row[k] for k in _HPARAM_KEYS if k in row)
        if key not in best or row["val_accuracy"] > best[key]["val_accuracy"]:
            best[key] = row
    points = sorted(best.values(), key=lambda r: r["val_accuracy"])  # the best drawn last
    top = rows[0]  # best_hparams.json's trial
    panels = ("rho_pos", "rho_neg") if space.asymmetric_rho else ("rho_pos",)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    accuracy = [100 * r["val_accuracy"] for r in points]
    low, high = min(accuracy), max(accuracy)
    norm = matplotlib.colors.Normalize(low, high if high > low else low + 0.01)
    for ax, name in zip(axes[0], panels):
        scatter = ax.scatter(
            [r["alpha"] for r in points], [r[name] for r in points], c=accuracy,
            cmap="viridis", norm=norm, s=60, edgecolors="black", linewidths=0.5,
        )
        ax.scatter([top["alpha"]], [top[name]], marker="*", s=300, facecolors="none",
                   edgecolors="red", linewidths=1.5, label="best")
        ax.scatter([PAPER["alpha"]], [PAPER["rho"]], marker="x", color="grey",
                   label="paper (CIFAR-10)")
        ax.set_xscale("log")
        ax.set_xlim(space.alpha[0] / 1.5, space.alpha[1] * 1.5)
        margin = 0.05 * (space.rho[1] - space.rho[0])
        ax.set_ylim(space.rho[0] - margin, space.rho[1] + margin)
        ax.set_xlabel("alpha (log scale)")
        ax.set_ylabel(name if space.asymmetric_rho else "rho (= rho_pos = rho_neg)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    fig.colorbar(scatter, ax=list(axes[0]), label="validation accuracy %")
    fig.suptitle(
        f"LNS search: {len(rows)} trials, {len(points)} distinct values\nbest validation "
        f"accuracy {100 * top['val_accuracy']:.2f}% (trial {top['trial']})", fontsize="medium"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
