"""The grid of ring-attention checks, run inside each spawned gloo process group.

Imported by the processes that ``tests/test_distributed.py`` spawns (one group per world
size, the whole grid in each, so start-up is paid once). Every case builds the full
inputs in float64 from its own seed (the same on every rank), runs qkv's reference
backend on them, and compares this rank's shard of the output and of the q/k/v
gradients from :func:`qkv.distributed.ring_attention` with the reference's shard.
The results are written as JSON for the test process to judge.
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import qkv
from qkv.backends.flash import flash_config
from qkv.distributed import gather_sequence, ring_attention, shard_sequence

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Case:
    """One comparison; lengths are global (``n`` per rank times the ring size)."""

    name: str
    layout: str
    n_q: int = 6  # shard length of the queries
    n_k: int | None = None  # of the keys/values (default n_q)
    batch: tuple[int, ...] = (2,)
    H: int = 2
    H_kv: int = 2
    d_k: int = 8
    d_v: int = 8
    causal: bool = False
    window: int | None = None
    scale: float | None = None
    dtype: str = "float32"
    compiled: bool | None = None  # None: the compiled kernel where available; False: loops
    group: str = "world"  # "world", or "halves": rings over two halves of the world
    through_gather: bool = False  # the loss reads gather_sequence(out), not the shard

    @property
    def tolerance(self) -> float:
        return 1e-10 if self.dtype == "float64" else 1e-5


def cases() -> list[Case]:
    grid = []
    for layout in LAYOUTS:
        one = 1 if layout == "contiguous" else 2  # zigzag shards hold two chunks
        grid += [
            Case("plain", layout),
            Case("causal", layout, causal=True),
            Case("causal_window_inside_shard", layout, causal=True, window=2),
            Case("causal_window_across_shards", layout, causal=True, window=9),
            Case("two_sided_window", layout, window=5),
            Case("gqa_causal", layout, H=4, H_kv=2, causal=True),
            Case("dv_ne_dk_scale", layout, d_k=8, d_v=5, causal=True, scale=0.3),
            Case("shard_length_1", layout, n_q=one, causal=True),
            Case("shard_length_1_plain", layout, n_q=one, H=3, H_kv=1),
            Case("empty_rows_L_gt_S", layout, n_q=4, n_k=2, causal=True),
            Case("L_lt_S_window", layout, n_q=2, n_k=6, causal=True, window=4),
            Case("no_batch_dims", layout, batch=(), causal=True),
            Case("two_batch_dims", layout, batch=(2, 3), n_q=4, window=3),
            Case("float64", layout, causal=True, window=7, dtype="float64"),
            Case("loops_gqa_causal", layout, H=4, H_kv=1, causal=True, compiled=False),
            Case("loops_window_dv", layout, d_v=3, window=4, compiled=False),
            Case("loops_empty_rows", layout, n_q=4, n_k=2, causal=True, compiled=False),
            Case("through_gather", layout, causal=True, through_gather=True),
            Case("subgroups", layout, causal=True, window=6, group="halves"),
        ]
    return grid


def _rel(a: torch.Tensor, b: torch.Tensor, whole: torch.Tensor) -> float:
    """max |a - b| / max |whole|: the error relative to the scale of the whole reference
    tensor (a shard's own scale can be ~0, e.g. dq of a causal first query)."""
    return (a.double() - b.double()).abs().max().item() / whole.abs().max().item()


def _halves(world: int) -> list[dist.ProcessGroup]:
    """Two rings of world / 2 ranks (each a single rank when world = 2); every rank
    creates every group, in the same order, as new_group requires."""
    half = world // 2
    if half == 0:
        return []  # a world of one rank has no halves
    return [dist.new_group(list(range(s, s + half))) for s in (0, half)]


def run_case(case: Case, halves: list[dist.ProcessGroup], device: str = "cpu") -> dict:
    """Errors of this rank's shards against the float64 reference, and sanity facts.

    The reference runs on the CPU; the ring on ``device`` (the rank's own GPU for NCCL).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    group = None
    if case.group == "halves":
        group = halves[rank // (world // 2)]
    W = dist.get_world_size(group)
    L, S = case.n_q * W, (case.n_k or case.n_q) * W
    # The same seed on every rank (hash() of a str differs between processes).
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    full = dict(
        q=torch.randn(*case.batch, case.H, L, case.d_k, generator=gen, dtype=torch.float64),
        k=torch.randn(*case.batch, case.H_kv, S, case.d_k, generator=gen, dtype=torch.float64),
        v=torch.randn(*case.batch, case.H_kv, S, case.d_v, generator=gen, dtype=torch.float64),
    )
    dout = torch.randn(*case.batch, case.H, L, case.d_v, generator=gen, dtype=torch.float64)
    kwargs = dict(
        is_causal=case.causal, window=case.window, scale=case.scale, enable_gqa=case.H_kv != case.H
    )
    ref = {n: t.clone().requires_grad_() for n, t in full.items()}
    ref_out = qkv.scaled_dot_product_attention(**ref, **kwargs, backend="reference")
    (ref_out * dout).sum().backward()

    dtype = getattr(torch, case.dtype)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return shard_sequence(t, -2, group, case.layout)

    def to_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    mine = {n: to_device(shard(t)).requires_grad_() for n, t in full.items()}
    settings = flash_config(compiled=False) if case.compiled is False else contextlib.nullcontext()
    with settings:
        out = ring_attention(**mine, **kwargs, group=group, layout=case.layout)
        if case.through_gather:
            # Every rank computes the whole loss; the gather's backward sums over ranks.
            whole = gather_sequence(out, -2, group, case.layout)
            ((whole * to_device(dout)).sum() / W).backward()
        else:
            (out * to_device(shard(dout))).sum().backward()
    gathered = gather_sequence(out.detach(), -2, group, case.layout).cpu()
    out = out.detach().cpu()
    for t in mine.values():
        t.grad = t.grad.cpu()
    errors = {
        "out": _rel(out, shard(ref_out.detach()), ref_out.detach()),
        "gathered_out": _rel(gathered, ref_out.detach(), ref_out.detach()),
        **{f"d{n}": _rel(mine[n].grad, shard(ref[n].grad), ref[n].grad) for n in full},
    }
    return {
        "errors": errors,
        "finite": all(
            bool(torch.isfinite(t).all()) for t in (out, *(m.grad for m in mine.values()))
        ),
        "out_dtype": str(out.dtype).removeprefix("torch."),
        "out_shape": list(out.shape),
        # A comparison against zeros would prove nothing: the reference must be lively.
        "ref_scale": min(
            ref_out.abs().max().item(), *(r.grad.abs().max().item() for r in ref.values())
        ),
    }


def _expect_error(fn) -> dict:
    try:
        fn()
    except Exception as err:  # the test checks that it is a TypeError or ValueError
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": None, "message": ""}


def error_cases() -> dict[str, dict]:
    """What bad arguments raise (run on every rank; the messages come back as JSON)."""
    x = torch.randn(1, 2, 4, 8)
    k5 = torch.randn(1, 2, 4, 5)
    odd = torch.randn(1, 2, 3, 8)
    return {
        "q_2d": _expect_error(lambda: ring_attention(torch.randn(4, 8), x, x)),
        "k_width": _expect_error(lambda: ring_attention(x, k5, k5)),
        "v_length": _expect_error(lambda: ring_attention(x, x, torch.randn(1, 2, 5, 8))),
        "gqa_not_enabled": _expect_error(
            lambda: ring_attention(torch.randn(1, 4, 4, 8), x, x, enable_gqa=False)
        ),
        "q_int": _expect_error(lambda: ring_attention(x.long(), x, x)),
        "layout_name": _expect_error(lambda: ring_attention(x, x, x, layout="spiral")),
        "layout_type": _expect_error(lambda: ring_attention(x, x, x, layout=2)),
        "window_zero": _expect_error(lambda: ring_attention(x, x, x, window=0)),
        "scale_negative": _expect_error(lambda: ring_attention(x, x, x, scale=-1.0)),
        "group_type": _expect_error(lambda: ring_attention(x, x, x, group="world")),
        "zigzag_odd_shard": _expect_error(lambda: ring_attention(odd, odd, odd, layout="zigzag")),
        "shard_uneven": _expect_error(lambda: shard_sequence(torch.randn(2, 5, 3), 1)),
        "shard_zigzag_uneven": _expect_error(
            lambda: shard_sequence(torch.randn(6, 3), 0, layout="zigzag")
        ),
        "shard_dim": _expect_error(lambda: shard_sequence(x, 4)),
        "gather_dim": _expect_error(lambda: gather_sequence(x, -5)),
        "gather_zigzag_odd": _expect_error(lambda: gather_sequence(odd, -2, layout="zigzag")),
    }


def round_trip() -> dict:
    """shard_sequence then gather_sequence gives back the tensor, in both layouts."""
    world = dist.get_world_size()
    x = torch.arange(2 * 4 * world * 3, dtype=torch.float32).reshape(2, 4 * world, 3)
    ok = {}
    for layout in LAYOUTS:
        part = shard_sequence(x, 1, layout=layout)
        back = gather_sequence(part, 1, layout=layout)
        ok[layout] = bool(torch.equal(back, x)) and part.shape[1] == 4
    # Zigzag rank 0 holds the first and the last chunk (of 2W chunks of 2 positions).
    first = shard_sequence(x, 1, layout="zigzag")[0, :, 0] / 3
    ok["zigzag_rank_chunks"] = first.tolist() if dist.get_rank() == 0 else None
    return ok


def decoder_gradients() -> float:
    """Worst relative error (float64) of a decoder's parameter gradients when the trainer's
    context-parallel path shards each sequence over the world, against one process."""
    from qkv.train.ddp import ContextGroups
    from qkv.train.models import ModelConfig, build_model
    from qkv.train.tasks import Batch
    from qkv.train.trainer import _context_parallel_losses, _token_losses

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig(kind="decoder", vocab_size=11, d_model=16, num_heads=2, max_len=16)
    model = build_model(cfg).double()
    gen = torch.Generator().manual_seed(1)
    # 13 tokens, padded to 16 = max_len (a multiple of 2W for W = 2 and 4).
    x, y = (torch.randint(0, 11, (3, 13), generator=gen) for _ in range(2))
    _token_losses(model(x), y).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    cp = ContextGroups(size=world, rank=rank, data_rank=0, data_size=1, group=dist.group.WORLD)
    _context_parallel_losses(model, Batch(x, y), cp, cfg.max_len).sum().backward()
    worst = 0.0
    for name, p in model.named_parameters():
        total = p.grad.clone()
        dist.all_reduce(total)  # what DDP's sum over processes gives
        worst = max(worst, _rel(total, ref[name], ref[name]))
    return worst


def worker(rank: int, world: int, port: int, out_dir: str, device: str = "cpu") -> None:
    """Entry point of one spawned process: join the group, run everything, write JSON.

    ``device="cuda"``: NCCL, one GPU per rank, the grid's cases on the compiled-free
    path only (argument errors and the round trip are device-independent: CPU runs only).
    """
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # W processes share 2 cores
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
    )
    try:
        halves = _halves(world)
        report: dict = {"cases": {}}
        if device == "cpu":
            report.update(
                errors=error_cases(), round_trip=round_trip(), decoder=decoder_gradients()
            )
        for case in cases():
            if device == "cuda" and case.compiled is not None:
                continue  # the compiled kernel is a CPU kernel
            if case.group == "halves" and not halves:
                continue
            key = f"{case.layout}-{case.name}"
            try:
                report["cases"][key] = {"case": asdict(case), **run_case(case, halves, device)}
            except Exception:
                report["cases"][key] = {"case": asdict(case), "crash": traceback.format_exc()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Case names are unique per layout (the tests are parametrized by them).
assert len({(c.layout, c.name) for c in cases()}) == len(cases())
