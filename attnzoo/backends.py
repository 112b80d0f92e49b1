"""The backend registry: for each op, the backends that implement it, what each supports, and dispatch.

Each implementation registers with ``register(op, backend, priority=..., supports=...)``. ``supports``
receives the op's (validated) keyword arguments and returns a list of reasons it cannot run them -- an
empty list means it can. ``select(op, backend, **inputs)``:

- a named backend runs if it can, else raises :class:`BackendUnavailableError` listing, for every
  backend, why not;
- ``"auto"`` follows :data:`AUTO_TABLE` -- the one written policy: per op, device and feature class, the
  backends in order of preference; the first that can run is taken. (An op missing from the table falls
  back to registration priority.) It never picks a Triton kernel running through the CPU interpreter
  (that is for tests; ask for ``backend="triton"`` explicitly). On a CUDA tensor it never drops to a slow
  path silently: picking a backend the table marks as a fallback warns once per (op, reasons), naming them.

Backend choice happens in Python before any custom op is called, so ``torch.compile`` sees only the
chosen op (no graph break from dispatch).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from attnzoo.errors import BackendUnavailableError, InputError
from attnzoo.ops.triton_common import interpreter

BACKENDS = ("reference", "torch", "triton", "cuda", "flash_attn", "xformers")


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    supports: Callable[..., List[str]]
    priority: int


_REGISTRY: Dict[str, Dict[str, Implementation]] = {}
_warned: set = set()


def register(op: str, backend: str, *, priority: int, supports: Callable[..., List[str]] | None = None):
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = Implementation(op, backend, fn, supports or (lambda **_: []), priority)
        return fn

    return deco


def ops() -> List[str]:
    return sorted(_REGISTRY)


def implementations(op: str) -> List[Implementation]:
    """The implementations of ``op``, best first."""
    return sorted(_REGISTRY.get(op, {}).values(), key=lambda i: -i.priority)


def why_not(op: str, **inputs) -> Dict[str, List[str]]:
    """For every known backend, the reasons it cannot run ``op`` on ``inputs`` (empty list = it can)."""
    out = {}
    impls = _REGISTRY.get(op, {})
    for b in BACKENDS:
        out[b] = impls[b].supports(**inputs) if b in impls else [f"no {b} implementation of {op} exists yet"]
    return out


def _format_reasons(reasons: Dict[str, List[str]]) -> str:
    return "\n".join(f"  - {b}: " + "; ".join(r) for b, r in reasons.items() if r)


CAN_RUN = "can run these inputs"


def _format_all(reasons: Dict[str, List[str]]) -> str:
    """Every backend, in :data:`BACKENDS` order: its reasons, or that it can run these inputs."""
    return "\n".join(f"  - {b}: " + ("; ".join(r) if r else CAN_RUN) for b, r in reasons.items())


def _device_of(inputs) -> torch.device | None:
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


# ---------------------------------------------------------------------------------------------------
# The auto policy: ONE table. Rows are matched top to bottom on (op, device kind, feature class); the
# first matching row's backends are tried in order. ``fallback`` are the backends whose pick on a CUDA
# tensor warns once (a slower path than the row intends), naming every earlier backend's reasons.
#
# Why this order: until a committed GPU benchmark shows an attnzoo kernel ahead of a proven engine (none
# exists yet), proven engines serve the features they cover -- flash-attn if installed, else PyTorch's
# SDPA (flash / cuDNN / efficient) through the "torch" backend -- and attnzoo's Triton kernels serve what
# only they do (a bias with its gradient, dense or block-sparse masks, key padding, MoH, DMA, lightning,
# KHA-MLP, the MoH router). On CPU and every non-CUDA device the "torch" backend (PyTorch-native, never a
# Tq x Tk matrix) serves everything; the reference is the last resort everywhere.


def _attention_plain(inputs) -> bool:
    return all(inputs.get(n) is None for n in ("bias", "mask", "block_mask", "key_padding_mask")) and \
        inputs.get("cu_seqlens_q") is None


def _attention_varlen(inputs) -> bool:
    return inputs.get("cu_seqlens_q") is not None


@dataclass(frozen=True)
class AutoRow:
    op: str
    device: str  # "cuda" or "other" (CPU, MPS, XPU, ...)
    when: str  # the feature class, in words
    order: Tuple[str, ...]
    fallback: Tuple[str, ...] = ()
    match: Optional[Callable[[dict], bool]] = None  # None = any inputs


_KERNEL_ONLY_OPS = ("moh_attention", "dynamic_mask_attention", "lightning_attention", "lightning_decode",
                    "kha_mlp")
# the MoH router and row packing: their reference is already PyTorch-native and O(T) (no torch backend)
_ROUTER_OPS = ("moh_router", "moh_pack_rows")

AUTO_TABLE: Tuple[AutoRow, ...] = (
    AutoRow("attention", "cuda", "varlen (cu_seqlens), causal/window/GQA",
            ("flash_attn", "xformers", "torch", "triton", "reference"), ("reference",), _attention_varlen),
    AutoRow("attention", "cuda", "plain, causal, sliding window, GQA/MQA",
            ("flash_attn", "torch", "triton", "reference"), ("reference",), _attention_plain),
    AutoRow("attention", "cuda", "bias (with its gradient), bool mask, block mask, key padding",
            ("triton", "torch", "reference"), ("torch", "reference")),
    AutoRow("attention_with_kvcache", "cuda", "decode against a contiguous or paged cache",
            ("flash_attn", "torch", "triton", "reference"), ("reference",)),
    *(AutoRow(op, "cuda", "any", ("triton", "torch", "reference"), ("torch", "reference")) for op in _KERNEL_ONLY_OPS),
    *(AutoRow(op, "cuda", "any", ("triton", "reference"), ("reference",)) for op in _ROUTER_OPS),
    *(AutoRow(op, "other", "any", ("torch", "reference"), ("reference",))
      for op in ("attention", "attention_with_kvcache") + _KERNEL_ONLY_OPS),
    *(AutoRow(op, "other", "any (the reference is PyTorch-native, O(T))", ("reference",)) for op in _ROUTER_OPS),
)


def _device_kind(device: Optional[torch.device]) -> str:
    return "cuda" if device is not None and device.type == "cuda" else "other"


def auto_row(op: str, inputs: dict) -> Optional[AutoRow]:
    """The row of :data:`AUTO_TABLE` that decides ``op`` on ``inputs`` (None: the op is not in the table)."""
    kind = _device_kind(_device_of(inputs))
    for row in AUTO_TABLE:
        if row.op == op and row.device == kind and (row.match is None or row.match(inputs)):
            return row
    return None


# Whether a backend can run at all on a device, asked without inputs (engines register theirs).
_AVAILABILITY: Dict[str, Callable[[torch.device], List[str]]] = {}


def register_availability(backend: str, fn: Callable[[torch.device], List[str]]) -> None:
    _AVAILABILITY[backend] = fn


def availability(backend: str, device: torch.device) -> List[str]:
    """Why ``backend`` cannot run on ``device`` here, whatever the inputs (empty = it can, for some)."""
    if backend == "triton":
        reasons = triton_device_reasons(device)
        if not reasons and device.type != "cuda":
            reasons = ["auto does not pick the Triton CPU interpreter (it is for tests)"]
        return reasons
    if backend in _AVAILABILITY:
        return _AVAILABILITY[backend](device)
    return []


def auto_table(device: Optional[torch.device] = None) -> List[dict]:
    """The auto policy for ``device`` (default: CUDA if visible, else CPU) on this machine: one dict per row
    with ``op``, ``device``, ``when``, ``order``, ``fallback``, ``unavailable`` (backend -> reasons, for those
    of ``order`` that cannot run here at all) and ``picks`` (the first of ``order`` that can, for typical
    inputs)."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = _device_kind(device)
    out = []
    for row in AUTO_TABLE:
        if row.device != kind:
            continue
        unavailable = {}
        for b in row.order:
            if b not in _REGISTRY.get(row.op, {}):
                unavailable[b] = [f"no {b} implementation of {row.op}"]
            elif availability(b, device):
                unavailable[b] = availability(b, device)
        picks = next((b for b in row.order if b not in unavailable), None)
        out.append(dict(op=row.op, device=kind, when=row.when, order=list(row.order), fallback=list(row.fallback),
                        unavailable=unavailable, picks=picks))
    return out


def format_auto_table(device: Optional[torch.device] = None) -> str:
    """:func:`auto_table` as text (what ``attnzoo info`` prints)."""
    lines = []
    for r in auto_table(device):
        lines.append(f"{r['op']:24s} {r['device']:5s} {r['when']}: {' > '.join(r['order'])} -> {r['picks']}")
        for b, why in r["unavailable"].items():
            lines.append(f"{'':31s}{b}: {'; '.join(why)}")
    return "\n".join(lines)


def _warn_once(op: str, what: str, reasons: Dict[str, List[str]]) -> None:
    key = (op, what + _format_reasons(reasons))
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"attnzoo: {op} on CUDA {what} because:\n{_format_reasons(reasons)}", stacklevel=4)


def select(op: str, backend: str, **inputs) -> Implementation:
    """The implementation of ``op`` to run on ``inputs`` (see the module docstring)."""
    if backend != "auto" and backend not in BACKENDS:
        raise InputError(f"backend: got {backend!r}; expected 'auto' or one of {BACKENDS}")
    if op not in _REGISTRY:
        raise BackendUnavailableError(f"no implementation of {op} is registered")
    if backend != "auto":
        impl = _REGISTRY[op].get(backend)
        reasons = impl.supports(**inputs) if impl is not None else ["not implemented"]
        if reasons:  # the message lists every backend's reasons
            raise BackendUnavailableError(
                f"backend={backend!r} cannot run {op} on these inputs:\n" + _format_all(why_not(op, **inputs))
            )
        return impl
    device = _device_of(inputs)
    row = auto_row(op, inputs)
    if row is not None:
        skipped: Dict[str, List[str]] = {}
        impls = _REGISTRY[op]
        for b in row.order:
            if b not in impls:
                skipped[b] = [f"no {b} implementation of {op} exists yet"]
                continue
            reasons = impls[b].supports(**inputs)
            if not reasons and b == "triton" and (device is None or device.type != "cuda"):
                reasons = ["auto does not pick the Triton CPU interpreter (it is for tests); pass backend='triton'"]
            if reasons:
                skipped[b] = reasons
                continue
            if b in row.fallback and device is not None and device.type == "cuda":
                _warn_once(op, f"falls back to the {b!r} backend ({row.when}: {' > '.join(row.order)})", skipped)
            return impls[b]
        full = why_not(op, **inputs)
        full.update(skipped)
        raise BackendUnavailableError(f"no backend can run {op} on these inputs:\n" + _format_all(full))
    # an op outside the table: registration priority
    skipped = {}
    for impl in implementations(op):
        reasons = impl.supports(**inputs)
        if not reasons and impl.backend == "triton" and device is not None and device.type != "cuda":
            reasons = ["auto does not pick the Triton CPU interpreter (it is for tests); pass backend='triton'"]
        if reasons:
            skipped[impl.backend] = reasons
            continue
        if impl.backend == "reference" and device is not None and device.type == "cuda":
            # every faster backend's reason, including "no implementation exists yet"
            reasons_all = {b: r for b, r in why_not(op, **inputs).items() if b != "reference"}
            _warn_once(op, "falls back to the slow PyTorch reference", {**reasons_all, **skipped})
        return impl
    full = why_not(op, **inputs)
    full.update(skipped)
    raise BackendUnavailableError(f"no backend can run {op} on these inputs:\n" + _format_all(full))


def dispatch(op: str, backend: str, **inputs):
    """Select the implementation of ``op`` for ``inputs`` and run it."""
    return select(op, backend, **inputs).fn(**inputs)


# ---------------------------------------------------------------------------------------------------
# Facts about this environment that backends' ``supports`` share.


_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def triton_interpreter_on() -> bool:
    return interpreter()


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_tensor_reasons(t: torch.Tensor, name: str = "inputs") -> List[str]:
    """Why the Triton kernels cannot take ``t`` here: device, dtype (fp16/bf16/fp32), and bf16 under the
    CPU interpreter (whose bf16 ``tl.dot`` is wrong). Empty if they can."""
    reasons = list(triton_device_reasons(t.device))
    if t.dtype not in KERNEL_DTYPES:
        reasons.append(f"{name}: dtype {t.dtype} is not supported by the Triton kernels (float16, bfloat16, float32)")
    elif t.dtype == torch.bfloat16 and t.device.type == "cpu":
        reasons.append("bfloat16 tl.dot is wrong under the Triton CPU interpreter; run bfloat16 on a GPU")
    return reasons


def triton_device_reasons(device: torch.device) -> List[str]:
    """Why Triton kernels cannot run on ``device`` here (empty if they can)."""
    if not triton_importable():
        return ["triton is not installed"]
    if device.type == "cuda":
        return []
    if device.type == "cpu" and triton_interpreter_on():
        return []
    return [f"Triton kernels need a CUDA tensor (got {device.type}; on CPU only under TRITON_INTERPRET=1)"]
