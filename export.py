"""Convert a trained BNN to a verified Larq Compute Engine flatbuffer (.tflite).

    python export.py runs/fashion_mnist --arm lns      # an arm of a train.py run
    python export.py model.h5 --out model.tflite --dataset fashion_mnist
    python export.py runs/fashion_mnist --benchmark --threads 2

Bakes the mapper away, converts with LCE, and refuses (exit 1, nothing written) a
.tflite whose binarized convs are not LceBconv2d ops or that reproduces Keras, to float32
rounding, on fewer test images than --min-exact (docs/METHOD.md section 7):
larq_noisy/export.py (a model), harness/exporting.py (an arm of a run).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the converter's C++ info logs

from harness import errors  # noqa: E402
from harness.exporting import DEFAULT_VERIFY_IMAGES, export_arm, export_file  # noqa: E402
from harness.rundir import RunDir  # noqa: E402
from larq_noisy.export import DEFAULT_MIN_EXACT, DEFAULT_THREADS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="a train.py run directory, or a .h5 / SavedModel")
    p.add_argument("--out", help="the .tflite to write (default: next to the model)")
    p.add_argument("--arm", default="lns", help="the arm of a run directory (default: lns)")
    p.add_argument("--verify", type=int, default=DEFAULT_VERIFY_IMAGES,
                   help="test images to check LCE against Keras on (0: skip; default "
                   "%(default)s)")
    p.add_argument("--dataset", help="test data for a model file (default: the run's, "
                   "or random inputs)")
    p.add_argument("--data-dir", help="tfds data dir for --dataset")
    p.add_argument("--min-exact", type=int, default=DEFAULT_MIN_EXACT,
                   help="fewest test images on which LCE must reproduce Keras to float32 "
                   "rounding (0: report only; default %(default)s)")
    p.add_argument("--benchmark", action="store_true",
                   help="time the binary and the float model with LCE's interpreter")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="interpreter threads (default %(default)s)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    """0 on success, 1 if a check failed (nothing written), 2 on bad input."""
    args = parse_args(argv)
    return errors.run_script("export.py", lambda: export_source(args))


def export_source(args) -> dict:
    """Export `args.source`: an arm of a train.py run, or a saved Keras model."""
    source = args.source
    options = dict(verify=args.verify, dataset=args.dataset, data_dir=args.data_dir,
                   threads=args.threads, benchmark=args.benchmark, min_exact=args.min_exact)
    if not os.path.exists(source):
        raise FileNotFoundError(
            f"Source {source!r} does not exist (give a train.py run directory or a model file).")
    if RunDir(source).is_run():
        return export_arm(source, args.arm, args.out, **options)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "saved_model.pb")):
        raise ValueError(f"Source {source!r} is a directory but neither a train.py run "
                         "(config.json, arms/) nor a SavedModel (saved_model.pb).")
    out_path = args.out or os.path.splitext(source.rstrip(os.sep))[0] + ".tflite"
    return export_file(source, out_path, **options)


if __name__ == "__main__":
    sys.exit(main())
