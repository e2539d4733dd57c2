"""results.md and the plots of a train.py run."""

from __future__ import annotations

import csv
import glob
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_accuracy", "plot_flip_rates", "read_history", "write_results_md"]

_ARM_TITLES = {
    "sign": "fine-tuning (sign)",
    "mapped": "mapper w/o noisy supervision",
    "lns": "LNS",
    "lns_rho0": "LNS with rho = 0",
}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def write_results_md(results: dict, path: str) -> None:
    """The arms side by side, in the shape of the paper's tables."""
    top5 = "test_top5" in results.get("baseline", {})
    head = "| arm | val acc % | test acc % |" + (" test top-5 % |" if top5 else "")
    head += " flipped since pretraining % | epochs | wall s |"
    rule = "|" + "---|" * (head.count("|") - 1)
    rows = []

    def row(title, r, flip="-", epochs="-", wall="-"):
        cells = [title, _pct(r.get("val_accuracy")), _pct(r.get("test_accuracy"))]
        if top5:
            cells.append(_pct(r.get("test_top5")))
        cells += [flip, str(epochs), wall]
        rows.append("| " + " | ".join(cells) + " |")

    if "baseline" in results:
        row("baseline (pretrained, sign)", results["baseline"])
    for arm, r in results.get("arms", {}).items():
        row(
            _ARM_TITLES.get(arm, arm) + f" (`{arm}`)",
            r,
            flip=_pct(r.get("flip_rate")),
            epochs=r.get("epochs", "-"),
            wall=f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "-",
        )
    config = results.get("config", {})
    lines = [
        f"# Results: {results.get('model')} on {results.get('dataset')}",
        "",
        f"Seed {config.get('seed')}; pretraining {config.get('pretrain_epochs')} epochs, "
        f"fine-tuning {config.get('finetune_epochs')} epochs per arm. Validation is held out "
        "of the training set; test is the official test split.",
        "",
        head,
        rule,
        *rows,
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def read_history(path: str) -> dict[str, list[float]]:
    """A CSVLogger file as columns; a resumed run's repeated epochs keep their last row."""
    rows = {}
    with open(path) as f:
        for record in csv.DictReader(f):
            rows[int(record["epoch"])] = record
    columns: dict[str, list[float]] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                pass
    return columns


def plot_accuracy(run_dir: str, path: str) -> None:
    """Validation accuracy per epoch: pretraining, then each arm after it."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    offset = 0
    pretrain = os.path.join(run_dir, "pretrain", "history.csv")
    if os.path.exists(pretrain):
        history = read_history(pretrain)
        if "val_accuracy" in history:
            epochs = range(1, len(history["val_accuracy"]) + 1)
            ax.plot(epochs, history["val_accuracy"], "k.-", label="pretraining (sign)")
            offset = len(history["val_accuracy"])
    for arm_csv in sorted(glob.glob(os.path.join(run_dir, "arms", "*", "history.csv"))):
        arm = os.path.basename(os.path.dirname(arm_csv))
        history = read_history(arm_csv)
        if "val_accuracy" in history:
            epochs = range(offset + 1, offset + len(history["val_accuracy"]) + 1)
            ax.plot(epochs, history["val_accuracy"], ".-", label=_ARM_TITLES.get(arm, arm))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_flip_rates(results: dict, path: str) -> None:
    """Per binarized layer, the fraction of binary weights each arm flipped."""
    arms = {a: r["flip_rates"] for a, r in results.get("arms", {}).items() if "flip_rates" in r}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, rates in arms.items():
        ax.plot(range(len(rates)), [100 * v for v in rates.values()], "o-",
                label=_ARM_TITLES.get(arm, arm))
    if arms:
        names = list(next(iter(arms.values())))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.legend()
    ax.set_ylabel("binary weights flipped since pretraining (%)")
    ax.set_xlabel("binarized layer")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
