"""Input validation shared by every functional op and every module: one validator per argument.

Every check raises :class:`attnzoo.errors.InputError` naming the argument, what it got and what it
needs, and runs before any compute. Ops call these helpers first, then dispatch to a backend; module
constructors call the same helpers, so a bad word fails at construction, not at the first forward.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch

from attnzoo.errors import InputError

MAX_HEAD_DIM = 256
#: new queries a decode step may bring: up to this many, the decode ops (split-K over the cache) serve them
MAX_DECODE_QUERIES = 16
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: ``1 / sqrt(head_dim)`` (SPEC §0)."""
    return 1.0 / math.sqrt(head_dim)


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t, *, ranks: Sequence[int], dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    """``t`` must be a tensor of one of ``ranks`` with a dtype in ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise InputError(f"{name}: expected a tensor of rank {want}, got rank {t.dim()} with shape {shape_str(t)}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise InputError(f"{name}: dtype {t.dtype} is not supported; expected one of {[str(d) for d in dtypes]}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], *, dtype: bool = True) -> None:
    """All ``tensors`` share the first one's device (and dtype, if ``dtype``)."""
    first_name, first = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise InputError(f"{n}: is on {t.device} but {first_name} is on {first.device}; all inputs must share one device")
        if dtype and t.dtype != first.dtype:
            raise InputError(f"{n}: has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def check_head_dim(name: str, d: int, *, max_dim: int = MAX_HEAD_DIM) -> None:
    if not (1 <= d <= max_dim):
        raise InputError(f"{name}: head dim {d} is not supported; attnzoo supports head dims 1..{max_dim}")


def check_heads(q_name: str, h: int, kv_name: str, hkv: int) -> None:
    if hkv < 1 or h % hkv != 0:
        raise InputError(
            f"{kv_name}: has {hkv} heads, which must divide the {h} heads of {q_name} (H % Hkv == 0 for GQA/MQA)"
        )


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> int:
    """``cu`` is int32, 1-D, starts at 0, non-decreasing, ends at ``total``. Returns the number of sequences.

    Reads ``cu`` on the host (one sync): varlen shapes need it anyway to size the launch grid.
    """
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        got = shape_str(cu) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise InputError(f"{name}: expected a 1-D integer tensor (int32) of length n_seqs + 1 >= 2, got {got}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise InputError(f"{name}: dtype {cu.dtype} is not supported; expected torch.int32 (or int64)")
    if cu.device != device:
        raise InputError(f"{name}: is on {cu.device} but the inputs are on {device}")
    vals = cu.tolist()
    if vals[0] != 0:
        raise InputError(f"{name}: must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise InputError(f"{name}: must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise InputError(f"{name}: ends at {vals[-1]} but the packed inputs hold {total} tokens; they must add up")
    return len(vals) - 1


def check_broadcast(name: str, t: torch.Tensor, B: int, H: int, Hkv: int, Tq: int, Tk: int) -> None:
    """``t`` (bias or mask) must be 4-D with dims from ``{B|1} x {H|Hkv|1} x {Tq|1} x Tk`` (SPEC §1)."""
    if t.dim() != 4:
        raise InputError(
            f"{name}: expected a 4-D tensor broadcastable to (B, H, Tq, Tk) = ({B}, {H}, {Tq}, {Tk}), got shape {shape_str(t)}"
        )
    b, h, tq, tk = t.shape
    allowed = ((b, {B, 1}, "B"), (h, {H, Hkv, 1}, "H, Hkv"), (tq, {Tq, 1}, "Tq"), (tk, {Tk}, "Tk"))
    for i, (got, ok, what) in enumerate(allowed):
        if got not in ok:
            raise InputError(
                f"{name}: shape {shape_str(t)} does not broadcast to (B, H, Tq, Tk) = ({B}, {H}, {Tq}, {Tk}); "
                f"dim {i} is {got}, expected one of {{{what}}}{'' if i == 3 else ' or 1'} = {sorted(ok)}"
            )


# ---------------------------------------------------------------------------------------------------
# Scalar arguments (ops and module constructors alike)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    """``value`` is a bool."""
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected True or False, got {value!r}")
    return value


def check_window(window) -> Tuple[int, int]:
    """``window = (left, right)``: ints (not bools) ``>= 0``, or ``-1`` for unbounded (SPEC §0)."""
    if not (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        raise InputError(f"window: expected a pair of ints (left, right), -1 = unbounded, got {window!r}")
    if any(w < -1 for w in window):
        raise InputError(f"window: sizes must be >= 0, or -1 for unbounded; got {tuple(window)}")
    return tuple(window)


def check_scale(scale, *, optional: bool = True) -> Optional[float]:
    """``scale``: a finite number > 0 (SPEC §0), or None (the op's default) when ``optional``."""
    if scale is None and optional:
        return None
    if not (_is_number(scale) and math.isfinite(scale) and scale > 0):
        want = "a finite float > 0" + (" or None" if optional else "")
        raise InputError(f"scale: expected {want}, got {scale!r}")
    return float(scale)


def check_backend(backend) -> str:
    """``backend``: ``"auto"`` or the name of a known backend (see :mod:`attnzoo.backends`)."""
    from attnzoo.backends import BACKENDS  # the registry owns the list of names

    if backend != "auto" and backend not in BACKENDS:
        raise InputError(f"backend: got {backend!r}; expected 'auto' or one of {tuple(BACKENDS)}")
    return backend


def check_decay(decay, num_heads: int):
    """Lightning's per-head decay rates ``s`` (SPEC §6, ``lambda = exp(-s)``): None (no decay), a finite number
    ``>= 0`` shared by every head, or a floating ``[num_heads]`` tensor of finite rates ``>= 0``. Returned
    unchanged (the tensor's values are read on the host once: rates come from a module or a user, not a
    graph)."""
    if decay is None:
        return None
    if _is_number(decay):
        if not (math.isfinite(decay) and decay >= 0):
            raise InputError(f"decay: rates must be finite and >= 0 (lambda = exp(-s) <= 1), got {decay!r}")
        return decay
    if not isinstance(decay, torch.Tensor):
        raise InputError(f"decay: expected None, a float or a [{num_heads}] tensor of rates, got {type(decay).__name__}")
    if decay.dim() != 1 or decay.shape[0] != num_heads:
        raise InputError(f"decay: expected shape ({num_heads},) (one rate per head), got {shape_str(decay)}")
    if not decay.dtype.is_floating_point:
        raise InputError(f"decay: expected a floating-point tensor, got dtype {decay.dtype}")
    if not torch.compiler.is_compiling():
        bad = ~(torch.isfinite(decay) & (decay >= 0))
        if bool(bad.any()):
            raise InputError(
                f"decay: rates must be finite and >= 0 (lambda = exp(-s) <= 1), got {decay.detach().cpu().tolist()}"
            )
    return decay


def check_module_input(name: str, x, *, dim: int, param: torch.Tensor) -> None:
    """A module's input ``x [batch, seq, dim]``: a floating tensor on the module's device with its dtype
    (any floating dtype under ``torch.autocast``, which casts per op)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = shape_str(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{name}: expected [batch, seq, dim={dim}], got {got}")
    if not x.dtype.is_floating_point:
        raise InputError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts per op
        raise InputError(
            f"{name}: dtype {x.dtype} does not match the module's parameters ({param.dtype}); "
            f"cast the input or the module (module.to({param.dtype}) / x.to({param.dtype}))"
        )
    if x.device != param.device:
        raise InputError(f"{name}: is on {x.device} but the module's parameters are on {param.device}")
