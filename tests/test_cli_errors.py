"""Every ``qkv`` command turns the user's mistakes into one error line, never a traceback.

The mistakes are the ones a fuzzer found: output folders that cannot be written
(an existing file, a path under a file, a place the system refuses), damaged or
foreign run files (truncated or garbage safetensors, garbage or incomplete JSON,
weights of another shape), option values whose result would not be finite, and
user text or paths holding rich markup (``[/x]``) or emoji codes. Each must give
exactly one stderr line starting ``qkv: error:`` that names the option or file,
and exit status 2; markup in a *valid* input must be printed as typed.

``test_every_command_is_covered`` compares the commands exercised here with the
commands registered on the app, so a new command cannot escape this file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import typer

from qkv.cli.app import app, main
from qkv.pretrained import model_dir
from qkv.train import trainer as T

# The smallest run that writes every file: two steps, a checkpoint after each.
TINY = [
    "--task=sort",
    "--steps=2",
    "--batch-size=4",
    "--d-model=16",
    "--num-heads=2",
    "--num-layers=1",
    "--eval-every=2",
    "--eval-examples=8",
    "--test-examples=8",
    "--log-every=1",
    "--checkpoint-every=1",
    "--threads=1",
    "--no-progress",
]
MARKUP = "[/x]"  # a closing tag that opens nothing: rich raises MarkupError on it
# Edits a copy of the tiny run: (workspace, run folder, its newest checkpoint).
Damage = Callable[["Workspace", Path, Path], None]


@dataclass
class Workspace:
    """Files made once for all cases: a finished tiny run and one of another shape."""

    root: Path
    run: Path  # finished tiny run (d_model 16)
    other: Path  # finished tiny run (d_model 8): the "checkpoint of another shape"
    model: Path  # the pretrained model's config and tokenizer, with truncated weights
    markup_model: Path  # the pretrained model, linked from a folder named with markup

    @property
    def file(self) -> Path:
        """A regular file: as --out it is "an existing file"; below it, "under a file"."""
        return self.root / "a-file"

    def broken_run(self, name: str, damage: Damage | None = None) -> Path:
        """A copy of the tiny run, unfinished (so --resume loads it), then damaged.

        ``damage(workspace, run_dir, newest_checkpoint)`` edits the copy.
        """
        dst = self.root / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(self.run, dst)
        (dst / "results.json").unlink()
        if damage is not None:
            damage(self, dst, T.latest_checkpoint(dst))
        return dst

    def broken_model(self, name: str, damage: Callable[[Path], None]) -> Path:
        """A model directory with the real config and tokenizer, then damaged."""
        dst = self.root / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(self.model, dst)
        damage(dst)
        return dst


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("cli-errors")
    run, other = root / "run", root / "other"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert main(["train", *[a.replace("=16", "=8") for a in TINY], "--out", str(other)]) == 0
    model = root / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(model_dir("all-MiniLM-L6-v2") / name, model / name)
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    markup_model = root / f"m{MARKUP}"  # the folder "m[" holding "x]"
    markup_model.mkdir(parents=True)
    for entry in model_dir("all-MiniLM-L6-v2").iterdir():
        (markup_model / entry.name).symlink_to(entry)
    (root / "a-file").write_text("not a folder\n")
    (root / "o[").write_text("a file whose name ends a path with markup: o[/x]\n")
    (root / "bad.json").write_text("{not json")
    (root / "x.npz").mkdir()  # a folder named like a weights file
    return Workspace(root, run, other, model, markup_model)


# -- ways to damage a run -----------------------------------------------------------------
def _truncated_model(ws: Workspace, run: Path, ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _garbage_optimizer(ws: Workspace, run: Path, ckpt: Path) -> None:
    (ckpt / "optimizer.safetensors").write_bytes(b"garbage, not safetensors\n" * 4)


def _garbage_state(ws: Workspace, run: Path, ckpt: Path) -> None:
    (ckpt / "state.json").write_text('{"step": ')


def _state_missing_keys(ws: Workspace, run: Path, ckpt: Path) -> None:
    (ckpt / "state.json").write_text('{"step": 2}')


def _other_shape(ws: Workspace, run: Path, ckpt: Path) -> None:
    for f in T.latest_checkpoint(ws.other).iterdir():
        shutil.copy(f, ckpt / f.name)


def _garbage_config(ws: Workspace, run: Path, ckpt: Path) -> None:
    (run / "config.json").write_text("[1, 2")


def _config_missing_model(ws: Workspace, run: Path, ckpt: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    del config["model"]
    (run / "config.json").write_text(json.dumps(config))


# -- the cases ----------------------------------------------------------------------------
# (id, command, argv builder, strings the error line must contain)
Case = tuple[str, str, Callable[[Workspace], list[str]], tuple[str, ...]]


def _train_resume(name: str, damage: Damage) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["train", *TINY, "--resume", "--out", str(ws.broken_run(name, damage))]


def _generate(
    name: str, damage: Damage, at_checkpoint: bool = False
) -> Callable[[Workspace], list[str]]:
    def argv(ws: Workspace) -> list[str]:
        run = ws.broken_run(name, damage)
        target = T.latest_checkpoint(run) if at_checkpoint else run
        return ["generate", "--checkpoint", str(target), "--prompt", "dcba"]

    return argv


TEXT = "the bank of the river"
CASES: list[Case] = [
    # backends / calibrate: options only
    ("backends-extra", "backends", lambda ws: ["backends", f"x{MARKUP}"], ("extra",)),
    ("calibrate-budget", "calibrate", lambda ws: ["calibrate", "--budget", "-1"], ("--budget",)),
    ("calibrate-nan", "calibrate", lambda ws: ["calibrate", "--budget", "nan"], ("--budget",)),
    # walkthrough: no files; markup in the text of a failing call
    (
        "walkthrough-markup",
        "walkthrough",
        lambda ws: ["walkthrough", MARKUP, "--d-model", "3"],
        ("d_model",),
    ),
    # train: output folders
    ("train-out-file", "train", lambda ws: ["train", *TINY, "--out", str(ws.file)], ("--out",)),
    (
        "train-out-under-file",
        "train",
        lambda ws: ["train", *TINY, "--out", str(ws.file / "run")],
        ("--out", "a-file"),
    ),
    ("train-out-proc", "train", lambda ws: ["train", *TINY, "--out", "/proc/qkv/run"], ("--out",)),
    (
        "train-out-markup",
        "train",
        lambda ws: ["train", *TINY, "--out", str(ws.root / f"o{MARKUP}")],
        ("--out", f"o{MARKUP}"),
    ),
    (
        "train-text-folder",
        "train",
        lambda ws: [
            "train",
            *TINY,
            "--task=charlm",
            "--text",
            str(ws.root),
            "--out",
            str(ws.root / "charlm"),
        ],
        ("--text",),
    ),
    # train --resume: damaged or foreign checkpoints, and nothing to resume
    (
        "train-resume-truncated",
        "train",
        _train_resume("r-trunc", _truncated_model),
        ("model.safetensors", "truncated"),
    ),
    (
        "train-resume-garbage-optimizer",
        "train",
        _train_resume("r-opt", _garbage_optimizer),
        ("optimizer.safetensors",),
    ),
    (
        "train-resume-garbage-state",
        "train",
        _train_resume("r-state", _garbage_state),
        ("state.json", "not valid JSON"),
    ),
    (
        "train-resume-state-keys",
        "train",
        _train_resume("r-keys", _state_missing_keys),
        ("state.json", "acc"),
    ),
    (
        "train-resume-other-shape",
        "train",
        _train_resume("r-shape", _other_shape),
        ("model.safetensors", "another model"),
    ),
    (
        "train-resume-garbage-config",
        "train",
        _train_resume("r-config", _garbage_config),
        ("config.json", "not valid JSON"),
    ),
    (
        "train-resume-nothing",
        "train",
        lambda ws: ["train", *TINY, "--resume", "--out", str(ws.root / "no-run-here")],
        ("no-run-here", "holds no run"),
    ),
    # train --context-parallel: a bad count, or no torchrun processes to split over
    (
        "train-context-parallel-zero",
        "train",
        lambda ws: ["train", *TINY, "--context-parallel", "0", "--out", str(ws.root / "cp0")],
        ("--context-parallel", "positive"),
    ),
    (
        "train-context-parallel-no-torchrun",
        "train",
        lambda ws: ["train", *TINY, "--context-parallel", "2", "--out", str(ws.root / "cp2")],
        ("--context-parallel 2", "torchrun"),
    ),
    # generate: the same damage, through the run folder or the checkpoint itself
    (
        "generate-truncated",
        "generate",
        _generate("g-trunc", _truncated_model),
        ("model.safetensors", "truncated"),
    ),
    (
        "generate-truncated-checkpoint",
        "generate",
        _generate("g-trunc2", _truncated_model, at_checkpoint=True),
        ("model.safetensors",),
    ),
    (
        "generate-other-shape",
        "generate",
        _generate("g-shape", _other_shape),
        ("model.safetensors", "another model"),
    ),
    (
        "generate-garbage-config",
        "generate",
        _generate("g-config", _garbage_config),
        ("config.json",),
    ),
    (
        "generate-config-keys",
        "generate",
        _generate("g-keys", _config_missing_model),
        ("config.json", "model"),
    ),
    (
        "generate-markup-path",
        "generate",
        lambda ws: ["generate", "--checkpoint", str(ws.root / MARKUP), "--prompt", "ab"],
        (MARKUP,),
    ),
    # experiment: its two folders and the reference file, all refused before training
    (
        "experiment-out-file",
        "experiment",
        lambda ws: ["experiment", "--quick", "--out", str(ws.file)],
        ("--out",),
    ),
    (
        "experiment-work-under-file",
        "experiment",
        lambda ws: [
            "experiment",
            "--quick",
            "--out",
            str(ws.root / "exp"),
            "--work",
            str(ws.file / "w"),
        ],
        ("--work",),
    ),
    (
        "experiment-garbage-against",
        "experiment",
        lambda ws: [
            "experiment",
            "--quick",
            "--out",
            str(ws.root / "exp"),
            "--against",
            str(ws.root / "bad.json"),
        ],
        ("--against", "bad.json"),
    ),
    # explain: output folders, markup in paths, a damaged model, the baseline scale
    (
        "explain-out-file",
        "explain",
        lambda ws: ["explain", TEXT, "--out", str(ws.file)],
        ("--out", "a-file"),
    ),
    (
        "explain-out-under-file",
        "explain",
        lambda ws: ["explain", TEXT, "--out", str(ws.file / "sub")],
        ("--out",),
    ),
    ("explain-out-proc", "explain", lambda ws: ["explain", TEXT, "--out", "/proc/qkv"], ("--out",)),
    (
        "explain-out-markup",
        "explain",
        lambda ws: ["explain", f"a {MARKUP} b", "--out", str(ws.root / f"o{MARKUP}")],
        ("--out", f"o{MARKUP}"),
    ),
    (
        "explain-save-weights-under-file",
        "explain",
        lambda ws: ["explain", TEXT, "--no-files", "--save-weights", str(ws.file / "w.npz")],
        ("--save-weights", "a-file"),
    ),
    (
        "explain-save-weights-extension",
        "explain",
        lambda ws: ["explain", TEXT, "--no-files", "--save-weights", str(ws.root / "w.pt")],
        ("--save-weights", ".safetensors or .npz"),
    ),
    (
        "explain-save-weights-folder",
        "explain",
        lambda ws: ["explain", TEXT, "--no-files", "--save-weights", str(ws.root / "x.npz")],
        ("--save-weights", "is a folder"),
    ),
    (
        "explain-truncated-model",
        "explain",
        lambda ws: ["explain", TEXT, "--no-files", "--model", str(ws.model)],
        ("model.safetensors",),
    ),
    (
        "explain-huge-scale",
        "explain",
        lambda ws: ["explain", TEXT, "--no-files", "--baseline-scale", "1e38"],
        ("--baseline-scale",),
    ),
    (
        "explain-zero-scale",
        "explain",
        lambda ws: ["explain", TEXT, "--no-files", "--baseline-scale", "0"],
        ("--baseline-scale",),
    ),
    # compare: the baseline scale, a damaged model, markup in a failing call
    (
        "compare-huge-scale",
        "compare",
        lambda ws: ["compare", TEXT, "a river bank", "--word", "bank", "--baseline-scale=1e308"],
        ("--baseline-scale",),
    ),
    (
        "compare-negative-scale",
        "compare",
        lambda ws: ["compare", TEXT, "a river bank", "--word", "bank", "--baseline-scale=-1"],
        ("--baseline-scale",),
    ),
    (
        "compare-garbage-tokenizer",
        "compare",
        lambda ws: [
            "compare",
            TEXT,
            "a bank",
            "--word",
            "bank",
            "--model",
            str(ws.broken_model("m-tok", lambda d: (d / "tokenizer.json").write_text("{"))),
        ],
        ("tokenizer.json",),
    ),
    (
        "compare-markup",
        "compare",
        lambda ws: ["compare", TEXT, f"a {MARKUP} bank", "--word", MARKUP],
        ("TEXT_A",),
    ),
    # similarity: a sentence without words, a damaged model
    (
        "similarity-zero-width",
        "similarity",
        lambda ws: ["similarity", "one", "\u200b"],
        ("sentence 2",),
    ),
    (
        "similarity-truncated-model",
        "similarity",
        lambda ws: ["similarity", "a", "b", "--model", str(ws.model)],
        ("model.safetensors",),
    ),
    # bench: its output folder, refused before any timing
    ("bench-out-file", "bench", lambda ws: ["bench", "--quick", "--out", str(ws.file)], ("--out",)),
    (
        "bench-out-under-file",
        "bench",
        lambda ws: ["bench", "--quick", "--out", str(ws.file / f"b{MARKUP}")],
        ("--out", f"b{MARKUP}"),
    ),
]

# Valid inputs holding markup or emoji codes: printed as typed, exit 0.
SHOWN = [
    ("walkthrough", lambda ws: ["walkthrough", f"a {MARKUP} :smile: b"], f"'{MARKUP}', ':smile:'"),
    (
        "explain",
        lambda ws: ["explain", "a b", "--no-files", "--model", str(ws.markup_model)],
        f"m{MARKUP}",
    ),
    ("compare", lambda ws: ["compare", f"x {MARKUP} bank", "a bank", "--word", "bank"], MARKUP),
    ("similarity", lambda ws: ["similarity", f"a {MARKUP} :smile:", "b"], f"{MARKUP} :smile:"),
]


def _assert_one_error_line(code: int, out: str, err: str, needles: tuple[str, ...]) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    assert err.startswith("qkv: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize(
    ("command", "argv", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_user_mistakes_are_one_error_line(ws, capsys, command, argv, needles):
    args = argv(ws)
    assert args[0] == command
    code = main(args)
    captured = capsys.readouterr()
    _assert_one_error_line(code, captured.out, captured.err, needles)


@pytest.mark.parametrize(("command", "argv", "shown"), SHOWN, ids=[s[0] for s in SHOWN])
def test_markup_in_valid_input_is_printed_as_typed(ws, capsys, command, argv, shown):
    args = argv(ws)
    assert args[0] == command
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert shown in captured.out


def test_markup_in_output_paths_is_printed_as_typed(ws, capsys):
    out = ws.root / "explained" / MARKUP  # a folder "explained/[" holding "x]"
    code = main(["explain", f"a {MARKUP} b", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out / "explorer.html") in captured.out
    assert (out / "explorer.html").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; /proc covers it")
def test_read_only_out_folder(ws, capsys):
    locked = ws.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for argv in (
            ["explain", TEXT, "--out", str(locked / "x")],
            ["train", *TINY, "--out", str(locked / "run")],
            ["bench", "--quick", "--out", str(locked)],
        ):
            code = main(argv)
            captured = capsys.readouterr()
            _assert_one_error_line(code, captured.out, captured.err, ("--out", "locked"))
    finally:
        locked.chmod(0o755)


def test_every_command_is_covered():
    group = typer.main.get_command(app)
    registered = set(group.list_commands(click.Context(group)))
    assert {c[1] for c in CASES} == registered
    assert {s[0] for s in SHOWN} <= registered


def test_the_installed_command_prints_no_traceback(ws):
    """The console script itself (not just main() in this process): one line, status 2."""
    broken = ws.broken_run("sub-state", _garbage_state)
    for argv, needle in (
        (["train", *TINY, "--resume", "--out", str(broken)], "state.json"),
        (["explain", f"a {MARKUP} b", "--out", str(ws.file)], "--out"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "qkv.cli.app", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        _assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, (needle,))


# -- training leftovers (point 11) --------------------------------------------------------
def test_resume_removes_temporaries_of_killed_writers(ws, capsys):
    run = ws.broken_run("leftovers")
    dead_pid = 2**22 + 7  # above Linux's default pid_max: no live process has it
    stale_ckpt = run / "checkpoints" / f".tmp-step_0000003-{dead_pid}"
    stale_ckpt.mkdir()
    (stale_ckpt / "model.safetensors").write_bytes(b"half written")
    stale_file = run / f".metrics.jsonl.tmp-{dead_pid}"
    stale_file.write_text("{}\n")
    foreign = run / "notes.tmp-1"  # not a name qkv writes: left alone
    foreign.write_text("mine\n")
    assert main(["train", *TINY, "--resume", "--out", str(run)]) == 0
    capsys.readouterr()
    assert not stale_ckpt.exists() and not stale_file.exists()
    assert foreign.exists()


def test_resuming_a_finished_run_changes_nothing(ws, capsys):
    run = ws.root / "finished"
    shutil.copytree(ws.run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", *TINY, "--resume", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "test loss" in out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    tests = [r for r in T.read_metrics(run / "metrics.jsonl") if r["split"] == "test"]
    assert len(tests) == 1


def test_resume_after_a_kill_between_test_record_and_results_writes_one_test_record(ws, capsys):
    # Killed after the last checkpoint and the test line, before results.json.
    run = ws.broken_run("almost")
    assert main(["train", *TINY, "--resume", "--out", str(run)]) == 0
    capsys.readouterr()
    tests = [r for r in T.read_metrics(run / "metrics.jsonl") if r["split"] == "test"]
    assert len(tests) == 1
    assert (run / "results.json").is_file()


def test_resuming_nothing_creates_nothing(ws, capsys):
    target = ws.root / "typo"
    assert main(["train", *TINY, "--resume", "--out", str(target)]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert not target.exists()
