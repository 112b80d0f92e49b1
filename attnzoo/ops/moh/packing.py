"""Packing the active ``(token, head)`` pairs of MoH for the head-sparse kernels (SPEC §3).

From ``gates [B, T, H]`` (0 = inactive) build, without a host sync:

- ``rows [B, H, T]`` int32: for each ``(b, h)`` the positions of its active tokens, ascending, first
  (the rest of the row is padding, never read);
- ``counts [B * H]`` int32: active tokens per ``(b, h)``;
- ``tile_offsets [B * H + 1]`` int32: exclusive prefix sum of ``ceil(counts / block_m)`` -- the flattened
  schedule of row tiles. Program ``p`` of the kernel grid finds its ``(b, h)`` by binary search in it
  and its tile as ``p - tile_offsets[bh]``, so heads with few active tokens take few programs and none
  sits idle between them; programs past ``tile_offsets[-1]`` (the grid is sized by the upper bound
  ``B * H * ceil(T / block_m)``, known without a sync) exit at once.

Because ``rows`` keeps positions sorted, a tile's last row has its largest position: causal kernels stop
the key loop there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    rows: torch.Tensor  # [B, H, T] int32
    counts: torch.Tensor  # [B * H] int32
    tile_offsets: torch.Tensor  # [B * H + 1] int32
    block_m: int
    max_tiles: int  # grid upper bound B * H * ceil(T / block_m)


def pack_active_rows(gates: torch.Tensor, block_m: int) -> PackedRows:
    B, T, H = gates.shape
    active = (gates != 0).transpose(1, 2)  # [B, H, T]
    # stable sort of "inactive" flags: active positions first, in increasing order
    rows = torch.argsort((~active).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    counts = active.sum(-1, dtype=torch.int32).reshape(-1)
    tiles = (counts + block_m - 1) // block_m
    tile_offsets = torch.zeros(B * H + 1, dtype=torch.int32, device=gates.device)
    tile_offsets[1:] = torch.cumsum(tiles, 0)
    return PackedRows(rows.contiguous(), counts, tile_offsets, block_m, B * H * -(-T // block_m))
