"""`pip install .` gives the method alone, and it works outside the checkout: every module
of the installed package imports, and the README's library example runs."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_library_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_installed_package_imports_and_runs_the_readme_example(tmp_path):
    # A fresh venv holding only the wheel built from this checkout; its dependencies (the
    # pinned stack) come from the test's own environment through a .pth file, so the test
    # needs no download. CI also installs it with its dependencies (.ci/run).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "wheel"), str(ROOT)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (pathlib.Path(site) / "pinned_stack.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel, = (tmp_path / "wheel").glob("larq_noisy-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True)

    check_installed(python, tmp_path)


def check_installed(python, workdir) -> None:
    """Every module of the installed `larq_noisy` imports (none of the harness), and the
    README's library example runs, in `workdir`, outside the checkout."""
    check = (
        "import importlib, pkgutil, larq_noisy\n"
        "assert 'site-packages' in larq_noisy.__file__, larq_noisy.__file__\n"
        "names = [m.name for m in pkgutil.iter_modules(larq_noisy.__path__, 'larq_noisy.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "import sys\n"
        "assert not {'harness', 'models'} & set(sys.modules), 'the method imports the harness'\n"
        "print(' '.join(sorted(names)))\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = dict(cwd=workdir, env=env, capture_output=True, text=True)
    imported = subprocess.run([python, "-c", check], **run)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert set(imported.stdout.split()) >= {"larq_noisy.conversion", "larq_noisy.export",
                                            "larq_noisy.quantizers", "larq_noisy.monitoring"}
    example = subprocess.run([python, "-c", readme_library_example()], **run)
    assert example.returncode == 0, example.stderr[-3000:]
    assert "Total params" in example.stdout  # lq.models.summary's table


if __name__ == "__main__":  # .ci/install: the same checks on a venv with its dependencies
    check_installed(sys.argv[1], sys.argv[2])
    print("install: larq_noisy imports and runs the README's library example outside the checkout")
