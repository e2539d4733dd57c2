"""The settings tables of the docs, rendered from `harness.protocols` so that they cannot
drift from the code: each protocol's schedule and default arms, and each tuned arm's
fine-tuning settings as a run resolves them (`TrainConfig.arm_settings`).

A table sits in a Markdown file between `<!-- generated: NAME ... -->` and
`<!-- end: NAME -->`; after changing a protocol, rewrite them all with

    .venv/bin/python -m harness.doc_tables          # --check: exit 1 if one is stale

(tests/test_docs.py fails while a table in the docs differs from its rendering).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys

from harness.protocols import PROTOCOLS, TUNED_ARMS
from harness.settings import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The files whose generated tables `main` rewrites.
DOCS = ("README.md", "docs/METHOD.md", "docs/RESULTS.md")
COMMAND = ".venv/bin/python -m harness.doc_tables"
_BLOCK = re.compile(r"(<!-- generated: (\w+) .*?-->\n)(.*?)(<!-- end: \2 -->)", re.S)


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _schedule(epochs: int, milestones: tuple, cosine: bool, per_step: bool = False) -> str:
    if cosine:
        return "cosine" + (" per step" if per_step else "")
    if not milestones:
        return "constant"
    return "x0.1 at " + ", ".join(str(round(f * epochs)) for f in milestones)


def protocols_table() -> str:
    """Per dataset: the model, both phases' length, optimizer and schedule, the arms."""
    lines = ["| dataset | model | pretrain epochs | fine-tune epochs | batch | optimizer "
             "| lr: pretrain / fine-tune | schedule: pretrain / fine-tune | default arms "
             "| shipped checkpoint | source |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in PROTOCOLS.items():
        optimizer = "SGD, momentum 0.9" if p.optimizer == "sgd" else "Adam"
        tuned = " (tuned arms: their own)" if any("finetune_lr" in v for v in p.tuned.values()) else ""
        schedule = (f"{_schedule(p.pretrain_epochs, p.pretrain_milestones, p.pretrain_cosine)} / "
                    f"{_schedule(p.finetune_epochs, p.finetune_milestones, p.finetune_cosine, True)}")
        checkpoint = f"`models/weights/{p.checkpoint}`" if p.checkpoint else "-"
        lines.append(f"| `{name}` | `{p.model}` | {p.pretrain_epochs} | {p.finetune_epochs} | "
                     f"{p.batch_size} | {optimizer} | {_number(p.lr)} / {_number(p.finetune_lr)}"
                     f"{tuned} | {schedule} | {', '.join(f'`{a}`' for a in p.arms)} | "
                     f"{checkpoint} | {p.note} |")
    return "\n".join(lines)


def _bop_defaults() -> dict:
    import larq as lq

    parameters = inspect.signature(lq.optimizers.Bop.__init__).parameters
    return {"bop_threshold": parameters["threshold"].default, "bop_gamma": parameters["gamma"].default}


def arms_table() -> str:
    """Per dataset and tuned arm: what the arm fine-tunes with, as a run resolves it."""
    from larq_noisy.quantizers import check_options

    bop = _bop_defaults()
    lines = ["| dataset | arm | fine-tune lr | Bop threshold / gamma | mapper | alpha "
             "| rho_pos / rho_neg | reduction | clip | aux loss trains W | for the model |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in PROTOCOLS.items():
        config = TrainConfig(dataset=name, arms=TUNED_ARMS).resolved()
        for arm in TUNED_ARMS:
            s = config.arm_settings(arm)
            flips = "-"
            if "bop_gamma" in s:
                flips = " / ".join(_number(s[k]) if s[k] is not None else f"{_number(bop[k])} (larq's)"
                                   for k in ("bop_threshold", "bop_gamma"))
            q = check_options(**{k: v for k, v in s.items() if not k.startswith(("bop_", "finetune_"))}) \
                if "alpha" in s else None
            quantizer = (f"`{q['mapper']}` | {_number(q['alpha'])} | {_number(q['rho_pos'])} / "
                         f"{_number(q['rho_neg'])} | `{q['reduction']}` | `{q['clip']}` | "
                         f"{'yes' if q['aux_to_latent'] else 'no'}") if q else "- | - | - | - | - | -"
            model = p.tuned_model or "any"
            lines.append(f"| `{name}` | `{arm}` | {_number(s['finetune_lr'])} | {flips} | "
                         f"{quantizer} | {model} |")
    return "\n".join(lines)


TABLES = {"protocols": protocols_table, "arms": arms_table}


def render(text: str) -> str:
    """`text` with every generated table rendered anew."""
    return _BLOCK.sub(lambda m: f"{m[1]}{TABLES[m[2]]()}\n{m[4]}", text)


def blocks(text: str) -> dict[str, str]:
    """`{name: table}` of the generated tables in `text`, as they stand."""
    return {m[2]: m[3].rstrip("\n") for m in _BLOCK.finditer(text)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        with open(path) as f:
            text = f.read()
        new = render(text)
        if new != text:
            stale.append(doc)
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    verb = "stale" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "every generated table is up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
