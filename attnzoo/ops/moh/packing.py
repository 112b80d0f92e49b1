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


def key_tile_row_ranges(rows: torch.Tensor, counts: torch.Tensor, Tq: int, Tk: int, block_n: int, *,
                        causal: bool, window_left: int = -1, window_right: int = -1) -> torch.Tensor:
    """For each ``(b, h, key tile n)`` the packed-row indices ``[lo, hi)`` whose causal/window band can
    reach keys ``[n * block_n, (n + 1) * block_n)``: ``[B, H, ceil(Tk / block_n), 2]`` int32.

    ``rows``/``counts`` as from :func:`pack_active_rows`. A row's positions are sorted, and the band of
    position ``i`` is keys ``[i + diag - left, i + diag + right]`` (``diag = Tk - Tq``, SPEC §0), so the rows
    that reach a key tile are the contiguous run with ``tile_start - diag - right <= i < tile_end - diag +
    left``: two ``searchsorted`` per tile. Without a bound on a side the run starts at 0 / ends at the
    count. The run may still hold rows that see no key of the tile for a data mask (key padding): the
    kernel's element test removes those. Runs on the rows' device; no host sync."""
    B, H, T = rows.shape
    dev = rows.device
    n_tiles = -(-Tk // block_n)
    has_right = causal or window_right >= 0
    right = 0 if causal else max(window_right, 0)
    has_left = window_left >= 0
    cnt = counts.reshape(B, H, 1).long()
    diag = Tk - Tq
    starts = torch.arange(n_tiles, device=dev, dtype=torch.long) * block_n
    if has_right or has_left:
        # the active prefix of each row list, sorted; padding past the count sorts last
        srt = torch.where(torch.arange(T, device=dev) < cnt, rows.long(), torch.iinfo(torch.int32).max).contiguous()

        def first_at_least(v):  # per (b, h): how many listed positions are < v[n]
            return torch.minimum(torch.searchsorted(srt, v.expand(B, H, n_tiles).contiguous()), cnt)

    if has_right:
        lo = first_at_least(starts - diag - right)
    else:
        lo = torch.zeros(B, H, n_tiles, dtype=torch.long, device=dev)
    hi = first_at_least(starts + block_n - diag + max(window_left, 0)) if has_left else cnt.expand(B, H, n_tiles)
    hi = torch.maximum(hi, lo)
    return torch.stack((lo, hi), -1).to(torch.int32).contiguous()
