"""Input validation shared by every functional op.

Every check raises :class:`attnzoo.errors.InputError` naming the argument, what it got and what it
needs, and runs before any compute. Ops call these helpers first, then dispatch to a backend.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from attnzoo.errors import InputError

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
