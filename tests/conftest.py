"""Test fixtures shared by the suite.

The CPU is split into two logical devices before TensorFlow starts, so that
`tf.distribute.MirroredStrategy` can be exercised on a machine without GPUs.
"""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import larq as lq  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from harness.datasets import get_spec  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

BINARY = dict(
    input_quantizer="ste_sign",
    kernel_quantizer="ste_sign",
    kernel_constraint="weight_clip",
    use_bias=False,
)


def tiny_bnn(input_shape=(12, 12, 1), num_classes=10, kernel_quantizer="ste_sign"):
    """A small functional BNN: FP stem, two binary convs, a binary dense, FP head."""
    kw = {**BINARY, "kernel_quantizer": kernel_quantizer}
    inputs = tf.keras.Input(input_shape)
    x = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = tf.keras.layers.BatchNormalization(momentum=0.9)(x)
    x = lq.layers.QuantConv2D(16, 3, padding="same", name="bconv1", **kw)(x)
    x = tf.keras.layers.BatchNormalization(momentum=0.9)(x)
    x = tf.keras.layers.MaxPool2D()(x)
    x = lq.layers.QuantConv2D(16, 3, padding="same", name="bconv2", **kw)(x)
    x = tf.keras.layers.BatchNormalization(momentum=0.9)(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    x = lq.layers.QuantDense(16, name="bdense", **kw)(x)
    x = tf.keras.layers.BatchNormalization(momentum=0.9)(x)
    x = tf.keras.layers.Dense(num_classes, name="head")(x)
    outputs = tf.keras.layers.Activation("softmax", dtype="float32")(x)
    return tf.keras.Model(inputs, outputs, name="tiny_bnn")


def set_batchnorm_statistics(model, seed=0):
    """Give every BatchNormalization of `model` random statistics, as training would.

    At their initial state (mean 0, beta 0) a sum of +-1 products reaches the next
    sign unchanged and is often exactly 0, the sign's threshold, where larq and LCE
    may round differently (`larq_noisy.export.threshold_hits`). With these, a tie
    needs an integer to equal a random float: tests that compare a model with its
    flatbuffer then depend on no CPU's rounding."""
    rng = np.random.default_rng(seed)
    for layer in model.submodules:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.set_weights([
                rng.uniform(0.5, 1.5, shape), rng.uniform(-0.5, 0.5, shape),
                rng.uniform(-0.5, 0.5, shape), rng.uniform(0.5, 2.0, shape),
            ])
    return model


@pytest.fixture
def tiny_model():
    tf.keras.utils.set_random_seed(0)
    return tiny_bnn()


@pytest.fixture
def toy_data():
    """A learnable 4-class problem on 12x12 images (class = brightest quadrant)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 4, size=256)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * 6 : r * 6 + 6, c * 6 : c * 6 + 6] += 1.5
    return x, y


@contextlib.contextmanager
def mocked_tfds(name, data_dir, num_examples):
    """tfds yielding random examples, as if `name` were prepared in `data_dir`.

    The builder's metadata is written there, its official splits of `num_examples`
    examples each, so `datasets.load` sees a prepared dataset and the mocked run goes
    through the same code as a real one. The mock yields `num_examples` examples for any
    slice of a split: `load` yields more than it counts.
    """
    spec = get_spec(name)
    builder = tfds.builder(spec.tfds_name, data_dir=str(data_dir))
    builder.data_path.mkdir(parents=True)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
        for split in ("train", spec.test_split)
    ]))
    builder.info.write_to_directory(builder.data_path)
    with tfds.testing.mock_data(
        num_examples=num_examples,
        policy=tfds.testing.MockPolicy.USE_FILES,
        data_dir=str(data_dir),
    ):
        yield
