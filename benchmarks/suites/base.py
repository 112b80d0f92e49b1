"""What every suite shares: the :class:`Case` record, the :class:`Suite` interface, the output check and
chunked fp32 "gold" computations that stay within memory at long sequence lengths.

A suite says *what* to measure (cases, inputs, the gold answer, which providers); the runner says *how*
(check, then time, then record). Suites never time anything themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

LEVELS = ("full", "quick", "tiny")  # tiny: CPU-sized shapes for the unit tests


@dataclass
class Case:
    suite: str
    name: str                 # unique within the suite, human readable
    group: str                # one plot panel / table block: cases of a group differ only in ``x``
    x_name: str               # the swept quantity, e.g. "T", "cache_len", "density"
    x: float
    mode: str                 # "fwd" | "bwd" | "fwd+bwd" | "decode" | "step"
    shape: Dict[str, Any]
    params: Dict[str, Any] = field(default_factory=dict)
    metric: str = "tflops"    # what the plot shows: "tflops" | "gbps" | "ms"
    flops: Optional[float] = None            # dense-equivalent FLOPs for this mode
    flops_effective: Optional[float] = None  # unmasked-area FLOPs, when it differs
    bytes: Optional[float] = None            # bytes moved (decode)
    tokens: Optional[int] = None             # tokens processed (throughput)
    input_key: Tuple = ()     # cases with equal keys share inputs and the gold answer

    @property
    def needs_grad(self) -> bool:
        return self.mode in ("bwd", "fwd+bwd")

    def describe(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.shape.items())
        params = " ".join(f"{k}={v}" for k, v in self.params.items() if not k.startswith("_"))
        return f"{self.mode:7s} {shape} {params}".rstrip()


class Suite:
    """Base class. Subclasses set ``name``, ``description``, ``grad_inputs`` and implement the methods."""

    name: str = ""
    description: str = ""
    grad_inputs: Tuple[str, ...] = ("q", "k", "v")  # inputs the backward differentiates
    # relative tolerances of the semantic check: max |out - gold| <= tol * max |gold|
    out_tol = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-3}
    grad_tol = {"bfloat16": 5e-2, "float16": 2e-2, "float32": 2e-3}

    def cases(self, level: str = "full") -> List[Case]:
        raise NotImplementedError

    def providers(self):
        """The providers of this suite (see benchmarks.providers)."""
        raise NotImplementedError

    def make_inputs(self, case: Case, device, dtype) -> Dict[str, Any]:
        """Tensors shared by every provider of ``case`` (deterministic: seeded from the case)."""
        raise NotImplementedError

    def gold(self, case: Case, inputs: Dict[str, Any], with_grads: bool) -> Dict[str, Any]:
        """fp32 answer: ``{"out": tensor or tuple, "grads": {name: tensor}}`` (grads only if asked)."""
        raise NotImplementedError

    def canonical_grad(self, name: str, grad, inputs: Dict[str, Any]):
        """Applied to every provider's gradient before the comparison (e.g. to ignore entries that are
        mathematically unused). Identity by default."""
        return grad


# ----------------------------------------------------------------------------------------------------
# helpers used by several suites


def seed_of(*parts) -> int:
    """A stable 31-bit seed from the parts (Python's hash() is salted per process)."""
    h = 1469598103934665603
    for p in parts:
        for ch in repr(p).encode():
            h = ((h ^ ch) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFF


def randn(shape, *, device, dtype, seed: int, scale: float = 1.0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float32) * scale
    return t.to(device=device, dtype=dtype)


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def rel_err(got, want) -> float:
    """max |got - want| / max |want| in fp32 (NaN/inf anywhere -> inf)."""
    import torch

    got = got.detach().float()
    want = want.detach().float().to(got.device)
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        return math.inf
    denom = max(float(want.abs().max()), 1e-6) if want.numel() else 1.0
    return float((got - want).abs().max()) / denom if want.numel() else 0.0


def check_outputs(suite: Suite, dtype_name: str, out, gold_out, grads: Optional[Dict[str, Any]] = None,
                  gold_grads: Optional[Dict[str, Any]] = None) -> Tuple[bool, Dict[str, float], str]:
    """Compare a provider's outputs (and gradients) with the gold answer.

    Returns ``(ok, errors, message)``; errors are relative max errors keyed ``out``, ``out1``..., ``dq``...
    This is a semantic check (does the provider compute the same function: same mask convention, same
    head grouping, same decay?), not the accuracy test -- that lives in tests/ with SPEC §0's rule.
    """
    errors: Dict[str, float] = {}
    problems: List[str] = []
    otol = suite.out_tol.get(dtype_name, 2e-2)
    gtol = suite.grad_tol.get(dtype_name, 5e-2)
    outs, golds = as_tuple(out), as_tuple(gold_out)
    if len(outs) < len(golds):
        return False, errors, f"returned {len(outs)} outputs, expected {len(golds)}"
    for i, (o, g) in enumerate(zip(outs, golds)):
        key = "out" if i == 0 else f"out{i}"
        try:
            e = rel_err(o, g)
        except ValueError as exc:
            return False, errors, f"{key}: {exc}"
        errors[key] = e
        if not e <= otol:
            problems.append(f"{key} rel err {e:.3g} > {otol:g}")
    for name, g in (gold_grads or {}).items():
        got = (grads or {}).get(name)
        key = f"d{name}"
        if got is None:
            problems.append(f"{key} missing (no gradient reached {name})")
            errors[key] = math.inf
            continue
        try:
            e = rel_err(got, g)
        except ValueError as exc:
            return False, errors, f"{key}: {exc}"
        errors[key] = e
        if not e <= gtol:
            problems.append(f"{key} rel err {e:.3g} > {gtol:g}")
    return not problems, errors, "; ".join(problems)


def gold_attention(q, k, v, *, causal=False, bias=None, mask=None, block_mask=None, dout=None,
                   scale=None, budget_bytes: int = 2 << 30):
    """fp32 attention via attnzoo's reference, one kv head (and, if needed, a slice of its query heads)
    at a time so the ``[B, h, Tq, Tk]`` score matrix stays under ``budget_bytes``.

    ``bias``/``mask``: ``[B|1, Hkv|1, Tq|1, Tk]`` -- per kv head (the way DMA builds them). ``block_mask``
    is passed whole (only for shapes small enough). With ``dout`` also returns ``{"q","k","v"}`` grads.
    Returns ``(out, grads or None)`` in BTHD, fp32.
    """
    import torch
    from attnzoo.ops.attention.reference import attention_reference

    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    rep = H // Hkv
    per_head = B * Tq * Tk * 4 * (6 if dout is not None else 3)
    hchunk = max(1, min(rep, budget_bytes // max(per_head, 1)))
    if block_mask is not None:
        hchunk = rep  # the block mask is indexed by absolute head; keep the call whole per kv head
    out = torch.empty(B, Tq, H, v.shape[-1], device=q.device, dtype=torch.float32)
    grads = None
    if dout is not None:
        grads = {n: torch.zeros(t.shape, device=t.device, dtype=torch.float32) for n, t in (("q", q), ("k", k), ("v", v))}
    ctx = torch.enable_grad() if dout is not None else torch.no_grad()
    with ctx:
        for g in range(Hkv):
            kg = k[:, :, g:g + 1].detach().float().requires_grad_(dout is not None)
            vg = v[:, :, g:g + 1].detach().float().requires_grad_(dout is not None)
            for h0 in range(g * rep, (g + 1) * rep, hchunk):
                h1 = min(h0 + hchunk, (g + 1) * rep)
                qc = q[:, :, h0:h1].detach().float().requires_grad_(dout is not None)
                kw = {}
                if bias is not None:
                    kw["bias"] = (bias if bias.shape[1] == 1 else bias[:, g:g + 1]).float()
                if mask is not None:
                    kw["mask"] = mask if mask.shape[1] == 1 else mask[:, g:g + 1]
                if block_mask is not None:
                    kw["block_mask"] = _slice_block_mask(block_mask, h0, h1)
                o = attention_reference(qc, kg, vg, causal=causal, scale=scale, window=(-1, -1), **kw)
                o = o[0] if isinstance(o, tuple) else o
                out[:, :, h0:h1] = o.detach()
                if dout is not None:
                    o.backward(dout[:, :, h0:h1].float())
                    grads["q"][:, :, h0:h1] = qc.grad
            if dout is not None:
                grads["k"][:, :, g] = kg.grad[:, :, 0]
                grads["v"][:, :, g] = vg.grad[:, :, 0]
    return out, grads


def _slice_block_mask(bm, h0: int, h1: int):
    from dataclasses import replace

    if bm.kv_num_blocks.shape[1] == 1:
        return bm

    def sl(t):
        return None if t is None else t[:, h0:h1]

    mod = bm.mask_mod
    if mod is not None:
        base_mod = mod
        mod = lambda b, h, q, k: base_mod(b, h + h0, q, k)  # noqa: E731
    return replace(bm, kv_num_blocks=sl(bm.kv_num_blocks), kv_indices=sl(bm.kv_indices),
                   full_kv_num_blocks=sl(bm.full_kv_num_blocks), full_kv_indices=sl(bm.full_kv_indices), mask_mod=mod)


def pow2_range(lo: int, hi: int) -> List[int]:
    out, x = [], lo
    while x <= hi:
        out.append(x)
        x *= 2
    return out


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def seqs(values: Sequence[int]) -> str:
    return ",".join(fmt_tokens(v) for v in values)
