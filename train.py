"""Train a BNN with the paper's protocol: sign pretraining, then fine-tuning arms.

    python train.py                                  # offline default: Fashion-MNIST, CPU
    python train.py --dataset cifar10                # the paper's CIFAR-10 ResNet-20 (GPU)
    python train.py --dataset imagenet2012 --data-dir /data/tfds --strategy mirrored

Every default comes from the dataset's protocol (larq_noisy/protocols.py); run the same
command again to resume an interrupted run.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ notices: nothing to act on

import models  # noqa: E402
from harness import datasets, errors, training
from harness.distribute import STRATEGIES
from larq_noisy.mappers import MAPPERS
from harness.protocols import ARMS, PRESETS
from larq_noisy.quantizers import CLIPS, LABELS, REDUCTIONS, STARTS


def parse_args(argv=None) -> training.TrainConfig:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = p.add_argument_group("what to run")
    run.add_argument("--dataset", default="fashion_mnist", choices=sorted(datasets.DATASETS))
    run.add_argument("--model", choices=sorted(models.MODELS), help="default: the dataset's")
    run.add_argument("--arms", nargs="*", choices=list(ARMS),
                     help="fine-tuning arms (none given: pretraining only)")
    run.add_argument("--kernel-quantizer", choices=models.WEIGHT_QUANTIZERS,
                     help="the baseline's weight binarization (default: the model's own)")
    run.add_argument("--pretrained", metavar="PATH",
                     help="skip phase 1: a train.py output dir or its pretrain/weights.h5 "
                          "(default: the protocol's shipped checkpoint, if any)")
    run.add_argument("--pretrain", dest="pretrain_here", action="store_true",
                     help="run phase 1 here, even where the protocol ships a converged "
                          "checkpoint to fine-tune (Fashion-MNIST's bnn_small)")
    run.add_argument("--hparams", nargs="+", metavar="[ARM=]FILE",
                     help="tune.py's best_hparams.json: ARM=FILE for that arm (and the arms "
                          "tuned as it), a bare FILE for every arm; flags win over them")
    run.add_argument("--output-dir", help="default: runs/<dataset>")
    run.add_argument("--export", action="store_true",
                     help="convert each arm with Larq Compute Engine and verify it "
                          "(arms/<arm>/model.tflite, as export.py)")
    run.add_argument("--seed", type=int, default=0,
                     help="seeds the data order, augmentation and initialisation (>= 0)")

    sched = p.add_argument_group("schedule (default: the dataset's protocol)")
    sched.add_argument("--pretrain-epochs", type=int)
    sched.add_argument("--finetune-epochs", type=int)
    sched.add_argument("--warmup-epochs", type=int, default=0,
                       help="train the mappers alone first (the paper's warm-up)")
    sched.add_argument("--steps-per-epoch", type=int, help="cap, for smoke runs")
    sched.add_argument("--limit", type=int, help="examples per split, for smoke runs")
    sched.add_argument("--batch-size", type=int, help="global batch size")
    sched.add_argument("--optimizer", choices=training.OPTIMIZERS)
    sched.add_argument("--lr", type=float, help="pretraining learning rate")
    sched.add_argument("--finetune-lr", type=float)
    sched.add_argument("--finetune-cosine", action=argparse.BooleanOptionalAction,
                       help="decay the fine-tuning rate (and Bop's gamma) to 0 along a cosine, "
                            "step by step; --no-finetune-cosine: the protocol's milestones "
                            "(constant on Fashion-MNIST)")

    lns = p.add_argument_group(
        "LNS (default: the dataset's protocol, else larq_noisy.NoisyMappedQuantizer's)")
    lns.add_argument("--preset", choices=sorted(PRESETS),
                     help="paper: the paper's LNS options (cnn mapper, alpha 1, rho 0.005, "
                          "sum, hardtanh, aux to W) instead of the dataset's measured ones")
    lns.add_argument("--alpha", type=float, help="weight of the noisy-supervision loss")
    lns.add_argument("--rho", type=float, help="sets both --rho-pos and --rho-neg")
    lns.add_argument("--rho-pos", type=float)
    lns.add_argument("--rho-neg", type=float)
    lns.add_argument("--mapper", choices=list(MAPPERS))
    lns.add_argument("--width", type=float, help="mapper hidden width, x c_in")
    lns.add_argument("--start", choices=STARTS)
    lns.add_argument("--labels", choices=LABELS)
    lns.add_argument("--reduction", choices=REDUCTIONS)
    lns.add_argument("--clip", choices=CLIPS,
                     help="hardtanh: t = clip(f(W)) (the paper); none: t = f(W), no dead zone")
    lns.add_argument("--aux-to-latent", action=argparse.BooleanOptionalAction,
                     help="whether the noisy-supervision loss also trains the latent "
                          "weights W (the paper) or the mapper only")
    bop = p.add_argument_group("Bop (the bop arm; default: larq's)")
    bop.add_argument("--bop-threshold", type=float, help="flip threshold tau")
    bop.add_argument("--bop-gamma", type=float, help="adaptivity rate of the momentum")

    hw = p.add_argument_group("hardware")
    hw.add_argument("--strategy", default="auto", choices=STRATEGIES)
    hw.add_argument("--data-dir", help="tfds data dir (and Fashion-MNIST IDX files)")
    hw.add_argument("--image-size", type=int, help="override the input size")
    hw.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (GPU)")
    hw.add_argument("--jit", action="store_true", help="XLA-compile the train step")
    hw.add_argument("--backup-every", type=int, metavar="STEPS",
                    help="back up every STEPS steps for preemption (default: every epoch)")
    hw.add_argument("--nondeterministic", action="store_true",
                    help="leave TensorFlow's op determinism off (faster on GPUs; results "
                         "then vary from run to run)")
    out = p.add_argument_group("output")
    out.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                     help="1: progress bars (default); 2: one line per epoch; 0: as --quiet")
    out.add_argument("--quiet", action="store_true",
                     help="print only where the results are (and errors)")

    args = p.parse_args(argv)
    values = vars(args)
    if args.rho is not None:
        for side in ("rho_pos", "rho_neg"):
            values[side] = args.rho if values[side] is None else values[side]
    try:
        hparams, values["tuned"] = training.read_hparams(args.hparams)
    except ValueError as error:
        p.error(str(error))
    for key, value in hparams.items():
        if values.get(key) is None:  # an explicit flag wins
            values[key] = value
    values["output_dir"] = values["output_dir"] or f"runs/{args.dataset}"
    values["verbose"] = 0 if values.pop("quiet") else args.verbose
    values["deterministic"] = not values.pop("nondeterministic")
    for key in ("rho", "hparams"):
        values.pop(key)
    try:  # the one resolution of the run: every bad value is reported now, before any work
        return training.TrainConfig(**values).resolved()
    except ValueError as error:
        p.error(str(error))


def main(argv=None) -> int:
    config = parse_args(argv)
    return errors.run_script("train.py", lambda: training.run(config))


if __name__ == "__main__":
    sys.exit(main())
