"""Sign-binarized baseline BNNs for larq-noisy: `build(name, ...)` of the registry `MODELS`.

```python
import models
model = models.build("resnet20", (32, 32, 3), 10, kernel_quantizer="ste_sign")
mapped = larq_noisy.to_mapped(model)
```

Stem, downsampling 1x1 shortcuts and classifier are full precision, the softmax float32
(`mixed_float16` works); docs/METHOD.md section 6.2 lists each model's binarized convs.
"""

import os
from typing import Optional, Tuple

import tensorflow as tf

from larq_noisy.quantizers import DoReFaSign  # registers "dorefa"
from models.bireal_resnet import BiRealResNetFactory, BNNSmallFactory, ResNet20Factory
from models.zoo import BiRealNet18Factory, ResNetE18Factory

__all__ = [
    "MODELS", "WEIGHTS_DIR", "WEIGHT_QUANTIZERS", "BNNSmallFactory", "BiRealNet18Factory",
    "BiRealResNetFactory", "DoReFaSign", "ResNet20Factory", "ResNetE18Factory", "build",
]

#: Pretrained checkpoints shipped with the repository, each with a .json beside it.
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

#: The models by name: larq-zoo-style factories.
MODELS = {
    "bnn_small": BNNSmallFactory,
    "resnet20": ResNet20Factory,
    "birealnet18": BiRealNet18Factory,
    "resnet_e18": ResNetE18Factory,
}

#: The selectable weight binarizations of the binarized layers.
WEIGHT_QUANTIZERS = ("ste_sign", "magnitude_aware_sign", "dorefa")


def _check_choice(what: str, value, choices, note: str = "") -> None:
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {list(choices)}{note}.")


def build(name: str, input_shape: Tuple[int, int, int], num_classes: int, *,
          kernel_quantizer: Optional[str] = None, weights: Optional[str] = None) -> tf.keras.Model:
    """The registered model `name` (one of `MODELS`): a functional Keras model whose
    softmax has `num_classes` outputs, for images of `input_shape` `(height, width, channels)`.

    # Arguments
        kernel_quantizer: The weight binarization of the binarized layers, one of
            `WEIGHT_QUANTIZERS` (with `kernel_constraint="weight_clip"`), or `None` for
            the architecture's own (docs/METHOD.md section 6.2).
        weights: `None` (random initialization) or the path of a local weights file
            (Keras `.h5` or TF checkpoint prefix); nothing is ever downloaded.
    """
    _check_choice("model name", name, MODELS)
    overrides = {}
    if kernel_quantizer is not None:
        _check_choice("kernel_quantizer", kernel_quantizer, WEIGHT_QUANTIZERS,
                      " (or None for the architecture's default)")
        overrides = {"kernel_quantizer": kernel_quantizer, "kernel_constraint": "weight_clip"}
    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise ValueError(f"weights must be None or a local file path, not {weights!r}.")
        if str(weights) == "imagenet":
            raise ValueError(
                "weights='imagenet' would download pretrained weights, and larq-noisy runs "
                "offline: pass weights=None or the path of a local weights file."
            )
        weights = os.fspath(weights)
        if not (os.path.exists(weights) or os.path.exists(weights + ".index")):
            raise ValueError(f"weights file {weights!r} does not exist.")
    model = MODELS[name](
        input_shape=tuple(input_shape), num_classes=int(num_classes), weights=None,
        include_top=True, **overrides,
    ).build()
    if weights is not None:
        model.load_weights(weights)
    return model
