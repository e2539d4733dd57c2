"""Move a Larq model between sign binarization and mapped binarization.

`to_mapped` gives each binarized layer its own `NoisyMappedQuantizer`; `bake` turns a
mapped model back into a stock Larq model whose kernels are the mapped binary kernels
(docs/METHOD.md sections 4 and 7).
"""

from __future__ import annotations

import os
import reprlib
import warnings

import larq as lq
import numpy as np
import tensorflow as tf

from larq_noisy.mappers import BatchStatNormalization, build_mapper
from larq_noisy.quantizers import (
    DoReFaSign, NoisyMappedQuantizer, apply_scale, check_options, kernel_to_filters,
)

__all__ = ["bake", "binarized_layers", "check_has_layers", "freeze_labels", "is_binary",
           "mapped_layers", "rebuild", "to_mapped"]


def is_binary(quantizer) -> bool:
    # larq's own test (layers_base.is_binary): precision 1 and not a NoOp marker.
    return (getattr(quantizer, "precision", None) == 1
            and not isinstance(quantizer, lq.quantizers.NoOp))


def _walk(model):
    """All layers of `model`, entering nested models."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, tf.keras.Model):
            yield from _walk(layer)


def binarized_layers(model) -> list:
    """The layers of `model` whose kernel quantizer binarizes (precision 1), as
    `lq.models.summary` counts them; not those that binarize another weight only."""
    return [l for l in _walk(model) if is_binary(getattr(l, "kernel_quantizer", None))]


def mapped_layers(model) -> list:
    """The layers of `model` whose kernel quantizer is a `NoisyMappedQuantizer`."""
    return [l for l in _walk(model)
            if isinstance(getattr(l, "kernel_quantizer", None), NoisyMappedQuantizer)]


def _own_weights(layer):
    """`layer.weights` less those of its quantizers (a mapper's, for instance)."""
    quantizers = [getattr(layer, a, None) for a in ("kernel_quantizer", "input_quantizer")]
    owned = {id(w) for q in quantizers if isinstance(q, tf.keras.layers.Layer) for w in q.weights}
    return [w for w in layer.weights if id(w) not in owned]


def rebuild(model, edit_config):
    """A clone of `model` whose layers are rebuilt from `edit_config(layer, config)`.

    `config` is `layer.get_config()`, plain-function quantizers live; nested models are
    entered. Every weight but the quantizers' (a mapper's, say) is copied, shape-checked.
    """
    if not (isinstance(model, tf.keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise ValueError(
            f"Cannot rebuild model {model.name!r} of type {type(model).__name__}: only "
            "functional and Sequential Keras models are supported, not subclassed ones."
        )

    def clone_layer(layer):
        if isinstance(layer, tf.keras.Model):
            return rebuild(layer, edit_config)
        # Keras serializes a function by its name only, and deserializes the name of an
        # unregistered one to a string: plain-function quantizers are passed live.
        config = layer.get_config()
        for key in config:
            live = getattr(layer, key, None)
            function = callable(live) and not isinstance(live, tf.keras.layers.Layer)
            if key.endswith("_quantizer") and function:
                config[key] = live
        return layer.__class__.from_config(edit_config(layer, config))

    clone = tf.keras.models.clone_model(model, clone_function=clone_layer)
    for source in model.layers:
        if isinstance(source, tf.keras.Model):
            continue  # rebuilt, weights included, by clone_layer
        target = clone.get_layer(source.name)
        src_weights, dst_weights = _own_weights(source), _own_weights(target)
        if len(src_weights) != len(dst_weights):
            raise ValueError(
                f"Layer {source.name!r}: {len(src_weights)} weights in the source, "
                f"{len(dst_weights)} in the copy."
            )
        for s, d in zip(src_weights, dst_weights):
            d.assign(tf.cast(s, d.dtype))
    return clone


def _check_model(model, function: str) -> None:
    """`TypeError` unless `model` is a Keras model, naming what `function` got instead."""
    if isinstance(model, tf.keras.Model):
        return
    got = f"the path {os.fspath(model)!r}" if isinstance(model, (str, os.PathLike)) else (
        f"{type(model).__name__} {reprlib.repr(model)}"
    )
    raise TypeError(
        f"{function} takes a tf.keras.Model, not {got}: load a saved model first with "
        "tf.keras.models.load_model(path)."
    )


def check_has_layers(layers, model, what: str) -> None:
    """`ValueError` if `model` has no `what`, i.e. `layers` is empty, naming its layer types."""
    if not layers:
        kinds = sorted({type(l).__name__ for l in _walk(model)})
        raise ValueError(
            f"Model {model.name!r} has no {what}; its layer types are {kinds}. "
            "Binarized layers are larq layers whose kernel_quantizer has precision 1 "
            "(e.g. 'ste_sign' or 'magnitude_aware_sign')."
        )


# The `NoisyMappedQuantizer` options that `to_mapped` reads off each layer's quantizer,
# at their values for an unscaled sign.
_UNSCALED = {"scale": None, "scale_clip": None, "scale_gradient": False}

# How closely two computations of one scale agree in each dtype (float32: 1e-5;
# float16: a few units in the last place).
_TOLERANCE = {tf.float16: 1e-2, tf.bfloat16: 6e-2}


def _name(quantizer) -> str:
    """How messages name a quantizer: its class, or `function <name>`."""
    if isinstance(quantizer, tf.keras.layers.Layer):
        return type(quantizer).__name__
    return f"function {getattr(quantizer, '__qualname__', repr(quantizer))}"


def _numpy(tensor) -> np.ndarray:
    return np.asarray(tf.cast(tensor, tf.float64))


def _fitted_clip(magnitudes, scale, axes) -> float:
    """The `c` with `mean |clip(W, -c, c)| = scale` over `axes` (the median over
    channels), for a `scale` at most `mean |W|`."""
    # mean |clip(W, -c, c)| grows with c from 0 to mean |W|: bisect each group's c.
    low = np.zeros_like(scale)
    high = magnitudes.max(axis=axes, keepdims=True)
    for _ in range(60):
        middle = (low + high) / 2
        below = np.minimum(magnitudes, middle).mean(axis=axes, keepdims=True) < scale
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return float(np.median((low + high) / 2))


def _scale_passes_gradient(quantizer, probe, scale) -> bool:
    """Whether the scale has a gradient: does the first output depend on the other
    weights of its layer (or output channel)? A sign alone depends on its own only."""
    with tf.GradientTape() as tape:
        tape.watch(probe)
        first = tf.reshape(quantizer(probe), [-1])[0]
    gradient = tape.gradient(first, probe)
    if gradient is None:
        return False
    group = _numpy(gradient)
    if scale == "channel":
        group = group[..., 0]  # the first output is in channel 0
    return bool(np.any(group.reshape(-1)[1:] != 0))  # [0] is the first weight itself


def _source_scale(layer) -> tuple[dict, float]:
    """`(options, miss)`: the scale options with which `NoisyMappedQuantizer` computes
    what `layer`'s kernel quantizer computes (`ValueError` if none does), and how far
    apart (relative) they compute the layer's own binary kernel (0: exactly).

    The quantizer is probed on two copies of the kernel with its signs and other
    magnitudes: how its scale `s` follows them tells its group, clip and gradient.
    The options found must reproduce it on both copies and on the kernel itself.
    """
    quantizer = layer.kernel_quantizer
    dtype = tf.as_dtype(layer.compute_dtype)
    kernel = tf.cast(layer.kernel, dtype)
    signs = np.where(_numpy(kernel) >= 0, 1.0, -1.0)
    rng = np.random.default_rng(0)
    spread, small = (
        tf.constant(signs * rng.uniform(low, high, signs.shape), dtype)
        for low, high in ((0.05, 3.0), (1e-3, 0.5))
    )
    tolerance = _TOLERANCE.get(dtype, 1e-5)

    def refuse(why):
        raise ValueError(
            f"Layer {layer.name!r}: kernel quantizer {_name(quantizer)} does not compute "
            "s * sign(W) with s = 1 or a mean of |W| (clipped or not) per layer or per "
            f"output channel: {why}. to_mapped cannot map it without changing the "
            "layer's outputs."
        )

    ratio = _numpy(quantizer(spread)) * signs  # s, where the output is s * sign(W)
    if not np.all(ratio > 0) or not np.all(np.isfinite(ratio)):
        refuse("on a probe kernel its output is 0, infinite or of the opposite sign somewhere")
    if np.allclose(ratio, 1.0, rtol=tolerance, atol=0.0):
        candidates = [dict(_UNSCALED)]
    else:
        for scale, axes in (("layer", None), ("channel", tuple(range(ratio.ndim - 1)))):
            observed = ratio.mean(axis=axes, keepdims=True)
            if np.allclose(ratio, observed, rtol=tolerance, atol=0.0):
                break
        else:
            refuse("its scale |q(W)| varies within an output channel")
        magnitudes = np.abs(_numpy(spread))
        mean = magnitudes.mean(axis=axes, keepdims=True)
        options = {**_UNSCALED, "scale": scale}
        options["scale_gradient"] = _scale_passes_gradient(quantizer, spread, scale)
        if np.allclose(observed, mean, rtol=tolerance, atol=0.0):
            candidates = [options]
        elif np.any(observed > mean):
            refuse(f"its scale ({observed.max():.4g}) exceeds mean |W| ({mean.max():.4g})")
        else:
            clip = _fitted_clip(magnitudes, observed, axes)
            # The shortest decimal that reproduces the quantizer (1.25, not 1.2500001).
            candidates = [{**options, "scale_clip": float(f"{clip:.{d}g}")} for d in range(1, 9)]
    for options in candidates:
        misses = []
        for probe in (kernel, spread, small):
            expected = _numpy(quantizer(probe))
            # What NoisyMappedQuantizer(**options) computes from `probe` at the identity start.
            mapped = _numpy(apply_scale(lq.math.sign(probe), probe, **options))
            error = np.abs(mapped - expected).max()
            misses.append(error / max(np.abs(expected).max(), np.finfo(float).tiny))
        worst = max(misses)
        if worst <= tolerance:
            return options, misses[0]
    refuse(f"the closest form, {options}, differs from it by up to {worst:.2g} (relative)")


def _constant_for_one_filter(kernel_shape, kind: str, width) -> bool:
    """Whether the mapper `kind` for a kernel of one filter gives every filter the same
    output (its batch statistics are over one value per channel). Tried on two."""
    filter_shape = tuple(kernel_to_filters(tf.zeros(kernel_shape)).shape[1:])
    mapper = build_mapper(kind, filter_shape, width=width, name="one_filter_probe")
    if not any(isinstance(l, BatchStatNormalization) for l in mapper.layers):
        return False
    filters = tf.random.stateless_normal((2, 1, *filter_shape), seed=(0, 0))
    return bool(np.array_equal(mapper(filters[0]), mapper(filters[1])))


def _plan(model, mapper_kind: str, width):
    """`(targets, skipped)`: the layers `to_mapped` maps, and `(layer, reason)` for each
    layer that binarizes a weight and is left as it is."""
    targets, skipped = [], []
    for layer in _walk(model):
        others = sorted(name for name, value in vars(layer).items()
                        if name.endswith("_quantizer") and is_binary(value)
                        and name not in ("input_quantizer", "kernel_quantizer"))
        reasons = []
        if others:
            reasons.append(
                f"its {', '.join(others)} binarizes a weight other than a kernel (only "
                "kernel_quantizer is mapped)"
            )
        if is_binary(getattr(layer, "kernel_quantizer", None)):
            shape = tuple(layer.kernel.shape)
            if len(shape) not in (2, 3, 4):
                reasons.append(
                    f"its kernel has rank {len(shape)}, and the mappers take kernels of "
                    "rank 2 (dense), 3 (conv1d) and 4 (conv2d)"
                )
            elif shape[-1] == 1 and _constant_for_one_filter(shape, mapper_kind, width):
                reasons.append(
                    f"its kernel has one filter (output channel), and the {mapper_kind!r} "
                    "mapper's batch statistics over one filter would make its output "
                    "constant (mapper='linear' maps it)"
                )
            else:
                targets.append(layer)
        if reasons:
            skipped.append((layer, "; ".join(reasons)))
    return targets, skipped


def _scale_options(layer, quantizer_options) -> dict:
    """The scale options of `layer`'s mapped quantizer: its own quantizer's, unless given."""
    found, miss = _source_scale(layer)
    given = {k: v for k, v in quantizer_options.items() if k in _UNSCALED}
    if not given:
        if miss:
            warnings.warn(
                f"to_mapped: layer {layer.name!r}: its kernel quantizer "
                f"{_name(layer.kernel_quantizer)} and the mapped one, {found}, compute its "
                f"binary kernel up to {miss:.2g} (relative) apart: the same scale by "
                "another formula. Where a binary activation is fed an exact 0 by one "
                "and not by the other, outputs at step 0 differ.",
                stacklevel=3,
            )
        return found
    chosen = {**_UNSCALED, **given}
    if chosen != found:
        warnings.warn(
            f"to_mapped: layer {layer.name!r} gets {chosen} as given, while its kernel "
            f"quantizer {_name(layer.kernel_quantizer)} computes {found}: the mapped "
            "layer's outputs differ from the original's from step 0.",
            stacklevel=3,
        )
    return chosen


def to_mapped(model, **quantizer_options):
    """A copy of `model` (a new functional or Sequential model; `model` is not changed)
    in which every binarized layer has its own mapper.

    Every layer whose kernel quantizer binarizes (precision 1) gets a new
    `NoisyMappedQuantizer(**quantizer_options)`; all weights are copied. With
    `start="identity"` the copy predicts exactly what `model` does: each layer keeps
    its quantizer's scale, `s * sign(W)` with `s` = 1 or a mean of `|W|` per layer or
    per output channel, found by probing the quantizer (`scale`, `scale_clip`,
    `scale_gradient` given here override it, with a warning). A quantizer of another
    form is refused with a `ValueError` naming the layer, before anything is built;
    anything but a Keras model with a `TypeError`. Layers whose binarized weight is
    not a `kernel`, kernels of rank 5, and one-filter kernels that the mapper's batch
    statistics would make constant are left as they are, with a warning naming each.
    Frozen labels are the signs of the copied latent weights.

    !!! example
        ```python
        mapped = larq_noisy.to_mapped(model, mapper="cnn", alpha=1.0, rho_pos=0.005,
                                      rho_neg=0.005)
        ```
    """
    _check_model(model, "to_mapped")
    options = check_options(**quantizer_options)  # bad options fail before any work
    already = [l.name for l in mapped_layers(model)]
    if already:
        raise ValueError(f"Model {model.name!r} is already mapped (layers {already}).")
    targets, skipped = _plan(model, options["mapper"], options["width"])
    for layer, reason in skipped:
        warnings.warn(
            f"to_mapped: layer {layer.name!r} keeps its own binarization, unmapped: {reason}.",
            stacklevel=2,
        )
    check_has_layers(targets, model, "binarized layer to map")
    scales = {id(l): _scale_options(l, quantizer_options) for l in targets}

    def edit_config(layer, config):
        if id(layer) not in scales:
            return config
        # The layer's dtype policy: a mixed_float16 layer computes its kernel in float16.
        quantizer = NoisyMappedQuantizer(
            **{**quantizer_options, **scales[id(layer)]},
            name=f"{layer.name}_quantizer",
            dtype=layer.dtype_policy,
        )
        return {**config, "kernel_quantizer": quantizer}

    mapped = rebuild(model, edit_config)
    freeze_labels(mapped)
    return mapped


def freeze_labels(model) -> None:
    """Capture the current `sign(W)` as labels in every frozen-label quantizer."""
    for layer in mapped_layers(model):
        if layer.kernel_quantizer.labels == "frozen":
            layer.kernel_quantizer.freeze_labels(layer.kernel)


def bake(model):
    """A stock Larq model whose binarized kernels are `model`'s mapped binary kernels.

    Each mapped layer gets `ste_sign`, or `magnitude_aware_sign` (`scale="channel"`) or
    `DoReFaSign` (`"layer"`), and the latent kernel from which that quantizer computes
    the mapped binary kernel op for op (`_baked_latent`, docs/METHOD.md section 7): the
    baked model computes exactly what `model` does; a layer where not is named in a warning.
    """
    _check_model(model, "bake")
    layers = mapped_layers(model)
    check_has_layers(layers, model, "mapped layer (NoisyMappedQuantizer) to bake")
    baked_quantizers = {None: lq.quantizers.SteSign, "channel": lq.quantizers.MagnitudeAwareSign,
                        "layer": DoReFaSign}
    mapped = {id(l) for l in layers}

    def edit_config(layer, config):
        if id(layer) not in mapped:
            return config
        quantizer = baked_quantizers[layer.kernel_quantizer.scale]
        # The layer's policy, as in to_mapped.
        return {**config, "kernel_quantizer": quantizer(dtype=layer.dtype_policy)}

    baked = rebuild(model, edit_config)
    baked_layers = {l.name: l for l in _walk(baked)}
    for layer in layers:
        quantizer = layer.kernel_quantizer
        kernel = tf.cast(layer.kernel, quantizer.compute_dtype)
        target = baked_layers[layer.name]
        target.kernel.assign(tf.cast(_baked_latent(quantizer, kernel), target.kernel.dtype))
        expected = quantizer.scaled_signs(kernel)
        got = target.kernel_quantizer(tf.cast(target.kernel, target.compute_dtype))
        if not np.array_equal(got, expected):
            miss = np.abs(_numpy(got) - _numpy(expected)).max() / np.abs(_numpy(expected)).max()
            warnings.warn(
                f"bake: layer {layer.name!r} computes its binary kernel up to {miss:.2g} "
                "(relative) apart from the mapped layer's.",
                stacklevel=2,
            )
    return baked


def _baked_latent(quantizer, kernel):
    """The latent kernel that a baked layer's stock quantizer turns into the mapped
    binary kernel: `sign(t)`, times the magnitudes `|W|` whose mean is the scale."""
    signs = quantizer.output_signs(kernel)
    if quantizer.scale is None:
        return signs
    clip = quantizer.scale_clip
    magnitudes = tf.abs(kernel if clip is None else tf.clip_by_value(kernel, -clip, clip))
    # sign(0) = +1: a weight of 0 whose binary value is -1 gets the least magnitude.
    tiny = tf.constant(np.finfo(kernel.dtype.as_numpy_dtype).tiny, kernel.dtype)
    magnitudes = tf.where((magnitudes == 0) & (signs < 0), tiny, magnitudes)
    return signs * magnitudes

