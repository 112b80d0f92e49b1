"""The backend registry: for each op, the backends that implement it, what each supports, and dispatch.

Each implementation registers with ``register(op, backend, priority=..., supports=...)``. ``supports``
receives the op's (validated) keyword arguments and returns a list of reasons it cannot run them -- an
empty list means it can. ``select(op, backend, **inputs)``:

- a named backend runs if it can, else raises :class:`BackendUnavailableError` listing, per backend,
  why not;
- ``"auto"`` takes the highest-priority backend that can run. It never picks a Triton kernel running
  through the CPU interpreter (that is for tests; ask for ``backend="triton"`` explicitly). On a CUDA tensor
  it never drops to the slow reference silently: it warns once per (op, reasons), naming the reasons.

Backend choice happens in Python before any custom op is called, so ``torch.compile`` sees only the
chosen op (no graph break from dispatch).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from attnzoo.errors import BackendUnavailableError, InputError
from attnzoo.ops.triton_common import interpreter

BACKENDS = ("reference", "triton", "cuda")


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


def _device_of(inputs) -> torch.device | None:
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return None


def select(op: str, backend: str, **inputs) -> Implementation:
    """The implementation of ``op`` to run on ``inputs`` (see the module docstring)."""
    if backend != "auto" and backend not in BACKENDS:
        raise InputError(f"backend: got {backend!r}; expected 'auto' or one of {BACKENDS}")
    if op not in _REGISTRY:
        raise BackendUnavailableError(f"no implementation of {op} is registered")
    if backend != "auto":
        reasons = why_not(op, **inputs)[backend]
        if reasons:
            raise BackendUnavailableError(
                f"backend={backend!r} cannot run {op} on these inputs:\n" + _format_reasons(why_not(op, **inputs))
            )
        return _REGISTRY[op][backend]
    skipped: Dict[str, List[str]] = {}
    device = _device_of(inputs)
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
            key = (op, _format_reasons({**reasons_all, **skipped}))
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"attnzoo: {op} on CUDA falls back to the slow PyTorch reference because:\n{key[1]}",
                    stacklevel=3,
                )
        return impl
    raise BackendUnavailableError(f"no backend can run {op} on these inputs:\n" + _format_reasons(skipped))


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
