"""The unbiased noisy-supervision loss (docs/METHOD.md section 3)."""

from __future__ import annotations

import numbers

import tensorflow as tf

__all__ = ["check_noise_rates", "squared_loss", "unbiased_loss"]


def check_noise_rates(rho_pos, rho_neg, dtype="float32") -> None:
    """Raise `ValueError` unless the flip rates define the unbiased estimator.

    Each rate must lie in [0, 1) and `rho_pos + rho_neg < 1`; otherwise the
    normaliser `1 - rho_pos - rho_neg` is zero or negative and the estimator is
    undefined. Both must also hold in `dtype`, the floating dtype the loss is
    computed in (float32 by default, as in `NoisyMappedQuantizer`): rates whose sum
    rounds to 1 there would divide by zero, and the estimator's values for
    predictions in [-1, 1] (at most `8 / (1 - rho_pos - rho_neg)` in magnitude) must
    be finite there (in float16: `1 - rho_pos - rho_neg >= 1.22e-4`). Tensors are not
    checked (their value is unknown when tracing).
    """
    for name, rho in (("rho_pos", rho_pos), ("rho_neg", rho_neg)):
        if isinstance(rho, numbers.Real) and not 0.0 <= rho < 1.0:
            raise ValueError(
                f"{name}={rho!r} is outside the valid range [0, 1): it is the "
                "probability that a noisy label flips."
            )
    if not (isinstance(rho_pos, numbers.Real) and isinstance(rho_neg, numbers.Real)):
        return
    if rho_pos + rho_neg >= 1.0:
        raise ValueError(
            f"rho_pos + rho_neg = {rho_pos} + {rho_neg} = {rho_pos + rho_neg} "
            "must be < 1 for the unbiased estimator to be defined."
        )
    dtype = tf.as_dtype(dtype)
    if not dtype.is_floating:
        return
    as_dtype = dtype.as_numpy_dtype
    in_dtype = float(as_dtype(1.0) - as_dtype(rho_pos) - as_dtype(rho_neg))
    largest = 8.0 / (1.0 - rho_pos - rho_neg)
    if not in_dtype > 0.0 or largest > dtype.max:
        raise ValueError(
            f"rho_pos={rho_pos}, rho_neg={rho_neg}: 1 - rho_pos - rho_neg = "
            f"{1.0 - rho_pos - rho_neg:.3g} is {in_dtype:.3g} in {dtype.name}, where the "
            f"loss is computed, and the loss would reach {largest:.3g} (largest "
            f"{dtype.name}: {dtype.max:.3g}); lower rho_pos + rho_neg or compute the loss "
            "in a wider dtype."
        )


def _as(value, dtype):
    # tf.cast would round a Python float through float32 first.
    if tf.is_tensor(value):
        return tf.cast(value, dtype)
    return tf.convert_to_tensor(value, dtype=dtype)


def squared_loss(pred, label):
    """The base loss of the paper, `l(t, y) = (t - y)^2`."""
    return tf.math.squared_difference(pred, label)


def unbiased_loss(pred, noisy_label, rho_pos, rho_neg):
    r"""Element-wise squared loss corrected for class-conditional label noise.

    With flip rates $\rho_{+1} = P(\tilde q = -1 \mid q = +1)$ and
    $\rho_{-1} = P(\tilde q = +1 \mid q = -1)$, the corrected loss of a prediction
    $t$ against a noisy label $y \in \{-1, +1\}$ is (Natarajan et al. 2013;
    Han et al. 2020, Eq. 15)

    \\[
    \tilde l(t, y) = \frac{(1 - \rho_{-y})\, l(t, y) - \rho_{y}\, l(t, -y)}
                          {1 - \rho_{+1} - \rho_{-1}},
    \qquad l(t, y) = (t - y)^2 .
    \\]

    It is unbiased: $(1 - \rho_y)\,\tilde l(t, y) + \rho_y\,\tilde l(t, -y) = l(t, y)$
    for every $t$, so its expectation over the label noise is the clean loss.
    With $\rho_{\pm 1} = 0$ it is the plain squared loss.

    !!! example
        ```python
        t = tf.constant([0.3, -0.9])
        y = tf.constant([1.0, 1.0])
        unbiased_loss(t, y, rho_pos=0.005, rho_neg=0.005)
        ```

    # Arguments
        pred: Predictions $t$, any shape.
        noisy_label: Labels in $\{-1, +1\}$, broadcastable to `pred`.
        rho_pos: $\rho_{+1}$, in [0, 1).
        rho_neg: $\rho_{-1}$, in [0, 1), with `rho_pos + rho_neg < 1`.

    # Returns
        The element-wise corrected loss, shaped like `pred`.
    """
    pred = tf.convert_to_tensor(pred)
    check_noise_rates(rho_pos, rho_neg, dtype=pred.dtype)
    label = _as(noisy_label, pred.dtype)
    positive = label > 0
    if isinstance(rho_pos, numbers.Real) and isinstance(rho_neg, numbers.Real):
        # The coefficients in float64 (Python floats), then cast: 1 - rho_pos - rho_neg
        # computed in pred's dtype could round to a much smaller number, or to 0.
        denominator = 1.0 - rho_pos - rho_neg
        coefficients = [
            ((1.0 - rho_neg) / denominator, (1.0 - rho_pos) / denominator),  # of l(t, y)
            (rho_pos / denominator, rho_neg / denominator),  # of l(t, -y)
        ]
        same, other = (
            tf.where(positive, _as(for_pos, pred.dtype), _as(for_neg, pred.dtype))
            for for_pos, for_neg in coefficients
        )
        return same * squared_loss(pred, label) - other * squared_loss(pred, -label)
    rho_pos, rho_neg = (_as(value, pred.dtype) for value in (rho_pos, rho_neg))
    rho_y = tf.where(positive, rho_pos, rho_neg)  # flip rate of the label's class
    rho_not_y = tf.where(positive, rho_neg, rho_pos)  # flip rate of the other class
    corrected = (1.0 - rho_not_y) * squared_loss(pred, label) - rho_y * squared_loss(
        pred, -label
    )
    return corrected / (1.0 - rho_pos - rho_neg)
