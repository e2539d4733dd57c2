"""Watching the binary weights: how many flipped, how many no gradient reaches, and the
auxiliary loss, per layer and as a Keras callback (docs/METHOD.md sections 3.7 and 9)."""

from __future__ import annotations

import larq as lq
import numpy as np
import tensorflow as tf

from larq_noisy.conversion import binarized_layers, check_has_layers, mapped_layers
from larq_noisy.quantizers import NoisyMappedQuantizer

__all__ = ["FlipGuard", "FlipRateCallback", "GuardStopped", "auxiliary_losses", "flip_rates",
           "mean_saturation", "saturation", "size_weighted_mean"]


def _latent_signs(layer) -> np.ndarray:
    """`sign(W) > 0` at the precision `layer` computes with (under mixed_float16 a
    weight too small for float16 is 0 there, and sign(0) = +1)."""
    return np.asarray(lq.math.sign(tf.cast(layer.kernel, layer.compute_dtype))) > 0


def _binary_signs(layer) -> np.ndarray:
    """The signs of the binary kernel `layer` computes with."""
    quantizer = layer.kernel_quantizer
    if isinstance(quantizer, NoisyMappedQuantizer):
        signs = quantizer.output_signs(tf.cast(layer.kernel, quantizer.compute_dtype))
        return np.asarray(signs) > 0
    return _latent_signs(layer)


def flip_rates(model, reference=None) -> dict[str, float]:
    """`{layer name: rate}`: per binarized layer, the fraction of binary weights that
    differ from a reference.

    Without `reference`, the reference is `sign(W)` of the model's own latent weights:
    how much the mapper departs from sign binarization (0 for a sign layer). With a
    `reference` model of the same architecture (e.g. the pretrained baseline), the
    fraction flipped since then; binarized layers are paired in order.
    """
    layers = binarized_layers(model)
    check_has_layers(layers, model, "binarized layer")
    if reference is None:
        return {l.name: float(np.mean(_binary_signs(l) != _latent_signs(l))) for l in layers}
    references = binarized_layers(reference)
    if [tuple(l.kernel.shape) for l in references] != [tuple(l.kernel.shape) for l in layers]:
        raise ValueError(
            f"Reference model {reference.name!r} does not match {model.name!r}: "
            "their binarized kernels differ in number or shape."
        )
    return {layer.name: float(np.mean(_binary_signs(layer) != _binary_signs(ref)))
            for layer, ref in zip(layers, references)}


def size_weighted_mean(model, per_layer: dict[str, float]) -> float:
    """A per-layer fraction (`flip_rates`, `saturation`) over all the binary weights of
    the layers of `model` that `per_layer` names."""
    sizes = {l.name: l.kernel.shape.num_elements()
             for l in binarized_layers(model) if l.name in per_layer}
    return sum(per_layer[name] * size for name, size in sizes.items()) / sum(sizes.values())


def saturation(model) -> dict[str, float]:
    """`{layer name: fraction}`: per mapped layer, the fraction of binary weights that no
    gradient reaches, `|f(W)| > 1` with `clip="hardtanh"` (`NoisyMappedQuantizer.saturated`),
    0 with `clip="none"`. `ValueError` if `model` has no mapped layer."""
    layers = mapped_layers(model)
    check_has_layers(layers, model, "mapped layer (NoisyMappedQuantizer)")
    return {l.name: float(np.mean(l.kernel_quantizer.saturated(l.kernel))) for l in layers}


def mean_saturation(model, fractions: dict[str, float] | None = None) -> float:
    """The fraction of all mapped binary weights of `model` that are saturated
    (`fractions`: `saturation(model)`, computed if not given)."""
    return size_weighted_mean(model, saturation(model) if fractions is None else fractions)


def auxiliary_losses(model) -> dict[str, float]:
    """`{layer name: alpha * l_i}` at the current weights, for every mapped layer (exact
    without data: the auxiliary loss depends on the weights only)."""
    return {
        layer.name: float(layer.kernel_quantizer.auxiliary_loss(layer.kernel))
        for layer in mapped_layers(model)
    }


class FlipRateCallback(tf.keras.callbacks.Callback):
    """Adds per-layer flip rates, saturation and the auxiliary loss to the epoch logs.

    Each epoch end it writes `flip_rate/<layer>` and `flip_rate` (over all layers) and,
    for a mapped model, `saturation/<layer>`, `saturation` and `aux_loss` (the sum of
    `alpha * l_i`) into the logs, so that `History`, `CSVLogger` and `TensorBoard` record
    them. Put it before those callbacks in the list.

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
        logs.update({f"flip_rate/{name}": rate for name, rate in rates.items()})
        logs["flip_rate"] = size_weighted_mean(self.model, rates)
        if not mapped_layers(self.model):
            return
        fractions = saturation(self.model)
        logs.update({f"saturation/{name}": fraction for name, fraction in fractions.items()})
        logs["saturation"] = mean_saturation(self.model, fractions)
        logs["aux_loss"] = sum(auxiliary_losses(self.model).values())


class GuardStopped(RuntimeError):
    """`FlipGuard` stopped the training: the model was scrambling its reference."""


class FlipGuard(tf.keras.callbacks.Callback):
    """Stops a fine-tuning that throws its pretrained binary weights away in its first steps.

    After each of the steps `checks` (counted from `start`, the first step this `fit`
    runs), it measures the fraction of binary weights flipped since `reference`
    (`flip_rates`, over all binarized layers) and raises `GuardStopped` when it exceeds
    `max_flip_rate`, or at once when the loss is not finite. Healthy fine-tuning flips
    well under 5% in 10 steps; the paper's `sum` reduction flips about half of a ResNet's
    binary weights in one (docs/RESULTS.md section 1). Put it first in the callback
    list, so that it raises before anything saves the scrambled weights.

    !!! example
        ```python
        mapped.fit(data, callbacks=[larq_noisy.FlipGuard(reference=model)])
        ```

    # Arguments
        reference: The model whose binary weights count as unflipped (the pretrained one).
        max_flip_rate: The largest tolerated fraction, in [0, 1].
        checks: The steps (1-based) after which the flip rate is measured; none later.
        start: The steps already done (a resumed training), counted in `checks`.
        name: How the message names what stopped (e.g. an arm).
        advice: What the message suggests to change.
    """

    def __init__(self, reference, max_flip_rate: float = 0.05, checks=(1, 2, 3, 5, 10),
                 start: int = 0, name: str = "training", advice: str = ""):
        super().__init__()
        if not 0 <= max_flip_rate <= 1:
            raise ValueError(f"max_flip_rate={max_flip_rate!r} must be in [0, 1].")
        self.reference, self.max_flip_rate = reference, max_flip_rate
        self.checks, self.step = frozenset(checks), start
        self.last = max(checks, default=0)
        self.name, self.advice = name, advice

    def _stop(self, what: str):
        advice = f"; {self.advice}" if self.advice else ""
        raise GuardStopped(f"{self.name} stopped by the guard at step {self.step}: {what}{advice}.")

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step > self.last:
            return
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self._stop(f"the loss became {loss}")
        if self.step in self.checks:
            rate = size_weighted_mean(self.model, flip_rates(self.model, self.reference))
            if rate > self.max_flip_rate:
                self._stop(f"{rate:.1%} of its binary weights flipped since pretraining "
                           f"(bound {self.max_flip_rate:.0%} in the first {self.last} steps)")
