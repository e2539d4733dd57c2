"""Export a trained BNN to a verified Larq Compute Engine flatbuffer (`.tflite`).

```bash
python export.py runs/fashion_mnist --arm lns            # a train.py run
python export.py model.h5 --out model.tflite --dataset fashion_mnist
python export.py runs/fashion_mnist --benchmark --threads 2
```

The steps (docs/METHOD.md section 7):

1. **Bake**: a model that still has mapped layers is baked (`larq_noisy.bake`), so that
   every binary kernel is a constant that LCE can pack into bits.
2. **Float32**: a model trained under `mixed_float16` is rebuilt in float32 (LCE, like
   the TFLite converter, does not convert mixed-precision models). Baking comes first,
   in the model's own policy, so the binary kernels are those it was trained with.
3. **Convert** with Larq Compute Engine and check, failing loudly (`VerificationError`):
   * that every binarized conv (`QuantConv2D` with a precision-1 kernel quantizer)
     became an `LceBconv2d` op: LCE silently emits float convolutions otherwise
     (docs/METHOD.md section 7: seen for un-baked mappers at 3x3x96x96 and larger; it always
     happens to a binary-kernel conv whose inputs are not binarized);
   * that the LCE interpreter agrees with the Keras model on real test images (top-1
     agreement >= `min_agreement`; the max absolute output difference is reported).
4. **Report**: file size against a float TFLite of the same architecture (the binarized
   layers' quantizers removed), op counts, agreement and, on request, latency through
   LCE's interpreter. Printed, returned and written as JSON next to the `.tflite`.

Nothing is written when a check fails. Latency on x86 says little about a deployment:
LCE's optimized binary kernels target ARM (aarch64, ARMv7); benchmark there with LCE's
`lce_benchmark_model --graph=model.tflite --num_threads=4`.
"""

from __future__ import annotations

import collections
import os
import platform
import statistics
import tempfile
import time

import larq as lq
import numpy as np
import tensorflow as tf
from larq_compute_engine import convert_keras_model
from larq_compute_engine.tflite.python.interpreter import Interpreter
from tensorflow.lite.python import schema_py_generated as tflite_schema

# Importing conversion registers NoisyMappedQuantizer and the mappers for load_model.
from larq_noisy.conversion import is_binary, bake, binarized_layers, mapped_layers, rebuild
from harness.rundir import RunDir, RunFileError, atomic_path, is_arm_model, read_json, write_json

__all__ = [
    "BINARY_CONV_OP",
    "VerificationError",
    "benchmark_latency",
    "binarized_convs",
    "check_agreement",
    "check_binary_convs",
    "check_writable",
    "compare_outputs",
    "compare_with_float",
    "convert",
    "count_ops",
    "export_model",
    "export_run",
    "export_source",
    "float_twin",
    "format_report",
    "load_model",
    "prepare_for_export",
    "run_model_path",
    "threshold_hits",
    "verify_flatbuffer",
]

#: The custom code of LCE's binary convolution in a flatbuffer.
BINARY_CONV_OP = "LceBconv2d"
#: Random inputs used to verify a model when no test images are given.
DEFAULT_RANDOM_INPUTS = 64
BENCHMARK_WARMUP_RUNS = 5
BENCHMARK_RUNS = 50

_OP_NAMES = {
    code: name
    for name, code in vars(tflite_schema.BuiltinOperator).items()
    if not name.startswith("_")
}


class VerificationError(RuntimeError):
    """The converted model is not what was trained: a check of the export failed."""


# Loading ---------------------------------------------------------------------------


def load_model(path) -> tf.keras.Model:
    """A Keras model saved as a full-model `.h5`/`.keras` file or a SavedModel dir."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Model file {path!r} does not exist.")
    try:
        return tf.keras.models.load_model(path, compile=False)
    except (OSError, ValueError, KeyError) as error:  # truncated, not a model, not Keras'
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        fix = (f"train.py writes it again if you delete {os.path.dirname(path)} and rerun "
               "that run's train.py command") if is_arm_model(path) else (
            "give the path of a model saved by `model.save` (.h5, .keras or a SavedModel "
            "directory), or a train.py run directory")
        raise RunFileError(f"{path} is not a readable Keras model ({reason}): {fix}.") from None


def run_model_path(run_dir, arm: str) -> str:
    """`<run_dir>/arms/<arm>/model.h5`, the baked model train.py saved for `arm`."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"Run directory {run_dir!r} does not exist.")
    path = RunDir.model(RunDir(run_dir).arm(arm))
    if not os.path.isfile(path):
        trained = _trained_arms(run_dir)
        choices = f"the trained arms are {trained}" if trained else "no arm has a model.h5 yet"
        raise ValueError(
            f"Arm {arm!r} was not trained in run {run_dir!r} (no {path}); {choices}."
        )
    return path


def _trained_arms(run_dir: str) -> list[str]:
    run = RunDir(run_dir)
    arms_dir = run.path("arms")
    if not os.path.isdir(arms_dir):
        return []
    return sorted(arm for arm in os.listdir(arms_dir) if os.path.isfile(RunDir.model(run.arm(arm))))


def _read_run_config(run_dir: str) -> dict:
    path = RunDir(run_dir).config
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist: is {run_dir!r} a train.py run?")
    return read_json(path, "restore it from the run, or export the model file itself")


def _is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isdir(RunDir(path).path("arms")) or os.path.isfile(RunDir(path).config)
    )


def _test_images(dataset, model, count, *, data_dir=None):
    """Up to `count` test images of `dataset` at `model`'s input size, and what they are.

    Falls back to `None` (random inputs) when the data is not on this machine.
    """
    from harness import datasets  # tfds and friends only when real data is asked for

    size = _input_shape(model)[0]
    try:
        batches, _ = datasets.load(
            dataset, "test", min(count, 256), data_dir=data_dir, image_size=size, limit=count
        )
    except FileNotFoundError as error:
        print(f"export: {dataset} is not on this machine, verifying on random inputs ({error})")
        return None, f"{count} random inputs ({dataset} is not on this machine)"
    images = np.concatenate([x.numpy() for x, _ in batches])
    if images.shape[1:] != _input_shape(model):
        raise ValueError(
            f"Dataset {dataset!r} gives images of shape {images.shape[1:]}, but model "
            f"{model.name!r} takes {_input_shape(model)}."
        )
    return images, f"{len(images)} {dataset} test images"


# Preparing the Keras model ---------------------------------------------------------


def _input_shape(model) -> tuple:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"Model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; export supports single-input, single-output models."
        )
    shape = tuple(model.inputs[0].shape[1:])
    if None in shape:
        raise ValueError(
            f"Model {model.name!r} has input shape {shape}: LCE needs a static input shape."
        )
    return shape


def _check_binarized(model) -> None:
    if not binarized_layers(model):
        kinds = sorted({type(layer).__name__ for layer in model.layers})
        raise ValueError(
            f"Model {model.name!r} has no binarized layer (a larq layer whose "
            f"kernel_quantizer has precision 1, e.g. 'ste_sign'), so there is no binary "
            f"model to export; its layer types are {kinds}."
        )


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
    """The model to convert: baked if it has mappers, rebuilt in float32 if mixed.

    # Returns
        `(model, steps)`, `steps` naming what was done (`"baked"`, `"float32"`).
    # Raises
        ValueError: If `model` has no binarized layer, or cannot be converted.
    """
    _check_binarized(model)
    _input_shape(model)
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


def float_twin(model) -> tf.keras.Model:
    """`model` with the quantizers of every binarized layer removed: its float version."""
    binarized = {id(layer) for layer in binarized_layers(model)}

    def strip_quantizers(layer, config):
        if id(layer) in binarized:
            config = {**config, "kernel_quantizer": None, "input_quantizer": None}
        return config

    return _clone(model, strip_quantizers)


# Converting and inspecting ---------------------------------------------------------


def convert(model) -> bytes:
    """Convert a float32 Keras model with Larq Compute Engine; the flatbuffer's bytes."""
    return convert_keras_model(model)


def count_ops(flatbuffer: bytes) -> dict[str, int]:
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


def check_binary_convs(model, op_counts: dict[str, int]) -> None:
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
            "binarize the inputs of binary convs (input_quantizer='ste_sign')."
        )


def _random_inputs(model, count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, *_input_shape(model))).astype("float32")


def threshold_hits(model, images) -> dict:
    """How many inputs of the binarized layers sit exactly on the sign threshold (0).

    larq's `ste_sign` maps 0 (and -0.0) to +1. LCE binarizes a fused
    BatchNorm-then-sign output by comparing the integer accumulator with a threshold,
    and a value exactly on it can come out -1 (seen at zero-padded borders of
    `padding="same"` convolutions, and depending on the CPU's rounding): the only
    place a converted model can disagree with Keras. Trained BatchNorm statistics make
    exact ties vanishingly rare; an untrained BatchNorm after a binary layer makes many.

    # Returns
        `{"threshold_hits", "binary_inputs"}` over the top-level binarized layers that
        binarize their input.
    """
    layers = [l for l in binarized_layers(model)
              if l in model.layers and is_binary(getattr(l, "input_quantizer", None))]
    if not layers:
        return {"threshold_hits": 0, "binary_inputs": 0}
    probe = tf.keras.Model(model.inputs, [l.input for l in layers])
    inputs = probe.predict(images, batch_size=64, verbose=0)
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return {
        "threshold_hits": int(sum(np.count_nonzero(x == 0) for x in inputs)),
        "binary_inputs": int(sum(x.size for x in inputs)),
    }


def compare_outputs(model, flatbuffer: bytes, images, *, threads: int = 2) -> dict:
    """How closely LCE's interpreter running `flatbuffer` follows `model` on `images`.

    # Returns
        `{"images", "top1_agreement", "max_abs_diff", "threshold_hits",
        "binary_inputs"}` (the last two: `threshold_hits`).
    """
    expected = model.predict(images, batch_size=64, verbose=0)
    actual = Interpreter(flatbuffer, num_threads=threads).predict(images)
    actual = np.reshape(actual, expected.shape)
    agreement = np.mean(np.argmax(actual, -1) == np.argmax(expected, -1))
    return {
        "images": len(images),
        "top1_agreement": float(agreement),
        "max_abs_diff": float(np.max(np.abs(actual - expected))),
        **threshold_hits(model, images),
    }


def check_agreement(agreement: dict, min_agreement: float) -> None:
    """Raise `VerificationError` if the top-1 agreement is below `min_agreement`,
    naming the exact ties at binary inputs (`threshold_hits`) where there were any."""
    if agreement["top1_agreement"] < min_agreement:
        hits = agreement.get("threshold_hits", 0)
        why = (
            f" {hits} of the {agreement['binary_inputs']} inputs of binarized layers are "
            "exactly 0, where larq's sign gives +1 and LCE's fused BatchNorm threshold may "
            "give -1: train the model (its BatchNorm statistics) before exporting it."
            if hits else ""
        )
        raise VerificationError(
            f"LCE's interpreter and the Keras model agree on the top-1 class of only "
            f"{agreement['top1_agreement']:.2%} of {agreement['images']} images "
            f"(required: {min_agreement:.2%}; max abs output difference "
            f"{agreement['max_abs_diff']:.3g}).{why}"
        )


def benchmark_latency(flatbuffer: bytes, *, threads: int = 2,
                      warmup: int = BENCHMARK_WARMUP_RUNS, runs: int = BENCHMARK_RUNS) -> dict:
    """Median latency (ms) of one batch-1 inference through LCE's interpreter."""
    interpreter = Interpreter(flatbuffer, num_threads=threads)
    shape = interpreter.input_shapes[0]
    image = np.random.default_rng(0).standard_normal(shape).astype("float32")
    for _ in range(warmup):
        interpreter.predict(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.predict(image)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": runs}


# Exporting -------------------------------------------------------------------------


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
        raise ValueError(
            f"Output directory {directory!r} is not writable: {error.strerror}."
        ) from error
    return out_path


def export_model(model, out_path, *, verify_images=None, threads: int = 2,
                 benchmark: bool = False, min_agreement: float = 0.99,
                 verify_source: str | None = None, verbose: bool = True) -> dict:
    """Convert `model` to a verified LCE flatbuffer at `out_path`; the report.

    # Arguments
        model: A Larq model, mapped (it is baked) or stock, float32 or mixed precision.
        out_path: Where to write the `.tflite`; the report goes to `out_path + ".json"`.
        verify_images: Test images (NHWC array) on which LCE must agree with Keras;
            `None` for `DEFAULT_RANDOM_INPUTS` random inputs, an int for that many
            random inputs, `0` to skip the agreement check.
        threads: Interpreter threads (agreement and benchmark).
        benchmark: Also time the binary and the float model (median ms, batch 1).
        min_agreement: Lowest accepted top-1 agreement, in [0, 1].
        verify_source: What `verify_images` are, for the report (default: says whether
            they were given or random).
        verbose: Print the model summary and the report.

    # Returns
        The report: sizes, op counts, agreement, latency (see the module docstring).

    # Raises
        ValueError: No binarized layer, unwritable `out_path`, unsupported model.
        VerificationError: A binarized conv is not an `LceBconv2d`, or LCE disagrees
            with Keras. Nothing is written then.
    """
    out_path = check_writable(out_path)
    if not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}.")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    model, steps = prepare_for_export(model)
    images, verify_source = _verification_inputs(model, verify_images, verify_source)
    if verbose:
        lq.models.summary(model)

    flatbuffer = convert(model)
    report = {
        "model": model.name,
        "tflite": out_path,
        "prepared": steps,
        **verify_flatbuffer(model, flatbuffer, images, threads=threads,
                            min_agreement=min_agreement, inputs=verify_source),
        **compare_with_float(model, flatbuffer, threads=threads, benchmark=benchmark),
    }
    _write(out_path, flatbuffer, report)
    if verbose:
        print(format_report(report))
    return report


def verify_flatbuffer(model, flatbuffer: bytes, images=None, *, threads: int = 2,
                      min_agreement: float = 0.99, inputs: str = "") -> dict:
    """Check that `flatbuffer` is `model` converted: every binarized conv an `LceBconv2d`,
    and, with `images`, LCE's outputs agreeing with Keras'. Raises `VerificationError`.

    # Returns
        `{"binarized_layers", "binarized_convs", "ops", "agreement"}` (`agreement` is
        `None` without images).
    """
    ops = count_ops(flatbuffer)
    check_binary_convs(model, ops)
    agreement = None
    if images is not None:
        agreement = {
            "inputs": inputs,
            **compare_outputs(model, flatbuffer, images, threads=threads),
            "min_agreement": min_agreement,
        }
        check_agreement(agreement, min_agreement)
    return {
        "binarized_layers": len(binarized_layers(model)),
        "binarized_convs": len(binarized_convs(model)),
        "ops": ops,
        "agreement": agreement,
    }


def compare_with_float(model, flatbuffer: bytes, *, threads: int = 2,
                       benchmark: bool = False) -> dict:
    """Size (and with `benchmark`, latency) of `flatbuffer` against `model`'s float twin.

    # Returns
        `{"bytes", "float_bytes", "size_ratio", "float_ops", "benchmark"}`.
    """
    float_flatbuffer = convert(float_twin(model))
    latency = None
    if benchmark:
        latency = {
            "threads": threads,
            "machine": platform.machine(),
            "binary": benchmark_latency(flatbuffer, threads=threads),
            "float": benchmark_latency(float_flatbuffer, threads=threads),
        }
    return {
        "bytes": len(flatbuffer),
        "float_bytes": len(float_flatbuffer),
        "size_ratio": len(float_flatbuffer) / len(flatbuffer),
        "float_ops": count_ops(float_flatbuffer),
        "benchmark": latency,
    }


def _verification_inputs(model, verify_images, verify_source):
    """`(images or None, description)` from `export_model`'s `verify_images`."""
    if verify_images is None:
        verify_images = DEFAULT_RANDOM_INPUTS
    if isinstance(verify_images, (int, np.integer)):
        if verify_images < 0:
            raise ValueError(f"verify_images must be >= 0, got {verify_images}.")
        if verify_images == 0:
            return None, "not checked"
        source = verify_source or f"{verify_images} random inputs"
        return _random_inputs(model, int(verify_images)), source
    images = np.asarray(verify_images, dtype="float32")
    if images.ndim != 4 or images.shape[1:] != _input_shape(model) or not len(images):
        raise ValueError(
            f"verify_images has shape {images.shape}; model {model.name!r} needs a "
            f"non-empty batch of shape (N, {', '.join(map(str, _input_shape(model)))})."
        )
    return images, verify_source or f"{len(images)} given images"


def _write(out_path: str, flatbuffer: bytes, report: dict) -> None:
    with atomic_path(out_path) as tmp, open(tmp, "wb") as file:
        file.write(flatbuffer)
    write_json(out_path + ".json", report)


def format_report(report: dict) -> str:
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
        lines.append(
            f"  agreement with Keras on {agreement['inputs']}: top-1 "
            f"{agreement['top1_agreement']:.2%}, max abs diff {agreement['max_abs_diff']:.3g}, "
            f"{agreement['threshold_hits']} of {agreement['binary_inputs']} binary inputs "
            "exactly on the sign threshold"
        )
    bench = report["benchmark"]
    if bench is not None:
        lines.append(
            f"  latency ({bench['machine']}, {bench['threads']} threads, median (min) of "
            f"{bench['binary']['runs']}): binary {bench['binary']['median_ms']:.2f} "
            f"({bench['binary']['min_ms']:.2f}) ms, float {bench['float']['median_ms']:.2f} "
            f"({bench['float']['min_ms']:.2f}) ms"
        )
        if bench["machine"] not in ("aarch64", "arm64", "armv7l"):
            lines.append(
                "  (LCE's optimized binary kernels target ARM; measure on the device with "
                "lce_benchmark_model)"
            )
    return "\n".join(lines)


def export_run(run_dir, out_path=None, *, arm: str = "lns", verify: int = 256,
               threads: int = 2, benchmark: bool = False, min_agreement: float = 0.99,
               dataset: str | None = None, data_dir: str | None = None,
               verbose: bool = True) -> dict:
    """Export the model train.py saved for `arm` in `run_dir`; the report.

    Verifies on `verify` images of the run's test split (dataset and data dir from its
    `config.json`; `dataset`, `data_dir` override them), or on random inputs if the
    data is not on this machine.
    `out_path` defaults to `<run_dir>/arms/<arm>/model.tflite`.
    """
    model_path = run_model_path(run_dir, arm)
    config = _read_run_config(os.fspath(run_dir))
    if out_path is None:
        out_path = os.path.join(os.path.dirname(model_path), "model.tflite")
    check_writable(out_path)
    model = load_model(model_path)
    return _export_loaded(model, out_path, dataset=dataset or config.get("dataset"),
                          data_dir=data_dir or config.get("data_dir"),
                          verify=verify, threads=threads, benchmark=benchmark,
                          min_agreement=min_agreement, verbose=verbose)


def _export_loaded(model, out_path, *, dataset, data_dir, verify, **options) -> dict:
    if verify < 0:
        raise ValueError(f"verify must be >= 0, got {verify}.")
    images, source = None, None
    if dataset and verify:
        _check_binarized(model)  # fail on a bad model before reading data
        images, source = _test_images(dataset, model, verify, data_dir=data_dir)
    if images is None:  # no data: `verify` random inputs (or none for 0)
        images = verify
    return export_model(model, out_path, verify_images=images, verify_source=source, **options)


def export_source(source, out_path=None, *, arm: str = "lns", verify: int = 256,
                  dataset: str | None = None, data_dir: str | None = None,
                  **options) -> dict:
    """Export `source`: a train.py run directory or a saved Keras model.

    For a model file, `out_path` defaults to it with the suffix `.tflite`, and the
    agreement is checked on `dataset`'s test images, or random inputs without one.
    """
    source = os.fspath(source)
    if not os.path.exists(source):
        raise FileNotFoundError(
            f"Source {source!r} does not exist (give a train.py run directory or a model file)."
        )
    if _is_run_dir(source):
        return export_run(source, out_path, arm=arm, verify=verify, dataset=dataset,
                          data_dir=data_dir, **options)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "saved_model.pb")):
        raise ValueError(
            f"Source {source!r} is a directory but neither a train.py run (config.json, "
            "arms/) nor a SavedModel (saved_model.pb)."
        )
    if out_path is None:
        out_path = os.path.splitext(source.rstrip(os.sep))[0] + ".tflite"
    check_writable(out_path)
    return _export_loaded(load_model(source), out_path, dataset=dataset, data_dir=data_dir,
                          verify=verify, **options)
