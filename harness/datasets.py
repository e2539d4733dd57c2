"""The datasets: where they come from, their splits and their preprocessing.

Every dataset fact lives in one `DatasetSpec` per dataset (`DATASETS`); `load()` turns a
spec into a batched `tf.data.Dataset` of `(float32 NHWC image, int32 label)`.

Splits: `"train"` and `"validation"` divide the official train split, `"test"` is the
official test split (`spec.test_split`). Of the official train split's first `limit`
examples (all of them without a limit), the last `held_out(n)` are the validation split:
`spec.validation_size`, or a fifth of a smaller copy (at least one). The sizes come from
the copy on this machine (the prepared builder's info, or the IDX files) and tfds reads
each split as an absolute slice (`train[:k]`, `train[k:n]`), so a copy of any size, or a
limited one, has the three splits, and `split_sizes` counts what `load` yields. The
training examples are shuffled with the seed and augmented; validation and test are the
same for every seed, in the same order, with the evaluation transform only.

Class subsets: `classes` (label names as tfds has them: synset ids for ImageNet, one a
line in a file read by `read_classes`) keeps only those classes, relabelled 0..n-1 in
their order, before the limit and the hold-out; finding where they are takes one read of
the labels of each official split, once per process (minutes on the full ImageNet).

Transforms: small images are scaled to [0, 1] and normalized per channel with the train
set's `spec.mean` and `spec.std`; for training, first zero-padded by `spec.pad`, randomly
cropped back and flipped where `spec.flip`. JPEG datasets (`spec.jpeg`) get larq-zoo's
ImageNet preprocessing (`larq_zoo.training.data`), the inputs its pretrained weights were
trained on: a random resized crop and flip for training, a center crop for evaluation,
the same images bit for bit (the training crop and flip drawn by stateless ops).
`image_size` overrides the spatial size: JPEG data is cropped to it, the fixed-size
datasets resized (bilinear) after augmentation.

Reproducible epochs: epoch `e` of the training split is a function of `(seed, e)` alone:
its shuffle is seeded with `epoch_key(seed, e)`, each example's augmentation by stateless
random ops seeded from that key and the example's position, and tfds reads its files in
one order per seed. So a run resumed at epoch `first` (`load(..., epochs=(first, stop),
skip=n)`) reads exactly the batches an uninterrupted run reads.

The data: `load()` never downloads (offline, a tfds download fails only after minutes of
retries); `prepare()` does, on a machine with internet, and tfds' CLI prepares ImageNet
from its tars (`_manual_download` says how). mnist and fashion_mnist can also be read
from their `IDX_FILES` (`spec.idx_dirs`, or `data_dir` when it is given).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pathlib
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from larq_zoo.training import data as zoo_data

__all__ = ["DATASETS", "IDX_FILES", "SPLITS", "DatasetSpec", "batches_per_epoch", "epoch_key",
           "get_spec", "held_out", "label_names", "load", "prepare", "read_classes",
           "split_sizes"]

#: The split names `load()` accepts.
SPLITS = ("train", "validation", "test")

#: The IDX files of MNIST and Fashion-MNIST, by split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What `load()` needs to know about one dataset."""

    name: str  # our key in `DATASETS`
    tfds_name: str  # the tfds builder name (with config), as tfds 4.8.3 calls it
    num_classes: int
    image_shape: tuple[int, int, int]  # (h, w, c) of the images the model gets by default
    validation_size: int  # examples held out of the official train split (`held_out`)
    test_split: str = "test"  # the tfds split "test" reads ("validation" if none is labelled)
    mean: tuple[float, ...] = ()  # small images: per channel, after scaling to [0, 1]
    std: tuple[float, ...] = ()  # small images: per channel, after subtracting `mean`
    pad: int = 0  # small images, training: zero-padding before the random crop
    flip: bool = False  # small images, training: random horizontal flip
    jpeg: bool = False  # kept JPEG-encoded, for larq-zoo's ImageNet preprocessing
    shuffle_buffer: int = 60_000  # upper bound of the training shuffle buffer
    cache: bool = False  # keep the decoded tfds examples in memory after the first epoch
    idx_dirs: tuple[str, ...] | None = None  # folders of the IDX files; None: no IDX fallback
    manual_files: tuple[str, ...] = ()  # what tfds needs in its manual download dir
    apt_package: str | None = None  # the Debian package that installs the IDX files


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec(
        "cifar10", "cifar10", num_classes=10, image_shape=(32, 32, 3),
        validation_size=10_000, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        pad=4, flip=True, cache=True,
    ),
    DatasetSpec(
        "imagenet2012", "imagenet2012", num_classes=1000, image_shape=(224, 224, 3),
        validation_size=10_000, test_split="validation", jpeg=True, shuffle_buffer=10_000,
        manual_files=("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    ),
    DatasetSpec(
        "imagenette", "imagenette/320px-v2", num_classes=10, image_shape=(224, 224, 3),
        validation_size=947,  # 10% of its 9,469 training images
        test_split="validation", jpeg=True, shuffle_buffer=10_000,
    ),
    DatasetSpec(
        "mnist", "mnist", num_classes=10, image_shape=(28, 28, 1),
        validation_size=10_000, mean=(0.1307,), std=(0.3081,), pad=2, cache=True, idx_dirs=(),
    ),
    DatasetSpec(
        "fashion_mnist", "fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
        validation_size=10_000, mean=(0.2860,), std=(0.3530,), pad=2, flip=True, cache=True,
        idx_dirs=("/usr/share/datasets/fashion-mnist",), apt_package="dataset-fashion-mnist",
    ),
]}


def get_spec(name: str) -> DatasetSpec:
    """The `DatasetSpec` called `name`; `ValueError` listing the choices otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        choices = ", ".join(DATASETS)
        raise ValueError(f"Unknown dataset {name!r}; choose one of {choices}.") from None


def epoch_key(seed: int, epoch):
    """The int64 key that seeds epoch `epoch` of a training split read with `seed`.

    Works on Python ints and on tensors (inside a tf.data pipeline); distinct for
    distinct `(seed, epoch)` pairs with `0 <= epoch < 2**20`.
    """
    return tf.cast(seed, tf.int64) * (1 << 20) + tf.cast(epoch, tf.int64)


def held_out(spec: DatasetSpec, num_examples: int) -> int:
    """Examples held out for validation of an official train split of `num_examples`
    (limit applied): `spec.validation_size`, or a fifth of a smaller copy, at least one."""
    return min(spec.validation_size, max(1, num_examples // 5))


def split_sizes(name: str, *, data_dir: str | None = None, limit: int | None = None,
                classes: tuple[str, ...] | None = None) -> dict[str, int]:
    """Examples in each of our splits (`SPLITS`) of the copy of `name` on this machine, as
    `load` reads them; `FileNotFoundError` if it is not here, as `load`."""
    ranges = _ranges(get_spec(name), data_dir, limit, classes)
    return {split: ranges[split].count for split in SPLITS}


def batches_per_epoch(name: str, split: str, batch_size: int, limit: int | None = None, *,
                      data_dir: str | None = None, classes: tuple[str, ...] | None = None) -> int:
    """Batches in one epoch of `split`, as `load` batches it."""
    num_examples = split_sizes(name, data_dir=data_dir, limit=limit, classes=classes)[split]
    if _drops_remainder(split, num_examples, batch_size):
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def _drops_remainder(split: str, num_examples: int, batch_size: int) -> bool:
    """Whether an epoch of `split` drops its last incomplete batch by default: training
    does, unless that would leave no batch."""
    return split == "train" and num_examples >= batch_size


@dataclasses.dataclass(frozen=True)
class _Range:
    """Where one of our splits lies: `official[start:stop]`, `count` examples of it kept."""

    official: str
    start: int
    stop: int
    count: int


def _ranges(spec, data_dir, limit, classes) -> dict[str, _Range]:
    """Each of our splits as a slice of an official split (see "Splits")."""
    def first(official):
        """`(n, end)`: the examples kept of `official` (classes, then limit, applied)
        and `end(k)`, the index just after the k-th of them."""
        if classes is None:
            n = _official_size(spec, official, data_dir)
            return min(n, limit or n), lambda k: k
        wanted = [label_names(spec.name).index(c) for c in classes]
        positions = np.flatnonzero(np.isin(_official_labels(spec, official, data_dir), wanted))
        positions = positions[:limit]
        return len(positions), lambda k: int(positions[k - 1]) + 1 if k else 0

    of_classes = f" of the {len(classes)} classes given" if classes else ""
    n, end = first("train")
    if n < 2:
        raise ValueError(
            f"{spec.name} has {n} training example(s){of_classes} here"
            + (f" (limit {limit})" if limit else "")
            + ": at least 2 are needed, one of them held out for validation.")
    kept = n - held_out(spec, n)
    m, end_test = first(spec.test_split)
    if m == 0:
        raise ValueError(f"{spec.name} has no example{of_classes} in its test split "
                         f"({spec.test_split!r}) here: give classes that it has.")
    return {"train": _Range("train", 0, end(kept), kept),
            "validation": _Range("train", end(kept), end(n), n - kept),
            "test": _Range(spec.test_split, 0, end_test(m), m)}


def _official_size(spec, official, data_dir) -> int:
    """Examples in the official split `official` of the copy on this machine."""
    builder, idx_dir = _source(spec, data_dir)
    if builder is None:
        return len(_read_idx_pair(idx_dir, *IDX_FILES[official])[1])
    if official not in builder.info.splits:
        raise FileNotFoundError(
            f"{spec.name} is prepared in {builder.data_path} without its {official!r} split: "
            f"prepare it again with all of its files ({_prepare_hint(spec, builder)}).")
    return builder.info.splits[official].num_examples


@functools.lru_cache(maxsize=8)
def _official_labels(spec, official, data_dir) -> np.ndarray:
    """The labels of the official split `official`, in the order of its absolute indices
    (one read of the split; its images are not decoded)."""
    builder, idx_dir = _source(spec, data_dir)
    if builder is None:
        return _read_idx_pair(idx_dir, *IDX_FILES[official])[1]
    _official_size(spec, official, data_dir)  # a missing split is named
    examples = builder.as_dataset(
        split=official, shuffle_files=False,
        decoders=tfds.decode.PartialDecoding({"label": True}),
        read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),  # in order
    )
    batches = examples.map(lambda example: example["label"]).batch(65_536)
    return np.concatenate([labels.numpy() for labels in batches])


@functools.lru_cache(maxsize=None)
def label_names(name: str) -> tuple[str, ...]:
    """The class names of dataset `name`, in label order, as tfds has them (ImageNet's:
    synset ids)."""
    return tuple(tfds.builder(get_spec(name).tfds_name).info.features["label"].names)


@functools.lru_cache(maxsize=8)
def read_classes(name: str, path: str) -> tuple[str, ...]:
    """The class names listed in the file `path` (one a line, blank lines ignored; e.g.
    ImageNet-100's synset ids), checked against dataset `name`'s (`label_names`);
    `ValueError` naming the file and the bad line otherwise."""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ValueError(f"classes file {path!r} is unreadable ({reason}): give a text file "
                         "of class names, one a line.") from None
    known, seen = set(label_names(name)), {}
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        if line not in known:
            raise ValueError(
                f"classes file {path!r}, line {number}: {line!r} is no class of {name} "
                f"(its {len(known)} classes are named as {label_names(name)[0]!r}).")
        if line in seen:
            raise ValueError(f"classes file {path!r}, line {number}: {line!r} is listed "
                             f"twice (first on line {seen[line]}).")
        seen[line] = number
    if not seen:
        raise ValueError(f"classes file {path!r} lists no class: give class names of "
                         f"{name}, one a line.")
    return tuple(seen)


def load(
    name: str, split: str, batch_size: int, *, data_dir: str | None = None, seed: int = 0,
    image_size: int | None = None, limit: int | None = None,
    classes: tuple[str, ...] | None = None,
    drop_remainder: bool | None = None, epochs: tuple[int, int] | None = None, skip: int = 0,
    steps_per_epoch: int | None = None,
) -> tuple[tf.data.Dataset, int]:
    """`(dataset, num_examples)`: a split of `name` in batches of `(float32 images
    [batch, h, w, c], int32 labels [batch])`, prefetched, and its examples in one epoch.

    # Arguments
        name: A key of `DATASETS`.
        split: One of `SPLITS` (see the module docstring).
        batch_size: Examples per batch.
        data_dir: The tfds data dir (default: tfds' own, `~/tensorflow_datasets`); when
            given, the only place where mnist/fashion_mnist IDX files are looked for.
        seed: Seeds the training shuffle and augmentation; unused by validation/test.
        image_size: Spatial size of the images instead of the dataset's default.
        limit: Use only the first `limit` examples of each official split (smoke runs,
            tests); the validation split is held out of the first `limit` training ones.
        classes: Keep only these classes (`label_names`), relabelled 0..n-1 in this order.
        drop_remainder: Drop the last incomplete batch. By default `True` for
            `"train"` when there is at least one full batch, `False` otherwise.
        epochs: Training only: `(first, stop)`, epochs `first .. stop - 1` back to back,
            epoch `e` drawn from `(seed, e)` alone; `None`: a new epoch each iteration.
        skip: Training with `epochs` only: batches left out at the start of epoch `first`
            (they count towards its `steps_per_epoch`, as a resumed `fit`'s steps do).
        steps_per_epoch: Training only: the first `steps_per_epoch` batches of each epoch.

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
    if not training and (epochs is not None or skip or steps_per_epoch):
        raise ValueError(f"epochs, skip and steps_per_epoch apply to 'train', not {split!r}.")

    part = _ranges(spec, data_dir, limit, classes)[split]
    num_examples = part.count
    if drop_remainder is None:
        drop_remainder = _drops_remainder(split, num_examples, batch_size)
    size = image_size or spec.image_shape[0]

    examples, in_memory = _read_examples(spec, part, data_dir, seed, training)
    if classes:
        examples = _relabelled(examples, spec, classes)
    if spec.cache and not in_memory:
        examples = examples.cache()

    def batched(examples, transform):
        mapped = examples.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
        return mapped.batch(batch_size, drop_remainder=drop_remainder)

    if not training:
        dataset = batched(examples, _eval_example(spec, size))
        if in_memory:
            dataset = _shard_by_example(dataset)
        return dataset.prefetch(tf.data.AUTOTUNE), num_examples

    buffer_size = min(num_examples, spec.shuffle_buffer)

    def one_epoch(key, skip_batches):
        # The epoch depends on its key alone, not on the global seed of the moment
        # (which would also make `shuffle` test a tensor seed as a Python bool).
        tf.compat.v1.set_random_seed(None)  # the seed of this traced function's graph
        shuffled = examples.shuffle(buffer_size, seed=key, reshuffle_each_iteration=False)
        indexed = shuffled.enumerate().skip(skip_batches * batch_size)
        epoch = batched(indexed, _train_example(spec, key, size))
        # Keras ends a resumed epoch after its remaining `steps_per_epoch - skip` steps.
        return epoch.take(steps_per_epoch - skip_batches) if steps_per_epoch else epoch

    if epochs is None:
        if skip:
            raise ValueError(f"skip={skip!r} needs epochs=(first, stop): it counts batches "
                             "of epoch first.")
        # A new key each time the dataset is iterated, in a sequence fixed by `seed`.
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
        dataset = keys.flat_map(lambda key: one_epoch(key, tf.constant(0, tf.int64)))
    else:
        first, stop = epochs
        if not 0 <= first <= stop or not 0 <= skip < (steps_per_epoch or skip + 1):
            cap = f" < steps_per_epoch={steps_per_epoch}" if steps_per_epoch else ""
            raise ValueError(f"epochs={epochs!r}, skip={skip!r}: need 0 <= first <= stop "
                             f"and 0 <= skip{cap}.")
        skip_batches = tf.constant(skip, tf.int64)
        dataset = tf.data.Dataset.range(first, stop).flat_map(
            lambda e: one_epoch(
                epoch_key(seed, e), tf.where(e == first, skip_batches, tf.constant(0, tf.int64))
            )
        )
    return _shard_by_example(dataset).prefetch(tf.data.AUTOTUNE), num_examples


def _shard_by_example(dataset):
    # Multi-worker training shards by example: in-memory data has no files, and the
    # epochs of a training stream are built inside `flat_map`, where files are hidden.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def prepare(name: str, data_dir: str | None = None) -> None:
    """Downloads and prepares `name` with tfds into `data_dir` (needs internet).

    Run it once on a machine with internet, then copy the data dir to offline machines.
    For imagenet2012, first put the ImageNet tars into tfds' manual download dir
    (`<data_dir>/downloads/manual/`).
    """
    spec = get_spec(name)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    complete, message = _manual_download(spec, builder)
    if not complete:
        raise FileNotFoundError(message)
    builder.download_and_prepare()


# ------------------------------------------------------------------------------
# Sources: (uint8 image, label) examples of one split, or JPEG bytes for `jpeg` specs.


def _read_examples(spec, part: _Range, data_dir, seed, shuffle_files):
    """`(examples, in_memory)`: the unbatched `(image, label)` examples of `part`, from
    prepared tfds records, or else from IDX files (then `in_memory` is True)."""
    builder, idx_dir = _source(spec, data_dir)
    if builder is None:
        images, labels = _read_idx_pair(idx_dir, *IDX_FILES[part.official])
        images, labels = images[part.start:part.stop], labels[part.start:part.stop]
        return tf.data.Dataset.from_tensor_slices((images[..., np.newaxis], labels)), True
    examples = builder.as_dataset(
        # An absolute slice: shuffling its files changes their order, not which they are.
        split=f"{part.official}[{part.start}:{part.stop}]", as_supervised=True,
        shuffle_files=shuffle_files,
        decoders={"image": tfds.decode.SkipDecoding()} if spec.jpeg else None,
        # One file order per seed, the same every epoch (see "Reproducible epochs").
        read_config=tfds.ReadConfig(
            shuffle_seed=seed, shuffle_reshuffle_each_iteration=False, try_autocache=False
        ),
    )
    return examples, False


def _relabelled(examples, spec, classes):
    """The examples of `classes` only, labelled by their position in it."""
    index = np.full(spec.num_classes, -1, np.int64)
    index[[label_names(spec.name).index(c) for c in classes]] = np.arange(len(classes))
    index = tf.constant(index)

    def position(label):
        return tf.gather(index, tf.cast(label, tf.int64))

    kept = examples.filter(lambda image, label: position(label) >= 0)
    return kept.map(lambda image, label: (image, position(label)))


def _source(spec, data_dir):
    """`(builder, None)` if `spec`'s tfds records are prepared, else `(None, folder)` of
    its IDX files; `FileNotFoundError` saying how to get the data otherwise."""
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.data_path.exists():
        return builder, None
    if spec.idx_dirs is not None:
        return None, _idx_directory(spec, data_dir, builder)
    raise FileNotFoundError(f"{spec.name} ({spec.tfds_name}) is not prepared in "
                            f"{builder.data_path}. {_prepare_hint(spec, builder)}")


def _prepare_hint(spec, builder) -> str:
    """How to prepare `spec` (`_manual_download` for ImageNet)."""
    if spec.manual_files:
        return _manual_download(spec, builder)[1]
    return ("load() does not download (without internet a tfds download fails only after "
            f"minutes of retries): run `harness.datasets.prepare({spec.name!r})` once on a "
            "machine with internet, then copy its tfds data dir (~/tensorflow_datasets) "
            "here and pass it as data_dir (--data-dir).")


def _idx_directory(spec, data_dir, builder) -> str:
    """The folder holding `spec`'s IDX files; `FileNotFoundError` naming where they were
    looked for."""
    if data_dir is not None:  # the user's folder only: never silently other files
        candidates = [os.path.join(data_dir, spec.name.replace("_", "-")), data_dir]
    else:
        candidates = list(spec.idx_dirs)
    files = [file for pair in IDX_FILES.values() for file in pair]
    directory = next(
        (d for d in candidates if all(os.path.isfile(os.path.join(d, f)) for f in files)), None
    )
    if directory is None:
        install = f"apt-get install {spec.apt_package}, or " if spec.apt_package else ""
        raise FileNotFoundError(
            f"{spec.name} is not prepared for tfds in {builder.data_path}, and its IDX "
            f"files ({', '.join(files)}) are in none of: "
            f"{', '.join(candidates) or '(no data_dir given)'}. To get them: {install}put "
            f"the four files into data_dir (--data-dir), or run `harness.datasets.prepare("
            f"{spec.name!r})` on a machine with internet and copy its tfds data dir here."
        )
    return directory


@functools.lru_cache(maxsize=4)
def _read_idx_pair(directory: str, images_file: str, labels_file: str):
    """`(uint8 images [n, h, w], uint8 labels [n])` from two gzipped IDX files."""
    images = _read_idx(os.path.join(directory, images_file))
    labels = _read_idx(os.path.join(directory, labels_file))
    if len(images) != len(labels):
        raise ValueError(f"{images_file} and {labels_file} in {directory} differ in length.")
    return images, labels


def _read_idx(path: str) -> np.ndarray:
    """The uint8 array stored in one gzipped IDX file (the MNIST format)."""
    fix = "replace it with a good copy (or reinstall the package that provides it)"
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as error:  # not gzip, truncated, unreadable
        raise ValueError(f"{path} is not a readable gzip file ({error}): {fix}.") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file: {fix}.")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is a truncated IDX file: {fix}.")
    shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(shape, dtype=np.int64):
        raise ValueError(
            f"{path} holds {body.size} values for an array of shape {tuple(shape)}: {fix}."
        )
    return body.reshape(shape)


# ------------------------------------------------------------------------------
# Transforms: one example in, (float32 image, int32 label) out.


def _eval_example(spec, size):
    """The evaluation transform of one `(image, label)` example."""
    if not spec.jpeg:
        return functools.partial(_normalize_small_image, spec, size=size)

    def center_crop(image_bytes, label):  # larq-zoo's ImageNet evaluation preprocessing
        image = zoo_data.preprocess_image_bytes(image_bytes, is_training=False, image_size=size)
        return image, tf.cast(label, tf.int32)

    return center_crop


def _train_example(spec, key, size):
    """The training transform of one `(index, (image, label))`, seeded by `[key, index]`."""
    def transform(index, example):
        seed = tf.stack([key, index])
        if spec.jpeg:
            return _imagenet_train(*example, seed, size=size)
        return _normalize_small_image(spec, *_augment_small_image(spec, example, seed), size=size)

    return transform


#: larq-zoo's training crop (`_decode_and_random_crop`): the options of its bounding box.
_IMAGENET_CROP = dict(min_object_covered=0.1, aspect_ratio_range=(3.0 / 4, 4.0 / 3.0),
                     area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)


def _imagenet_train(image_bytes, label, seed, *, size: int):
    """larq-zoo's ImageNet training preprocessing of one JPEG, its random crop and flip
    drawn from `seed` (shape [2]) with stateless ops, so that it is reproducible."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(image_bytes)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=crop_seed,
        **_IMAGENET_CROP,
    )
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    # As larq-zoo: no acceptable crop was found -> the evaluation's center crop.
    image = tf.cond(
        zoo_data._at_least_x_are_equal(shape, tf.shape(image), 3),
        lambda: zoo_data._decode_and_center_crop(image_bytes, size),
        lambda: tf.compat.v1.image.resize_bicubic([image], [size, size])[0],
    )
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = tf.cast(tf.reshape(image, [size, size, 3]), tf.float32)
    image = zoo_data._normalize(image, zoo_data.MEAN_RGB, zoo_data.STDDEV_RGB)
    return image, tf.cast(label, tf.int32)


def _augment_small_image(spec: DatasetSpec, example, seed):
    """Random pad-and-crop and flip of one uint8 image, drawn from `seed` (shape [2])."""
    image, label = example
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if spec.pad:
        paddings = [[spec.pad, spec.pad], [spec.pad, spec.pad], [0, 0]]
        image = tf.image.stateless_random_crop(
            tf.pad(image, paddings), spec.image_shape, seed=crop_seed
        )
    if spec.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image, label


def _normalize_small_image(spec: DatasetSpec, image, label, *, size: int):
    """uint8 image -> [0, 1] -> per-channel z-score, resized to `size` if needed."""
    image = (tf.cast(image, tf.float32) / 255.0 - spec.mean) / spec.std
    if size != spec.image_shape[0]:
        image = tf.image.resize(image, (size, size))
    return image, tf.cast(label, tf.int32)


def _manual_download(spec, builder) -> tuple[bool, str]:
    """`(whether all spec.manual_files are in tfds 4.8.3's manual download dir, what to do
    next)`: the one command that prepares them, tfds' CLI (ImageNet's, the one manual
    download)."""
    # The tfds data dir holds the builder's `<name>[/<config>]/<version>` folder.
    root = pathlib.Path(builder.data_path).parents[2 if builder.builder_config else 1]
    manual_dir = root / "downloads" / "manual"
    missing = [f for f in spec.manual_files if not (manual_dir / f).is_file()]
    command = (f"`tfds build {spec.tfds_name} --manual_dir {manual_dir} --data_dir {root}` "
               "(hours, with a progress bar; the records take ~155 GB of disk more), then "
               f"train with --data-dir {root}")
    if not missing:
        return True, f"The ImageNet tars are in {manual_dir}: prepare them once with {command}."
    return False, (
        f"{spec.name} is a manual download: put {' and '.join(spec.manual_files)} (138 GB and "
        f"6.3 GB, from https://image-net.org/download-images, free sign-up) into "
        f"{manual_dir}/ (missing: {', '.join(missing)}), and prepare them once with "
        f"{command}; or copy a prepared tfds data dir here and pass it as --data-dir."
    )
