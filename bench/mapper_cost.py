"""What a mapper costs, for every mapper kind (`larq_noisy.MAPPERS`) and `sign` (the
kernels as the model builds them); docs/RESULTS.md section 2.1 gives the method and the
figures:

1. training-step time as a ratio to `sign`'s, per shape set (`SHAPES`): each kind in a
   process of its own, its peak RSS alone, then `--steps` rounds alternating with `sign`;
   the median ratio over rounds, in wall-clock and CPU time;
2. the multiply-adds of a training step at ResNet-18's ImageNet shapes and batch 256;
3. the mapper parameters at ResNet-18's shapes and their memory with Adam.

    .venv/bin/python bench/mapper_cost.py --aux-to-latent --json docs/data/mapper_cost.json

Finished measurements are kept in `<json>.partial`: the same command resumes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import last_json_line, machine  # noqa: E402  (before TensorFlow)
from harness.rundir import read_json, write_json  # noqa: E402
from larq_noisy.mappers import MAPPERS  # noqa: E402
from larq_noisy.quantizers import DEFAULTS  # noqa: E402

KINDS = ("sign", *MAPPERS)  # "sign": the kernels as the model builds them
SHAPES = {
    "cifar": dict(model="resnet20", image_size=32, classes=10, batch_size=128, steps=20, warmup=5),
    "imagenet": dict(model="birealnet18", image_size=224, classes=1000, batch_size=8, steps=4,
                     warmup=2),
}
# ResNet-18's binarized 3x3 convs on ImageNet: (c_in, c_out, how many).
RESNET18_CONVS = [(64, 64, 4), (64, 128, 1), (128, 128, 3), (128, 256, 1), (256, 256, 3),
                  (256, 512, 1), (512, 512, 3)]
#: A training step as forward passes: the forward, and the gradients with respect to
#: the inputs and to the weights (each a product the size of the forward one).
TRAINING_PASSES = 3
IMAGENET_BATCH = 256  # the paper's
AUX_TO_LATENT = DEFAULTS["aux_to_latent"]


def network_multiply_adds(model) -> int:
    """Forward multiply-adds of one image through a functional Keras model."""
    import tensorflow as tf

    from larq_noisy.mappers import multiply_adds

    total = 0
    for layer in model.layers:
        shape = layer.input_shape
        if isinstance(layer, tf.keras.layers.InputLayer) or isinstance(shape, list):
            continue  # inputs and merges (Add, Concatenate): no products
        total += multiply_adds(layer, (1, *shape[1:]))
    return total


@functools.lru_cache(maxsize=None)
def resnet18_network_multiply_adds() -> int:
    """ResNet-18 (Bi-Real Net 18) at 224x224x3, forward, per image."""
    import models

    return network_multiply_adds(models.build("birealnet18", (224, 224, 3), 1000))


def resnet18_mapper_cost(kind: str, aux_to_latent: bool = AUX_TO_LATENT) -> dict:
    """`kind`'s mappers over ResNet-18's 16 binarized layers: parameters and the
    multiply-adds of a training step, also as a fraction of the network's at the paper's
    batch. `train` is one mapper pass's; `train_all_passes` all `mapper_passes` (an upper
    bound: the auxiliary loss's own pass needs no gradient with respect to W)."""
    from larq_noisy import NoisyMappedQuantizer
    from larq_noisy.mappers import multiply_adds

    params = forward = 0
    passes = 1
    for c_in, c_out, count in RESNET18_CONVS:
        quantizer = NoisyMappedQuantizer(mapper=kind, aux_to_latent=aux_to_latent)
        quantizer.build((3, 3, c_in, c_out))
        params += count * quantizer.count_params()
        forward += count * multiply_adds(quantizer.mapper, (c_out, 3, 3, c_in))
        passes = 1 if quantizer.aux_to_latent or quantizer.alpha == 0 else 2
    network = TRAINING_PASSES * IMAGENET_BATCH * resnet18_network_multiply_adds()
    train = TRAINING_PASSES * forward  # once per step, whatever the batch
    return {"params": params, "forward": forward, "train": train, "network_train": network,
            "train_fraction": train / network, "adam_mib": 12 * params / 2**20,
            "aux_to_latent": aux_to_latent, "mapper_passes": passes,
            "train_all_passes": passes * train}


def measure_pair(kind: str, shape: dict, jit: bool, aux_to_latent: bool = AUX_TO_LATENT) -> dict:
    """In this process: `kind`'s peak RSS alone, then its steps alternated with sign's."""
    import numpy as np
    import tensorflow as tf

    import models
    from larq_noisy import to_mapped

    def compiled(kind):
        model = models.build(shape["model"], (size, size, 3), shape["classes"])
        if kind != "sign":
            model = to_mapped(model, mapper=kind, aux_to_latent=aux_to_latent)
        model.compile(tf.keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy",
                      jit_compile=jit)
        for _ in range(shape["warmup"]):
            model.train_on_batch(x, y)
        return model

    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    size, batch = shape["image_size"], shape["batch_size"]
    x = tf.constant(rng.normal(size=(batch, size, size, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, shape["classes"], batch))
    model = compiled(kind)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sign = compiled("sign")
    times = {"kind": ([], []), "sign": ([], [])}  # (wall, cpu) per round
    for round_ in range(shape["steps"]):
        pair = (("kind", model), ("sign", sign))
        for name, m in pair if round_ % 2 else pair[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            m.train_on_batch(x, y)
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    (kind_wall, kind_cpu), (sign_wall, sign_cpu) = (np.array(t) for t in times.values())
    return {
        "ms_per_step": 1000 * float(np.median(kind_wall)),
        "sign_ms_per_step": 1000 * float(np.median(sign_wall)),
        "ratio_to_sign": float(np.median(kind_wall / sign_wall)),
        "cpu_ratio_to_sign": float(np.median(kind_cpu / sign_cpu)),
        "rounds": shape["steps"],
        "peak_rss_mib": peak_rss_mib,
        "params": int(model.count_params()),
        "aux_to_latent": aux_to_latent,
    }


def _shape(shape_name: str, args) -> dict:
    shape = dict(SHAPES[shape_name])
    shape.update({k: v for k, v in (("batch_size", args.batch_size), ("steps", args.steps)) if v})
    return shape


def _measure_in_subprocess(kind: str, shape_name: str, args) -> dict:
    """`measure_pair` of `kind` in a process of its own (`--one`)."""
    shape = _shape(shape_name, args)
    command = [sys.executable, os.path.abspath(__file__), "--one", kind, "--shapes", shape_name,
               "--steps", str(shape["steps"]), "--batch-size", str(shape["batch_size"]),
               *(["--jit"] if args.jit else []),
               "--aux-to-latent" if args.aux_to_latent else "--no-aux-to-latent"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return last_json_line(out)


def step_ratios(shape_name: str, args, progress: dict, partial: str | None) -> dict:
    """Part 1 for one shape set: each kind's `measure_pair`, unless `progress` (kept in
    the file `partial`) holds it."""
    shape = _shape(shape_name, args)
    print(f"\nTraining step, {shape['model']} at {shape['image_size']}x{shape['image_size']}x3, "
          f"{shape['classes']} classes, batch {shape['batch_size']} (Adam; one process per kind, "
          f"{shape['steps']} rounds alternating with sign; aux_to_latent={args.aux_to_latent}):",
          flush=True)
    print(f"{'kernels':<11}{'ms/step':>10}{'sign ms':>9}{'x sign':>8}{'x sign CPU':>11}"
          f"{'params':>13}{'peak RSS MiB':>14}")
    results = {}
    for kind in args.kinds:
        key = (f"{shape_name}/{kind}/batch{shape['batch_size']}/steps{shape['steps']}/jit{args.jit}"
               f"/aux_to_latent{args.aux_to_latent}")
        if key not in progress:
            progress[key] = _measure_in_subprocess(kind, shape_name, args)
            if partial:
                write_json(partial, progress)
        r = results[kind] = progress[key]
        print(f"{kind:<11}{r['ms_per_step']:>10.1f}{r['sign_ms_per_step']:>9.1f}"
              f"{r['ratio_to_sign']:>8.2f}{r['cpu_ratio_to_sign']:>11.2f}{r['params']:>13,}"
              f"{r['peak_rss_mib']:>14.0f}", flush=True)
    return {"shape": shape, "aux_to_latent": args.aux_to_latent, "kinds": results}


def imagenet_counts(kinds, aux_to_latent: bool = AUX_TO_LATENT) -> dict:
    """Parts 2 and 3: `resnet18_mapper_cost` of each mapped kind, printed as a table."""
    print(f"\nMappers at ResNet-18's ImageNet shapes (16 binarized 3x3 layers), counted; "
          f"a training step = {TRAINING_PASSES} forward passes, the network's at batch "
          f"{IMAGENET_BATCH}:")
    print(f"{'kind':<11}{'params':>13}{'MiB w/ Adam':>13}{'forward MAC':>14}{'step MAC':>12}"
          f"{'% of network':>14}")
    report = {}
    for kind in (k for k in kinds if k != "sign"):
        c = report[kind] = resnet18_mapper_cost(kind, aux_to_latent=aux_to_latent)
        print(f"{kind:<11}{c['params']:>13,}{c['adam_mib']:>13,.0f}{c['forward'] / 1e9:>13.2f}G"
              f"{c['train'] / 1e9:>11.1f}G{100 * c['train_fraction']:>13.2f}%")
    network = resnet18_network_multiply_adds()
    print(f"(the network: {network / 1e9:.2f} G multiply-adds forward per image, "
          f"{TRAINING_PASSES * IMAGENET_BATCH * network / 1e12:.2f} T per training step at "
          f"batch {IMAGENET_BATCH})", flush=True)
    if any(c["mapper_passes"] == 2 for c in report.values()):
        print(f"(one mapper pass; with aux_to_latent={aux_to_latent} the auxiliary loss takes a "
              f"second pass, at most as much again: train_all_passes in the JSON)")
    report["network_forward_per_image"] = network
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--batch-size", type=int, help="default: the shape set's")
    p.add_argument("--steps", type=int, help="timed rounds (default: the shape set's)")
    p.add_argument("--jit", action="store_true")
    p.add_argument("--aux-to-latent", action=argparse.BooleanOptionalAction, default=AUX_TO_LATENT,
                   help="the mapped kinds' aux_to_latent: the auxiliary loss from the forward "
                   "output's mapper pass (the paper's) or, with --no-aux-to-latent, from a "
                   "second pass on stop_gradient(W) (default: the quantizer's, %(default)s)")
    p.add_argument("--json", help="write the figures to this file (and resume from <json>.partial)")
    p.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # a single measurement
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_pair(args.one, _shape(args.shapes[0], args), args.jit,
                                      args.aux_to_latent)))
        return
    partial = f"{args.json}.partial" if args.json else None
    progress = {}
    if partial and os.path.exists(partial):
        progress = read_json(partial, "delete it (its measurements are then redone)")
        print(f"Resuming: {len(progress)} measurements from {partial}")
    report = {"machine": machine(), "aux_to_latent": args.aux_to_latent, "steps": {}}
    print(report["machine"], f"aux_to_latent={args.aux_to_latent}")
    for shape_name in args.shapes:
        report["steps"][shape_name] = step_ratios(shape_name, args, progress, partial)
    report["resnet18_imagenet"] = imagenet_counts(args.kinds, args.aux_to_latent)
    if args.json:
        write_json(args.json, report)
        if os.path.exists(partial):
            os.remove(partial)


if __name__ == "__main__":
    main()
