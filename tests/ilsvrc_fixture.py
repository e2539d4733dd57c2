"""ImageNet in miniature: the files a user downloads, in the layout tfds reads.

`write_ilsvrc2012` writes what tfds 4.8.3's `imagenet2012` builder reads from its manual
dir (`tensorflow_datasets/datasets/imagenet2012/imagenet2012_dataset_builder.py`):

    ILSVRC2012_img_train.tar    a tar of per-synset tars `nXXXXXXXX.tar`, each of
                                `nXXXXXXXX_<i>.JPEG`; the synset is the label
    ILSVRC2012_img_val.tar      flat `ILSVRC2012_val_000000NN.JPEG`

tfds labels the validation images with the 50,000 lines of its own
`validation_labels.txt`, the label of the k-th name of the tar in sorted order: a val tar
of N images gets the labels of the first N images of the real one. So this one holds the
first images of the real validation set under their real names, each drawn as its real
class, and its labels are tfds' (`VALIDATION_LABELS`), whatever the train synsets.

The odd files of the real set are there too, under the names tfds fixes them by: the PNG
saved as `n02105855_2933.JPEG` (tfds re-encodes it as a JPEG) and the CMYK JPEG
`n01739381_1309.JPEG` (converted to RGB); and a grayscale JPEG, which tfds keeps as it
is (the decoder makes it RGB). Every image is a real JPEG of a few hundred bytes whose
colours and stripes depend on its class, so that a model can tell the classes apart.

`write_imagenette` writes the archive tfds' `imagenette` builder downloads
(`imagenette2-320.tgz`); tfds takes it from the manual dir instead of downloading it.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

__all__ = ["CMYK_IMAGE", "IMAGENETTE_SYNSETS", "LABELS", "PNG_IMAGE", "VALIDATION_LABELS",
           "write_ilsvrc2012", "write_imagenette"]

_TFDS = tfds.core.tfds_path("datasets/imagenet2012")
#: The 1000 synsets in tfds' class order (label i is `LABELS[i]`).
LABELS = (_TFDS / "labels.txt").read_text().split()
#: The synset of each real validation image, in name order (ILSVRC2012_val_00000001 first).
VALIDATION_LABELS = (_TFDS / "validation_labels.txt").read_text().split()
#: The real set's PNG and one of its CMYK JPEGs, by the names tfds fixes them by.
PNG_IMAGE, CMYK_IMAGE = "n02105855_2933.JPEG", "n01739381_1309.JPEG"
#: Imagenette's 10 classes, as tfds names them.
IMAGENETTE_SYNSETS = tfds.core.tfds_path(
    "image_classification/imagenette_labels.txt").read_text().split()


def write_ilsvrc2012(manual_dir, synsets=("n01440764", "n01443537", "n01484850"),
                     train_per_synset: int = 4, val_per_synset: int = 2, size: int = 48,
                     odd_files: bool = True) -> dict:
    """Write `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` into `manual_dir`.

    # Arguments
        synsets: The train tar's classes.
        train_per_synset: Train images of each synset.
        val_per_synset: The val tar holds `val_per_synset` images per train synset in
            number: the first ones of the real validation set, of their real classes.
        size: The images' height; their width is 4/3 of it (ImageNet's usual aspect).
        odd_files: Add the PNG, the CMYK and a grayscale JPEG (see the module docstring);
            the first two are images of the synsets n02105855 and n01739381, which join
            `synsets` with `train_per_synset` images each.

    # Returns
        `{"train": {synset: [file names]}, "validation": {file name: synset},
        "odd": {"png", "cmyk", "grayscale": file name}, "train_tar", "val_tar": paths}`.
    """
    os.makedirs(manual_dir, exist_ok=True)
    odd = {"png": PNG_IMAGE, "cmyk": CMYK_IMAGE} if odd_files else {}
    synsets = sorted(set(synsets) | {name.split("_")[0] for name in odd.values()})
    rng = np.random.default_rng(0)
    train = {}
    for synset in synsets:
        special = [name for name in odd.values() if name.startswith(synset + "_")]
        normal = [f"{synset}_{i}.JPEG" for i in range(1, train_per_synset + 1 - len(special))]
        train[synset] = normal + special
    if odd_files:  # the first image that is neither the PNG nor the CMYK one
        odd["grayscale"] = next(n for names in train.values() for n in names
                                if n not in odd.values())

    def encoded(name, synset):
        kind = next((k for k, v in odd.items() if v == name), "rgb")
        return _encode(_draw(LABELS.index(synset), size, rng), kind)

    train_tar = os.path.join(manual_dir, "ILSVRC2012_img_train.tar")
    with tarfile.open(train_tar, "w") as outer:
        for synset, names in train.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for name in names:
                    _add(tar, name, encoded(name, synset))
            _add(outer, f"{synset}.tar", inner.getvalue())

    validation = {f"ILSVRC2012_val_{k + 1:08d}.JPEG": VALIDATION_LABELS[k]
                  for k in range(val_per_synset * len(synsets))}
    val_tar = os.path.join(manual_dir, "ILSVRC2012_img_val.tar")
    with tarfile.open(val_tar, "w") as tar:
        for name, synset in validation.items():
            _add(tar, name, encoded(name, synset))
    return {"train": train, "validation": validation, "odd": odd, "train_tar": train_tar,
            "val_tar": val_tar}


def write_imagenette(manual_dir, train_per_class: int = 3, size: int = 48) -> dict:
    """Write `imagenette2-320.tgz` (`imagenette2-320/{train,val}/<synset>/*.JPEG`, the
    archive tfds' `imagenette/320px-v2` downloads) into `manual_dir`; returns `{"train",
    "validation": {file name: synset}, "archive": path}`. The k-th synset has k + 1
    validation images: each label's count says which synset it is."""
    os.makedirs(manual_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {"train": {}, "validation": {}}
    archive = os.path.join(manual_dir, "imagenette2-320.tgz")
    with tarfile.open(archive, "w:gz") as tar:
        for split, folder in (("train", "train"), ("validation", "val")):
            for k, synset in enumerate(IMAGENETTE_SYNSETS):
                for i in range(train_per_class if split == "train" else k + 1):
                    name = f"{synset}_{folder}{i}.JPEG"
                    image = _draw(LABELS.index(synset), size, rng)
                    _add(tar, f"imagenette2-320/{folder}/{synset}/{name}", _encode(image))
                    files[split][name] = synset
    return {**files, "archive": archive}


def _draw(label: int, size: int, rng) -> np.ndarray:
    """A uint8 RGB image of `size` x 4/3 `size`: stripes of a colour and an angle that
    depend on `label`, shifted at random, with noise."""
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
    angle = np.pi * (label % 12) / 12
    y, x = np.mgrid[:size, :size * 4 // 3]
    wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) / 3 + rng.uniform(0, 2 * np.pi))
    image = 128 + wave[..., None] * (colour - 128) + rng.normal(0, 12, (*wave.shape, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, kind: str = "rgb") -> bytes:
    """`image` as a JPEG ("rgb", "grayscale" or "cmyk") or as a PNG ("png")."""
    picture = Image.fromarray(image)
    picture = {"grayscale": picture.convert("L"), "cmyk": picture.convert("CMYK")}.get(
        kind, picture)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG" if kind == "png" else "JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file `name` holding `data` to `tar`."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
