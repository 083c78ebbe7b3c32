"""GPU benchmark of the ``"triton"`` backend against PyTorch SDPA and a naive version.

Shape legend: B batch · H heads · L query length · S key/value length (L = S here) ·
d head width (d_k = d_v).

Usage (on a CUDA machine; see docs/triton.md for the exact H100 commands)::

    python benchmarks/triton_gpu.py                     # full sweep, about 10 minutes
    python benchmarks/triton_gpu.py --head-dims 128 --lengths 8192 16384
    python benchmarks/triton_gpu.py --quick             # smoke run: 2 lengths, fwd only
    python benchmarks/triton_gpu.py --compile-report    # no GPU needed: sm_90 build report

What is timed, for bf16, d in {64, 128}, L in {1024 .. 16384}, causal on/off, forward
and forward+backward (B * L = 16384 tokens and H * d = 2048, as in the
FlashAttention-2 paper's benchmark):

* ``triton`` — ``qkv.scaled_dot_product_attention(..., backend="triton")``;
* ``sdpa:flash`` / ``sdpa:efficient`` / ``sdpa:cudnn`` / ``sdpa:math`` — PyTorch's
  ``scaled_dot_product_attention`` pinned to each of its kernels with
  ``torch.nn.attention.sdpa_kernel`` (a kernel that refuses the inputs is recorded
  as unsupported, one that runs out of memory as OOM);
* ``naive`` — qkv's ``"reference"`` backend: matmul, float32 softmax, matmul, with the
  (B, H, L, S) score matrix in memory.

A second table times boolean masks, the case where SDPA leaves its flash kernel:
``padding`` (B, 1, 1, S) key padding, and ``dense`` (B, 1, L, S) causal + padding
given as one boolean tensor (no structural shortcut for either implementation).

FLOP convention (the same as ``qkv.bench``): forward = 4 B H L S d, halved when
causal; forward+backward = 3.5 x forward. TFLOP/s divide that useful work by the
median time (``triton.testing.do_bench``, CUDA events). "% peak" divides by the dense
bf16 tensor-core peak of the device from the table below (H100 SXM: 989 TFLOP/s); the
rate of an 8192^3 bf16 matmul measured on the same device is reported beside it.

Output: ``benchmarks/results/gpu/triton_<device>.json`` and ``.md`` (device name,
versions, every timing); re-running with a subset of cases updates those entries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

import qkv  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu"
TOKENS, WIDTH = 16384, 2048  # B * L and H * d, held fixed across the sweep
LENGTHS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)

#: Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets,
#: matched against torch.cuda.get_device_name() in order (first match wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)

SDPA_KERNELS = ("flash", "efficient", "cudnn", "math")


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def flops(B: int, H: int, L: int, S: int, d: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * B * H * L * S * d * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ----------------------------------------------------------------------- implementations


def sdpa_fn(kernel: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[kernel]

    def fn(q, k, v, causal, mask):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    return fn


def qkv_fn(backend: str):
    def fn(q, k, v, causal, mask):
        return qkv.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, backend=backend
        )

    return fn


def implementations(names: list[str]) -> dict:
    impls = {"triton": qkv_fn("triton")}
    impls.update({f"sdpa:{k}": sdpa_fn(k) for k in SDPA_KERNELS})
    impls["naive"] = qkv_fn("reference")
    return {n: f for n, f in impls.items() if n in names}


# ----------------------------------------------------------------------- timing


def time_case(fn, q, k, v, causal, mask, mode):
    """Median ms of one call (fwd) or of call + backward (fwd_bwd); and the fwd output."""
    from triton.testing import do_bench

    if mode == "fwd":
        with torch.no_grad():
            out = fn(q, k, v, causal, mask)  # warm-up: compiles and autotunes
            ms = do_bench(
                lambda: fn(q, k, v, causal, mask), warmup=25, rep=100, return_mode="median"
            )
        return ms, out
    dout = torch.randn_like(q)
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

    def step():
        fn(qg, kg, vg, causal, mask).backward(dout)

    step()
    ms = do_bench(step, warmup=25, rep=100, grad_to_none=[qg, kg, vg], return_mode="median")
    return ms, None


def run_case(impls, d, L, causal, mode, mask_kind, dtype, device):
    """Time every implementation on one configuration; returns result rows."""
    H = WIDTH // d
    B = max(1, TOKENS // L)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(B, H, L, d, device=device, dtype=dtype, generator=g) for _ in range(3)
    )  # (B, H, L, d)
    mask = None
    if mask_kind != "none":
        lengths = torch.randint(L // 2, L + 1, (B,), device=device, generator=g)
        keep = torch.arange(L, device=device)[None, :] < lengths[:, None]  # (B, S)
        if mask_kind == "padding":
            mask = keep[:, None, None, :]  # (B, 1, 1, S)
        else:
            causal_part = torch.ones(L, L, dtype=torch.bool, device=device).tril()
            mask = (keep[:, None, None, :] & causal_part).contiguous()  # (B, 1, L, S)
    ref = None
    if mode == "fwd":
        # Accuracy check: every forward output against SDPA's default choice, run in
        # float32 (the math kernel may OOM on the longest lengths: then no check).
        try:
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal
                )
        except torch.cuda.OutOfMemoryError:
            ref = None
    rows = []
    for name, fn in impls.items():
        row = {
            "impl": name, "d": d, "L": L, "B": B, "H": H, "causal": causal, "mode": mode,
            "mask": mask_kind, "dtype": str(dtype).removeprefix("torch."),
        }  # fmt: skip
        torch.cuda.empty_cache()
        try:
            ms, out = time_case(fn, q, k, v, causal, mask, mode)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except (RuntimeError, ValueError) as e:  # SDPA: "No available kernel", etc.
            row["status"] = "unsupported: " + str(e).strip().splitlines()[0][:120]
        else:
            row.update(status="ok", ms=ms)
            row["tflops"] = flops(B, H, L, L, d, causal or mask_kind == "dense", mode) / ms / 1e9
            if ref is not None and out is not None:
                row["max_abs_err_vs_fp32"] = (out.float() - ref).abs().max().item()
        out = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def matmul_tflops(device, n: int = 8192) -> float:
    from triton.testing import do_bench

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    return 2 * n**3 / ms / 1e9


# ----------------------------------------------------------------------- reports


def write_reports(data: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    peak = data["peak_bf16_tflops"]
    lines = [
        f"# Triton attention on {data['device']}",
        "",
        f"torch {data['torch']}, triton {data['triton']}, CUDA {data['cuda']}; "
        f"dense bf16 peak {peak or 'unknown'} TFLOP/s (data sheet), "
        f"8192^3 bf16 matmul measured at {data['matmul_tflops']:.0f} TFLOP/s.",
        "",
        f"Command: `{data['command']}`",
        "",
        "TFLOP/s = useful work (4 B H L S d, halved when causal; x3.5 for fwd+bwd) / "
        "median time. B * L = 16384, H * d = 2048, bf16.",
        "",
    ]
    rows = data["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))

    def cell(r):
        if r is None:
            return ""
        if r["status"] != "ok":
            return "OOM" if r["status"] == "OOM" else "n/a"
        share = f" ({100 * r['tflops'] / peak:.0f}%)" if peak else ""
        return f"{r['tflops']:.0f}{share}"

    for mask_kind in dict.fromkeys(r["mask"] for r in rows):
        title = "no mask" if mask_kind == "none" else f"boolean mask: {mask_kind}"
        lines += [f"## {title}", "", "TFLOP/s (% of dense bf16 peak); n/a = kernel refused", ""]
        lines.append("| mode | causal | d | L | " + " | ".join(impls) + " | triton / best sdpa |")
        lines.append("|" + " --- |" * (len(impls) + 5))
        keys = dict.fromkeys(
            (r["mode"], r["causal"], r["d"], r["L"]) for r in rows if r["mask"] == mask_kind
        )
        for mode, causal, d, L in keys:
            by = {
                r["impl"]: r
                for r in rows
                if (r["mode"], r["causal"], r["d"], r["L"], r["mask"])
                == (mode, causal, d, L, mask_kind)
            }
            sdpa = [r["tflops"] for n, r in by.items() if n.startswith("sdpa") and "tflops" in r]
            tri = by.get("triton", {}).get("tflops")
            ratio = f"{tri / max(sdpa):.2f}x" if tri and sdpa else ""
            cells = " | ".join(cell(by.get(n)) for n in impls)
            lines.append(f"| {mode} | {causal} | {d} | {L} | {cells} | {ratio} |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    key = lambda r: (r["impl"], r["d"], r["L"], r["causal"], r["mode"], r["mask"])  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    return list(merged.values())


# ----------------------------------------------------------------------- compile report


def compile_report(out_dir: Path) -> None:
    """Build every autotuning candidate for sm_90 (no GPU needed) and report registers,
    spilled stack bytes, shared memory and Hopper instructions (see
    :mod:`qkv.backends.triton.aot`). A spilling candidate is usually slow; the tables in
    :mod:`qkv.backends.triton.config` keep those that build without spills.
    """
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from qkv.backends.triton import aot, config

    rows = []
    kernels = {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq"}
    for name, kernel in kernels.items():
        for width in (64, 128, 256):
            for tile in config._table(name, width):
                for causal in (False, True):
                    t0 = time.perf_counter()
                    rep = aot.build(
                        kernel, dtype="bf16", capability=90,
                        num_warps=tile.num_warps, num_stages=tile.num_stages,
                        D_K=width, D_V=width, BLOCK_DK=width, BLOCK_DV=width, CAUSAL=causal,
                        WINDOWED=False, MASK_KIND=0, PRECISION="tf32",
                        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                    )  # fmt: skip
                    row = {
                        "kernel": name, "width": width, "causal": causal,
                        "block_m": tile.block_m, "block_n": tile.block_n,
                        "num_warps": tile.num_warps, "num_stages": tile.num_stages,
                        **asdict(rep), "build_s": round(time.perf_counter() - t0, 1),
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    data = {
        "what": "sm_90 builds of every autotuning candidate (bf16, no mask), made without a GPU",
        "triton": triton.__version__,
        "command": "python benchmarks/triton_gpu.py --compile-report",
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "triton_sm90_build.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        "# Triton kernels built for sm_90 (H100), without a GPU",
        "",
        f"triton {triton.__version__}; bf16, no mask, d_k = d_v = width. Command: "
        f"`{data['command']}`. Registers per thread (255 is the cap), stack = bytes "
        "spilled per thread, shared = shared memory per program (the H100 allows 227 KiB); "
        "wgmma / cp.async = Hopper tensor-core and asynchronous-copy instructions in the "
        "machine code. A build says nothing about speed: the GPU benchmark does.",
        "",
        "| kernel | width | causal | BLOCK_M | BLOCK_N | warps | stages | registers | "
        "stack | shared KiB | wgmma | cp.async |",
        "|" + " --- |" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['width']} | {r['causal']} | {r['block_m']} | {r['block_n']} "
            f"| {r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['stack_bytes']} "
            f"| {r['shared_bytes'] / 1024:.0f} | {r['wgmma']} | {r['cp_async']} |"
        )
    (out_dir / "triton_sm90_build.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    p.add_argument("--causal", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument(
        "--impls",
        nargs="+",
        default=["triton", *(f"sdpa:{k}" for k in SDPA_KERNELS), "naive"],
    )
    p.add_argument(
        "--masks", nargs="+", default=["none", "padding", "dense"],
        choices=["none", "padding", "dense"],
    )  # fmt: skip
    p.add_argument(
        "--max-naive-len", type=int, default=8192,
        help="skip sdpa:math and naive (O(L^2) memory, slow) above this length",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="L in {1024, 4096}, fwd, no masks")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--compile-report", action="store_true", help="sm_90 builds; no GPU needed")
    args = p.parse_args(argv)

    if args.compile_report:
        compile_report(ROOT / "benchmarks" / "results")
        return 0
    if not torch.cuda.is_available():
        print("triton_gpu.py: no CUDA device here; run it on a GPU machine (docs/triton.md)")
        return 2
    if os.environ.get("TRITON_INTERPRET"):
        print("triton_gpu.py: unset TRITON_INTERPRET to time compiled kernels")
        return 2
    if args.quick:
        args.lengths, args.modes, args.masks = [1024, 4096], ["fwd"], ["none"]
    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    stem = args.out / f"triton_{slug(name)}"
    old = (
        json.loads(stem.with_suffix(".json").read_text())
        if stem.with_suffix(".json").exists()
        else {}
    )
    impls = implementations(args.impls)
    rows = []
    for mask_kind in args.masks:
        # Masked cases: triton against SDPA's kernels that take a mask; fwd and fwd+bwd.
        for mode in args.modes:
            for d in args.head_dims:
                for causal_flag in args.causal if mask_kind == "none" else ["off"]:
                    for L in args.lengths:
                        chosen = dict(impls)
                        if mask_kind != "none":
                            chosen.pop("sdpa:flash", None)  # takes no mask
                        if args.max_naive_len < L:
                            chosen.pop("sdpa:math", None)
                            chosen.pop("naive", None)
                        rows += run_case(
                            chosen, d, L, causal_flag == "on", mode, mask_kind,
                            torch.bfloat16, device,
                        )  # fmt: skip
    data = {
        "device": name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peak_bf16_tflops": peak_tflops(name),
        "matmul_tflops": matmul_tflops(device),
        "command": "python benchmarks/triton_gpu.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": merge_rows(old.get("rows", []), rows),
    }
    write_reports(data, stem)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
