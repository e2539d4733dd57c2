"""Move a Larq model between sign binarization and mapped binarization.

`to_mapped` gives each binarized layer its own `NoisyMappedQuantizer`; `bake` turns a
mapped model back into a stock Larq model whose kernels are the mapped binary kernels.
"""

from __future__ import annotations

import larq as lq
import numpy as np
import tensorflow as tf

from larq_noisy.quantizers import NoisyMappedQuantizer, check_options

__all__ = [
    "binarized_layers",
    "bake",
    "flip_rates",
    "freeze_labels",
    "mean_flip_rate",
    "mapped_layers",
    "to_mapped",
]


def _is_binary(quantizer) -> bool:
    # larq's own test (layers_base._is_binary): precision 1 and not a NoOp marker.
    return getattr(quantizer, "precision", None) == 1 and not isinstance(
        quantizer, lq.quantizers.NoOp
    )


def _walk(model):
    """All layers of `model`, entering nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, tf.keras.Model):
            yield from _walk(layer)


def binarized_layers(model) -> list:
    """The layers of `model` whose kernel quantizer binarizes (precision 1)."""
    return [l for l in _walk(model) if _is_binary(getattr(l, "kernel_quantizer", None))]


def mapped_layers(model) -> list:
    """The layers of `model` whose kernel quantizer is a `NoisyMappedQuantizer`."""
    return [
        l
        for l in _walk(model)
        if isinstance(getattr(l, "kernel_quantizer", None), NoisyMappedQuantizer)
    ]


def _own_weights(layer):
    """`layer.weights` less those of its quantizers (a mapper's, for instance)."""
    quantizers = [getattr(layer, a, None) for a in ("kernel_quantizer", "input_quantizer")]
    owned = {
        id(w)
        for q in quantizers
        if isinstance(q, tf.keras.layers.Layer)
        for w in q.weights
    }
    return [w for w in layer.weights if id(w) not in owned]


def rebuild(model, edit_config):
    """A clone of `model` whose layers are rebuilt from `edit_config(layer, config)`.

    `config` is `layer.get_config()`; nested models are entered. Every weight that a
    layer and its rebuilt copy share (all but their quantizers', such as a mapper's) is
    copied, shape-checked.
    """
    if not (isinstance(model, tf.keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise ValueError(
            f"Cannot rebuild model {model.name!r} of type {type(model).__name__}: only "
            "functional and Sequential Keras models are supported, not subclassed ones."
        )

    def clone_layer(layer):
        if isinstance(layer, tf.keras.Model):
            return rebuild(layer, edit_config)
        return layer.__class__.from_config(edit_config(layer, layer.get_config()))

    clone = tf.keras.models.clone_model(model, clone_function=clone_layer)
    _copy_weights(model, clone)
    return clone


def _with_kernel_quantizer(new_quantizer):
    """An `edit_config` giving each layer the kernel quantizer `new_quantizer(layer)`
    (`None`: the layer as it is)."""

    def edit_config(layer, config):
        quantizer = new_quantizer(layer)
        return config if quantizer is None else {**config, "kernel_quantizer": quantizer}

    return edit_config


def _copy_weights(source, target):
    for src in source.layers:
        dst = target.get_layer(src.name)
        if isinstance(src, tf.keras.Model):
            _copy_weights(src, dst)
            continue
        src_weights, dst_weights = _own_weights(src), _own_weights(dst)
        if len(src_weights) != len(dst_weights):
            raise ValueError(
                f"Layer {src.name!r}: {len(src_weights)} weights in the source, "
                f"{len(dst_weights)} in the copy."
            )
        for s, d in zip(src_weights, dst_weights):
            d.assign(tf.cast(s, d.dtype))


def _check_has(layers, model, what):
    if not layers:
        kinds = sorted({type(l).__name__ for l in _walk(model)})
        raise ValueError(
            f"Model {model.name!r} has no {what}; its layer types are {kinds}. "
            "Binarized layers are larq layers whose kernel_quantizer has precision 1 "
            "(e.g. 'ste_sign' or 'magnitude_aware_sign')."
        )


def to_mapped(model, **quantizer_options):
    """A copy of `model` in which every binarized layer has its own mapper.

    Every layer whose kernel quantizer binarizes (precision 1, e.g. `ste_sign`) gets
    a new `NoisyMappedQuantizer(**quantizer_options)`; all latent weights and
    BatchNorm statistics are copied, and other layers are left as they are. The
    original scaling is kept: a layer that used `magnitude_aware_sign` (Bi-Real Net)
    gets `scale="channel"` unless `scale` is given. With frozen labels, the labels
    are the signs of the copied latent weights.

    !!! example
        ```python
        mapped = larq_noisy.to_mapped(model, mapper="cnn", alpha=1.0, rho_pos=0.005,
                                      rho_neg=0.005)
        ```

    # Returns
        A new functional or Sequential `tf.keras.Model`; `model` is not changed.
    """
    check_options(**quantizer_options)  # bad options fail before any work
    targets = binarized_layers(model)
    _check_has(targets, model, "binarized layer to map")
    already = [l.name for l in targets if isinstance(l.kernel_quantizer, NoisyMappedQuantizer)]
    if already:
        raise ValueError(f"Model {model.name!r} is already mapped (layers {already}).")
    target_ids = {id(l) for l in targets}

    def new_quantizer(layer):
        if id(layer) not in target_ids:
            return None
        options = dict(quantizer_options)
        if isinstance(layer.kernel_quantizer, lq.quantizers.MagnitudeAwareSign):
            options.setdefault("scale", "channel")
        # The layer's dtype policy: a mixed_float16 layer computes its kernel in float16.
        return NoisyMappedQuantizer(
            **options, name=f"{layer.name}_quantizer", dtype=layer.dtype_policy
        )

    mapped = rebuild(model, _with_kernel_quantizer(new_quantizer))
    for layer in mapped_layers(mapped):
        if layer.kernel_quantizer.labels == "frozen":
            layer.kernel_quantizer.freeze_labels(layer.kernel)
    return mapped


def freeze_labels(model) -> None:
    """Capture the current `sign(W)` as labels in every frozen-label quantizer."""
    for layer in mapped_layers(model):
        if layer.kernel_quantizer.labels == "frozen":
            layer.kernel_quantizer.freeze_labels(layer.kernel)


def bake(model):
    """A stock Larq model whose binarized kernels are `model`'s mapped binary kernels.

    The mapper is not needed at inference: once trained, the binary kernel `Q^` is a
    constant. Each mapped layer becomes a layer with `ste_sign` (or
    `magnitude_aware_sign` when `scale="channel"`) whose latent kernel holds `Q^`
    (times the channel scale), so the baked model computes exactly what `model`
    computes and converts to binary ops with Larq Compute Engine.
    """
    layers = mapped_layers(model)
    _check_has(layers, model, "mapped layer (NoisyMappedQuantizer) to bake")
    by_id = {id(l): l for l in layers}

    def new_quantizer(layer):
        if id(layer) not in by_id:
            return None
        scaled = layer.kernel_quantizer.scale
        sign = lq.quantizers.MagnitudeAwareSign if scaled else lq.quantizers.SteSign
        return sign(dtype=layer.dtype_policy)  # the layer's policy, as in to_mapped

    baked = rebuild(model, _with_kernel_quantizer(new_quantizer))
    for layer in layers:
        kernel = layer.kernel_quantizer.binary_kernel(layer.kernel)
        target = _find(baked, layer.name)
        target.kernel.assign(tf.cast(kernel, target.kernel.dtype))
    return baked


def _find(model, name):
    for layer in _walk(model):
        if layer.name == name:
            return layer
    raise KeyError(name)


def _binary_signs(layer) -> np.ndarray:
    """The signs of the binary kernel `layer` computes with."""
    quantizer = layer.kernel_quantizer
    if isinstance(quantizer, NoisyMappedQuantizer):
        signs = quantizer.binary_signs(tf.cast(layer.kernel, quantizer.compute_dtype))
    else:
        signs = lq.math.sign(tf.convert_to_tensor(layer.kernel))
    return np.asarray(signs) > 0


def flip_rates(model, reference=None) -> dict[str, float]:
    """Per binarized layer, the fraction of binary weights that differ from a reference.

    Without `reference`, the reference is `sign(W)` of the model's own latent weights,
    so the rate is how much the mapper departs from sign binarization (0 for a sign
    layer). With a `reference` model of the same architecture (e.g. the pretrained
    baseline), it is the fraction of binary weights flipped since then; binarized
    layers are paired in order, as two builds of one architecture name them apart.

    # Returns
        `{layer name: rate}` for every binarized layer.
    """
    layers = binarized_layers(model)
    _check_has(layers, model, "binarized layer")
    if reference is None:
        references = [None] * len(layers)
    else:
        references = binarized_layers(reference)
        shapes = [tuple(l.kernel.shape) for l in layers]
        if [tuple(l.kernel.shape) for l in references] != shapes:
            raise ValueError(
                f"Reference model {reference.name!r} does not match {model.name!r}: "
                "their binarized kernels differ in number or shape."
            )
    rates = {}
    for layer, ref in zip(layers, references):
        signs = _binary_signs(layer)
        if ref is None:
            base = np.asarray(lq.math.sign(tf.convert_to_tensor(layer.kernel))) > 0
        else:
            base = _binary_signs(ref)
        rates[layer.name] = float(np.mean(signs != base))
    return rates


def mean_flip_rate(model, rates: dict[str, float]) -> float:
    """The fraction of all binary weights of `model` that flipped, from `flip_rates`."""
    sizes = {l.name: int(np.prod(l.kernel.shape)) for l in binarized_layers(model)}
    return sum(rates[name] * size for name, size in sizes.items()) / sum(sizes.values())
