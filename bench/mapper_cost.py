"""What a mapper costs: training-step time and memory per mapper kind, and mapper sizes.

1. Training-step time of a BNN whose binarized kernels go through each mapper kind, as
   a ratio to the same network with plain sign kernels, for two shape sets:
   - `cifar`: ResNet-20 on 32x32x3, 10 classes, batch 128 (the paper's CIFAR-10 setup);
   - `imagenet`: Bi-Real Net 18 (ResNet-18 shapes) on 224x224x3, 1000 classes, a small
     batch (8 by default: a CPU cannot hold the paper's 256 in reasonable time).
   Each measurement is a fresh process, so its peak resident memory (max RSS) is that
   kind's alone. `sign` is measured first and last; the ratios are to the mean of both,
   and their gap shows how much the machine drifted during the run.
2. The mapper parameter count per binarized layer for ResNet-18's ImageNet shapes, and
   what those parameters cost in memory with Adam (weights + 2 slots, float32).

    .venv/bin/python bench/mapper_cost.py                      # ~10 min on 2 CPU cores
    .venv/bin/python bench/mapper_cost.py --shapes cifar --json out.json

Step times are medians over `--steps` timed steps after `--warmup` untimed ones. The
mapper runs once per step whatever the batch, so its share shrinks as the batch grows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

KINDS = ("sign", "cnn", "mlp", "linear")  # "sign": the kernels as the model builds them
#: model, input size, classes, batch, timed steps, warm-up steps
SHAPES = {
    "cifar": dict(model="resnet20", image_size=32, classes=10, batch_size=128, steps=20, warmup=5),
    "imagenet": dict(model="birealnet18", image_size=224, classes=1000, batch_size=8, steps=4,
                     warmup=2),
}
# ResNet-18's binarized 3x3 convs on ImageNet: (c_in, c_out, how many).
RESNET18_CONVS = [(64, 64, 4), (64, 128, 1), (128, 128, 3), (128, 256, 1), (256, 256, 3),
                  (256, 512, 1), (512, 512, 3)]


def measure(kind: str, shape: dict, jit: bool) -> dict:
    """In this process: the median training-step time of `kind`, and the peak RSS."""
    import numpy as np
    import tensorflow as tf

    import models
    from larq_noisy import to_mapped

    class StepTimer(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    tf.keras.utils.set_random_seed(0)
    size = shape["image_size"]
    model = models.build(shape["model"], (size, size, 3), shape["classes"])
    if kind != "sign":
        model = to_mapped(model, mapper=kind)
    model.compile(tf.keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy",
                  jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(shape["batch_size"], size, size, 3)).astype("float32")
    y = rng.integers(0, shape["classes"], shape["batch_size"])
    data = tf.data.Dataset.from_tensors((x, y)).repeat(shape["warmup"] + shape["steps"])
    timer = StepTimer()
    model.fit(data, epochs=1, verbose=0, callbacks=[timer])
    return {
        "ms_per_step": 1000 * float(np.median(timer.times[shape["warmup"]:])),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": int(model.count_params()),
    }


def measure_in_subprocess(kind: str, shape_name: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--one", kind, "--shapes", shape_name,
               "--steps", str(args.steps or SHAPES[shape_name]["steps"])]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.jit:
        command.append("--jit")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def step_ratios(shape_name: str, args) -> dict:
    shape = {**SHAPES[shape_name], **({"batch_size": args.batch_size} if args.batch_size else {})}
    print(f"\nTraining step, {shape['model']} at {shape['image_size']}x{shape['image_size']}x3, "
          f"{shape['classes']} classes, batch {shape['batch_size']} (Adam; one process each):",
          flush=True)
    results = {kind: measure_in_subprocess(kind, shape_name, args) for kind in KINDS}
    sign_last = measure_in_subprocess("sign", shape_name, args)
    base = (results["sign"]["ms_per_step"] + sign_last["ms_per_step"]) / 2
    print(f"{'kernels':<10}{'ms/step':>10}{'x sign':>9}{'params':>14}{'peak RSS MiB':>14}")
    for kind, r in results.items():
        r["ratio_to_sign"] = r["ms_per_step"] / base
        print(f"{kind:<10}{r['ms_per_step']:>10.1f}{r['ratio_to_sign']:>9.2f}{r['params']:>14,}"
              f"{r['peak_rss_mib']:>14.0f}")
    print(f"(sign measured first and last: {results['sign']['ms_per_step']:.1f} and "
          f"{sign_last['ms_per_step']:.1f} ms; ratios are to their mean)", flush=True)
    return {"shape": shape, "kinds": results, "sign_first_last_ms":
            [results["sign"]["ms_per_step"], sign_last["ms_per_step"]]}


def mapper_sizes() -> dict:
    from larq_noisy import MAPPERS, NoisyMappedQuantizer

    def params(kind, c_in, c_out):
        quantizer = NoisyMappedQuantizer(mapper=kind)
        quantizer.build((3, 3, c_in, c_out))
        return quantizer.count_params()

    print("\nMapper parameters per binarized layer, ResNet-18 ImageNet shapes (3x3 kernels):")
    print(f"{'c_in->c_out':<14}{'layers':>7}" + "".join(f"{k:>12}" for k in MAPPERS))
    report, totals = {}, dict.fromkeys(MAPPERS, 0)
    for c_in, c_out, count in RESNET18_CONVS:
        counts = {k: params(k, c_in, c_out) for k in MAPPERS}
        for k in MAPPERS:
            totals[k] += count * counts[k]
        report[f"{c_in}->{c_out}"] = {"layers": count, **counts}
        print(f"{f'{c_in}->{c_out}':<14}{count:>7}" + "".join(f"{counts[k]:>12,}" for k in MAPPERS))
    binary = sum(9 * a * b * n for a, b, n in RESNET18_CONVS)
    report["total"] = totals
    report["binary_kernel_weights"] = binary
    print(f"{'total':<14}{16:>7}" + "".join(f"{totals[k]:>12,}" for k in MAPPERS))
    # Training memory of the parameters alone: float32 weights + Adam's two slots.
    print(f"{'MiB w/ Adam':<21}" + "".join(f"{12 * totals[k] / 2**20:>12,.0f}" for k in MAPPERS))
    print(f"(ResNet-18's binary kernels themselves: {binary:,} weights)")
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--batch-size", type=int, help="default: the shape set's")
    p.add_argument("--steps", type=int, help="timed steps (default: the shape set's)")
    p.add_argument("--jit", action="store_true")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # a single measurement
    args = p.parse_args()
    if args.one:
        shape = dict(SHAPES[args.shapes[0]])
        shape.update({k: v for k, v in (("batch_size", args.batch_size), ("steps", args.steps)) if v})
        print(json.dumps(measure(args.one, shape, args.jit)))
        return
    import tensorflow as tf

    report = {"machine": f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}", "steps": {}}
    print(report["machine"])
    for shape_name in args.shapes:
        report["steps"][shape_name] = step_ratios(shape_name, args)
    report["resnet18_mapper_params"] = mapper_sizes()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
