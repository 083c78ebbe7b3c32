"""Ring attention over 2 and 4 gloo processes equals single-process float64 attention.

One process group per world size is spawned once (``tests/ring_cases.py`` runs the whole
grid inside it and writes JSON); the tests below judge those results case by case:
output and q/k/v gradients of every rank's shard against qkv's reference backend in
float64 (fp32 within 1e-5 of the reference's scale), for causal and non-causal
attention, sliding windows, GQA, d_v != d_k, both layouts, shard lengths down to 1,
L != S with empty rows, the PyTorch-level fallback kernel, a loss through
``gather_sequence`` and rings over sub-groups; then argument errors and the shard /
gather round trip. A NCCL run on CUDA is skipped without GPUs.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

import qkv.distributed as qd
from qkv.backends.flash import compiled
from ring_cases import cases, worker

WORLDS = (2, 4)
_REPORTS: dict[tuple[int, str], list[dict]] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reports(world: int, tmp_path_factory, device: str = "cpu") -> list[dict]:
    """Every rank's report of one spawned group (spawned on first use, then reused)."""
    key = (world, device)
    if key not in _REPORTS:
        # Build (or find) the compiled kernel here first: otherwise every spawned process
        # would wait on the build lock in turn when the cache is cold.
        compiled.available()
        folder = tmp_path_factory.mktemp(f"ring{world}{device}")
        mp.spawn(worker, args=(world, _free_port(), str(folder), device), nprocs=world)
        _REPORTS[key] = [
            json.loads((folder / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world)
        ]
    return _REPORTS[key]


def _check_case(reports: list[dict], key: str) -> None:
    for rank, report in enumerate(reports):
        result = report["cases"][key]
        assert "crash" not in result, f"rank {rank}:\n{result.get('crash')}"
        tol = 1e-10 if result["case"]["dtype"] == "float64" else 1e-5
        assert result["finite"], f"rank {rank}: NaN or inf in the output or gradients"
        assert result["out_dtype"] == result["case"]["dtype"]
        assert result["ref_scale"] > 1e-3, "the reference is ~0: the comparison proves nothing"
        bad = {name: err for name, err in result["errors"].items() if not err <= tol}
        assert not bad, f"rank {rank}: relative errors above {tol}: {bad}"


CASE_KEYS = [f"{c.layout}-{c.name}" for c in cases()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("key", CASE_KEYS)
def test_ring_matches_reference(world, key, tmp_path_factory):
    _check_case(_reports(world, tmp_path_factory), key)


# Each bad argument: the exception type and words its message must contain.
EXPECTED_ERRORS = {
    "q_2d": ("ValueError", ["q", "(4, 8)"]),
    "k_width": ("ValueError", ["d_k"]),
    "v_length": ("ValueError", ["k and v", "S=5"]),
    "gqa_not_enabled": ("ValueError", ["enable_gqa"]),
    "q_int": ("TypeError", ["q", "int64"]),
    "layout_name": ("ValueError", ["layout", "spiral"]),
    "layout_type": ("TypeError", ["layout"]),
    "window_zero": ("ValueError", ["window"]),
    "scale_negative": ("ValueError", ["scale"]),
    "group_type": ("TypeError", ["group"]),
    "zigzag_odd_shard": ("ValueError", ["shard length 3", "world size 2"]),
    "shard_uneven": ("ValueError", ["length 5", "world size 2"]),
    "shard_zigzag_uneven": ("ValueError", ["length 6", "world size 2", "multiple of 4"]),
    "shard_dim": ("ValueError", ["dim=4"]),
    "gather_dim": ("ValueError", ["dim=-5"]),
    "gather_zigzag_odd": ("ValueError", ["shard length 3", "world size 2"]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_bad_arguments_raise_naming_them(case, tmp_path_factory):
    kind, words = EXPECTED_ERRORS[case]
    for report in _reports(2, tmp_path_factory):
        got = report["errors"][case]
        assert got["type"] == kind, got
        for word in words:
            assert word in got["message"], got


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_shard_gather_round_trip(world, tmp_path_factory):
    reports = _reports(world, tmp_path_factory)
    for report in reports:
        trip = report["round_trip"]
        assert trip["contiguous"] and trip["zigzag"]
    # Rank 0 of the zigzag layout holds chunk 0 and chunk 2W - 1 (chunks of 2).
    last = 2 * world - 1
    assert reports[0]["round_trip"]["zigzag_rank_chunks"] == [0, 1, 2 * last, 2 * last + 1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", WORLDS)
def test_trainer_shards_give_one_process_gradients(world, tmp_path_factory):
    # The trainer's context-parallel path (padding, zigzag shards, global positions,
    # ring attention in every layer) in float64: the summed gradients are exact.
    for report in _reports(world, tmp_path_factory):
        assert report["decoder"] <= 1e-12


def test_needs_a_process_group():
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="init_process_group"):
        qd.ring_attention(x, x, x)
    with pytest.raises(ValueError, match="init_process_group"):
        qd.shard_sequence(x, -2)


def test_local_checks_come_before_the_group():
    # Shapes are refused even where no group exists: the mistake is reported, not the setup.
    with pytest.raises(ValueError, match="d_k"):
        qd.ring_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 5))
    with pytest.raises(ValueError, match="layout"):
        qd.ring_attention(*(torch.randn(1, 2, 4, 8),) * 3, layout="striped")


def test_segments_partition_the_sequence():
    for layout in qd.LAYOUTS:
        for world in (1, 2, 3, 4):
            n = 4
            covered = sorted(
                p
                for r in range(world)
                for a, b in qd.segments(layout, r, world, n)
                for p in range(a, b)
            )
            assert covered == list(range(world * n)), (layout, world)


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL ring on GPUs)")
def test_ring_on_cuda_with_nccl(tmp_path_factory):
    """The same code over NCCL, one GPU per rank (one GPU: a ring of one, no P2P)."""
    world = min(2, torch.cuda.device_count())
    reports = _reports(world, tmp_path_factory, device="cuda")
    keys = sorted(reports[0]["cases"])
    assert keys, "no case ran on CUDA"
    for key in keys:
        _check_case(reports, key)
