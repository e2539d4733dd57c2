"""Binary ResNets built from Bi-Real-style blocks: ResNet-20 for CIFAR and a small BNN.

Every binary 3x3 convolution has its own real-valued shortcut (Liu et al., Bi-Real Net,
ECCV 2018), so a ResNet basic block of two binary convolutions reads

    x = shortcut(x) + BN(QConv3x3(sign(x)))    # stride 2 and 2x channels when downsampling
    x = x + BN(QConv3x3(sign(x)))

where `shortcut` is the identity, or a full-precision 1x1 conv when the block
downsamples (as in larq-zoo; docs/METHOD.md 6.2). A ReLU before the global average
pooling (as BinaryResNetE18) gives the full-precision classifier a non-linear feature.
"""

from typing import Optional, Sequence, Union

import larq as lq
import tensorflow as tf
from larq_zoo.core.model_factory import ModelFactory
from zookeeper import Field, factory

__all__ = [
    "BNNSmallFactory", "BiRealResNetFactory", "ConstraintType", "QuantizerType", "ResNet20Factory",
]

QuantizerType = Union[str, dict, lq.quantizers.Quantizer]
ConstraintType = Union[str, dict, tf.keras.constraints.Constraint]


@factory
class BiRealResNetFactory(ModelFactory):
    """A binary ResNet of basic blocks whose binary convs each have a real shortcut:
    `2 * blocks_per_stage * len(stage_filters)` binarized layers; every stage after the
    first starts by halving the resolution, with a full-precision 1x1 shortcut conv.
    """

    model_name: str = Field("bireal_resnet")

    stem_filters: int = Field(16)
    stem_strides: int = Field(1)
    stem_pool: bool = Field(False)
    stage_filters: Sequence[int] = Field((16, 32, 64))
    blocks_per_stage: int = Field(3)
    final_activation: Optional[str] = Field("relu")

    input_quantizer: QuantizerType = Field("ste_sign")
    kernel_quantizer: QuantizerType = Field("ste_sign")
    kernel_constraint: ConstraintType = Field("weight_clip")
    kernel_initializer: str = Field("glorot_normal")
    momentum: float = Field(0.9)

    def batch_norm(self, x):
        return tf.keras.layers.BatchNormalization(momentum=self.momentum, epsilon=1e-5)(x)

    def shortcut(self, x, filters: int, strides: int):
        """Identity, or AvgPool + full-precision 1x1 conv + BN when the shape changes."""
        if strides == 1 and x.shape[-1] == filters:
            return x
        if strides > 1:
            x = tf.keras.layers.AvgPool2D(strides, strides=strides, padding="same")(x)
        x = tf.keras.layers.Conv2D(
            filters, 1, use_bias=False, kernel_initializer=self.kernel_initializer
        )(x)
        return self.batch_norm(x)

    def binary_conv(self, x, filters: int, strides: int = 1):
        """`shortcut(x) + BN(binary conv3x3(x))`: binary activations, binary weights."""
        shortcut = self.shortcut(x, filters, strides)
        x = lq.layers.QuantConv2D(
            filters, 3, strides=strides, padding="same", use_bias=False,
            input_quantizer=self.input_quantizer, kernel_quantizer=self.kernel_quantizer,
            kernel_constraint=self.kernel_constraint, kernel_initializer=self.kernel_initializer,
        )(x)
        x = self.batch_norm(x)
        return tf.keras.layers.add([x, shortcut])

    def build(self) -> tf.keras.Model:
        # Full-precision stem.
        x = tf.keras.layers.Conv2D(
            self.stem_filters, 3, strides=self.stem_strides, padding="same", use_bias=False,
            kernel_initializer="he_normal",
        )(self.image_input)
        x = self.batch_norm(x)
        if self.stem_pool:
            x = tf.keras.layers.MaxPool2D(3, strides=2, padding="same")(x)

        # Binary stages of basic blocks: two binary convs, each with its own shortcut.
        for stage, filters in enumerate(self.stage_filters):
            for block in range(self.blocks_per_stage):
                x = self.binary_conv(x, filters, strides=2 if stage > 0 and block == 0 else 1)
                x = self.binary_conv(x, filters)

        # Full-precision classifier.
        if self.final_activation:
            x = tf.keras.layers.Activation(self.final_activation)(x)
        if self.include_top:
            x = tf.keras.layers.GlobalAveragePooling2D()(x)
            x = tf.keras.layers.Dense(self.num_classes, kernel_initializer="glorot_normal")(x)
            x = tf.keras.layers.Activation("softmax", dtype="float32")(x)

        model = tf.keras.Model(inputs=self.image_input, outputs=x, name=self.model_name)
        if self.weights is not None:
            model.load_weights(self.weights)
        return model


@factory
class ResNet20Factory(BiRealResNetFactory):
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 basic blocks, 16/32/64 channels,
    18 binary convs."""

    model_name: str = Field("resnet20")  # the rest: BiRealResNetFactory's defaults


@factory
class BNNSmallFactory(BiRealResNetFactory):
    """A small, fast binary ResNet for 28x28 images (Fashion-MNIST on a CPU): a stem
    with a 3x3/2 max pool (28 -> 14), then one basic block at each of 16/32/64 channels
    (14 -> 7 -> 4), 6 binary convs."""

    model_name: str = Field("bnn_small")  # the rest: BiRealResNetFactory's defaults
    stem_pool: bool = Field(True)
    blocks_per_stage: int = Field(1)
