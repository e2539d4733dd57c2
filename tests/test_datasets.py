"""Tests of `harness.datasets`: real Fashion-MNIST IDX files, mocked tfds for CIFAR-10.

Fashion-MNIST is read from `/usr/share/datasets/fashion-mnist/` (Debian package
`dataset-fashion-mnist`). CIFAR-10 goes through the same `load()` with
`tfds.testing.mock_data`, after writing the builder's metadata into a temporary data
dir so that the dataset looks prepared there. ImageNet and Imagenette, prepared by tfds
from files in their real layout: tests/test_imagenet.py.
"""

import dataclasses
import gzip
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from larq_zoo.training import data as zoo_data

from conftest import mocked_tfds

from harness import datasets
from harness.datasets import DATASETS, get_spec, load, prepare, read_classes, split_sizes

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION = DATASETS["fashion_mnist"]


def batches(dataset):
    """All `(images, labels)` of a dataset as two numpy arrays."""
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset))
    return np.concatenate(images), np.concatenate(labels)


def raw_fashion(split):
    """The uint8 images and labels of the Fashion-MNIST IDX files."""
    return datasets._read_idx_pair(FASHION_DIR, *datasets.IDX_FILES[split])


def normalized(images, spec=FASHION):
    return ((images[..., np.newaxis] / 255.0 - spec.mean) / spec.std).astype(np.float32)


# --- names and errors ----------------------------------------------------------


def test_fashion_mnist_splits_hold_the_images_the_spec_counts_and_do_not_overlap():
    """The offline data, loaded: the validation split is held out of train (no image in
    both), and each split has as many images as the spec says (and as steps assume)."""
    sizes = split_sizes("fashion_mnist")
    assert sizes == {"train": 50_000, "validation": 10_000, "test": 10_000}
    seen = {}
    for split in ("train", "validation", "test"):
        batches, _ = load("fashion_mnist", split, 1000)
        images = np.concatenate([x.numpy() for x, _ in batches])
        assert len(images) == sizes[split]
        seen[split] = {hash(image.tobytes()) for image in images[:2000]}
    assert not seen["train"] & seen["validation"]


def test_unknown_name_and_split_name_the_choices():
    with pytest.raises(ValueError, match=r"'svhn'.*cifar10.*fashion_mnist"):
        get_spec("svhn")
    with pytest.raises(ValueError, match=r"'svhn'.*cifar10"):
        load("svhn", "train", 8)
    with pytest.raises(ValueError, match=r"'val'.*train, validation, test"):
        load("fashion_mnist", "val", 8)


def test_imagenet_missing_files_says_where_to_put_them(tmp_path):
    manual_dir = os.path.join(tmp_path, "downloads", "manual")
    for call in (
        lambda: load("imagenet2012", "train", 8, data_dir=str(tmp_path)),
        lambda: prepare("imagenet2012", data_dir=str(tmp_path)),
    ):
        with pytest.raises(FileNotFoundError) as error:
            call()
        message = str(error.value)
        assert manual_dir in message
        assert "ILSVRC2012_img_train.tar" in message
        assert "ILSVRC2012_img_val.tar" in message
    assert not os.path.exists(manual_dir)  # nothing was attempted


def test_unprepared_tfds_dataset_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(
        FileNotFoundError, match=r"cifar10.*not prepared.*prepare\('cifar10'\)"
    ):
        load("cifar10", "train", 8, data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5  # no download attempt
    assert os.listdir(tmp_path) == []


def test_missing_idx_files_name_the_paths_and_the_package(tmp_path, monkeypatch):
    nowhere = str(tmp_path / "nowhere")
    spec = dataclasses.replace(FASHION, idx_dirs=(nowhere,))
    monkeypatch.setitem(DATASETS, "fashion_mnist", spec)
    with pytest.raises(FileNotFoundError) as error:
        load("fashion_mnist", "test", 8)
    message = str(error.value)
    assert nowhere in message and "apt-get install dataset-fashion-mnist" in message
    assert "t10k-images-idx3-ubyte.gz" in message
    with pytest.raises(FileNotFoundError) as error:  # a data_dir given: only it is read
        load("fashion_mnist", "test", 8, data_dir=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and nowhere not in message


# --- Fashion-MNIST from the real IDX files -------------------------------------


def test_fashion_mnist_splits_add_up_and_are_disjoint():
    train_images, train_labels = raw_fashion("train")
    assert len(train_images) == 60_000

    validation, n_validation = load("fashion_mnist", "validation", 1000)
    x, y = batches(validation)
    assert n_validation == len(x) == 10_000
    # The held-out examples are the last 10000 of the train files, untouched.
    np.testing.assert_allclose(x, normalized(train_images[-10_000:]), atol=1e-5)
    np.testing.assert_array_equal(y, train_labels[-10_000:])

    # Training sees exactly the other 50000 (labels survive augmentation).
    train, n_train = load("fashion_mnist", "train", 1000, drop_remainder=False)
    _, y = batches(train)
    assert n_train == len(y) == 50_000
    np.testing.assert_array_equal(
        np.bincount(y, minlength=10), np.bincount(train_labels[:-10_000], minlength=10)
    )

    test, n_test = load("fashion_mnist", "test", 1000, limit=2000)
    x, y = batches(test)
    test_images, test_labels = raw_fashion("test")
    assert n_test == len(x) == 2000
    np.testing.assert_allclose(x, normalized(test_images[:2000]), atol=1e-5)
    np.testing.assert_array_equal(y, test_labels[:2000])
    assert split_sizes("fashion_mnist")["test"] == len(test_images) == 10_000


def test_fashion_mnist_batches_have_model_shapes_and_ranges():
    low, high = (
        (0 - FASHION.mean[0]) / FASHION.std[0],
        (1 - FASHION.mean[0]) / FASHION.std[0],
    )
    for split, size in (("train", 160), ("validation", 40), ("test", 200)):
        dataset, n = load("fashion_mnist", split, 32, limit=200)
        assert n == size
        x, y = next(iter(dataset))
        assert x.shape == (32, 28, 28, 1) and x.dtype == tf.float32
        assert y.shape == (32,) and y.dtype == tf.int32
        assert low - 1e-5 <= x.numpy().min() and x.numpy().max() <= high + 1e-5
        assert set(y.numpy()) <= set(range(10))
    x, _ = next(iter(load("fashion_mnist", "validation", 1000)[0]))
    assert abs(x.numpy().mean()) < 0.1 and abs(x.numpy().std() - 1) < 0.1


def test_limit_batch_count_and_drop_remainder():
    train, n = load("fashion_mnist", "train", 128, limit=375)  # 300 + 75 held out
    assert n == 300 and [len(y) for _, y in train] == [128, 128]  # drops the remainder
    evaluation, n = load("fashion_mnist", "test", 128, limit=300)
    assert n == 300 and [len(y) for _, y in evaluation] == [128, 128, 44]
    tiny, n = load(
        "fashion_mnist", "train", 128, limit=60
    )  # less than a batch: keep it
    assert n == 48 and [len(y) for _, y in tiny] == [48]


@pytest.mark.parametrize("limit, train, validation", [
    (2, 1, 1), (9, 8, 1), (10, 8, 2), (333, 267, 66), (55_000, 45_000, 10_000),
    (None, 50_000, 10_000),
])
def test_limit_comes_first_and_a_fifth_at_most_validation_size_is_held_out(limit, train,
                                                                          validation):
    """A copy of any size, or a limited one, holds out a validation split: the last fifth
    of its first `limit` training examples (at least 1, at most `validation_size`)."""
    assert split_sizes("fashion_mnist", limit=limit) == {
        "train": train, "validation": validation, "test": min(limit or 10_000, 10_000)}


@pytest.mark.parametrize("limit", [2, 10, 333])
def test_load_yields_what_split_sizes_and_batches_per_epoch_count(limit):
    """The splits are the train files' first `limit` examples, in order, without overlap;
    each epoch has the batches `batches_per_epoch` counts."""
    sizes, raw = split_sizes("fashion_mnist", limit=limit), raw_fashion("train")[1]
    for split, start in (("train", 0), ("validation", sizes["train"])):
        dataset, n = load("fashion_mnist", split, 100, limit=limit)
        lengths = [len(y) for _, y in dataset]
        assert n == sizes[split]
        assert sum(lengths) == (n // 100 * 100 if split == "train" and n >= 100 else n)
        assert len(lengths) == datasets.batches_per_epoch("fashion_mnist", split, 100, limit)
        _, labels = batches(dataset)
        if split == "validation":  # in file order (training shuffles)
            np.testing.assert_array_equal(labels, raw[start:start + n])


def test_a_single_example_cannot_be_split():
    with pytest.raises(ValueError, match=r"fashion_mnist has 1 training example\(s\) here "
                                         r"\(limit 1\): at least 2 are needed"):
        load("fashion_mnist", "train", 8, limit=1)


def test_classes_keep_only_those_relabelled_in_the_given_order(tmp_path):
    """Fashion-MNIST's sandals and T-shirts, labelled 0 and 1: the limit counts their
    examples, a fifth of them is held out."""
    names = ("Sandal", "T-shirt/top")
    sizes = split_sizes("fashion_mnist", classes=names, limit=1000)
    assert sizes == {"train": 800, "validation": 200, "test": 1000}
    raw_labels = raw_fashion("train")[1]
    wanted = np.flatnonzero(np.isin(raw_labels, [5, 0]))[:1000]
    for split, part in (("train", wanted[:800]), ("validation", wanted[800:])):
        dataset, n = load("fashion_mnist", split, 100, classes=names, limit=1000,
                          drop_remainder=False)
        _, labels = batches(dataset)
        assert n == len(labels) == len(part)
        np.testing.assert_array_equal(np.sort(labels), np.sort((raw_labels[part] == 0) * 1))
    _, test_labels = batches(load("fashion_mnist", "test", 500, classes=names)[0])
    assert len(test_labels) == split_sizes("fashion_mnist", classes=names)["test"] == 2000
    assert set(test_labels) == {0, 1}


@pytest.mark.parametrize("content, needle", [
    ("Sandal\nSandals\n", "line 2: 'Sandals' is no class of fashion_mnist"),
    ("Sandal\n\nBag\nSandal\n", "line 4: 'Sandal' is listed twice (first on line 1)"),
    ("\n\n", "lists no class"),
    (None, "is unreadable (No such file or directory)"),
])
def test_bad_classes_files_are_named_with_the_line(content, needle, tmp_path):
    path = tmp_path / "classes.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as error:
        read_classes("fashion_mnist", str(path))
    assert str(path) in str(error.value) and needle in str(error.value)


def test_validation_and_test_are_deterministic():
    for split in ("validation", "test"):
        first = batches(load("fashion_mnist", split, 64, seed=0, limit=256)[0])
        again = batches(load("fashion_mnist", split, 64, seed=7, limit=256)[0])
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


def test_training_order_and_augmentation_follow_the_seed():
    def first_batch(dataset):
        return next(iter(dataset))[0].numpy()

    seed0, _ = load("fashion_mnist", "train", 64, seed=0, limit=512)
    seed0_again, _ = load("fashion_mnist", "train", 64, seed=0, limit=512)
    seed1, _ = load("fashion_mnist", "train", 64, seed=1, limit=512)
    epoch1 = first_batch(seed0)
    np.testing.assert_array_equal(epoch1, first_batch(seed0_again))  # reproducible
    assert not np.array_equal(epoch1, first_batch(seed1))
    assert not np.array_equal(epoch1, first_batch(seed0))  # a new epoch reshuffles


def test_an_epoch_is_the_same_whatever_was_read_before_it():
    def batches(dataset):
        return [(x.numpy(), y.numpy()) for x, y in dataset]

    common = dict(seed=3, limit=320)  # 256 training examples: 8 batches
    whole = batches(load("fashion_mnist", "train", 32, epochs=(0, 3), **common)[0])
    assert len(whole) == 3 * datasets.batches_per_epoch("fashion_mnist", "train", 32, 320)
    # A run resumed at epoch 1, batch 2 reads what the uninterrupted run read from there.
    resumed = batches(load("fashion_mnist", "train", 32, epochs=(1, 3), skip=2, **common)[0])
    assert len(resumed) == len(whole) - 8 - 2
    for (x, y), (x2, y2) in zip(whole[10:], resumed):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    # Under a global seed and op determinism (as train.py runs) nothing changes.
    tf.keras.utils.set_random_seed(0)
    again = batches(load("fashion_mnist", "train", 32, epochs=(0, 3), **common)[0])
    np.testing.assert_array_equal(whole[5][0], again[5][0])
    assert not np.array_equal(whole[0][1], whole[8][1])  # epochs differ from each other
    capped = batches(load("fashion_mnist", "train", 32, epochs=(0, 2), steps_per_epoch=3, **common)[0])
    assert len(capped) == 6
    np.testing.assert_array_equal(capped[3][0], whole[8][0])  # epoch 1 starts alike


def test_a_capped_epoch_resumed_inside_reads_the_batches_the_uninterrupted_run_read():
    """Keras resumes a capped epoch at step k with `steps_per_epoch - k` steps left: the
    resumed stream is the uninterrupted one from batch k on, the same examples."""
    def batches(dataset):
        return [(x.numpy(), y.numpy()) for x, y in dataset]

    common = dict(seed=3, limit=320, epochs=(0, 2), steps_per_epoch=5)  # 8 batches, 5 read
    whole = batches(load("fashion_mnist", "train", 32, **common)[0])
    resumed = batches(load("fashion_mnist", "train", 32, skip=2, **common)[0])
    assert len(whole) == 10 and len(resumed) == 8
    for (x, y), (x2, y2) in zip(whole[2:], resumed):
        np.testing.assert_array_equal(y, y2)
        assert x.tobytes() == x2.tobytes()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(skip=2), "skip=2 needs epochs"),
    (dict(skip=5, epochs=(0, 2), steps_per_epoch=5), "skip < steps_per_epoch=5"),
])
def test_a_skip_that_cannot_be_resumed_is_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        load("fashion_mnist", "train", 32, limit=320, **kwargs)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda path: _write(path, b"not gzip at all"), "not a readable gzip file"),
        (lambda path: _write(path, open(path, "rb").read()[:100]), "not a readable gzip file"),
        (lambda path: _write(path, gzip.compress(b"\0\0\x08\x03" + b"\0" * 20)),
         "holds"),
    ],
)
def test_broken_idx_files_are_named(damage, needle, tmp_path):
    for name in os.listdir(FASHION_DIR):
        (tmp_path / name).write_bytes(open(os.path.join(FASHION_DIR, name), "rb").read())
    broken = tmp_path / "t10k-images-idx3-ubyte.gz"
    damage(str(broken))
    datasets._read_idx_pair.cache_clear()
    with pytest.raises(ValueError) as error:
        load("fashion_mnist", "test", 8, data_dir=str(tmp_path))
    message = str(error.value)
    assert str(broken) in message and needle in message and "replace it" in message


def test_an_empty_data_dir_is_not_replaced_by_other_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load("fashion_mnist", "test", 8, data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value) and "/usr/share/datasets" not in str(error.value)


def test_augmentation_crops_and_flips_reproducibly():
    image = tf.constant(raw_fashion("train")[0][0][..., np.newaxis])
    augmented = [
        datasets._augment_small_image(FASHION, (image, 0), tf.constant([seed, 0], tf.int64))[0]
        for seed in range(20)
    ]
    assert all(x.shape == (28, 28, 1) and x.dtype == tf.uint8 for x in augmented)
    assert len({x.numpy().tobytes() for x in augmented}) > 10
    again = datasets._augment_small_image(FASHION, (image, 0), tf.constant([5, 0], tf.int64))[0]
    np.testing.assert_array_equal(augmented[5], again)


def test_image_size_and_in_memory_sharding():
    dataset, _ = load("fashion_mnist", "train", 16, image_size=32, limit=20)
    x, _ = next(iter(dataset))
    assert x.shape == (16, 32, 32, 1)
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA


def test_idx_files_are_read_from_data_dir(tmp_path):
    # Fashion-MNIST's files stand in for MNIST's (same names and format).
    (tmp_path / "mnist").mkdir()
    for name in os.listdir(FASHION_DIR):
        os.symlink(os.path.join(FASHION_DIR, name), tmp_path / "mnist" / name)
    dataset, n = load("mnist", "test", 50, data_dir=str(tmp_path), limit=50)
    x, y = next(iter(dataset))
    spec = get_spec("mnist")
    assert n == 50 and x.shape == (50, 28, 28, 1)
    np.testing.assert_allclose(
        x, normalized(raw_fashion("test")[0][:50], spec), atol=1e-5
    )


# --- tfds datasets, mocked -----------------------------------------------------


def test_mocked_cifar10_pipeline(tmp_path):
    with mocked_tfds("cifar10", tmp_path, num_examples=24):
        assert split_sizes("cifar10", data_dir=str(tmp_path), limit=16) == {
            "train": 13, "validation": 3, "test": 16}
        for split in ("train", "validation", "test"):
            dataset, _ = load("cifar10", split, 8, data_dir=str(tmp_path), limit=16)
            x, y = batches(dataset)  # the mock ignores slices: 24 examples each
            assert x.shape == (24, 32, 32, 3) and x.dtype == np.float32
            assert y.dtype == np.int32 and set(y) <= set(range(10))
            assert np.isfinite(x).all() and -2.1 < x.min() and x.max() < 2.2
        dataset, _ = load(
            "cifar10", "train", 4, data_dir=str(tmp_path), image_size=16, limit=4
        )
        assert next(iter(dataset))[0].shape == (4, 16, 16, 3)


def test_imagenet_evaluation_is_larq_zoos_preprocessing_of_the_same_jpegs(tmp_path):
    with mocked_tfds("imagenet2012", tmp_path, num_examples=6):
        images, labels = batches(load("imagenet2012", "test", 4, data_dir=str(tmp_path),
                                      image_size=32)[0])
        raw = tfds.builder("imagenet2012", data_dir=str(tmp_path)).as_dataset(
            split=get_spec("imagenet2012").test_split, as_supervised=True,
            decoders={"image": tfds.decode.SkipDecoding()})
        for image, label, (jpeg, raw_label) in zip(images, labels, raw, strict=True):
            expected = zoo_data.preprocess_image_bytes(jpeg, is_training=False, image_size=32)
            np.testing.assert_array_equal(image, expected)
            assert label == raw_label


def test_imagenet_training_is_larq_zoos_preprocessing_given_the_same_draws(monkeypatch):
    """larq-zoo's training crop and flip with its two stateful random draws made the
    stateless draws ours makes from the seed, with larq-zoo's own crop options: if our
    options, crop, resize, flip or normalisation differed, so would the images."""
    box, flip = (tf.image.stateless_sample_distorted_bounding_box,
                 tf.image.stateless_random_flip_left_right)
    rng = np.random.default_rng(0)
    # ImageNet-like shapes, a small one, and one too thin for any crop of aspect 3:4 to
    # 4:3 (larq-zoo then falls back to the evaluation's center crop).
    for h, w in [(375, 500), (500, 333), (64, 64), (300, 20)]:
        jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        outputs = []
        for seed in range(4):
            seed = tf.constant([seed, h], tf.int64)
            ours, label = datasets._imagenet_train(jpeg, tf.constant(7, tf.int64), seed, size=48)
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            monkeypatch.setattr(tf.image, "sample_distorted_bounding_box",
                                lambda shape, bounding_boxes, **kw: box(
                                    shape, bounding_boxes, seed=crop_seed, **kw))
            monkeypatch.setattr(tf.image, "random_flip_left_right",
                                lambda image: flip(image, seed=flip_seed))
            zoo = zoo_data.preprocess_image_bytes(jpeg, is_training=True, image_size=48)
            monkeypatch.undo()
            np.testing.assert_array_equal(ours, zoo)
            assert label.dtype == tf.int32 and label == 7
            outputs.append(ours.numpy())
        center = zoo_data.preprocess_image_bytes(jpeg, image_size=48).numpy()
        center_or_flipped = [np.array_equal(x, center) or np.array_equal(x, center[:, ::-1])
                             for x in outputs]
        assert all(center_or_flipped) == (w == 20)  # the fallback there, random crops else
