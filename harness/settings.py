"""Every setting of a run, each stated once: `TrainConfig`.

A setting is a dataclass field made by `setting` (its type, default, help, scope, choices
and bound); the flags (`add_flags`), the settings an arm may have its own value of
(`ARM_FIELDS`) and the checks (`check_types`, `check_fields`) derive from it. The quantizer
checks its own options (`larq_noisy.quantizers.check_options`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing

import models
from harness import datasets
from harness.distribute import STRATEGIES
from harness.protocols import ARMS, PRESETS, TUNED_ARMS, get_protocol
from harness.errors import first_line
from harness.rundir import machine, pretrained_run, read_json
from larq_noisy.mappers import MAPPERS
from larq_noisy.quantizers import CLIPS, LABELS, OPTIONS, REDUCTIONS, STARTS, check_options

__all__ = ["ARM_FIELDS", "TrainConfig", "add_flags", "checkpoint_mismatch", "flag",
           "read_hparams", "setting", "train_setting"]


def setting(default=None, help=None, *, group: str | None = None, scope: str = "run",
            choices=None, check: str | None = None, flag: str | None = None,
            metavar: str | None = None):
    """A dataclass field that is a setting: `help` for its flag (`flag`, default
    `--the-name`; `group`: the title of the argument group it starts, the settings after
    it join that group), `scope` "run", "arm" (an arm may have its own value) or
    "quantizer" (an arm's, checked by the quantizer), and the `choices` and the bound
    (`check`: ">= 0", ">= 1" or "> 0") its values must keep."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, group=group, scope=scope, choices=choices, check=check, flag=flag,
        metavar=metavar))


def settings_of(cls, *scopes: str) -> tuple[dataclasses.Field, ...]:
    """The fields of `cls` made by `setting` (of `scopes` only, if given)."""
    return tuple(f for f in dataclasses.fields(cls)
                 if "scope" in f.metadata and (not scopes or f.metadata["scope"] in scopes))


def flag(name: str, cls=None) -> str:
    """The command-line flag of setting `name` (of `cls`, by default `TrainConfig`)."""
    return ((cls or TrainConfig).__dataclass_fields__[name].metadata.get("flag")
            or "--" + name.replace("_", "-"))


def _kinds(hint) -> tuple[list, bool]:
    """The types a hint allows (`tuple[str, ...]` as `tuple`), and whether `None` is one."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    return [typing.get_origin(o) or o for o in options if o is not type(None)], type(None) in options


def add_flags(parser: argparse.ArgumentParser, cls, after: dict | None = None):
    """A flag per setting of dataclass `cls`, in field order: a bool is a switch (`--x`
    and `--no-x` if it may be `None` or is on by default; with its own `flag`, the
    switch that turns it off), a `tuple[float, float]` a range (`LOW HIGH`), another
    tuple takes any number of values. `after`: `{field: (flag, argparse options)}`, a
    script's own option, shown after that field's flag. Returns the last group."""
    group, hints = parser, typing.get_type_hints(cls)
    for field in settings_of(cls):
        meta, hint = field.metadata, hints[field.name]
        if meta["group"]:
            group = parser.add_argument_group(meta["group"])
        kinds, optional = _kinds(hint)
        options = dict(dest=field.name, default=field.default, help=meta["help"])
        if kinds[0] is bool:
            options["action"] = ("store_false" if meta["flag"] and field.default
                                 else argparse.BooleanOptionalAction if optional or field.default
                                 else "store_true")
        elif hint in (tuple[float, float], tuple[float, float] | None):
            options.update(nargs=2, type=float, metavar=("LOW", "HIGH"))
        elif kinds[0] is tuple:
            options.update(nargs="*", choices=meta["choices"], metavar=meta["metavar"])
        else:
            options.update(type=kinds[0], choices=meta["choices"], metavar=meta["metavar"])
        group.add_argument(flag(field.name, cls), **options)
        if field.name in (after or {}):
            own_flag, options = after[field.name]
            group.add_argument(own_flag, **options)
    return group


# What each type of setting takes from JSON, and how a message names it.
_JSON_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (list, tuple),
               dict: (dict,)}
_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
               tuple: "a list of strings", dict: "an object"}


def check_types(cls, values: dict) -> None:
    """`ValueError` naming the first of `values` (field -> value) that is no field of
    dataclass `cls`, or not of its field's type, or a float that is not finite."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if name.startswith("_") or name not in hints:
            raise ValueError(f"unknown setting {name!r}")
        kinds, optional = _kinds(hints[name])
        if value is None and not optional:
            raise ValueError(f"{name} must be set, not null")
        if value is not None and not any(
            isinstance(value, _JSON_TYPES[kind]) and isinstance(value, bool) == (kind is bool)
            and (kind is not tuple or all(isinstance(v, str) for v in value)) for kind in kinds
        ):
            raise ValueError(f"{name}={value!r} must be "
                             + " or ".join(_KIND_NAMES[kind] for kind in kinds))
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")


def check_fields(config, scopes=("run", "arm")) -> None:
    """`ValueError` for the first setting of `config` (of `scopes`) off its choices or
    its bound; `None` is every setting's default."""
    for field in settings_of(type(config), *scopes):
        name, value, meta = field.name, getattr(config, field.name), field.metadata
        if value is None:
            continue
        if meta["choices"] is not None:
            many = isinstance(value, (list, tuple))
            unknown = [v for v in (value if many else (value,)) if v not in meta["choices"]]
            if unknown:
                shown = unknown if many else repr(value)
                raise ValueError(f"Unknown {name.replace('_', ' ')} {shown}; "
                                 f"choose one of {list(meta['choices'])}.")
        if meta["check"]:
            relation, limit = meta["check"].split()
            if not (value >= float(limit) if relation == ">=" else value > float(limit)):
                raise ValueError(f"{name}={value} must be {meta['check']}.")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run. `None` means the default, resolved once (`resolved`,
    `for_arm`) in this order: the value given here (train.py's flags, then a bare
    `--hparams FILE`) > the arm's `tuned` settings (`--hparams ARM=FILE`) > the dataset
    protocol's (`protocols.PROTOCOLS`, its `tuned` settings per arm first; `preset`
    replaces those) > `NoisyMappedQuantizer`'s and larq's Bop defaults."""

    dataset: str = setting("fashion_mnist", group="what to run",
                           choices=sorted(datasets.DATASETS))
    classes: str | None = setting(
        None, "train on the classes listed in FILE only, one a line as tfds names them "
        "(ImageNet: synset ids, as ImageNet-100's list), relabelled 0..n-1 in its order",
        metavar="FILE")
    model: str | None = setting(None, "default: the dataset's", choices=sorted(models.MODELS))
    arms: tuple[str, ...] | None = setting(
        None, "fine-tuning arms (none given: pretraining only)", choices=tuple(ARMS))
    kernel_quantizer: str | None = setting(
        None, "the baseline's weight binarization (default: the model's own)",
        choices=models.WEIGHT_QUANTIZERS)
    pretrained: str | None = setting(
        None, "skip phase 1: a train.py output dir or its pretrain/weights.h5 (default: the "
        "protocol's shipped checkpoint, if any)", metavar="PATH")
    pretrain_here: bool = setting(
        False, "run phase 1 here, even where the protocol ships a converged checkpoint to "
        "fine-tune (Fashion-MNIST's bnn_small)", flag="--pretrain")
    output_dir: str | None = setting(None, "default: runs/<dataset>")
    export: bool = setting(False, "convert each arm with Larq Compute Engine and verify it "
                           "(arms/<arm>/model.tflite, as export.py)")
    seed: int = setting(0, "seeds the data order, augmentation and initialisation (>= 0)",
                        check=">= 0")

    pretrain_epochs: int | None = setting(
        group="schedule (default: the dataset's protocol)", check=">= 0")
    finetune_epochs: int | None = setting(check=">= 0")
    warmup_epochs: int = setting(0, "train the mappers alone first (the paper's warm-up)",
                                 check=">= 0")
    steps_per_epoch: int | None = setting(None, "cap, for smoke runs", check=">= 1")
    limit: int | None = setting(
        None, "examples read of each split, for smoke runs (validation: held out of the "
        "training ones)", check=">= 1")
    batch_size: int | None = setting(None, "global batch size", check=">= 1")
    optimizer: str | None = setting(choices=("sgd", "adam"))
    lr: float | None = setting(None, "pretraining learning rate", check="> 0")
    finetune_lr: float | None = setting(scope="arm", check="> 0")
    finetune_cosine: bool | None = setting(
        None, "decay the fine-tuning rate (and Bop's gamma) to 0 along a cosine, step by "
        "step; --no-finetune-cosine: the protocol's milestones (constant on Fashion-MNIST)")

    guard: bool = setting(
        True, "leave the guard off: by default an arm that flips more than 5%% of its binary "
        "weights in its first 10 steps, or whose loss is not finite, is stopped with one line "
        "(the other arms go on)", flag="--no-guard")

    preset: str | None = setting(
        None, "paper: the paper's LNS options (cnn mapper, alpha 1, rho 0.005, sum, hardtanh, "
        "aux to W); per_weight: the loss averaged per weight, separable mapper (what a model "
        "without measured settings gets); instead of the dataset's measured ones",
        choices=sorted(PRESETS),
        group="LNS (default: the dataset's protocol, else larq_noisy.NoisyMappedQuantizer's)")
    alpha: float | None = setting(None, "weight of the noisy-supervision loss", scope="quantizer")
    rho_pos: float | None = setting(scope="quantizer")
    rho_neg: float | None = setting(scope="quantizer")
    mapper: str | None = setting(scope="quantizer", choices=list(MAPPERS))
    width: float | None = setting(None, "mapper hidden width, x c_in", scope="quantizer")
    start: str | None = setting(scope="quantizer", choices=STARTS)
    labels: str | None = setting(scope="quantizer", choices=LABELS)
    reduction: str | None = setting(scope="quantizer", choices=REDUCTIONS)
    clip: str | None = setting(
        None, "hardtanh: t = clip(f(W)) (the paper); none: t = f(W), no dead zone",
        scope="quantizer", choices=CLIPS)
    aux_to_latent: bool | None = setting(
        None, "whether the noisy-supervision loss also trains the latent weights W (the "
        "paper) or the mapper only", scope="quantizer")

    bop_threshold: float | None = setting(None, "flip threshold tau", scope="arm", check="> 0",
                                          group="Bop (the bop arm; default: larq's)")
    bop_gamma: float | None = setting(None, "adaptivity rate of the momentum", scope="arm",
                                      check="> 0")

    strategy: str = setting("auto", group="hardware", choices=STRATEGIES)
    data_dir: str | None = setting(None, "tfds data dir (and Fashion-MNIST IDX files)")
    image_size: int | None = setting(None, "override the input size", check=">= 1")
    mixed_precision: bool = setting(False, "mixed_float16 (GPU)")
    jit: bool = setting(False, "XLA-compile the train step")
    backup_every: int | None = setting(
        None, "back up every STEPS steps for preemption (default: every epoch)", check=">= 1",
        metavar="STEPS")
    deterministic: bool = setting(
        True, "leave TensorFlow's op determinism off (faster on GPUs; results then vary "
        "from run to run)", flag="--nondeterministic")

    verbose: int = setting(1, "1: progress bars (default); 2: one line per epoch; 0: as --quiet",
                           group="output", choices=(0, 1, 2))

    # Settings per tuned arm (`TUNED_ARMS` -> {`ARM_FIELDS` field: value}), over the
    # protocol's; the arms tuned as one (`Arm.tuned_as`) take its settings too.
    tuned: dict[str, dict] = dataclasses.field(default_factory=dict)
    # Set by `resolved` only; any change (`dataclasses.replace`) clears it.
    _resolved: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def resolved(self) -> TrainConfig:
        """A copy with the protocol's run-wide defaults filled in, every arm's settings
        checked; `ValueError` for any bad value. Resolving a resolved config returns it."""
        if self._resolved:
            return self
        check_types(TrainConfig, self.to_json())
        protocol = get_protocol(self.dataset)
        filled = dataclasses.replace(self)
        filled.model = filled.model or protocol.model
        filled.output_dir = filled.output_dir or f"runs/{filled.dataset}"
        if (protocol.checkpoint and filled.model == protocol.tuned_model and not filled.pretrain_here
                and filled.pretrained is None and filled.pretrain_epochs is None
                and filled.kernel_quantizer is None and filled.image_size is None):
            filled.pretrained = shipped_checkpoint(filled.dataset)
        if protocol.tuned_model not in (None, filled.model) and filled.preset is None:
            filled.preset = "per_weight"  # the tuned settings belong to another model
        for field in ("model", "pretrain_epochs", "finetune_epochs", "batch_size", "optimizer",
                      "lr", "arms", "finetune_cosine"):
            if getattr(filled, field) is None:
                setattr(filled, field, getattr(protocol, field))
        filled.arms = tuple(filled.arms)
        filled.validate()
        filled._resolved = True
        return filled

    def for_arm(self, arm: str) -> TrainConfig:
        """This config with `arm`'s fine-tuning settings (`ARM_FIELDS`) filled in, in the
        order the class says; options still `None` take the quantizer's or Bop's defaults."""
        source = ARMS[arm].tuned_as or arm
        protocol = get_protocol(self.dataset)
        defaults = {"finetune_lr": protocol.finetune_lr}
        defaults.update(PRESETS[self.preset] if self.preset else protocol.tuned.get(source, {}))
        defaults.update(self.tuned.get(source, {}))
        given = {f: getattr(self, f) for f in ARM_FIELDS if getattr(self, f) is not None}
        config = dataclasses.replace(self, **{**defaults, **given})
        config._resolved = self._resolved  # `validate` checked every arm's settings
        return config

    def validate(self) -> None:
        """Raise `ValueError` for any bad value, before any expensive work."""
        check_fields(self)
        if self.classes:  # a file that cannot be read or names no class of the dataset
            datasets.read_classes(self.dataset, self.classes)
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
        for arm in self.arms:  # every arm's own settings, its quantizer's by the quantizer
            check_fields(self.for_arm(arm), scopes=("arm",))
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
    def class_names(self) -> tuple[str, ...] | None:
        """The classes the run trains on (`classes`' file), `None` for all of them."""
        return datasets.read_classes(self.dataset, self.classes) if self.classes else None

    @property
    def num_classes(self) -> int:
        """Outputs of the model's head."""
        return len(self.class_names) if self.classes else self.spec.num_classes

    @property
    def input_shape(self) -> tuple:
        h, w, c = self.spec.image_shape
        return (self.image_size, self.image_size, c) if self.image_size else (h, w, c)

    @property
    def steps_per_epoch_run(self) -> int:
        """Training steps in one epoch of this run (the split's batches, capped)."""
        steps = datasets.batches_per_epoch(self.dataset, "train", self.batch_size, self.limit,
                                           data_dir=self.data_dir, classes=self.class_names)
        return min(steps, self.steps_per_epoch) if self.steps_per_epoch else steps

    def load_split(self, split: str):
        """The batched dataset of `split` ("validation" or "test"; "train": one epoch
        per iteration, see `train_stream` for a run's reproducible epochs)."""
        return datasets.load(self.dataset, split, self.batch_size, seed=self.seed,
                             data_dir=self.data_dir, image_size=self.image_size,
                             limit=self.limit, classes=self.class_names)[0]

    def train_stream(self, stream: str, epochs: int, position: int = 0):
        """Epochs `0 .. epochs - 1` of `stream` (one of `STREAMS`) from global step
        `position` on: the batches are a function of (seed, stream, epoch) alone."""
        first, skip = divmod(position, self.steps_per_epoch_run)
        return datasets.load(
            self.dataset, "train", self.batch_size, data_dir=self.data_dir,
            seed=self.seed * len(STREAMS) + STREAMS.index(stream), image_size=self.image_size,
            limit=self.limit, classes=self.class_names, epochs=(first, epochs), skip=skip,
            steps_per_epoch=self.steps_per_epoch,
        )[0]

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

    def recorded(self, saved: dict | None = None) -> dict:
        """What config.json records: every setting, and the fine-tuning settings of each
        arm this run fine-tunes as they resolve (`"<arm>.<field>"`), so that a resumed
        run is checked against the values its arms use, wherever they came from. An arm
        not fine-tuned yet is not recorded (a pretraining-only run resumes under new tuned
        settings); one recorded by an earlier run (`saved`, config.json) keeps its record."""
        record = {**self.to_json(), "machine": machine()}
        if self.classes:  # what the file said, so that a resumed run is checked against it
            record["class_names"] = list(self.class_names)
        for arm in ARMS:
            if arm in self.arms:
                record.update({f"{arm}.{k}": v for k, v in self.arm_settings(arm).items()})
            else:
                record.update({k: v for k, v in (saved or {}).items() if k.startswith(arm + ".")})
        return record


def train_setting(name: str, help: str | None = None, group: str | None = None):
    """`TrainConfig`'s setting `name` in another config (tune.py's), run-wide there: the
    same default, choices and bound, with its own `help` if given."""
    field = TrainConfig.__dataclass_fields__[name]
    return dataclasses.field(default=field.default, metadata={
        **field.metadata, "help": help or field.metadata["help"], "group": group, "scope": "run"})


#: The `TrainConfig` fields an arm may have its own value of (`Protocol.tuned`,
#: `--hparams ARM=FILE`): how it fine-tunes, nothing that would unpair the arms.
ARM_FIELDS = tuple(f.name for f in settings_of(TrainConfig, "arm", "quantizer"))
#: The data streams of a run: all arms share "finetune", so they see the same batches.
STREAMS = ("pretrain", "finetune", "warmup")


def read_hparams(specs) -> tuple[dict, dict[str, dict]]:
    """`--hparams [ARM=]FILE ...` (tune.py's best_hparams.json files) as the settings of
    every arm (a bare FILE: any `TrainConfig` fields) and `{arm: settings}` (ARM=FILE:
    `ARM_FIELDS` of a tuned arm). `ValueError` naming the file for anything else, and
    for a setting given both ways."""
    common, tuned = {}, {}
    for spec in specs or ():
        arm, path = spec.split("=", 1) if "=" in spec else (None, spec)
        if arm is not None and arm not in TUNED_ARMS:
            raise ValueError(f"--hparams {spec!r}: {arm!r} is not a tuned arm; give ARM=FILE "
                             f"with ARM one of {list(TUNED_ARMS)}, or a bare FILE for every arm.")
        values = read_json(path, "give the best_hparams.json written by tune.py")
        if not isinstance(values, dict):
            raise ValueError(f"--hparams {path!r} must hold a JSON object of settings, "
                             f"not {type(values).__name__} {values!r}")
        fields = ARM_FIELDS if arm else tuple(f.name for f in dataclasses.fields(TrainConfig)
                                              if f.init)
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"--hparams {path!r} has keys {unknown} that "
                             + (f"are not an arm's; valid keys are {list(fields)}" if arm
                                else f"are not settings; valid keys are {sorted(fields)}"))
        try:
            check_types(TrainConfig, values)
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


def checkpoint_mismatch(config: TrainConfig, weights: str, error: Exception) -> str:
    """Why `weights` do not load into `config`'s model (`error`: Keras'), and what to do:
    they are another model's (a `ValueError`: layers or shapes that differ; their run's
    config.json names its model, dataset or image size) or the file is damaged. Never
    "delete it" for a file given as `--pretrained`."""
    reason = first_line(error)
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
            f"{config.num_classes} classes ({reason}): give a checkpoint of that model, or "
            "run with the --model and --dataset it was trained with."
        )

    def flags(values) -> str:
        return " ".join(f"{flag(k)} {values[k]}" if values[k] is not None else f"no {flag(k)}"
                        for k in differ)

    theirs, ours = saved, {k: getattr(config, k) for k in differ}
    return (
        f"{weights} holds the weights of " + ", ".join(f"{k} {theirs[k]!r}" for k in differ)
        + f" ({run.config} says so), not of " + ", ".join(f"{k} {ours[k]!r}" for k in differ)
        + f": give a checkpoint pretrained with {flags(ours)}, or run with {flags(theirs)}."
    )


def shipped_checkpoint(dataset: str) -> str | None:
    """The weights file the dataset's protocol ships (models/weights/), if any."""
    name = get_protocol(dataset).checkpoint
    return os.path.join(models.WEIGHTS_DIR, name) if name else None


def settings_note(c: TrainConfig) -> str:
    """Which fine-tuning settings the run's arms take, and why."""
    protocol = get_protocol(c.dataset)
    if protocol.tuned_model not in (None, c.model) and c.preset == "per_weight":
        return (f"Fine-tuning settings: per_weight (--preset per_weight), as {c.dataset}'s "
                f"tuned settings belong to {protocol.tuned_model}, not {c.model}; per_weight "
                "holds at every layer size measured (docs/RESULTS.md section 1).")
    if c.preset:
        return f"Fine-tuning settings: the preset {c.preset!r}, one learning rate for every arm."
    if protocol.tuned_model:
        return (f"Fine-tuning settings: {c.dataset}'s, measured on {c.model} "
                f"({protocol.note}); flags and --hparams win.")
    return f"Fine-tuning settings: {c.dataset}'s protocol ({protocol.note})."
