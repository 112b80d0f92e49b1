"""``attnzoo check``: every backend that can run here, of every op, against the reference.

Each case builds small random float64 inputs; for each backend the inputs are cast to the backend's
dtype, the op runs through its public function (so validation runs too), and the outputs and the
gradients of every floating input are compared with the float64 reference by SPEC §0's rule
(:mod:`attnzoo.testing`). On a CPU-only machine Triton kernels run through the interpreter
(``TRITON_INTERPRET=1``, set by the CLI before any kernel module is imported). Every registered backend
is checked: reference, torch, triton, and the engines (flash_attn, xformers) where they import.

Progress: a bar on a terminal; otherwise (a log, CI) one line per checked row, flushed as it happens.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from attnzoo import backends
from attnzoo.testing import accuracy_rule


@dataclass
class Case:
    op: str
    name: str
    make: Callable[[torch.Generator], Dict]  # float64 CPU inputs (+ plain kwargs)
    call: Callable  # the public function: call(**inputs, backend=...)
    grad_args: Sequence[str]  # floating inputs cast to the test dtype and differentiated


def _r(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _attention_cases() -> List[Case]:
    from attnzoo.ops.attention.api import attention, attention_with_kvcache
    from attnzoo.ops.masks.block_mask import causal_block_mask

    qkv = ("q", "k", "v")

    def basic(g):
        return dict(q=_r(g, 2, 24, 4, 32), k=_r(g, 2, 24, 4, 32), v=_r(g, 2, 24, 4, 32))

    def gqa_causal(g):
        return dict(q=_r(g, 1, 19, 4, 32), k=_r(g, 1, 27, 2, 32), v=_r(g, 1, 27, 2, 32), causal=True)

    def window_bias_pad(g):
        kpm = torch.ones(2, 21, dtype=torch.bool)
        kpm[1, :5] = False
        return dict(
            q=_r(g, 2, 21, 2, 64), k=_r(g, 2, 21, 2, 64), v=_r(g, 2, 21, 2, 64), bias=_r(g, 1, 2, 21, 21),
            window=(6, 0), causal=True, key_padding_mask=kpm,
        )

    def varlen(g):
        cu = torch.tensor([0, 7, 20, 33], dtype=torch.int32)
        return dict(q=_r(g, 33, 4, 32), k=_r(g, 33, 1, 32), v=_r(g, 33, 1, 32), cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)

    def block_sparse(g):
        return dict(q=_r(g, 1, 40, 2, 32), k=_r(g, 1, 40, 2, 32), v=_r(g, 1, 40, 2, 32),
                    block_mask=causal_block_mask(1, 1, 40, 40, block_size=(16, 16)))

    def decode(g):
        return dict(q=_r(g, 2, 2, 4, 32), k_cache=_r(g, 2, 40, 2, 32), v_cache=_r(g, 2, 40, 2, 32),
                    cache_seqlens=torch.tensor([33, 9], dtype=torch.int32))

    def decode_paged(g):
        table = torch.randperm(6, generator=g).view(2, 3).to(torch.int32)
        return dict(q=_r(g, 2, 1, 4, 32), k_cache=_r(g, 6, 16, 1, 32), v_cache=_r(g, 6, 16, 1, 32),
                    cache_seqlens=torch.tensor([48, 17], dtype=torch.int32), block_table=table)

    return [
        Case("attention", "dense", basic, attention, qkv),
        Case("attention", "gqa causal Tq!=Tk", gqa_causal, attention, qkv),
        Case("attention", "window+bias+padding", window_bias_pad, attention, qkv + ("bias",)),
        Case("attention", "varlen", varlen, attention, qkv),
        Case("attention", "block mask", block_sparse, attention, qkv),
        Case("attention_with_kvcache", "contiguous", decode, attention_with_kvcache, ()),
        Case("attention_with_kvcache", "paged", decode_paged, attention_with_kvcache, ()),
    ]


def _variant_cases() -> List[Case]:
    from attnzoo.ops.dma.api import dynamic_mask_attention
    from attnzoo.ops.knocking.api import kha_mlp
    from attnzoo.ops.lightning.api import lightning_attention
    from attnzoo.ops.moh.api import moh_attention
    from attnzoo.ops.moh.router_api import moh_router

    def moh(g):
        gates = torch.rand(2, 23, 4, generator=g, dtype=torch.float64)
        gates[gates < 0.4] = 0.0
        return dict(q=_r(g, 2, 23, 4, 32), k=_r(g, 2, 23, 2, 32), v=_r(g, 2, 23, 2, 32), gates=gates, causal=True)

    def moh_decode(g):  # a few queries, no gradient: the split-K decode kernel with gates
        gates = torch.rand(3, 2, 8, generator=g, dtype=torch.float64)
        gates[gates < 0.5] = 0.0
        gates[0, :, :4] = 0.0  # batch 0: kv heads 0 and 1 have no active query head
        return dict(q=_r(g, 3, 2, 8, 32), k=_r(g, 3, 45, 4, 32), v=_r(g, 3, 45, 4, 32), gates=gates, causal=True)

    def dma(g):
        return dict(q=_r(g, 2, 29, 4, 32), k=_r(g, 2, 29, 2, 32), v=_r(g, 2, 29, 2, 32), bias=_r(g, 2, 2, 29),
                    keep_window=8, causal=True)

    def lightning(g):
        return dict(q=_r(g, 2, 37, 2, 32) * 0.3, k=_r(g, 2, 37, 2, 32) * 0.3, v=_r(g, 2, 37, 2, 48),
                    decay=torch.tensor([0.05, 0.5], dtype=torch.float64))

    def mlp(g):
        return dict(v=_r(g, 2, 13, 2, 32), w_up=_r(g, 32, 32) * 0.2, w_gate=_r(g, 32, 32) * 0.2,
                    w_down=_r(g, 32, 32) * 0.2)

    def router(g):
        return dict(logits_routed=_r(g, 2, 21, 6), logits_shared=_r(g, 2, 21, 2), logits_mix=_r(g, 2, 21, 2), top_k=3)

    return [
        Case("moh_attention", "gqa causal", moh, moh_attention, ("q", "k", "v", "gates")),
        Case("moh_attention", "decode, idle kv heads", moh_decode, moh_attention, ()),
        Case("moh_router", "2 shared + top-3 of 6", router, moh_router, ("logits_routed", "logits_shared", "logits_mix")),
        Case("dynamic_mask_attention", "gqa causal", dma, dynamic_mask_attention, ("q", "k", "v", "bias")),
        Case("lightning_attention", "decay, Dv != D", lightning, lightning_attention, ("q", "k", "v")),
        Case("kha_mlp", "random weights", mlp, kha_mlp, ("v", "w_up", "w_gate", "w_down")),
    ]


def all_cases() -> List[Case]:
    return _attention_cases() + _variant_cases()


def _flat(out) -> List[torch.Tensor]:
    """The tensors an op returned: a tensor, a tuple/list of them, or a dataclass (the router's output)."""
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def _run(case: Case, inputs: Dict, backend: str, dtype, device):
    """Outputs and gradients (in that order, as one list) of ``case`` on ``backend``."""
    kw = {}
    for name, val in inputs.items():
        if isinstance(val, torch.Tensor):
            val = val.to(device)
            if val.is_floating_point():
                val = val.to(dtype)
                if name in case.grad_args:
                    val.requires_grad_(True)
        kw[name] = val
    outs = _flat(case.call(**kw, backend=backend))
    grads = []
    if case.grad_args:
        g = torch.Generator().manual_seed(1)
        cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device, o.dtype) for o in outs]
        loss = sum((o.float() * c.float()).sum() for o, c in zip(outs, cot) if o.requires_grad)
        grads = list(torch.autograd.grad(loss, [kw[n] for n in case.grad_args], allow_unused=True))
        grads = [torch.zeros_like(kw[n]) if gr is None else gr for n, gr in zip(case.grad_args, grads)]
    return [o.detach() for o in outs] + [gr.detach() for gr in grads]


@dataclass
class Row:
    op: str
    case: str
    backend: str
    dtype: str
    status: str  # "pass" | "FAIL" | "skip"
    max_err: float = float("nan")
    tol: float = float("nan")
    note: str = ""


LEGEND = (
    "  max err: the largest |backend - float64 reference| over the output and every gradient, taken at the\n"
    "           comparison closest to failing (largest err / tol).\n"
    "  tol:     2 x the error of the same reference evaluated in the row's dtype, plus a floor per dtype\n"
    "           (SPEC §0's accuracy rule); a row passes when max err <= tol. A reference row is that baseline\n"
    "           itself: the reference in the row's dtype against float64."
)


def _log_row(done: int, total: int, row: "Row") -> None:
    """One flushed line per checked row (for logs: stdout/stderr not a terminal)."""
    err = "" if row.max_err != row.max_err else f" max err {row.max_err:.2e} tol {row.tol:.2e}"
    note = f" ({row.note})" if row.note else ""
    sys.stderr.write(f"[{done}/{total}] {row.op} / {row.case} / {row.backend} {row.dtype}: {row.status}{err}{note}\n")
    sys.stderr.flush()


def run_checks(dtypes=None, device=None, progress=True) -> List[Row]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.float16]
    cases = all_cases()
    rows: List[Row] = []
    total = len(cases) * len(dtypes)
    done = 0
    log_lines = progress and not sys.stdout.isatty()
    n_rows = sum(len(backends.implementations(c.op)) for c in cases) * len(dtypes)

    def add(row: Row) -> None:
        rows.append(row)
        if log_lines:
            _log_row(len(rows), n_rows, row)

    for case in cases:
        inputs = case.make(torch.Generator().manual_seed(0))
        names = [i.backend for i in reversed(backends.implementations(case.op))]  # reference first
        ref_hi = _run(case, inputs, "reference", torch.float64, device)
        for dtype in dtypes:
            ref_lo = None
            for b in names:
                cast = {k: (v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else
                            (v.to(device) if isinstance(v, torch.Tensor) else v)) for k, v in inputs.items()}
                reasons = _why_not_public(case, b, cast)
                dn = str(dtype).replace("torch.", "")
                if reasons:
                    add(Row(case.op, case.name, b, dn, "skip", note="; ".join(reasons)[:90]))
                    continue
                try:
                    if ref_lo is None:
                        ref_lo = _run(case, inputs, "reference", dtype, device)
                    # the reference in the test dtype is the rule's baseline: its row shows its own error
                    got = ref_lo if b == "reference" else _run(case, inputs, b, dtype, device)
                    worst_ok, worst_err, worst_tol = True, 0.0, 0.0
                    for o, hi, lo in zip(got, ref_hi, ref_lo):
                        ok, err, tol = accuracy_rule(o, hi, lo, dtype)
                        if not ok or err / tol >= (worst_err / worst_tol if worst_tol else -1):
                            worst_ok, worst_err, worst_tol = worst_ok and ok, err, tol
                        worst_ok = worst_ok and ok
                    add(Row(case.op, case.name, b, dn, "pass" if worst_ok else "FAIL", worst_err, worst_tol))
                except Exception as e:  # a crash is a failure, reported in the table
                    add(Row(case.op, case.name, b, dn, "FAIL", note=f"{type(e).__name__}: {e}"[:90]))
            done += 1
            if progress and not log_lines:
                _progress(done, total, f"{case.op} / {case.name}")
    if progress and not log_lines:
        sys.stderr.write("\n")
    return rows


def _why_not_public(case: Case, backend: str, inputs: Dict) -> List[str]:
    """The backend's reasons, asked with the kwargs its public function would dispatch with."""
    if backend not in {i.backend for i in backends.implementations(case.op)}:
        return [f"no {backend} implementation yet"]
    try:
        backends.select(case.op, backend, **_dispatch_kwargs(case, inputs))
    except Exception as e:  # BackendUnavailableError lists the reasons
        lines = [ln.strip()[2:] for ln in str(e).splitlines() if ln.strip().startswith(f"- {backend}:")]
        return [ln.split(":", 1)[1].strip() for ln in lines] or [str(e).splitlines()[0]]
    return []


def _dispatch_kwargs(case: Case, inputs: Dict) -> Dict:
    """The full keyword set the public function passes to ``backends.dispatch`` (defaults filled in)."""
    import inspect

    sig = inspect.signature(case.call)
    kw = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    kw.pop("backend", None)
    kw.update(inputs)
    return kw


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    fill = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label[:40]:<40}")
    sys.stderr.flush()


def format_table(rows: List[Row]) -> str:
    head = ("op", "case", "backend", "dtype", "status", "max err", "tol", "note")
    body = [
        (r.op, r.case, r.backend, r.dtype, r.status,
         "" if r.status == "skip" or r.max_err != r.max_err else f"{r.max_err:.2e}",
         "" if r.status == "skip" or r.tol != r.tol else f"{r.tol:.2e}", r.note)
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body] + ["", LEGEND])
