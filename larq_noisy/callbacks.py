"""Keras callbacks that watch the binary weights while training."""

from __future__ import annotations

import tensorflow as tf

from larq_noisy.conversion import (
    flip_rates,
    mapped_layers,
    mean_flip_rate,
    mean_saturation,
    saturation,
)

__all__ = ["FlipRateCallback", "auxiliary_losses"]


def auxiliary_losses(model) -> dict[str, float]:
    """`{layer name: alpha * l_i}` at the current weights, for every mapped layer.

    The auxiliary loss depends on the weights only, so this is exact without data.
    """
    return {
        layer.name: float(layer.kernel_quantizer.auxiliary_loss(layer.kernel))
        for layer in mapped_layers(model)
    }


class FlipRateCallback(tf.keras.callbacks.Callback):
    """Adds per-layer flip rates, saturation and the auxiliary loss to the epoch logs.

    Each epoch end it writes `flip_rate/<layer>`, the overall `flip_rate` (weighted by
    layer size) and, for a mapped model, `saturation/<layer>` and `saturation` (the
    fraction of binary weights no gradient reaches, see `saturation`) and `aux_loss`
    (the sum of `alpha * l_i`) into the logs, so that `History`, `CSVLogger` and
    `TensorBoard` record them. Put it before those callbacks in the list.

    # Arguments
        reference: Optional model to count flips against (see `flip_rates`), e.g. the
            pretrained baseline; by default, `sign(W)` of the model's own weights.
    """

    def __init__(self, reference=None):
        super().__init__()
        self.reference = reference

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        rates = flip_rates(self.model, reference=self.reference)
        for name, rate in rates.items():
            logs[f"flip_rate/{name}"] = rate
        logs["flip_rate"] = mean_flip_rate(self.model, rates)
        if not mapped_layers(self.model):
            return
        fractions = saturation(self.model)
        for name, fraction in fractions.items():
            logs[f"saturation/{name}"] = fraction
        logs["saturation"] = mean_saturation(self.model, fractions)
        logs["aux_loss"] = sum(auxiliary_losses(self.model).values())
