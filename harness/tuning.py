"""Searching an arm's fine-tuning hyperparameters with keras-tuner, on the validation split.

Every trial fine-tunes one arm (`training.build_arm`: `lns`, `sign` or `bop`) from one
pretrained sign checkpoint and is scored by its best validation accuracy (the test split
is never used here); every arm with the same tuner, trials and epochs, so that the arms
are compared equally tuned. The search space is `FineTuningHyperModel.build(hp)`.
`search(config)` writes into `config.output_dir`:

    best_hparams.json   the best trial's values as `TrainConfig` fields (train.py --hparams)
    trials.md           the top trials
    trials.png          validation accuracy against the searched values
    search/             keras-tuner's project (oracle, trials): re-running resumes it
    tune_config.json    the settings, checked when a search is resumed

Without a checkpoint, `prepare_checkpoint` pretrains once into `config.pretrain_dir`.
Distributed tuning is keras-tuner's (`KERASTUNER_*` variables): the process whose tuner
id contains "chief" serves the oracle and writes the files above; the workers run trials.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import time

import keras_tuner as kt
import tensorflow as tf

from harness import report, training
from harness.distribute import make_strategy
from harness.protocols import TUNED_ARMS, get_protocol
from harness.rundir import (
    RunDir, ensure_writable_dir, pretrained_run, pretrained_weights_path, read_json, write_json,
)
from harness.search_space import (
    DEFAULT_ALPHA_RANGE, DEFAULT_BOP_GAMMA_RANGE, DEFAULT_BOP_THRESHOLD_RANGE, DEFAULT_RHO_RANGE,
    REFERENCES, FineTuningHyperModel,
)
from harness.settings import check_fields, setting, train_setting
from larq_noisy.mappers import MAPPERS
from larq_noisy.quantizers import CLIPS, OPTIONS, check_options

__all__ = ["TUNERS", "SearchFailed", "TuneConfig", "locate_checkpoint", "prepare_checkpoint",
           "search"]

TUNERS = {"hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization, "random": kt.RandomSearch}
PROJECT = "search"  # keras-tuner's project directory, inside the output directory
# Search budgets per dataset when --epochs / --steps-per-epoch are not given: the offline
# default is quick on a CPU (the README); elsewhere a trial takes the protocol's schedule.
SMALL_BUDGET = {"epochs": 3, "steps_per_epoch": 50}
BUDGETS = {"fashion_mnist": SMALL_BUDGET, "mnist": SMALL_BUDGET}
DEFAULT_MAX_TRIALS = 10  # bayesian and random

# Settings that may change when a search is resumed without changing its results.
_RESUMABLE = ("max_trials", "strategy", "verbose", "pretrained", "pretrain_epochs", "data_dir",
              "output_dir", "pretrain_dir")
#: The settings that shape one arm's search only: setting -> that arm.
ARM_SETTINGS = {"alpha_range": "lns", "rho_range": "lns", "asymmetric_rho": "lns",
                "search_mapper": "lns", "mapper": "lns", "clip": "lns", "aux_to_latent": "lns",
                "bop_threshold_range": "bop", "bop_gamma_range": "bop"}
# keras-tuner's BayesianOptimization imports these (its "bayesian" extra): module -> package.
BAYESIAN_NEEDS = {"scipy": "scipy", "sklearn": "scikit-learn"}


def _missing_packages(needs: dict) -> list[str]:
    return [package for module, package in needs.items() if importlib.util.find_spec(module) is None]


class SearchFailed(RuntimeError):
    """keras-tuner stopped the search: too many trials in a row failed."""


@dataclasses.dataclass
class TuneConfig:
    """Every setting of a search; those made by `setting` or `train_setting` (`TrainConfig`'s
    of that name) are tune.py's flags. `None` means the default: the dataset's (`BUDGETS`,
    `protocols.PROTOCOLS`), a `DEFAULT_*_RANGE`, the learning rate a decade either side of
    the protocol's; `output_dir=None`: `tune_runs/<dataset>/<arm>`. `clip` and
    `aux_to_latent` are searched unless fixed here."""

    arm: str = setting("lns", "the fine-tuning arm to search (default: %(default)s)",
                       group="what to tune", choices=TUNED_ARMS)
    dataset: str = train_setting("dataset")
    model: str | None = train_setting("model")
    pretrained: str | None = train_setting(
        "pretrained", "a train.py output dir or its pretrain/weights.h5 (default: "
        "runs/<dataset> if pretrained, else pretrain once)")
    output_dir: str | None = train_setting("output_dir", "default: tune_runs/<dataset>/<arm>")
    # Where the one-time pretraining goes; None: tune_runs/<dataset>/pretrain_run with
    # the default output_dir (shared by the arms), else <output_dir>/pretrain_run.
    pretrain_dir: str | None = None
    seed: int = train_setting("seed", "the trials' batches and mapper initialisation, as "
                              "train.py's (default: %(default)s)")
    search_seed: int = setting(1, "keras-tuner's oracle seed: which settings the trials try, "
                               ">= 1 (default: %(default)s)")

    tuner: str = setting("hyperband", group="search (every arm)", choices=TUNERS)
    max_trials: int | None = setting(
        None, f"bayesian/random: default {DEFAULT_MAX_TRIALS}; hyperband: a cap (default: one "
        "full Hyperband iteration)", check=">= 1")
    epochs: int | None = setting(
        None, "fine-tuning epochs per trial (hyperband: the most); default "
        f"{SMALL_BUDGET['epochs']} on (fashion_)mnist, else the protocol's", check=">= 1")
    steps_per_epoch: int | None = train_setting(
        "steps_per_epoch", f"default {SMALL_BUDGET['steps_per_epoch']} on (fashion_)mnist, "
        "else full epochs")
    search_lr: bool = setting(
        True, "search the fine-tuning learning rate (default: yes), log-uniform over a decade "
        "either side of the protocol's; for bop, the rate of the variables Bop does not flip")
    lr_range: tuple[float, float] | None = setting(None, "the fine-tuning learning rate's range")
    finetune_cosine: bool | None = train_setting(
        "finetune_cosine", "the trials' schedule, as train.py's (default: the protocol's)")

    alpha_range: tuple[float, float] | None = setting(
        None, f"log-uniform (default: {list(DEFAULT_ALPHA_RANGE)})", group="search (--arm lns)")
    rho_range: tuple[float, float] | None = setting(
        None, f"uniform (default: {list(DEFAULT_RHO_RANGE)})")
    asymmetric_rho: bool = setting(
        False, "search rho_pos and rho_neg separately (default: one rho for both)")
    search_mapper: tuple[str, ...] | None = setting(  # (): all of `MAPPERS`
        None, f"also search the mapper kind among KINDs (default: all of {list(MAPPERS)})",
        choices=list(MAPPERS), metavar="KIND")
    mapper: str | None = train_setting("mapper", "fix the mapper kind (default: the dataset's "
                                       "protocol)")
    clip: str | None = train_setting(
        "clip", f"fix the quantizer's clip (default: searched among {list(CLIPS)})")
    aux_to_latent: bool | None = train_setting(
        "aux_to_latent", "fix whether the noisy-supervision loss trains the latent weights "
        "(default: searched)")

    bop_threshold_range: tuple[float, float] | None = setting(
        None, f"log-uniform (default: {list(DEFAULT_BOP_THRESHOLD_RANGE)})",
        group="search (--arm bop)")
    bop_gamma_range: tuple[float, float] | None = setting(
        None, f"log-uniform (default: {list(DEFAULT_BOP_GAMMA_RANGE)})")

    batch_size: int | None = train_setting(
        "batch_size", "global batch size (default: the protocol's)", group="data and hardware")
    limit: int | None = train_setting("limit")
    data_dir: str | None = train_setting("data_dir")
    strategy: str = train_setting("strategy")
    pretrain_epochs: int | None = train_setting(
        "pretrain_epochs", "for the one-time pretraining (default: the protocol's)")
    verbose: int = 1
    # Set by `resolved` only; any change (`dataclasses.replace`) clears it.
    _resolved: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @property
    def saved_settings(self) -> str:
        """tune_config.json: the settings of the search in `output_dir`."""
        return os.path.join(self.output_dir, "tune_config.json")

    def resolved(self) -> TuneConfig:
        """A copy with the defaults filled in; `ValueError` for any bad value, the search
        space's included. Resolving a resolved config returns it."""
        if self._resolved:
            return self
        c = dataclasses.replace(self)
        check_fields(c)  # the choices (arm, tuner, ...) and bounds (max_trials, epochs, ...)
        budget = BUDGETS.get(c.dataset, {"epochs": get_protocol(c.dataset).finetune_epochs})
        if not isinstance(c.search_seed, int) or c.search_seed < 1:
            raise ValueError(f"search_seed={c.search_seed!r} must be an integer >= 1 (keras-tuner "
                             "draws a random seed for 0, and the search would not repeat).")
        missing = _missing_packages(BAYESIAN_NEEDS) if c.tuner == "bayesian" else []
        if missing:
            raise ValueError(
                f"tuner 'bayesian' needs {' and '.join(missing)} (keras-tuner's Gaussian "
                f"process), not installed here: `pip install {' '.join(missing)}`, or choose "
                f"one of {[t for t in TUNERS if t != 'bayesian']}."
            )
        c.epochs = budget["epochs"] if c.epochs is None else c.epochs
        if c.steps_per_epoch is None:
            c.steps_per_epoch = budget.get("steps_per_epoch")
        if c.max_trials is None and c.tuner != "hyperband":
            c.max_trials = DEFAULT_MAX_TRIALS
        if c.output_dir is None:
            c.output_dir = os.path.join("tune_runs", c.dataset, c.arm)
            c.pretrain_dir = c.pretrain_dir or os.path.join("tune_runs", c.dataset, "pretrain_run")
        c.pretrain_dir = c.pretrain_dir or os.path.join(c.output_dir, "pretrain_run")
        for field in dataclasses.fields(c):
            value, arm = getattr(c, field.name), ARM_SETTINGS.get(field.name, c.arm)
            if arm != c.arm and value != field.default:
                flag = ("--no-" if value is False else "--") + field.name.replace("_", "-")
                raise ValueError(f"{flag} shapes the search of --arm {arm}, not of --arm {c.arm}: "
                                 "leave it out.")
        if c.lr_range is not None and not c.search_lr:
            raise ValueError("--lr-range and --no-search-lr contradict each other: give one of them.")
        if c.mapper is not None and c.search_mapper is not None:
            raise ValueError(f"mapper={c.mapper!r} fixes the mapper, which the search also "
                             "searches: give one or the other.")
        hypermodel = FineTuningHyperModel(c)  # checks dataset, model, batch size, limit, ...
        space = hypermodel.space()  # checks the ranges
        # The quantizer must accept every extreme combination of the searched options.
        options, settings = hypermodel.base.quantizer_options(c.arm) or {}, hypermodel.settings
        ends = {hp.name: (hp.min_value, hp.max_value) if hasattr(hp, "min_value") else hp.values
                for hp in space.space if set(settings({hp.name: 0})) <= set(OPTIONS)}
        for corner in itertools.product(*ends.values()):
            check_options(**{**options, **settings(dict(zip(ends, corner)))})
        c._resolved = True
        return c

    def train_config(self, weights: str | None = None) -> training.TrainConfig:
        """The resolved `TrainConfig` every trial starts from: the settings of the same
        name, `arms=(arm,)`, with the arm's settings (`TrainConfig.for_arm`)."""
        pretrained = weights or self.pretrained
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.init and f.name in training.TrainConfig.__dataclass_fields__}
        settings.update(arms=(self.arm,), pretrained=pretrained, finetune_epochs=self.epochs,
                        pretrain_epochs=None if pretrained else self.pretrain_epochs,
                        output_dir=self.output_dir or "", verbose=0)
        return training.TrainConfig(**settings).resolved().for_arm(self.arm)

    def to_json(self) -> dict:
        """The settings and the space they search, as tune_config.json holds them."""
        data = dataclasses.asdict(self)
        data.pop("_resolved")
        space = FineTuningHyperModel(self).space().space
        data["space"] = {hp.name: [hp.min_value, hp.max_value, hp.sampling]
                         if hasattr(hp, "min_value") else list(hp.values) for hp in space}
        return json.loads(json.dumps(data))  # tuples as lists


def _log(config: TuneConfig):
    """`print`, or nothing with `--quiet`."""
    return print if config.verbose else lambda *args, **kwargs: None


def _role() -> str:
    """"standalone", "chief" or "worker" (keras-tuner's distributed tuning)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "standalone"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


def _mismatch(config: TuneConfig, weights: str) -> str | None:
    """Why the checkpoint's train.py run does not fit this search, by its config.json;
    None if it fits or says nothing (another file: then loading it checks it)."""
    run = pretrained_run(weights)
    saved = run.saved_settings() if run else {}
    wanted = config.train_config(weights) if saved else None
    for key in ("dataset", "model", "kernel_quantizer", "image_size"):
        if key in saved and saved[key] != getattr(wanted, key):
            return f"it was trained with {key}={saved[key]!r}, this search uses {getattr(wanted, key)!r}"
    return None


def locate_checkpoint(config: TuneConfig) -> tuple[str | None, str]:
    """The pretrained weights to fine-tune from, and what was decided, in words. In
    order: `config.pretrained`; the checkpoint a resumed search used; train.py's default
    output `runs/<dataset>`; `config.pretrain_dir`; the checkpoint the protocol ships
    (unless `pretrain_epochs` is given); else `None`: pretrain (`prepare_checkpoint`)."""
    config = config.resolved()
    if config.pretrained:
        weights = pretrained_weights_path(config.pretrained)
        reason = _mismatch(config, weights)
        if reason:
            raise ValueError(f"--pretrained {config.pretrained!r} does not fit: {reason}.")
        return weights, f"fine-tuning from --pretrained {weights}"
    if os.path.exists(config.saved_settings):
        previous = read_json(config.saved_settings, "delete it to start the search anew").get("weights")
        if previous and os.path.isfile(previous):
            return previous, f"resuming the search: fine-tuning from {previous}, as before"
    notes = []
    for run_dir, what in ((os.path.join("runs", config.dataset), "train.py's default output"),
                          (config.pretrain_dir, "tune.py's one-time pretraining")):
        weights = RunDir(run_dir).pretrained_weights
        reason = _mismatch(config, weights) if os.path.isfile(weights) else None
        if os.path.isfile(weights) and not reason:
            return weights, f"reusing {weights} ({what})"
        notes.append(f"{weights} not reused: {reason}" if reason else f"no {weights}")
    shipped = config.train_config().pretrained  # the protocol's, as train.py's default
    if shipped:
        return shipped, f"fine-tuning from the protocol's shipped checkpoint {shipped}"
    return None, (f"{'; '.join(notes)}: pretraining once into {config.pretrain_dir} "
                  "(later runs reuse it)")


def _check_resume(config: TuneConfig, weights: str) -> None:
    current = {**config.to_json(), "weights": os.path.abspath(weights)}
    RunDir(config.output_dir).check_settings(
        current, _RESUMABLE, "a search", config=config.saved_settings, record=_role() != "worker"
    )


def prepare_checkpoint(config: TuneConfig) -> str:
    """The checkpoint to fine-tune from: found (`locate_checkpoint`) or pretrained now,
    once, into `config.pretrain_dir`. `ValueError` for a bad setting or checkpoint path,
    and when a distributed search has none (its processes must not all pretrain)."""
    log = _log(config)
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
    if weights is not None:
        return weights
    run_dir = RunDir(config.pretrain_dir)
    _check_resume(config, run_dir.pretrained_weights)  # changed settings: refused now
    c = config.train_config()
    training.run(training.TrainConfig(
        dataset=c.dataset, model=c.model, arms=(), pretrain_epochs=c.pretrain_epochs,
        batch_size=c.batch_size, limit=c.limit, seed=c.seed, strategy=c.strategy,
        data_dir=c.data_dir, output_dir=run_dir.root, verbose=2 if config.verbose else 0,
    ))  # verbose 2: one line per epoch, no progress bar
    return run_dir.pretrained_weights


def make_tuner(config: TuneConfig, hypermodel: FineTuningHyperModel, strategy):
    """`config.tuner`, resuming the search in `output_dir`; `ran`: this process's trials."""
    common = dict(hypermodel=hypermodel, objective=kt.Objective("val_accuracy", "max"),
                  seed=config.search_seed, directory=config.output_dir, project_name=PROJECT,
                  overwrite=False, distribution_strategy=strategy)
    if config.tuner == "hyperband":
        tuner = kt.Hyperband(max_epochs=config.epochs, factor=3, **common)
        tuner.oracle.max_trials = config.max_trials  # a cap; None: one full iteration
    else:
        tuner = TUNERS[config.tuner](max_trials=config.max_trials, **common)
    tuner.ran, end_trial = [], tuner.on_trial_end

    def on_trial_end(trial):  # keras-tuner's hook; it records no tuner id per trial
        tuner.ran.append(trial.trial_id)
        end_trial(trial)

    tuner.on_trial_end = on_trial_end
    return tuner


def search(config: TuneConfig) -> dict:
    """Run (or resume) the search of `config`; returns a summary of it. Bad settings,
    data or checkpoints raise `ValueError` (`FileNotFoundError`: missing data) before any
    trial. A keras-tuner worker only runs trials (its summary lists them); the chief, or
    a standalone search, writes best_hparams.json, trials.md and trials.png."""
    role = _role()
    log = _log(config)
    config = config.resolved()
    weights = prepare_checkpoint(config)
    _check_resume(config, weights)
    strategy = make_strategy(config.strategy)
    hypermodel = FineTuningHyperModel(config, weights)
    base = hypermodel.base
    training.build_baseline(base, weights)  # a checkpoint that does not fit fails here
    tf.keras.backend.clear_session()
    validation = base.load_split("validation")  # missing data fails here
    tuner = make_tuner(config, hypermodel, strategy)
    budget = f"at most {config.max_trials} trials" if config.max_trials else "one Hyperband iteration"
    steps = f"{config.steps_per_epoch} steps" if config.steps_per_epoch else "full epochs"
    log(f"tune: {config.tuner} search ({role}), {budget}, up to {config.epochs} epochs of "
        f"{steps} per trial, batch {base.batch_size}; "
        f"{report.describe_space(tuner.oracle.get_space())}", flush=True)
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
    rows, failed = report.trial_rows(tuner.oracle, config.epochs)
    summary.update(trials=len(rows), failed=failed, files=[])
    if not rows:
        log(f"tune: no trial completed ({failed} failed): nothing to report", flush=True)
        return summary
    best = summary["best"] = rows[0]
    summary["best_hparams"] = FineTuningHyperModel.settings(best["values"])
    summary["files"] = [os.path.join(config.output_dir, "best_hparams.json")]
    write_json(summary["files"][0], summary["best_hparams"])
    summary["files"] += report.write_search_report(
        rows, failed, tuner.oracle.get_space(), config, base.model, weights, REFERENCES)
    log(f"tune: best val accuracy {best['val_accuracy']:.4f} (trial {best['trial']}) with "
        f"{json.dumps(summary['best_hparams'])}; wrote {summary['files']}", flush=True)
    return summary
