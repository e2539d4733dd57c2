"""Is training input-bound? Input-pipeline throughput against model throughput
(docs/RESULTS.md section 2.2): the training split as train.py reads it
(`harness.datasets.load`), iterated alone, against training steps of the dataset's default
model on one in-memory batch, with sign kernels and each mapper kind. If the first is
well above the second, the accelerator never waits for data.

    .venv/bin/python bench/input_pipeline.py                        # Fashion-MNIST
    .venv/bin/python bench/input_pipeline.py --dataset imagenet2012 --data-dir /data/tfds
        # on the machine holding the prepared data, where JPEG decoding is what matters
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import images_per_second, machine  # noqa: E402  (before TensorFlow)

import tensorflow as tf  # noqa: E402

import models  # noqa: E402
from harness import datasets  # noqa: E402
from harness.protocols import get_protocol  # noqa: E402
from harness.rundir import write_json  # noqa: E402
from larq_noisy import MAPPERS, to_mapped  # noqa: E402


def pipeline_throughput(args, batch_size: int) -> float:
    """Images/s of iterating the training split, after `--warmup` batches."""
    dataset, _ = datasets.load(args.dataset, "train", batch_size, data_dir=args.data_dir)
    iterator = iter(dataset.repeat())
    for _ in range(args.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(iterator)
    return args.steps * batch_size / (time.perf_counter() - start)


def model_throughput(args, batch_size: int, mapper: str | None) -> float:
    """Training images/s of the default model on one in-memory batch."""
    spec = datasets.get_spec(args.dataset)
    tf.keras.utils.set_random_seed(0)
    model = models.build(get_protocol(args.dataset).model, spec.image_shape, spec.num_classes)
    if mapper:
        model = to_mapped(model, mapper=mapper)
    model.compile(tf.keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    dataset, _ = datasets.load(args.dataset, "train", batch_size, data_dir=args.data_dir)
    data = tf.data.Dataset.from_tensors(next(iter(dataset))).repeat()
    return images_per_second(model, data, batch_size, args.warmup, args.steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", choices=sorted(datasets.DATASETS))
    p.add_argument("--data-dir")
    p.add_argument("--batch-size", type=int, help="default: the dataset's protocol")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", help="also write the figures to this file")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    batch_size = args.batch_size or get_protocol(args.dataset).batch_size
    pipeline = pipeline_throughput(args, batch_size)
    kinds = {kind: model_throughput(args, batch_size, None if kind == "sign" else kind)
             for kind in ("sign", *MAPPERS)}
    report = {"machine": machine(), "dataset": args.dataset, "model": kinds,
              "batch_size": batch_size, "pipeline": pipeline}
    print(f"{args.dataset}, batch {batch_size} ({report['machine']}), images/s:")
    print(f"  {'input pipeline alone':<34}{pipeline:>10,.0f}")
    model = get_protocol(args.dataset).model
    for kind, throughput in kinds.items():
        label = f"{model} training, {kind}" + (" mapper" if kind != "sign" else "")
        print(f"  {label:<34}{throughput:>10,.0f}")
    print(f"  {'pipeline / fastest model':<34}{pipeline / max(kinds.values()):>10.1f}x")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
