"""Searching an arm's fine-tuning hyperparameters with keras-tuner, on the validation split.

Every trial fine-tunes one arm (`training.build_arm`: `lns`, `sign` or `bop`) from one
pretrained sign checkpoint and is scored by its best validation accuracy
(`datasets.load(..., "validation")`, held out of the training set; the test split is
never used here). Every arm is searched with the same tuner, trials and epochs (the
same budget), so that the arms are compared equally tuned. The whole search space is
`FineTuningHyperModel.build(hp)`; each name is a `TrainConfig` field:

    every arm    finetune_lr    log-uniform in `SearchSpace.finetune_lr` (default: a
                                decade either side of the protocol's; for `bop`, the
                                rate of every variable Bop does not flip)
    bop          bop_threshold  log-uniform in `SearchSpace.bop_threshold` (1e-8 .. 1e-3)
                 bop_gamma      log-uniform in `SearchSpace.bop_gamma`     (1e-5 .. 1e-1)
    lns          alpha          log-uniform in `SearchSpace.alpha`         (1e-3 .. 10)
                 rho            uniform in `SearchSpace.rho`, rho_pos = rho_neg = rho
                                (0 .. 0.2); with `asymmetric_rho`, each separately
                 clip           a choice among `SearchSpace.clips` (hardtanh, none)
                 aux_to_latent  True or False (`SearchSpace.search_aux_to_latent`)
                 mapper         a choice among `SearchSpace.mappers` (only when given)

larq's Bop defaults (threshold 1e-8, gamma 1e-4) are made for training from scratch: from
a pretrained model they flip about half of the binary weights within a few steps, so the
threshold's range reaches far above them.

`search(config)` runs the whole thing and writes into `config.output_dir` (default
`tune_runs/<dataset>/<arm>`, so the arms' searches do not collide):

    best_hparams.json   the best trial's values, as `TrainConfig` fields
                        (what `train.py --hparams` reads)
    trials.md           the top trials
    trials.png          validation accuracy against the searched values
    search/             keras-tuner's project (oracle, trials): re-running resumes it
    tune_config.json    the settings, checked when a search is resumed

The one-time pretraining, when no checkpoint is found, goes to `config.pretrain_dir`
(default `tune_runs/<dataset>/pretrain_run`, shared by the arms' default searches: all
arms are tuned from the same checkpoint).

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

from harness import datasets, training
from harness.rundir import (
    RunDir, ensure_writable_dir, pretrained_run, pretrained_weights_path, read_json, write_json,
)
from harness.distribute import STRATEGIES, make_strategy
from larq_noisy.mappers import MAPPERS
from harness.protocols import ARMS, TUNED_ARMS, get_protocol
from larq_noisy.quantizers import CLIPS, PAPER, check_options

__all__ = [
    "DEFAULT_ALPHA_RANGE",
    "DEFAULT_BOP_GAMMA_RANGE",
    "DEFAULT_BOP_THRESHOLD_RANGE",
    "DEFAULT_RHO_RANGE",
    "TUNED_ARMS",
    "TUNERS",
    "FineTuningHyperModel",
    "SearchFailed",
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
# Bop flips a weight when the exponential average (rate gamma) of its gradient passes
# the threshold. From a pretrained bnn_small, larq's defaults (1e-8, 1e-4) flipped ~48%
# of the binary weights in 12 steps; fine-tuning wants a small fraction, hence
# thresholds up to 1e-3, and gammas from 1e-5 (slow, averaging over ~1e5 steps) to 1e-1.
DEFAULT_BOP_THRESHOLD_RANGE = (1e-8, 1e-3)
DEFAULT_BOP_GAMMA_RANGE = (1e-5, 1e-1)
BOP_DEFAULTS = {"bop_threshold": 1e-8, "bop_gamma": 1e-4}  # larq's, for reference

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
              "output_dir", "pretrain_dir")


# keras-tuner's BayesianOptimization imports these (its "bayesian" extra): module -> package.
BAYESIAN_NEEDS = {"scipy": "scipy", "sklearn": "scikit-learn"}


def _missing_packages(needs: dict) -> list[str]:
    return [package for module, package in needs.items() if importlib.util.find_spec(module) is None]


class SetupError(ValueError):
    """A bad setting or checkpoint, found before any trial started."""


class SearchFailed(RuntimeError):
    """keras-tuner stopped the search: too many trials in a row failed."""


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


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return min(max(value, bounds[0]), bounds[1])


#: What each arm searches beyond its learning rate (`SearchSpace` fields).
ARM_SPACES = {
    "sign": (),
    "bop": ("bop_threshold", "bop_gamma"),
    "lns": ("alpha", "rho", "asymmetric_rho", "mappers", "clips", "search_aux_to_latent"),
}
# Each field's value when its arm does not search it.
_UNSEARCHED = {"alpha": None, "rho": None, "asymmetric_rho": False, "mappers": None,
               "clips": None, "search_aux_to_latent": False, "bop_threshold": None,
               "bop_gamma": None}


@dataclasses.dataclass
class SearchSpace:
    """What `FineTuningHyperModel.build` searches for `arm`; `None` means "not searched".

    `validate` sets the fields `arm` does not search (`ARM_SPACES`) to "not searched".
    """

    arm: str = "lns"
    # "protocol": a decade either side of the protocol's finetune_lr (`TuneConfig.resolved`)
    finetune_lr: tuple[float, float] | str | None = "protocol"
    bop_threshold: tuple[float, float] | None = DEFAULT_BOP_THRESHOLD_RANGE
    bop_gamma: tuple[float, float] | None = DEFAULT_BOP_GAMMA_RANGE
    alpha: tuple[float, float] | None = DEFAULT_ALPHA_RANGE
    rho: tuple[float, float] | None = DEFAULT_RHO_RANGE
    asymmetric_rho: bool = False
    mappers: tuple[str, ...] | None = None  # () means all of `MAPPERS`
    clips: tuple[str, ...] | None = CLIPS  # None: fixed (`TuneConfig.clip`)
    search_aux_to_latent: bool = True  # False: fixed (`TuneConfig.aux_to_latent`)

    def validate(self) -> None:
        """Raise `ValueError` naming the bad arm, range or choice."""
        if self.arm not in TUNED_ARMS:
            raise ValueError(f"Unknown arm {self.arm!r} to tune; choose one of {list(TUNED_ARMS)}.")
        for name, unsearched in _UNSEARCHED.items():
            if name not in ARM_SPACES[self.arm]:
                setattr(self, name, unsearched)
        if self.finetune_lr is not None:
            self.finetune_lr = _check_range("finetune_lr", self.finetune_lr, positive=True)
        for name in ("bop_threshold", "bop_gamma"):
            if getattr(self, name) is not None:
                setattr(self, name, _check_range(name, getattr(self, name), positive=True))
        if self.arm != "lns":
            return
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
        if self.clips is not None:
            self.clips = tuple(dict.fromkeys(self.clips)) or CLIPS
            unknown = [c for c in self.clips if c not in CLIPS]
            if unknown:
                raise ValueError(f"Unknown clip {unknown[0]!r}; choose from {list(CLIPS)}.")

    @staticmethod
    def hparams(values: dict) -> dict:
        """A trial's values (or anything by hyperparameter name) as `TrainConfig` fields
        (what `train.py --hparams` reads): `rho` sets both `rho_pos` and `rho_neg`."""
        out = {}
        for name, value in values.items():
            if name.startswith("tuner/"):  # Hyperband's bookkeeping
                continue
            value = float(value) if isinstance(value, (float, int)) and not isinstance(value, bool) else value
            if name == "rho":
                out["rho_pos"] = out["rho_neg"] = value
            else:
                out[name] = value
        return out

    def corners(self):
        """Every extreme combination of the quantizer's options (lns; none otherwise),
        to check the quantizer accepts the whole space."""
        if self.arm != "lns":
            return
        for alpha in self.alpha:
            for rho_pos in self.rho:
                for rho_neg in self.rho if self.asymmetric_rho else (rho_pos,):
                    for mapper in self.mappers or (None,):
                        for clip in self.clips or (None,):
                            corner = {"alpha": alpha, "rho_pos": rho_pos, "rho_neg": rho_neg}
                            corner.update({k: v for k, v in (("mapper", mapper), ("clip", clip))
                                           if v is not None})
                            yield corner


@dataclasses.dataclass
class TuneConfig:
    """Every setting of a search. `None` means the dataset's default (`BUDGETS`,
    `protocols.PROTOCOLS`); `output_dir=None` means `tune_runs/<dataset>/<arm>`."""

    dataset: str = "fashion_mnist"
    model: str | None = None
    pretrained: str | None = None  # a train.py output dir or a weights file
    output_dir: str | None = None
    # Where the one-time pretraining goes; None: tune_runs/<dataset>/pretrain_run with
    # the default output_dir (shared by the arms), else <output_dir>/pretrain_run.
    pretrain_dir: str | None = None
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
    # The lns options fixed when not searched (None: the dataset protocol's, else the
    # quantizer's default).
    mapper: str | None = None
    clip: str | None = None
    aux_to_latent: bool | None = None
    pretrain_epochs: int | None = None  # for the one-time pretraining
    finetune_cosine: bool | None = None  # the trials' schedule (None: the protocol's)
    verbose: int = 1
    # Set by `resolved` only; any change (`dataclasses.replace`) clears it.
    _resolved: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @property
    def arm(self) -> str:
        return self.space.arm

    @property
    def saved_settings(self) -> str:
        """tune_config.json: the settings of the search in `output_dir`."""
        return os.path.join(self.output_dir, "tune_config.json")

    def resolved(self) -> TuneConfig:
        """A copy with the defaults filled in; `ValueError` for any bad value. Resolving a
        resolved config returns it."""
        if self._resolved:
            return self
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
        if c.output_dir is None:
            c.output_dir = os.path.join("tune_runs", c.dataset, c.space.arm)
            c.pretrain_dir = c.pretrain_dir or os.path.join("tune_runs", c.dataset, "pretrain_run")
        c.pretrain_dir = c.pretrain_dir or os.path.join(c.output_dir, "pretrain_run")
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
        for fixed, searched in (("mapper", "mappers"), ("clip", "clips"),
                                ("aux_to_latent", "search_aux_to_latent")):
            if getattr(c, fixed) is not None and c.space.arm != "lns":
                raise ValueError(f"{fixed}={getattr(c, fixed)!r} is an option of the lns arm, "
                                 f"not of {c.space.arm!r}: leave it out.")
            if getattr(c, fixed) is not None and getattr(c.space, searched):
                raise ValueError(
                    f"{fixed}={getattr(c, fixed)!r} fixes the {fixed}, which the search also "
                    "searches: give one or the other."
                )
        base = c.train_config()  # checks dataset, model, batch size, limit, mapper, ...
        options = base.quantizer_options(c.space.arm)
        for corner in c.space.corners():
            check_options(**{**options, **corner})
        c._resolved = True
        return c

    def train_config(self, weights: str | None = None, **overrides) -> training.TrainConfig:
        """The resolved `TrainConfig` every trial starts from: `arms=(arm,)`, with the
        arm's settings (`TrainConfig.for_arm`)."""
        settings = dict(
            dataset=self.dataset, model=self.model, arms=(self.space.arm,),
            batch_size=self.batch_size, limit=self.limit, seed=self.seed,
            strategy=self.strategy, data_dir=self.data_dir, mapper=self.mapper, clip=self.clip,
            aux_to_latent=self.aux_to_latent, pretrained=weights or self.pretrained,
            finetune_epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
            finetune_cosine=self.finetune_cosine, output_dir=self.output_dir or "", verbose=0,
        )
        if not settings["pretrained"] and self.pretrain_epochs is not None:
            settings["pretrain_epochs"] = self.pretrain_epochs
        settings.update(overrides)
        return training.TrainConfig(**settings).resolved().for_arm(self.space.arm)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("_resolved")
        data["space"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["space"].items()}
        return data


# --------------------------------------------------------------------------- the model


class FineTuningHyperModel(kt.HyperModel):
    """The arm `space.arm` fine-tuned from `weights`, with the whole search space in
    `build`: every hyperparameter's name is the `TrainConfig` field it sets (`rho`:
    both `rho_pos` and `rho_neg`).

    ```python
    space = SearchSpace(arm="bop")
    space.validate()
    hypermodel = FineTuningHyperModel(train_config, weights, space, epochs=3)
    kt.RandomSearch(hypermodel, objective="val_accuracy", max_trials=10).search(...)
    ```
    """

    def __init__(self, config: training.TrainConfig, weights: str, space: SearchSpace,
                 epochs: int):
        super().__init__(name=space.arm)
        self.config, self.weights, self.space, self.epochs = config, weights, space, epochs

    def build(self, hp):
        s, values = self.space, {}
        if s.alpha is not None:
            values["alpha"] = hp.Float("alpha", *s.alpha, sampling="log",
                                       default=_clamp(PAPER["alpha"], s.alpha))
            rho = _clamp(PAPER["rho_pos"], s.rho)
            if s.asymmetric_rho:
                values["rho_pos"] = hp.Float("rho_pos", *s.rho, default=rho)
                values["rho_neg"] = hp.Float("rho_neg", *s.rho, default=rho)
            else:
                values["rho_pos"] = values["rho_neg"] = hp.Float("rho", *s.rho, default=rho)
        if s.mappers is not None:
            values["mapper"] = hp.Choice("mapper", list(s.mappers))
        if s.clips is not None:
            values["clip"] = hp.Choice("clip", list(s.clips))
        if s.search_aux_to_latent:
            values["aux_to_latent"] = hp.Boolean("aux_to_latent", default=True)
        for name in ("bop_threshold", "bop_gamma"):
            if getattr(s, name) is not None:
                bounds = getattr(s, name)
                values[name] = hp.Float(name, *bounds, sampling="log",
                                        default=_clamp(BOP_DEFAULTS[name], bounds))
        if s.finetune_lr is not None:
            values["finetune_lr"] = hp.Float("finetune_lr", *s.finetune_lr, sampling="log",
                                             default=_clamp(self.config.finetune_lr, s.finetune_lr))
        config = dataclasses.replace(self.config, **values)
        return training.build_arm(config, s.arm, self.weights)

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        # Every trial reads the batches train.py's arms read, from its first epoch on
        # (Hyperband continues some trials at `initial_epoch`).
        steps = self.config.steps_per_epoch_run
        first = kwargs.get("initial_epoch", 0)
        kwargs["steps_per_epoch"] = steps
        args = (self.config.train_stream("finetune", kwargs["epochs"], first * steps), *args)
        # train.py's schedule, over the trial's epochs, with the trial's settings.
        config = dataclasses.replace(self.config, **self.space.hparams(hp.values)).for_arm(
            self.space.arm)
        schedule = training.lr_schedule(config, "finetune", config.finetune_lr, self.epochs)
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
    """The train.py settings (config.json) of the run whose pretrained weights are
    `weights`; `{}` when unknown (another file, or no readable config.json): then only
    `check_checkpoint` checks them."""
    run = pretrained_run(weights)
    return run.saved_settings() if run else {}


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


def locate_checkpoint(config: TuneConfig) -> tuple[str | None, str]:
    """The pretrained weights to fine-tune from, and what was decided, in words.

    In order: `config.pretrained`; the checkpoint a resumed search used; train.py's
    default output `runs/<dataset>`; `config.pretrain_dir`; the checkpoint the protocol
    ships (unless `pretrain_epochs` is given). `None` when there is none: `search` then
    pretrains into `config.pretrain_dir`.
    """
    config = config.resolved()
    if config.pretrained:
        weights = pretrained_weights_path(config.pretrained)
        reason = _mismatch(config, weights)
        if reason:
            raise ValueError(f"--pretrained {config.pretrained!r} does not fit: {reason}.")
        return weights, f"fine-tuning from --pretrained {weights}"
    saved = config.saved_settings
    if os.path.exists(saved):
        previous = read_json(saved, "delete it to start the search anew").get("weights")
        if previous and os.path.isfile(previous):
            return previous, f"resuming the search: fine-tuning from {previous}, as before"
    notes = []
    for run_dir, what in ((os.path.join("runs", config.dataset), "train.py's default output"),
                          (config.pretrain_dir, "tune.py's one-time pretraining")):
        weights = RunDir(run_dir).pretrained_weights
        if not os.path.isfile(weights):
            notes.append(f"no {weights}")
            continue
        reason = _mismatch(config, weights)
        if reason:
            notes.append(f"{weights} not reused: {reason}")
            continue
        return weights, f"reusing {weights} ({what})"
    shipped = config.train_config().pretrained  # the protocol's, as train.py's default
    if shipped:
        return shipped, f"fine-tuning from the protocol's shipped checkpoint {shipped}"
    return None, (
        f"{'; '.join(notes)}: pretraining once into {config.pretrain_dir} "
        "(later runs reuse it)"
    )


def pretrain(config: TuneConfig) -> str:
    """Pretrain the sign baseline once into `config.pretrain_dir`."""
    run_dir = config.pretrain_dir
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


class _Recording:
    """Remembers the trials this process ran (a worker's share of the search): keras-tuner
    records no tuner id per trial, and `on_trial_end` is its hook for this."""

    ran: list  # set by `make_tuner`

    def on_trial_end(self, trial):
        self.ran.append(trial.trial_id)
        super().on_trial_end(trial)


class Hyperband(_Recording, kt.Hyperband):
    pass


class BayesianOptimization(_Recording, kt.BayesianOptimization):
    pass


class RandomSearch(_Recording, kt.RandomSearch):
    pass


TUNER_CLASSES = {"hyperband": Hyperband, "bayesian": BayesianOptimization, "random": RandomSearch}


def make_tuner(config: TuneConfig, hypermodel: FineTuningHyperModel, strategy):
    """The keras-tuner tuner of `config.tuner`; resumes a search in `output_dir`."""
    common = dict(
        hypermodel=hypermodel, objective=kt.Objective(OBJECTIVE, "max"), seed=config.seed,
        directory=config.output_dir, project_name=PROJECT, overwrite=False,
        distribution_strategy=strategy,
    )
    cls = TUNER_CLASSES[config.tuner]
    if config.tuner == "hyperband":
        tuner = cls(max_epochs=config.epochs, factor=3, **common)
        tuner.oracle.max_trials = config.max_trials  # a cap; None: one full iteration
    else:
        tuner = cls(max_trials=config.max_trials, **common)
    tuner.ran = []
    return tuner


def _check_resume(config: TuneConfig, weights: str) -> None:
    current = {**config.to_json(), "weights": os.path.abspath(weights)}
    RunDir(config.output_dir).check_settings(
        current, _RESUMABLE, "a search", config=config.saved_settings, record=_role() != "worker"
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
            _check_resume(config, RunDir(config.pretrain_dir).pretrained_weights)
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

    hypermodel = FineTuningHyperModel(base, weights, config.space, config.epochs)
    tuner = make_tuner(config, hypermodel, strategy)
    budget = (f"at most {config.max_trials} trials" if config.max_trials
              else "one Hyperband iteration")
    steps = f"{config.steps_per_epoch} steps" if config.steps_per_epoch else "full epochs"
    log(f"tune: {config.tuner} search ({role}), {budget}, up to {config.epochs} epochs of "
        f"{steps} per trial, batch {base.batch_size}; {describe_space(tuner.oracle.get_space())}",
        flush=True)
    start = time.time()
    # train.py's environment (op determinism on): a trial is the train.py run of its values.
    try:
        with training.run_environment(base):
            tuner.search(  # the training data: FineTuningHyperModel.fit
                validation_data=validation, epochs=config.epochs, verbose=2 if config.verbose else 0,
            )
    except RuntimeError as error:  # keras-tuner's limit of failed trials in a row, or a bug
        first, *traceback = str(error).strip().splitlines() or [""]  # the last trial's
        if "consecutive failures" not in first:
            raise
        trials = os.path.join(config.output_dir, PROJECT, "trial_*", "trial.json")
        raise SearchFailed(
            f"{first} The last failed with: {traceback[-1].strip() if traceback else '?'}. "
            f"Each trial's traceback: {trials}."
        ) from error
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


# Reference values drawn on the plot: the paper's CIFAR-10 setting, larq's Bop defaults.
_REFERENCES = {"alpha": (PAPER["alpha"], "paper"), "rho_pos": (PAPER["rho_pos"], "paper"),
               "rho_neg": (PAPER["rho_neg"], "paper"),
               "bop_threshold": (BOP_DEFAULTS["bop_threshold"], "larq's default"),
               "bop_gamma": (BOP_DEFAULTS["bop_gamma"], "larq's default")}
_SAMPLING = {"linear": "uniform", "log": "log-uniform", "reverse_log": "reverse-log-uniform"}


def describe_space(space: kt.HyperParameters) -> str:
    """keras-tuner's search space (`oracle.get_space()`, what `search_space_summary`
    prints) in one line, from each hyperparameter's `get_config()`."""
    parts = []
    for config in (hp.get_config() for hp in space.space):
        if "min_value" in config:  # Float, Int
            parts.append(f"{config['name']} {_SAMPLING.get(config['sampling'], config['sampling'])}"
                         f" in [{_fmt(config['min_value'])}, {_fmt(config['max_value'])}]")
        else:  # Choice, Boolean
            parts.append(f"{config['name']} in {config.get('values', [True, False])}")
    return "; ".join(parts) or "nothing (every value fixed)"


def _ranges(space: kt.HyperParameters) -> dict:
    """Each searched number's `(low, high, log-sampled)`, by `TrainConfig` field."""
    configs = [hp.get_config() for hp in space.space]
    return SearchSpace.hparams({c["name"]: (c["min_value"], c["max_value"], c["sampling"] == "log")
                                for c in configs if "min_value" in c})


def trial_rows(oracle) -> list[dict]:
    """The completed trials, best first (keras-tuner's `get_best_trials`): their id,
    values as `TrainConfig` fields (`hparams`, in the order of the search space), epochs
    and validation accuracy."""
    names = [hp.name for hp in oracle.get_space().space]
    rows = []
    for trial in oracle.get_best_trials(len(oracle.trials)):
        if trial.status != "COMPLETED" or trial.score is None or math.isnan(trial.score):
            continue
        values = trial.hyperparameters.values
        rows.append({"trial": trial.trial_id, "epochs": values.get("tuner/epochs"),
                     "hparams": SearchSpace.hparams({n: values[n] for n in names if n in values}),
                     "val_accuracy": float(trial.score)})
    return rows


def publish(config: TuneConfig, oracle, weights: str, top: int = 10) -> dict:
    """Write best_hparams.json, trials.md and trials.png from the oracle's trials."""
    rows = trial_rows(oracle)
    for row in rows:  # Hyperband says how long each trial trained; the others train all epochs
        row["epochs"] = row["epochs"] or config.epochs
    out = config.output_dir
    failed = sum(t.status in ("FAILED", "INVALID") for t in oracle.trials.values())
    if not rows:
        return {"trials": 0, "failed": failed, "files": []}
    best = rows[0]
    files = [os.path.join(out, name) for name in ("best_hparams.json", "trials.md", "trials.png")]
    write_json(files[0], best["hparams"])
    arm, model = config.arm, config.train_config(weights).model
    space = oracle.get_space()
    title = f"Search of the `{arm}` arm ({ARMS[arm].title}): {model} on {config.dataset}"
    intro = (
        f"{config.tuner} tuner; {len(rows)} completed trials"
        + (f", {failed} failed" if failed else "")
        + f". Each fine-tunes the `{arm}` arm from `{weights}` for up to {config.epochs} epochs"
        + (f" of {config.steps_per_epoch} steps" if config.steps_per_epoch else "")
        + ", scored by its best accuracy on the validation split (held out of train; the "
        f"test split is not used).\n\nSearch space: {describe_space(space)}."
    )
    usage = ("Feed the best values to train.py: "
             f"`python train.py --hparams {arm}={files[0]}` (with the other arms' own files)")
    write_trials_md(rows, files[1], title, intro, usage, top)
    plot_trials(rows, _ranges(space), files[2], title.replace("`", ""))
    return {"trials": len(rows), "failed": failed, "best": best,
            "best_hparams": best["hparams"], "files": files}


def _columns(rows) -> list[str]:
    """The searched fields, with one `rho_pos` column when rho_pos = rho_neg throughout."""
    columns = list(rows[0]["hparams"])
    if "rho_neg" in columns and all(r["hparams"]["rho_pos"] == r["hparams"]["rho_neg"]
                                    for r in rows):
        columns.remove("rho_neg")
    return columns


def write_trials_md(rows, path, title: str, intro: str, usage: str, top: int = 10) -> None:
    """The `top` rows (best first, `trial_rows`) as a markdown table under `title` and
    `intro`."""
    columns = _columns(rows)
    titles = {"rho_pos": "rho"} if "rho_neg" not in columns else {}
    head = ["rank", "trial", *(titles.get(c, c) for c in columns), "epochs", "val acc %"]
    lines = [f"# {title}", "", intro, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, row in enumerate(rows[:top], 1):
        values = [row["hparams"][c] for c in columns]
        cells = [str(rank), row["trial"]]
        cells += [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        cells += [str(row["epochs"] or "-"), f"{100 * row['val_accuracy']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", usage, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot_trials(rows, ranges: dict, path, title: str = "") -> None:
    """Validation accuracy against each searched number (rows of `trial_rows`; one panel
    each over its `ranges` entry `(low, high, log-sampled)`); the searched choices (clip,
    aux_to_latent, mapper) as colours."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns = _columns(rows)
    # Hyperband trains some values in several trials: plot each values' best score.
    best = {}
    for row in rows:
        key = tuple(row["hparams"][k] for k in columns)
        if key not in best or row["val_accuracy"] > best[key]["val_accuracy"]:
            best[key] = row
    numbers = [c for c in columns if c in ranges]
    choices = [c for c in columns if c not in numbers]
    groups: dict[str, list] = {}
    for row in best.values():
        label = ", ".join(f"{c}={row['hparams'][c]}" for c in choices) or "trials"
        groups.setdefault(label, []).append(row)
    top = rows[0]  # best_hparams.json's trial
    fig, axes = plt.subplots(1, len(numbers), figsize=(max(8.0, 4.5 * len(numbers) + 1), 4.5),
                             squeeze=False, sharey=True)
    for ax, name in zip(axes[0], numbers):
        for i, (label, members) in enumerate(sorted(groups.items())):
            ax.scatter([r["hparams"][name] for r in members],
                       [100 * r["val_accuracy"] for r in members],
                       color=f"C{i}", s=40, edgecolors="black", linewidths=0.5, label=label)
        ax.scatter([top["hparams"][name]], [100 * top["val_accuracy"]], marker="*", s=300,
                   facecolors="none", edgecolors="red", linewidths=1.5, label="best")
        if name in _REFERENCES:
            value, what = _REFERENCES[name]
            ax.axvline(value, color="grey", ls=":", label=what)
        low, high, log = ranges[name]
        if log:
            ax.set_xscale("log")
            ax.set_xlim(low / 1.5, high * 1.5)
        else:
            margin = 0.05 * (high - low)
            ax.set_xlim(low - margin, high + margin)
        ax.set_xlabel(name if "rho_neg" in columns or name != "rho_pos" else "rho (= rho_pos = rho_neg)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy %")
    legend = {}  # each label once, from whichever panel drew it
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    axes[0][-1].legend(legend.values(), legend.keys(), loc="lower right", fontsize="x-small")
    fig.suptitle(f"{title}\n{len(rows)} trials, best validation accuracy "
                 f"{100 * top['val_accuracy']:.2f}% (trial {top['trial']})", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
