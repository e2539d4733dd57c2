"""LNS at every layer size (docs/RESULTS.md section 1): does a setting of LNS keep a
pretrained BNN's binary weights, from ResNet-20's 2,304-weight convs to ResNet-18's
2.36 M-weight ones? A model's binarized kernels have the same shapes whatever its input
size, so the ImageNet models run on Fashion-MNIST at 32x32 (ResNet-E 18 at 16x16) here.
Stages:

1. pretrain: each model with sign weights (`train.py --pretrain-epochs 4 --limit 20000`,
   SGD lr 0.1), into bench_runs/layer_size/<model>/;
2. flips: from that checkpoint, 10 steps of each setting (`settings()`) on the same
   batches, SGD lr 0.01 momentum 0.9 (the cifar10 and imagenet2012 protocols' fine-tuning)
   unless the row says Adam: the fraction of binary weights flipped after 1, 3 and 10
   steps, the loss of step 1, and what one check of `FlipGuard` costs against a step;
3. accuracy: `train.py` fine-tunes `sign`, `lns` (`--preset per_weight`) and `lns` with
   the paper's `sum` (`--preset paper --mapper separable --no-guard`: the paper's `cnn`
   scrambles as much and costs 8x a step at ResNet-18's sizes) from the checkpoint on
   the same batches, 100 steps of SGD lr 0.01.

    .venv/bin/python bench/layer_size.py               # about 1.5 h on 2 CPU cores; resumes
    .venv/bin/python bench/layer_size.py --report-only

Finished rows are kept in bench/state/layer_size/rows.json (committed), so the same
command resumes; the report is docs/data/layer_size.json and docs/layer_size_flips.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import machine  # noqa: E402  (before TensorFlow)
from harness.rundir import read_json, write_json  # noqa: E402

#: The models and the input size they run at here (larq-zoo's ResNet-E 18 does not
#: downsample in its stem below 64x64: at 16x16 it computes 4x Bi-Real Net 18's at 32x32).
MODELS = {"resnet20": 28, "birealnet18": 32, "resnet_e18": 16}
STATE = os.path.join(ROOT, "bench", "state", "layer_size", "rows.json")
RUNS = os.path.join(ROOT, "bench_runs", "layer_size")
STEPS = (1, 3, 10)
PRETRAIN = ["--pretrain-epochs", "4", "--limit", "20000", "--optimizer", "sgd", "--lr", "0.1"]
FINETUNE = ["--finetune-epochs", "1", "--steps-per-epoch", "100", "--limit", "20000",
            "--optimizer", "sgd", "--finetune-lr", "0.01"]


def settings() -> dict[str, tuple[str, dict | None]]:
    """`{row: (optimizer, quantizer options or None for sign weights)}` of the flips stage."""
    from larq_noisy.quantizers import PAPER, PER_WEIGHT

    rows = {"sign": ("sgd", None)}
    for mapper in ("cnn", "separable", "linear"):
        rows[f"{mapper}, alpha 0"] = ("sgd", {**PER_WEIGHT, "mapper": mapper, "alpha": 0.0})
        for reduction, base in (("sum", PAPER), ("mean", PER_WEIGHT)):
            for aux_to_latent, target in ((True, "W"), (False, "mapper")):
                rows[f"{mapper}, {reduction}, aux on {target}"] = ("sgd", {
                    **base, "mapper": mapper, "aux_to_latent": aux_to_latent})
    # How small alpha must be with `sum`: it depends on the layer size.
    rows["separable, sum, alpha 1e-4"] = ("sgd", {**PAPER, "mapper": "separable", "alpha": 1e-4})
    rows["sign, Adam 3e-4"] = ("adam", None)
    rows["per_weight, Adam 3e-4"] = ("adam", PER_WEIGHT)
    return rows


def run_dir(model: str) -> str:
    return os.path.join(RUNS, model)


def train(model: str, *flags: str, output: str) -> None:
    """One `train.py` run of `model` at its input size, its log beside its run dir."""
    os.makedirs(RUNS, exist_ok=True)
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--model", model,
               "--image-size", str(MODELS[model]), "--output-dir", output, "--verbose", "2",
               *flags]
    print("+", " ".join(command[1:]), flush=True)
    with open(output + ".log", "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=ROOT)


def pretrained(model: str) -> str:
    """Stage 1: the model's pretrained sign checkpoint, trained here if missing."""
    weights = os.path.join(run_dir(model), "pretrain", "weights.h5")
    if not os.path.exists(weights):
        train(model, *PRETRAIN, "--arms", output=run_dir(model))
    return weights


def measure_flips(model_name: str, weights: str, rows: dict):
    """Stage 2 for one model, in this process: `(row, figures)` of each row not in `rows`."""
    import numpy as np
    import tensorflow as tf

    import models
    from harness import datasets
    from larq_noisy import flip_rates, size_weighted_mean, to_mapped

    size = MODELS[model_name]
    data, _ = datasets.load("fashion_mnist", "train", 64, image_size=size, limit=20000,
                            epochs=(0, 1), seed=0)
    batches = list(data.take(max(STEPS)))

    def baseline():
        tf.keras.backend.reset_uids()
        model = models.build(model_name, (size, size, 1), 10)
        model.load_weights(weights)
        return model

    sizes = [l.kernel.shape.num_elements() for l in baseline().layers
             if getattr(getattr(l, "kernel_quantizer", None), "precision", None) == 1]
    # The cnn rows last: at ResNet-18's sizes a cnn step takes 10-30 s on 2 cores.
    order = sorted(settings().items(), key=lambda item: item[0].startswith("cnn"))
    for name, (optimizer, options) in order:
        if name in rows:
            continue
        tf.keras.backend.clear_session()  # each row's models freed (ResNet-18's mappers are large)
        reference = baseline()
        tf.keras.utils.set_random_seed(0)
        model = baseline() if options is None else to_mapped(baseline(), **options)
        model.compile(tf.keras.optimizers.SGD(0.01, momentum=0.9) if optimizer == "sgd"
                      else tf.keras.optimizers.Adam(3e-4), "sparse_categorical_crossentropy")
        flips, seconds, check = {}, [], []
        for step, (x, y) in enumerate(batches, 1):
            start = time.perf_counter()
            loss = float(model.train_on_batch(x, y))
            seconds.append(time.perf_counter() - start)
            if step == 1:
                first_loss = loss
            if step in STEPS:
                start = time.perf_counter()
                flips[str(step)] = size_weighted_mean(model, flip_rates(model, reference))
                check.append(time.perf_counter() - start)
        yield name, {"model": model_name, "optimizer": optimizer, "quantizer": options,
                       "flips": flips, "first_loss": first_loss,
                       "step_seconds": float(np.median(seconds[1:])),
                       "check_seconds": float(np.median(check)),
                       "largest_layer": max(sizes), "smallest_layer": min(sizes)}
        print(f"{model_name:12s} {name:34s} flips "
              + " ".join(f"{100 * flips[str(s)]:6.2f}%" for s in STEPS)
              + f"  loss {first_loss:.4g}", flush=True)


def measure_accuracy(model: str, weights: str) -> dict:
    """Stage 3 for one model: `{row: {val_accuracy, test_accuracy, flip_rate}}`, with the
    baseline's, from two `train.py` runs on the same checkpoint and batches."""
    runs = {"per_weight": ["--arms", "sign", "lns", "--preset", "per_weight"],
            "paper": ["--arms", "lns", "--preset", "paper", "--mapper", "separable",
                      "--no-guard"]}
    rows = {}
    for preset, flags in runs.items():
        output = os.path.join(RUNS, f"{model}_finetune_{preset}")
        train(model, "--pretrained", weights, *FINETUNE, *flags, output=output)
        results = read_json(os.path.join(output, "results.json"), "delete its run to redo it")
        rows["baseline"] = {k: results["baseline"][k] for k in ("val_accuracy", "test_accuracy")}
        for arm, result in results["arms"].items():
            name = arm if arm == "sign" else f"lns ({preset})"
            rows[name] = {k: result[k] for k in ("val_accuracy", "test_accuracy", "flip_rate")}
    return rows


def keep(state: dict) -> None:
    os.makedirs(os.path.dirname(STATE), exist_ok=True)
    write_json(STATE, state)


def tables(state: dict) -> str:
    """The flips table (a column per model: % flipped after 1 / 3 / 10 steps, the loss of
    step 1) and the accuracy table, in Markdown."""
    flips = state.get("flips", {})
    models = [m for m in MODELS if m in flips]
    lines = ["| setting | " + " | ".join(
        f"{m}: flipped % after 1 / 3 / 10 steps | loss" for m in models) + " |",
        "|---|" + "---|---|" * len(models)]
    for name in settings():
        cells = []
        for model in models:
            row = flips[model].get(name)
            cells += (["-", "-"] if row is None else [
                " / ".join(f"{100 * row['flips'][str(s)]:.2f}" for s in STEPS),
                f"{row['first_loss']:.3g}"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    accuracy = state.get("accuracy", {})
    if accuracy:
        rows = list(next(iter(accuracy.values())))  # as `measure_accuracy` names them
        lines += ["", "| arm | " + " | ".join(f"{m}: val / test % | flipped %" for m in accuracy)
                  + " |", "|---|" + "---|---|" * len(accuracy)]
        for name in rows:
            cells = []
            for model in accuracy:
                r = accuracy[model].get(name, {})
                cells += [f"{100 * r['val_accuracy']:.2f} / {100 * r['test_accuracy']:.2f}"
                          if r else "-",
                          f"{100 * r['flip_rate']:.2f}" if "flip_rate" in r else "-"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(state: dict, json_path: str, plot_path: str) -> None:
    """docs/data/layer_size.json (every row) and .md (the tables), and the plot of flips
    per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(json_path, {**state, "command": "bench/layer_size.py"})
    with open(os.path.splitext(json_path)[0] + ".md", "w") as f:
        f.write(tables(state))
    names = list(settings())
    measured = [m for m in MODELS if state.get("flips", {}).get(m)] or list(MODELS)[:1]
    fig, axes = plt.subplots(1, len(measured), figsize=(5 * len(measured) + 3, 5), sharey=True,
                             squeeze=False)
    axes = axes[0]
    for ax, model in zip(axes, measured):
        rows = state.get("flips", {}).get(model, {})
        for name in names:
            if name not in rows or ("alpha 0" in name) or ("aux on mapper" in name):
                continue
            flips = rows[name]["flips"]
            style = "--" if ", sum" in name else "-"
            ax.plot(STEPS, [100 * flips[str(s)] for s in STEPS], style, marker="o", label=name)
        largest = next(iter(rows.values()), {}).get("largest_layer")
        ax.set_title(f"{model} (largest binary conv {largest:,} weights)" if largest else model)
        ax.set_xlabel("fine-tuning step")
        ax.set_xscale("log")
        ax.axhline(5, color="k", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("binary weights flipped since pretraining, %")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle("LNS at every layer size: flips per step from each model's 4-epoch sign "
                 "checkpoint (Fashion-MNIST, SGD lr 0.01; dotted: the guard's 5%)\n"
                 "bench/layer_size.py; dashed: the paper's sum reduction", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (5 * len(measured) + 3), 1))
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--stages", nargs="+", default=["flips", "accuracy"],
                   choices=["flips", "accuracy"])
    p.add_argument("--report-only", action="store_true", help="redo the report from the state")
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "data", "layer_size.json"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "layer_size_flips.png"))
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    state = read_json(STATE, "delete it to measure again") if os.path.exists(STATE) else {}
    state.setdefault("machine", machine())
    if not args.report_only:
        for model in args.models:
            if "flips" in args.stages:
                rows = state.setdefault("flips", {}).setdefault(model, {})
                if set(rows) != set(settings()):
                    for name, figures in measure_flips(model, pretrained(model), rows):
                        rows[name] = figures
                        keep(state)
            if "accuracy" in args.stages and model not in state.get("accuracy", {}):
                state.setdefault("accuracy", {})[model] = measure_accuracy(model, pretrained(model))
                keep(state)
    report(state, args.json, args.plot)
    print(json.dumps({m: sorted(r) for m, r in state.get("accuracy", {}).items()}))


if __name__ == "__main__":
    main()
