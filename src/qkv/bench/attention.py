"""Attention kernels side by side: every qkv backend, PyTorch SDPA, and a naive version.

For each configuration (dtype x mode x causal x length L = S, shape (B, H, L, d)) the
implementations below run in one process, interleaved (see :mod:`qkv.bench.timing`):

* ``naive``: matmul, softmax, matmul written out here (materialises (B, H, L, S));
* ``torch.sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` called directly;
* ``qkv:<name>``: ``qkv.scaled_dot_product_attention(..., backend=name)`` for every
  backend in the registry (so a newly registered one is picked up with no edit here).

FLOP convention (stated in every output): forward = ``4 B H L S d`` (two matmuls of
``2 L S d`` each per head), halved when causal whatever the kernel actually computes;
forward+backward = 3.5 x forward (backward = 2.5 x forward: five matmuls instead of two).
GFLOP/s is that useful work per second; "% peak" divides it by this machine's measured
square-matmul rate in the same dtype.

Implementations that materialise the score matrix are skipped where their estimated
memory passes ``mem_limit_gib``; any implementation whose previous length extrapolates
(x (L/L_prev)^2) past ``max_call_s`` per call is skipped; each skip records its reason.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import backends as registered_backends
from ..backends import choose_backend, make_request
from ..functional import scaled_dot_product_attention
from . import pipeline
from .pipeline import load_text
from .timing import (
    DTYPES,
    MemoryMeter,
    fmt_ms,
    interleaved_timings,
    machine_info,
    matmul_peak_gflops,
)

__all__ = ["AttentionBenchConfig", "Impl", "implementations", "run", "targets", "write_outputs"]

MODES = ("fwd", "fwd+bwd")
BWD_FACTOR = 3.5  # forward+backward FLOPs / forward FLOPs
TARGET_BACKEND = "qkv:flash"
SDPA = "torch.sdpa"
AUTO = "qkv:auto"
#: "auto" may be at most this much slower than the better of SDPA and flash (issue 10).
AUTO_SLACK = 1.10
TARGET_L = 4096


@dataclass(frozen=True)
class AttentionBenchConfig:
    """What to run. Lengths are L = S; inputs are (batch, heads, L, head_dim).

    Attributes:
        lengths: sequence lengths, run in increasing order.
        causal: which of causal off/on to run.
        dtypes: names from ``float32``, ``bfloat16``, ``float16``.
        modes: ``fwd`` and/or ``fwd+bwd``.
        impls: only these implementation names (default: all).
        max_reps, min_reps, budget_s: rounds per configuration (see ``interleaved_timings``).
        max_call_s: skip an implementation whose extrapolated call time passes this.
        mem_limit_gib: skip score-materialising implementations estimated above this.
        check_max_len: up to this length, outputs are checked against a float64 reference
            run; above it, against ``torch.sdpa`` in the same dtype.
        min_sample_s: short calls are repeated so one timed sample lasts at least this.
        threads: torch threads (default: leave torch's choice).
        peak_sizes: square matmul sizes for the peak measurement.
    """

    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    causal: tuple[bool, ...] = (False, True)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    modes: tuple[str, ...] = MODES
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    impls: tuple[str, ...] | None = None
    max_reps: int = 5
    min_reps: int = 3
    budget_s: float = 20.0
    max_call_s: float = 40.0
    mem_limit_gib: float = 4.0
    check_max_len: int = 1024
    threads: int | None = None
    min_sample_s: float = 0.05
    peak_sizes: tuple[int, ...] = (1024, 2048)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "head_dim", "max_reps", "min_reps", "check_max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive integers, got {self.lengths!r}")
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad or not self.dtypes:
            raise ValueError(f"dtypes must be among {sorted(DTYPES)}, got {list(self.dtypes)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be among {list(MODES)}, got {list(self.modes)}")
        if not self.causal or any(not isinstance(c, bool) for c in self.causal):
            raise ValueError(f"causal must be a non-empty tuple of bools, got {self.causal!r}")
        for name in ("budget_s", "max_call_s", "mem_limit_gib"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        pipeline.check_rounds(self)


# ------------------------------------------------------------- implementations


def naive_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Textbook attention in the input dtype: (B, H, L, d) x3 -> (B, H, L, d)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, L, S)
    if causal:
        L, S = scores.shape[-2:]
        future = torch.ones(L, S, dtype=torch.bool).triu(S - L + 1)  # bottom-right aligned
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, L, d)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """PyTorch's fused kernel, called directly (L = S here, so its causal is ours)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@dataclass(frozen=True)
class Impl:
    """One implementation: ``fn(q, k, v, causal) -> out``.

    ``quadratic``: it materialises (B, H, L, S) score-sized buffers, so it is skipped
    where those would pass the memory limit. ``supports(q, k, v, causal)`` returns
    ``None`` or why it cannot run.
    """

    name: str
    fn: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    quadratic: bool = False
    supports: Callable[[Tensor, Tensor, Tensor, bool], str | None] = lambda q, k, v, c: None


def _qkv_impl(name: str) -> Impl:
    backend = registered_backends()[name]

    def fn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        return scaled_dot_product_attention(q, k, v, is_causal=causal, backend=name)

    def supports(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
        return backend.supports(make_request(q, k, v, is_causal=causal))

    # The reference is documented as O(L*S) memory; other backends are not assumed so.
    return Impl(f"qkv:{name}", fn, quadratic=name == "reference", supports=supports)


def _auto_impl() -> Impl:
    def fn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        return scaled_dot_product_attention(q, k, v, is_causal=causal, backend="auto")

    return Impl(AUTO, fn)


def implementations() -> list[Impl]:
    """The comparators, every qkv backend available here, and ``auto``, in that order."""
    impls = [Impl("naive", naive_attention, quadratic=True), Impl(SDPA, sdpa_attention)]
    names = [name for name, b in registered_backends().items() if b.available()]
    return impls + [_qkv_impl(name) for name in names] + [_auto_impl()]


def unavailable_backends() -> dict[str, str]:
    """Registered backends that cannot run in this process (e.g. GPU-only), by name."""
    return {n: b.description for n, b in registered_backends().items() if not b.available()}


def flops(B: int, H: int, L: int, S: int, d: int, causal: bool, mode: str) -> float:
    """Useful FLOPs of one call under the convention in the module docstring."""
    fwd = 4 * B * H * L * S * d * (0.5 if causal else 1.0)
    return fwd * (BWD_FACTOR if mode == "fwd+bwd" else 1.0)


def _score_bytes_estimate(B: int, H: int, L: int, S: int, mode: str) -> int:
    # float32 (B, H, L, S) buffers alive at once: scores, probabilities and a temporary
    # in the forward; the backward adds the gradient of the scores and of the probabilities.
    n_buffers = 3 if mode == "fwd" else 6
    return n_buffers * B * H * L * S * 4


# ------------------------------------------------------------------------- run


def _check(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> dict[str, float]:
    names = ("out", "dq", "dk", "dv")
    return {n: pipeline.max_abs(g, w) for n, g, w in zip(names, got, want, strict=False)}


def run(
    cfg: AttentionBenchConfig, log: Callable[[str], None] = pipeline.print_wrapped
) -> dict[str, Any]:
    """Run the grid; return everything as a JSON-ready dict."""
    return pipeline.run_report(SUITE, cfg, log)


def _run(cfg: AttentionBenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    t_start = time.perf_counter()
    machine = machine_info()
    log(
        f"machine: {machine['cpu_model']}, {machine['torch_threads']} threads, torch {machine['torch_version']}"
    )
    # The peak is measured before and after the grid and the higher figure is used: on a
    # shared machine one measurement can fall in a busy moment and understate it.
    peak_runs = {"start": _measure_peaks(cfg, log)}
    meter = MemoryMeter()
    impls = implementations()
    if cfg.impls is not None:
        unknown = sorted(set(cfg.impls) - {i.name for i in impls})
        if unknown:
            known = ", ".join(i.name for i in impls)
            raise ValueError(f"impls: unknown names {unknown}; known: {known}")
        impls = [i for i in impls if i.name in cfg.impls]

    records: list[dict[str, Any]] = []
    auto_choice: list[dict[str, Any]] = []
    for dtype in cfg.dtypes:
        for mode in cfg.modes:
            for causal in cfg.causal:
                gc.collect()  # cyclic garbage from earlier cases must not hold memory
                state = _Series()
                for L in sorted(cfg.lengths):
                    recs, auto = _run_case(cfg, impls, meter, dtype, mode, causal, L, state)
                    records += recs
                    auto_choice.append({**_case_key(cfg, dtype, mode, causal, L), "auto": auto})
                    line = [
                        f"{r['impl']} {fmt_ms(r['median_ms'])} ms"
                        for r in recs
                        if r["status"] == "ok"
                    ]
                    log(f"{dtype} {mode}{' causal' if causal else ''} L={L}: " + ", ".join(line))

    peak_runs["end"] = _measure_peaks(cfg, log)
    peaks = {n: max(run[n] for run in peak_runs.values()) for n in cfg.dtypes}
    for r in records:
        if r["status"] == "ok":
            r["pct_peak"] = 100 * r["gflops"] / peaks[r["dtype"]]
    return {
        "benchmark": "attention",
        "config": asdict(cfg),
        "machine": pipeline.machine_at_end(machine),
        "matmul_peak_gflops": peaks,
        "matmul_peak_runs": peak_runs,
        "memory_method": pipeline.memory_method(meter),
        "conventions": {
            "flops_fwd": "4*B*H*L*S*d, halved when causal",
            "flops_fwd_bwd": f"{BWD_FACTOR} x forward",
            "time": "median over interleaved rounds; each sample averages n_inner calls",
        },
        "unavailable_backends": unavailable_backends(),
        "auto_choice": auto_choice,
        "results": records,
        "targets": targets(records),
        "elapsed_s": time.perf_counter() - t_start,
    }


@dataclass
class _Series:
    """What one series (dtype, mode, causal; increasing L) remembers between lengths."""

    last: dict[str, tuple[int, float]] = field(default_factory=dict)  # impl -> (L, median s)
    failed: dict[str, str] = field(default_factory=dict)  # impl -> why it is not run again


def _case_key(cfg: AttentionBenchConfig, dtype: str, mode: str, causal: bool, L: int) -> dict:
    B, H, d = cfg.batch, cfg.heads, cfg.head_dim
    return dict(dtype=dtype, mode=mode, causal=causal, L=L, S=L, B=B, H=H, d=d)


def _measure_peaks(cfg: AttentionBenchConfig, log: Callable[[str], None]) -> dict[str, float]:
    peaks = {}
    for name in cfg.dtypes:
        peaks[name] = matmul_peak_gflops(DTYPES[name], sizes=cfg.peak_sizes)
        log(f"matmul peak {name}: {peaks[name]:.1f} GFLOP/s")
    return peaks


def _run_case(cfg, impls, meter, dtype, mode, causal, L, state: _Series):
    """Warm up, check and time every implementation on one case; records and auto's pick."""
    key = _case_key(cfg, dtype, mode, causal, L)
    g = torch.Generator().manual_seed(cfg.seed + L)
    shape = (cfg.batch, cfg.heads, L, cfg.head_dim)  # (B, H, L, d); S = L
    q, k, v, gout = (torch.randn(shape, generator=g).to(DTYPES[dtype]) for _ in range(4))
    # auto's choice for the request as timed: with gradients in forward+backward mode.
    grad = mode == "fwd+bwd"
    probe = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    auto = choose_backend(make_request(*probe, is_causal=causal)).name
    calls, skipped = {}, {}
    for impl in impls:
        reason = _skip_reason(impl, cfg, q, k, v, causal, mode, L, state)
        if reason is None:
            calls[impl.name] = _make_call(impl, q, k, v, gout, causal, mode)
        else:
            skipped[impl.name] = reason
    got: dict[str, tuple[Tensor, ...]] = {}
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        # Untimed warm-up: memory measurement, and the outputs kept for the check below
        # (long cases are checked against SDPA's, so all are needed at once).
        warmed = pipeline.warm_up_each(calls, meter, got.__setitem__)
        first_s, mem, errors = warmed.first_s, warmed.mem, warmed.errors
        for name in errors:
            state.failed[name] = f"failed at L={L}"
        want, against = _expected(cfg, q, k, v, gout, causal, mode, L, got)
        checks = {n: _check(out, want) for n, out in got.items()} if want else {}
        del got, want
        timings = interleaved_timings(
            calls,
            first_call_s=first_s,
            max_reps=cfg.max_reps,
            min_reps=cfg.min_reps,
            budget_s=cfg.budget_s,
            min_sample_s=cfg.min_sample_s,
        )
    fl = flops(cfg.batch, cfg.heads, L, L, cfg.head_dim, causal, mode)
    records = []
    for impl in impls:
        rec = {**key, "impl": impl.name}
        if impl.name in skipped:
            rec.update(status="skipped", reason=skipped[impl.name])
        elif impl.name in errors:
            rec.update(status="error", reason=errors[impl.name])
        else:
            t = timings[impl.name]
            state.last[impl.name] = (L, t.median_s)
            rec.update(
                status="ok",
                **pipeline.timing_fields(t),
                gflops=fl / t.median_s / 1e9,
                pct_peak=None,  # set once the peak is known (after the grid)
                mem_extra_mib=pipeline.mib(mem[impl.name]),
                check_against=against,
                check_max_abs=checks.get(impl.name),
            )
        records.append(rec)
    return records, auto


def _skip_reason(impl, cfg, q, k, v, causal, mode, L, state: _Series) -> str | None:
    if impl.name in state.failed:
        return state.failed[impl.name]
    try:
        why = impl.supports(q, k, v, causal)
    except (ValueError, TypeError) as err:
        why = f"request rejected: {err}"
    if why is not None:
        return why
    if impl.quadratic:
        need = _score_bytes_estimate(cfg.batch, cfg.heads, L, L, mode)
        if need > cfg.mem_limit_gib * 2**30:
            return (
                f"materialises (B, H, L, S): about {need / 2**30:.1f} GiB "
                f"> limit {cfg.mem_limit_gib:g} GiB"
            )
    if impl.name in state.last:
        L0, t0 = state.last[impl.name]
        guess = t0 * (L / L0) ** 2
        if guess > cfg.max_call_s:
            return (
                f"about {guess:.0f} s per call (from {t0:.1f} s at L={L0}) "
                f"> limit {cfg.max_call_s:g} s"
            )
    return None


def _make_call(impl: Impl, q, k, v, gout, causal: bool, mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        return lambda: (impl.fn(q, k, v, causal),)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def fwd_bwd() -> tuple[Tensor, ...]:
        for t in (qg, kg, vg):
            t.grad = None  # every call allocates its gradients, as a training step does
        out = impl.fn(qg, kg, vg, causal)
        out.backward(gout)
        return out.detach(), qg.grad, kg.grad, vg.grad

    return fwd_bwd


def _expected(cfg, q, k, v, gout, causal, mode, L, got):
    """What every output is compared with: float64 reference (short) or SDPA (long)."""
    if cfg.check_max_len >= L:
        call = _make_call(
            _qkv_impl("reference"), *(t.double() for t in (q, k, v, gout)), causal, mode
        )
        return call(), "float64 qkv reference"
    if SDPA in got:
        return got[SDPA], f"{SDPA} in the same dtype"
    return None, None


# --------------------------------------------------------------------- targets


def _find(records, impl, **where) -> dict[str, Any] | None:
    for r in records:
        if r["impl"] == impl and r["status"] == "ok" and all(r[k] == v for k, v in where.items()):
            return r
    return None


def targets(records: list[dict[str, Any]], L: int = TARGET_L) -> list[dict[str, Any]]:
    """The issue's performance targets, computed from the measurements.

    Speed ratios are ``SDPA ms / flash ms`` (higher is better); the memory ratio is
    ``flash MiB / SDPA MiB`` (lower is better).
    """
    specs = [
        ("float32 forward speed vs SDPA", "float32", "fwd", False, "speed", 1.0),
        ("float32 forward+backward speed vs SDPA", "float32", "fwd+bwd", False, "speed", 1.5),
        ("float32 causal forward speed vs SDPA", "float32", "fwd", True, "speed", 1.2),
        ("float32 causal forward+backward speed vs SDPA", "float32", "fwd+bwd", True, "speed", 1.5),
        ("float32 forward peak extra memory / SDPA's", "float32", "fwd", False, "memory", 2.0),
        (
            "float32 forward+backward peak extra memory / SDPA's",
            "float32",
            "fwd+bwd",
            False,
            "memory",
            2.0,
        ),
        ("bfloat16 forward speed vs SDPA bfloat16", "bfloat16", "fwd", False, "speed", 1.0),
    ]
    out = []
    for title, dtype, mode, causal, kind, goal in specs:
        row = {"target": title, "L": L, "goal": goal, "kind": kind}
        where = dict(dtype=dtype, mode=mode, causal=causal, L=L)
        mine, ref = _find(records, TARGET_BACKEND, **where), _find(records, SDPA, **where)
        if mine is None or ref is None:
            missing = TARGET_BACKEND if mine is None else SDPA
            row.update(ratio=None, met=None, note=f"not measured: no {missing} result here")
        elif kind == "speed":
            ratio = ref["median_ms"] / mine["median_ms"]
            row.update(
                ratio=ratio, met=ratio >= goal, ms=mine["median_ms"], sdpa_ms=ref["median_ms"]
            )
        else:
            a, b = mine["mem_extra_mib"], ref["mem_extra_mib"]
            ratio = None if a is None or not b else a / b
            row.update(ratio=ratio, met=None if ratio is None else ratio <= goal, mib=a, sdpa_mib=b)
        out.append(row)
    for short in (512, 1024):
        mine = _find(records, TARGET_BACKEND, dtype="float32", mode="fwd", causal=False, L=short)
        ref = _find(records, SDPA, dtype="float32", mode="fwd", causal=False, L=short)
        row = {"target": f"float32 forward speed vs SDPA at L={short}", "L": short, "goal": 1.0}
        row["kind"] = "speed"
        if mine is None or ref is None:
            row.update(ratio=None, met=None, note="not measured here")
        else:
            ratio = ref["median_ms"] / mine["median_ms"]
            row.update(
                ratio=ratio, met=ratio >= 1.0, ms=mine["median_ms"], sdpa_ms=ref["median_ms"]
            )
        out.append(row)
    return out


def auto_check(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: ``auto``'s time over the better of SDPA and flash (goal <= AUTO_SLACK)."""
    rows = []
    for r in records:
        if r["impl"] != AUTO or r["status"] != "ok":
            continue
        where = {k: r[k] for k in ("dtype", "mode", "causal", "L")}
        best = [
            x["median_ms"]
            for x in (_find(records, SDPA, **where), _find(records, TARGET_BACKEND, **where))
            if x is not None
        ]
        if best:
            ratio = r["median_ms"] / min(best)
            rows.append({**where, "auto_ms": r["median_ms"], "best_ms": min(best), "ratio": ratio})
    return rows


# --------------------------------------------------------------------- outputs


def _fmt_cell(r: dict[str, Any]) -> str:
    if r["status"] != "ok":
        return "—"
    mem = "n/a" if r["mem_extra_mib"] is None else f"{r['mem_extra_mib']:.0f} MiB"
    return f"{fmt_ms(r['median_ms'])} ms · {r['gflops']:.0f} GF/s ({r['pct_peak']:.0f}%) · {mem}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: machine, conventions, targets, one table per configuration."""
    m, cfg = report["machine"], report["config"]
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in report["matmul_peak_gflops"].items())
    lines = [
        "# Attention benchmark",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, {m['ram_gib']} GiB RAM; "
        f"torch {m['torch_version']} ({m['torch_cpu_capability']}; flags {', '.join(m.get('cpu_flags', [])) or 'n/a'}), {m['torch_threads']} threads; "
        f"{m['started']}. Load average (1/5/15 min) at start {load_text(m['load_average_at_start'])}, "
        f"at end {load_text(m['load_average_at_end'])}: the machine is shared, so expect noise; "
        "every figure is a median of interleaved rounds.",
        "",
        f"Measured matmul peak (best square matmul, the higher of a measurement before and "
        f"one after the grid): {peaks}. A figure above 100% means the machine was busier "
        "while the peak was measured than during that case.",
        "",
        f"Shape: B={cfg['batch']}, H={cfg['heads']}, d={cfg['head_dim']}, S = L. "
        f"FLOPs: forward {report['conventions']['flops_fwd']}; forward+backward "
        f"{report['conventions']['flops_fwd_bwd']}. Cells: median time · useful GFLOP/s "
        f"(% of the matmul peak in that dtype) · peak extra memory ({report['memory_method']}).",
        "",
        *(
            [
                "Registered backends not available here (not timed): "
                + ", ".join(f"`{n}` ({d})" for n, d in report["unavailable_backends"].items())
                + ".",
                "",
            ]
            if report["unavailable_backends"]
            else []
        ),
        "## Targets",
        "",
        f"`{TARGET_BACKEND}` against `{SDPA}` at L = S = {TARGET_L}; speed = SDPA time / flash "
        "time (higher is better), memory = flash / SDPA (lower is better).",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        goal = f"≥ {t['goal']}x" if t["kind"] == "speed" else f"≤ {t['goal']}x"
        if t["ratio"] is None:
            lines.append(f"| {t['target']} | {goal} | {t.get('note', 'n/a')} | — |")
            continue
        if t["kind"] == "speed":
            detail = f"{t['ratio']:.2f}x ({t['ms']:.0f} ms vs {t['sdpa_ms']:.0f} ms)"
        else:
            detail = f"{t['ratio']:.2f}x ({t['mib']:.0f} MiB vs {t['sdpa_mib']:.0f} MiB)"
        lines.append(f"| {t['target']} | {goal} | {detail} | {'yes' if t['met'] else 'NO'} |")
    records = report["results"]
    impl_names = list(dict.fromkeys(r["impl"] for r in records))
    for dtype in cfg["dtypes"]:
        for mode in cfg["modes"]:
            for causal in cfg["causal"]:
                rows = [
                    r
                    for r in records
                    if (r["dtype"], r["mode"], r["causal"]) == (dtype, mode, causal)
                ]
                if not rows:
                    continue
                title = f"{dtype}, {'forward' if mode == 'fwd' else 'forward+backward'}"
                lines += ["", f"## {title}{', causal' if causal else ''}", ""]
                lines.append("| L | " + " | ".join(f"`{n}`" for n in impl_names) + " |")
                lines.append("|---|" + "---|" * len(impl_names))
                for L in sorted({r["L"] for r in rows}):
                    cells = {r["impl"]: _fmt_cell(r) for r in rows if r["L"] == L}
                    lines.append(
                        f"| {L} | " + " | ".join(cells.get(n, "") for n in impl_names) + " |"
                    )
                notes = [r for r in rows if r["status"] != "ok"]
                by_reason: dict[tuple[str, str], list[int]] = {}
                for r in notes:
                    by_reason.setdefault((r["impl"], r["reason"].split(" (from")[0]), []).append(
                        r["L"]
                    )
                if by_reason:
                    lines.append("")
                for (impl, reason), Ls in by_reason.items():
                    status = (
                        "failed"
                        if any(r["status"] == "error" and r["impl"] == impl for r in notes)
                        else "skipped"
                    )
                    lines.append(f"- `{impl}` {status} at L = {', '.join(map(str, Ls))}: {reason}")
    lines += [
        "",
        f'`backend="auto"` chose: {_auto_summary(report["auto_choice"])}.',
        "",
        _auto_check_line(auto_check(records)),
        "",
        f"Total benchmark time: {report['elapsed_s'] / 60:.1f} min. "
        "Raw samples, correctness checks and `auto`'s choice per case: `attention.json`.",
        "",
    ]
    return "\n".join(lines)


def _auto_check_line(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "`auto` was not timed in this run."
    worst = max(rows, key=lambda r: r["ratio"])
    over = [r for r in rows if r["ratio"] > AUTO_SLACK]
    where = f"{worst['dtype']} {worst['mode']}{' causal' if worst['causal'] else ''} L={worst['L']}"
    return (
        f"`auto` against the better of `{SDPA}` and `{TARGET_BACKEND}`: worst {worst['ratio']:.2f}x "
        f"({where}); {len(over)} of {len(rows)} cases above the {AUTO_SLACK:.2f}x goal."
    )


def _auto_summary(choices: list[dict[str, Any]]) -> str:
    """``auto``'s picks, one phrase per dtype (per series only where they differ)."""
    parts = []
    for dtype in dict.fromkeys(c["dtype"] for c in choices):
        mine = [c for c in choices if c["dtype"] == dtype]
        names = set(c["auto"] for c in mine)
        if len(names) == 1:
            parts.append(f"{dtype}: `{names.pop()}` everywhere")
            continue
        series: dict[str, list[str]] = {}
        for c in mine:
            tag = f"{c['mode']}{' causal' if c['causal'] else ''}"
            series.setdefault(tag, []).append(f"`{c['auto']}` at {c['L']}")
        parts += [f"{dtype} {tag}: {', '.join(v)}" for tag, v in series.items()]
    return "; ".join(parts)


def render_plot(report: dict[str, Any], path: Path) -> None:
    """GFLOP/s and peak extra memory against L, one panel per dtype x mode x causal."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    cfg, records = report["config"], report["results"]
    cols = [(m, c) for m in cfg["modes"] for c in cfg["causal"]]
    rows = [(dt, what) for what in ("gflops", "mem_extra_mib") for dt in cfg["dtypes"]]
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(4 * len(cols), 3 * len(rows)), squeeze=False
    )
    impl_names = list(dict.fromkeys(r["impl"] for r in records))
    for i, (dtype, what) in enumerate(rows):
        for j, (mode, causal) in enumerate(cols):
            ax = axes[i][j]
            for name in impl_names:
                pts = [
                    (r["L"], r[what])
                    for r in records
                    if r["impl"] == name
                    and r["status"] == "ok"
                    and r[what] is not None
                    and (r["dtype"], r["mode"], r["causal"]) == (dtype, mode, causal)
                ]
                if pts:
                    xs, ys = zip(*sorted(pts), strict=True)
                    ax.plot(xs, ys, marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["lengths"], [str(n) for n in cfg["lengths"]], fontsize=7)
            ax.minorticks_off()
            if what == "mem_extra_mib":
                ax.set_yscale("log")
            ax.set_title(f"{dtype} {mode}{' causal' if causal else ''}", fontsize=9)
            ax.set_xlabel("L = S")
            ax.set_ylabel("GFLOP/s" if what == "gflops" else "peak extra MiB")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"qkv attention benchmark: B={cfg['batch']}, H={cfg['heads']}, d={cfg['head_dim']} "
        f"({report['machine']['cpu_model']}, {report['machine']['torch_threads']} threads)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out_dir: Path, stem: str = "attention") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``."""
    return pipeline.write_outputs(SUITE, report, out_dir, stem)


#: The suite as :mod:`qkv.bench.pipeline` runs it (``qkv bench --suite attention``).
SUITE = pipeline.Suite("attention", "attention", _run, render_markdown, render_plot)
