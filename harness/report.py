"""results.md and the plots of a train.py run; trials.md and trials.png of a tune.py search."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from harness.protocols import ARMS  # noqa: E402
from harness.rundir import read_history_rows  # noqa: E402

__all__ = [
    "ARM_TITLES", "arm_color", "describe", "describe_space", "plot_accuracy", "plot_flip_rates",
    "plot_trials", "read_history", "trial_rows", "write_results_md", "write_search_report",
]

#: How the reports name each arm.
ARM_TITLES = {name: arm.title for name, arm in ARMS.items()}


def arm_color(arm: str):
    """The colour of `arm` in every plot (the baseline and pretraining are black)."""
    order = list(ARM_TITLES)
    index = order.index(arm) if arm in order else len(order) + sum(map(ord, arm))
    return plt.get_cmap("tab10")(index % 10)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _epochs(n) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def describe(values: dict) -> str:
    """`{"alpha": 0.15939, "clip": "none"}` as "alpha 0.159, clip none"; None: default."""
    return ", ".join(
        f"{k} {'default' if v is None else f'{v:.3g}' if isinstance(v, float) else v}"
        for k, v in values.items()
    ) or "defaults"


def _pretraining(results: dict) -> str:
    """How the baseline was pretrained: here, or in the run `--pretrained` named, as
    results.json's `pretraining` says."""
    config, source = results.get("config", {}), results.get("pretraining")
    if not config.get("pretrained"):
        return f"pretraining {_epochs(config.get('pretrain_epochs'))}"
    if source and source.get("described_by"):  # a shipped checkpoint, with its .json
        return (f"pretraining {_epochs(source['epochs'])} (the checkpoint "
                f"{config['pretrained']}, as {source['described_by']} says)")
    if not source or source.get("run") is None:
        return (f"pretraining unknown: a weights file ({config['pretrained']}, given as "
                "--pretrained)")
    epochs = source.get("epochs")
    return (f"pretraining {'unknown' if epochs is None else _epochs(epochs)} (the run "
            f"{source['run']}, given as --pretrained)")


def _settings(result: dict) -> str:
    """An arm's learning rate, Bop's and the quantizer's options, from its result.json."""
    parts = [f"lr {result['finetune_lr']:.3g}"]
    if result.get("bop"):
        parts.append("Bop " + describe(result["bop"]))
    if result.get("quantizer") is not None:
        parts.append("mapper options: " + describe(result["quantizer"]))
    return "; ".join(parts)


def write_results_md(results: dict, path: str) -> None:
    """The arms side by side, in the shape of the paper's tables."""
    top5 = "test_top5" in results.get("baseline", {})
    head = "| arm | val acc % | test acc % |" + (" test top-5 % |" if top5 else "")
    head += " flipped since pretraining % | saturated % | epochs | wall s |"
    rule = "|" + "---|" * (head.count("|") - 1)
    arms = results.get("arms", {})
    titled = [("baseline (pretrained, sign)", results["baseline"])] if "baseline" in results else []
    titled += [(f"{ARM_TITLES.get(arm, arm)} (`{arm}`)", r) for arm, r in arms.items()]
    rows = []
    for title, r in titled:  # the baseline has no flip rate, epochs or wall time: "-"
        cells = [title, _pct(r.get("val_accuracy")), _pct(r.get("test_accuracy"))]
        if top5:
            cells.append(_pct(r.get("test_top5")))
        cells += [_pct(r.get("flip_rate")), _pct(r.get("saturation")), str(r.get("epochs", "-"))]
        cells.append(f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-")
        rows.append("| " + " | ".join(cells) + " |")
    stopped = results.get("stopped", {})
    for arm in stopped:  # every cell but the title: "stopped", the line below says why
        cells = ["stopped"] * (head.count("|") - 2)
        rows.append(f"| {ARM_TITLES.get(arm, arm)} (`{arm}`) | " + " | ".join(cells) + " |")
    config = results.get("config", {})
    lines = [
        f"# Results: {results.get('model')} on {results.get('dataset')}",
        "",
        f"Seed {config.get('seed')}; {_pretraining(results)}, "
        f"fine-tuning {_epochs(config.get('finetune_epochs'))} per arm. Validation is held out "
        "of the training set; test is the official test split.",
        "", head, rule, *rows, "",
    ]
    start = results.get("baseline", {}).get("val_accuracy")
    below = [f"`{arm}` ({100 * (r['val_accuracy'] - start):+.2f} points)"
             for arm, r in arms.items() if start is not None
             and r.get("val_accuracy") is not None and r["val_accuracy"] < start]
    if below:
        lines += ["Below their starting point (the baseline's validation accuracy): "
                  + ", ".join(below) + ".", ""]
    lines += [f"Stopped: {line}" for line in stopped.values()] + ([""] if stopped else [])
    settings = [f"- `{arm}`: {_settings(r)}" for arm, r in arms.items() if "finetune_lr" in r]
    if settings:
        lines += ["Each arm's fine-tuning settings:", "", *settings, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def read_history(path: str) -> dict[str, list[float]]:
    """A history.csv file as columns; a resumed run's repeated epochs keep their last row."""
    rows = {int(record["epoch"]): record for record in read_history_rows(path)}
    columns: dict[str, list[float]] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                pass
    return columns


def plot_accuracy(run_dir: str, results: dict, path: str) -> None:
    """Validation accuracy per epoch (pretraining, then each arm after it), and each
    arm's and the baseline's test accuracy as a marker at the end."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    offset = 0
    pretrain = os.path.join(run_dir, "pretrain", "history.csv")
    if os.path.exists(pretrain):
        history = read_history(pretrain)
        if "val_accuracy" in history:
            epochs = range(1, len(history["val_accuracy"]) + 1)
            ax.plot(epochs, history["val_accuracy"], "k.-", label="pretraining (sign), val")
            offset = len(history["val_accuracy"])
    if "test_accuracy" in results.get("baseline", {}):
        ax.plot([offset], [results["baseline"]["test_accuracy"]], "k*", markersize=11,
                label="baseline, test")
    for arm, result in results.get("arms", {}).items():
        arm_csv = os.path.join(run_dir, "arms", arm, "history.csv")
        history = read_history(arm_csv) if os.path.exists(arm_csv) else {}
        values = history.get("val_accuracy", [])
        color, title = arm_color(arm), ARM_TITLES.get(arm, arm)
        if values:
            epochs = range(offset + 1, offset + len(values) + 1)
            ax.plot(epochs, values, ".-", color=color, label=f"{title}, val")
        if "test_accuracy" in result:
            ax.plot([offset + max(len(values), 1)], [result["test_accuracy"]], "*",
                    color=color, markersize=11, markeredgecolor="black", label=f"{title}, test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (line: validation, star: test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def plot_flip_rates(results: dict, path: str) -> None:
    """Per binarized layer, the fraction of binary weights each arm flipped."""
    arms = {a: r["flip_rates"] for a, r in results.get("arms", {}).items() if "flip_rates" in r}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, rates in arms.items():
        ax.plot(range(len(rates)), [100 * v for v in rates.values()], "o-",
                color=arm_color(arm), label=ARM_TITLES.get(arm, arm))
    if arms:
        names = list(next(iter(arms.values())))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.legend()
    ax.set_ylabel("binary weights flipped since pretraining (%)")
    ax.set_xlabel("binarized layer")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- tune.py


_SAMPLING = {"linear": "uniform", "log": "log-uniform", "reverse_log": "reverse-log-uniform"}
_AXIS_LABELS = {"rho": "rho (= rho_pos = rho_neg)"}


def describe_space(space) -> str:
    """keras-tuner's search space (`oracle.get_space()`, what `search_space_summary`
    prints) in one line, from each hyperparameter's `get_config()`."""
    parts = []
    for config in (hp.get_config() for hp in space.space):
        if "min_value" in config:  # Float, Int
            parts.append(f"{config['name']} {_SAMPLING.get(config['sampling'], config['sampling'])}"
                         f" in [{config['min_value']:g}, {config['max_value']:g}]")
        else:  # Choice, Boolean
            parts.append(f"{config['name']} in {config.get('values', [True, False])}")
    return "; ".join(parts) or "nothing (every value fixed)"


def trial_rows(oracle, epochs: int) -> tuple[list[dict], int]:
    """keras-tuner's completed trials, best first (`oracle.get_best_trials`): their
    `trial` id, `values` by hyperparameter (in the order of the search space), `epochs`
    (Hyperband's, else all `epochs`) and `val_accuracy`; and how many trials failed."""
    names = [hp.name for hp in oracle.get_space().space]
    rows = [{"trial": t.trial_id, "val_accuracy": float(t.score),
             "epochs": t.hyperparameters.values.get("tuner/epochs") or epochs,
             "values": {n: t.hyperparameters.values[n] for n in names
                        if n in t.hyperparameters.values}}
            for t in oracle.get_best_trials(len(oracle.trials))
            if t.status == "COMPLETED" and t.score is not None and not math.isnan(t.score)]
    return rows, sum(t.status in ("FAILED", "INVALID") for t in oracle.trials.values())


def write_search_report(rows, failed: int, space, search, model: str, weights: str,
                        references: dict, top: int = 10) -> list[str]:
    """trials.md and trials.png of a tune.py search (`search`: its resolved `TuneConfig`)
    in its output directory, from its `trial_rows` and keras-tuner's search `space`;
    their paths."""
    arm = search.arm
    files = [os.path.join(search.output_dir, name) for name in ("trials.md", "trials.png")]
    title = f"Search of the `{arm}` arm ({ARM_TITLES[arm]}): {model} on {search.dataset}"
    intro = (
        f"{search.tuner} tuner; {len(rows)} completed trials"
        + (f", {failed} failed" if failed else "")
        + f". Each fine-tunes the `{arm}` arm from `{weights}` for up to {search.epochs} epochs"
        + (f" of {search.steps_per_epoch} steps" if search.steps_per_epoch else "")
        + ", scored by its best accuracy on the validation split (held out of train; the "
        f"test split is not used).\n\nSearch space: {describe_space(space)}."
    )
    head = ["rank", "trial", *rows[0]["values"], "epochs", "val acc %"]  # the top trials
    lines = [f"# {title}", "", intro, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, row in enumerate(rows[:top], 1):
        cells = [str(rank), row["trial"]]
        cells += [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row["values"].values()]
        cells += [str(row["epochs"] or "-"), f"{100 * row['val_accuracy']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    best_hparams = os.path.join(search.output_dir, "best_hparams.json")
    lines += ["", "Feed the best values to train.py: `python train.py --hparams "
              f"{arm}={best_hparams}` (with the other arms' own files)", ""]
    with open(files[0], "w") as f:
        f.write("\n".join(lines))
    plot_trials(rows, space, files[1], title.replace("`", ""), references)
    return files


def plot_trials(rows, space, path, title: str = "", references: dict | None = None) -> None:
    """Validation accuracy against each searched number of `space` (keras-tuner's
    `HyperParameters`; rows of `trial_rows`), one panel each over its range, with
    `references` (name -> (value, what)) as lines; the searched choices as colours."""
    ranges = {c["name"]: (c["min_value"], c["max_value"], c["sampling"] == "log")
              for c in (hp.get_config() for hp in space.space) if "min_value" in c}
    columns = list(rows[0]["values"])
    # Hyperband trains some values in several trials: plot each values' best score, the
    # first (`rows` are best first).
    best = {}
    for row in rows:
        best.setdefault(tuple(row["values"].values()), row)
    numbers = [c for c in columns if c in ranges]
    choices = [c for c in columns if c not in numbers]
    groups: dict[str, list] = {}
    for row in best.values():
        label = ", ".join(f"{c}={row['values'][c]}" for c in choices) or "trials"
        groups.setdefault(label, []).append(row)
    top = rows[0]  # best_hparams.json's trial
    fig, axes = plt.subplots(1, len(numbers), figsize=(max(8.0, 4.5 * len(numbers) + 1), 4.5),
                             squeeze=False, sharey=True)
    for ax, name in zip(axes[0], numbers):
        for i, (label, members) in enumerate(sorted(groups.items())):
            ax.scatter([r["values"][name] for r in members],
                       [100 * r["val_accuracy"] for r in members],
                       color=f"C{i}", s=40, edgecolors="black", linewidths=0.5, label=label)
        ax.scatter([top["values"][name]], [100 * top["val_accuracy"]], marker="*", s=300,
                   facecolors="none", edgecolors="red", linewidths=1.5, label="best")
        if name in (references or {}):
            value, what = references[name]
            ax.axvline(value, color="grey", ls=":", label=what)
        low, high, log = ranges[name]
        if log:
            ax.set_xscale("log")
            ax.set_xlim(low / 1.5, high * 1.5)
        else:
            margin = 0.05 * (high - low)
            ax.set_xlim(low - margin, high + margin)
        ax.set_xlabel(_AXIS_LABELS.get(name, name))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy %")
    legend = {}  # each label once, from whichever panel drew it
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    axes[0][-1].legend(legend.values(), legend.keys(), loc="lower right", fontsize="x-small")
    fig.suptitle(f"{title}\n{len(rows)} trials, best validation accuracy "
                 f"{100 * top['val_accuracy']:.2f}% (trial {top['trial']})", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
