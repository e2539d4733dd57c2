"""Deployment: binary against float TFLite, size and latency, per model (docs/RESULTS.md
section 3). Each model, with LNS mappers, goes through `larq_noisy.export.export_model`,
which also converts its float twin; untrained models stand in (sizes and op counts do not
depend on the weights), and `--run` adds the lns arm of a train.py run, verified on its
test images. Latency: batch-1 medians through LCE's Python interpreter here (on x86, LCE's
binary kernels fall back to portable code: measure the device with `lce_benchmark_model`).

    .venv/bin/python bench/deployment.py --run bench_runs/accuracy/seed0/lns --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench.common  # noqa: E402, F401  (before TensorFlow)

import tensorflow as tf  # noqa: E402

import models  # noqa: E402
from harness import datasets  # noqa: E402
from harness.exporting import export_arm  # noqa: E402
from harness.rundir import RunDir, write_json  # noqa: E402
from larq_noisy import export, to_mapped  # noqa: E402

#: Each model at the shapes of the dataset it is trained on.
MODELS = {"bnn_small": "fashion_mnist", "resnet20": "cifar10", "birealnet18": "imagenet2012"}


def export_untrained(name: str, threads: int, out_dir: str) -> dict:
    spec = datasets.get_spec(MODELS[name])
    tf.keras.utils.set_random_seed(0)
    model = to_mapped(models.build(name, spec.image_shape, spec.num_classes))
    # Untrained stand-ins: report the agreement, don't enforce it (an untrained BatchNorm
    # can pass integer sums of exactly 0 on to a sign, which LCE may binarize to -1).
    return export.export_model(model, os.path.join(out_dir, f"{name}.tflite"), verify_images=16,
                               min_exact=0, threads=threads, benchmark=True,
                               verbose=False)


def row(label: str, threads: int, r: dict) -> str:
    b, agreement = r["benchmark"], r["agreement"]
    return (f"| {label} | {r['ops'].get(export.BINARY_CONV_OP, 0)}/{r['binarized_convs']} | "
            f"{r['bytes'] / 1024:,.1f} | {r['float_bytes'] / 1024:,.1f} | {r['size_ratio']:.1f}x | "
            f"{threads} | {b['binary']['median_ms']:.2f} | {b['float']['median_ms']:.2f} | "
            f"{b['float']['median_ms'] / b['binary']['median_ms']:.2f}x | "
            f"{100 * agreement['top1_agreement']:.1f}% of {agreement['images']} "
            f"(max abs diff {agreement['max_abs_diff']:.2g}) |")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--run", help="also export this train.py run's lns arm (real test images)")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--json", help="also write the reports to this file")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.run and "lns" not in RunDir(args.run).trained_arms():
        p.error(f"--run {args.run!r} has no finished lns arm (arms/lns/model.h5)")

    out_dir = tempfile.mkdtemp(prefix="deployment-")
    reports, lines = {}, [
        f"{platform.machine()}, {os.cpu_count()} CPU cores, LCE interpreter, batch 1, median of "
        f"{export.BENCHMARK_RUNS} runs",
        "",
        "| model | LceBconv2d / binarized convs | binary KiB | float KiB | smaller | threads "
        "| binary ms | float ms | speed-up | top-1 agreement with Keras |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for threads in args.threads:
        for name in args.models:
            report = reports[f"{name}/{threads}"] = export_untrained(name, threads, out_dir)
            lines.append(row(f"{name} (untrained)", threads, report))
            print(lines[-1], flush=True)
        if args.run:
            report = reports[f"run/{threads}"] = export_arm(
                args.run, "lns", os.path.join(out_dir, "run.tflite"), threads=threads,
                benchmark=True, verbose=False)
            lines.append(row(f"{report['model']} (trained, `{args.run}`)", threads, report))
            print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.json:
        write_json(args.json, reports)


if __name__ == "__main__":
    main()
