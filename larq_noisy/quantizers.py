"""`NoisyMappedQuantizer`: learned binary weight mapping with noisy supervision."""

from __future__ import annotations

import inspect
import math
import numbers

import larq as lq
import tensorflow as tf

from larq_noisy.losses import check_noise_rates, reduced_unbiased_loss
from larq_noisy.mappers import MAPPERS, build_mapper, map_kernel

__all__ = [
    "DEFAULTS", "OPTIONS", "PAPER", "PER_WEIGHT", "DoReFaSign", "NoisyMappedQuantizer", "apply_scale",
    "binary_scale", "check_options", "filters_to_kernel", "kernel_to_filters",
]

REDUCTIONS = ("sum", "mean")
LABELS = ("current", "frozen")
STARTS = ("identity", "warmup")
SCALES = (None, "layer", "channel")
CLIPS = ("hardtanh", "none")

#: The paper's setting of the method (Han et al. 2020, Sec. 5.1, CIFAR-10).
PAPER = {
    "mapper": "cnn", "alpha": 1.0, "rho_pos": 0.005, "rho_neg": 0.005, "reduction": "sum",
    "clip": "hardtanh", "aux_to_latent": True,
}
#: The setting that holds at every layer size (docs/METHOD.md section 3.6): the loss
#: averaged per weight, so that alpha means the same on a 2,304-weight and a 2.36 M-weight
#: layer, and the `separable` mapper, whose step does not grow with the layer under SGD.
#: Measured on ResNet-20, Bi-Real Net 18 and ResNet-E 18 (docs/RESULTS.md section 1); the
#: paper's `sum` flips about half of their binary weights in one step.
PER_WEIGHT = {**PAPER, "mapper": "separable", "reduction": "mean"}
#: The quantizer's defaults (docs/METHOD.md section 8).
DEFAULTS = PER_WEIGHT


def check_options(**options) -> dict:
    """Every `NoisyMappedQuantizer` option (`OPTIONS`), the defaults filled in;
    `ValueError` naming any bad one. Pure Python: settings are checked before
    TensorFlow starts (multi-worker training needs that)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"Unknown NoisyMappedQuantizer options {unknown}; valid: {list(OPTIONS)}.")
    defaults = inspect.signature(NoisyMappedQuantizer.__init__).parameters
    o = {name: options.get(name, defaults[name].default) for name in OPTIONS}
    choices = (("mapper", tuple(MAPPERS)), ("reduction", REDUCTIONS), ("labels", LABELS),
               ("start", STARTS), ("scale", SCALES), ("clip", CLIPS))
    for name, valid in choices:
        if o[name] not in valid:
            raise ValueError(f"Unknown {name} {o[name]!r}; choose one of {list(valid)}.")
    scale_clip = o["scale_clip"]
    if scale_clip is not None and (not isinstance(scale_clip, numbers.Real) or scale_clip <= 0):
        raise ValueError(f"scale_clip={scale_clip!r} must be a number > 0 or None.")
    for name in ("scale_gradient", "aux_to_latent"):
        if not isinstance(o[name], bool):
            raise ValueError(f"{name}={o[name]!r} must be True or False.")
    alpha, width = o["alpha"], o["width"]
    if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be a finite number >= 0.")
    if width is not None and (
        not isinstance(width, numbers.Real) or not math.isfinite(width) or width <= 0
    ):
        raise ValueError(f"width={width!r} must be a finite number > 0 or None.")
    check_noise_rates(o["rho_pos"], o["rho_neg"])
    return o


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

    over the whole kernel with `scale="layer"` (DoReFa-Net), or over all axes but the
    last with `scale="channel"` (one per output channel: XNOR-Net, larq's
    `magnitude_aware_sign`); `clip` is $c$ (`None`: no clip). With `gradient=False` $s$
    is a constant for backprop, as in larq; with `True` its gradient reaches $W$, as in
    XNOR-Net's paper (docs/METHOD.md section 4).
    """
    magnitude = tf.abs(kernel if clip is None else tf.clip_by_value(kernel, -clip, clip))
    if scale == "layer":
        # A float16 sum over a whole kernel can overflow: accumulate in float32 at least.
        wide = tf.float32 if kernel.dtype in (tf.float16, tf.bfloat16) else kernel.dtype
        mean = tf.cast(tf.reduce_mean(tf.cast(magnitude, wide)), kernel.dtype)
    else:  # in the kernel's dtype, exactly as magnitude_aware_sign
        mean = tf.reduce_mean(magnitude, axis=list(range(len(kernel.shape) - 1)))
    return mean if gradient else tf.stop_gradient(mean)


def apply_scale(signs, kernel, scale=None, scale_clip=None, scale_gradient=False):
    """`signs` times `binary_scale(kernel, scale, scale_clip, scale_gradient)`, or
    `signs` as they are with `scale=None`: the last stage of every scaled binary kernel."""
    if scale is None:
        return signs
    return binary_scale(kernel, scale, scale_clip, scale_gradient) * signs


@lq.utils.register_keras_custom_object
class NoisyMappedQuantizer(lq.quantizers.Quantizer):
    r"""Binarizes a kernel through a learned mapper, supervised by its noisy signs.

    A mapper network $f_\theta$ (one per layer) maps the layer's latent filters $W$
    to their binary filters, and the signs of the latent weights serve as noisy
    labels of the optimal binary weights (Han et al., ICML 2020):

    \\[
    t = \mathrm{hardtanh}(f_\theta(W)), \qquad \hat Q = s \cdot \mathrm{sign}(t),
    \qquad l_i = \sum_{w} \tilde l\big(t_w, \mathrm{sign}(W_w)\big).
    \\]

    The layer computes with $\hat Q$ ($s = 1$, or `binary_scale`), through the
    straight-through estimator of the sign, and the quantizer adds $\alpha\, l_i$ to the
    model's loss with `add_loss` ($\tilde l$: `unbiased_loss`; the labels carry no
    gradient). The stages $f(W) \to t \to \mathrm{sign}(t) \to \hat Q$ are
    `mapper_output`, `clipped_output`, `output_signs` and `scaled_signs`
    (docs/METHOD.md sections 2-5 and 9).

    !!! example
        ```python
        quantizer = larq_noisy.NoisyMappedQuantizer(alpha=1.0, rho_pos=0.005, rho_neg=0.005)
        layer = lq.layers.QuantConv2D(64, 3, input_quantizer="ste_sign",
                                      kernel_quantizer=quantizer,
                                      kernel_constraint="weight_clip")
        ```

    # Arguments
        mapper: The mapper family, one of `MAPPERS` (`"cnn"`: the paper's).
        alpha: Weight of the auxiliary loss, >= 0 (0: "ours w/o noisy supervision").
        rho_pos: $\rho_{+1}$, the probability that a +1 weight has label -1.
        rho_neg: $\rho_{-1}$, the probability that a -1 weight has label +1.
        width: The mapper's hidden width as a multiple of `c_in` (`None`: the family's).
        reduction: `"mean"` over the layer's weights (the default: alpha's meaning does
            not depend on the layer's size) or `"sum"` (the paper's Eq. 17).
        labels: `"current"` signs of `W`, or `"frozen"`: those captured by
            `freeze_labels` (done by `to_mapped`; until then the current ones).
        start: `"identity"`: a residual mapper $f_\theta(W) = W + g_\theta(W)$, its last
            layer zero, so $\hat Q = \mathrm{sign}(W)$ at step 0; `"warmup"`: the paper's.
        scale: $s$: `None` (1), `"layer"` or `"channel"` (`binary_scale`).
        clip: `"hardtanh"` (the paper) or `"none"`: $t = f_\theta(W)$, no dead zone.
        aux_to_latent: `True`: $\alpha\, l_i$ trains the mapper and `W` (the paper);
            `False`: the mapper only, from $f_\theta(\mathrm{sg}(W))$ (a second pass).
        scale_clip: `None`, or $c > 0$: $s$ is a mean of $|\mathrm{clip}(W, -c, c)|$.
        scale_gradient: Whether $s$ passes a gradient to `W` (XNOR-Net's paper) or not
            (larq's `magnitude_aware_sign`). `to_mapped` sets the scale options to match
            each layer's own quantizer.
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
        options = check_options(
            mapper=mapper, alpha=alpha, rho_pos=rho_pos, rho_neg=rho_neg, width=width,
            reduction=reduction, labels=labels, start=start, scale=scale, clip=clip,
            aux_to_latent=aux_to_latent, scale_clip=scale_clip, scale_gradient=scale_gradient,
        )
        super().__init__(**kwargs)
        self.mapper_kind = options.pop("mapper")  # `self.mapper` is the network
        for name, value in options.items():
            number = name in ("alpha", "rho_pos", "rho_neg", "scale_clip") and value is not None
            setattr(self, name, float(value) if number else value)

    def build(self, input_shape):
        kernel_shape = tf.TensorShape(input_shape).as_list()
        filter_shape = kernel_to_filters(tf.zeros(kernel_shape)).shape[1:]
        self.mapper = build_mapper(
            self.mapper_kind, filter_shape, width=self.width,
            zero_init_output=self.start == "identity", name=f"{self.name}_mapper",
            dtype=self.dtype_policy,
        )
        self.mapper.build((None, *filter_shape))
        if self.labels == "frozen":
            # 0 means "not captured yet": the current sign is used there.
            self.frozen_labels = self.add_weight(
                name="frozen_labels", shape=kernel_shape, initializer="zeros", trainable=False
            )
        super().build(input_shape)

    def _built_for(self, kernel):
        """`kernel` in the compute dtype, the quantizer built for it."""
        if not self.built:
            self.build(kernel.shape)
        return tf.cast(kernel, self.compute_dtype)

    def mapper_output(self, kernel):
        """Stage 1, `f(W)`: the mapper's output in the kernel's layout, before the clip."""
        mapped = map_kernel(self.mapper_kind, self.mapper, kernel)  # a faster exact path
        if mapped is None:
            mapped = filters_to_kernel(self.mapper(kernel_to_filters(kernel)), kernel.shape)
        return kernel + mapped if self.start == "identity" else mapped

    def clipped_output(self, kernel):
        """Stage 2, `t`: `hardtanh(f(W))` (`f(W)` with `clip="none"`), what the labels
        supervise and the sign binarizes."""
        mapped = self.mapper_output(kernel)
        if self.clip == "none":
            return mapped
        return tf.clip_by_value(mapped, -1.0, 1.0)

    def output_signs(self, kernel):
        """Stage 3, `sign(t)` in {-1, +1}: the binary kernel without its scale."""
        return lq.math.sign(self.clipped_output(kernel))

    def scaled_signs(self, kernel):
        """Stage 4, `Q^ = s * sign(t)`: the binary kernel the layer computes with."""
        kernel = self._built_for(kernel)
        return self._apply_scale(self.output_signs(kernel), kernel)

    def _apply_scale(self, signs, kernel):
        return apply_scale(signs, kernel, self.scale, self.scale_clip, self.scale_gradient)

    def saturated(self, kernel):
        """Boolean mask of the binary weights no gradient flows back through: with
        `clip="hardtanh"`, those where `|f(W)| > 1` (at 1 the clip still passes it)."""
        kernel = self._built_for(kernel)
        if self.clip == "none":
            return tf.zeros(kernel.shape, tf.bool)
        return tf.abs(self.mapper_output(kernel)) > 1.0

    def noisy_labels(self, kernel):
        """`sign(W)` (or the frozen signs), constant, at the precision the layer computes
        with (under `mixed_float16` a weight too small for float16 is 0, sign(0) = +1)."""
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
        signs = lq.math.sign(self._built_for(kernel))  # as noisy_labels
        self.frozen_labels.assign(tf.cast(signs, self.frozen_labels.dtype))

    def auxiliary_loss(self, kernel, clipped=None):
        """`alpha * l_i`, the term this quantizer adds to the model's loss, in float32.

        `clipped` (`self.clipped_output(kernel)` if not given) is used as given; only
        when computed here is the gradient to `kernel` cut for `aux_to_latent=False`.
        """
        kernel = tf.cast(kernel, self.compute_dtype)  # a float32 variable under mixed_float16
        if clipped is None:
            clipped = self.clipped_output(
                kernel if self.aux_to_latent else tf.stop_gradient(kernel)
            )
        loss = reduced_unbiased_loss(tf.cast(clipped, tf.float32),
                                     tf.cast(self.noisy_labels(kernel), tf.float32),
                                     self.rho_pos, self.rho_neg, self.reduction)
        return self.alpha * loss

    def call(self, inputs):
        clipped = self.clipped_output(inputs)
        # aux_to_latent=False needs its own mapper pass on sg(W), unless alpha = 0
        # (then the loss and all its gradients are 0 anyway).
        shared = self.aux_to_latent or self.alpha == 0
        self.add_loss(self.auxiliary_loss(inputs, clipped if shared else None))
        # The identity gradient: the hardtanh (if any) already masks |f(W)| > 1.
        return self._apply_scale(lq.quantizers.ste_sign(clipped, clip_value=None), inputs)

    def get_config(self):
        options = {name: getattr(self, name) for name in OPTIONS if name != "mapper"}
        return {**super().get_config(), "mapper": self.mapper_kind, **options}


#: The options of `NoisyMappedQuantizer`, in the order of its signature.
OPTIONS = tuple(inspect.signature(NoisyMappedQuantizer.__init__).parameters)[1:-1]


@lq.utils.register_alias("dorefa")
@lq.utils.register_keras_custom_object
class DoReFaSign(lq.quantizers.SteSign):
    r"""DoReFa-Net's binary weights: the sign scaled by the layer's mean absolute weight.

    \\[ q(W) = \mathrm{mean}(|W|) \cdot \mathrm{sign}(W) \\]

    with one mean over the whole kernel (Zhou et al., "DoReFa-Net", 2016, Sec. 2.3):
    the LNS paper's CIFAR-10 baseline, and what `bake` gives a layer mapped with
    `scale="layer"`. The mean (`binary_scale`) is a constant for backprop; the sign's
    gradient is `ste_sign`'s. Not larq's `DoReFa`, whose 1-bit weights are not scaled.

    !!! example
        ```python
        layer = lq.layers.QuantConv2D(64, 3, input_quantizer="ste_sign",
                                      kernel_quantizer="dorefa",
                                      kernel_constraint="weight_clip")
        ```

    # Arguments
        clip_value: Threshold for clipping gradients (`None`: not clipped).
    """

    def call(self, inputs):
        return binary_scale(inputs, "layer") * super().call(inputs)
