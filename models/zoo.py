"""larq-zoo's ImageNet BNNs with the kernel quantizer and its constraint as fields
(defaults: larq-zoo's), so that a sign-binarized baseline can be built for
`larq_noisy.to_mapped`; all else is larq-zoo's. Never build them with
`weights="imagenet"`: that downloads, and this project runs offline.
"""

from larq_zoo.literature.birealnet import BiRealNetFactory
from larq_zoo.literature.resnet_e import BinaryResNetE18Factory
from zookeeper import Field, factory

from models.bireal_resnet import ConstraintType, QuantizerType

__all__ = ["BiRealNet18Factory", "ResNetE18Factory"]


@factory
class BiRealNet18Factory(BiRealNetFactory):
    """Bi-Real Net 18 (larq-zoo) with a selectable weight quantizer."""

    kernel_quantizer: QuantizerType = Field("magnitude_aware_sign")
    kernel_constraint: ConstraintType = Field("weight_clip")


@factory
class ResNetE18Factory(BinaryResNetE18Factory):
    """BinaryResNetE18 (larq-zoo) with a selectable weight quantizer.

    The defaults are larq-zoo's, given as serialized configs so that each layer
    deserializes its own quantizer and constraint objects.
    """

    kernel_quantizer: QuantizerType = Field(
        lambda: {"class_name": "SteSign", "config": {"clip_value": 1.25}}
    )
    kernel_constraint: ConstraintType = Field(
        lambda: {"class_name": "WeightClip", "config": {"clip_value": 1.25}}
    )
