"""The report of bench/converged.py (docs/RESULTS.md section 0): tables, paired
differences with 95% confidence intervals and one verdict each, the variance split, plots."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import mean_cell  # noqa: E402
from harness.rundir import write_json  # noqa: E402

TITLES = {  # the rows of the table, in its order
    "baseline": "baseline ({epochs}-epoch checkpoint, sign)",
    "sign": "fine-tuning with sign weights (`sign`)",
    "bop": "fine-tuning with Bop (`bop`)",
    "mapped": "mapper w/o noisy supervision (`mapped`)",
    "lns_rho0": "LNS with rho = 0 (`lns_rho0`)",
    "lns": "LNS (`lns`, tuned)",
    "paper": "LNS as the paper sets it (`--preset paper`, untuned)",
}


def by_sample(rows, name) -> dict:
    return {(r["checkpoint"], r["seed"]): r for r in rows if r["row"] == name}


def t_quantile(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def samples_to_decide(mean: float, sd: float, margin: float) -> int | None:
    """The smallest n whose 95% CI half-width, at this spread, would either exclude 0
    (if the difference is `mean`) or fit inside +-margin (if it is that small)."""
    target = max(abs(mean), margin - abs(mean))
    if sd == 0 or target <= 0:
        return None
    for n in range(3, 100000):
        if t_quantile(n) * sd / math.sqrt(n) < target:
            return n
    return None


def verdict(low: float, high: float, margin: float) -> str:
    if low > 0:
        return "better" + ("" if low > margin else f" (by less than the margin, {margin})"
                           if high < margin else "")
    if high < 0:
        return "worse" + ("" if high < -margin else f" (by less than the margin, {margin})"
                          if low > -margin else "")
    if -margin <= low and high <= margin:
        return f"equivalent within +-{margin}"
    return "undecided"


def variance_split(diffs: dict) -> dict | None:
    """One-way random effects over checkpoints (the ANOVA estimator, groups of any size):
    the variance of `diffs` ({(ckpt, seed): value}) between checkpoints and between
    fine-tuning seeds of one checkpoint, each checkpoint's mean, and the F test's p that
    the checkpoints' means are equal."""
    from scipy import stats

    groups = {}
    for (ckpt, _), value in sorted(diffs.items()):
        groups.setdefault(ckpt, []).append(value)
    sizes = np.array([len(v) for v in groups.values()])
    k, total = len(groups), int(sizes.sum())
    if k < 2 or sizes.min() < 2:
        return None
    means = np.array([np.mean(v) for v in groups.values()])
    grand = float(np.mean(list(diffs.values())))
    within = float(sum((n - 1) * np.var(v, ddof=1) for n, v in zip(sizes, groups.values()))
                   / (total - k))  # mean square within
    mean_square_between = float((sizes * (means - grand) ** 2).sum() / (k - 1))
    n0 = (total - (sizes ** 2).sum() / total) / (k - 1)  # the group size, if unequal
    f_p = float(stats.f.sf(mean_square_between / within, k - 1, total - k)) if within > 0 else None
    return {"checkpoints": k, "seeds": sizes.tolist(), "within_checkpoint_var": within,
            "between_checkpoint_var": max(0.0, (mean_square_between - within) / n0),
            "checkpoint_means": {str(c): float(m) for c, m in zip(groups, means)},
            "checkpoints_differ_p": f_p}


def paired(rows, a: str, b: str, margin: float) -> dict | None:
    from scipy import stats

    ra, rb = by_sample(rows, a), by_sample(rows, b)
    keys = sorted(set(ra) & set(rb))
    mixed = [k for k in keys if ra[k]["machine"] != rb[k]["machine"]]
    keys = [k for k in keys if k not in mixed]
    if len(keys) < 2:
        return None
    diffs = {k: 100 * (ra[k]["test_accuracy"] - rb[k]["test_accuracy"]) for k in keys}
    d = np.array(list(diffs.values()))
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(len(d)) * sd / math.sqrt(len(d))
    p = stats.ttest_1samp(d, 0.0).pvalue if sd > 0 else float("nan")
    out = {"a": a, "b": b, "n": len(d), "mean": mean, "sd": sd,
           "ci95": [mean - half, mean + half], "wins": int((d > 0).sum()),
           "losses": int((d < 0).sum()), "p": None if not np.isfinite(p) else float(p),
           "verdict": verdict(mean - half, mean + half, margin),
           "split": variance_split(diffs), "skipped_mixed_machines": len(mixed),
           "diffs": {f"ckpt{c}_seed{s}": round(v, 3) for (c, s), v in diffs.items()}}
    if out["verdict"] == "undecided":
        out["samples_to_decide"] = samples_to_decide(mean, sd, margin)
    return out


def row_table(rows, names, epochs: int) -> str:
    lines = ["| arm | samples | test acc %: mean +- std (min - max) | val acc % (mean) "
             "| flipped % (mean) | saturated % (mean) |", "|---|---|---|---|---|---|"]
    for name in names:
        results = list(by_sample(rows, name).values())
        if not results:
            continue
        test = 100 * np.array([r["test_accuracy"] for r in results])
        spread = f" +- {test.std(ddof=1):.2f}" if len(test) > 1 else ""
        lines.append(f"| {TITLES[name].format(epochs=epochs)} | {len(test)} | {test.mean():.2f}"
                     f"{spread} ({test.min():.2f} - {test.max():.2f}) | "
                     f"{mean_cell(results, 'val_accuracy')} | {mean_cell(results, 'flip_rate')} "
                     f"| {mean_cell(results, 'saturation')} |")
    return "\n".join(lines)


def comparison_table(comparisons) -> str:
    lines = ["| comparison | n | mean (points) | 95% CI | wins / losses | p | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        verdict_text = c["verdict"] + (f": about {c['samples_to_decide']} samples would decide"
                                       if c.get("samples_to_decide") else "")
        p = "-" if c["p"] is None else f"{c['p']:.3f}"
        lines.append(f"| `{c['a']}` - `{c['b']}` | {c['n']} | {c['mean']:+.2f} | "
                     f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | {c['wins']} / {c['losses']} "
                     f"| {p} | {verdict_text} |")
    return "\n".join(lines)


def split_table(comparisons) -> str:
    lines = ["| comparison | sd of the difference | between checkpoints (var) "
             "| between seeds of one checkpoint (var) | mean by checkpoint "
             "| p (checkpoints differ) |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        s = c["split"]
        if s:
            means = ", ".join(f"{m:+.2f}" for m in s["checkpoint_means"].values())
            p = "-" if s["checkpoints_differ_p"] is None else f"{s['checkpoints_differ_p']:.3f}"
            lines.append(f"| `{c['a']}` - `{c['b']}` | {c['sd']:.2f} | "
                         f"{s['between_checkpoint_var']:.3f} | {s['within_checkpoint_var']:.3f} "
                         f"| {means} | {p} |")
    return "\n".join(lines) if len(lines) > 2 else ""  # one checkpoint: no split


def last_tenth(curve: dict) -> float:
    """A run's mean validation accuracy over its last tenth of epochs (at least one): the
    level it ends at, without one epoch's jitter (0.1's second reading)."""
    values = curve["val_accuracy_by_epoch"]
    return float(np.mean(values[-max(1, len(values) // 10):]))


def convergence(curves: dict, epochs: int, margin: float) -> list[dict]:
    """The convergence rule, for each seed pretrained for `epochs` and for twice as long:
    its final epoch against the best epoch of twice as long; and, read beside it (declared
    2026-12-07, before seed 1's long run ended), its last tenth against twice as long's."""
    from converged import pretraining_name

    checks = []
    for name, short in sorted(curves.items()):
        long = curves.get(pretraining_name(short["seed"], 2 * epochs))
        if short["epochs"] == epochs and long:
            best, tenth, long_tenth = (100 * max(long["val_accuracy_by_epoch"]),
                                       100 * last_tenth(short), 100 * last_tenth(long))
            gap, tenth_gap = best - 100 * short["val_accuracy"], long_tenth - tenth
            checks.append({"seed": short["seed"], "epochs": epochs,
                           "final_val": 100 * short["val_accuracy"],
                           "best_val_twice_as_long": best,
                           "gap_points": gap, "margin": margin, "converged": gap <= margin,
                           "last_tenth_val": tenth, "last_tenth_val_twice_as_long": long_tenth,
                           "last_tenth_gap_points": tenth_gap,
                           "converged_by_last_tenth": tenth_gap <= margin})
    return checks


def unchecked(curves: dict, epochs: int, checks: list[dict]) -> list[int]:
    """The seeds pretrained for `epochs` whose convergence check has not run."""
    checked = {c["seed"] for c in checks}
    return sorted(c["seed"] for c in curves.values()
                  if c["epochs"] == epochs and c["seed"] not in checked)


def converged_checkpoints(sampled: list[int], checks: list[dict]) -> list[int]:
    """The `sampled` checkpoints the convergence rule calls converged (checkpoint S is seed
    S's pretraining). Where it leaves some out, the report gives the verdicts over these
    beside those over all (declared 2026-12-07, when checkpoint 1 failed the rule, before
    any sample of checkpoint 2 ran)."""
    return sorted(set(sampled) & {c["seed"] for c in checks if c["converged"]})


def study_title(state: dict, args) -> str:
    """What a plot shows: the study (its state folder) and the checkpoints it fine-tunes."""
    checkpoints = sorted({r["checkpoint"] for r in state["rows"]})
    seeds = sorted({r["seed"] for r in state["rows"]})
    stem = os.path.basename(os.path.normpath(args.state))
    return (f"bench/converged.py, {stem}: {len(checkpoints)} x {args.pretrain_epochs}-epoch "
            f"checkpoint{'s' * (len(checkpoints) > 1)}, {len(seeds)} fine-tuning seeds")


def plot_pretraining(curves: dict, path: str, study: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    # Longest first: the shorter runs are drawn over it, and the legend reads by length.
    for name, curve in sorted(curves.items(), key=lambda kv: (kv[1]["seed"], -kv[1]["epochs"])):
        values = 100 * np.array(curve["val_accuracy_by_epoch"])
        ax.plot(np.arange(1, len(values) + 1), values, label=name.replace("_", ", "))
    ax.set_xlabel("pretraining epoch (cosine decay over the run)")
    ax.set_ylabel("validation accuracy %")
    ax.set_ylim(80, None)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{study}\nits pretraining runs: bnn_small on Fashion-MNIST, sign, Adam 3e-3",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_finetuning(curves: dict, path: str, long: str, study: str) -> None:
    """`{label: [val acc by epoch, epoch 0 = the checkpoint]}`."""
    fig, ax = plt.subplots(figsize=(7, 4))
    arms = sorted({label.split(",")[0] for label in curves})
    for label, values in sorted(curves.items()):
        ax.plot(range(len(values)), 100 * np.array(values), "--" if long in label else "-",
                marker="o", color=f"C{arms.index(label.split(',')[0])}", label=label)
    ax.set_xlabel("fine-tuning epoch (0: the converged checkpoint; cosine decay to 0)")
    ax.set_ylabel("validation accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{study}\nfine-tuning from checkpoint 0 with seed 0, each arm tuned",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_differences(comparisons, path: str, margin: float, study: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(comparisons) + 1.6))
    for i, c in enumerate(comparisons):
        values = np.array(list(c["diffs"].values()))
        ax.plot(values, np.full(len(values), i), "o", alpha=0.5, color="C0")
        ax.errorbar(c["mean"], i, xerr=[[c["mean"] - c["ci95"][0]], [c["ci95"][1] - c["mean"]]],
                    fmt="D", color="C3", capsize=4)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvspan(-margin, margin, color="0.85", zorder=0, label=f"equivalence margin +-{margin}")
    ax.set_yticks(range(len(comparisons)))
    ax.set_yticklabels([f"{c['a']} - {c['b']}" for c in comparisons])
    ax.invert_yaxis()
    ax.set_xlabel("paired difference in test accuracy, points (dots: samples; diamond: mean, 95% CI)")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(f"{study}\npaired differences of test accuracy, {comparisons[0]['n']} samples",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(state: dict, args) -> dict:
    from converged import COMPARISONS, CONVERGENCE_MARGIN, EQUIVALENCE_MARGIN

    rows = state["rows"]
    comparisons = [c for a, b in COMPARISONS
                   if (c := paired(rows, a, b, EQUIVALENCE_MARGIN)) is not None]
    check = convergence(state.get("pretraining", {}), args.pretrain_epochs, CONVERGENCE_MARGIN)
    sampled = sorted({r["checkpoint"] for r in rows})
    converged, of_converged = converged_checkpoints(sampled, check), []
    if converged != sampled:
        kept = [r for r in rows if r["checkpoint"] in converged]
        of_converged = [c for a, b in COMPARISONS
                        if (c := paired(kept, a, b, EQUIVALENCE_MARGIN)) is not None]
    analysis = {"equivalence_margin": EQUIVALENCE_MARGIN, "convergence": check,
                "comparisons": comparisons, "converged_checkpoints": converged,
                "comparisons_of_converged_checkpoints": of_converged,
                "machines": sorted({r["machine"]["cpu"] + " " + str(r["machine"]["vector"])
                                    for r in rows})}
    data = os.path.join(args.docs, "data")
    os.makedirs(data, exist_ok=True)
    # Named after the state folder: converged_fashion_mnist (60 epochs), converged120_... .
    stem = os.path.basename(os.path.normpath(args.state))
    write_json(os.path.join(data, f"{stem}.json"), {**state, "analysis": analysis})
    text = [f"# From a {args.pretrain_epochs}-epoch checkpoint: every arm, paired samples "
            f"(bench/converged.py)", "",
            row_table(rows, TITLES, args.pretrain_epochs), "", comparison_table(comparisons), "",
            split_table(comparisons), ""]
    if of_converged:
        text += [f"Only the checkpoints checked and converged by the rule "
                 f"({', '.join(map(str, converged))}):", "", comparison_table(of_converged), ""]
    elif rows and not converged:
        text += ["No sampled checkpoint is yet checked and converged by the rule: every "
                 "verdict above is from unconverged or unchecked checkpoints.", ""]
    for c in check:
        text.append(f"Convergence of seed {c['seed']}: {c['epochs']} epochs end at "
                    f"{c['final_val']:.2f}% validation accuracy; the best of the run twice as "
                    f"long is {c['best_val_twice_as_long']:.2f}% (gap {c['gap_points']:+.2f} "
                    f"points; converged means <= {c['margin']}). Their last tenths average "
                    f"{c['last_tenth_val']:.2f}% and {c['last_tenth_val_twice_as_long']:.2f}% "
                    f"(gap {c['last_tenth_gap_points']:+.2f}).")
    for seed in unchecked(state.get("pretraining", {}), args.pretrain_epochs, check):
        text.append(f"Convergence of seed {seed}: not checked yet (its "
                    f"{2 * args.pretrain_epochs}-epoch run has not finished).")
    with open(os.path.join(data, f"{stem}.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    plot = stem.replace("_", "_{}_", 1) + ".png"  # converged_pretraining_fashion_mnist.png
    study = study_title(state, args)
    if state.get("pretraining"):
        plot_pretraining(state["pretraining"], os.path.join(args.docs, plot.format("pretraining")),
                         study)
    if state.get("finetuning_curves"):
        plot_finetuning(state["finetuning_curves"], os.path.join(args.docs, plot.format("finetuning")),
                        f"{2 * args.finetune_epochs} epochs", study)
    if comparisons:
        plot_differences(comparisons, os.path.join(args.docs, plot.format("paired")),
                         EQUIVALENCE_MARGIN, study)
    print("\n".join(text))
    return analysis
