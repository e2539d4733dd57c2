"""Export a saved model, or an arm of a train.py run, with `larq_noisy.export`, verified
on test images; loading a saved model and a dataset's test images for it."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from harness import datasets
from harness.errors import first_line
from harness.rundir import RunDir, RunFileError, is_arm_model
from larq_noisy import export

__all__ = ["DEFAULT_VERIFY_IMAGES", "dataset_images", "export_arm", "export_file", "load_model"]

#: Test images an export is verified on (the whole test split of a smaller one).
DEFAULT_VERIFY_IMAGES = 256


def export_arm(run_dir, arm: str, out_path=None, *, dataset: str | None = None,
               data_dir: str | None = None, **options) -> dict:
    """`export_file` of the model train.py saved for `arm` in `run_dir`, verified on the
    run's test split (dataset and data dir from its config.json; `dataset`, `data_dir`
    override them); `out_path` defaults to `<run_dir>/arms/<arm>/model.tflite`."""
    run = RunDir(os.fspath(run_dir))
    model_path = run.arm_model(arm)
    config = run.read_config()
    return export_file(model_path, out_path or os.path.join(run.arm(arm), "model.tflite"),
                       dataset=dataset or config.get("dataset"),
                       data_dir=data_dir or config.get("data_dir"), **options)


def export_file(model_path: str, out_path: str, *, verify: int = DEFAULT_VERIFY_IMAGES,
                dataset: str | None = None, data_dir: str | None = None, **options) -> dict:
    """Export the Keras model saved at `model_path` to `out_path`, verified on `verify` test
    images of `dataset` (`dataset_images`); `larq_noisy.export.export_model`'s report."""
    out_path = export.check_writable(out_path)
    model = load_model(model_path)
    images, source = dataset_images(model, dataset, verify, data_dir=data_dir)
    return export.export_model(model, out_path, verify_images=images, verify_source=source,
                               **options)


def load_model(path: str) -> tf.keras.Model:
    """A Keras model saved as a full-model `.h5`/`.keras` file or a SavedModel dir;
    `RunFileError` saying what to do if it cannot be read."""
    try:
        return tf.keras.models.load_model(path, compile=False)
    except (OSError, ValueError, KeyError) as error:  # truncated, not a model, not Keras'
        fix = (f"train.py writes it again if you delete {os.path.dirname(path)} and rerun "
               "that run's train.py command") if is_arm_model(path) else (
            "give the path of a model saved by `model.save` (.h5, .keras or a SavedModel "
            "directory), or a train.py run directory")
        reason = first_line(error)
        raise RunFileError(f"{path} is not a readable Keras model ({reason}): {fix}.") from None


def dataset_images(model, dataset: str | None, count: int, *, data_dir=None):
    """`export_model`'s `verify_images` and `verify_source`: up to `count` test images of
    `dataset` at `model`'s input shape, or `count` random inputs (none for 0) without a
    dataset or when its data is not on this machine."""
    if count < 0:
        raise ValueError(f"verify must be >= 0, got {count}.")
    if not dataset or not count:
        return count, None
    shape = export.check_exportable(model)  # a model that cannot be exported fails first
    try:
        batches, _ = datasets.load(dataset, "test", min(count, 256), data_dir=data_dir,
                                   image_size=shape[0], limit=count)
    except FileNotFoundError as error:
        print(f"export: {dataset} is not on this machine, verifying on random inputs ({error})")
        return count, f"{count} random inputs ({dataset} is not on this machine)"
    images = np.concatenate([x.numpy() for x, _ in batches])
    if images.shape[1:] != shape:
        raise ValueError(f"Dataset {dataset!r} gives images of shape {images.shape[1:]}, but "
                         f"model {model.name!r} takes {shape}.")
    return images, f"{len(images)} {dataset} test images"
