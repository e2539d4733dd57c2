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
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ notices: nothing to act on

from harness import errors, tuning  # noqa: E402
from harness.settings import add_flags  # noqa: E402


#: tune.py's own option, shown after the setting it belongs with (and `--quiet`, last).
#: The flags of the settings come from `TuneConfig`.
OPTIONS = {"pretrain_epochs": ("--pretrain-only", dict(
    action="store_true", help="find or make the pretrained checkpoint, print its path and exit"))}


def build_parser() -> argparse.ArgumentParser:
    """tune.py's flags: `TuneConfig`'s settings, `OPTIONS` and `--quiet`."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, tuning.TuneConfig, after=OPTIONS).add_argument("--quiet", action="store_true")
    return p


def parse_args(argv=None) -> tuple[tuning.TuneConfig, argparse.Namespace]:
    p = build_parser()
    args = p.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("pretrain_only", "quiet")}
    config = tuning.TuneConfig(**settings, verbose=0 if args.quiet else 1)
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
