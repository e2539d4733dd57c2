"""A GPU check in one command: a short fine-tuning of `sign` and `lns` from a pretrained
checkpoint through train.py's own harness (`harness.training.run`, one arm after the
other in one run directory), summed up in ONE JSON: per arm the training steps/s and
images/s (the last epoch's training steps: the first epoch's tracing and every
validation excluded), peak GPU memory (`GPU:0`; null on the CPU), validation and test
accuracy; the baseline's accuracy; each mapper arm's step time over `sign`'s; the
device and the TensorFlow version.

    # ImageNet from a Bi-Real Net checkpoint (larq-zoo's format, e.g. a train.py run's
    # pretrain/weights.h5), on the GPU machine with the prepared data:
    .venv/bin/python bench/gpu_check.py --data-dir /data/tfds --pretrained birealnet18.h5 \\
        --mixed-precision
    # imagenette end to end (pretrains first):
    .venv/bin/python bench/gpu_check.py --dataset imagenette --data-dir /data/tfds --pretrain-epochs 5
    # the CPU, tiny (tests/test_gpu_check.py; docs/data/gpu_check_cpu.json):
    .venv/bin/python bench/gpu_check.py --dataset fashion_mnist --steps-per-epoch 200 \\
        --output-dir bench_runs/gpu_check_cpu --json docs/data/gpu_check_cpu.json

Every train.py setting is a flag here too (`--strategy`, `--mixed-precision`, `--mapper`,
...); this check's defaults: imagenet2012, arms sign and lns, 2 fine-tuning epochs of 200
steps, one line per epoch. Run it again to resume: finished arms are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench.common  # noqa: E402,F401  (before TensorFlow: quiets its C++ log)

import tensorflow as tf  # noqa: E402

from harness import errors, training  # noqa: E402
from harness.report import read_history  # noqa: E402
from harness.rundir import RunDir, machine, write_json  # noqa: E402
from harness.settings import TrainConfig, add_flags, flag  # noqa: E402

#: What this check runs unless told otherwise (the rest: the dataset's protocol).
DEFAULTS = dict(dataset="imagenet2012", arms=("sign", "lns"), finetune_epochs=2,
                steps_per_epoch=200, verbose=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, TrainConfig)
    p.add_argument("--json", help="where to write the summary (default: gpu_check.json in "
                   "the output dir)")
    p.set_defaults(**DEFAULTS)
    return p


def parse_args(argv=None) -> tuple[TrainConfig, str]:
    """`(the run's resolved config, the JSON's path)`; one-line errors for bad values,
    and for a run that would pretrain for a whole protocol."""
    p = build_parser()
    values = vars(p.parse_args(argv))
    path = values.pop("json")
    values["output_dir"] = values["output_dir"] or f"bench_runs/gpu_check/{values['dataset']}"
    try:
        config = TrainConfig(**values).resolved()
    except ValueError as error:
        p.error(str(error))
    if not config.pretrained and values["pretrain_epochs"] is None:
        p.error(f"{config.dataset} has no shipped checkpoint: give {flag('pretrained')} (a "
                f"{config.model} weights file or train.py run), or {flag('pretrain_epochs')} N "
                f"to pretrain here first (its protocol's {config.pretrain_epochs} is no check).")
    return config, path or os.path.join(config.output_dir, "gpu_check.json")


def device() -> str:
    """The GPUs' names (the first's, with their count), else the CPU's."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU: {machine()['cpu']}"
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    return f"{len(gpus)} x {name}"


def run_arms(config: TrainConfig) -> tuple[dict, dict]:
    """`(results.json's content, each arm's peak GPU memory in bytes or None)`: the run,
    one arm at a time, so that the peak is each arm's."""
    gpu = bool(tf.config.list_physical_devices("GPU"))
    peaks = {}
    for arm in config.arms:
        if gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        results = training.run(dataclasses.replace(config, arms=(arm,)))
        peaks[arm] = tf.config.experimental.get_memory_info("GPU:0")["peak"] if gpu else None
    return results, peaks


def summary(config: TrainConfig, results: dict, peaks: dict, argv) -> dict:
    """The check's JSON: speed, memory and accuracy per arm, from the run's files."""
    run_dir = RunDir(config.output_dir)
    steps = config.steps_per_epoch_run
    arms = {}
    for arm in config.arms:
        seconds = read_history(RunDir.history(run_dir.arm(arm)))["train_seconds"]
        result = results["arms"][arm]
        arms[arm] = {
            "steps_per_s": steps / seconds[-1],
            "images_per_s": steps * config.batch_size / seconds[-1],
            "epoch_train_seconds": seconds,  # the first includes tracing
            "peak_gpu_memory_bytes": peaks[arm],
            **{k: v for k, v in result.items() if k.startswith(("val_", "test_"))},
            "resumed": result["resumed"],  # a resumed epoch ran fewer steps than counted
        }
    sign = arms.get("sign")
    return {
        "command": " ".join(["bench/gpu_check.py", *argv]),
        "device": device(), "tensorflow": tf.__version__, "machine": machine(),
        "load_average": os.getloadavg(),  # 1, 5, 15 min, at the end: other jobs' share
        "dataset": config.dataset, "model": config.model, "batch_size": config.batch_size,
        "steps_per_epoch": steps, "finetune_epochs": config.finetune_epochs,
        "mixed_precision": config.mixed_precision, "strategy": config.strategy,
        "run_dir": config.output_dir,
        "baseline": {k: v for k, v in results["baseline"].items()
                     if k.startswith(("val_", "test_"))},
        "arms": arms,
        # Step time of each other arm over sign's.
        "overhead_vs_sign": {arm: sign["steps_per_s"] / a["steps_per_s"]
                             for arm, a in arms.items() if sign and arm != "sign"},
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config, path = parse_args(argv)

    def check():
        report = summary(config, *run_arms(config), argv)
        write_json(path, report)
        print(f"{path}: {report['device']}, TensorFlow {report['tensorflow']}")
        for arm, a in report["arms"].items():
            memory = (f", peak {a['peak_gpu_memory_bytes'] / 2**30:.2f} GiB"
                      if a["peak_gpu_memory_bytes"] is not None else "")
            overhead = report["overhead_vs_sign"].get(arm)
            print(f"  {arm:<8}{a['steps_per_s']:8.2f} steps/s {a['images_per_s']:9.0f} images/s"
                  + (f" ({overhead:.2f}x sign's step)" if overhead else "") + memory
                  + f", val accuracy {a['val_accuracy']:.4f}")

    return errors.run_script("bench/gpu_check.py", check)


if __name__ == "__main__":
    sys.exit(main())
