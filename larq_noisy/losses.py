"""The unbiased noisy-supervision loss (docs/METHOD.md section 3)."""

from __future__ import annotations

import numbers

import tensorflow as tf

__all__ = ["check_noise_rates", "reduced_unbiased_loss", "unbiased_loss"]


def check_noise_rates(rho_pos, rho_neg, dtype="float32") -> None:
    """Raise `ValueError` unless the flip rates define the unbiased estimator.

    Each rate must lie in [0, 1) and `rho_pos + rho_neg < 1` (docs/METHOD.md section
    3.2), in float64 and in `dtype`, the floating dtype the loss is computed in: there
    `1 - rho_pos - rho_neg` must not round to 0, and the loss, at most
    `8 / (1 - rho_pos - rho_neg)` in magnitude for predictions in [-1, 1], must be finite.
    """
    for name, rho in (("rho_pos", rho_pos), ("rho_neg", rho_neg)):
        if not (isinstance(rho, numbers.Real) and 0.0 <= rho < 1.0):
            raise ValueError(
                f"{name}={rho!r} must be a number in [0, 1): the probability that a "
                "noisy label flips."
            )
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
    for every $t$, so its expectation over the label noise is the clean loss
    (docs/METHOD.md sections 3.3-3.4). With $\rho_{\pm 1} = 0$ it is the squared loss.

    !!! example
        ```python
        t = tf.constant([0.3, -0.9])
        y = tf.constant([1.0, 1.0])
        unbiased_loss(t, y, rho_pos=0.005, rho_neg=0.005)
        ```

    # Arguments
        pred: Predictions $t$, any shape.
        noisy_label: Labels in $\{-1, +1\}$, broadcastable to `pred`.
        rho_pos: $\rho_{+1}$, a number in [0, 1).
        rho_neg: $\rho_{-1}$, a number in [0, 1), with `rho_pos + rho_neg < 1`.

    # Returns
        The element-wise corrected loss, shaped like `pred`.
    """
    pred = tf.convert_to_tensor(pred)
    check_noise_rates(rho_pos, rho_neg, dtype=pred.dtype)
    label = _as(noisy_label, pred.dtype)
    positive = label > 0
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
    return (same * tf.math.squared_difference(pred, label)
            - other * tf.math.squared_difference(pred, -label))


def reduced_unbiased_loss(pred, noisy_label, rho_pos, rho_neg, reduction="sum"):
    r"""The sum (or mean) of `unbiased_loss` over all elements, as one quadratic in t.

    With $y^2 = 1$, Eq. 15 is $\tilde l(t, y) = (t - t^*_y)^2 + c_y$ with

    \\[
    t^*_y = y\,\frac{1 - \rho_{-y} + \rho_y}{1 - \rho_{+1} - \rho_{-1}},
    \qquad c_y = 1 - (t^*_y)^2
    \\]

    (docs/METHOD.md section 3.5), so the sum is $\sum_w (t_w - t^*_{y_w})^2$ plus a
    constant of the label counts: fewer element-wise ops than the two squared
    differences, the same values up to float rounding.

    # Arguments
        pred: $t$. noisy_label: labels in $\{-1, +1\}$, shaped like `pred`.
        rho_pos, rho_neg: Python floats, as `unbiased_loss`'s.
        reduction: `"sum"` or `"mean"`.
    """
    check_noise_rates(rho_pos, rho_neg, dtype=pred.dtype)
    denominator = 1.0 - rho_pos - rho_neg  # in float64 first, as unbiased_loss
    optimum = {+1: (1.0 - rho_neg + rho_pos) / denominator,
               -1: -(1.0 - rho_pos + rho_neg) / denominator}
    offset = {y: 1.0 - t_star**2 for y, t_star in optimum.items()}
    positive = noisy_label > 0
    t_star = tf.where(positive, tf.constant(optimum[1], pred.dtype),
                      tf.constant(optimum[-1], pred.dtype))
    size = pred.shape.num_elements()
    constant = offset[-1] * size
    if offset[1] != offset[-1]:
        positives = tf.reduce_sum(tf.cast(positive, pred.dtype))
        constant = constant + (offset[1] - offset[-1]) * positives
    total = tf.reduce_sum(tf.square(pred - t_star)) + constant
    return total if reduction == "sum" else total / size
