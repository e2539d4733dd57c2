"""larq-noisy: binary neural networks trained with Learning with Noisy Supervision.

Han et al., "Training Binary Neural Networks through Learning with Noisy Supervision",
ICML 2020, as a drop-in for Larq models.
"""

from larq_noisy.conversion import bake, binarized_layers, freeze_labels, mapped_layers, to_mapped
from larq_noisy.losses import check_noise_rates, unbiased_loss
from larq_noisy.mappers import MAPPERS, build_mapper
from larq_noisy.monitoring import (
    FlipGuard, FlipRateCallback, GuardStopped, auxiliary_losses, flip_rates, mean_saturation,
    saturation, size_weighted_mean,
)
from larq_noisy.quantizers import NoisyMappedQuantizer

__version__ = "0.1.0"

__all__ = [
    "MAPPERS", "FlipGuard", "FlipRateCallback", "GuardStopped", "NoisyMappedQuantizer", "auxiliary_losses", "bake",
    "binarized_layers", "build_mapper", "check_noise_rates", "flip_rates", "freeze_labels",
    "mapped_layers", "mean_saturation", "saturation", "size_weighted_mean", "to_mapped",
    "unbiased_loss",
]
