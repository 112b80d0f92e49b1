"""Triton kernels of the MoH active-row packing (SPEC §3), same result as
:func:`attnzoo.ops.moh.packing.pack_active_rows`.

Algorithm: one program per ``(b, h)``: a counting pass over ``gates[b, :, h] != 0``, then a stable partition by
  prefix sums (``tl.cumsum`` per chunk plus a running total): active token ``t`` goes to ``rows[#active
  before t]``, inactive ones to ``count + #inactive before t``; no sort. Shared heads (the first
  ``num_shared``) are always active: their program writes ``arange(T)`` and ``count = T`` without reading
  the gates. A one-program kernel then writes ``tile_offsets`` (exclusive prefix sum of
  ``ceil(count / block_m)``). No host sync anywhere: grids depend on shapes only.

This module imports triton: import it lazily (the MoH Triton backend does).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops.triton_common import interpreter
from attnzoo.ops.moh.packing import PackedRows


@triton.jit(do_not_specialize=["T", "H", "num_shared"])
def _pack_rows_kernel(G, Rows, Counts, T, H, sgb, sgt, sgh, num_shared, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    row_base = Rows + bh.to(tl.int64) * T
    offs = tl.arange(0, BLOCK)
    if h < num_shared:  # shared head: always active, no list to build
        for start in range(0, T, BLOCK):
            tpos = start + offs
            tl.store(row_base + tpos, tpos, mask=tpos < T)
        tl.store(Counts + bh, T)
    else:
        g_base = G + b.to(tl.int64) * sgb + h * sgh
        count = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
        for start in range(0, T, BLOCK):
            tpos = start + offs
            act = tl.load(g_base + tpos.to(tl.int64) * sgt, mask=tpos < T, other=0.0) != 0
            count += tl.sum(act.to(tl.int32), 0)
        before = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)  # active tokens before this chunk
        for start in range(0, T, BLOCK):
            tpos = start + offs
            inb = tpos < T
            act = (tl.load(g_base + tpos.to(tl.int64) * sgt, mask=inb, other=0.0) != 0).to(tl.int32)
            act_before = before + tl.cumsum(act, 0) - act  # active tokens before tpos
            dest = tl.where(act != 0, act_before, count + (tpos - act_before))
            tl.store(row_base + dest, tpos, mask=inb)
            before += tl.sum(act, 0)
        tl.store(Counts + bh, count)


@triton.jit(do_not_specialize=["BH", "block_m"])
def _tile_offsets_kernel(Counts, TileOff, BH, block_m, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    total = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
    tl.store(TileOff, total)
    for start in range(0, BH, BLOCK):
        i = start + offs
        c = tl.load(Counts + i, mask=i < BH, other=0)
        tiles = (c + block_m - 1) // block_m
        tl.store(TileOff + 1 + i, total + tl.cumsum(tiles, 0), mask=i < BH)
        total += tl.sum(tiles, 0)


@torch.library.custom_op("attnzoo::moh_pack_rows", mutates_args=())
def moh_pack_rows(
    gates: torch.Tensor, block_m: int, num_shared: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [B, H, T], counts [B*H], tile_offsets [B*H+1])``, int32, as ``pack_active_rows`` (heads
    ``< num_shared`` count as active everywhere)."""
    B, T, H = gates.shape
    rows = torch.empty(B, H, T, dtype=torch.int32, device=gates.device)
    counts = torch.empty(B * H, dtype=torch.int32, device=gates.device)
    offs = torch.empty(B * H + 1, dtype=torch.int32, device=gates.device)
    if B * H == 0:
        return rows, counts, offs.zero_()
    block = 16 if interpreter() else min(1024, max(16, triton.next_power_of_2(T)))
    _pack_rows_kernel[(B * H,)](gates, rows, counts, T, H, *gates.stride(), int(num_shared), BLOCK=block,
                                num_warps=1 if interpreter() else 4)
    block = 16 if interpreter() else min(1024, max(16, triton.next_power_of_2(B * H)))
    _tile_offsets_kernel[(1,)](counts, offs, B * H, int(block_m), BLOCK=block, num_warps=1 if interpreter() else 4)
    return rows, counts, offs


@moh_pack_rows.register_fake
def _moh_pack_rows_fake(gates, block_m, num_shared):
    B, T, H = gates.shape
    return (gates.new_empty(B, H, T, dtype=torch.int32), gates.new_empty(B * H, dtype=torch.int32),
            gates.new_empty(B * H + 1, dtype=torch.int32))


def pack_active_rows_triton(gates: torch.Tensor, block_m: int, num_shared: int = 0) -> PackedRows:
    """Drop-in for :func:`attnzoo.ops.moh.packing.pack_active_rows` (identical tensors, padding included,
    when the shared heads' gates are nonzero)."""
    B, T, H = gates.shape
    rows, counts, offs = moh_pack_rows(gates, int(block_m), int(num_shared))
    return PackedRows(rows, counts, offs, int(block_m), B * H * -(-T // int(block_m)))
