"""The training protocol per dataset: one place for every default of a run.

Values from the paper (docs/METHOD.md section 6) where it gives them; where it is silent
the choice is marked **[project decision]**. Learning-rate milestones are fractions of
a phase's length, so a shortened run keeps the shape of the schedule.
"""

from __future__ import annotations

import dataclasses
import math

from larq_noisy.quantizers import PAPER, PER_WEIGHT

__all__ = [
    "ARMS", "PRESETS", "PROTOCOLS", "TUNED_ARMS", "Arm", "Protocol", "get_protocol", "lr_at_epoch",
]


@dataclasses.dataclass(frozen=True)
class Arm:
    """A fine-tuning arm: what it changes from plain fine-tuning with sign weights."""

    title: str  # its name in reports (the paper's, where it has one)
    # The NoisyMappedQuantizer options it fixes over the run's; None: sign weights.
    quantizer: dict | None = None
    # The binary kernels are trained by larq's Bop (flips), everything else as usual.
    bop: bool = False
    # The arm whose tuned settings it fine-tunes with (None: its own): an ablation of
    # lns differs from it only by its `quantizer` options.
    tuned_as: str | None = None


#: Fine-tuning arms (docs/METHOD.md section 6.1).
ARMS = {
    "sign": Arm("fine-tuning with sign weights"),  # the paper's "Fine-tuning"
    "bop": Arm("fine-tuning with Bop", bop=True),  # Larq's flip-based optimizer
    "mapped": Arm("mapper w/o noisy supervision", {"alpha": 0.0}, tuned_as="lns"),
    "lns": Arm("LNS", {}),  # the method: alpha > 0, rho > 0
    # Noisy labels without their correction.
    "lns_rho0": Arm("LNS with rho = 0", {"rho_pos": 0.0, "rho_neg": 0.0}, tuned_as="lns"),
}

#: The arms with settings of their own (tune.py --arm); the others take one of theirs.
TUNED_ARMS = tuple(name for name, arm in ARMS.items() if arm.tuned_as is None)


#: Named sets of LNS options that replace a dataset protocol's tuned settings
#: (`train.py --preset`): every arm then fine-tunes at the protocol's `finetune_lr`.
#: `per_weight` is what a model without measured settings of its own gets.
PRESETS = {"paper": PAPER, "per_weight": PER_WEIGHT}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How to train one dataset: both phases' length, optimiser and schedule."""

    model: str
    pretrain_epochs: int
    finetune_epochs: int
    batch_size: int
    optimizer: str  # "sgd" (momentum 0.9) or "adam"
    lr: float  # pretraining learning rate
    finetune_lr: float  # every arm's, unless `tuned` gives it its own
    # Epochs (as fractions of the phase) at which the learning rate is multiplied by 0.1.
    pretrain_milestones: tuple[float, ...] = ()
    finetune_milestones: tuple[float, ...] = ()
    # The phase ends with a cosine decay instead of steps. [project decision]
    pretrain_cosine: bool = False
    # Fine-tuning decays its learning rate to 0 along a cosine, step by step, and Bop's
    # gamma with it (`callbacks.CosineDecayPerStep`). [project decision]
    finetune_cosine: bool = False
    arms: tuple[str, ...] = ("sign", "mapped", "lns")
    # Each tuned arm's (`TUNED_ARMS`) fine-tuning settings here (`settings.ARM_FIELDS`),
    # over `finetune_lr` and the quantizer's and Bop's defaults. Flags and --hparams win.
    tuned: dict = dataclasses.field(default_factory=dict)
    # The model `tuned` was measured on (None: any). Another model takes the `per_weight`
    # preset, measured at every layer size (docs/RESULTS.md section 1).
    tuned_model: str | None = None
    # A pretrained checkpoint of `tuned_model` in models/weights/ (its .json: SHA-256, the
    # command that made it), fine-tuned unless the run pretrains or changes the baseline.
    checkpoint: str | None = None
    note: str = ""


# Offline default: real data with no download, the paper's protocol shape in minutes on
# 2 CPU cores (docs/METHOD.md 6.3). Adam, as larq recommends for BNN latent weights; a
# shipped 240-epoch checkpoint; 2 fine-tuning epochs along a per-step cosine, each arm with
# the settings `bench/converged.py`'s equal searches from that checkpoint found for it
# (docs/RESULTS.md section 0.5: its bench/state/ files, exactly). [project decision]
_SMALL_IMAGES = Protocol(
    model="bnn_small", pretrain_epochs=240, finetune_epochs=2, batch_size=128,
    optimizer="adam", lr=3e-3, pretrain_cosine=True, finetune_cosine=True,
    finetune_lr=3e-4,  # a tenth, the paper's ratio: the centre of tune.py's lr range
    arms=("sign", "lns"),
    tuned={
        "sign": {"finetune_lr": 3.8434367657722956e-05},
        "bop": {"bop_threshold": 2.5705307467662047e-05, "bop_gamma": 0.0036132231065518243,
                "finetune_lr": 3.3099922595184714e-05},
        # `sum`: the quantizer's default when it was searched (its alpha is sum's).
        "lns": {"mapper": "linear", "reduction": "sum", "alpha": 0.0019197103582628617,
                "rho_pos": 0.014958751374622149, "rho_neg": 0.014958751374622149,
                "clip": "none", "aux_to_latent": True,
                "finetune_lr": 0.0017931173640112436},
    },
    tuned_model="bnn_small",
    checkpoint="bnn_small_fashion_mnist.h5",
    note="offline default [project decision]",
)

# Paper, ImageNet ResNet-18: pretrain 120 epochs, batch 256, SGD 0.9, lr 0.1 x0.1 at
# 70/90/110; fine-tune 45 epochs, lr 0.01 x0.1 every 15. Bi-Real Net baseline. The paper
# gives no LNS values for ImageNet; its CIFAR-10 ones (`--preset paper`) flip half of
# Bi-Real Net 18's binary weights in one step: LNS takes `per_weight`, measured on
# birealnet18 with this fine-tuning optimizer (docs/RESULTS.md section 1).
_IMAGENET = Protocol(
    model="birealnet18", pretrain_epochs=120, finetune_epochs=45, batch_size=256,
    optimizer="sgd", lr=0.1, pretrain_milestones=(70 / 120, 90 / 120, 110 / 120),
    finetune_lr=0.01, finetune_milestones=(1 / 3, 2 / 3),
    tuned={"lns": PER_WEIGHT}, tuned_model="birealnet18",
    note="paper, Sec. 5.2; LNS per_weight, measured on birealnet18 [project decision]",
)

PROTOCOLS = {
    "fashion_mnist": _SMALL_IMAGES,
    # No checkpoint shipped: a pretraining that runs here (60 epochs: ~13 min on 2 cores).
    # Fashion-MNIST's tuned settings: measured on the same model, so the same layer sizes.
    "mnist": dataclasses.replace(
        _SMALL_IMAGES, pretrain_epochs=60, checkpoint=None,
        note="as fashion_mnist, 60 epochs; its settings, tuned on bnn_small [project decision]",
    ),
    # Paper, CIFAR-10 ResNet-20: pretrain 400 epochs, batch 128, SGD 0.9, lr 0.1, no
    # weight decay; fine-tune 120 epochs, lr 0.01 x0.1 every 30. The pretraining
    # schedule is not given: cosine decay. [project decision]
    "cifar10": Protocol(
        model="resnet20", pretrain_epochs=400, finetune_epochs=120, batch_size=128,
        optimizer="sgd", lr=0.1, pretrain_cosine=True,
        finetune_lr=0.01, finetune_milestones=(0.25, 0.5, 0.75),
        # The paper's alpha 1 with `sum` flips 41% of ResNet-20's binary weights in one
        # step of this fine-tuning (docs/RESULTS.md section 1): `per_weight`, measured here.
        tuned={"lns": PER_WEIGHT}, tuned_model="resnet20",
        note="paper, Sec. 5.1; LNS per_weight, measured on resnet20 [project decision]",
    ),
    "imagenet2012": _IMAGENET,
    # ImageNet's schedule at a third of the length, for a 10-class subset.
    "imagenette": dataclasses.replace(
        _IMAGENET, pretrain_epochs=40, finetune_epochs=15, batch_size=64,
        note="ImageNet's, shorter [project decision]",
    ),
}


def get_protocol(dataset: str) -> Protocol:
    if dataset not in PROTOCOLS:
        raise ValueError(f"No protocol for dataset {dataset!r}; choose one of {sorted(PROTOCOLS)}.")
    return PROTOCOLS[dataset]


def lr_at_epoch(epoch: int, lr: float, epochs: int, milestones=(), cosine=False) -> float:
    """The learning rate of 0-based `epoch` in a phase of `epochs` epochs."""
    if cosine:
        return lr * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
    passed = sum(epoch >= round(f * epochs) for f in milestones)
    return lr * 0.1**passed
