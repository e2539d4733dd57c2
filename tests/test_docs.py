"""The docs cannot drift from the code: every documented command parses with its script's
own argument parser and names only paths that exist or that an earlier documented
command writes; every flag named beside a script in the prose is one of its flags; the
settings tables are what `harness.doc_tables` renders from the protocols; every link
and image resolves. Parsing only: nothing trains."""

import contextlib
import functools
import glob
import importlib.util
import io
import json
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
PYTHONS = {"python", "python3", ".venv/bin/python"}
#: Programs a documented command may run that are no script of this repository.
OTHER_PROGRAMS = {"pip", "export", "git", "tensorboard", "lce_benchmark_model", "mkdir", "mv",
                  ".venv/bin/tfds", "tfds"}
#: The options whose value a script writes (a directory or a file).
OUTPUT_OPTIONS = ("output_dir", "json", "out", "state", "plots", "docs")
_FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
_INLINE = re.compile(r"`(?:(?:\.venv/bin/)?python3? )?((?:bench/)?\w+\.py)( [^`]*)?`")


def _read(doc: str) -> str:
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


def documented_commands(doc: str):
    """`(line, tokens)` of each simple command in `doc`'s shell code blocks, in order:
    continuation lines joined, comments dropped, `&&` and `;` lists split."""
    text = _read(doc)
    for block in _FENCE.finditer(text):
        if block[2] not in ("", "bash", "sh"):
            continue
        line = text[: block.start()].count("\n") + 2
        body = re.sub(rf"^{block[1]}", "", block[3], flags=re.M).replace("\\\n", " ")
        for offset, command in enumerate(body.splitlines()):
            tokens, simple = shlex.split(command, comments=True), []
            for token in tokens + [";"]:
                if token in ("&&", ";", "||"):
                    if simple:
                        yield line + offset, simple
                    simple = []
                else:
                    simple.append(token)


@functools.lru_cache(maxsize=None)
def script_parser(script: str):
    """`script`'s own argument parser (its `build_parser`), loaded without running it."""
    name = "docs_" + re.sub(r"\W", "_", script)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    parser = module.build_parser()
    parser.prog = script  # its messages name it
    return parser


def parse(script: str, argv: list[str]):
    """The namespace `script` parses `argv` into; `AssertionError` with its message if
    it refuses them."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return script_parser(script).parse_args(argv)
    except SystemExit:
        raise AssertionError(stderr.getvalue().strip().splitlines()[-1]) from None


def _repo_path(value: str) -> str | None:
    """`value` (or the FILE of `ARM=FILE`) as a path in the repository, if it names one."""
    value = value.split("=", 1)[1] if re.match(r"^\w+=", value) else value
    if (not value or value.startswith(("-", "/")) or "://" in value
            or not ("/" in value or re.search(r"\.(h5|json|tflite|py|md|png)$", value))):
        return None
    return os.path.normpath(os.path.relpath(os.path.join(ROOT, value), ROOT))


def written(script: str, args) -> list[str]:
    """The directories and files `script` run with `args` writes, by its own defaults."""
    out = [getattr(args, name) for name in OUTPUT_OPTIONS if getattr(args, name, None)]
    out = [os.path.relpath(p, ROOT) if os.path.isabs(p) and p.startswith(ROOT + os.sep) else p
           for p in map(str, out)]  # bench/converged.py's defaults are absolute
    if script == "train.py" and args.output_dir is None:
        from harness.settings import TrainConfig

        out.append(TrainConfig(dataset=args.dataset).resolved().output_dir)
    if script == "tune.py":
        from harness.tuning import TuneConfig

        settings = {k: v for k, v in vars(args).items() if k not in ("pretrain_only", "quiet")}
        config = TuneConfig(**{**settings, "pretrained": None}).resolved()
        out += [config.output_dir] + ([] if args.pretrained else [config.pretrain_dir])
    return [p for p in map(_repo_path, out) if p]


def check_command(tokens: list[str], outputs: list[str]) -> None:
    """Parse one documented command as its script would, check the paths it names
    against the repository and `outputs` (what earlier commands write), and add what it
    writes to `outputs`. `AssertionError` saying what is wrong."""
    while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):  # VAR=value command
        tokens = tokens[1:]
    program, *argv = tokens
    if program == "bash":
        assert os.path.exists(os.path.join(ROOT, argv[0])), f"no script {argv[0]}"
        return
    if program not in PYTHONS:
        assert program in OTHER_PROGRAMS, f"unknown program {program!r}: teach tests/test_docs.py"
        return
    if argv[0] in ("-c", "-m") and argv[1:2] != ["harness.doc_tables"]:
        return  # a one-liner, or pytest
    script = "harness/doc_tables.py" if argv[0] == "-m" else argv[0]
    argv = argv[2:] if argv[0] == "-m" else argv[1:]
    assert os.path.isfile(os.path.join(ROOT, script)), f"no script {script}"
    args = parse(script, argv)
    mine = written(script, args)
    for token in argv:
        path = _repo_path(token)
        if path is None or path in mine:
            continue
        assert os.path.exists(os.path.join(ROOT, path)) or any(
            path == o or path.startswith(o + os.sep) for o in outputs
        ), f"{path} neither exists nor is written by an earlier command of the document"
    outputs.extend(mine)


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_parses_and_names_existing_paths(doc):
    outputs, commands = [], list(documented_commands(doc))
    assert commands or doc != "README.md"
    for line, tokens in commands:
        try:
            check_command(tokens, outputs)
        except AssertionError as error:
            pytest.fail(f"{doc}:{line}: `{shlex.join(tokens)}`: {error}")


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_named_beside_a_script_is_one_of_its_flags(doc):
    text = _read(doc)
    for span in _INLINE.finditer(text):
        script, rest = span[1], span[2] or ""
        if not os.path.isfile(os.path.join(ROOT, script)):
            continue  # a file of another project (larq's), or a module's name
        known = script_parser(script)._option_string_actions
        for flag in re.findall(r"(?<![\w-])--[\w-]+", rest):
            line = text[: span.start()].count("\n") + 1
            assert flag in known, f"{doc}:{line}: {script} has no flag {flag} (`{span[0]}`)"


def test_the_readme_opens_with_the_two_commands_and_the_verdict():
    top = "\n".join(_read("README.md").splitlines()[:40])
    for command in ("bash .ci/setup && .venv/bin/python train.py",
                    "bash .ci/setup && .venv/bin/python -m pytest"):
        assert f"```bash\n{command}\n```" in top
    # The verdict is the converged study's, as its report last wrote it.
    # Where the convergence rule calls some checkpoints unconverged, the verdict over the
    # others too.
    with open(os.path.join(ROOT, "docs", "data", "converged240_fashion_mnist.json")) as f:
        analysis = json.load(f)["analysis"]
    flat, checked = " ".join(top.split()), []
    for key in ("comparisons", "comparisons_of_converged_checkpoints"):
        for c in analysis.get(key, []):
            if (c["a"], c["b"]) == ("lns", "sign"):
                low, high = c["ci95"]
                word = {"better": "beats", "worse": "loses"}.get(c["verdict"].split()[0],
                                                                  c["verdict"].split()[0])
                assert f"{c['n']} paired samples" in flat, key
                # The verdict's word, then its mean and interval.
                mean, interval = f"{c['mean']:+.2f}", f"95% CI [{low:+.2f}, {high:+.2f}]"
                pattern = (rf"\*\*{word}\*\*[^\[]{{0,80}}{re.escape(mean)}[^\[]{{0,40}}"
                           + re.escape(interval))
                assert re.search(pattern, flat), (key, word, mean, interval)
                checked.append(key)
    assert "comparisons" in checked


def test_the_settings_tables_are_rendered_from_the_protocols():
    from harness import doc_tables

    found = {}
    for doc in doc_tables.DOCS:
        for name, table in doc_tables.blocks(_read(doc)).items():
            found[name] = doc
            assert table == doc_tables.TABLES[name](), (
                f"{doc}: the {name} table is stale: run `{doc_tables.COMMAND}`")
    assert set(found) == set(doc_tables.TABLES)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS)
def test_links_and_images_resolve(doc):
    text = _read(doc)
    anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", re.sub(_FENCE, "", text), re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert os.path.exists(os.path.join(ROOT, os.path.dirname(doc), path)), f"{doc}: {target}"
        elif anchor:
            assert anchor in anchors, f"{doc}: no heading for #{anchor}"


def test_every_plot_in_docs_is_shown():
    shown = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", _read("docs/RESULTS.md")))
    plots = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.png"))}
    assert plots <= shown, f"plots in docs/ that no section shows: {sorted(plots - shown)}"
