"""Training runs: exact resume after SIGKILL, determinism, divergence, atomic checkpoints."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qkv.cli.app import main
from qkv.train import trainer as T
from qkv.train.trainer import TIMING_KEYS, TrainConfig, latest_checkpoint, read_metrics, train

# A run that takes a few seconds: small model, short sequences, frequent checkpoints.
SMALL = dict(
    steps=40,
    batch_size=16,
    d_model=32,
    num_heads=2,
    eval_every=10,
    eval_examples=64,
    test_examples=64,
    log_every=5,
    checkpoint_every=10,
)
# One thread: with the machine shared, torch's thread pool oversubscribes and crawls.
ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()] + ["--threads=1"]


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"  # bitwise
    assert _without_timing(read_metrics(a / "metrics.jsonl")) == _without_timing(
        read_metrics(b / "metrics.jsonl")
    )
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra == rb


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    args = ["train", "--task", "sort", *ARGS, "--no-progress"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "qkv.cli.app", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        # Wait for the second checkpoint, then kill without warning.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            ckpt = latest_checkpoint(killed)
            if ckpt is not None and ckpt.name >= "step_0000020":
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed; make it longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = int(latest_checkpoint(killed).name.removeprefix("step_"))
    assert 20 <= stopped_at < SMALL["steps"]
    assert not (killed / "results.json").exists()

    # Resume through the same command (in this process), and run once without a break.
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    capsys.readouterr()
    _assert_same_run(killed, tmp_path / "straight")
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(5, SMALL["steps"] + 1, 5))  # no record lost or repeated


def test_in_process_resume_and_determinism(tmp_path, monkeypatch):
    cfg = TrainConfig("reverse", **SMALL)
    train(cfg, tmp_path / "a", progress=False, threads=1)
    train(cfg, tmp_path / "b", progress=False, threads=1)
    _assert_same_run(tmp_path / "a", tmp_path / "b")  # same seed, same run

    # Interrupt at the start of step 21 (after the step-20 checkpoint), then resume.
    real_lr = T.lr_at

    def interrupt(step, cfg):
        if step == 20:
            raise KeyboardInterrupt
        return real_lr(step, cfg)

    partial = tmp_path / "partial"
    monkeypatch.setattr(T, "lr_at", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, partial, progress=False, threads=1)
    monkeypatch.setattr(T, "lr_at", real_lr)
    assert latest_checkpoint(partial).name == "step_0000020"
    train(cfg, partial, resume=True, progress=False, threads=1)
    _assert_same_run(partial, tmp_path / "a")

    train(TrainConfig("reverse", **{**SMALL, "seed": 1}), tmp_path / "c", progress=False, threads=1)
    assert not torch.equal(
        _weights(tmp_path / "a")["tok_emb.weight"], _weights(tmp_path / "c")["tok_emb.weight"]
    )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = T._token_losses

    def poisoned(logits, labels):
        out = real(logits, labels)
        if poisoned.calls >= 25:
            out = out * float("nan")
        poisoned.calls += 1
        return out

    poisoned.calls = 0
    monkeypatch.setattr(T, "_token_losses", poisoned)
    cfg = TrainConfig("sort", **SMALL)
    with pytest.raises(T.TrainingDiverged, match=r"loss became nan at step 2\d;.*step_0000020"):
        train(cfg, tmp_path / "run", progress=False, threads=1)
    good = latest_checkpoint(tmp_path / "run")
    assert good.name == "step_0000020"
    assert all(torch.isfinite(w).all() for w in load_file(str(good / "model.safetensors")).values())
    assert not (tmp_path / "run" / "results.json").exists()


def test_cli_reports_divergence_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(T, "_token_losses", lambda logits, labels: logits.sum(-1) * math.inf)
    code = main(["train", "--task", "sort", *ARGS, "--no-progress", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("qkv: error: training diverged") and err.count("\n") == 1
    assert "no checkpoint had been written yet" in err


def test_checkpoint_files_and_refusals(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--task", "sort", *ARGS, "--no-progress", "--out", str(run)])
    assert code == 0
    assert "answer accuracy" in capsys.readouterr().out
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_0000030", "step_0000040"]  # the two newest are kept
    files = sorted(p.name for p in (run / "checkpoints" / "step_0000040").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "state.json"]
    opt = load_file(str(run / "checkpoints" / "step_0000040" / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") for k in opt) and "rng.torch" in opt
    # No pickles anywhere, and no temporary leftovers.
    names = [p.name for p in run.rglob("*")]
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl")) or "tmp" in n]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["attention"] == "trainable" and config["task_kind"] == "seq"
    # An existing run is not overwritten, and a resume must not change the settings.
    assert main(["train", "--task", "sort", *ARGS, "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--task", "sort", *ARGS, "--lr=0.01", "--out", str(run), "--resume"]) == 2
    assert "differ in ['lr']" in capsys.readouterr().err
    assert main(["train", "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "task must be one of" in capsys.readouterr().err
    assert (
        main(["train", "--task", "sort", "--attention", "learned", "--out", str(tmp_path / "y")])
        == 2
    )
    assert "attention variant" in capsys.readouterr().err


def test_learning_rate_schedule():
    cfg = TrainConfig("sort", steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [T.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # decays monotonically
    assert lrs[-1] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig("sort", lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig("sort", steps=0)
