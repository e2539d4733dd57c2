"""A trained BNN to a verified Larq Compute Engine flatbuffer (`.tflite`).

```python
from larq_noisy.export import export_model

report = export_model(model, "model.tflite", verify_images=x_test[:256])
```

A mapped model is baked, a `mixed_float16` one rebuilt in float32 (LCE does not convert
mixed precision); a check that fails (docs/METHOD.md section 7) raises `VerificationError`
and writes nothing. The report is printed, returned and written as JSON beside the file.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import platform
import statistics
import tempfile
import timeit

import larq as lq
import numpy as np
import tensorflow as tf
from larq_compute_engine import convert_keras_model
from larq_compute_engine.tflite.python.interpreter import Interpreter
from tensorflow.lite.python import schema_py_generated as tflite_schema

from larq_noisy.conversion import (
    bake, binarized_layers, check_has_layers, is_binary, mapped_layers, rebuild,
)

__all__ = [
    "BINARY_CONV_OP", "DEFAULT_MIN_EXACT", "DEFAULT_THREADS", "TOLERANCE", "VerificationError",
    "binarized_convs", "check_agreement",
    "check_exportable", "check_writable", "export_model", "measure_agreement",
    "prepare_for_export", "threshold_hits",
]

#: The custom code of LCE's binary convolution in a flatbuffer.
BINARY_CONV_OP = "LceBconv2d"
#: Random inputs used to verify a model when no test images are given.
DEFAULT_RANDOM_INPUTS = 64
#: Fewest verified images LCE must reproduce Keras on: one shows the conversion is right
#: (a wrong kernel or op changes every image, docs/METHOD.md section 7).
DEFAULT_MIN_EXACT = 1
#: Interpreter threads of the agreement check and the benchmark.
DEFAULT_THREADS = 2
#: The largest difference between LCE's and Keras' outputs that float32 rounding explains,
#: relative to the outputs' scale: 2^-13, 2^11 units of float32 rounding (2^-24); the
#: derivation and the measurements are in docs/METHOD.md section 7.
TOLERANCE = 2.0 ** -13
#: Probabilities are compared as logarithms, those below this as this: far above float32's
#: underflow (1e-38), near which TFLite and TensorFlow may flush differently to 0.
_LEAST_PROBABILITY = 1e-30
BENCHMARK_WARMUP_RUNS = 5
BENCHMARK_RUNS = 50

_OP_NAMES = {code: name for name, code in vars(tflite_schema.BuiltinOperator).items()
             if not name.startswith("_")}


class VerificationError(RuntimeError):
    """The converted model is not what was trained: a check of the export failed."""


def check_exportable(model) -> tuple:
    """`model`'s input shape (without the batch) if it is a BNN that LCE can export:
    a binarized layer, one input of static shape, one output; else `ValueError`."""
    check_has_layers(binarized_layers(model), model, "binarized layer to export")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"Model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; export supports single-input, single-output models.")
    shape = tuple(model.inputs[0].shape[1:])
    if None in shape:
        raise ValueError(
            f"Model {model.name!r} has input shape {shape}: LCE needs a static input shape.")
    return shape


def _is_mixed_precision(model) -> bool:
    return any(
        isinstance(layer, tf.keras.layers.Layer) and layer.dtype_policy.compute_dtype != "float32"
        for layer in [model, *model.submodules]
    )


def _float32_config(value):
    """`value` (a layer config or part of one) with every mixed dtype policy -> float32."""
    if isinstance(value, dict):
        return {
            key: "float32" if key == "dtype" and _is_mixed_policy(item) else _float32_config(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_float32_config(item) for item in value]
    return value


def _is_mixed_policy(dtype) -> bool:
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name", "")
    if isinstance(dtype, tf.keras.mixed_precision.Policy):
        dtype = dtype.name
    return isinstance(dtype, str) and dtype.startswith("mixed_")


def _clone(model, edit_config):
    """`rebuild(model, edit_config)` under the float32 global policy."""
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        return rebuild(model, edit_config)
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)


def prepare_for_export(model) -> tuple[tf.keras.Model, list[str]]:
    """`(model, steps)`: the model to convert, baked if it has mappers and rebuilt in
    float32 if mixed, and what was done (`"baked"`, `"float32"`); `ValueError` (as
    `check_exportable`) if it cannot be exported."""
    check_exportable(model)
    steps = []
    if mapped_layers(model):
        # Baked under each layer's own policy: the binary kernels the model trained with
        # (a mapper in float16 and in float32 can disagree on signs near 0).
        model = bake(model)
        steps.append("baked")
    if _is_mixed_precision(model):
        model = _clone(model, lambda layer, config: _float32_config(config))
        steps.append("float32")
    return model, steps


def _float_twin(model) -> tf.keras.Model:
    """`model` with the quantizers of every binarized layer removed: its float version."""
    binarized = {id(layer) for layer in binarized_layers(model)}

    def strip_quantizers(layer, config):
        if id(layer) in binarized:
            config = {**config, "kernel_quantizer": None, "input_quantizer": None}
        return config

    return _clone(model, strip_quantizers)


def _count_ops(flatbuffer: bytes) -> dict[str, int]:
    """How many ops of each kind a TFLite flatbuffer has, by name (builtin op names such
    as `CONV_2D`, custom ops by their custom code such as `LceBconv2d`)."""
    model = tflite_schema.Model.GetRootAsModel(flatbuffer, 0)
    names = [_op_name(model.OperatorCodes(i)) for i in range(model.OperatorCodesLength())]
    counts = collections.Counter()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            counts[names[subgraph.Operators(o).OpcodeIndex()]] += 1
    return dict(counts.most_common())


def _op_name(opcode) -> str:
    code = max(opcode.BuiltinCode(), opcode.DeprecatedBuiltinCode())
    if code == tflite_schema.BuiltinOperator.CUSTOM:
        return opcode.CustomCode().decode()
    return _OP_NAMES.get(code, str(code))


def binarized_convs(model) -> list:
    """The binarized `QuantConv2D` layers of `model`: those LCE makes `LceBconv2d` ops."""
    return [l for l in binarized_layers(model) if isinstance(l, lq.layers.QuantConv2D)]


def _check_binary_convs(model, op_counts: dict[str, int]) -> None:
    """Raise `VerificationError` unless every binarized conv became an `LceBconv2d`."""
    convs = binarized_convs(model)
    found = op_counts.get(BINARY_CONV_OP, 0)
    if found != len(convs):
        layers = ", ".join(
            f"{l.name} {'x'.join(map(str, l.kernel.shape))} "
            f"(input_quantizer {type(l.input_quantizer).__name__})"
            for l in convs
        )
        raise VerificationError(
            f"The flatbuffer has {found} {BINARY_CONV_OP} ops but model {model.name!r} has "
            f"{len(convs)} binarized convs ({layers}); LCE emitted the others as float "
            f"ops (all ops: {op_counts}). Bake mapped models (larq_noisy.bake) and "
            "binarize the inputs of binary convs (input_quantizer='ste_sign').")


def threshold_hits(model, images) -> dict:
    """`{"threshold_hits", "binary_inputs"}`: how many inputs of the top-level binarized
    layers that binarize their input are exactly 0, where larq's sign gives +1 and LCE's
    fused BatchNorm threshold may give -1 (docs/METHOD.md section 7)."""
    layers = [l for l in binarized_layers(model)
              if l in model.layers and is_binary(getattr(l, "input_quantizer", None))]
    if not layers:
        return {"threshold_hits": 0, "binary_inputs": 0}
    # Counted in the graph, per image: the inputs themselves (1.7M floats an image for
    # birealnet18 at 224x224) would not fit in memory for a few hundred images.
    probe = tf.keras.Model(model.inputs, [
        tf.math.count_nonzero(tf.equal(l.input, 0.0), axis=list(range(1, l.input.shape.rank)))
        for l in layers
    ])
    hits = probe.predict(images, batch_size=64, verbose=0)
    sizes = [np.prod(l.input.shape[1:]) for l in layers]
    return {
        "threshold_hits": int(np.sum(hits)),
        "binary_inputs": int(len(images) * np.sum(sizes)),
    }


def _ends_in_softmax(model) -> bool:
    return getattr(model.layers[-1], "activation", None) is tf.keras.activations.softmax


def _compared_values(outputs, probabilities: bool) -> np.ndarray:
    """`outputs` per image, as the log-probabilities if they are probabilities: the
    logits up to a constant per image, whose differences are relative differences of
    the probabilities and do not vanish where a probability saturates at 1."""
    values = np.reshape(outputs, (len(outputs), -1)).astype("float64")
    return np.log(np.maximum(values, _LEAST_PROBABILITY)) if probabilities else values


def measure_agreement(model, flatbuffer: bytes, images, *,
                      threads: int = DEFAULT_THREADS) -> dict:
    """How closely `flatbuffer`, run by LCE's interpreter, follows `model` (Keras) on
    `images`, image by image (docs/METHOD.md section 7).

    The outputs are compared as log-probabilities when `model` ends in a softmax, as
    they are otherwise, relative to their scale, the largest magnitude among Keras'.
    An image is *exact* when none of its outputs differs by more than `TOLERANCE` of that
    scale: float32 rounding. A correct conversion is exact on every image except where a
    binarized layer's input lies within rounding of the sign threshold, so that a binary
    activation flips; a wrong one changes a weight or an op that every image uses.
    *Decisive* images have a top-2 margin above twice the tolerance: on them, rounding
    cannot change the top-1 class.

    # Returns
        `images`, `exact_images`, `tolerance`, `compared` (`"log_probabilities"` or
        `"outputs"`), `min_rel_diff` and `max_rel_diff` (the smallest and largest
        difference of an image, relative to the scale), `top1_agreement` (all images),
        `decisive_images`, `decisive_top1_agreement` (`None` without decisive images),
        `max_abs_diff` (of the outputs themselves), `threshold_hits` and `binary_inputs`.
    """
    expected = model.predict(images, batch_size=64, verbose=0)
    actual = Interpreter(flatbuffer, num_threads=threads).predict(images)
    actual = np.reshape(actual, expected.shape)
    probabilities = _ends_in_softmax(model)
    want, got = (_compared_values(x, probabilities) for x in (expected, actual))
    scale = max(float(np.max(np.abs(want))), np.finfo("float32").tiny)
    relative = np.max(np.abs(got - want), axis=1) / scale
    top2 = np.sort(want, axis=1)[:, -2:]
    decisive = top2[:, -1] - top2[:, 0] > 2 * TOLERANCE * scale
    same_top1 = np.argmax(got, axis=1) == np.argmax(want, axis=1)
    return {
        "images": len(images),
        "exact_images": int(np.sum(relative <= TOLERANCE)),
        "tolerance": TOLERANCE,
        "compared": "log_probabilities" if probabilities else "outputs",
        "min_rel_diff": float(np.min(relative)),
        "max_rel_diff": float(np.max(relative)),
        "top1_agreement": float(np.mean(same_top1)),
        "decisive_images": int(np.sum(decisive)),
        "decisive_top1_agreement":
            float(np.mean(same_top1[decisive])) if decisive.any() else None,
        "max_abs_diff": float(np.max(np.abs(actual - expected))),
        **threshold_hits(model, images),
    }


def check_agreement(agreement: dict, min_exact: int = DEFAULT_MIN_EXACT) -> None:
    """Raise `VerificationError` if fewer than `min_exact` images are exact (reproduced
    to float32 rounding, `measure_agreement`), naming the exact ties at binary inputs
    (`threshold_hits`) where there were any."""
    if agreement["exact_images"] >= min_exact:
        return
    hits = agreement.get("threshold_hits", 0)
    why = (
        f"{hits} of the {agreement['binary_inputs']} inputs of binarized layers are "
        "exactly 0, where larq's sign gives +1 and LCE's fused BatchNorm threshold may "
        "give -1: train the model (its BatchNorm statistics) before exporting it."
        if hits else
        "LCE computes another model: a binary kernel or an op differs (a mapped model "
        "must be baked, larq_noisy.bake). Only an input of a binarized layer within "
        "rounding of 0 changes an image of a correct conversion; if few images were "
        "checked, check more."
    )
    raise VerificationError(
        f"LCE's interpreter reproduces Keras, to float32 rounding ({agreement['tolerance']:.2g} "
        f"of the outputs' scale), on {agreement['exact_images']} of {agreement['images']} "
        f"images (required: {min_exact}); the {agreement['compared'].replace('_', '-')} of "
        f"an image differ by {agreement['min_rel_diff']:.2g} to {agreement['max_rel_diff']:.2g} "
        f"of their scale (top-1 agreement {agreement['top1_agreement']:.2%}, max abs output "
        f"difference {agreement['max_abs_diff']:.3g}). {why}")


def _latency(flatbuffer: bytes, threads: int) -> dict:
    """Median latency (ms) of one batch-1 inference through LCE's interpreter."""
    interpreter = Interpreter(flatbuffer, num_threads=threads)
    shape = interpreter.input_shapes[0]
    run = functools.partial(interpreter.predict,
                            np.random.default_rng(0).standard_normal(shape).astype("float32"))
    timeit.repeat(run, number=1, repeat=BENCHMARK_WARMUP_RUNS)
    times = [t * 1000 for t in timeit.repeat(run, number=1, repeat=BENCHMARK_RUNS)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": BENCHMARK_RUNS}


def check_writable(out_path) -> str:
    """`out_path` as a string, if a file can be written there; else `ValueError`."""
    out_path = os.fspath(out_path)
    directory = os.path.dirname(os.path.abspath(out_path))
    if os.path.isdir(out_path):
        raise ValueError(f"Output path {out_path!r} is a directory; give a file name.")
    if not os.path.isdir(directory):
        problem = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ValueError(f"Output directory {directory!r} of {out_path!r} {problem}.")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"Output directory {directory!r} is not writable: "
                         f"{error.strerror}.") from error
    return out_path


def export_model(model, out_path, *, verify_images=None, threads: int = DEFAULT_THREADS,
                 benchmark: bool = False, min_exact: int = DEFAULT_MIN_EXACT,
                 verify_source: str | None = None, verbose: bool = True) -> dict:
    """Convert `model` to a verified LCE flatbuffer at `out_path`; the report.

    # Arguments
        model: A Larq model, mapped (it is baked) or stock, float32 or mixed precision.
        out_path: Where to write the `.tflite`; the report goes to `out_path + ".json"`.
        verify_images: Test images (NHWC array) on which LCE is compared with Keras;
            `None` for `DEFAULT_RANDOM_INPUTS` random inputs, an int for that many
            random inputs, `0` to skip the agreement check.
        threads: Interpreter threads (agreement and benchmark).
        benchmark: Also time the binary and the float model (median ms, batch 1).
        min_exact: Fewest images on which LCE must reproduce Keras to float32
            rounding (`measure_agreement`); `0` reports without refusing.
        verify_source: What `verify_images` are, for the report (default: says whether
            they were given or random).
        verbose: Print the model summary and the report.

    # Raises
        ValueError: No binarized layer, unwritable `out_path`, unsupported model.
        VerificationError: A check of the export failed; nothing is written then.
    """
    out_path = check_writable(out_path)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    model, steps = prepare_for_export(model)
    images, verify_source = _verification_inputs(model, verify_images, verify_source)
    _check_min_exact(min_exact, images)
    if verbose:
        lq.models.summary(model)

    flatbuffer = convert_keras_model(model)
    ops = _count_ops(flatbuffer)
    _check_binary_convs(model, ops)
    agreement = None
    if images is not None:
        agreement = {"inputs": verify_source,
                     **measure_agreement(model, flatbuffer, images, threads=threads),
                     "min_exact": min_exact}
        check_agreement(agreement, min_exact)

    float_flatbuffer = convert_keras_model(_float_twin(model))
    report = {
        "model": model.name,
        "tflite": out_path,
        "prepared": steps,
        "binarized_layers": len(binarized_layers(model)),
        "binarized_convs": len(binarized_convs(model)),
        "ops": ops,
        "agreement": agreement,
        "bytes": len(flatbuffer),
        "float_bytes": len(float_flatbuffer),
        "size_ratio": len(float_flatbuffer) / len(flatbuffer),
        "float_ops": _count_ops(float_flatbuffer),
        "benchmark": {
            "threads": threads,
            "machine": platform.machine(),
            "binary": _latency(flatbuffer, threads),
            "float": _latency(float_flatbuffer, threads),
        } if benchmark else None,
    }
    text = json.dumps(report, indent=2, allow_nan=False)  # NaN raises before any write
    _write_atomically(out_path, flatbuffer)
    _write_atomically(out_path + ".json", text.encode())
    if verbose:
        print(_format_report(report))
    return report


def _check_min_exact(min_exact, images) -> None:
    """`ValueError` unless `min_exact` is a count that `images` (or none) can reach."""
    count = 0 if images is None else len(images)
    if not isinstance(min_exact, (int, np.integer)) or min_exact < 0:
        raise ValueError(f"min_exact must be an integer >= 0, got {min_exact!r}.")
    if count and min_exact > count:
        raise ValueError(f"min_exact is {min_exact} but only {count} images are verified: "
                         f"give at most {count}, or more images.")


def _verification_inputs(model, verify_images, verify_source):
    """`(images or None, description)` from `export_model`'s `verify_images`."""
    shape = tuple(model.inputs[0].shape[1:])  # static: checked by prepare_for_export
    if verify_images is None:
        verify_images = DEFAULT_RANDOM_INPUTS
    if isinstance(verify_images, (int, np.integer)):
        if verify_images < 0:
            raise ValueError(f"verify_images must be >= 0, got {verify_images}.")
        if verify_images == 0:
            return None, "not checked"
        random = np.random.default_rng(0).standard_normal((int(verify_images), *shape))
        return random.astype("float32"), verify_source or f"{verify_images} random inputs"
    images = np.asarray(verify_images, dtype="float32")
    if images.ndim != 4 or images.shape[1:] != shape or not len(images):
        raise ValueError(
            f"verify_images has shape {images.shape}; model {model.name!r} needs a "
            f"non-empty batch of shape (N, {', '.join(map(str, shape))}).")
    return images, verify_source or f"{len(images)} given images"


def _write_atomically(path: str, data: bytes) -> None:
    """Write `data` to a new file in a new folder beside `path`, then rename it: never
    half a file, and the mode of any new file (mkstemp's is 0600). As harness.rundir's
    `atomic_path`, which the library cannot import."""
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path) or ".",
                                     prefix=f".{os.path.basename(path)}.") as directory:
        tmp = os.path.join(directory, os.path.basename(path))
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)


def _format_report(report: dict) -> str:
    """The report as a few human-readable lines."""
    ops = ", ".join(f"{name} {count}" for name, count in report["ops"].items())
    lines = [
        f"Exported {report['model']} to {report['tflite']}"
        + (f" ({', '.join(report['prepared'])})" if report["prepared"] else ""),
        f"  size: {report['bytes'] / 1024:.1f} KiB binary, {report['float_bytes'] / 1024:.1f} "
        f"KiB float: {report['size_ratio']:.1f}x smaller",
        f"  ops: {ops}",
        f"  {report['binarized_convs']} binarized convs -> "
        f"{report['ops'].get(BINARY_CONV_OP, 0)} {BINARY_CONV_OP}: ok",
    ]
    agreement = report["agreement"]
    if agreement is None:
        lines.append("  agreement with Keras: not checked")
    else:
        decisive = agreement["decisive_top1_agreement"]
        lines += [
            f"  agreement with Keras on {agreement['inputs']}: {agreement['exact_images']} of "
            f"{agreement['images']} images exact ({agreement['compared'].replace('_', '-')} "
            f"within {agreement['tolerance']:.2g} of their scale; largest difference "
            f"{agreement['max_rel_diff']:.2g}, max abs diff {agreement['max_abs_diff']:.3g})",
            f"  top-1 agreement {agreement['top1_agreement']:.2%} "
            f"({agreement['decisive_images']} decisive images"
            + (f": {decisive:.2%})" if decisive is not None else ")")
            + f", {agreement['threshold_hits']} of {agreement['binary_inputs']} binary inputs "
            "exactly on the sign threshold",
        ]
    bench = report["benchmark"]
    if bench is not None:
        lines.append(
            f"  latency ({bench['machine']}, {bench['threads']} threads, median (min) of "
            f"{bench['binary']['runs']}): binary {bench['binary']['median_ms']:.2f} "
            f"({bench['binary']['min_ms']:.2f}) ms, float {bench['float']['median_ms']:.2f} "
            f"({bench['float']['min_ms']:.2f}) ms")
        if bench["machine"] not in ("aarch64", "arm64", "armv7l"):
            lines.append("  (LCE's optimized binary kernels target ARM; measure on the "
                         "device with lce_benchmark_model)")
    return "\n".join(lines)
