"""Settings declared once (issue 15): the sections, the flat interface, the generated CLI.

Every setting of a training run is one field of a section of ``TrainConfig``; the
``qkv train`` options are generated from those fields, ``ModelConfig`` takes its
architecture fields from ``ArchConfig``, and config.json keeps its flat ``"train"``
object. The CLI modules must also import on their own, without loops through the app.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import qkv.cli
from qkv.cli.app import load_command
from qkv.cli.options import build_config, config_options
from qkv.train.config import (
    SECTIONS,
    ArchConfig,
    OptimConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    setting,
)
from qkv.train.models import ModelConfig

SETTINGS = [f for cls in SECTIONS.values() for f in dataclasses.fields(cls)]

# config.json's "train" object as runs before the sections wrote it: its keys must
# still be exactly the settings, so such runs resume and experiment runs are reused.
OLD_TRAIN_KEYS = {
    "task", "attention", "model", "steps", "seed", "batch_size", "lr", "min_lr", "warmup",
    "weight_decay", "grad_clip", "d_model", "num_heads", "num_layers", "eval_every",
    "eval_examples", "test_examples", "log_every", "checkpoint_every", "text", "n_pairs",
    "n_keys", "block", "backend", "device",
}  # fmt: skip


# -- the config -----------------------------------------------------------------------
def test_every_setting_has_help_and_one_owner():
    names = [f.name for f in SETTINGS]
    assert len(names) == len(set(names))
    assert set(names) == OLD_TRAIN_KEYS
    assert all(f.metadata["help"] for f in SETTINGS)


def test_flat_keywords_go_to_their_sections():
    cfg = TrainConfig("reverse", steps=7, d_model=32, seed=3, n_pairs=2)
    assert cfg.optim == OptimConfig(steps=7)
    assert cfg.arch == ArchConfig(d_model=32)
    assert cfg.run == RunConfig(seed=3)
    assert cfg.data == TaskConfig("reverse", n_pairs=2)
    assert (cfg.task, cfg.steps, cfg.d_model, cfg.seed) == ("reverse", 7, 32, 3)


def test_sections_and_flat_keywords_compose():
    by_section = TrainConfig(data=TaskConfig("sort"), optim=OptimConfig(steps=9, lr=1e-3))
    assert by_section == TrainConfig("sort", steps=9, lr=1e-3)
    # A flat keyword overrides that field of a given section.
    assert TrainConfig("sort", optim=OptimConfig(steps=9), steps=4).steps == 4


def test_flat_dict_round_trip_is_config_json_train_object():
    cfg = TrainConfig("recall", n_keys=5, lr=1e-3, min_lr=1e-4, device="cpu")
    d = cfg.to_dict()
    assert set(d) == OLD_TRAIN_KEYS
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({**d, "heads": 4})


def test_bad_settings_name_themselves():
    with pytest.raises(TypeError, match="unknown settings"):
        TrainConfig("sort", stpes=3)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig("sort", warmup=-1)
    with pytest.raises(ValueError, match="num_layers"):
        TrainConfig("sort", num_layers=0)
    with pytest.raises(ValueError, match="attention variant"):
        TrainConfig("sort", attention="learned")
    with pytest.raises(TypeError, match="optim must be a OptimConfig"):
        TrainConfig("sort", optim={"steps": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig("sort").steps = 3


def test_model_config_shares_the_architecture_fields():
    arch = {f.name: f for f in dataclasses.fields(ArchConfig)}
    shared = [f for f in dataclasses.fields(ModelConfig) if f.name in arch]
    assert {f.name for f in shared} == {
        "attention",
        "d_model",
        "num_heads",
        "num_layers",
        "backend",
    }
    for f in shared:
        assert f.default == arch[f.name].default
        assert f.metadata == arch[f.name].metadata
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        ModelConfig("decoder", 10, d_model=0)


# -- the generated options ------------------------------------------------------------
def test_train_options_are_the_settings_with_their_defaults_and_help():
    params = {p.name: p for p in load_command("train").params}
    own = {"out", "resume", "threads", "context_parallel", "progress"}
    assert set(params) == OLD_TRAIN_KEYS | own
    for f in SETTINGS:
        p = params[f.name]
        assert p.help == f.metadata["help"]
        if f.default is dataclasses.MISSING:
            assert p.required
        else:
            assert p.default == f.default and not p.required
        assert p.opts == ["--" + f.name.replace("_", "-")]


@dataclass(frozen=True)
class _Inner:
    width: int = setting(3, "Width.")
    label: str | None = setting(None, "Label.", cli=("--name", "-n"))


@dataclass(frozen=True)
class _Outer:
    name_of_run: str = setting(help="Required.")
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_generator_adds_an_option_per_field_and_builds_the_config_back():
    app = typer.Typer()
    seen = {}

    @app.command()
    @config_options(_Outer, order=("verbose", "width"))
    def cmd(settings: dict, verbose: bool = typer.Option(False, "--verbose")) -> None:
        """A toy."""
        seen["cfg"] = build_config(_Outer, settings)
        seen["verbose"] = verbose

    runner = CliRunner()
    res = runner.invoke(app, ["--name-of-run", "a", "--width", "5", "-n", "x", "--verbose"])
    assert res.exit_code == 0, res.output
    assert seen == {"cfg": _Outer("a", _Inner(5, "x")), "verbose": True}
    res = runner.invoke(app, ["--name-of-run", "b"])
    assert res.exit_code == 0 and seen["cfg"] == _Outer("b") and seen["verbose"] is False
    assert runner.invoke(app, []).exit_code == 2  # the required setting
    help_text = runner.invoke(app, ["--help"]).output
    assert help_text.index("--verbose") < help_text.index("--width") < help_text.index("--name")


def test_an_option_may_not_shadow_a_setting():
    with pytest.raises(TypeError, match="width"):

        @config_options(_Inner)
        def cmd(settings: dict, width: int = 1) -> None: ...


# -- no import loops ------------------------------------------------------------------
CLI_DIR = Path(qkv.cli.__file__).parent
CLI_MODULES = sorted(p.stem for p in CLI_DIR.glob("*.py") if p.stem != "__init__")


def _imported(path: Path) -> set[str]:
    """The qkv.cli modules that ``path`` imports (relative or absolute)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
                names |= {base} if base else {a.name for a in node.names}
            elif (node.module or "").startswith("qkv.cli."):
                names.add(node.module.removeprefix("qkv.cli."))
        elif isinstance(node, ast.Import):
            names |= {
                a.name.removeprefix("qkv.cli.") for a in node.names if a.name.startswith("qkv.cli.")
            }
    return {n.split(".")[0] for n in names}


def test_no_cli_module_imports_the_app():
    offenders = [m for m in CLI_MODULES if m != "app" and "app" in _imported(CLI_DIR / f"{m}.py")]
    assert offenders == []


def test_cli_imports_have_no_cycle():
    graph = {m: _imported(CLI_DIR / f"{m}.py") & set(CLI_MODULES) for m in CLI_MODULES}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or reaches(nxt, goal, seen | {nxt}) for nxt in graph[start] - seen)

    assert [m for m in CLI_MODULES if reaches(m, m, set())] == []


@pytest.mark.parametrize("module", CLI_MODULES)
def test_each_cli_module_imports_alone(module):
    code = f"import qkv.cli.{module}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
