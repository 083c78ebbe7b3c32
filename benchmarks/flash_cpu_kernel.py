"""Compiled flash CPU kernel vs torch.nn.functional.scaled_dot_product_attention.

Shape legend: B batch · H heads · L query length · S key length · d head width.

Cases (B=1, H=8, d=64, L=S): float32 forward, causal forward, forward+backward and
causal forward+backward at 512/1024/4096; bfloat16 forward and forward+backward at
1024/4096; float16 forward at 1024/4096; a sliding window of 256 keys (lo=-255, hi=0) at L=8192 against SDPA given
the equivalent dense (L, S) bool mask. Both sides run in this process with the same
thread count, interleaved round by round; the median of the rounds is reported.
GFLOP/s count 4*B*H*L*S*d per forward (the allowed fraction of L*S for causal and the
window) and 3.5x the forward for forward+backward (7 GEMMs instead of 2). "of sgemm" is
our GFLOP/s divided by the thread count times a measured single-thread float32 GEMM
of the kernel's tile shape (128 x 512 x 64, the rate MKL reaches on one core);
"of_fma_peak" divides by the nominal FMA peak (threads x clock x lanes x 2 x 2 units).
Last, the cost of exact weights for all rows against a forward without weights.

    python benchmarks/flash_cpu_kernel.py            # full table, ~2 min on 2 cores
    python benchmarks/flash_cpu_kernel.py --quick    # fewer rounds and no 4096

Writes benchmarks/results/flash_cpu_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qkv._cpu import cpu_mhz, cpu_model, isa_flags
from qkv.backends.flash import compiled


def _time(fn, rounds_out: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    rounds_out.append(time.perf_counter() - t0)


def _sgemm_gflops(rounds: int = 5) -> float:
    """Single-thread float32 GEMM rate of the forward's score tile shape (128 x 512 x 64)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b, c = torch.randn(128, 64), torch.randn(512, 64).t(), torch.empty(128, 512)
        reps = 400
        for _ in range(20):
            torch.mm(a, b, out=c)
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            ts.append((time.perf_counter() - t0) / reps)
        return 2 * 128 * 512 * 64 / statistics.median(ts) / 1e9
    finally:
        torch.set_num_threads(threads)


def _fma_peak_gflops(threads: int) -> dict:
    """Nominal float32 FMA peak: threads x clock x SIMD lanes x 2 FLOPs x 2 FMA units.

    The clock is /proc/cpuinfo's "cpu MHz" (the current, not the turbo, clock) and two
    FMA units per core is an assumption (true for recent Xeon/EPYC cores); both are
    recorded so the figure can be redone.
    """
    mhz = cpu_mhz()
    lanes = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 4)
    peak = None if mhz is None else threads * mhz / 1e3 * lanes * 2 * 2
    return {"cpu_mhz": mhz, "fp32_lanes": lanes, "fma_units_assumed": 2, "gflops": peak}


def _weights_cost(L: int, rounds: int, B: int = 1, H: int = 8, d: int = 64) -> dict:
    """Exact weights of all rows (need_weights=True on "flash") against a forward without."""
    import qkv

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, d, generator=g) for _ in range(3))

    def plain():
        qkv.scaled_dot_product_attention(q, k, v, backend="flash")

    def with_weights():
        qkv.scaled_dot_product_attention(q, k, v, backend="flash", need_weights=True)

    plain(), with_weights()
    t_plain: list[float] = []
    t_w: list[float] = []
    with torch.no_grad():
        for _ in range(rounds):
            _time(plain, t_plain)
            _time(with_weights, t_w)
    a, b = statistics.median(t_plain), statistics.median(t_w)
    return {"L": L, "forward_ms": a * 1e3, "with_weights_ms": b * 1e3, "ratio": b / a}


def _allowed_fraction(L: int, lo: int | None, hi: int | None) -> float:
    """Share of the L x L (query, key) pairs inside the band lo <= j - i <= hi."""
    i = torch.arange(L, dtype=torch.float64)
    first = (i + lo).clamp(min=0) if lo is not None else torch.zeros(L, dtype=torch.float64)
    end = (i + hi + 1).clamp(max=L) if hi is not None else torch.full((L,), float(L))
    return float((end - first).clamp(min=0).sum()) / (L * L)


def _case(
    kind: str, L: int, dtype: torch.dtype, rounds: int, B: int = 1, H: int = 8, d: int = 64
) -> dict:
    """One row: kind in {"fwd", "causal", "fwd+bwd", "causal+bwd", "window256"};
    q, k, v (B, H, L, d)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, d, generator=g).to(dtype) for _ in range(3))
    causal = kind.startswith("causal")
    lo, hi = (-255, 0) if kind == "window256" else (None, 0 if causal else None)
    # SDPA gets the window as the equivalent dense bool mask (True = may attend).
    dense = None
    if kind == "window256":
        j_minus_i = torch.arange(L)[None, :] - torch.arange(L)[:, None]
        dense = (j_minus_i >= lo) & (j_minus_i <= hi)
    backward = kind.endswith("+bwd")
    if backward:
        do = torch.randn(B, H, L, d, generator=g).to(dtype)

        def ours():
            out, lse = compiled.forward(q, k, v, lo=lo, hi=hi)
            compiled.backward(q, k, v, out, do, lse, lo=lo, hi=hi)

        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))

        def sdpa():
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
            out.backward(do)
            for x in (qs, ks, vs):
                x.grad = None
    else:

        def ours():
            compiled.forward(q, k, v, lo=lo, hi=hi, need_lse=False)

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=causal)

    ours()  # warm up (thread pools, first-touch pages)
    sdpa()
    t_ours: list[float] = []
    t_sdpa: list[float] = []
    with torch.enable_grad() if backward else torch.no_grad():
        for _ in range(rounds):
            _time(ours, t_ours)
            _time(sdpa, t_sdpa)
    flops = 4.0 * B * H * L * L * d * _allowed_fraction(L, lo, hi) * (3.5 if backward else 1.0)
    mo, ms = statistics.median(t_ours), statistics.median(t_sdpa)
    return {
        "case": kind,
        "dtype": str(dtype).removeprefix("torch."),
        "B": B,
        "H": H,
        "L": L,
        "S": L,
        "d": d,
        "ours_ms": mo * 1e3,
        "sdpa_ms": ms * 1e3,
        "speedup": ms / mo,
        "ours_gflops": flops / mo / 1e9,
        "sdpa_gflops": flops / ms / 1e9,
        "rounds": rounds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, no L=4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results") / "flash_cpu_kernel.json"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not compiled.available():
        raise SystemExit(f"compiled kernel unavailable: {compiled.build_error()}")

    lengths = [512, 1024] if args.quick else [512, 1024, 4096]
    rounds = 3 if args.quick else 7
    kinds = ("fwd", "causal", "fwd+bwd", "causal+bwd")
    plan = [(kind, L, torch.float32) for kind in kinds for L in lengths]
    half_lengths = [1024] if args.quick else [1024, 4096]
    plan += [(kind, L, torch.bfloat16) for kind in ("fwd", "fwd+bwd") for L in half_lengths]
    plan += [("fwd", L, torch.float16) for L in half_lengths]
    plan += [("window256", 2048 if args.quick else 8192, torch.float32)]
    sgemm = _sgemm_gflops()
    fma = _fma_peak_gflops(torch.get_num_threads())
    print(f"single-thread sgemm (128x512x64): {sgemm:.1f} GFLOP/s; FMA peak {fma}")
    rows = []
    print(
        f"{'case':10} {'dtype':9} {'L':>5} {'ours ms':>9} {'sdpa ms':>9} {'x sdpa':>7} "
        f"{'GFLOP/s':>8} {'sdpa GF/s':>9} {'of sgemm':>8}"
    )
    for kind, L, dtype in plan:
        r = _case(kind, L, dtype, max(3, rounds if L < 4096 else rounds - 2))
        r["of_sgemm"] = r["ours_gflops"] / (sgemm * torch.get_num_threads())
        r["of_fma_peak"] = None if fma["gflops"] is None else r["ours_gflops"] / fma["gflops"]
        rows.append(r)
        print(
            f"{r['case']:10} {r['dtype']:9} {L:5d} {r['ours_ms']:9.2f} {r['sdpa_ms']:9.2f} "
            f"{r['speedup']:7.2f} {r['ours_gflops']:8.1f} {r['sdpa_gflops']:9.1f} "
            f"{r['of_sgemm']:8.2f}",
            flush=True,
        )
    weights = _weights_cost(1024 if args.quick else 4096, 3 if args.quick else 5)
    print(
        f"exact weights, all rows, L={weights['L']}: {weights['with_weights_ms']:.1f} ms vs "
        f"{weights['forward_ms']:.1f} ms without ({weights['ratio']:.2f}x; goal <= 2x)"
    )
    meta = {
        "cpu": cpu_model(),
        "cpu_flags": isa_flags(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "has_bf16_dot": compiled.has_bf16_dot(),
        "has_fp16_dot": compiled.has_fp16_dot(),
        "vec_width": compiled.vec_width(),
        "blas": compiled.blas_info(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "sgemm_1thread_gflops": sgemm,
        "fma_peak": fma,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"meta": meta, "results": rows, "weights_cost": weights}, indent=2) + "\n"
    )
    print(json.dumps(meta))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
