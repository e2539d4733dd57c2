"""Training throughput of 1 worker against 2 workers (MultiWorkerMirroredStrategy): each
a process on 127.0.0.1 training bnn_small on random data at the same *global* batch (2
workers take half of it each); the job's images/s after warm-up, and the ratio. On one
machine the workers share its cores, so this measures the collectives' cost more than any
speed-up; on separate machines each worker brings its own.

    .venv/bin/python bench/multi_worker.py --steps 60 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import images_per_second, last_json_line  # noqa: E402  (before TensorFlow)


def worker(args) -> None:
    """One worker (TF_CONFIG says which): print its images/s as JSON."""
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TensorFlow work
    import models
    from harness.datasets import get_spec

    spec = get_spec("fashion_mnist")
    with strategy.scope():
        model = models.build("bnn_small", spec.image_shape, spec.num_classes)
        model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, *spec.image_shape)).astype("float32")
    y = rng.integers(0, spec.num_classes, args.batch_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = tf.data.Dataset.from_tensors((x, y)).repeat().with_options(options)
    rate = images_per_second(model, data, args.batch_size, args.warmup, args.steps)
    print(json.dumps({"images_per_s": rate}), flush=True)


def run_job(n_workers: int, args) -> float:
    """Images/s of a job of `n_workers` worker processes on 127.0.0.1."""
    ports = []
    for _ in range(n_workers):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(n_workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # The job is as fast as its slowest worker.
    return min(last_json_line(output)["images_per_s"] for output in outputs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    one = run_job(1, args)
    two = run_job(2, args)
    print(f"global batch {args.batch_size}, {args.steps} timed steps, {os.cpu_count()} CPU cores")
    print(f"1 worker : {one:8.0f} images/s")
    print(f"2 workers: {two:8.0f} images/s  (ratio 2/1 = {two / one:.2f})")


if __name__ == "__main__":
    main()
