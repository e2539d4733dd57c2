"""Mapper networks `f_theta`: a layer's set of filters -> real-valued binary logits.

A mapper sees one binarized layer's `c_out` filters as a batch of `h x w` images with
`c_in` channels (METHOD.md section 1) and returns a tensor of the same shape.
"""

from __future__ import annotations

import larq as lq
import tensorflow as tf

__all__ = ["MAPPERS", "BatchStatNormalization", "build_mapper", "default_width"]

#: The mapper families and what each one is.
MAPPERS = {
    "cnn": "the paper's 3-layer CNN on the k x k filter: conv c->wc, norm, ReLU, "
    "conv wc->wc, norm, ReLU, conv wc->c",
    "mlp": "a per-filter MLP on the flattened filter: dense n->wc, norm, ReLU, dense wc->n",
    "linear": "one dense map n->n shared by the filters of the layer",
}

_DEFAULT_WIDTH = {"cnn": 2.0, "mlp": 2.0, "linear": None}


def default_width(kind: str) -> float | None:
    """The hidden width of `kind` when none is given (the paper's 2c for `cnn`)."""
    return _DEFAULT_WIDTH[kind]


@lq.utils.register_keras_custom_object
class BatchStatNormalization(tf.keras.layers.Layer):
    r"""Batch normalisation that always uses the statistics of the batch it is given.

    \\[ y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta \\]

    A mapper's batch is always the full set of a layer's filters, so using its
    statistics in training and inference alike makes the mapper a deterministic
    function of the latent kernel: the binary kernel seen at evaluation and export is
    the one seen in training. No moving averages are kept.
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
        # Statistics in float32 even under mixed precision, as Keras' BatchNormalization.
        x = tf.cast(inputs, tf.float32)
        mean, variance = tf.nn.moments(x, axes=list(range(len(x.shape) - 1)))
        y = tf.nn.batch_normalization(
            x, mean, variance, self.beta, self.gamma, self.epsilon
        )
        return tf.cast(y, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _hidden_units(width: float, channels: int) -> int:
    return max(1, int(round(width * channels)))


def build_mapper(
    kind: str,
    filter_shape: tuple[int, int, int],
    width: float | None = None,
    zero_init_output: bool = False,
    name: str = "mapper",
    dtype=None,
) -> tf.keras.Sequential:
    """Build the mapper network for filters of shape `(h, w, c_in)`.

    # Arguments
        kind: One of `MAPPERS`.
        filter_shape: `(h, w, c_in)` of one filter (`(1, 1, d_in)` for a dense kernel).
        width: Hidden width as a multiple of `c_in` (`cnn`: channels of the two hidden
            convs, the paper's 2.0; `mlp`: units of the hidden layer). Unused by
            `linear`. `None` means the family's default.
        zero_init_output: Initialise the last layer to zero, so that the network
            outputs exactly zero at step 0 (the identity-preserving start).
        name: Name of the Keras model, also the prefix of its layers' names (variable
            names must be unique across a model for h5 files and optimizer slots).
        dtype: The layers' dtype policy (the quantizer's; `None`: the global policy).

    # Returns
        A `tf.keras.Sequential` mapping `(c_out, h, w, c_in)` to the same shape.
    """
    if kind not in MAPPERS:
        raise ValueError(f"Unknown mapper {kind!r}; choose one of {sorted(MAPPERS)}.")
    h, w, c = (int(d) for d in filter_shape)
    width = default_width(kind) if width is None else width
    out_init = "zeros" if zero_init_output else "glorot_uniform"

    def named(suffix):
        return dict(name=f"{name}_{suffix}", dtype=dtype)

    if kind == "cnn":
        hidden = _hidden_units(width, c)
        # A 3x3 conv on a 1x1 "image" only ever uses its centre tap.
        size = (min(3, h), min(3, w))
        conv = dict(kernel_size=size, padding="same")
        body = [
            tf.keras.layers.Conv2D(hidden, use_bias=False, **conv, **named("conv1")),
            BatchStatNormalization(**named("norm1")),
            tf.keras.layers.ReLU(**named("relu1")),
            tf.keras.layers.Conv2D(hidden, use_bias=False, **conv, **named("conv2")),
            BatchStatNormalization(**named("norm2")),
            tf.keras.layers.ReLU(**named("relu2")),
            tf.keras.layers.Conv2D(
                c, **conv, kernel_initializer=out_init, **named("conv3")
            ),
        ]
    elif kind == "mlp":
        hidden = _hidden_units(width, c)
        body = [
            tf.keras.layers.Flatten(**named("flatten")),
            tf.keras.layers.Dense(hidden, use_bias=False, **named("dense1")),
            BatchStatNormalization(**named("norm1")),
            tf.keras.layers.ReLU(**named("relu1")),
            tf.keras.layers.Dense(h * w * c, kernel_initializer=out_init, **named("dense2")),
            tf.keras.layers.Reshape((h, w, c), **named("unflatten")),
        ]
    else:  # linear
        body = [
            tf.keras.layers.Flatten(**named("flatten")),
            tf.keras.layers.Dense(h * w * c, kernel_initializer=out_init, **named("dense")),
            tf.keras.layers.Reshape((h, w, c), **named("unflatten")),
        ]
    return tf.keras.Sequential(body, name=name)
