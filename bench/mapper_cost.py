"""What a mapper costs: training-step time per mapper kind, and mapper sizes.

1. The training-step time of a CIFAR-shaped ResNet-20 BNN (32x32x3, 10 classes) at
   batch 128 with each mapper kind, as a ratio to the same network with `ste_sign`
   kernels, all measured in this one process (same machine state).
2. The mapper parameter count per binarized layer for ResNet-18's ImageNet shapes.

    .venv/bin/python bench/mapper_cost.py               # ~3 min on 2 CPU cores
    .venv/bin/python bench/mapper_cost.py --json out.json

Step times are medians over `--steps` timed steps after `--warmup` untimed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import models  # noqa: E402
from larq_noisy import MAPPERS, NoisyMappedQuantizer, to_mapped  # noqa: E402

# ResNet-18's binarized 3x3 convs on ImageNet: (c_in, c_out, how many).
RESNET18_CONVS = [(64, 64, 4), (64, 128, 1), (128, 128, 3), (128, 256, 1), (256, 256, 3),
                  (256, 512, 1), (512, 512, 3)]


class _StepTimer(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def step_time(kind: str, args) -> float:
    tf.keras.utils.set_random_seed(0)
    model = models.build(args.model, (args.image_size, args.image_size, 3), 10)
    if kind != "sign":
        model = to_mapped(model, mapper=kind)
    model.compile(tf.keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy",
                  jit_compile=args.jit)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    data = tf.data.Dataset.from_tensors((x, y)).repeat(args.warmup + args.steps)
    timer = _StepTimer()
    model.fit(data, epochs=1, verbose=0, callbacks=[timer])
    return float(np.median(timer.times[args.warmup:]))


def mapper_params(kind: str, c_in: int, c_out: int) -> int:
    quantizer = NoisyMappedQuantizer(mapper=kind)
    quantizer.build((3, 3, c_in, c_out))
    return quantizer.count_params()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=sorted(models.MODELS))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--jit", action="store_true")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()

    report = {"machine": f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}",
              "model": args.model, "batch_size": args.batch_size, "steps": {}, "resnet18": {}}
    print(f"Training step, {args.model} at {args.image_size}x{args.image_size}, batch "
          f"{args.batch_size} ({report['machine']}):")
    print(f"{'kernels':<10}{'ms/step':>10}{'x sign':>9}")
    # Sign first and last: the base is their mean, and their gap shows the drift of the
    # machine over the run (warm-up, other load), against which to read the ratios.
    seconds = {kind: step_time(kind, args) for kind in ["sign", *MAPPERS]}
    sign_last = step_time("sign", args)
    sign = (seconds["sign"] + sign_last) / 2
    report["sign_first_last_ms"] = [1000 * seconds["sign"], 1000 * sign_last]
    for kind, t in seconds.items():
        report["steps"][kind] = {"ms_per_step": 1000 * t, "ratio_to_sign": t / sign}
        print(f"{kind:<10}{1000 * t:>10.1f}{t / sign:>9.2f}")
    print(f"(sign measured first and last: {1000 * seconds['sign']:.1f} and "
          f"{1000 * sign_last:.1f} ms; ratios are to their mean)", flush=True)

    print("\nMapper parameters per binarized layer, ResNet-18 ImageNet shapes (3x3 kernels):")
    print(f"{'c_in->c_out':<14}{'layers':>7}" + "".join(f"{k:>12}" for k in MAPPERS))
    totals = dict.fromkeys(MAPPERS, 0)
    for c_in, c_out, count in RESNET18_CONVS:
        counts = {k: mapper_params(k, c_in, c_out) for k in MAPPERS}
        for k in MAPPERS:
            totals[k] += count * counts[k]
        report["resnet18"][f"{c_in}->{c_out}"] = {"layers": count, **counts}
        print(f"{f'{c_in}->{c_out}':<14}{count:>7}" + "".join(f"{counts[k]:>12,}" for k in MAPPERS))
    report["resnet18"]["total"] = totals
    print(f"{'total':<14}{16:>7}" + "".join(f"{totals[k]:>12,}" for k in MAPPERS))
    print(f"(ResNet-18's binary kernels themselves: "
          f"{sum(9 * a * b * n for a, b, n in RESNET18_CONVS):,} weights)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
