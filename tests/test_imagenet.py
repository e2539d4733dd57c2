"""ImageNet for real: tfds' own builders over files in ImageNet's layout, then train.py.

The files (`ilsvrc_fixture`) are a few dozen small JPEGs in the tars a user downloads;
tfds' CLI prepares them with the command the README and the not-prepared message give,
once per session; then `harness.datasets` and `train.py --dataset imagenet2012` read
them as they read the real set.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import ilsvrc_fixture
import train
from harness import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFDS = os.path.join(os.path.dirname(sys.executable), "tfds")  # tfds' CLI, of this venv


def tfds_build(name, manual_dir, data_dir):
    """The prepare command of the README, run: `(exit code, what it printed)`."""
    command = [TFDS, "build", name, "--manual_dir", str(manual_dir), "--data_dir", str(data_dir)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="session")
def ilsvrc(tmp_path_factory):
    """The fixture's tars, prepared by `tfds build imagenet2012` into a tfds data dir."""
    root = tmp_path_factory.mktemp("ilsvrc")
    manual_dir, data_dir = root / "manual", root / "tfds"
    files = ilsvrc_fixture.write_ilsvrc2012(manual_dir)
    code, output = tfds_build("imagenet2012", manual_dir, data_dir)
    return {**files, "data_dir": str(data_dir), "manual_dir": str(manual_dir),
            "build": (code, output)}


def test_the_documented_command_prepares_imagenet_and_shows_its_progress(ilsvrc, tmp_path):
    code, output = ilsvrc["build"]
    assert code == 0, output
    assert "Generating train examples" in output and "Shuffling" in output  # tqdm's bars
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "tfds build imagenet2012 --manual_dir" in readme
    # The not-prepared message gives that command, with the user's folders in it.
    with pytest.raises(FileNotFoundError) as error:
        datasets.load("imagenet2012", "train", 8, data_dir=str(tmp_path))
    manual = tmp_path / "downloads" / "manual"
    assert (f"`tfds build imagenet2012 --manual_dir {manual} --data_dir {tmp_path}`"
            in str(error.value))
    assert "hours" in str(error.value) and "155 GB" in str(error.value)


def test_tfds_labels_the_images_and_fixes_the_odd_files(ilsvrc):
    builder = tfds.builder("imagenet2012", data_dir=ilsvrc["data_dir"])
    train = sum(len(names) for names in ilsvrc["train"].values())
    assert builder.info.splits["train"].num_examples == train
    assert builder.info.splits["validation"].num_examples == len(ilsvrc["validation"])
    labels = {**{name: synset for synset, names in ilsvrc["train"].items() for name in names},
              **ilsvrc["validation"]}
    encoded = {}
    for split in ("train", "validation"):
        for example in builder.as_dataset(split=split,
                                          decoders={"image": tfds.decode.SkipDecoding()}):
            name = example["file_name"].numpy().decode()
            assert ilsvrc_fixture.LABELS[example["label"]] == labels[name]
            encoded[name] = example["image"].numpy()
    assert len(encoded) == len(labels)
    odd = ilsvrc["odd"]
    # The PNG and the CMYK JPEG are RGB JPEGs now; the grayscale one is kept as it is.
    # (PIL, as TF's decoder would make a CMYK JPEG RGB itself.)
    modes = {kind: Image.open(io.BytesIO(encoded[name])).mode for kind, name in odd.items()}
    assert modes == {"png": "RGB", "cmyk": "RGB", "grayscale": "L"}
    assert encoded[odd["png"]][:2] == b"\xff\xd8"


def test_a_small_copy_has_all_three_splits_and_every_image_loads(ilsvrc):
    """20 training images hold out 4 (a fifth, not validation_size's 10,000); the odd
    files go through larq-zoo's preprocessing like the others."""
    sizes = datasets.split_sizes("imagenet2012", data_dir=ilsvrc["data_dir"])
    assert sizes == {"train": 16, "validation": 4, "test": len(ilsvrc["validation"])}
    classes = {ilsvrc_fixture.LABELS.index(s) for s in ilsvrc["train"]}
    for split, size in sizes.items():
        dataset, n = datasets.load("imagenet2012", split, 5, data_dir=ilsvrc["data_dir"],
                                   image_size=32, drop_remainder=False)
        images = [x.numpy() for x, _ in dataset]
        labels = np.concatenate([y.numpy() for _, y in dataset])
        assert n == size == len(labels) and np.isfinite(np.concatenate(images)).all()
        assert all(x.shape[1:] == (32, 32, 3) for x in images)
        if split != "test":
            assert set(labels) <= classes


def test_the_jpeg_benchmark_reads_the_prepared_images(ilsvrc, tmp_path, monkeypatch):
    """bench/jpeg_pipeline.py --data-dir, at its smallest: the fixture's test JPEGs
    (48x64), not generated ones (ImageNet's sizes)."""
    spec = importlib.util.spec_from_file_location(
        "bench_jpeg_pipeline", os.path.join(ROOT, "bench", "jpeg_pipeline.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = tmp_path / "jpeg.json"
    monkeypatch.setattr(sys, "argv", [
        "jpeg_pipeline.py", "--data-dir", ilsvrc["data_dir"], "--images", "4",
        "--batch-size", "2", "--batches", "1", "--warmup", "0", "--repeats", "1",
        "--crop-draws", "1", "--json", str(report)])
    bench.main()
    jpegs = json.loads(report.read_text())["jpegs"]
    assert jpegs["source"] == ilsvrc["data_dir"] and jpegs["count"] == 4
    assert (jpegs["mean_height"], jpegs["mean_width"]) == (48, 64)


def _imagenet_run(ilsvrc, out, *flags):
    return train.main(["--dataset", "imagenet2012", "--data-dir", ilsvrc["data_dir"],
                       "--pretrain-epochs", "1", "--finetune-epochs", "1",
                       "--steps-per-epoch", "2", "--batch-size", "4", "--limit", "8",
                       "--output-dir", str(out), *flags])


def test_train_py_runs_imagenet_end_to_end_and_exports_each_arm(ilsvrc, tmp_path, capsys):
    out = tmp_path / "imagenet"
    # 96 pixels: birealnet18's LCE flatbuffer follows Keras there (at 32, 64 and 128 its
    # third stage differs, by up to 0.2 in the outputs).
    assert _imagenet_run(ilsvrc, out, "--arms", "sign", "lns", "--export",
                         "--image-size", "96") == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    assert list(results["arms"]) == ["sign", "lns"] and results["model"] == "birealnet18"
    # The protocol's LNS (PER_WEIGHT) keeps the checkpoint's binary weights: the guard did
    # not stop it (the paper's sum flips half of them in a step, RESULTS 1).
    assert not results["stopped"] and results["arms"]["lns"]["flip_rate"] < 0.05
    for arm, result in results["arms"].items():
        assert "test_top5" in result
        with open(result["tflite"] + ".json") as f:
            agreement = json.load(f)["agreement"]
        # Verified on the fixture's test images (export.py reads all of them, up to 256).
        assert agreement["inputs"] == f"{len(ilsvrc['validation'])} imagenet2012 test images"
        # The near-tie outputs of a barely trained 1000-class model: accepted on the
        # images LCE reproduces to rounding (larq_noisy/export.py, METHOD 7).
        assert agreement["exact_images"] >= agreement["min_exact"] >= 1


def test_classes_train_a_head_of_that_many_classes(ilsvrc, tmp_path):
    classes = tmp_path / "two.txt"
    # n02105855 is the label of the third real validation image: the test split has it.
    classes.write_text("n02105855\nn01440764\n")
    out = tmp_path / "two_classes"
    # bnn_small: any model's head is sized alike, and it trains in seconds.
    assert _imagenet_run(ilsvrc, out, "--arms", "sign", "--classes", str(classes),
                         "--model", "bnn_small", "--image-size", "32") == 0
    model = tf.keras.models.load_model(out / "arms" / "sign" / "model.h5", compile=False)
    assert model.output_shape == (None, 2)
    with open(out / "config.json") as f:
        assert json.load(f)["class_names"] == ["n02105855", "n01440764"]
    # What that run read: the 8 training images of the two synsets, a fifth held out,
    # and the test split's one image of them, its synset listed first: label 0.
    names, data_dir = ("n02105855", "n01440764"), ilsvrc["data_dir"]
    sizes = datasets.split_sizes("imagenet2012", data_dir=data_dir, limit=8, classes=names)
    assert sizes == {"train": 7, "validation": 1, "test": 1}

    def test_split(**kwargs):
        dataset, _ = datasets.load("imagenet2012", "test", 4, data_dir=data_dir,
                                   image_size=32, **kwargs)
        return [(x.tobytes(), y) for images, labels in dataset
                for x, y in zip(images.numpy(), labels.numpy())]

    synsets = {image: ilsvrc_fixture.LABELS[label] for image, label in test_split()}
    assert [(synsets[image], label) for image, label in test_split(classes=names)] == [
        ("n02105855", 0)]


def test_an_unknown_synset_is_named_before_any_work(ilsvrc, tmp_path, capsys):
    classes = tmp_path / "typo.txt"
    classes.write_text("n02105855\nn0144076\n")
    with pytest.raises(SystemExit) as exit_info:
        _imagenet_run(ilsvrc, tmp_path / "never", "--classes", str(classes))
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage
    assert last.endswith(f"error: classes file {str(classes)!r}, line 2: 'n0144076' is no "
                         "class of imagenet2012 (its 1000 classes are named as 'n01440764').")
    assert not os.path.exists(tmp_path / "never")


def test_imagenette_is_prepared_offline_from_its_archive(tmp_path):
    """tfds takes the archive it would download from the manual dir."""
    files = ilsvrc_fixture.write_imagenette(tmp_path / "manual")
    code, output = tfds_build("imagenette/320px-v2", tmp_path / "manual", tmp_path / "tfds")
    assert code == 0, output
    sizes = datasets.split_sizes("imagenette", data_dir=str(tmp_path / "tfds"))
    assert sizes == {"train": 24, "validation": 6, "test": len(files["validation"])}
    dataset, _ = datasets.load("imagenette", "test", 20, data_dir=str(tmp_path / "tfds"),
                               image_size=32)
    labels = np.concatenate([y.numpy() for _, y in dataset])
    # Each synset has its own number of images: a label on another synset's changes them.
    assert sorted(labels) == sorted(ilsvrc_fixture.IMAGENETTE_SYNSETS.index(s)
                                    for s in files["validation"].values())
