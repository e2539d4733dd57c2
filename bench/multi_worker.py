"""Training throughput of 1 worker against 2 workers (MultiWorkerMirroredStrategy).

Each worker is a process on this machine (127.0.0.1) training the offline default
model (bnn_small, 28x28x1) on random data at the same *global* batch, so 2 workers each
take half of it. Reported: images/s of the whole job after warm-up, and the ratio.

    .venv/bin/python bench/multi_worker.py              # ~2 min on 2 CPU cores
    .venv/bin/python bench/multi_worker.py --steps 60 --batch-size 256

On one machine the workers share its cores (and each TensorFlow process would use all
of them), so this measures the cost of the collectives more than any speed-up; on
separate machines each worker brings its own cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> None:
    """One worker: time `--steps` steps after `--warmup`, print images/s as JSON."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import models
    from harness.datasets import get_spec

    spec = get_spec("fashion_mnist")
    with strategy.scope():
        model = models.build("bnn_small", spec.image_shape, spec.num_classes)
        model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, *spec.image_shape)).astype("float32")
    y = rng.integers(0, spec.num_classes, args.batch_size)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = data.with_options(options)
    model.fit(data, steps_per_epoch=args.warmup, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_s": args.steps * args.batch_size / seconds}), flush=True)


def run_job(n_workers: int, args) -> float:
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
    rates = [json.loads(o.strip().splitlines()[-1])["images_per_s"] for o in outputs]
    return min(rates)  # the job is as fast as its slowest worker


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    one = run_job(1, args)
    two = run_job(2, args)
    print(f"global batch {args.batch_size}, {args.steps} timed steps, {os.cpu_count()} CPU cores")
    print(f"1 worker : {one:8.0f} images/s")
    print(f"2 workers: {two:8.0f} images/s  (ratio 2/1 = {two / one:.2f})")


if __name__ == "__main__":
    main()
