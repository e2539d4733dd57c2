"""Accuracy on real data, offline: the fine-tuning arms over seeds, and the ablations.

Every run is train.py's protocol for `--dataset` (default Fashion-MNIST with its default
model), one pretraining per seed and every arm fine-tuned from that checkpoint:

    arms       baseline / sign / mapped / lns_rho0 / lns, with tune.py's best alpha
               and rho (--hparams) or else the paper's (alpha 1, rho 0.005), and the
               dataset protocol's mapper (or --mapper)
    paper      lns with the paper's alpha 1, rho 0.005
    mean       lns with the paper's alpha and rho, reduction="mean" instead of "sum"
    warmup     lns with the paper's start: a plain mapper, warmed up alone first
    cnn, mlp, linear   lns with that mapper
A study that would repeat the main lns arm (same options) is skipped.

    .venv/bin/python tune.py --quiet      # tune_runs/fashion_mnist/best_hparams.json
    .venv/bin/python bench/accuracy.py --hparams tune_runs/fashion_mnist/best_hparams.json
    .venv/bin/python bench/accuracy.py --hparams tune_runs/fashion_mnist/best_hparams.json \
        --mapper cnn                     # docs/RESULTS.md's figures (before linear became the default)
    .venv/bin/python bench/accuracy.py --seeds 0 1 --studies arms    # a subset
    .venv/bin/python bench/accuracy.py --dataset cifar10 --data-dir /data/tfds \
        --studies arms --strategy mirrored --mixed-precision              # the paper's table, GPUs

About 17 min per seed for every study on 2 CPU cores (the arms 9, each ablation 1.5). Each run is a train.py output
directory under --output-dir (seed<N>/<study>), so an interrupted benchmark resumes
where it stopped; `--report-only` redoes the tables and plots from what is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from larq_noisy import datasets, training  # noqa: E402
from larq_noisy.rundir import read_json, write_json  # noqa: E402
from larq_noisy.distribute import STRATEGIES  # noqa: E402
from larq_noisy.mappers import MAPPERS  # noqa: E402

PAPER = {"alpha": 1.0, "rho_pos": 0.005, "rho_neg": 0.005}
MAIN_ARMS = ("sign", "mapped", "lns_rho0", "lns")
#: Ablations: each fine-tunes the lns arm from the seed's pretrained checkpoint with
#: these options on top of the main study's. `None` values take the paper's.
STUDIES = {
    "paper": {**PAPER},
    "mean": {**PAPER, "reduction": "mean"},
    "warmup": {"start": "warmup", "warmup_epochs": 1},
    "cnn": {"mapper": "cnn"},
    "mlp": {"mapper": "mlp"},
    "linear": {"mapper": "linear"},
}
TITLES = {
    "baseline": "baseline (pretrained, sign)",
    "sign": "fine-tuning (`sign`)",
    "mapped": "mapper w/o noisy supervision (`mapped`)",
    "lns_rho0": "LNS with rho = 0 (`lns_rho0`)",
    "lns": "LNS (`lns`)",
    "paper": "LNS, paper's alpha 1, rho 0.005, sum",
    "mean": "LNS, paper's alpha 1, rho 0.005, reduction mean",
    "warmup": "LNS, warm-up start (1 epoch, mapper alone)",
    "cnn": "LNS, cnn mapper (the paper's)",
    "mlp": "LNS, mlp mapper",
    "linear": "LNS, linear mapper",
}


def configs(args, lns: dict) -> dict[tuple[int, str], training.TrainConfig]:
    """`{(seed, study): TrainConfig}` in the order to run them."""
    common = dict(dataset=args.dataset, data_dir=args.data_dir, verbose=args.verbose,
                  limit=args.limit, steps_per_epoch=args.steps_per_epoch,
                  pretrain_epochs=args.pretrain_epochs, strategy=args.strategy,
                  mixed_precision=args.mixed_precision)
    out = {}
    # Every seed's main study first: the ablations start from its checkpoint.
    for seed in args.seeds:
        out[seed, "arms"] = training.TrainConfig(
            **common, **lns, seed=seed, arms=MAIN_ARMS,
            output_dir=os.path.join(args.output_dir, f"seed{seed}", "arms"),
        )
    for study in args.studies:
        if study == "arms" or _repeats_main(out[args.seeds[0], "arms"], STUDIES[study]):
            continue
        for seed in args.seeds:
            main = out[seed, "arms"]
            out[seed, study] = dataclasses.replace(
                main, **STUDIES[study], arms=("lns",), pretrained=main.output_dir,
                output_dir=os.path.join(args.output_dir, f"seed{seed}", study),
            )
    return out


def _resolved(config: training.TrainConfig) -> training.TrainConfig:
    """`config.resolved()` before any run: an ablation's checkpoint is made by its
    seed's main study, so it is not checked here."""
    return dataclasses.replace(config, pretrained=None).resolved()


def _repeats_main(main: training.TrainConfig, options: dict) -> bool:
    try:
        resolved = _resolved(main)
    except ValueError:  # reported by main() with the other bad values
        return False
    return all(getattr(resolved, k) == v for k, v in options.items())


def lns_options(main: training.TrainConfig) -> dict:
    """The main lns arm's alpha, rho and mapper, whoever set them."""
    from larq_noisy import NoisyMappedQuantizer

    resolved = _resolved(main)
    options = {**NoisyMappedQuantizer().get_config(), **resolved.quantizer_options("lns")}
    return {k: options[k] for k in ("alpha", "rho_pos", "rho_neg", "mapper")}


def collect(runs) -> dict[str, dict[int, dict]]:
    """`{row: {seed: result}}` from the runs' results.json, whatever is finished."""
    rows: dict[str, dict[int, dict]] = {}
    for (seed, study), config in runs.items():
        path = os.path.join(config.output_dir, "results.json")
        if not os.path.exists(path):
            continue
        results = read_json(path, "delete that run's directory to redo it")
        if study == "arms":
            if "baseline" in results:
                rows.setdefault("baseline", {})[seed] = results["baseline"]
            for arm, result in results["arms"].items():
                rows.setdefault(arm, {})[seed] = result
        elif "lns" in results["arms"]:
            rows.setdefault(study, {})[seed] = results["arms"]["lns"]
    return rows


def stats(values) -> str:
    v = 100 * np.asarray(values)
    spread = f" +- {v.std(ddof=1):.2f}" if len(v) > 1 else ""
    return f"{v.max():.2f} ({v.mean():.2f}{spread})"


def table(rows, names, key="test_accuracy") -> str:
    lines = ["| arm | seeds | test acc %: best (mean +- std) | val acc % (mean) "
             "| flipped since pretraining % (mean) | fine-tuning s (mean) |",
             "|---|---|---|---|---|---|"]
    for name in names:
        if name not in rows:
            continue
        results = list(rows[name].values())
        flips = [r["flip_rate"] for r in results if "flip_rate" in r]
        walls = [r["wall_seconds"] for r in results if "wall_seconds" in r]
        lines.append(
            f"| {TITLES.get(name, name)} | {len(results)} | "
            f"{stats([r[key] for r in results])} | "
            f"{100 * np.mean([r['val_accuracy'] for r in results]):.2f} | "
            + (f"{100 * np.mean(flips):.2f}" if flips else "-") + " | "
            + (f"{np.mean(walls):.0f}" if walls else "-") + " |"
        )
    return "\n".join(lines)


def paired(rows, a, b, key="test_accuracy") -> dict | None:
    """`a - b` per seed (same pretrained checkpoint), with a paired t-test."""
    seeds = sorted(set(rows.get(a, {})) & set(rows.get(b, {})))
    if len(seeds) < 2:
        return None
    from scipy import stats as st

    diff = 100 * np.array([rows[a][s][key] - rows[b][s][key] for s in seeds])
    test = st.ttest_rel([rows[a][s][key] for s in seeds], [rows[b][s][key] for s in seeds])
    return {"a": a, "b": b, "seeds": seeds, "diff": diff.round(3).tolist(),
            "mean": float(diff.mean()), "std": float(diff.std(ddof=1)),
            "wins": int((diff > 0).sum()), "p_value": float(test.pvalue)}


def strip_plot(series: dict, path, title, xlabel, zero_line=False):
    """One row per `{label: values}`: the seeds as dots, their mean +- std as a diamond."""
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(series) + 1.6))
    for i, values in enumerate(series.values()):
        values = np.asarray(values)
        ax.plot(values, np.full(len(values), i), "o", alpha=0.55, color="C0")
        ax.errorbar(values.mean(), i, xerr=values.std(ddof=1) if len(values) > 1 else 0,
                    fmt="D", color="C3", capsize=4)
    if zero_line:
        ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(series)))
    ax.set_yticklabels(list(series), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{xlabel} (dots: seeds; diamond: mean +- std)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows, names, path, title):
    series = {TITLES.get(n, n).replace("`", ""): [100 * r["test_accuracy"] for r in rows[n].values()]
              for n in names if n in rows}
    strip_plot(series, path, title, "test accuracy %")


def plot_paired(comparisons, path, title):
    """Per-seed differences `a - b`: the seed-to-seed spread of pretraining cancels out."""
    series = {f"{c['a']} - {c['b']}": c["diff"] for c in comparisons}
    strip_plot(series, path, title, "test accuracy difference, points", zero_line=True)


def report(runs, args) -> dict:
    rows = collect(runs)
    main_rows = ["baseline", *MAIN_ARMS]
    ablations = ["lns", *[s for s in args.studies if s in STUDIES]]
    comparisons = [paired(rows, a, b) for a, b in
                   [("lns", "sign"), ("lns", "mapped"), ("lns", "lns_rho0"), ("sign", "baseline"),
                    *[(s, "lns") for s in STUDIES]]]
    summary = {"lns_options": lns_options(next(iter(runs.values()))), "rows": {k: {str(s): r for s, r in v.items()} for k, v in rows.items()},
               "paired": [c for c in comparisons if c]}
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "summary.json"), summary)
    text = [f"lns options: {summary['lns_options']}", "", table(rows, main_rows), "", table(rows, ablations), "",
            "Paired differences of test accuracy (same seed, same pretrained checkpoint):", ""]
    for c in summary["paired"]:
        text.append(f"- {c['a']} - {c['b']}: {c['mean']:+.2f} +- {c['std']:.2f} points "
                    f"over seeds {c['seeds']} ({c['wins']}/{len(c['seeds'])} wins, "
                    f"paired t-test p = {c['p_value']:.3f}); per seed {c['diff']}")
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        model = next(iter(runs.values())).resolved().model
        plot(rows, main_rows, os.path.join(args.plots, f"accuracy_arms_{args.dataset}.png"),
             f"{model} on {args.dataset}: arms over seeds")
        plot(rows, ablations, os.path.join(args.plots, f"accuracy_ablations_{args.dataset}.png"),
             f"{model} on {args.dataset}: LNS variants over seeds")
        if summary["paired"]:
            plot_paired(summary["paired"],
                        os.path.join(args.plots, f"accuracy_paired_{args.dataset}.png"),
                        f"{model} on {args.dataset}: paired differences, same seed and checkpoint")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", choices=sorted(datasets.DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--studies", nargs="+", choices=["arms", *STUDIES], default=["arms", *STUDIES])
    p.add_argument("--hparams", metavar="FILE",
                   help="tune.py's best_hparams.json for the lns arm (default: the paper's)")
    p.add_argument("--mapper", choices=list(MAPPERS), help="the main arms' mapper "
                   "(default: --hparams', else the dataset protocol's)")
    p.add_argument("--output-dir", default="bench_runs/accuracy")
    p.add_argument("--plots", default="docs", help="where the PNG files go ('' for none)")
    p.add_argument("--data-dir")
    p.add_argument("--strategy", default="auto", choices=STRATEGIES)
    p.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (GPU)")
    p.add_argument("--pretrain-epochs", type=int, help="default: the protocol's")
    p.add_argument("--limit", type=int, help="examples per split, for smoke runs")
    p.add_argument("--steps-per-epoch", type=int, help="for smoke runs")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--verbose", type=int, default=0)
    args = p.parse_args(argv)

    lns = {}  # the dataset protocol's options, else the quantizer's (the paper's)
    if args.hparams:
        try:
            tuned = read_json(args.hparams, "give the best_hparams.json written by tune.py")
        except ValueError as error:
            p.error(str(error))
        if "rho" in tuned:
            tuned["rho_pos"] = tuned["rho_neg"] = tuned.pop("rho")
        lns = {k: tuned[k] for k in ("alpha", "rho_pos", "rho_neg", "mapper") if k in tuned}
    if args.mapper:
        lns["mapper"] = args.mapper
    runs = configs(args, lns)
    for config in runs.values():  # every bad value before the first run starts
        try:
            _resolved(config)
        except ValueError as error:
            p.error(str(error))
    if not args.report_only:
        import tensorflow as tf

        for (seed, study), config in runs.items():
            print(f"== seed {seed}, {study}: {config.output_dir}", flush=True)
            training.run(config)
            tf.keras.backend.clear_session()
            report(runs, args)  # the tables so far, after every run
    report(runs, args)


if __name__ == "__main__":
    main()
