"""`NoisyMappedQuantizer`: learned binary weight mapping with noisy supervision."""

from __future__ import annotations

import inspect
import numbers

import larq as lq
import tensorflow as tf

from larq_noisy.losses import check_noise_rates, unbiased_loss
from larq_noisy.mappers import MAPPERS, build_mapper

__all__ = ["NoisyMappedQuantizer", "check_options", "filters_to_kernel", "kernel_to_filters"]

REDUCTIONS = ("sum", "mean")
LABELS = ("current", "frozen")
STARTS = ("identity", "warmup")
SCALES = (None, "channel")


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {list(choices)}.")


#: The options of `NoisyMappedQuantizer` (its signature holds their defaults).
OPTIONS = ("mapper", "alpha", "rho_pos", "rho_neg", "width", "reduction", "labels", "start", "scale")


def check_options(**options) -> None:
    """Raise `ValueError` naming any bad `NoisyMappedQuantizer` option.

    Options not given take the quantizer's defaults. Pure Python, so settings can be
    checked before TensorFlow starts (multi-worker training needs that).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"Unknown NoisyMappedQuantizer options {unknown}; valid: {list(OPTIONS)}.")
    defaults = inspect.signature(NoisyMappedQuantizer.__init__).parameters
    o = {name: options.get(name, defaults[name].default) for name in OPTIONS}
    _choice("mapper", o["mapper"], tuple(MAPPERS))
    _choice("reduction", o["reduction"], REDUCTIONS)
    _choice("labels", o["labels"], LABELS)
    _choice("start", o["start"], STARTS)
    _choice("scale", o["scale"], SCALES)
    alpha, width = o["alpha"], o["width"]
    if not isinstance(alpha, numbers.Real) or alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be a number >= 0.")
    if width is not None and (not isinstance(width, numbers.Real) or width <= 0):
        raise ValueError(f"width={width!r} must be a number > 0 or None.")
    check_noise_rates(o["rho_pos"], o["rho_neg"])


def kernel_to_filters(kernel):
    """`(*spatial, c_in, c_out)` -> the mapper's batch `(c_out, h, w, c_in)`.

    A dense kernel `(d_in, d_out)` gives `d_out` filters of shape `1 x 1 x d_in`, a
    1-D conv kernel `(k, c_in, c_out)` gives filters of shape `k x 1 x c_in`.
    """
    rank = len(kernel.shape)
    if rank not in (2, 3, 4):
        raise ValueError(
            f"Cannot map a kernel of rank {rank} (shape {kernel.shape}); "
            "supported ranks are 2 (dense), 3 (conv1d) and 4 (conv2d)."
        )
    filters = tf.transpose(kernel, [rank - 1, *range(rank - 2), rank - 2])
    c_out, *spatial, c_in = kernel.shape[-1], *kernel.shape[:-2], kernel.shape[-2]
    h, w = (list(spatial) + [1, 1])[:2]
    return tf.reshape(filters, (c_out, h, w, c_in))


def filters_to_kernel(filters, kernel_shape):
    """Inverse of `kernel_to_filters`."""
    rank = len(kernel_shape)
    spatial = list(kernel_shape[:-2])
    filters = tf.reshape(filters, (kernel_shape[-1], *spatial, kernel_shape[-2]))
    return tf.transpose(filters, [*range(1, rank - 1), rank - 1, 0])


def _ste_sign(x):
    """`sign(x)` (with sign(0) = +1, as larq) whose gradient is the identity."""
    return x + tf.stop_gradient(lq.math.sign(x) - x)


@lq.utils.register_keras_custom_object
class NoisyMappedQuantizer(lq.quantizers.Quantizer):
    r"""Binarizes a kernel through a learned mapper, supervised by its noisy signs.

    A mapper network $f_\theta$ (one per layer) maps the layer's latent filters $W$
    to their binary filters, and the signs of the latent weights serve as noisy
    labels of the optimal binary weights (Han et al., ICML 2020):

    \\[
    t = \mathrm{hardtanh}(f_\theta(W)), \qquad \hat Q = \mathrm{sign}(t),
    \\]

    with the straight-through estimator through the sign (the clip to $|t| \le 1$
    comes from the hardtanh). The layer computes with $\hat Q$, scaled per output
    channel by $\mathrm{mean}|W|$ when `scale="channel"`. The quantizer adds the
    auxiliary loss $\alpha\, l_i$ with `add_loss`, where

    \\[
    l_i = \sum_{w} \tilde l\big(t_w, \tilde q_w\big), \qquad \tilde q = \mathrm{sign}(W),
    \\]

    $\tilde l$ being `unbiased_loss` with flip rates $\rho_{+1}, \rho_{-1}$. The
    labels carry no gradient. With `start="identity"` the mapper is residual,
    $f_\theta(W) = W + g_\theta(W)$ with the last layer of $g_\theta$ zero at step 0,
    so $\hat Q = \mathrm{sign}(W)$ and a converted model starts at exactly the
    pretrained accuracy; `start="warmup"` is the paper's plain mapper, to be
    warmed up with all other weights frozen.

    !!! example
        ```python
        layer = lq.layers.QuantConv2D(
            64, 3,
            input_quantizer="ste_sign",
            kernel_quantizer=larq_noisy.NoisyMappedQuantizer(alpha=1.0, rho_pos=0.005,
                                                            rho_neg=0.005),
            kernel_constraint="weight_clip",
        )
        ```

    # Arguments
        mapper: Mapper family, one of `"cnn"` (the paper's), `"mlp"`, `"linear"`.
        alpha: Weight of the auxiliary loss, >= 0 (`alpha=0` is "ours w/o noisy
            supervision").
        rho_pos: $\rho_{+1}$, the probability that a +1 weight has label -1.
        rho_neg: $\rho_{-1}$, the probability that a -1 weight has label +1.
        width: Hidden width of the mapper as a multiple of `c_in`; `None` for the
            family's default (the paper's 2.0 for `cnn`).
        reduction: `"sum"` over the layer's weights (the paper, Eq. 17) or `"mean"`.
        labels: `"current"` signs of the latent weights, or `"frozen"` signs captured
            by `larq_noisy.freeze_labels` (done by `to_mapped`); until captured,
            frozen labels fall back to the current signs.
        start: `"identity"` (residual mapper, zero-initialised output) or `"warmup"`.
        scale: `None`, or `"channel"` to scale each output channel by the mean
            absolute latent weight of its filter (as `magnitude_aware_sign`).
    """

    precision = 1

    def __init__(
        self,
        mapper: str = "cnn",
        alpha: float = 1.0,
        rho_pos: float = 0.005,
        rho_neg: float = 0.005,
        width: float | None = None,
        reduction: str = "sum",
        labels: str = "current",
        start: str = "identity",
        scale: str | None = None,
        **kwargs,
    ):
        check_options(
            mapper=mapper, alpha=alpha, rho_pos=rho_pos, rho_neg=rho_neg, width=width,
            reduction=reduction, labels=labels, start=start, scale=scale,
        )
        super().__init__(**kwargs)
        self.mapper_kind = mapper
        self.alpha = float(alpha)
        self.rho_pos = float(rho_pos)
        self.rho_neg = float(rho_neg)
        self.width = width
        self.reduction = reduction
        self.labels = labels
        self.start = start
        self.scale = scale

    def build(self, input_shape):
        kernel_shape = tf.TensorShape(input_shape).as_list()
        filter_shape = kernel_to_filters(tf.zeros(kernel_shape)).shape[1:]
        self.mapper = build_mapper(
            self.mapper_kind,
            filter_shape,
            width=self.width,
            zero_init_output=self.start == "identity",
            name=f"{self.name}_mapper",
            dtype=self.dtype_policy,
        )
        self.mapper.build((None, *filter_shape))
        if self.labels == "frozen":
            # 0 means "not captured yet": the current sign is used there.
            self.frozen_labels = self.add_weight(
                name="frozen_labels",
                shape=kernel_shape,
                initializer="zeros",
                trainable=False,
            )
        super().build(input_shape)

    def logits(self, kernel):
        """`t = hardtanh(f(W))`, the continuous output that the labels supervise."""
        filters = kernel_to_filters(kernel)
        mapped = self.mapper(filters)
        if self.start == "identity":
            mapped = filters + mapped
        return tf.clip_by_value(filters_to_kernel(mapped, kernel.shape), -1.0, 1.0)

    def noisy_labels(self, kernel):
        """`sign(W)` (or the frozen signs), constant: no gradient flows through them."""
        labels = lq.math.sign(kernel)
        if self.labels == "frozen":
            frozen = tf.cast(self.frozen_labels, kernel.dtype)
            labels = tf.where(frozen == 0, labels, frozen)
        return tf.stop_gradient(labels)

    def freeze_labels(self, kernel):
        """Capture `sign(kernel)` as the labels (only with `labels="frozen"`)."""
        if self.labels != "frozen":
            raise ValueError(
                f"freeze_labels needs labels='frozen', this quantizer has {self.labels!r}."
            )
        if not self.built:
            self.build(kernel.shape)
        self.frozen_labels.assign(lq.math.sign(tf.cast(kernel, tf.float32)))

    def auxiliary_loss(self, kernel, logits=None):
        """`alpha * l_i`, the term this quantizer adds to the model's loss."""
        logits = self.logits(kernel) if logits is None else logits
        pointwise = unbiased_loss(
            tf.cast(logits, tf.float32),
            tf.cast(self.noisy_labels(kernel), tf.float32),
            self.rho_pos,
            self.rho_neg,
        )
        reduce = tf.reduce_sum if self.reduction == "sum" else tf.reduce_mean
        return self.alpha * reduce(pointwise)

    def binary_signs(self, kernel):
        """The mapped binary kernel `Q^` in {-1, +1}, without scale."""
        return lq.math.sign(self.logits(kernel))

    def _scaled(self, signs, kernel):
        if self.scale != "channel":
            return signs
        reduce_axes = list(range(len(kernel.shape) - 1))
        scale = tf.stop_gradient(tf.reduce_mean(tf.abs(kernel), axis=reduce_axes))
        return scale * signs

    def binary_kernel(self, kernel):
        """The kernel the layer computes with: `Q^`, scaled if `scale` is set."""
        if not self.built:
            self.build(kernel.shape)
        kernel = tf.cast(kernel, self.compute_dtype)
        return self._scaled(self.binary_signs(kernel), kernel)

    def call(self, inputs):
        logits = self.logits(inputs)
        self.add_loss(self.auxiliary_loss(inputs, logits))
        return self._scaled(_ste_sign(logits), inputs)

    def get_config(self):
        return {
            **super().get_config(),
            "mapper": self.mapper_kind,
            "alpha": self.alpha,
            "rho_pos": self.rho_pos,
            "rho_neg": self.rho_neg,
            "width": self.width,
            "reduction": self.reduction,
            "labels": self.labels,
            "start": self.start,
            "scale": self.scale,
        }
