"""Does LNS improve a *converged* BNN? Fashion-MNIST, bnn_small, every arm tuned alike,
paired samples over converged checkpoints (docs/RESULTS.md section 0; the 60-epoch study:
section 6.1): the method, the figures and the commands of both studies.

Stages under `--output-dir`, each a train.py or tune.py run that the same command resumes:
1. pretraining (`pretrain/seed<S>_<E>ep`): each checkpoint S of `--checkpoints`, kept with
   its SHA-256 in `--state`, and each seed S for 2E epochs too (is E converged?);
2. tuning (`tune/<arm>`): the same random search for sign, bop and lns from checkpoint 0;
3. samples (`samples/ckpt<S>_seed<T>`): `SAMPLE_ARMS` tuned and lns `--preset paper`, from
   checkpoint S with seed T; the first sample's tuned arms also twice as long;
4. the report (converged_report.py) in `--docs`: verdicts against `EQUIVALENCE_MARGIN`,
   over all checkpoints and, where the convergence rule leaves some out, over the rest.

Every finished run's rows go to `<state>/rows.json` with their machine: commit `--state`
and a fresh work tree resumes there. Rows from different CPUs are never paired. A
pretraining longer than a session: stop the bench, `--save-unfinished` keeps what
train.py resumes from in `<state>/unfinished/`; commit it, and the bench goes on there.

    .venv/bin/python bench/converged.py     # --report-only: only the report
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness.rundir import read_history_rows as read_history  # noqa: E402
from harness.rundir import RunDir, atomic_path, machine, read_json, write_json  # noqa: E402

#: Declared before any sample ran: a paired difference whose 95% CI lies inside
#: +-0.25 points is "equivalent"; the test accuracy of one seed moves by about that much.
EQUIVALENCE_MARGIN = 0.25
CONVERGENCE_MARGIN = 0.2  # points of validation accuracy (docs/METHOD.md 6.3)
SAMPLE_ARMS = ("sign", "bop", "mapped", "lns", "lns_rho0")
COMPARISONS = [("lns", "sign"), ("lns", "bop"), ("bop", "sign"), ("lns", "mapped"),
               ("lns", "lns_rho0"), ("paper", "sign"), ("sign", "baseline"),
               ("lns", "baseline"), ("paper", "baseline"), ("bop", "baseline")]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pretraining_name(seed: int, epochs: int) -> str:
    return f"seed{seed}_{epochs}ep"


def parse_pretraining_name(name: str) -> tuple[int, int]:
    """`(seed, epochs)` of a `pretraining_name`."""
    seed, _, epochs = name.partition("_")
    return int(seed[4:]), int(epochs[:-2])


def call(what: str, script: str, run: str, args: list) -> None:
    """Say `what` runs, then run `script` (train.py or tune.py) with `args` and
    `--output-dir run`; its output goes to `<run>/log.txt`."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)
    os.makedirs(run, exist_ok=True)
    log = os.path.join(run, "log.txt")
    command = [sys.executable, os.path.join(ROOT, script), *map(str, args), "--output-dir", run]
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        code = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        raise SystemExit(f"converged.py: {script} failed (exit {code}); see {log}")


class Bench:
    def __init__(self, args):
        self.args = args
        self.out, self.state = args.output_dir, args.state
        if args.ship:  # checkpoint 0 must be of this study's length
            epochs = read_json(args.ship[:-3] + ".json", "ship its .json beside it")["epochs"]
            if epochs != args.pretrain_epochs:
                raise SystemExit(
                    f"converged.py: --ship {args.ship} is a {epochs}-epoch checkpoint, not "
                    f"{args.pretrain_epochs}; give --ship \"\" to keep checkpoint 0 in --state")
        os.makedirs(self.state, exist_ok=True)
        self.rows_path = os.path.join(self.state, "rows.json")
        self.rows = read_json(self.rows_path, "delete it to run every sample again") \
            if os.path.exists(self.rows_path) else {"rows": []}

    # 1. Pretraining -------------------------------------------------------------

    def pretrain_run(self, seed: int, epochs: int) -> str:
        """The train.py run of a pretraining; its name keys its curve in rows.json."""
        return os.path.join(self.out, "pretrain", pretraining_name(seed, epochs))

    def checkpoint(self, seed: int) -> str:
        """Checkpoint `seed`'s weights file in the state folder, pretrained if missing."""
        epochs = self.args.pretrain_epochs
        kept = os.path.join(self.state, f"bnn_small_{pretraining_name(seed, epochs)}.h5")
        if seed == 0 and self.args.ship:
            kept = self.args.ship
        run = self.pretrain_run(seed, epochs)
        if not os.path.exists(kept):
            self.pretrain(seed, epochs)
            shutil.copyfile(os.path.join(run, "pretrain", "weights.h5"), kept)
            pretraining = self.rows["pretraining"][pretraining_name(seed, epochs)]
            write_json(kept[:-3] + ".json", {
                "seed": seed, "epochs": epochs, "file": os.path.relpath(kept, ROOT),
                "sha256": sha256(kept), "machine": machine(),
                "command": f".venv/bin/python train.py --pretrain-epochs {epochs} --arms "
                           f"--seed {seed} --output-dir {os.path.relpath(run, ROOT)}",
                **{k: pretraining[k] for k in ("val_accuracy", "test_accuracy")}})
        elif (os.path.exists(os.path.join(run, "results.json"))  # its curve, once
              and pretraining_name(seed, epochs) not in self.rows.get("pretraining", {})):
            self.keep_curve(seed, epochs, run)
        return kept

    def pretrain(self, seed: int, epochs: int) -> None:
        run = self.pretrain_run(seed, epochs)
        unfinished = self.unfinished(seed, epochs)
        if not os.path.exists(os.path.join(run, "results.json")) or not os.path.exists(
                os.path.join(run, "pretrain", "weights.h5")):
            if os.path.exists(unfinished) and not os.path.exists(run):  # an earlier session's
                with tarfile.open(unfinished) as tar:
                    tar.extractall(os.path.dirname(run), filter="data")
            call(f"pretraining seed {seed}, {epochs} epochs -> {run}", "train.py", run,
                 ["--pretrain-epochs", epochs, "--arms", "--seed", seed, "--verbose", 2])
        self.keep_curve(seed, epochs, run)
        if os.path.exists(unfinished):  # finished: its curve is in rows.json now
            os.remove(unfinished)

    def unfinished(self, seed: int, epochs: int) -> str:
        return os.path.join(self.state, "unfinished", pretraining_name(seed, epochs) + ".tar.gz")

    def save_unfinished(self) -> None:
        """Each unfinished pretraining run here, as train.py resumes it (its backup,
        history and settings; not its TensorBoard logs), into `<state>/unfinished/`."""
        root = os.path.join(self.out, "pretrain")
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            run = RunDir(os.path.join(root, name))
            if os.path.exists(run.path("results.json")):
                continue
            archive = self.unfinished(*parse_pretraining_name(name))
            os.makedirs(os.path.dirname(archive), exist_ok=True)
            with run.locked(), atomic_path(archive) as tmp, tarfile.open(tmp, "w:gz") as tar:
                tar.add(run.root, name, filter=lambda member: None if os.path.basename(
                    member.name) in ("lock", "tensorboard") else member)  # locked: not running
            print(f"kept {run.root} in {os.path.relpath(archive, ROOT)}: commit it")

    def keep_curve(self, seed: int, epochs: int, run: str) -> None:
        history = read_history(os.path.join(run, "pretrain", "history.csv"))
        curve = [float(r["val_accuracy"]) for r in history]
        baseline = read_json(os.path.join(run, "results.json"), "")["baseline"]
        self.rows.setdefault("pretraining", {})[pretraining_name(seed, epochs)] = {
            "seed": seed, "epochs": epochs, "val_accuracy_by_epoch": curve,
            "val_accuracy": baseline["val_accuracy"], "test_accuracy": baseline["test_accuracy"],
            "machine": machine()}
        self.save()

    def keep_curves(self) -> None:
        """The curve of every finished pretraining run here (the 30-epoch one too)."""
        root = os.path.join(self.out, "pretrain")
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            run = os.path.join(root, name)
            if (name not in self.rows.get("pretraining", {})
                    and os.path.exists(os.path.join(run, "results.json"))):
                self.keep_curve(*parse_pretraining_name(name), run)

    # 2. Tuning ------------------------------------------------------------------

    def tuned(self, arm: str, checkpoint: str) -> str:
        kept = os.path.join(self.state, f"tuned_{arm}.json")
        if os.path.exists(kept):
            return kept
        a = self.args
        run = os.path.join(self.out, "tune", arm)
        call(f"tuning {arm}: {a.trials} trials x {a.finetune_epochs} epochs -> {run}", "tune.py",
             run, ["--arm", arm, "--pretrained", checkpoint, "--tuner", "random", "--max-trials",
                   a.trials, "--epochs", a.finetune_epochs, "--steps-per-epoch", a.steps_per_epoch,
                   "--lr-range", *a.lr_range, "--quiet"])
        shutil.copyfile(os.path.join(run, "best_hparams.json"), kept)
        shutil.copyfile(os.path.join(run, "trials.md"), os.path.join(self.state, f"trials_{arm}.md"))
        return kept

    # 3. Samples -----------------------------------------------------------------

    def done(self, ckpt: int, seed: int, row: str) -> bool:
        return any((r["checkpoint"], r["seed"], r["row"]) == (ckpt, seed, row)
                   for r in self.rows["rows"])

    def sample(self, ckpt: int, seed: int, checkpoint: str, hparams: list[str]) -> None:
        run = os.path.join(self.out, "samples", f"ckpt{ckpt}_seed{seed}")
        # Every arm runs to its end, as before the guard existed: `mapped` flips more than
        # its bound (that arm measures what the bare mapper does).
        common = ["--pretrained", checkpoint, "--seed", seed, "--finetune-epochs",
                  self.args.finetune_epochs, "--verbose", 2, "--no-guard"]
        todo = [arm for arm in SAMPLE_ARMS if not self.done(ckpt, seed, arm)]
        if todo:
            call(f"sample checkpoint {ckpt}, seed {seed}: {' '.join(todo)}", "train.py", run,
                 [*common, "--arms", *SAMPLE_ARMS, "--hparams", *hparams])
            self.keep(ckpt, seed, checkpoint, run)
        if not self.done(ckpt, seed, "paper"):
            paper = os.path.join(run, "paper")
            call(f"sample checkpoint {ckpt}, seed {seed}: paper", "train.py", paper,
                 [*common, "--arms", "lns", "--preset", "paper"])
            self.keep(ckpt, seed, checkpoint, paper, {"lns": "paper"})

    def keep(self, ckpt, seed, checkpoint, run, names=None) -> None:
        """The rows of `run`'s results.json not kept yet, its arms renamed by `names`."""
        results = read_json(os.path.join(run, "results.json"), "")
        fingerprint = sha256(checkpoint)
        named = {(names or {}).get(arm, arm): result for arm, result in results["arms"].items()}
        for row, result in {"baseline": results["baseline"], **named}.items():
            if not self.done(ckpt, seed, row):
                self.rows["rows"].append({"checkpoint": ckpt, "seed": seed, "row": row,
                                          "sha256": fingerprint, "machine": machine(), **result})
        self.save()

    def length_check(self, checkpoint: str, hparams: list[str]) -> None:
        """Checkpoint 0, seed 0: the tuned arms fine-tuned twice as long, and every
        arm's validation curve, to show that fine-tuning has converged."""
        f = self.args.finetune_epochs
        if len(self.rows.get("length_check", {})) == 6:  # done in an earlier session
            return
        curves = self.rows.setdefault("finetuning_curves", {})
        for epochs in (f, 2 * f):
            run = os.path.join(self.out, "samples", "ckpt0_seed0" + ("" if epochs == f else f"_{epochs}ep"))
            if epochs != f and not os.path.exists(os.path.join(run, "arms", "lns", "result.json")):
                call(f"length check: sign bop lns for {epochs} epochs", "train.py", run,
                     ["--pretrained", checkpoint, "--seed", 0, "--finetune-epochs", epochs,
                      "--arms", "sign", "bop", "lns", "--hparams", *hparams, "--verbose", 2])
            results = read_json(os.path.join(run, "results.json"), "")
            for arm in ("sign", "bop", "lns"):
                history = read_history(os.path.join(run, "arms", arm, "history.csv"))
                curves[f"{arm}, {epochs} epochs"] = [
                    results["baseline"]["val_accuracy"], *[float(r["val_accuracy"]) for r in history]]
                self.rows.setdefault("length_check", {})[f"{arm}, {epochs} epochs"] = {
                    k: results["arms"][arm][k] for k in ("val_accuracy", "test_accuracy")}
        self.save()

    def save(self) -> None:
        write_json(self.rows_path, self.rows)

    def run(self) -> None:
        a = self.args
        first = self.checkpoint(a.checkpoints[0])
        hparams = [f"{arm}={self.tuned(arm, first)}" for arm in ("sign", "bop", "lns")]
        for ckpt in a.checkpoints:  # the first checkpoint's samples first: train.py's row
            checkpoint = self.checkpoint(ckpt)
            for seed in a.seeds:
                self.sample(ckpt, seed, checkpoint, hparams)
                if (ckpt, seed) == (a.checkpoints[0], a.seeds[0]):
                    self.length_check(checkpoint, hparams)
        for seed in a.checkpoints:  # the convergence check of each: its curve
            if pretraining_name(seed, 2 * a.pretrain_epochs) not in self.rows.get("pretraining", {}):
                self.pretrain(seed, 2 * a.pretrain_epochs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(ROOT, "bench_runs", "converged240_fashion_mnist"))
    p.add_argument("--state", default=os.path.join(ROOT, "bench", "state", "converged240_fashion_mnist"),
                   help="what a later session needs (commit it): checkpoints, tuned settings, rows")
    p.add_argument("--ship", default=os.path.join(ROOT, "models", "weights", "bnn_small_fashion_mnist.h5"),
                   help='checkpoint 0: the one train.py fine-tunes by default ("": in --state)')
    p.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    p.add_argument("--pretrain-epochs", type=int, default=240)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=390, help="tune.py's trials: full epochs")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--lr-range", nargs=2, default=["1e-5", "3e-3"])
    # A third checkpoint since checkpoint 1 failed the convergence rule (RESULTS 0.1).
    p.add_argument("--checkpoints", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(12)))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--save-unfinished", action="store_true",
                   help="keep each unfinished pretraining in --state/unfinished (stop the bench "
                        "first), then report")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    bench = Bench(args)
    if args.save_unfinished:
        bench.save_unfinished()
    elif not args.report_only:
        bench.run()
    bench.keep_curves()
    from converged_report import report  # noqa: E402

    report(bench.rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
