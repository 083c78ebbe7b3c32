"""What ``output_attentions=True`` costs in a transformers model, per attention implementation.

One forward pass of SmolLM2-135M-Instruct (``make llm``; 30 layers, 9 query heads, 3
key/value heads) under ``torch.no_grad()`` on a random prompt of L tokens, timed and
with its peak extra resident memory, for:

* ``eager`` without and with all weights (transformers' reference path);
* ``sdpa`` without weights (PyTorch's fused kernel; it cannot return weights);
* ``qkv`` (backend ``auto``) without weights, with all weights (from the flash kernel's
  log-sum-exp), and with the weights of 3 chosen rows on every layer
  (``qkv.hf.weights(rows=...)``).

Each configuration runs in its own subprocess so peaks do not mix. The table and
``benchmarks/results/hf_attentions.json`` record the CPU and its capability.

    .venv/bin/python benchmarks/hf_attentions.py --lengths 256,1024 --long 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
import qkv.hf
from qkv.bench.timing import MemoryMeter
from qkv.hf.models import load_causal_lm

impl, weights, L, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model, _ = load_causal_lm("smollm2", attn_implementation=impl)
ids = torch.randint(100, 40000, (1, L), generator=torch.Generator().manual_seed(0))
rows = [0, L // 2, L - 1]

def call():
    kw = dict(logits_to_keep=1, use_cache=False, output_attentions=weights != "none")
    with torch.no_grad():
        if weights == "rows":
            with qkv.hf.weights(rows=rows):
                return model(ids, **kw)
        return model(ids, **kw)

call()  # warm-up (kernel build, allocator)
meter = MemoryMeter()
times = []
peak = None
for i in range(repeats):
    t = time.perf_counter()
    out, extra = meter.measure(call)
    times.append(time.perf_counter() - t)
    peak = extra if peak is None or (extra or 0) > peak else peak
    del out
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_extra_bytes": peak}))
"""

CONFIGS = [
    ("eager", "none"),
    ("eager", "all"),
    ("sdpa", "none"),
    ("qkv", "none"),
    ("qkv", "all"),
    ("qkv", "rows"),
]


def run_one(impl: str, weights: str, L: int, repeats: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, impl, weights, str(L), str(repeats)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="256,1024", help="prompt lengths for every config")
    parser.add_argument("--long", default="4096", help="lengths for qkv only (no eager weights)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "hf_attentions.json")
    )
    args = parser.parse_args()

    import torch

    from qkv.bench.timing import machine_info

    rows = []
    plan = [(L, c) for L in map(int, args.lengths.split(",")) for c in CONFIGS]
    if args.long:
        for L in map(int, args.long.split(",")):
            plan += [
                (L, c) for c in CONFIGS if c in (("sdpa", "none"), ("qkv", "none"), ("qkv", "rows"))
            ]
    print(f"{'L':>6} {'implementation':<8} {'weights':<8} {'time s':>8} {'peak extra':>12}")
    for L, (impl, weights) in plan:
        r = run_one(impl, weights, L, args.repeats)
        rows.append({"L": L, "implementation": impl, "weights": weights, **r})
        if "error" in r:
            print(f"{L:>6} {impl:<8} {weights:<8} error: {r['error']}")
            continue
        mib = (r["peak_extra_bytes"] or 0) / 2**20
        print(f"{L:>6} {impl:<8} {weights:<8} {r['seconds']:>8.2f} {mib:>9.0f} MiB")
    report = {
        "benchmark": "hf_attentions",
        "model": "SmolLM2-135M-Instruct (30 layers, 9 heads, 3 kv heads), float32",
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
