"""The datasets: where they come from, their splits and their preprocessing.

Every dataset fact lives here, in one `DatasetSpec` per dataset (`DATASETS`), and
`load()` turns a spec into a batched `tf.data.Dataset` of `(float32 NHWC image,
int32 label)`.

# Splits

* `"train"`: the official train split minus `validation_size` held-out examples,
  shuffled with the seed and augmented.
* `"validation"`: the held-out examples, the **last** `validation_size` examples of
  the official train split (tfds `train[-N:]`, or the last N of the IDX files). The
  same subset for every seed. tfds stores a split in a fixed, already shuffled order,
  so the slice mixes all classes; note the tfds and IDX orders differ, so the held-out
  subset of mnist/fashion_mnist depends on which of the two sources was read.
* `"test"`: the official test split (tfds `validation` for ImageNet and Imagenette,
  which publish no labelled test set).

Validation and test are deterministic: same order, eval transform only.

# Transforms

* cifar10 (32x32x3): train = zero-pad 4 + random 32x32 crop + random horizontal flip;
  both = scale to [0, 1], then per-channel mean/std of the train set.
* mnist / fashion_mnist (28x28x1): train = zero-pad 2 + random 28x28 crop (+ random
  horizontal flip for fashion_mnist; digits are not mirror-symmetric); both = scale to
  [0, 1], then mean/std of the train set.
* imagenet2012 / imagenette (224x224x3): larq-zoo's own ImageNet preprocessing
  (`larq_zoo.training.data.preprocess_image_bytes`, EfficientNet-style), so that
  larq-zoo's pretrained weights see the inputs they were trained on. Train = random
  resized crop (area 8-100%, aspect 3/4-4/3, fused with JPEG decoding) + random
  horizontal flip; eval = center crop of `size / (size + 32)` of the short side,
  resized (bicubic) to `size`; both = ImageNet mean/std in the 0-255 range. Imagenette
  uses the `320px-v2` images and the ImageNet default 224 so ImageNet architectures
  apply unchanged; pass `image_size=160` (or 128) for faster runs.

`image_size` overrides the spatial size: ImageNet-style data is cropped to it; the
fixed-size datasets are resized (bilinear) to it after augmentation.

The small-image augmentation uses stateless random ops seeded per example from
`tf.data.Dataset.random(seed)`, so one seed gives one reproducible sequence of epochs.
(larq-zoo's ImageNet augmentation uses unseeded stateful ops; its shuffling is seeded.)

# Where the data comes from (offline-friendly)

`load()` never downloads: an offline tfds download retries for minutes before it fails
(measured: cifar10, 204 s), so `load()` checks that the dataset is prepared in the tfds
data dir and otherwise raises `FileNotFoundError` saying what to do at once. `prepare()`
downloads and prepares a dataset on a machine with internet (ImageNet from the manual
tars). mnist and fashion_mnist also read the four IDX files
(`train-images-idx3-ubyte.gz`, ...) when tfds has not prepared them: from `data_dir`
(or `data_dir/mnist`, `data_dir/fashion-mnist`), and for fashion_mnist from
`/usr/share/datasets/fashion-mnist/` (Debian package `dataset-fashion-mnist`). The two
datasets use the same IDX file names: a `data_dir` holding the files directly is read
as whichever of the two is asked for.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pathlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from larq_zoo.training.data import preprocess_image_bytes

__all__ = ["DATASETS", "SPLITS", "DatasetSpec", "get_spec", "load", "prepare"]

#: The split names `load()` accepts.
SPLITS = ("train", "validation", "test")

#: The IDX files of MNIST and Fashion-MNIST, by split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What `load()` needs to know about one dataset.

    # Attributes
        name: Our key in `DATASETS`.
        tfds_name: The tfds builder name (with config), as tfds 4.8.3 calls it.
        num_classes: Number of classes.
        image_shape: `(h, w, c)` of the images the model receives by default.
        validation_size: Examples held out of the official train split for validation.
        train_size: Examples in the official train split.
        test_size: Examples in the official test split.
        test_split: The tfds split that `"test"` reads.
        mean: Per-channel mean subtracted after scaling to [0, 1] (small images).
        std: Per-channel standard deviation divided by (small images).
        pad: Training augmentation: zero-padding before the random crop (small images).
        flip: Training augmentation: random horizontal flip (small images).
        jpeg: Images are kept JPEG-encoded and go through larq-zoo's ImageNet
            preprocessing instead of the small-image transform.
        shuffle_buffer: Upper bound of the training shuffle buffer, in examples.
        cache: Keep the decoded tfds examples in memory after the first epoch.
        idx_dirs: Extra folders holding the IDX files; `None` if the dataset has no
            IDX fallback.
        manual_files: Files tfds needs in its manual download dir to prepare the data.
        apt_package: The Debian package that installs the IDX files, if any.
    """

    name: str
    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    validation_size: int
    train_size: int
    test_size: int
    test_split: str = "test"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    pad: int = 0
    flip: bool = False
    jpeg: bool = False
    shuffle_buffer: int = 60_000
    cache: bool = False
    idx_dirs: tuple[str, ...] | None = None
    manual_files: tuple[str, ...] = ()
    apt_package: str | None = None

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of examples of each of our splits."""
        return {
            "train": self.train_size - self.validation_size,
            "validation": self.validation_size,
            "test": self.test_size,
        }


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="cifar10",
            tfds_name="cifar10",
            num_classes=10,
            image_shape=(32, 32, 3),
            validation_size=10_000,
            train_size=50_000,
            test_size=10_000,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            pad=4,
            flip=True,
            cache=True,
        ),
        DatasetSpec(
            name="imagenet2012",
            tfds_name="imagenet2012",
            num_classes=1000,
            image_shape=(224, 224, 3),
            validation_size=10_000,
            train_size=1_281_167,
            test_size=50_000,
            test_split="validation",
            jpeg=True,
            shuffle_buffer=10_000,
            manual_files=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
        ),
        DatasetSpec(
            name="imagenette",
            tfds_name="imagenette/320px-v2",
            num_classes=10,
            image_shape=(224, 224, 3),
            validation_size=947,  # 10% of train
            train_size=9_469,
            test_size=3_925,
            test_split="validation",
            jpeg=True,
            shuffle_buffer=10_000,
        ),
        DatasetSpec(
            name="mnist",
            tfds_name="mnist",
            num_classes=10,
            image_shape=(28, 28, 1),
            validation_size=10_000,
            train_size=60_000,
            test_size=10_000,
            mean=(0.1307,),
            std=(0.3081,),
            pad=2,
            cache=True,
            idx_dirs=(),
        ),
        DatasetSpec(
            name="fashion_mnist",
            tfds_name="fashion_mnist",
            num_classes=10,
            image_shape=(28, 28, 1),
            validation_size=10_000,
            train_size=60_000,
            test_size=10_000,
            mean=(0.2860,),
            std=(0.3530,),
            pad=2,
            flip=True,
            cache=True,
            idx_dirs=("/usr/share/datasets/fashion-mnist",),
            apt_package="dataset-fashion-mnist",
        ),
    ]
}


def get_spec(name: str) -> DatasetSpec:
    """The `DatasetSpec` called `name`; `ValueError` listing the choices otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}."
        ) from None


def load(
    name: str,
    split: str,
    batch_size: int,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
    limit: int | None = None,
    drop_remainder: bool | None = None,
) -> tuple[tf.data.Dataset, int]:
    """A batched split of a dataset and its number of examples.

    # Arguments
        name: A key of `DATASETS`.
        split: `"train"`, `"validation"` or `"test"` (see the module docstring).
        batch_size: Examples per batch.
        data_dir: The tfds data dir (default: tfds' own, `~/tensorflow_datasets`);
            mnist/fashion_mnist also look for IDX files there.
        seed: Seeds the training shuffle and augmentation; unused by validation/test.
        image_size: Spatial size of the images instead of the dataset's default.
        limit: Use only the first `limit` examples of the split (smoke runs, tests).
        drop_remainder: Drop the last incomplete batch. By default `True` for
            `"train"` when there is at least one full batch, `False` otherwise.

    # Returns
        `(dataset, num_examples)`: a `tf.data.Dataset` of `(float32 images
        [batch, h, w, c], int32 labels [batch])`, not repeated and prefetched, and the
        number of examples in it (before batching).

    # Raises
        ValueError: For an unknown dataset or split, or a bad size.
        FileNotFoundError: If the data is not on this machine (says how to get it).
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive or None, got {limit}.")

    training = split == "train"
    num_examples = spec.split_sizes[split]
    if limit is not None:
        num_examples = min(num_examples, limit)
    if drop_remainder is None:
        drop_remainder = training and num_examples >= batch_size
    size = image_size or spec.image_shape[0]

    # File shuffling would change which examples `limit` takes.
    shuffle_files = training and limit is None
    examples, in_memory = _read_examples(
        spec, split, data_dir, seed=seed, shuffle_files=shuffle_files
    )
    if limit is not None:
        examples = examples.take(limit)
    if spec.cache and not in_memory:
        examples = examples.cache()
    if training:
        buffer_size = min(num_examples, spec.shuffle_buffer)
        examples = examples.shuffle(
            buffer_size, seed=seed, reshuffle_each_iteration=True
        )

    if spec.jpeg:
        examples = examples.map(
            functools.partial(_imagenet_style, training=training, size=size),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        if training:
            # One fresh random seed per example and epoch, reproducible from `seed`.
            example_seeds = tf.data.Dataset.random(
                seed=seed, rerandomize_each_iteration=True
            )
            examples = tf.data.Dataset.zip((examples, example_seeds)).map(
                functools.partial(_augment_small_image, spec),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        examples = examples.map(
            functools.partial(_normalize_small_image, spec, size=size),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    dataset = examples.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE), num_examples


def prepare(name: str, data_dir: str | None = None) -> None:
    """Downloads and prepares `name` with tfds into `data_dir` (needs internet).

    Run it once on a machine with internet, then copy the data dir to offline machines.
    For imagenet2012, first put the ImageNet tars into tfds' manual download dir
    (`<data_dir>/downloads/manual/`); preparing takes hours.
    """
    spec = get_spec(name)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    missing = _missing_manual_files(spec, builder)
    if missing:
        raise FileNotFoundError(_manual_files_message(spec, builder, missing))
    builder.download_and_prepare()


# ------------------------------------------------------------------------------
# Sources: (uint8 image, label) examples of one split, or JPEG bytes for `jpeg` specs.


def _read_examples(spec, split, data_dir, *, seed, shuffle_files):
    """`(examples, in_memory)`: the unbatched `(image, label)` examples of `split`,
    from prepared tfds records, or else from IDX files (then `in_memory` is True)."""
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.data_path.exists():
        examples = _read_tfds(
            spec, builder, split, seed=seed, shuffle_files=shuffle_files
        )
        return examples, False
    if spec.idx_dirs is not None:
        return _read_idx_split(spec, split, data_dir, builder), True
    if spec.manual_files:
        missing = _missing_manual_files(spec, builder)
        raise FileNotFoundError(
            f"{spec.name} is not prepared in {builder.data_path}. "
            + _manual_files_message(spec, builder, missing)
        )
    raise FileNotFoundError(_not_prepared_message(spec, builder))


def _tfds_split(spec: DatasetSpec, split: str) -> str:
    """Our split as a tfds split string (the held-out examples end the train split)."""
    return {
        "train": f"train[:-{spec.validation_size}]",
        "validation": f"train[-{spec.validation_size}:]",
        "test": spec.test_split,
    }[split]


def _read_tfds(spec, builder, split, *, seed, shuffle_files):
    """`split` read from the prepared tfds records."""
    return builder.as_dataset(
        split=_tfds_split(spec, split),
        as_supervised=True,
        shuffle_files=shuffle_files,
        decoders={"image": tfds.decode.SkipDecoding()} if spec.jpeg else None,
        read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
    )


def _read_idx_split(spec, split, data_dir, builder):
    """`split` read from the IDX files, as an in-memory dataset."""
    candidates = _idx_dir_candidates(spec, data_dir)
    directory = next((d for d in candidates if _has_idx_files(d)), None)
    if directory is None:
        raise FileNotFoundError(_no_idx_message(spec, builder, candidates))

    source = "test" if split == "test" else "train"
    images, labels = _read_idx_pair(directory, *IDX_FILES[source])
    if split != "test":
        held_out = len(images) - spec.validation_size
        part = slice(None, held_out) if split == "train" else slice(held_out, None)
        images, labels = images[part], labels[part]
    examples = tf.data.Dataset.from_tensor_slices((images[..., np.newaxis], labels))
    # In-memory data has no files to shard: multi-worker training shards by example.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return examples.with_options(options)


def _idx_dir_candidates(spec: DatasetSpec, data_dir: str | None) -> list[str]:
    """Folders that may hold the IDX files of `spec`, in the order they are tried."""
    candidates = []
    if data_dir is not None:
        subdir = spec.name.replace("_", "-")  # "mnist", "fashion-mnist"
        candidates += [os.path.join(data_dir, subdir), data_dir]
    return candidates + list(spec.idx_dirs)


def _has_idx_files(directory: str) -> bool:
    """Whether all four IDX files are in `directory`."""
    files = [file for pair in IDX_FILES.values() for file in pair]
    return all(os.path.isfile(os.path.join(directory, file)) for file in files)


@functools.lru_cache(maxsize=4)
def _read_idx_pair(directory: str, images_file: str, labels_file: str):
    """`(uint8 images [n, h, w], uint8 labels [n])` from two gzipped IDX files."""
    images = _read_idx(os.path.join(directory, images_file))
    labels = _read_idx(os.path.join(directory, labels_file))
    if len(images) != len(labels):
        raise ValueError(
            f"{images_file} and {labels_file} in {directory} differ in length."
        )
    return images, labels


def _read_idx(path: str) -> np.ndarray:
    """The uint8 array stored in one gzipped IDX file (the MNIST format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[:2], data[2], data[3]
    if zero != b"\0\0" or dtype_code != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file.")
    shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


# ------------------------------------------------------------------------------
# Transforms: one example in, (float32 image, int32 label) out.


def _imagenet_style(image_bytes, label, *, training: bool, size: int):
    """larq-zoo's ImageNet preprocessing of one JPEG (see the module docstring)."""
    image = preprocess_image_bytes(image_bytes, is_training=training, image_size=size)
    return image, tf.cast(label, tf.int32)


def _augment_small_image(spec: DatasetSpec, example, seed):
    """Random pad-and-crop and flip of one uint8 image, drawn from `seed` (a scalar)."""
    image, label = example
    if spec.pad:
        paddings = [[spec.pad, spec.pad], [spec.pad, spec.pad], [0, 0]]
        image = tf.image.stateless_random_crop(
            tf.pad(image, paddings), spec.image_shape, seed=tf.stack([seed, 0])
        )
    if spec.flip:
        image = tf.image.stateless_random_flip_left_right(
            image, seed=tf.stack([seed, 1])
        )
    return image, label


def _normalize_small_image(spec: DatasetSpec, image, label, *, size: int):
    """uint8 image -> [0, 1] -> per-channel z-score, resized to `size` if needed."""
    image = (tf.cast(image, tf.float32) / 255.0 - spec.mean) / spec.std
    if size != spec.image_shape[0]:
        image = tf.image.resize(image, (size, size))
    return image, tf.cast(label, tf.int32)


# ------------------------------------------------------------------------------
# Messages for data that is not on this machine.


def _tfds_root(builder) -> pathlib.Path:
    """The tfds data dir holding the builder's `<name>[/<config>]/<version>` folder."""
    return pathlib.Path(builder.data_path).parents[2 if builder.builder_config else 1]


def _manual_dir(builder) -> pathlib.Path:
    """Where tfds 4.8.3 looks for manually downloaded files."""
    return _tfds_root(builder) / "downloads" / "manual"


def _missing_manual_files(spec, builder) -> list[str]:
    """The `spec.manual_files` that are not in the builder's manual dir."""
    return [f for f in spec.manual_files if not (_manual_dir(builder) / f).is_file()]


def _manual_files_message(spec, builder, missing) -> str:
    manual_dir = _manual_dir(builder)
    if missing:
        files = " and ".join(spec.manual_files)
        return (
            f"{spec.name} is a manual download: put {files} into {manual_dir}/ "
            f"(missing: {', '.join(str(manual_dir / f) for f in missing)}). "
            "Get them from https://image-net.org/download-images (free sign-up), "
            f"then run `larq_noisy.datasets.prepare({spec.name!r}, "
            f"data_dir={str(_tfds_root(builder))!r})` once (hours; ~300 GB of disk), "
            "or copy an already prepared tfds data dir here and pass it as data_dir "
            "(--data-dir)."
        )
    return (
        f"The ImageNet tars are in {manual_dir}: run `larq_noisy.datasets.prepare("
        f"{spec.name!r}, data_dir={str(_tfds_root(builder))!r})` once to build the "
        "tfds records (hours)."
    )


def _not_prepared_message(spec, builder) -> str:
    return (
        f"{spec.name} ({spec.tfds_name}) is not prepared in {builder.data_path}. "
        "load() does not download (without internet a tfds download fails only after "
        f"minutes of retries): run `larq_noisy.datasets.prepare({spec.name!r})` once "
        "on a machine with internet, then copy its tfds data dir "
        "(~/tensorflow_datasets) here and pass it as data_dir (--data-dir)."
    )


def _no_idx_message(spec, builder, tried) -> str:
    files = ", ".join(file for pair in IDX_FILES.values() for file in pair)
    install = f"apt-get install {spec.apt_package}, or " if spec.apt_package else ""
    return (
        f"{spec.name} is not prepared for tfds in {builder.data_path}, and its IDX "
        f"files ({files}) are in none of: {', '.join(tried) or '(no data_dir given)'}. "
        f"To get them: {install}put the four files into data_dir (--data-dir), or run "
        f"`larq_noisy.datasets.prepare({spec.name!r})` on a machine with internet and "
        "copy its tfds data dir here."
    )
