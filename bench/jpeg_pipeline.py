"""Is the ImageNet preprocessing as fast as larq-zoo's? JPEG bytes through train.py's
transforms (`harness.datasets`) against larq-zoo's `preprocess_image_bytes`, in one
process: the same JPEGs held in memory, the same batch size, the same tf.data pipeline
(map with AUTOTUNE parallel calls, batch, prefetch AUTOTUNE); repeats interleaved,
images/s per core as medians, by the wall clock and by this process's CPU time (steady
where other jobs share the cores), ours over larq-zoo's as the median of paired ratios
(docs/RESULTS.md section 2.2).

Evaluation is larq-zoo's center crop itself, so its ratio is the noise floor. Training
computes larq-zoo's images bit for bit given the same random draws (tests/test_datasets.py);
its crop and flip are drawn by the stateless twins of larq-zoo's ops, seeded per example
(the crop windows each draws are compared here too).

    .venv/bin/python bench/jpeg_pipeline.py --json docs/data/input_pipeline_jpeg.json
        # 256 generated JPEGs of ImageNet's sizes (~410x380, ~110 KB)
    .venv/bin/python bench/jpeg_pipeline.py --data-dir /data/tfds   # real ImageNet JPEGs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import machine  # noqa: E402  (before TensorFlow)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from larq_zoo.training import data as zoo_data  # noqa: E402

from harness import datasets  # noqa: E402
from harness.protocols import get_protocol  # noqa: E402
from harness.rundir import write_json  # noqa: E402

#: (height, width) of the generated JPEGs: ImageNet's commonest sizes and two smaller.
SHAPES = ((375, 500), (500, 375), (333, 500), (500, 333), (250, 333), (300, 400))


def generated_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """`n` photo-like JPEGs of `SHAPES`: smooth colour fields with noise, quality 90,
    ~0.7 bytes per pixel as ImageNet's (~110 KB)."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for i in range(n):
        h, w = SHAPES[i % len(SHAPES)]
        coarse = rng.uniform(0, 255, (1, h // 16 + 1, w // 16 + 1, 3))
        image = tf.image.resize(coarse, (h, w), "bicubic")[0] + rng.normal(0, 36, (h, w, 3))
        jpegs.append(tf.io.encode_jpeg(tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8),
                                       quality=90).numpy())
    return jpegs


def real_jpegs(name: str, data_dir: str, n: int) -> list[bytes]:
    """The first `n` JPEGs of the prepared dataset's test split, as train.py reads them."""
    spec = datasets.get_spec(name)
    test = datasets._ranges(spec, data_dir, None, None)["test"]
    examples, _ = datasets._read_examples(spec, test, data_dir, 0, False)
    return [jpeg.numpy() for jpeg, _ in examples.take(n)]


def transforms(name: str, size: int) -> dict:
    """`{(split, implementation): map function}`; the training ones take
    `(index, (jpeg, label))`, as `datasets.load` maps them."""
    spec = datasets.get_spec(name)

    def zoo(training):
        def transform(jpeg, label):
            return zoo_data.preprocess_image_bytes(jpeg, is_training=training, image_size=size), label
        return (lambda index, example: transform(*example)) if training else transform

    return {("train", "ours"): datasets._train_example(spec, datasets.epoch_key(0, 0), size),
            ("train", "larq_zoo"): zoo(True),
            ("eval", "ours"): datasets._eval_example(spec, size),
            ("eval", "larq_zoo"): zoo(False)}


def throughput(source, split: str, transform, args) -> tuple[float, float]:
    """`(images/s, images per CPU-second)` of `source` mapped by `transform`, batched and
    prefetched, after `--warmup` batches. The CPU time is this process's, all threads:
    what the images cost, whatever else runs on the machine."""
    data = source.repeat()
    if split == "train":
        data = data.enumerate()
    data = data.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    iterator = iter(data.batch(args.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    for _ in range(args.warmup):
        next(iterator)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(iterator)
    images = args.batches * args.batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def crop_windows(jpegs: list[bytes], draws: int) -> dict:
    """The training crops each implementation draws, `draws` per JPEG shape: mean area
    and aspect (width / height) as fractions of the image, and how often no crop is
    accepted (larq-zoo's fallback to the center crop). Ours: the stateless op with
    the seeds `load` gives; larq-zoo's: the stateful op; both with larq-zoo's options."""
    box, options = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), datasets._IMAGENET_CROP
    shapes = {tuple(tf.image.extract_jpeg_shape(jpeg).numpy()) for jpeg in jpegs}
    sizes = {"ours": [], "larq_zoo": []}
    for shape in shapes:
        for index in range(draws):
            seed = tf.random.experimental.stateless_split(
                tf.stack([datasets.epoch_key(0, 0), tf.constant(index, tf.int64)]), 2)[0]
            ours = tf.image.stateless_sample_distorted_bounding_box(shape, box, seed, **options)
            zoo = tf.image.sample_distorted_bounding_box(shape, box, **options)
            for name, (_, size, _) in (("ours", ours), ("larq_zoo", zoo)):
                sizes[name].append((*size.numpy()[:2], *shape[:2]))

    def summary(rows):
        rows = np.array(rows, dtype=np.float64)
        h, w, full_h, full_w = rows.T
        return {"mean_area": float(np.mean(h * w / (full_h * full_w))),
                "mean_aspect": float(np.mean(w / h)),
                "fallback_rate": float(np.mean((h == full_h) & (w == full_w)))}

    return {name: summary(rows) for name, rows in sizes.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="imagenet2012", choices=[
        name for name, spec in datasets.DATASETS.items() if spec.jpeg])
    p.add_argument("--data-dir", help="read the dataset's JPEGs from this tfds data dir "
                   "(default: generate them)")
    p.add_argument("--images", type=int, default=256, help="distinct JPEGs, cycled")
    p.add_argument("--batch-size", type=int, help="default: the dataset's protocol")
    p.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--crop-draws", type=int, default=500, help="crops drawn per JPEG shape")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def main():
    args = build_parser().parse_args()
    args.batch_size = args.batch_size or get_protocol(args.dataset).batch_size
    size = datasets.get_spec(args.dataset).image_shape[0]
    cores = len(os.sched_getaffinity(0))

    jpegs = (real_jpegs(args.dataset, args.data_dir, args.images) if args.data_dir
             else generated_jpegs(args.images))
    shapes = np.array([tf.image.extract_jpeg_shape(jpeg).numpy()[:2] for jpeg in jpegs])
    source = tf.data.Dataset.from_tensor_slices(
        (jpegs, np.arange(len(jpegs), dtype=np.int64) % datasets.get_spec(args.dataset).num_classes))
    load_before = os.getloadavg()
    functions = transforms(args.dataset, size)
    rates = {key: [] for key in functions}  # (images/s, images per CPU-second) per repeat
    for repeat in range(args.repeats):
        # Interleaved, the order reversed every other repeat: the machine's load drifts.
        for key in list(rates) if repeat % 2 == 0 else list(reversed(rates)):
            rates[key].append(throughput(source, key[0], functions[key], args))
    load_after = os.getloadavg()

    def figures(clock: int) -> dict:
        """Medians per core and paired ratios (ours over larq-zoo's, each repeat's two
        measurements of a split adjacent in time) of one clock (0: wall, 1: CPU)."""
        per_core = cores if clock == 0 else 1
        return {
            "per_repeat": {f"{split}/{who}": [r[clock] for r in values]
                           for (split, who), values in rates.items()},
            "median_per_core": {f"{split}/{who}": statistics.median(r[clock] for r in values)
                                / per_core for (split, who), values in rates.items()},
            "ratio_ours_to_larq_zoo": {split: statistics.median(
                ours[clock] / zoo[clock]
                for ours, zoo in zip(rates[split, "ours"], rates[split, "larq_zoo"]))
                for split in ("train", "eval")},
        }

    report = {
        "machine": machine(), "cores": cores, "load_average_before": load_before,
        "load_average_after": load_after, "dataset": args.dataset,
        "jpegs": {"source": args.data_dir or "generated", "count": len(jpegs),
                  "mean_kb": float(np.mean([len(j) for j in jpegs]) / 1000),
                  "mean_height": float(shapes[:, 0].mean()), "mean_width": float(shapes[:, 1].mean())},
        "batch_size": args.batch_size, "image_size": size, "timed_batches": args.batches,
        "repeats": args.repeats,
        "images_per_s": figures(0),  # wall clock: per core = over `cores`
        "images_per_cpu_s": figures(1),  # CPU time: per core already
        "crop_windows": crop_windows(jpegs, args.crop_draws),
    }
    jpeg_info = report["jpegs"]
    print(f"{jpeg_info['count']} JPEGs ({jpeg_info['source']}, mean {jpeg_info['mean_kb']:.0f} KB, "
          f"{jpeg_info['mean_width']:.0f}x{jpeg_info['mean_height']:.0f}), batch {args.batch_size}, "
          f"{size}x{size}, {cores} cores, load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"  images/s per core, medians of {args.repeats} (ratio: of the paired ratios)")
    print(f"  {'':<10}{'wall: ours':>12}{'larq-zoo':>10}{'ratio':>7}{'CPU: ours':>12}{'larq-zoo':>10}"
          f"{'ratio':>7}")
    for split in ("train", "eval"):
        cells = [(report[clock]["median_per_core"][f"{split}/ours"],
                  report[clock]["median_per_core"][f"{split}/larq_zoo"],
                  report[clock]["ratio_ours_to_larq_zoo"][split])
                 for clock in ("images_per_s", "images_per_cpu_s")]
        print(f"  {split:<10}" + "".join(f"{ours:>12.0f}{zoo:>10.0f}{ratio:>7.2f}"
                                         for ours, zoo, ratio in cells))
    for name, stats in report["crop_windows"].items():
        print(f"  crops {name:<10} area {stats['mean_area']:.3f}  aspect {stats['mean_aspect']:.3f}"
              f"  fallback {stats['fallback_rate']:.3f}")
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
