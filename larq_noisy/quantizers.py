"""`NoisyMappedQuantizer`: learned binary weight mapping with noisy supervision."""

from __future__ import annotations

import inspect
import math
import numbers

import larq as lq
import tensorflow as tf

from larq_noisy.losses import check_noise_rates
from larq_noisy.mappers import MAPPERS, build_mapper, map_kernel

__all__ = [
    "DEFAULTS", "PAPER", "DoReFaSign", "NoisyMappedQuantizer", "binary_scale", "check_options",
    "filters_to_kernel", "kernel_to_filters", "reduced_unbiased_loss",
]

REDUCTIONS = ("sum", "mean")
LABELS = ("current", "frozen")
STARTS = ("identity", "warmup")
SCALES = (None, "layer", "channel")
CLIPS = ("hardtanh", "none")


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {list(choices)}.")


#: The paper's setting of the method (Han et al. 2020, Sec. 5.1, CIFAR-10): what
#: `train.py --preset paper` restores on any dataset, and the CIFAR-10 and ImageNet
#: protocols' setting.
PAPER = {
    "mapper": "cnn", "alpha": 1.0, "rho_pos": 0.005, "rho_neg": 0.005, "reduction": "sum",
    "clip": "hardtanh", "aux_to_latent": True,
}
#: The quantizer's defaults: the paper's, except that the auxiliary loss trains the
#: mapper only. The paper's anchoring of W through it measured -0.46 points (0 of 5
#: paired seeds, p = 0.01; docs/RESULTS.md section 1), the one option whose measured
#: effect goes against the paper; keeping the hardtanh clip also follows that section.
DEFAULTS = {**PAPER, "aux_to_latent": False}

#: The options of `NoisyMappedQuantizer` (its signature holds their defaults).
OPTIONS = (
    "mapper", "alpha", "rho_pos", "rho_neg", "width", "reduction", "labels", "start", "scale",
    "clip", "aux_to_latent", "scale_clip", "scale_gradient",
)


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
    scale_clip = o["scale_clip"]
    if scale_clip is not None and (not isinstance(scale_clip, numbers.Real) or scale_clip <= 0):
        raise ValueError(f"scale_clip={scale_clip!r} must be a number > 0 or None.")
    if not isinstance(o["scale_gradient"], bool):
        raise ValueError(f"scale_gradient={o['scale_gradient']!r} must be True or False.")
    _choice("clip", o["clip"], CLIPS)
    if not isinstance(o["aux_to_latent"], bool):
        raise ValueError(f"aux_to_latent={o['aux_to_latent']!r} must be True or False.")
    alpha, width = o["alpha"], o["width"]
    if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be a finite number >= 0.")
    if width is not None and (
        not isinstance(width, numbers.Real) or not math.isfinite(width) or width <= 0
    ):
        raise ValueError(f"width={width!r} must be a finite number > 0 or None.")
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


def binary_scale(kernel, scale, clip=None, gradient=False):
    r"""The $s$ of a scaled binary kernel $s \cdot \mathrm{sign}(W)$: a mean of $|W|$.

    \\[ s = \mathrm{mean}\,|\mathrm{clip}(W, -c, c)| \\]

    over the whole kernel with `scale="layer"` (one scale per layer: DoReFa-Net's
    1-bit weights), or over all axes but the last with `scale="channel"` (one per
    output channel: XNOR-Net, `magnitude_aware_sign`). `clip` is $c$ (`None`: no
    clip). With `gradient=False` $s$ is a constant for backprop (`tf.stop_gradient`,
    as `magnitude_aware_sign`); with `True` its gradient reaches $W$ (XNOR-Net's
    paper).

    !!! example
        ```python
        s = binary_scale(kernel, "layer")  # a scalar
        ```
    """
    magnitude = tf.abs(kernel if clip is None else tf.clip_by_value(kernel, -clip, clip))
    if scale == "layer":
        # A float16 sum over a whole kernel overflows (3x3x512x512 weights of mean 0.03
        # sum past 65504): accumulate in float32 at least.
        wide = tf.float32 if kernel.dtype in (tf.float16, tf.bfloat16) else kernel.dtype
        mean = tf.cast(tf.reduce_mean(tf.cast(magnitude, wide)), kernel.dtype)
    else:  # in the kernel's dtype, exactly as magnitude_aware_sign
        mean = tf.reduce_mean(magnitude, axis=list(range(len(kernel.shape) - 1)))
    return mean if gradient else tf.stop_gradient(mean)


def reduced_unbiased_loss(pred, noisy_label, rho_pos, rho_neg, reduction="sum"):
    r"""The sum (or mean) of `unbiased_loss` over all elements, as one quadratic in t.

    With $y^2 = 1$ and $\rho_y + \rho_{-y} = \rho_{+1} + \rho_{-1}$, Eq. 15 is
    $\tilde l(t, y) = (t - t^*_y)^2 + c_y$ with

    \\[
    t^*_y = y\,\frac{1 - \rho_{-y} + \rho_y}{1 - \rho_{+1} - \rho_{-1}},
    \qquad c_y = 1 - (t^*_y)^2,
    \\]

    so the sum is $\sum_w (t_w - t^*_{y_w})^2 + \sum_w c_{y_w}$, the second term a
    constant of the label counts: a select, a subtraction and a square per weight
    (one multiplication back), instead of the ~10 element-wise ops of the two squared
    differences (the same values up to float rounding; tests/test_mappers.py). It
    matters at ImageNet scale (11 M binary weights in ResNet-18).

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
    comes from the hardtanh). The layer computes with $\hat Q$, times
    $\mathrm{mean}|W|$ of the layer or of each output channel when `scale` is set
    (`binary_scale`). The quantizer adds the
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

    **The clip.** The corrected squared loss is a unit quadratic in $t$,
    $\tilde l(t, y) = (t - t^*_y)^2 + c_y$ with the minimum at
    $t^*_y = y\,(1 - \rho_{-y} + \rho_y) / (1 - \rho_{+1} - \rho_{-1})$
    ($y / (1 - 2\rho)$ for equal rates), so $|t^*_y| > 1$ for every $\rho_y > 0$.
    With `clip="hardtanh"` (the paper), $t = \mathrm{hardtanh}(f_\theta(W))$ and
    $\partial t / \partial f = 1$ only where $|f_\theta(W)| \le 1$: the auxiliary
    loss pushes $f_\theta(W)$ past $\pm 1$, where the clip stops every gradient
    through that binary weight, the cross-entropy's (whose STE passes through $t$)
    as well as its own (see `saturated`). With `clip="none"`, $t = f_\theta(W)$,
    the same $t$ for the loss and the sign, and the STE of the sign is the identity
    (not larq's `ste_sign`, whose gradient is 0 past $|x| > 1$, the same dead
    zone): $t^*_y$ is reachable and no weight is cut off. The loss needs no clip
    to be bounded below (the quadratic pulls $t$ back towards $t^*_y$ from either
    side), but nothing cuts a too large step either: with `reduction="sum"` the
    curvature in a mapper parameter shared by the layer's filters grows with their
    number (for the `cnn` mapper's output bias, $2\alpha\, c_{out} k^2$), and SGD at
    lr 0.01, momentum 0.9, $\alpha = 1$ diverged on `bnn_small` within 32 steps
    where the hardtanh saturated instead; `reduction="mean"`, a small $\alpha$ or
    Adam kept it finite.

    **Where the auxiliary loss trains.** With `aux_to_latent=True` (the paper) the
    gradient of $\alpha\, l_i$ reaches the latent weights through $f_\theta(W)$,
    at step 0 $2(t - t^*_y)$ per weight, pulling $W$ towards its own sign. With
    `aux_to_latent=False`, $l_i$ is computed from $f_\theta(\mathrm{sg}(W))$
    ($\mathrm{sg}$: stop-gradient): the same value and the same gradient on
    $\theta$, none on $W$; $W$ learns from the task loss alone, through the
    forward path. It costs a second mapper pass when `alpha > 0`. The default
    (`DEFAULTS`: the paper's setting `PAPER` but for this) is `False`: the anchoring
    cost 0.46 points on Fashion-MNIST (docs/RESULTS.md section 1).

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
        scale: `None`; `"layer"` to scale the binary kernel by the mean absolute
            latent weight of the layer (DoReFa-Net); `"channel"` to scale each output
            channel by that of its filter (as `magnitude_aware_sign`). See
            `binary_scale`; `to_mapped` sets it (and the next two) to match the
            layer's original quantizer.
        scale_clip: `None`, or $c > 0$: the scale is the mean of $|\mathrm{clip}(W,
            -c, c)|$.
        scale_gradient: `False` (the scale is a constant for backprop, as
            `magnitude_aware_sign`) or `True` (its gradient reaches the latent
            weights, as XNOR-Net's paper).
        clip: `"hardtanh"` ($t = \mathrm{hardtanh}(f_\theta(W))$, the paper) or
            `"none"` ($t = f_\theta(W)$, no dead zone).
        aux_to_latent: `True` (the auxiliary loss trains the mapper and the latent
            weights, the paper) or `False` (the mapper only, the default).
    """

    precision = 1

    def __init__(
        self,
        mapper: str = DEFAULTS["mapper"],
        alpha: float = DEFAULTS["alpha"],
        rho_pos: float = DEFAULTS["rho_pos"],
        rho_neg: float = DEFAULTS["rho_neg"],
        width: float | None = None,
        reduction: str = DEFAULTS["reduction"],
        labels: str = "current",
        start: str = "identity",
        scale: str | None = None,
        clip: str = DEFAULTS["clip"],
        aux_to_latent: bool = DEFAULTS["aux_to_latent"],
        scale_clip: float | None = None,
        scale_gradient: bool = False,
        **kwargs,
    ):
        check_options(
            mapper=mapper, alpha=alpha, rho_pos=rho_pos, rho_neg=rho_neg, width=width,
            reduction=reduction, labels=labels, start=start, scale=scale, clip=clip,
            aux_to_latent=aux_to_latent, scale_clip=scale_clip, scale_gradient=scale_gradient,
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
        self.clip = clip
        self.aux_to_latent = aux_to_latent
        self.scale_clip = None if scale_clip is None else float(scale_clip)
        self.scale_gradient = scale_gradient

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

    def mapped(self, kernel):
        """`f(W)`, the mapper's output in the kernel's layout, before any clip."""
        mapped = map_kernel(self.mapper_kind, self.mapper, kernel)  # a faster exact path
        if mapped is None:
            mapped = filters_to_kernel(self.mapper(kernel_to_filters(kernel)), kernel.shape)
        return kernel + mapped if self.start == "identity" else mapped

    def logits(self, kernel):
        """`t`, what the labels supervise and the sign binarizes: `hardtanh(f(W))`,
        or `f(W)` with `clip="none"`."""
        mapped = self.mapped(kernel)
        if self.clip == "none":
            return mapped
        return tf.clip_by_value(mapped, -1.0, 1.0)

    def saturated(self, kernel):
        """Boolean mask of the binary weights no gradient flows back through.

        With `clip="hardtanh"`, those where `|f(W)| > 1`: the clip's gradient is 0
        there (at exactly 1 `tf.clip_by_value` still passes it), so neither the
        auxiliary loss nor the task loss's STE reaches that weight; it can only move
        when the shared mapper changes for the others. With `clip="none"` no weight
        is cut off: all False.
        """
        if not self.built:
            self.build(kernel.shape)
        kernel = tf.cast(kernel, self.compute_dtype)
        if self.clip == "none":
            return tf.zeros(kernel.shape, tf.bool)
        return tf.abs(self.mapped(kernel)) > 1.0

    def noisy_labels(self, kernel):
        """`sign(W)` (or the frozen signs), constant: no gradient flows through them.

        The signs of `W` at the precision the layer computes with (under
        `mixed_float16`, a weight too small for float16 is 0 there, and sign(0) = +1).
        """
        labels = lq.math.sign(tf.cast(kernel, self.compute_dtype))
        if self.labels == "frozen":
            frozen = tf.cast(self.frozen_labels, labels.dtype)
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
        signs = lq.math.sign(tf.cast(kernel, self.compute_dtype))  # as noisy_labels
        self.frozen_labels.assign(tf.cast(signs, self.frozen_labels.dtype))

    def auxiliary_loss(self, kernel, logits=None):
        """`alpha * l_i`, the term this quantizer adds to the model's loss.

        `logits` (`self.logits(kernel)` if not given) are used as given; only when
        computed here is the gradient to `kernel` cut for `aux_to_latent=False`.
        """
        kernel = tf.cast(kernel, self.compute_dtype)  # a float32 variable under mixed_float16
        if logits is None:
            logits = self.logits(kernel if self.aux_to_latent else tf.stop_gradient(kernel))
        loss = reduced_unbiased_loss(
            tf.cast(logits, tf.float32),
            tf.cast(self.noisy_labels(kernel), tf.float32),
            self.rho_pos,
            self.rho_neg,
            self.reduction,
        )
        return self.alpha * loss

    def binary_signs(self, kernel):
        """The mapped binary kernel `Q^` in {-1, +1}, without scale."""
        return lq.math.sign(self.logits(kernel))

    def _scaled(self, signs, kernel):
        if self.scale is None:
            return signs
        return binary_scale(kernel, self.scale, self.scale_clip, self.scale_gradient) * signs

    def binary_kernel(self, kernel):
        """The kernel the layer computes with: `Q^`, scaled if `scale` is set."""
        if not self.built:
            self.build(kernel.shape)
        kernel = tf.cast(kernel, self.compute_dtype)
        return self._scaled(self.binary_signs(kernel), kernel)

    def call(self, inputs):
        logits = self.logits(inputs)
        # aux_to_latent=False needs its own mapper pass on sg(W), unless alpha = 0
        # (then the loss and all its gradients are 0 anyway).
        shared = self.aux_to_latent or self.alpha == 0
        self.add_loss(self.auxiliary_loss(inputs, logits if shared else None))
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
            "clip": self.clip,
            "aux_to_latent": self.aux_to_latent,
            "scale_clip": self.scale_clip,
            "scale_gradient": self.scale_gradient,
        }


@lq.utils.register_alias("dorefa")
@lq.utils.register_keras_custom_object
class DoReFaSign(lq.quantizers.Quantizer):
    r"""DoReFa-Net's binary weights: the sign scaled by the layer's mean absolute weight.

    \\[ q(W) = \mathrm{mean}(|W|) \cdot \mathrm{sign}(W) \\]

    with one mean over the whole kernel (Zhou et al., "DoReFa-Net", 2016, Sec. 2.3:
    a scalar rather than XNOR-Net's per-channel means, so that binary kernels serve
    the backward pass too): the weight binarization of the LNS paper's CIFAR-10
    baseline, and what `bake` gives a layer mapped with `scale="layer"`. The mean is
    `binary_scale(W, "layer")`, accumulated in float32 under `mixed_float16`.
    Backward: the mean is a constant and the sign's gradient is the straight-through
    estimator, zero where $|W| >$ `clip_value` (with `weight_clip` it passes
    everywhere, as DoReFa's identity), times the mean, as larq's
    `magnitude_aware_sign` and the mapped layers, so that a baseline and its mapped
    arms differ only by the mapper. Not larq's `DoReFa` (`"dorefa_quantizer"`),
    whose 1-bit weights are not scaled.

    !!! example
        ```python
        layer = lq.layers.QuantConv2D(64, 3, input_quantizer="ste_sign",
                                      kernel_quantizer="dorefa",
                                      kernel_constraint="weight_clip")
        ```

    # Arguments
        clip_value: Threshold for clipping gradients. If `None` gradients are not
            clipped.
    """

    precision = 1

    def __init__(self, clip_value: float | None = 1.0, **kwargs):
        self.clip_value = clip_value
        super().__init__(**kwargs)

    def call(self, inputs):
        sign = lq.quantizers.ste_sign(inputs, clip_value=self.clip_value)
        return binary_scale(inputs, "layer") * sign

    def get_config(self):
        return {**super().get_config(), "clip_value": self.clip_value}
