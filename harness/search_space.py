"""The search space of an arm's fine-tuning: `FineTuningHyperModel.build(hp)`, the one place
it is written. Each hyperparameter is named after the `TrainConfig` field it sets."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing

import keras_tuner as kt
import larq as lq
import tensorflow as tf

from harness import training
from harness.protocols import get_protocol
from larq_noisy.mappers import MAPPERS
from larq_noisy.quantizers import CLIPS, PAPER

if typing.TYPE_CHECKING:
    from harness.tuning import TuneConfig

__all__ = ["DEFAULT_ALPHA_RANGE", "DEFAULT_BOP_GAMMA_RANGE", "DEFAULT_BOP_THRESHOLD_RANGE",
           "DEFAULT_RHO_RANGE", "REFERENCES", "FineTuningHyperModel"]

DEFAULT_ALPHA_RANGE = (1e-3, 10.0)
DEFAULT_RHO_RANGE = (0.0, 0.2)
# larq's Bop defaults are made for training from scratch and flip far too many weights
# of a pretrained model: the thresholds reach far above larq's (docs/METHOD.md).
DEFAULT_BOP_THRESHOLD_RANGE = (1e-8, 1e-3)
DEFAULT_BOP_GAMMA_RANGE = (1e-5, 1e-1)
_BOP = inspect.signature(lq.optimizers.Bop).parameters
#: Where each searched number starts, and what the plot marks: the paper's CIFAR-10
#: setting and larq's Bop defaults.
REFERENCES = {"alpha": (PAPER["alpha"], "paper"), "rho": (PAPER["rho_pos"], "paper"),
              "rho_pos": (PAPER["rho_pos"], "paper"), "rho_neg": (PAPER["rho_neg"], "paper"),
              "bop_threshold": (_BOP["threshold"].default, "larq's default"),
              "bop_gamma": (_BOP["gamma"].default, "larq's default")}


def _float(hp, name: str, bounds, default: float, sampling: str = "linear") -> float:
    """`hp.Float(name)` over `bounds` (LOW, HIGH), starting from `default` brought into
    them. keras-tuner refuses inverted bounds and log sampling from <= 0; an empty or
    infinite range it would search is refused here. Each as one line naming the range."""
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} range {bounds!r} must be two numbers, LOW HIGH.") from None
    where = f"{name} range {low:g} {high:g}"
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{where} must be finite.")
    if low == high:
        raise ValueError(f"{where} is empty: the low end must be below the high end.")
    try:
        return hp.Float(name, low, high, sampling=sampling, default=min(max(default, low), high))
    except ValueError:  # keras-tuner's check of min_value, max_value and sampling
        raise ValueError(f"{where} is " + (
            "inverted: the low end must be below the high end." if low > high
            else "sampled log-uniformly: its low end must be > 0.")) from None


class FineTuningHyperModel(kt.HyperModel):
    """The arm `config.arm` fine-tuned from `weights`; `build(hp)` is the search space.

    ```python
    hypermodel = FineTuningHyperModel(TuneConfig(arm="bop").resolved(), weights)
    kt.RandomSearch(hypermodel, objective="val_accuracy", max_trials=10).search(...)
    ```

    # Arguments
    config: the search's `TuneConfig`: the arm, the ranges and the choices.
    weights: the pretrained checkpoint every trial starts from.
    """

    def __init__(self, config: TuneConfig, weights: str | None = None):
        super().__init__(name=config.arm)
        self.config, self.weights = config, weights
        self.base = config.train_config(weights)  # what every trial's settings replace

    def declare_hyperparameters(self, hp) -> None:
        c = self.config
        if c.arm == "lns":
            _float(hp, "alpha", c.alpha_range or DEFAULT_ALPHA_RANGE, PAPER["alpha"], "log")
            rho = c.rho_range or DEFAULT_RHO_RANGE
            for name in ("rho_pos", "rho_neg") if c.asymmetric_rho else ("rho",):
                _float(hp, name, rho, REFERENCES[name][0])
            low, high = map(float, rho)  # flip probabilities, rho_pos + rho_neg < 1
            if low < 0:
                raise ValueError(f"rho range {low:g} {high:g} reaches below 0: rho is a flip "
                                 "probability, in [0, 0.5).")
            if 2 * high >= 1:
                sides = "rho_pos and rho_neg each reach" if c.asymmetric_rho else "rho_pos = rho_neg ="
                raise ValueError(
                    f"rho range {low:g} {high:g} reaches {high:g} >= 0.5: with {sides} {high:g}, "
                    f"rho_pos + rho_neg = {2 * high:g} >= 1 and the unbiased estimator is "
                    "undefined. Keep the high end below 0.5.")
            if c.search_mapper is not None:
                hp.Choice("mapper", list(dict.fromkeys(c.search_mapper)) or list(MAPPERS))
            if c.clip is None:
                hp.Choice("clip", list(CLIPS))
            if c.aux_to_latent is None:
                hp.Boolean("aux_to_latent", default=True)
        if c.arm == "bop":
            _float(hp, "bop_threshold", c.bop_threshold_range or DEFAULT_BOP_THRESHOLD_RANGE,
                   REFERENCES["bop_threshold"][0], "log")
            _float(hp, "bop_gamma", c.bop_gamma_range or DEFAULT_BOP_GAMMA_RANGE,
                   REFERENCES["bop_gamma"][0], "log")
        if c.search_lr:  # default: a decade either side of the protocol's
            lr = get_protocol(c.dataset).finetune_lr
            _float(hp, "finetune_lr", c.lr_range or (lr / 10, lr * 10), self.base.finetune_lr,
                   "log")

    def space(self) -> kt.HyperParameters:
        """The search space alone (what `build` declares), without building a model."""
        hp = kt.HyperParameters()
        self.declare_hyperparameters(hp)
        return hp

    def build(self, hp):
        self.declare_hyperparameters(hp)
        config = dataclasses.replace(self.base, **self.settings(hp.values))
        return training.build_arm(config, self.config.arm, self.weights)

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        # Every trial reads the batches train.py's arms read, from its first epoch on
        # (Hyperband continues some trials at `initial_epoch`).
        steps = self.base.steps_per_epoch_run
        first = kwargs.get("initial_epoch", 0)
        kwargs["steps_per_epoch"] = steps
        args = (self.base.train_stream("finetune", kwargs["epochs"], first * steps), *args)
        # train.py's schedule, over the trial's epochs, with the trial's settings.
        config = dataclasses.replace(self.base, **self.settings(hp.values)).for_arm(self.config.arm)
        schedule = training.lr_schedule(config, "finetune", config.finetune_lr, self.config.epochs)
        # A diverging trial stops and is scored by its (poor) validation accuracy.
        callbacks = [*(callbacks or []), schedule, tf.keras.callbacks.TerminateOnNaN()]
        return model.fit(*args, callbacks=callbacks, **kwargs)

    @staticmethod
    def settings(values: dict) -> dict:
        """Hyperparameter values (a trial's, or any by name) as `TrainConfig` fields (what
        `train.py --hparams` reads): `rho` sets both `rho_pos` and `rho_neg`."""
        out = {}
        for name, value in values.items():
            if name.startswith("tuner/"):  # Hyperband's bookkeeping
                continue
            if isinstance(value, (float, int)) and not isinstance(value, bool):
                value = float(value)
            out.update({"rho_pos": value, "rho_neg": value} if name == "rho" else {name: value})
        return out
