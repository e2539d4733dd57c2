"""Mapper networks `f_theta`: a layer's set of filters -> the real-valued `f(W)` that the
quantizer clips and binarizes.

A mapper sees one binarized layer's `c_out` filters as a batch of `h x w` images with
`c_in` channels (docs/METHOD.md section 2) and returns a tensor of the same shape.
"""

from __future__ import annotations

import larq as lq
import numpy as np
import tensorflow as tf

__all__ = ["MAPPERS", "BatchStatNormalization", "TapMixing", "build_mapper", "map_kernel",
           "multiply_adds"]

#: The mapper families and what each one is.
MAPPERS = {
    "cnn": "the paper's 3-layer CNN on the k x k filter: conv c->wc, norm, ReLU, "
    "conv wc->wc, norm, ReLU, conv wc->c",
    "mlp": "a per-filter MLP on the flattened filter: dense n->wc, norm, ReLU, dense wc->n",
    "linear": "one dense map n->n shared by the filters of the layer",
    "separable": "a k^2 x k^2 map over each filter's taps shared by its channels, then a "
    "channel bottleneck: dense c->wc, norm, ReLU, dense wc->c (built for ImageNet scale)",
}

#: The hidden width of each family when none is given (the paper's 2c for `cnn`).
_DEFAULT_WIDTH = {"cnn": 2.0, "mlp": 2.0, "linear": None, "separable": 0.25}


@lq.utils.register_keras_custom_object
class BatchStatNormalization(tf.keras.layers.Layer):
    r"""Batch normalisation that always uses the statistics of the batch it is given.

    \\[ y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta \\]

    A mapper's batch is always the full set of a layer's filters: with its statistics
    in training and inference alike, and no moving averages, the mapper is a
    deterministic function of the latent kernel (docs/METHOD.md section 2.3).
    """

    def __init__(self, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = int(input_shape[-1])
        # Parameters stay float32 under mixed precision, as in Keras' BatchNormalization.
        params = dict(shape=(channels,), dtype=tf.float32, experimental_autocast=False)
        self.gamma = self.add_weight(name="gamma", initializer="ones", **params)
        self.beta = self.add_weight(name="beta", initializer="zeros", **params)
        super().build(input_shape)

    def call(self, inputs):
        channels = inputs.shape[-1]
        if inputs.dtype in (tf.float16, tf.bfloat16, tf.float32):
            # One fused kernel each way (forward and gradient), every row one "pixel" of
            # a 1 x rows x 1 image: statistics in float32 for float16 inputs (as Keras'
            # BatchNormalization), with the biased variance, as tf.nn.moments.
            rows = tf.reshape(inputs, (1, -1, 1, channels))
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(rows, self.gamma, self.beta,
                                                       epsilon=self.epsilon, is_training=True)
            return tf.reshape(y, tf.shape(inputs))
        mean, variance = tf.nn.moments(inputs, axes=list(range(len(inputs.shape) - 1)))
        return tf.nn.batch_normalization(inputs, mean, variance, tf.cast(self.beta, inputs.dtype),
                                         tf.cast(self.gamma, inputs.dtype), self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@lq.utils.register_keras_custom_object
class TapMixing(tf.keras.layers.Layer):
    r"""One linear map over the taps of a filter, shared by its channels and filters.

    For filters $x$ of shape `(n, h, w, c)` and a kernel $T$ of shape $(hw, hw)$:

    \\[ y_{f,p,c} = \sum_{q} T_{p,q}\, x_{f,q,c} \\]

    over the $hw$ taps $p, q$ (row-major). The default initializer is the identity:
    the taps start unmixed.
    """

    def __init__(self, kernel_initializer="identity", **kwargs):
        super().__init__(**kwargs)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        taps = int(input_shape[1]) * int(input_shape[2])
        self.kernel = self.add_weight(name="kernel", shape=(taps, taps),
                                      initializer=self.kernel_initializer)
        super().build(input_shape)

    def call(self, inputs):
        _, h, w, c = inputs.shape
        taps = tf.reshape(inputs, (-1, h * w, c))
        return tf.reshape(tf.einsum("pq,nqc->npc", self.kernel, taps), (-1, h, w, c))

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def multiply_adds(self, input_shape) -> int:
        n, h, w, c = (int(d) for d in input_shape)
        return n * c * (h * w) ** 2

    def get_config(self):
        initializer = tf.keras.initializers.serialize(self.kernel_initializer)
        return {**super().get_config(), "kernel_initializer": initializer}


def multiply_adds(layer: tf.keras.layers.Layer, input_shape) -> int:
    """The multiply-adds of one forward pass of `layer` on an input of `input_shape`.

    Counts the products of convolutions (larq's too, at every output position and tap,
    padding included), depthwise and transposed convolutions, `Dense` layers, layers
    with a `multiply_adds(input_shape)` method (`TapMixing`) and, recursively,
    `Sequential` models; not element-wise work. `input_shape` includes the batch size.
    """
    shape = tf.TensorShape(input_shape)
    if None in shape.as_list():
        raise ValueError(f"input_shape={shape} must be fully known (give the batch size).")
    if isinstance(layer, tf.keras.Sequential):
        total = 0
        for sub in layer.layers:
            total += multiply_adds(sub, shape)
            shape = tf.TensorShape(sub.compute_output_shape(shape))
        return total
    if hasattr(layer, "multiply_adds"):
        return int(layer.multiply_adds(shape))
    dims = shape.as_list()
    out = tf.TensorShape(layer.compute_output_shape(shape)).as_list()
    taps = int(np.prod(getattr(layer, "kernel_size", ())))
    transposed = (tf.keras.layers.Conv1DTranspose, tf.keras.layers.Conv2DTranspose,
                  tf.keras.layers.Conv3DTranspose)
    if isinstance(layer, transposed):  # each input position meets every tap
        return int(np.prod(dims[:-1])) * taps * dims[-1] * out[-1]
    if isinstance(layer, tf.keras.layers.DepthwiseConv2D):
        return int(np.prod(out[:-1])) * taps * dims[-1] * layer.depth_multiplier
    convs = (tf.keras.layers.Conv1D, tf.keras.layers.Conv2D, tf.keras.layers.Conv3D)
    if isinstance(layer, convs):  # and larq's QuantConv1D/2D/3D
        groups = getattr(layer, "groups", 1) or 1
        return int(np.prod(out[:-1])) * taps * (dims[-1] // groups) * out[-1]
    if isinstance(layer, tf.keras.layers.Dense):
        return int(np.prod(dims[:-1])) * dims[-1] * out[-1]
    return 0


def build_mapper(
    kind: str,
    filter_shape: tuple[int, int, int],
    width: float | None = None,
    zero_init_output: bool = False,
    name: str = "mapper",
    dtype=None,
) -> tf.keras.Sequential:
    """The mapper network: a `tf.keras.Sequential` from filters `(c_out, h, w, c_in)` to
    the same shape (docs/METHOD.md section 2.2).

    # Arguments
        kind: One of `MAPPERS`.
        filter_shape: `(h, w, c_in)` of one filter (`(1, 1, d_in)` for a dense kernel).
        width: Hidden width as a multiple of `c_in`, unused by `linear` (`None`: the
            family's default, `_DEFAULT_WIDTH`).
        zero_init_output: Zero the last layer, so that the network outputs 0 at step 0.
        name: The model's name and its layers' prefix (variable names must be unique
            across a model, for h5 files and optimizer slots).
        dtype: The layers' dtype policy (`None`: the global policy).
    """
    if kind not in MAPPERS:
        raise ValueError(f"Unknown mapper {kind!r}; choose one of {sorted(MAPPERS)}.")
    h, w, c = (int(d) for d in filter_shape)
    width = _DEFAULT_WIDTH[kind] if width is None else width
    hidden = None if width is None else max(1, int(round(width * c)))  # None: linear
    out_init = "zeros" if zero_init_output else "glorot_uniform"

    def named(suffix):
        return dict(name=f"{name}_{suffix}", dtype=dtype)

    if kind == "cnn":
        # A 3x3 conv on a 1x1 "image" only ever uses its centre tap.
        conv = dict(kernel_size=(min(3, h), min(3, w)), padding="same")
        body = [
            tf.keras.layers.Conv2D(hidden, use_bias=False, **conv, **named("conv1")),
            BatchStatNormalization(**named("norm1")),
            tf.keras.layers.ReLU(**named("relu1")),
            tf.keras.layers.Conv2D(hidden, use_bias=False, **conv, **named("conv2")),
            BatchStatNormalization(**named("norm2")),
            tf.keras.layers.ReLU(**named("relu2")),
            tf.keras.layers.Conv2D(c, **conv, kernel_initializer=out_init, **named("conv3")),
        ]
    elif kind == "mlp":
        body = [
            tf.keras.layers.Flatten(**named("flatten")),
            tf.keras.layers.Dense(hidden, use_bias=False, **named("dense1")),
            BatchStatNormalization(**named("norm1")),
            tf.keras.layers.ReLU(**named("relu1")),
            tf.keras.layers.Dense(h * w * c, kernel_initializer=out_init, **named("dense2")),
            tf.keras.layers.Reshape((h, w, c), **named("unflatten")),
        ]
    elif kind == "linear":
        body = [
            tf.keras.layers.Flatten(**named("flatten")),
            tf.keras.layers.Dense(h * w * c, kernel_initializer=out_init, **named("dense")),
            tf.keras.layers.Reshape((h, w, c), **named("unflatten")),
        ]
    else:  # separable
        body = _separable_layers(c, hidden, out_init, named)
    return tf.keras.Sequential(body, name=name)


def _separable_layers(channels, hidden, out_init, named):
    r"""The `separable` mapper: taps and channels mixed apart, in time linear in the kernel.

    \\[
    g(x)_{f,p} = \mathrm{ReLU}\Big(\mathrm{N}\big(\textstyle\sum_q T_{p,q}\, x_{f,q}\, U\big)\Big)\, V + b
    \\]

    for filter $f$ and tap $p$: $T$ ($k^2 \times k^2$) mixes the taps, shared by every
    channel and filter, identity at start; $U$ ($c \times r$) and $V$ ($r \times c$,
    zero at start for `start="identity"`) are a channel bottleneck of $r$ = `width`
    $\cdot\, c$ units; $\mathrm{N}$ is `BatchStatNormalization` over all filters and taps.
    """
    return [
        TapMixing(**named("taps")),
        tf.keras.layers.Dense(hidden, use_bias=False, **named("down")),
        BatchStatNormalization(**named("norm")),
        tf.keras.layers.ReLU(**named("relu")),
        tf.keras.layers.Dense(channels, kernel_initializer=out_init, **named("up")),
    ]


def _toom_cook_3x3():
    r"""Matrices computing a 3x3 "same" cross-correlation of a 3x3 image in 25 products.

    In 1-D, the "same" cross-correlation $y_i = \sum_a k_a x_{i+a-1}$ of 3 samples with
    3 taps is the middle three coefficients of the product of the polynomials
    $x(z) = \sum_j x_j z^j$ and $\bar k(z) = \sum_b k_{2-b} z^b$: evaluated at
    $0, 1, -1, 2, \infty$ (Toom-Cook), that is 5 products instead of 9,
    $y = A^\top[(G k) \odot (B^\top x)]$. In 2-D the Kronecker products give 25
    instead of 81 (Winograd's $F(3 \times 3, 3 \times 3)$), exact up to float rounding.
    Returns `(B, G, A)`: `B` (25, 9) for an image's 9 pixels, `G` (25, 9) for a kernel's
    9 taps, `A` (9, 25) from the 25 products to the 9 outputs (all row-major).
    """
    points = (0.0, 1.0, -1.0, 2.0, None)  # None: the point at infinity
    evaluate_3 = np.array([[1, z, z * z] if z is not None else [0, 0, 1] for z in points])
    evaluate_5 = np.array(
        [[z**e for e in range(5)] if z is not None else [0, 0, 0, 0, 1] for z in points]
    )
    interpolate_middle = np.linalg.inv(evaluate_5)[1:4]  # (3, 5)
    reverse = evaluate_3[:, ::-1]  # cross-correlation: the kernel's polynomial is reversed
    return tuple(
        np.kron(m, m).astype("float32") for m in (evaluate_3, reverse, interpolate_middle)
    )


_TOOM_COOK_3X3 = _toom_cook_3x3()


def _cnn_in_kernel_layout(mapper: tf.keras.Sequential, kernel):
    """`cnn`'s output for a 3x3 kernel, computed in the kernel's layout; see `map_kernel`."""
    conv1, norm1, _, conv2, norm2, _, conv3 = mapper.layers
    image, taps, products = _TOOM_COOK_3X3
    _, _, c_in, c_out = kernel.shape
    hidden = conv1.filters

    def transformed(conv):  # the kernel's 25 "taps": (25, in, out)
        k = conv.kernel
        return tf.reshape(taps @ tf.reshape(k, (9, -1)), (25, *k.shape[2:]))

    def pixels(x, rows):  # (25, ...) -> (9, ...) of `rows` rows
        return tf.reshape(products @ tf.reshape(x, (25, -1)), (9, *rows))

    # Activations are (9 pixels, c_out filters, channels): a "same" 3x3 conv is then three
    # matrix products, and the statistics of the norms (over filters and pixels) are
    # those of the NHWC layout. The kernel (3, 3, c_in, c_out) is read as (9, c_in, c_out)
    # and the output written in that layout: no transpose of the kernel either way.
    x = tf.reshape(image @ tf.reshape(kernel, (9, -1)), (25, c_in, c_out))
    h = pixels(tf.matmul(x, transformed(conv1), transpose_a=True), (c_out, hidden))
    h = tf.nn.relu(norm1(h))
    x = tf.reshape(image @ tf.reshape(h, (9, -1)), (25, c_out, hidden))
    h = pixels(x @ transformed(conv2), (c_out, hidden))
    h = tf.nn.relu(norm2(h))
    x = tf.reshape(image @ tf.reshape(h, (9, -1)), (25, c_out, hidden))
    out = tf.matmul(transformed(conv3), x, transpose_a=True, transpose_b=True)  # (25, c_in, c_out)
    out = pixels(out, (c_in, c_out)) + conv3.bias[:, None]
    return tf.reshape(out, kernel.shape)


def _separable_in_kernel_layout(mapper: tf.keras.Sequential, kernel):
    """`separable`'s output computed in the kernel's layout; see `map_kernel`."""
    taps, down, norm, _, up = mapper.layers
    c_in, c_out = kernel.shape[-2:]
    # The kernel (*spatial, c_in, c_out) read as (taps, c_in, c_out): the tap map is one
    # product on the left, the channel maps are products over its middle axis.
    x = tf.reshape(taps.kernel @ tf.reshape(kernel, (taps.kernel.shape[0], -1)),
                   (-1, c_in, c_out))
    h = tf.matmul(down.kernel, x, transpose_a=True)  # (taps, hidden, c_out)
    mean, variance = tf.nn.moments(h, axes=[0, 2], keepdims=True)
    h = tf.nn.batch_normalization(
        h, mean, variance, norm.beta[:, None], norm.gamma[:, None], norm.epsilon
    )
    out = tf.matmul(up.kernel, tf.nn.relu(h), transpose_a=True) + up.bias[:, None]
    return tf.reshape(out, kernel.shape)


def map_kernel(kind: str, mapper: tf.keras.Sequential, kernel):
    r"""The mapper's output for `kernel`'s filters, in the kernel's layout, or `None`.

    Equal, up to float rounding, to
    `filters_to_kernel(mapper(kernel_to_filters(kernel)), kernel.shape)`, but computed
    in float32 without transposing the kernel or the output: the paper's `cnn` on 3x3
    kernels as Toom-Cook products (`_toom_cook_3x3`), `separable` on any kernel as
    matrix products; `None` for the others (the caller then maps the filters).
    """
    if kernel.dtype != tf.float32 or mapper.compute_dtype != "float32":
        return None
    if kind == "cnn" and tuple(kernel.shape[:-2]) == (3, 3):
        return _cnn_in_kernel_layout(mapper, kernel)
    if kind == "separable" and len(kernel.shape) >= 2:
        return _separable_in_kernel_layout(mapper, kernel)
    return None
