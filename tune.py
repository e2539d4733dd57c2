"""Search an arm's fine-tuning hyperparameters: lns (alpha, rho, clip, aux_to_latent and
the learning rate), sign (its learning rate) or bop (Bop's threshold and gamma and the
learning rate), every arm with the same tuner, trials and epochs.

    python tune.py                                   # lns, offline default: Fashion-MNIST, CPU
    python tune.py --arm sign && python tune.py --arm bop    # the same budget, other arms
    python tune.py --pretrained runs/fashion_mnist --tuner bayesian --max-trials 20
    python train.py --hparams lns=tune_runs/fashion_mnist/lns/best_hparams.json   # lns' settings

Each trial fine-tunes the arm from a pretrained sign checkpoint (--pretrained; else
train.py's runs/<dataset>, else a one-time pretraining that the arms' searches share)
and is scored on the validation split. Run the same command again to resume the search.
Distributed: set KERASTUNER_TUNER_ID (one id containing "chief"), KERASTUNER_ORACLE_IP
and KERASTUNER_ORACLE_PORT and start the same command once per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ notices: nothing to act on

import models  # noqa: E402
from harness import datasets, errors, tuning
from harness.distribute import STRATEGIES
from larq_noisy.mappers import MAPPERS
from larq_noisy.quantizers import CLIPS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = p.add_argument_group("what to tune")
    run.add_argument("--arm", default="lns", choices=tuning.TUNED_ARMS,
                     help="the fine-tuning arm to search (default: %(default)s)")
    run.add_argument("--dataset", default="fashion_mnist", choices=sorted(datasets.DATASETS))
    run.add_argument("--model", choices=sorted(models.MODELS), help="default: the dataset's")
    run.add_argument("--pretrained", metavar="PATH",
                     help="a train.py output dir or its pretrain/weights.h5 (default: "
                          "runs/<dataset> if pretrained, else pretrain once)")
    run.add_argument("--output-dir", help="default: tune_runs/<dataset>/<arm>")
    run.add_argument("--seed", type=int, default=0,
                     help="the trials' batches and mapper initialisation, as train.py's "
                          "(default: %(default)s)")
    run.add_argument("--search-seed", type=int, default=1,
                     help="keras-tuner's oracle seed: which settings the trials try, >= 1 "
                          "(default: %(default)s)")

    s = p.add_argument_group("search (every arm)")
    s.add_argument("--tuner", default="hyperband", choices=tuning.TUNERS)
    s.add_argument("--max-trials", type=int,
                   help=f"bayesian/random: default {tuning.DEFAULT_MAX_TRIALS}; hyperband: a cap "
                        "(default: one full Hyperband iteration)")
    s.add_argument("--epochs", type=int,
                   help="fine-tuning epochs per trial (hyperband: the most); default "
                        f"{tuning.SMALL_BUDGET['epochs']} on (fashion_)mnist, else the protocol's")
    s.add_argument("--steps-per-epoch", type=int,
                   help=f"default {tuning.SMALL_BUDGET['steps_per_epoch']} on (fashion_)mnist, "
                        "else full epochs")
    s.add_argument("--search-lr", action=argparse.BooleanOptionalAction, default=True,
                   help="search the fine-tuning learning rate (default: yes), log-uniform over "
                        "a decade either side of the protocol's; for bop, the rate of the "
                        "variables Bop does not flip")
    s.add_argument("--lr-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="the fine-tuning learning rate's range")

    lns = p.add_argument_group("search (--arm lns)")
    lns.add_argument("--alpha-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                     help=f"log-uniform (default: {list(tuning.DEFAULT_ALPHA_RANGE)})")
    lns.add_argument("--rho-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                     help=f"uniform (default: {list(tuning.DEFAULT_RHO_RANGE)})")
    lns.add_argument("--asymmetric-rho", action="store_true",
                     help="search rho_pos and rho_neg separately (default: one rho for both)")
    lns.add_argument("--search-mapper", nargs="*", metavar="KIND", choices=list(MAPPERS),
                     help=f"also search the mapper kind among KINDs (default: all of {list(MAPPERS)})")
    lns.add_argument("--mapper", choices=list(MAPPERS),
                     help="fix the mapper kind (default: the dataset's protocol)")
    lns.add_argument("--clip", choices=CLIPS,
                     help=f"fix the quantizer's clip (default: searched among {list(CLIPS)})")
    lns.add_argument("--aux-to-latent", action=argparse.BooleanOptionalAction,
                     help="fix whether the noisy-supervision loss trains the latent weights "
                          "(default: searched)")

    bop = p.add_argument_group("search (--arm bop)")
    bop.add_argument("--bop-threshold-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                     help=f"log-uniform (default: {list(tuning.DEFAULT_BOP_THRESHOLD_RANGE)})")
    bop.add_argument("--bop-gamma-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                     help=f"log-uniform (default: {list(tuning.DEFAULT_BOP_GAMMA_RANGE)})")

    hw = p.add_argument_group("data and hardware")
    hw.add_argument("--batch-size", type=int, help="global batch size (default: the protocol's)")
    hw.add_argument("--limit", type=int, help="examples per split, for smoke runs")
    hw.add_argument("--data-dir", help="tfds data dir (and Fashion-MNIST IDX files)")
    hw.add_argument("--strategy", default="auto", choices=STRATEGIES)
    hw.add_argument("--pretrain-epochs", type=int,
                    help="for the one-time pretraining (default: the protocol's)")
    s.add_argument("--finetune-cosine", action=argparse.BooleanOptionalAction,
                   help="the trials' schedule, as train.py's (default: the protocol's)")
    hw.add_argument("--pretrain-only", action="store_true",
                    help="find or make the pretrained checkpoint, print its path and exit")
    hw.add_argument("--quiet", action="store_true")
    return p


def parse_args(argv=None) -> tuple[tuning.TuneConfig, argparse.Namespace]:
    p = build_parser()
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(tuning.TuneConfig)}
    config = tuning.TuneConfig(**{k: v for k, v in vars(args).items() if k in fields},
                               verbose=0 if args.quiet else 1)
    try:
        config = config.resolved()  # every bad value is reported now, before any work
    except ValueError as error:
        p.error(str(error))
    return config, args


def main(argv=None) -> int:
    config, args = parse_args(argv)
    if args.pretrain_only:
        return errors.run_script("tune.py", lambda: print(tuning.prepare_checkpoint(config)))
    return errors.run_script("tune.py", lambda: tuning.search(config))


if __name__ == "__main__":
    sys.exit(main())
