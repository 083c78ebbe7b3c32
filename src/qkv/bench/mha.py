"""The multi-head attention comparison: many ways to write one causal MHA layer.

Every comparator computes the same function, ``out_proj(concat_h softmax(causal(q_h
k_hᵀ / sqrt(d_k))) v_h)`` with ``q = x W_Qᵀ + b_Q`` (and likewise k, v), because all of
them load one shared set of weights (:class:`MHAWeights`); :func:`check_agreement`
verifies it. Default size: B=8, L=1024, d_model=768, H=12 (d_k = 64), causal.

Comparators (all written here, except the library modules they wrap):

* ``single-head wrapper``: H :class:`qkv.SelfAttention` causal heads, outputs concatenated;
* ``classic``: separate q/k/v projections, then matmul, mask, softmax, matmul by hand;
* ``combined QKV``: one Linear producing q, k and v, then the same manual math;
* ``einsum``: projections and attention written as einsum contractions;
* ``torch SDPA (is_causal)`` / ``torch SDPA (mask)``: combined QKV + PyTorch's SDPA,
  with its causal flag or with an explicit boolean mask;
* ``nn.MultiheadAttention`` with its default ``need_weights=True`` and with
  ``need_weights=False`` (both given a causal ``attn_mask``);
* ``qkv MHA [<backend>]``: :class:`qkv.MultiHeadAttention` with ``backend="auto"`` and
  with every registered backend.

Forward is timed under ``torch.no_grad()`` with modules in eval mode (what inference
does; it lets ``nn.MultiheadAttention`` take its fused fast path where it can);
forward+backward back-propagates a fixed random gradient to the input and all weights.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..backends import backends as registered_backends
from ..modules import MultiHeadAttention, SelfAttention
from . import pipeline
from .pipeline import load_text
from .timing import DTYPES, MemoryMeter, fmt_ms, interleaved_timings, machine_info

__all__ = [
    "MHABenchConfig",
    "MHAWeights",
    "build_comparators",
    "check_agreement",
    "run",
    "write_outputs",
]

MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class MHABenchConfig:
    """What to run: one (batch, length, d_model) input through H-head causal attention.

    Attributes:
        batch, length, d_model, heads: sizes (B, L, d_model, H); d_k = d_model / H.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        modes: ``fwd`` and/or ``fwd+bwd``.
        impls: only these comparator names (default: all).
        max_reps, min_reps, budget_s, long_round_s: rounds (see
            :func:`qkv.bench.timing.interleaved_timings`).
        min_sample_s: short calls are repeated so one timed sample lasts at least this.
        threads: torch threads (default: torch's choice).
    """

    batch: int = 8
    length: int = 1024
    d_model: int = 768
    heads: int = 12
    dtype: str = "float32"
    modes: tuple[str, ...] = MODES
    impls: tuple[str, ...] | None = None
    max_reps: int = 5
    min_reps: int = 3
    budget_s: float = 90.0
    long_round_s: float = 60.0
    threads: int | None = None
    min_sample_s: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "length", "d_model", "heads", "max_reps", "min_reps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"modes must be among {list(MODES)}, got {list(self.modes)}")
        if not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s!r}")
        pipeline.check_rounds(self)


# --------------------------------------------------------------------- weights


@dataclass
class MHAWeights:
    """One set of MHA weights in ``nn.Linear`` layout (out_features, in_features).

    ``wq, wk, wv, wo``: (d_model, d_model); ``bq, bk, bv, bo``: (d_model,).
    Rows ``h * d_k : (h + 1) * d_k`` of ``wq``/``wk``/``wv`` belong to head ``h``.
    """

    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    bq: Tensor
    bk: Tensor
    bv: Tensor
    bo: Tensor

    @classmethod
    def random(cls, d_model: int, seed: int = 0) -> MHAWeights:
        g = torch.Generator().manual_seed(seed)
        bound = d_model**-0.5  # nn.Linear's default init range
        w = [(torch.rand(d_model, d_model, generator=g) * 2 - 1) * bound for _ in range(4)]
        b = [(torch.rand(d_model, generator=g) * 2 - 1) * bound for _ in range(4)]
        return cls(*w, *b)


@torch.no_grad()
def _set_linear(lin: nn.Linear, weight: Tensor, bias: Tensor) -> None:
    lin.weight.copy_(weight)
    lin.bias.copy_(bias)


def _load_projections(module: nn.Module, w: MHAWeights) -> None:
    """Copy ``w`` into ``module``'s ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``."""
    for name, wt, b in zip(
        ("q_proj", "k_proj", "v_proj", "out_proj"),
        (w.wq, w.wk, w.wv, w.wo),
        (w.bq, w.bk, w.bv, w.bo),
        strict=True,
    ):
        _set_linear(getattr(module, name), wt, b)


def _causal_allowed(L: int) -> Tensor:
    return torch.ones(L, L, dtype=torch.bool).tril()  # (L, L): True = may attend


def _manual_attention(q: Tensor, k: Tensor, v: Tensor, blocked: Tensor) -> Tensor:
    """(B, H, L, d_k) x3 -> (B, H, L, d_k): matmul, mask, softmax, matmul."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    scores = scores.masked_fill(blocked, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, H, L, d_k)


def _merge_heads(ctx: Tensor) -> Tensor:
    B, H, L, d = ctx.shape
    return ctx.transpose(1, 2).reshape(B, L, H * d)  # (B, L, d_model)


# ----------------------------------------------------------------- comparators


class SingleHeadWrapper(nn.Module):
    """H independent single-head causal modules; their outputs are concatenated."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        d_k = d_model // heads
        self.heads = nn.ModuleList(
            SelfAttention(d_model, d_k, bias=True, causal=True) for _ in range(heads)
        )
        self.out_proj = nn.Linear(d_model, d_model)

    def load(self, w: MHAWeights) -> None:
        d_k = w.wq.shape[0] // len(self.heads)
        for h, head in enumerate(self.heads):
            rows = slice(h * d_k, (h + 1) * d_k)
            _set_linear(head.q_proj, w.wq[rows], w.bq[rows])
            _set_linear(head.k_proj, w.wk[rows], w.bk[rows])
            _set_linear(head.v_proj, w.wv[rows], w.bv[rows])
        _set_linear(self.out_proj, w.wo, w.bo)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(torch.cat([head(x) for head in self.heads], dim=-1))  # (B, L, d_model)


class ClassicMHA(nn.Module):
    """Separate W_Q, W_K, W_V projections, heads split by view, attention by hand."""

    def __init__(self, d_model: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.register_buffer("blocked", ~_causal_allowed(max_len), persistent=False)

    def load(self, w: MHAWeights) -> None:
        _load_projections(self, w)

    def forward(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        split = lambda t: t.view(B, L, self.heads, -1).transpose(1, 2)  # noqa: E731  (B, H, L, d_k)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        ctx = _manual_attention(q, k, v, self.blocked[:L, :L])
        return self.out_proj(_merge_heads(ctx))


class CombinedQKV(nn.Module):
    """One Linear (d_model -> 3 d_model) gives q, k and v; ``attend`` does the rest."""

    def __init__(self, d_model: int, heads: int, max_len: int, attend: str = "manual") -> None:
        super().__init__()
        self.heads, self.attend = heads, attend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.register_buffer("allowed", _causal_allowed(max_len), persistent=False)

    def load(self, w: MHAWeights) -> None:
        _set_linear(self.qkv, torch.cat([w.wq, w.wk, w.wv]), torch.cat([w.bq, w.bk, w.bv]))
        _set_linear(self.out_proj, w.wo, w.bo)

    def forward(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, -1)  # (B, L, 3, H, d_k)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, d_k)
        if self.attend == "manual":
            ctx = _manual_attention(q, k, v, ~self.allowed[:L, :L])
        elif self.attend == "sdpa_causal":
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # "sdpa_mask"
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed[:L, :L])
        return self.out_proj(_merge_heads(ctx))


class EinsumMHA(nn.Module):
    """Projections and attention as einsum contractions over named axes."""

    def __init__(self, d_model: int, heads: int, max_len: int) -> None:
        super().__init__()
        d_k = d_model // heads
        self.w_qkv = nn.Parameter(torch.empty(3, heads, d_k, d_model))  # (3, H, d_k, d_model)
        self.b_qkv = nn.Parameter(torch.empty(3, heads, 1, d_k))
        self.w_o = nn.Parameter(torch.empty(d_model, heads, d_k))  # (d_model, H, d_k)
        self.b_o = nn.Parameter(torch.empty(d_model))
        self.register_buffer("blocked", ~_causal_allowed(max_len), persistent=False)

    @torch.no_grad()
    def load(self, w: MHAWeights) -> None:
        H, d_k = self.w_qkv.shape[1:3]
        self.w_qkv.copy_(torch.stack([w.wq, w.wk, w.wv]).view(3, H, d_k, -1))
        self.b_qkv.copy_(torch.stack([w.bq, w.bk, w.bv]).view(3, H, 1, d_k))
        self.w_o.copy_(w.wo.view(-1, H, d_k))
        self.b_o.copy_(w.bo)

    def forward(self, x: Tensor) -> Tensor:
        L = x.shape[1]
        q, k, v = torch.einsum("bld,thkd->tbhlk", x, self.w_qkv) + self.b_qkv.unsqueeze(1)
        scores = torch.einsum("bhlk,bhsk->bhls", q, k) / math.sqrt(q.shape[-1])  # (B, H, L, S)
        p = torch.softmax(scores.masked_fill(self.blocked[:L, :L], float("-inf")), dim=-1)
        ctx = torch.einsum("bhls,bhsk->bhlk", p, v)  # (B, H, L, d_k)
        return torch.einsum("bhlk,ehk->ble", ctx, self.w_o) + self.b_o  # (B, L, d_model)


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` (batch first) with a causal ``attn_mask``."""

    def __init__(self, d_model: int, heads: int, max_len: int, need_weights: bool) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.mha = nn.MultiheadAttention(d_model, heads, batch_first=True)
        # torch's boolean attn_mask is inverted: True = may NOT attend.
        self.register_buffer("blocked", ~_causal_allowed(max_len), persistent=False)

    @torch.no_grad()
    def load(self, w: MHAWeights) -> None:
        self.mha.in_proj_weight.copy_(torch.cat([w.wq, w.wk, w.wv]))
        self.mha.in_proj_bias.copy_(torch.cat([w.bq, w.bk, w.bv]))
        _set_linear(self.mha.out_proj, w.wo, w.bo)

    def forward(self, x: Tensor) -> Tensor:
        L = x.shape[1]
        mask = self.blocked[:L, :L]
        return self.mha(x, x, x, attn_mask=mask, need_weights=self.need_weights)[0]


class QkvMHA(nn.Module):
    """:class:`qkv.MultiHeadAttention` with a given backend (``"auto"`` included)."""

    def __init__(self, d_model: int, heads: int, backend: str) -> None:
        super().__init__()
        self.mha = MultiHeadAttention(d_model, heads, causal=True, backend=backend)

    def load(self, w: MHAWeights) -> None:
        _load_projections(self.mha, w)

    def forward(self, x: Tensor) -> Tensor:
        return self.mha(x)


def build_comparators(
    d_model: int, heads: int, max_len: int, weights: MHAWeights
) -> dict[str, nn.Module]:
    """Every comparator by name, all loaded with ``weights`` (float32, eval mode)."""
    mods: dict[str, nn.Module] = {
        "single-head wrapper": SingleHeadWrapper(d_model, heads),
        "classic": ClassicMHA(d_model, heads, max_len),
        "combined QKV": CombinedQKV(d_model, heads, max_len, "manual"),
        "einsum": EinsumMHA(d_model, heads, max_len),
        "torch SDPA (is_causal)": CombinedQKV(d_model, heads, max_len, "sdpa_causal"),
        "torch SDPA (mask)": CombinedQKV(d_model, heads, max_len, "sdpa_mask"),
        "nn.MultiheadAttention": TorchMHA(d_model, heads, max_len, need_weights=True),
        "nn.MultiheadAttention (need_weights=False)": TorchMHA(
            d_model, heads, max_len, need_weights=False
        ),
    }
    for name in ["auto", *(n for n, b in registered_backends().items() if b.available())]:
        mods[f"qkv MHA [{name}]"] = QkvMHA(d_model, heads, name)
    for m in mods.values():
        m.load(weights)
        m.eval()
    return mods


def is_qkv(name: str) -> bool:
    return name.startswith("qkv MHA")


# ------------------------------------------------------------------- agreement


def _fwd_bwd(module: nn.Module, x: Tensor, gout: Tensor) -> tuple[Tensor, Tensor]:
    xg = x.detach().requires_grad_(True)
    out = module(xg)
    out.backward(gout)
    return out.detach(), xg.grad


def check_agreement(
    mods: dict[str, nn.Module], x: Tensor, gout: Tensor, baseline: nn.Module
) -> dict[str, dict[str, float]]:
    """Max abs difference of each module's output and input gradient from ``baseline``'s.

    The baseline runs in float64 on ``x``; each module runs in its own dtype on
    ``x`` cast to that dtype. Returns ``{name: {"out": err, "dx": err}}``.
    """
    want_out, want_dx = _fwd_bwd(baseline.double(), x.double(), gout.double())
    errs = {}
    for name, m in mods.items():
        dtype = next(m.parameters()).dtype
        out, dx = _fwd_bwd(m, x.to(dtype), gout.to(dtype))
        errs[name] = {
            "out": float((out.double() - want_out).abs().max()),
            "dx": float((dx.double() - want_dx).abs().max()),
        }
    return errs


# ------------------------------------------------------------------------- run


def run(cfg: MHABenchConfig, log: Callable[[str], None] = pipeline.print_wrapped) -> dict[str, Any]:
    """Time every comparator (interleaved) and check they agree; JSON-ready dict."""
    return pipeline.run_report(SUITE, cfg, log)


def _run(cfg: MHABenchConfig, log: Callable[[str], None]) -> dict[str, Any]:
    t_start = time.perf_counter()
    machine = machine_info()
    dtype = DTYPES[cfg.dtype]
    B, L, D, H = cfg.batch, cfg.length, cfg.d_model, cfg.heads
    weights = MHAWeights.random(D, seed=cfg.seed)
    mods = build_comparators(D, H, L, weights)
    if cfg.impls is not None:
        unknown = sorted(set(cfg.impls) - set(mods))
        if unknown:
            raise ValueError(f"impls: unknown names {unknown}; known: {', '.join(mods)}")
        mods = {n: m for n, m in mods.items() if n in cfg.impls}
    mods = {n: m.to(dtype) for n, m in mods.items()}
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(B, L, D, generator=g).to(dtype)
    gout = torch.randn(B, L, D, generator=g).to(dtype)
    log(f"MHA comparison: B={B}, L={L}, d_model={D}, H={H}, {cfg.dtype}, causal")

    # What every warm-up result is compared with: the classic module in float64.
    baseline = ClassicMHA(D, H, L)
    baseline.load(weights)
    want = _fwd_bwd(baseline.double(), x.double(), gout.double())  # (out, dx)
    del baseline
    agreement: dict[str, dict[str, float]] = {}

    meter = MemoryMeter()
    records = []
    for mode in cfg.modes:
        gc.collect()  # cyclic garbage from set-up must not hold memory during the runs
        calls = {name: _make_call(m, x, gout, mode) for name, m in mods.items()}

        def agree(name: str, got: tuple[Tensor, ...]) -> None:
            # Checked at once, so only one comparator's output is alive at a time.
            for what, a, b in zip(("out", "dx"), got, want, strict=False):
                agreement.setdefault(name, {})[what] = pipeline.max_abs(a, b)

        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            warmed = pipeline.warm_up_each(calls, meter, agree)
            first_s, mem, errors = warmed.first_s, warmed.mem, warmed.errors
            timings = interleaved_timings(
                calls,
                first_call_s=first_s,
                max_reps=cfg.max_reps,
                min_reps=cfg.min_reps,
                budget_s=cfg.budget_s,
                long_round_s=cfg.long_round_s,
                min_sample_s=cfg.min_sample_s,
            )
        for name in mods:
            rec: dict[str, Any] = {"impl": name, "mode": mode}
            if name in errors:
                rec.update(status="error", reason=errors[name])
            else:
                t = timings[name]
                rec.update(
                    status="ok", **pipeline.timing_fields(t), mem_extra_mib=pipeline.mib(mem[name])
                )
            records.append(rec)
        ok = [r for r in records if r["mode"] == mode and r["status"] == "ok"]
        log(f"{mode}: " + ", ".join(f"{r['impl']} {fmt_ms(r['median_ms'])} ms" for r in ok))

    return {
        "benchmark": "mha_comparison",
        "config": asdict(cfg),
        "machine": pipeline.machine_at_end(machine),
        "memory_method": pipeline.memory_method(meter),
        "agreement_baseline": "classic comparator run in float64 with the same weights",
        "agreement": agreement,
        "results": records,
        "targets": targets(records),
        "elapsed_s": time.perf_counter() - t_start,
    }


def _make_call(module: nn.Module, x: Tensor, gout: Tensor, mode: str) -> Callable[[], Any]:
    """One timed call; returns (out,) or (out, dx) for the agreement check."""
    if mode == "fwd":
        return lambda: (module(x),)
    xg = x.detach().clone().requires_grad_(True)

    def fwd_bwd() -> tuple[Tensor, Tensor]:
        module.zero_grad(set_to_none=True)  # every call allocates its gradients
        xg.grad = None
        out = module(xg)
        out.backward(gout)
        return out.detach(), xg.grad

    return fwd_bwd


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: the fastest qkv.MultiHeadAttention vs the fastest other comparator.

    ``ratio`` = other's ms / qkv's ms; the target is >= 1 (at least as fast).
    """
    out = []
    for mode in dict.fromkeys(r["mode"] for r in records):
        ok = [r for r in records if r["mode"] == mode and r["status"] == "ok"]
        mine = min((r for r in ok if is_qkv(r["impl"])), key=lambda r: r["median_ms"], default=None)
        other = min(
            (r for r in ok if not is_qkv(r["impl"])), key=lambda r: r["median_ms"], default=None
        )
        row: dict[str, Any] = {"mode": mode, "goal": 1.0}
        if mine is None or other is None:
            row.update(ratio=None, met=None, note="not measured")
        else:
            ratio = other["median_ms"] / mine["median_ms"]
            row.update(
                ratio=ratio,
                met=ratio >= 1.0,
                qkv=mine["impl"],
                qkv_ms=mine["median_ms"],
                fastest_other=other["impl"],
                other_ms=other["median_ms"],
            )
        out.append(row)
    return out


# --------------------------------------------------------------------- outputs


def render_markdown(report: dict[str, Any]) -> str:
    m, cfg = report["machine"], report["config"]
    lines = [
        "# Multi-head attention comparison",
        "",
        f"B={cfg['batch']}, L={cfg['length']}, d_model={cfg['d_model']}, H={cfg['heads']} "
        f"(d_k={cfg['d_model'] // cfg['heads']}), causal, {cfg['dtype']}. Forward under "
        "`torch.no_grad()` in eval mode; forward+backward propagates to the input and all weights.",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs; torch {m['torch_version']}, "
        f"{m['torch_threads']} threads; {m['started']}. Load average at start "
        f"{load_text(m['load_average_at_start'])}, at end {load_text(m['load_average_at_end'])}: the "
        "machine is shared, so expect noise; times are medians of interleaved rounds. "
        f"Memory: {report['memory_method']}.",
        "",
        "## Target: qkv.MultiHeadAttention at least as fast as the fastest comparator",
        "",
        "| mode | fastest qkv | fastest other | ratio (other / qkv) | met |",
        "|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        if t["ratio"] is None:
            lines.append(f"| {t['mode']} | — | — | not measured | — |")
            continue
        lines.append(
            f"| {t['mode']} | `{t['qkv']}` {fmt_ms(t['qkv_ms'])} ms | `{t['fastest_other']}` "
            f"{fmt_ms(t['other_ms'])} ms | {t['ratio']:.2f}x | {'yes' if t['met'] else 'NO'} |"
        )
    modes = list(dict.fromkeys(r["mode"] for r in report["results"]))
    names = list(dict.fromkeys(r["impl"] for r in report["results"]))
    header = "| comparator | " + " | ".join(
        f"{'forward' if md == 'fwd' else 'forward+backward'} ms (× fastest) | extra MiB"
        for md in modes
    )
    lines += [
        "",
        "## Results",
        "",
        header + " | max abs diff: out / dx |",
        "|---|" + "---|---|" * len(modes) + "---|",
    ]
    best = {
        md: min(
            r["median_ms"] for r in report["results"] if r["mode"] == md and r["status"] == "ok"
        )
        for md in modes
    }
    for name in names:
        cells = []
        agree = report["agreement"].get(name)
        for md in modes:
            r = next(r for r in report["results"] if r["impl"] == name and r["mode"] == md)
            if r["status"] != "ok":
                cells += ["failed", "—"]
                continue
            mem = "n/a" if r["mem_extra_mib"] is None else f"{r['mem_extra_mib']:.0f}"
            cells += [f"{fmt_ms(r['median_ms'])} ({r['median_ms'] / best[md]:.2f}x)", mem]
        diff = "—" if agree is None else " / ".join(f"{agree[k]:.1e}" for k in agree)
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {diff} |")
    lines += [
        "",
        f"Differences are against the {report['agreement_baseline']}. "
        f"Total time: {report['elapsed_s'] / 60:.1f} min; raw samples in `mha_comparison.json`.",
        "",
    ]
    failed = [r for r in report["results"] if r["status"] != "ok"]
    for r in failed:
        lines.append(f"- `{r['impl']}` {r['mode']} failed: {r['reason']}")
    return "\n".join(lines) + ("\n" if failed else "")


def write_outputs(
    report: dict[str, Any], out_dir: Path, stem: str = "mha_comparison"
) -> list[Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir``."""
    return pipeline.write_outputs(SUITE, report, out_dir, stem)


#: The suite as :mod:`qkv.bench.pipeline` runs it (``qkv bench --suite mha``).
SUITE = pipeline.Suite("mha", "mha_comparison", _run, render_markdown)
