"""Smoke tests of the benchmarks: tiny grids, the output schema, and agreement.

No timing is asserted (timings belong in benchmarks/results/, not in tests); what is
asserted is that every implementation timed computes the same function as the
reference, that skips carry a reason, and that the files are written and consistent.
"""

from __future__ import annotations

import json

import pytest
import torch

import qkv
from qkv.bench import attention, mha
from qkv.bench.timing import torch_threads
from qkv.cli.app import main

RECORD_KEYS = {"dtype", "mode", "causal", "L", "S", "B", "H", "d", "impl", "status"}
OK_KEYS = {"median_ms", "samples_ms", "gflops", "pct_peak", "mem_extra_mib", "check_max_abs"}
# Max abs error vs the float64 reference, inputs ~N(0, 1): float32 is exact to ~1e-6;
# bfloat16 (8-bit mantissa) is allowed a few units of its 2^-8 rounding step.
TOL = {"float32": 1e-5, "bfloat16": 0.05}
# One thread and one call per sample: tiny inputs, and the machine is shared.
FAST = {"threads": 1, "min_sample_s": 0.0}


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_attention_report():
    cfg = attention.AttentionBenchConfig(
        lengths=(16, 33),
        heads=2,
        head_dim=8,
        budget_s=0.01,
        min_reps=1,
        max_reps=1,
        peak_sizes=(64,),
        **FAST,
    )
    threads = torch.get_num_threads()
    report = attention.run(cfg, log=_quiet)
    assert torch.get_num_threads() == threads  # restored after the run
    return report


def test_attention_report_schema(tiny_attention_report):
    rep = tiny_attention_report
    assert rep["benchmark"] == "attention"
    for key in ("cpu_model", "logical_cpus", "torch_version", "torch_threads"):
        assert rep["machine"][key] not in (None, "")
    assert set(rep["matmul_peak_gflops"]) == {"float32", "bfloat16"}
    assert all(v > 0 for v in rep["matmul_peak_gflops"].values())
    names = {r["impl"] for r in rep["results"]}
    # Every registered backend is in the grid, next to the two comparators.
    assert names == {"naive", "torch.sdpa", "qkv:auto", *(f"qkv:{n}" for n in qkv.backends())}
    # 2 dtypes x 2 modes x 2 causal x 2 lengths, each with every implementation.
    assert len(rep["results"]) == 16 * len(names)
    assert len(rep["auto_choice"]) == 16
    for r in rep["results"]:
        assert set(r) >= RECORD_KEYS, r
        assert r["status"] in ("ok", "skipped"), f"{r['impl']} failed: {r.get('reason')}"
        if r["status"] == "skipped":
            assert r["reason"]
            continue
        assert set(r) >= OK_KEYS, r
        assert r["median_ms"] > 0 and r["gflops"] > 0
        assert len(r["samples_ms"]) >= 1
    json.dumps(rep)  # JSON-ready as it is


def test_attention_every_implementation_matches_reference(tiny_attention_report):
    checked = 0
    for r in tiny_attention_report["results"]:
        if r["status"] != "ok":
            continue
        assert r["check_against"] == "float64 qkv reference"
        want = {"out"} if r["mode"] == "fwd" else {"out", "dq", "dk", "dv"}
        assert set(r["check_max_abs"]) == want
        for what, err in r["check_max_abs"].items():
            where = f"{r['impl']} {r['dtype']} {r['mode']} causal={r['causal']} L={r['L']} {what}"
            assert err <= TOL[r["dtype"]], f"{where}: error {err:.2e}"
        checked += 1
    assert checked >= 16 * 3  # naive, SDPA and at least one qkv backend everywhere


def test_attention_outputs_written(tiny_attention_report, tmp_path):
    paths = attention.write_outputs(tiny_attention_report, tmp_path)
    assert [p.name for p in paths] == ["attention.json", "attention.md", "attention.png"]
    assert json.loads(paths[0].read_text())["results"] == tiny_attention_report["results"]
    md = paths[1].read_text()
    assert "## Targets" in md and "## bfloat16, forward+backward, causal" in md
    assert "| 33 |" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_skips_carry_reasons():
    cfg = attention.AttentionBenchConfig(
        lengths=(32,),
        dtypes=("float32",),
        modes=("fwd",),
        causal=(False,),
        heads=2,
        head_dim=8,
        budget_s=0.01,
        min_reps=1,
        max_reps=1,
        peak_sizes=(64,),
        mem_limit_gib=1e-6,  # smaller than any score matrix
        **FAST,
    )
    rep = attention.run(cfg, log=_quiet)
    status = {r["impl"]: r for r in rep["results"]}
    for name in ("naive", "qkv:reference"):
        assert status[name]["status"] == "skipped"
        assert "GiB" in status[name]["reason"]
    assert status["torch.sdpa"]["status"] == "ok"


def _rec(impl, ms, mib, **where):
    return {"impl": impl, "status": "ok", "median_ms": ms, "mem_extra_mib": mib, **where}


def test_targets_ratios():
    where = dict(dtype="float32", mode="fwd", causal=False, L=4096)
    records = [_rec("qkv:flash", 100.0, 30.0, **where), _rec("torch.sdpa", 90.0, 10.0, **where)]
    rows = {t["target"]: t for t in attention.targets(records)}
    speed = rows["float32 forward speed vs SDPA"]
    assert speed["ratio"] == pytest.approx(0.9) and not speed["met"]  # goal 1.0x
    memory = rows["float32 forward peak extra memory / SDPA's"]
    assert memory["ratio"] == pytest.approx(3.0) and memory["met"] is False
    assert rows["bfloat16 forward speed vs SDPA bfloat16"]["ratio"] is None


def test_mha_comparators_compute_one_function():
    d_model, heads, L = 24, 3, 10
    weights = mha.MHAWeights.random(d_model, seed=3)
    mods = {n: m.double() for n, m in mha.build_comparators(d_model, heads, L, weights).items()}
    expected = {f"qkv MHA [{n}]" for n in ["auto", *qkv.backends()]}
    assert expected <= set(mods)
    assert len(mods) == 8 + len(expected)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, L, d_model, generator=g, dtype=torch.float64)
    gout = torch.randn(2, L, d_model, generator=g, dtype=torch.float64)
    baseline = mha.ClassicMHA(d_model, heads, L)
    baseline.load(weights)
    with torch_threads(1):
        errs = mha.check_agreement(mods, x, gout, baseline)
    for name, e in errs.items():
        assert e["out"] < 1e-12 and e["dx"] < 1e-12, (name, e)
    # The check can fail: a comparator with one perturbed weight is caught.
    with torch.no_grad():
        mods["einsum"].w_o[0, 1, 2] += 1e-3
    errs = mha.check_agreement({"einsum": mods["einsum"]}, x, gout, baseline)
    assert errs["einsum"]["out"] > 1e-6


def test_mha_bench_tiny_run(tmp_path):
    cfg = mha.MHABenchConfig(
        batch=2, length=8, d_model=24, heads=3, budget_s=0.01, min_reps=1, max_reps=1, **FAST
    )
    rep = mha.run(cfg, log=_quiet)
    assert {r["mode"] for r in rep["results"]} == {"fwd", "fwd+bwd"}
    for r in rep["results"]:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0
    for name, e in rep["agreement"].items():
        assert e["out"] < 1e-5 and e["dx"] < 1e-5, (name, e)
    assert [t["mode"] for t in rep["targets"]] == ["fwd", "fwd+bwd"]
    assert all(t["ratio"] > 0 for t in rep["targets"])
    json_path, md_path = mha.write_outputs(rep, tmp_path)
    assert json.loads(json_path.read_text())["agreement"] == rep["agreement"]
    assert "qkv MHA [auto]" in md_path.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--causal", "maybe"], "--causal must be one of"),
        (["--lengths", "12,x"], "--lengths"),
        (["--suite", "gpu"], "--suite must be one of"),
        (["--suite", "attention", "--dtypes", "float8"], "dtypes must be among"),
    ],
)
def test_cli_bench_rejects_bad_options(argv, message, capsys, tmp_path):
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv: error:") and message in err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def test_auto_check_compares_with_the_better_backend():
    where = dict(dtype="float32", mode="fwd", causal=False, L=1024)
    records = [
        _rec("qkv:flash", 100.0, 0.0, **where),
        _rec("torch.sdpa", 80.0, 0.0, **where),
        _rec("qkv:auto", 100.0, 0.0, **where),
    ]
    (row,) = attention.auto_check(records)
    assert row["ratio"] == pytest.approx(1.25) and row["best_ms"] == 80.0


def test_quick_runs_a_small_grid_and_user_options_win(monkeypatch, tmp_path):
    from qkv.cli.bench import run_bench

    seen = {}
    for module, key in ((attention, "attention"), (mha, "mha")):
        monkeypatch.setattr(module, "run", lambda cfg, key=key: seen.setdefault(key, cfg))
        monkeypatch.setattr(module, "write_outputs", lambda report, out: [])
    run_bench("all", quick=True, out=tmp_path)
    att, m = seen["attention"], seen["mha"]
    assert att.lengths == (256,) and att.budget_s <= 1.0 and att.max_reps <= 3
    assert m.length <= 256 and m.batch == 1 and m.budget_s <= 1.0
    seen.clear()
    run_bench("all", quick=True, out=tmp_path, max_reps=1, lengths="128")
    assert seen["attention"].max_reps == 1 and seen["attention"].lengths == (128,)
    assert seen["mha"].max_reps == 1


def test_durations_are_stated_once_the_same_way():
    """The quick benchmark's measured duration reads the same wherever it is given."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = ["README.md", "benchmarks/README.md", "src/qkv/cli/bench.py", "Makefile"]
    text = {f: (root / f).read_text() for f in files}
    for f in files[:3]:
        assert "50 s" in text[f] and "2.4 min" in text[f], f
    for f, t in text.items():
        for stale in ("25 min", "20 min", "~22 + ~5", "~1-2 min", "about a minute (a smoke"):
            assert stale not in t, (f, stale)
