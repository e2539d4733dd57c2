"""Accuracy on real data, offline: every fine-tuning arm, each with its own tuned settings,
over seeds paired on one pretrained checkpoint per seed (docs/RESULTS.md section 6.2: the
method, the figures and the commands that redo them).

Per seed, the sign BNN is pretrained once (`seed<N>/pretrain`), then each row of `ROWS`
(`--studies`) fine-tunes one arm from it (`seed<N>/<row>`): a train.py run with the arm's
`--hparams ARM=FILE`, else the dataset protocol's tuned settings (on Fashion-MNIST the
short-pretraining study's, `SHORT_PRETRAINING`). Writes `summary.{md,json}` and
`wall.json` (the time of every session) in `--output-dir`, the plots in `--plots`.

    .venv/bin/python bench/accuracy.py --hparams sign=FILE bop=FILE lns=FILE

The same command resumes; `--report-only` redoes the tables and plots from what is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import mean_cell  # noqa: E402  (before TensorFlow)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness import datasets, training  # noqa: E402
from harness.distribute import STRATEGIES  # noqa: E402
from harness.protocols import ARMS, TUNED_ARMS  # noqa: E402
from harness.settings import read_hparams  # noqa: E402
from harness.rundir import RunDir, read_json, write_json  # noqa: E402
from larq_noisy import quantizers  # noqa: E402
from larq_noisy.mappers import MAPPERS  # noqa: E402

PAPER = {k: quantizers.PAPER[k] for k in ("alpha", "rho_pos", "rho_neg")}  # the ablations'


@dataclasses.dataclass(frozen=True)
class Row:
    """`arm` fine-tuned with its tuned settings, `options` (`TrainConfig` fields) over them."""

    arm: str
    options: dict = dataclasses.field(default_factory=dict)


MAIN_ROWS = {arm: Row(arm) for arm in ("sign", "bop", "mapped", "lns_rho0", "lns")}
VARIANTS = {f"lns_clip-{clip}_aux-{'latent' if aux else 'mapper'}":
            Row("lns", {"clip": clip, "aux_to_latent": aux})
            for clip in ("hardtanh", "none") for aux in (True, False)}
#: The 1-epoch ablations of docs/RESULTS.md section 6.3, over the tuned lns.
ABLATIONS = {
    "paper": Row("lns", PAPER),
    "mean": Row("lns", {**PAPER, "reduction": "mean"}),
    "warmup": Row("lns", {"start": "warmup", "warmup_epochs": 1}),
    **{kind: Row("lns", {"mapper": kind}) for kind in ("cnn", "mlp", "linear", "separable")},
}
ROWS = {**MAIN_ROWS, **VARIANTS, **ABLATIONS}
DEFAULT_STUDIES = (*MAIN_ROWS, *VARIANTS)
#: Paired comparisons `a - b`: the equally tuned arms, then what each part of LNS adds.
COMPARISONS = [("lns", "sign"), ("lns", "bop"), ("bop", "sign"), ("sign", "baseline"),
               ("mapped", "sign"), ("lns", "mapped"), ("lns", "lns_rho0"),
               *[(name, "lns") for name in (*VARIANTS, *ABLATIONS)]]

#: The short-pretraining study of docs/RESULTS.md section 6.2 (Fashion-MNIST): its schedule,
#: and the settings tune.py found for each arm from its 3-epoch checkpoint.
SHORT_PRETRAINING = {"pretrain_epochs": 3, "finetune_epochs": 3, "finetune_cosine": False}
SHORT_PRETRAINING_TUNED = {
    "sign": {"finetune_lr": 9.73787212128146e-05},
    "bop": {"bop_threshold": 7.649838676487011e-08, "bop_gamma": 1.4812432564466783e-05,
            "finetune_lr": 0.0007777927455520449},
    "lns": {"mapper": "linear", "alpha": 0.15939632908339835,
            "rho_pos": 0.1672553143895975, "rho_neg": 0.1672553143895975,
            "clip": "hardtanh", "aux_to_latent": False, "finetune_lr": 0.0010521645686184906},
}


def configs(args, common: dict, tuned: dict[str, dict]) -> dict[tuple[int, str], training.TrainConfig]:
    """`{(seed, row): TrainConfig}` in the order to run them (row "pretrain": the seed's
    checkpoint), with `read_hparams`' settings for every arm (`common`) and per arm (`tuned`)."""
    def row_config(pretrain, name):
        row = ROWS[name]
        settings = {**common, **row.options}
        if args.mapper and ARMS[row.arm].quantizer is not None and "mapper" not in row.options:
            settings["mapper"] = args.mapper
        return dataclasses.replace(
            pretrain, **settings, tuned=tuned, arms=(row.arm,), finetune_epochs=args.finetune_epochs,
            finetune_cosine=args.finetune_cosine, pretrained=pretrain.output_dir,
            output_dir=os.path.join(args.output_dir, f"seed{pretrain.seed}", name),
        )

    out = {}
    for seed in args.seeds:
        pretrain = out[seed, "pretrain"] = training.TrainConfig(
            dataset=args.dataset, data_dir=args.data_dir, verbose=args.verbose, limit=args.limit,
            steps_per_epoch=args.steps_per_epoch, pretrain_epochs=args.pretrain_epochs,
            strategy=args.strategy, mixed_precision=args.mixed_precision, seed=seed, arms=(),
            output_dir=os.path.join(args.output_dir, f"seed{seed}", "pretrain"),
        )
        lns = row_config(pretrain, "lns")
        for name in args.studies:
            config = row_config(pretrain, name)
            if (name != "lns" and "lns" in args.studies and ROWS[name].arm == "lns"
                    and _repeats(lns, config)):
                continue  # the tuned lns already is this variant
            out[seed, name] = config
    return out


def _resolved(config: training.TrainConfig) -> training.TrainConfig:
    """`config.resolved()`, its checkpoint unchecked (its seed's pretraining makes it)."""
    return dataclasses.replace(config, pretrained=None).resolved()


def effective(config: training.TrainConfig) -> dict:
    """A row's learning rate, Bop's or the quantizer's settings (defaults included)."""
    from larq_noisy import NoisyMappedQuantizer

    arm, c = config.arms[0], _resolved(config)
    settings = c.arm_settings(arm)
    out = {k: settings[k] for k in ("finetune_lr", "bop_threshold", "bop_gamma") if k in settings}
    if ARMS[arm].quantizer is not None:
        quantizer = {**NoisyMappedQuantizer().get_config(), **settings}
        out.update({k: quantizer[k] for k in ("alpha", "rho_pos", "rho_neg", "mapper", "clip",
                                              "aux_to_latent", "reduction", "start")})
        out["warmup_epochs"] = c.warmup_epochs
    return out


def _repeats(lns: training.TrainConfig, config: training.TrainConfig) -> bool:
    try:
        return effective(lns) == effective(config)
    except ValueError:  # reported by main() with the other bad values
        return False


def _finished(config: training.TrainConfig) -> bool:
    """Whether the run of `config` finished in an earlier session (with these settings,
    else `ValueError`): train.py would say so only after loading the data."""
    run_dir = RunDir(config.output_dir)
    phase = run_dir.arm(config.arms[0]) if config.arms else run_dir.pretrain
    if run_dir.read_result(phase) is None or not os.path.exists(run_dir.path("results.json")):
        return False
    run_dir.check_settings(config.resolved().recorded(), record=False)
    return True


def collect(runs) -> dict[str, dict[int, dict]]:
    """`{row: {seed: result}}` from the runs' results.json, whatever is finished."""
    rows: dict[str, dict[int, dict]] = {}
    for (seed, name), config in runs.items():
        path = os.path.join(config.output_dir, "results.json")
        if not os.path.exists(path):
            continue
        results = read_json(path, "delete that run's directory to redo it")
        if name == "pretrain":
            if "baseline" in results:
                rows.setdefault("baseline", {})[seed] = results["baseline"]
        elif ROWS[name].arm in results["arms"]:
            rows.setdefault(name, {})[seed] = results["arms"][ROWS[name].arm]
    return rows


def title(name: str) -> str:
    if name == "baseline":
        return "baseline (pretrained, sign)"
    row = ROWS[name]
    options = "".join(f", {k} {v}" for k, v in row.options.items())
    return f"{ARMS[row.arm].title}{options} (`{name}`)"


def table(rows, names) -> str:
    """A markdown table of `names`' rows: test accuracy best (mean +- std), means of the rest."""
    lines = ["| arm | seeds | test acc %: best (mean +- std) | val acc % (mean) "
             "| flipped since pretraining % (mean) | saturated % (mean) | fine-tuning s (mean) |",
             "|---|---|---|---|---|---|---|"]
    for name in (n for n in names if n in rows):
        results = list(rows[name].values())
        v = 100 * np.asarray([r["test_accuracy"] for r in results])
        spread = f" +- {v.std(ddof=1):.2f}" if len(v) > 1 else ""
        lines.append(
            f"| {title(name)} | {len(results)} | {v.max():.2f} ({v.mean():.2f}{spread}) | "
            f"{mean_cell(results, 'val_accuracy')} | {mean_cell(results, 'flip_rate')} | "
            f"{mean_cell(results, 'saturation')} | {mean_cell(results, 'wall_seconds', 1, 0)} |"
        )
    return "\n".join(lines)


def paired(rows, a, b) -> dict | None:
    """`a - b` per seed (same pretrained checkpoint), with a paired t-test."""
    seeds = sorted(set(rows.get(a, {})) & set(rows.get(b, {})))
    if len(seeds) < 2:
        return None
    from scipy import stats

    values = {n: np.array([rows[n][s]["test_accuracy"] for s in seeds]) for n in (a, b)}
    diff = 100 * (values[a] - values[b])
    p_value = float(stats.ttest_rel(values[a], values[b]).pvalue)  # NaN if equal on every seed
    return {"a": a, "b": b, "seeds": seeds, "diff": diff.round(3).tolist(),
            "mean": float(diff.mean()), "std": float(diff.std(ddof=1)),
            "wins": int((diff > 0).sum()), "p_value": p_value if np.isfinite(p_value) else None}


def strip_plot(series: dict, path, title, xlabel, zero_line=False):
    """One row per `{label: values}`: the seeds as dots, their mean +- std as a diamond."""
    if not series:
        return
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


def wall_time(args, session_start: float | None = None) -> dict:
    """The benchmark's wall time over its sessions, kept in `<output-dir>/wall.json`:
    with `session_start`, this session's time so far is recorded as its last entry."""
    path = os.path.join(args.output_dir, "wall.json")
    wall = read_json(path, "delete it (only the time of past sessions is lost)") if (
        os.path.exists(path)) else {"sessions": []}
    if session_start is not None:
        wall["sessions"] = [s for s in wall["sessions"] if s["start"] != session_start]
        wall["sessions"].append({"start": session_start, "seconds": time.time() - session_start})
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(path, wall)
    wall["total_seconds"] = sum(s["seconds"] for s in wall["sessions"])
    return wall


def report(runs, args, tuned: dict) -> dict:
    """`summary.json`, `summary.md` (printed too) and the plots of what has finished."""
    rows = collect(runs)
    settings = {name: effective(config) for (_, name), config in runs.items() if name != "pretrain"}
    studies = [n for n in ROWS if n in settings]
    main_rows = ["baseline", *[n for n in studies if n in MAIN_ROWS]]
    variants = ["lns", *[n for n in studies if n not in MAIN_ROWS]]
    wall = wall_time(args)
    epochs = _resolved(next(c for (_, name), c in runs.items() if name != "pretrain")).finetune_epochs
    comparisons = [c for c in (paired(rows, a, b) for a, b in COMPARISONS) if c]
    summary = {"finetune_epochs": epochs, "tuned": tuned, "settings": settings,
               "rows": {k: {str(s): r for s, r in v.items()} for k, v in rows.items()},
               "paired": comparisons, "wall_seconds": wall["total_seconds"]}
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "summary.json"), summary)

    files = " ".join(args.hparams or ["none (the dataset protocol's)"])
    text = [f"{epochs} fine-tuning epochs per row; seeds {list(args.seeds)}; "
            f"--hparams: {files}", "", "Settings per row:", ""]
    text += [f"- `{name}`: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in s.items()) for name, s in settings.items()]
    text += ["", table(rows, main_rows), "", table(rows, variants), "",
             "Paired differences of test accuracy (same seed, same pretrained checkpoint):", ""]
    for c in comparisons:
        p_value = "n/a" if c["p_value"] is None else f"{c['p_value']:.3f}"
        text.append(f"- {c['a']} - {c['b']}: {c['mean']:+.2f} +- {c['std']:.2f} points "
                    f"over seeds {c['seeds']} ({c['wins']}/{len(c['seeds'])} wins, "
                    f"paired t-test p = {p_value}); per seed {c['diff']}")
    text += ["", f"Total time: {wall['total_seconds'] / 60:.1f} min over "
             f"{len(wall['sessions'])} session(s)."]
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text), flush=True)

    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        pretrain = _resolved(next(iter(runs.values())))
        on = (f"bench/accuracy.py, {args.output_dir}: {pretrain.model} on {args.dataset}, a "
              f"{pretrain.pretrain_epochs}-epoch checkpoint per seed, {epochs} fine-tuning epochs")
        for names, kind, what in ((main_rows, "arms", "arms over seeds, each tuned"),
                                  (variants, "ablations", "LNS variants over seeds")):
            series = {title(n).replace("`", ""): [100 * r["test_accuracy"] for r in rows[n].values()]
                      for n in names if n in rows}
            strip_plot(series, os.path.join(args.plots, f"accuracy_{kind}_{args.dataset}.png"),
                       f"{on}\n{what}", "test accuracy %")
        # Per-seed differences: the seed-to-seed spread of pretraining cancels out.
        strip_plot({f"{c['a']} - {c['b']}": c["diff"] for c in comparisons},
                   os.path.join(args.plots, f"accuracy_paired_{args.dataset}.png"),
                   f"{on}\npaired differences, same seed and checkpoint",
                   "test accuracy difference, points", zero_line=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", choices=sorted(datasets.DATASETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--studies", nargs="+", choices=list(ROWS), default=list(DEFAULT_STUDIES),
                   metavar="ROW", help=f"rows to run, of {list(ROWS)} (default: {list(DEFAULT_STUDIES)})")
    p.add_argument("--hparams", nargs="+", metavar="[ARM=]FILE",
                   help=f"as train.py's: tune.py's best_hparams.json per arm of "
                        f"{list(TUNED_ARMS)} (a bare FILE: every arm); default: the dataset "
                        "protocol's tuned settings")
    p.add_argument("--mapper", choices=list(MAPPERS), help="the mapper rows' mapper "
                   "(default: lns' --hparams, else the dataset protocol's)")
    p.add_argument("--finetune-epochs", type=int, help="default: the protocol's")
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
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.finetune_epochs is not None and args.finetune_epochs < 1:
        p.error(f"--finetune-epochs {args.finetune_epochs} must be >= 1.")
    args.studies = list(dict.fromkeys(args.studies))
    args.finetune_cosine = None
    try:
        common, tuned = read_hparams(args.hparams)
        if args.dataset == "fashion_mnist":  # the short-pretraining study's schedule and settings
            for key, value in SHORT_PRETRAINING.items():
                if getattr(args, key) is None:
                    setattr(args, key, value)
            tuned = {arm: {**values, **tuned.get(arm, {})}  # --hparams ARM=FILE over them
                     for arm, values in SHORT_PRETRAINING_TUNED.items()}
        runs = configs(args, common, tuned)
        for config in runs.values():  # every bad value before the first run starts
            _resolved(config)
        # Runs of an earlier session with other settings are refused now.
        todo = {key: config for key, config in runs.items() if not _finished(config)}
    except ValueError as error:
        p.error(str(error))
    if not args.report_only and todo:
        import tensorflow as tf

        start = time.time()
        print(f"{len(runs) - len(todo)} of {len(runs)} runs done before; running the others",
              flush=True)
        for (seed, name), config in todo.items():
            print(f"== seed {seed}, {name}: {config.output_dir}", flush=True)
            training.run(config)
            tf.keras.backend.clear_session()
            wall_time(args, start)
            report(runs, args, tuned)  # the tables so far, after every run
    report(runs, args, tuned)


if __name__ == "__main__":
    main()
