"""Two torchrun processes (gloo, CPU) take the same steps as one process with the same batch;
so do 2 and 4 processes that split each sequence with ``--context-parallel 2``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qkv.cli.app import main
from qkv.train.trainer import TIMING_KEYS, latest_checkpoint, read_metrics

ARGS = [
    "train",
    "--task=reverse",
    "--steps=12",
    "--warmup=2",
    "--batch-size=16",
    "--d-model=32",
    "--num-heads=2",
    "--log-every=1",
    "--eval-every=6",
    "--eval-examples=64",
    "--test-examples=64",
    "--checkpoint-every=6",
    "--no-progress",
    "--device=cpu",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run, split):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in read_metrics(run / "metrics.jsonl")
        if r["split"] == split
    ]


def _torchrun(nproc: int, args: list[str], out) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only: the test needs no network
    }
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "qkv.cli.app",
        *args,
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.timeout(600)
def test_two_processes_match_one(tmp_path, capsys):
    ddp_run, single = tmp_path / "ddp", tmp_path / "single"
    _torchrun(2, ARGS, ddp_run)
    assert main([*ARGS, "--threads=1", "--out", str(single)]) == 0
    capsys.readouterr()

    a, b = _records(ddp_run, "train"), _records(single, "train")
    assert [r["step"] for r in a] == list(range(1, 13)) == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["lr"] == rb["lr"]
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * max(1.0, abs(rb["loss"])), (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * max(1.0, rb["grad_norm"])
    # The loss really moved, so matching trajectories mean something.
    assert b[-1]["loss"] < b[0]["loss"] - 0.1
    for va, vb in zip(_records(ddp_run, "val"), _records(single, "val"), strict=True):
        assert abs(va["loss"] - vb["loss"]) <= 1e-5 * max(1.0, vb["loss"])
    wa = load_file(str(latest_checkpoint(ddp_run) / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(single) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)
    results = json.loads((ddp_run / "results.json").read_text())
    assert results["steps"] == 12


# A decoder on reverse: its sequences have several lengths, most of them not a multiple
# of 2 x 2 (zigzag chunks), so the padding of context-parallel shards is exercised too.
CP_ARGS = [
    *(a for a in ARGS if not a.startswith(("--steps", "--eval-every", "--checkpoint-every"))),
    "--model=decoder",
    "--steps=8",
    "--eval-every=8",
    "--checkpoint-every=8",
]


@pytest.fixture(scope="module")
def single_decoder_run(tmp_path_factory):
    single = tmp_path_factory.mktemp("cp") / "single"
    assert main([*CP_ARGS, "--threads=1", "--out", str(single)]) == 0
    return single


@pytest.mark.timeout(600)
@pytest.mark.parametrize("nproc", [2, 4], ids=["cp2", "cp2xdp2"])
def test_context_parallel_matches_one_process(nproc, tmp_path, single_decoder_run, capsys):
    run = tmp_path / f"cp{nproc}"
    _torchrun(nproc, [*CP_ARGS, "--context-parallel=2"], run)
    capsys.readouterr()
    a, b = _records(run, "train"), _records(single_decoder_run, "train")
    assert [r["step"] for r in a] == list(range(1, 9)) == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(rb["loss"]), (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * rb["grad_norm"], (ra, rb)
    # The loss moved, so equal trajectories mean equal gradients, not equal nothing.
    assert min(r["loss"] for r in b[1:]) < b[0]["loss"] - 0.1
    (va,) = _records(run, "val")
    (vb,) = _records(single_decoder_run, "val")
    assert abs(va["loss"] - vb["loss"]) <= 1e-5 * vb["loss"]
    wa = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(single_decoder_run) / "model.safetensors"))
    # Gradients agree to float32 rounding (1e-15 in float64); AdamW divides each by its
    # own running size, so a weight whose gradient is ~0 can move by ~1e-5 more or less.
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-4, msg=name)


def test_batch_must_split_evenly(tmp_path, monkeypatch):
    from qkv.train import ddp
    from qkv.train.trainer import TrainConfig, _train

    info = ddp.DistInfo(rank=0, world_size=3)
    cfg = TrainConfig("reverse", steps=2, batch_size=16)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        _train(cfg, tmp_path / "r", False, False, 1, info)
