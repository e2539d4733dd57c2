"""Train a BNN with the paper's protocol: sign pretraining, then fine-tuning arms.

    python train.py                                  # offline default: Fashion-MNIST, CPU
    python train.py --dataset cifar10                # the paper's CIFAR-10 ResNet-20 (GPU)
    python train.py --dataset imagenet2012 --data-dir /data/tfds --strategy mirrored

Every default comes from the dataset's protocol (harness/protocols.py); run the same
command again to resume an interrupted run.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ notices: nothing to act on

from harness import errors, training  # noqa: E402
from harness.settings import TrainConfig, add_flags, read_hparams  # noqa: E402

#: train.py's own options, each shown after the setting it belongs with. The flags of
#: the settings come from `TrainConfig`.
OPTIONS = {
    "pretrain_here": ("--hparams", dict(
        nargs="+", metavar="[ARM=]FILE",
        help="tune.py's best_hparams.json: ARM=FILE for that arm (and the arms tuned as it), "
             "a bare FILE for every arm; flags win over them")),
    "alpha": ("--rho", dict(type=float, help="sets both --rho-pos and --rho-neg")),
    "verbose": ("--quiet", dict(action="store_true",
                                help="print only where the results are (and errors)")),
}


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags: `TrainConfig`'s settings and `OPTIONS` (tests/test_docs.py parses
    every documented command with it)."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, TrainConfig, after=OPTIONS)
    return p


def parse_args(argv=None) -> TrainConfig:
    p = build_parser()
    values = vars(p.parse_args(argv))
    rho, hparams, quiet = (values.pop(name) for name in ("rho", "hparams", "quiet"))
    for side in ("rho_pos", "rho_neg"):
        values[side] = rho if values[side] is None else values[side]
    values["verbose"] = 0 if quiet else values["verbose"]
    try:
        common, values["tuned"] = read_hparams(hparams)
        for key, value in common.items():
            if values.get(key) is None:  # an explicit flag wins
                values[key] = value
        # The one resolution of the run: every bad value is reported now, before any work.
        return TrainConfig(**values).resolved()
    except ValueError as error:
        p.error(str(error))


def main(argv=None) -> int:
    config = parse_args(argv)
    return errors.run_script("train.py", lambda: training.run(config))


if __name__ == "__main__":
    sys.exit(main())
