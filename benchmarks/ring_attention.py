"""Ring attention on 1, 2 and 4 gloo processes: longest sequence per memory budget, step time,
communication against compute.

Shape legend: B batch · H heads · L global sequence length · n = L / W shard length per
process · d head width · W processes.

For each W, W processes are spawned (gloo on 127.0.0.1, one torch thread each) and run
``qkv.distributed.ring_attention`` forward + backward, causal, zigzag layout, float32,
B=1, H=4, d=64, at growing shard lengths n. Per process it records:

* **memory**: the growth of peak resident memory (``ru_maxrss``) over the process's
  baseline (torch loaded, a small warm-up step done). Shard lengths run in increasing
  order and the working set grows with them, so the peak after a run is that run's peak.
* **time**: the median wall time of a forward + backward step over the rounds, max over
  the ranks (the slowest rank sets the pace);
* **overlap**: from :func:`qkv.distributed.ring_timings`, the seconds spent in the local
  kernels ("compute") and blocked on a transfer that had not arrived ("wait").

The longest L that fits the per-process budget (``--budget-mib``, default 64 MiB above
the baseline) is reported per W: memory is linear in n, so W processes reach about W
times the length of one. NOTE: this machine has 2 cores; with W = 4 the four processes
share them (oversubscribed), so its times include waiting for a core, which shows up
as "wait" too.

    python benchmarks/ring_attention.py            # ~2 min on 2 cores
    python benchmarks/ring_attention.py --quick    # smaller lengths, fewer rounds

Writes benchmarks/results/ring_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qkv._cpu import cpu_model, isa_flags
from qkv.distributed import ring_attention, ring_timings

B, H, D = 1, 4, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _step(n: int) -> tuple[float, float, float]:
    """One forward + backward at shard length n: (seconds, compute s, wait s)."""
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, n, D)
    dist.barrier()
    with ring_timings() as t:
        t0 = time.perf_counter()
        out = ring_attention(q, k, v, is_causal=True, layout="zigzag")
        out.backward(dout)
        seconds = time.perf_counter() - t0
    return seconds, t.compute, t.wait


def _worker(rank: int, world: int, port: int, shards: list[int], rounds: int, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        _step(64)  # loads the compiled kernel, allocates the small buffers
        base = _rss_mib()
        rows = []
        for n in shards:
            times, computes, waits = [], [], []
            for _ in range(rounds):
                s, c, w = _step(n)
                times.append(s)
                computes.append(c)
                waits.append(w)
            rows.append(
                {
                    "n": n,
                    "L": n * world,
                    "seconds": statistics.median(times),
                    "compute_s": statistics.median(computes),
                    "wait_s": statistics.median(waits),
                    "peak_mib": _rss_mib() - base,
                }
            )
        gathered = [None] * world
        dist.all_gather_object(gathered, {"baseline_mib": base, "rows": rows})
        if rank == 0:
            Path(out).write_text(json.dumps(gathered), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def _run(world: int, shards: list[int], rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "r.json")
        mp.spawn(_worker, args=(world, _free_port(), shards, rounds, str(path)), nprocs=world)
        per_rank = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for i, n in enumerate(shards):
        ranks = [r["rows"][i] for r in per_rank]
        rows.append(
            {
                "W": world,
                "n": n,
                "L": n * world,
                # The slowest rank sets the step time; memory: the largest rank's.
                "step_s": max(r["seconds"] for r in ranks),
                "compute_s": statistics.mean(r["compute_s"] for r in ranks),
                "wait_s": statistics.mean(r["wait_s"] for r in ranks),
                "peak_mib": max(r["peak_mib"] for r in ranks),
                "baseline_mib": max(r["baseline_mib"] for r in per_rank),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller lengths, one round")
    ap.add_argument("--budget-mib", type=float, default=64.0, help="per-process memory budget")
    ap.add_argument("--worlds", default="1,2,4", help="process counts to run")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).with_name("results") / "ring_attention.json",
    )
    args = ap.parse_args()
    shards = [256, 512, 1024] if args.quick else [512, 1024, 2048, 4096]
    rounds = 1 if args.quick else 2
    rows = []
    print(
        f"{'W':>2} {'L':>6} {'n':>5} {'step s':>8} {'compute s':>9} {'wait s':>7} {'peak MiB':>9}"
    )
    for world in (int(w) for w in args.worlds.split(",")):
        for r in _run(world, shards, rounds):
            r["fits"] = r["peak_mib"] <= args.budget_mib
            rows.append(r)
            print(
                f"{r['W']:>2} {r['L']:>6} {r['n']:>5} {r['step_s']:>8.3f} {r['compute_s']:>9.3f} "
                f"{r['wait_s']:>7.3f} {r['peak_mib']:>9.1f}{'' if r['fits'] else '  over budget'}",
                flush=True,
            )
    longest = {}
    for world in sorted({r["W"] for r in rows}):
        fit = [r for r in rows if r["W"] == world and r["fits"]]
        longest[world] = max(fit, key=lambda r: r["L"]) if fit else None
    print(f"\nlongest sequence within {args.budget_mib:g} MiB per process (causal, zigzag):")
    for world, r in longest.items():
        if r is None:
            print(f"  W={world}: none of the measured lengths fits")
            continue
        share = r["wait_s"] / max(r["compute_s"] + r["wait_s"], 1e-12)
        print(
            f"  W={world}: L={r['L']} ({r['peak_mib']:.1f} MiB), {r['step_s']:.3f} s per "
            f"forward+backward, {share:.0%} of ring time waiting on transfers"
        )
    meta = {
        "cpu": cpu_model(),
        "cpu_flags": isa_flags(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads_per_process": 1,
        "oversubscribed_worlds": [w for w in longest if w > (os.cpu_count() or 1)],
        "shape": {"B": B, "H": H, "d": D, "dtype": "float32", "causal": True, "layout": "zigzag"},
        "budget_mib": args.budget_mib,
        "memory": "peak ru_maxrss growth over the process baseline after a warm-up step",
        "quick": args.quick,
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"meta": meta, "results": rows, "longest_within_budget": longest}, indent=2)
        + "\n"
    )
    print(json.dumps(meta))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
