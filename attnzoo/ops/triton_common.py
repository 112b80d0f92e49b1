"""What every attnzoo Triton kernel module shares, written once.

Plain Python and torch only -- no ``import triton`` here -- so the backend registry can ask
:func:`interpreter` without importing Triton. Kernel modules import this file; Triton ``@jit`` helpers
shared by the softmax-family kernels live in ``ops/attention/`` beside the kernels that own them.

- ``LOG2E`` / ``LN2``: the kernels run softmax in the log2 domain (``exp2``), scaling scores by
  ``scale * LOG2E`` once per tile and converting the log-sum-exp back with ``LN2``.
- :func:`interpreter`: are Triton kernels running through the CPU interpreter (``TRITON_INTERPRET=1``)?
- :func:`new_output`: a fresh output buffer -- NaN-filled in test mode (``ATTNZOO_FILL_NAN=1``) so an
  element a kernel forgets to write shows up as NaN.
- :func:`tuning_configs`: an autotune list, cut to its first config under ``ATTNZOO_AUTOTUNE=first`` (tests,
  and GPU runs that cannot afford to compile every config).
- :func:`next_pow2`, :func:`head_block`, :func:`length_bucket`: sizes the launchers derive.
- :func:`row_table`: per-row (or per-key) values a kernel reads a tile of at once -- lse, delta, gates,
  positions -- interleaved into one padded fp32 table, so a tile of them is one unmasked, aligned load
  (128-bit / 16-byte ``cp.async``) instead of one masked 4-byte load per value (Triton 3.6 copies a masked
  fp32 row vector as BLOCK_M separate 4-byte ``cp.async``); read in the kernels by
  ``triton_common_jit.row_pair`` / ``row_quad``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, TypeVar, Union

import torch

LOG2E = 1.4426950408889634  # log2(e)
LN2 = 0.6931471805599453  # ln(2) = 1 / LOG2E

T = TypeVar("T")


def interpreter() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fill_nan() -> bool:
    """Test mode: fresh output buffers start as NaN so unwritten elements show up."""
    return os.environ.get("ATTNZOO_FILL_NAN", "0") == "1"


def new_output(shape: Sequence[int], *, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh kernel output of ``shape``: uninitialised, or NaN-filled under ``ATTNZOO_FILL_NAN=1``."""
    if fill_nan():
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def autotune_mode() -> str:
    """``ATTNZOO_AUTOTUNE``: ``"all"`` (default: the autotuner times every config it keeps) or ``"first"``
    (only the first config of each list is compiled and run)."""
    mode = os.environ.get("ATTNZOO_AUTOTUNE", "all")
    if mode not in ("all", "first"):
        raise ValueError(f"ATTNZOO_AUTOTUNE: expected 'all' or 'first', got {mode!r}")
    return mode


def tuning_configs(configs: List[T]) -> List[T]:
    """``configs`` as the autotuner should see them: all, or the first only under ``ATTNZOO_AUTOTUNE=first``.

    Read when a kernel module is imported (Triton's autotuner takes its list then)."""
    return list(configs[:1]) if autotune_mode() == "first" else list(configs)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def head_block(d: int) -> int:
    """The register tile for a head dim ``d``: a power of two, at least 16 (the smallest ``tl.dot`` size)."""
    return max(16, next_pow2(d))


def length_bucket(n: int) -> int:
    """Autotuning key for a sequence length: its power-of-two bucket, clamped to 2^16, not the raw length."""
    return min(next_pow2(max(int(n), 1)), 1 << 16)


ROW_PAD = 128  # row tables are padded to a multiple of this: every kernel tile (BLOCK_M / BLOCK_N) divides it


def row_table(columns: Sequence[Optional[torch.Tensor]], pads: Sequence[Union[int, float]], *, extra: int = 0
              ) -> torch.Tensor:
    """``[..., R_pad, W]`` fp32 side table: row ``r`` holds ``columns[i][..., r]`` in column ``i`` -- floating
    columns as fp32 values, integer ones as their int32 bits (the kernel bit-casts them back) -- and 0 in the
    columns past ``len(columns)``; ``W`` is 2 for up to two columns, else 4 (a row is 8 or 16 bytes, so a
    tile of rows is contiguous and 16-byte aligned). Rows ``R .. R_pad - 1`` hold ``pads[i]``, with
    ``R_pad`` the smallest multiple of :data:`ROW_PAD` that is ``>= R + extra`` (at least ``ROW_PAD``): a
    kernel reading the tile ``[start, start + BLOCK)`` for any ``start < R + extra - BLOCK + 1`` on its tile
    grid stays inside the table. All columns share the leading dims ``[...]`` and ``R``; a ``None`` column
    (not the first) is all zeros."""
    if not 1 <= len(columns) <= 4 or len(pads) != len(columns) or columns[0] is None:
        raise ValueError(f"row_table: 1 to 4 columns with one pad each, got {len(columns)} and {len(pads)}")
    lead, R = tuple(columns[0].shape[:-1]), columns[0].shape[-1]
    for c in columns:
        if c is not None and tuple(c.shape) != lead + (R,):
            raise ValueError(f"row_table: columns must share one shape, got {tuple(c.shape)} and {lead + (R,)}")
    width = 2 if len(columns) <= 2 else 4
    r_pad = max(ROW_PAD, -(-(R + extra) // ROW_PAD) * ROW_PAD)
    dev = columns[0].device
    t = torch.zeros(*lead, r_pad, width, dtype=torch.float32, device=dev)
    for i, (c, pad) in enumerate(zip(columns, pads)):
        if c is None:  # a column of zeros (its pad too)
            continue
        if c.dtype.is_floating_point:
            t[..., i] = float(pad)
            t[..., :R, i] = c.detach().float()
        else:
            t[..., i] = torch.full((), int(pad), dtype=torch.int32, device=dev).view(torch.float32)
            t[..., :R, i] = c.to(torch.int32).contiguous().view(torch.float32)
    return t
