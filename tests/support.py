"""Shared test helpers: input factories and the low-precision accuracy rule.

Every fast path is compared with the reference backend. In float16/bfloat16 the
rule (as in flash-attention's tests) is: the kernel's error against a float64 run
of the reference must be at most twice the error of the reference itself run in
that same low precision (plus a tiny floor, for cases where both are exact).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import qkv
from qkv.backends import backends, make_request

MASK_KINDS = ("none", "bool", "bool_heads", "float", "padding", "broadcast_2d")


# ---------------------------------------------------------------- backends from the registry


def backend_unusable(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> str | None:
    """Why a registered backend cannot run plain requests on ``device`` here, or None.

    A backend is usable when ``available()`` and its ``supports()`` accepts a tiny
    ``dtype`` request on that device (so Triton without CUDA or ``TRITON_INTERPRET=1`` is
    skipped, and so is a CUDA-only kernel for CPU tensors); ``"auto"`` is always usable.
    """
    if name == "auto":
        return None
    backend = backends()[name]
    if not backend.available():
        return f"backend {name!r} is not available in this process ({backend.description})"
    probe = torch.zeros(1, 2, 4, dtype=dtype, device=device)
    why = backend.supports(make_request(probe, probe, probe))
    return None if why is None else f"backend {name!r} cannot run {dtype} on {device}: {why}"


def registry_backend_names(
    *,
    include_auto: bool = True,
    exclude: tuple[str, ...] = (),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Names of the registered backends usable on ``device`` (+ ``"auto"``), sorted.

    For hypothesis strategies, which cannot skip: unusable backends are left out.
    """
    names = [
        n
        for n in sorted(backends())
        if n not in exclude and backend_unusable(n, device, dtype) is None
    ]
    return [*names, "auto"] if include_auto and "auto" not in exclude else names


def registry_backends(
    *,
    include_auto: bool = True,
    exclude: tuple[str, ...] = (),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list:
    """``pytest.param`` per registered backend (+ ``"auto"``), for ``parametrize("backend", ...)``.

    Every backend in :func:`qkv.backends.backends` is listed, so one registered later
    meets the same tests; those not usable on ``device`` are skipped with the reason.
    """
    names = [n for n in sorted(backends()) if n not in exclude]
    if include_auto and "auto" not in exclude:
        names.append("auto")
    params = []
    for name in names:
        why = backend_unusable(name, device, dtype)
        marks = () if why is None else (pytest.mark.skip(reason=why),)
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def refusal(backend: str, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> str | None:
    """Why the named ``backend`` would refuse this call (None when it serves it).

    ``kwargs`` are those of :func:`qkv.scaled_dot_product_attention` except ``backend``;
    ``"auto"`` serves every valid call.
    """
    if backend == "auto":
        return None
    b = backends()[backend]
    if not b.available():
        return f"backend {backend!r} is not available here"
    return b.supports(make_request(q, k, v, **kwargs))


def skip_if_refused(backend: str, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> None:
    """Skip the calling test when the named backend does not serve this call."""
    why = refusal(backend, q, k, v, **kwargs)
    if why is not None:
        pytest.skip(f"{backend} does not serve this call: {why}")


def make_qkv(
    B: int = 2,
    H: int = 4,
    H_kv: int | None = None,
    L: int = 7,
    S: int | None = None,
    d_k: int = 16,
    d_v: int | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    requires_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random q (B, H, L, d_k), k (B, H_kv, S, d_k), v (B, H_kv, S, d_v)."""
    H_kv = H if H_kv is None else H_kv
    S = L if S is None else S
    d_v = d_k if d_v is None else d_v
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, d_k, generator=g, dtype=torch.float64)
    k = torch.randn(B, H_kv, S, d_k, generator=g, dtype=torch.float64)
    v = torch.randn(B, H_kv, S, d_v, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))


def make_mask(
    kind: str, B: int, H: int, L: int, S: int, *, seed: int = 1, dead_row: bool = True
) -> Tensor | None:
    """A mask of the given kind; with ``dead_row`` one query row allows no key at all."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool":  # (B, 1, L, S): shared by heads
        m = torch.rand(B, 1, L, S, generator=g) > 0.3
    elif kind == "bool_heads":  # (B, H, L, S): one per head
        m = torch.rand(B, H, L, S, generator=g) > 0.3
    elif kind == "float":  # (1, H, L, S): additive, some -inf
        m = torch.randn(1, H, L, S, generator=g, dtype=torch.float64)
        m = m.masked_fill(torch.rand(1, H, L, S, generator=g) < 0.3, float("-inf"))
    elif kind == "padding":  # (B, 1, 1, S): key padding; the last batch row pads half the keys
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[-1, ..., (S + 1) // 2 :] = False
        if dead_row and B > 1:
            m[0] = False  # a whole sequence of padding: every row empty
        return m
    elif kind == "broadcast_2d":  # (L, S)
        m = torch.rand(L, S, generator=g) > 0.3
    else:
        raise ValueError(kind)
    if dead_row:
        row = L // 2
        if m.dtype == torch.bool:
            m[..., row, :] = False
        else:
            m[..., row, :] = float("-inf")
    return m


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _run(
    fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype, grad_out: Tensor
):
    """Run ``fn`` on copies of q, k, v cast to ``dtype``; return output and input grads."""
    qc, kc, vc = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out = fn(qc, kc, vc)
    out.backward(grad_out.to(dtype))
    return out.detach(), qc.grad, kc.grad, vc.grad


def reference_fn(**kwargs) -> Callable[..., Tensor]:
    """The reference backend with fixed keyword arguments, as ``fn(q, k, v)``."""
    return lambda q, k, v: qkv.scaled_dot_product_attention(q, k, v, backend="reference", **kwargs)


def assert_matches_reference(
    kernel: Callable[..., Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dtype: torch.dtype,
    grads: bool = True,
    atol: float | None = None,
    **kwargs,
) -> dict[str, float]:
    """Check ``kernel(q, k, v)`` (and its gradients) against the reference.

    float64/float32: max abs error <= ``atol`` (default 1e-10 / 2e-5).
    float16/bfloat16: error vs the float64 reference <= 2 x the reference's own error
    in that dtype, + 1e-6 floor. Returns the measured errors (for messages/benchmarks).
    """
    ref = reference_fn(**kwargs)
    g = torch.Generator().manual_seed(123)
    out_shape = (*q.shape[:-1], v.shape[-1])
    grad_out = torch.randn(out_shape, generator=g, dtype=torch.float64)
    names = ("out", "dq", "dk", "dv") if grads else ("out",)

    def run(fn, dt):
        if grads:
            return _run(fn, q, k, v, dt, grad_out)
        with torch.no_grad():
            return (fn(*(t.detach().to(dt) for t in (q, k, v))),)

    exact = run(ref, torch.float64)
    got = run(kernel, dtype)
    errs: dict[str, float] = {}
    if dtype in (torch.float16, torch.bfloat16):
        low_ref = run(ref, dtype)
        for name, e, gk, gr in zip(names, exact, got, low_ref, strict=False):
            assert torch.isfinite(gk.double()).all(), f"{name}: non-finite values in {dtype}"
            err, ref_err = max_err(gk, e), max_err(gr, e)
            errs[name], errs[name + "_ref"] = err, ref_err
            assert err <= 2 * ref_err + 1e-6, (
                f"{name} in {dtype}: kernel error {err:.3e} > 2 x reference error {ref_err:.3e}"
            )
    else:
        tol = atol if atol is not None else (1e-10 if dtype == torch.float64 else 2e-5)
        for name, e, gk in zip(names, exact, got, strict=False):
            assert torch.isfinite(gk.double()).all(), f"{name}: non-finite values"
            errs[name] = max_err(gk, e)
            assert errs[name] <= tol, f"{name} in {dtype}: error {errs[name]:.3e} > {tol:.1e}"
    return errs


# ---------------------------------------------------------------- CLI output


def table_cells(out: str, first: str) -> list[str]:
    """The cells of the rich table row whose first cell is ``first`` (split on │)."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{out}")
