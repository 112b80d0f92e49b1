"""DMA selection without a ``Tq x Tk`` mask (SPEC §5).

The bias is query-independent, so one ranking of the keys per (batch, bias head) serves every row:
``rank[j]`` = position of key ``j`` when the keys are sorted by (bias desc, position desc) -- ties go to the
more recent key, as :func:`attnzoo.ops.dma.reference.dma_keep_mask`. Padded keys get ``rank = PAD_RANK``
(never kept). Row ``i`` keeps key ``j`` iff ``j`` is causally visible and ``rank[j] <= cutoff[i]``, where
``cutoff[i]`` is the ``keep_window``-th smallest rank among the row's visible keys (``ALL_RANK`` when fewer
are visible: every visible key; ``-1`` when none is). ``cutoff`` is computed over chunks of rows, so
memory stays ``O(chunk * Tk)``. ``block_min[n]`` = the smallest rank in key block ``n`` (``SKIP_BLOCK`` keys),
from which the visit lists take each key tile's smallest rank.

Visit lists (:func:`visit_lists`): per (batch, bias head, query tile of ``block_m`` rows) the ascending key
tiles of ``block_n`` keys that the tile must visit -- a key tile whose smallest rank is at most the query
tile's largest cutoff and that starts inside the causal band of the query tile's last row -- and the
transposed lists per key tile. A kernel walks such a list (``for i in range(count): kt = list[i]``) with
no data-dependent branch around its loads, so the loads pipeline. Building them costs
``O(Tq/block_m * Tk/block_n)`` per (batch, head) -- tile-level, like a BlockMask's lists (int32, one row of
``Tk/block_n`` entries per query tile) -- computed over chunks of tiles.

Pure PyTorch (traceable by torch.compile); no triton import.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

PAD_RANK = 2**31 - 1  # padded keys: above every cutoff
ALL_RANK = 2**30  # cutoff of a row that keeps every visible key
SKIP_BLOCK = 16  # key-block granularity of block_min (kernel tiles are multiples of it)
CHUNK_ELEMS = 1 << 24  # masked-rank elements per chunk of rows


def key_ranks(bias: torch.Tensor, key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``bias [B, Hb, Tk]`` -> ``rank [B, Hb, Tk]`` int32 (0 = kept first); padded keys ``PAD_RANK``."""
    B, Hb, Tk = bias.shape
    # stable descending sort of the reversed key axis: among equal biases the more recent key comes first
    order = bias.detach().flip(-1).argsort(dim=-1, descending=True, stable=True)
    pos = torch.arange(Tk, device=bias.device).expand(B, Hb, Tk)
    rank = torch.empty(B, Hb, Tk, dtype=torch.int64, device=bias.device)
    rank.scatter_(-1, Tk - 1 - order, pos)
    rank = rank.to(torch.int32)
    if key_padding_mask is not None:
        rank = rank.masked_fill(~key_padding_mask.bool()[:, None, :], PAD_RANK)
    return rank.contiguous()


def row_cutoffs(rank: torch.Tensor, keep_window: int, Tq: int, causal: bool,
                chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """``cutoff [B, Hb, Tq]`` int32 for ``rank [B, Hb, Tk]`` (padded keys already ``PAD_RANK``)."""
    B, Hb, Tk = rank.shape
    dev = rank.device
    diag = Tk - Tq
    if keep_window >= Tk:
        # every visible key; -1 for a row that sees none (no causal key, or all padded)
        cnt_pad = (rank != PAD_RANK)
        if causal:
            last = torch.arange(Tq, device=dev) + diag  # last visible key of each row
            # any real key at position <= last? via prefix counts
            pref = cnt_pad.to(torch.int32).cumsum(-1)  # [B, Hb, Tk]
            idx = last.clamp(min=0, max=max(Tk - 1, 0))
            has = (pref.index_select(-1, idx) > 0) & (last >= 0)
        else:
            has = cnt_pad.any(-1, keepdim=True).expand(B, Hb, Tq)
        return torch.where(has, ALL_RANK, -1).to(torch.int32).contiguous()
    out = torch.empty(B, Hb, Tq, dtype=torch.int32, device=dev)
    rows = max(1, chunk_elems // max(B * Hb * Tk, 1))
    keys = torch.arange(Tk, device=dev)
    r64 = rank.to(torch.int64)
    for r0 in range(0, Tq, rows):
        r1 = min(Tq, r0 + rows)
        m = r64[:, :, None, :].expand(B, Hb, r1 - r0, Tk)
        if causal:
            vis = keys[None, :] <= (torch.arange(r0, r1, device=dev) + diag)[:, None]  # [rows, Tk]
            m = m.masked_fill(~vis, PAD_RANK)
        kth = m.kthvalue(keep_window, dim=-1).values  # PAD_RANK when fewer than keep_window are visible
        any_vis = m.min(-1).values != PAD_RANK
        cut = torch.where(kth == PAD_RANK, ALL_RANK, kth)
        out[:, :, r0:r1] = torch.where(any_vis, cut, -1).to(torch.int32)
    return out


def block_min_ranks(rank: torch.Tensor, block: int = SKIP_BLOCK) -> torch.Tensor:
    """``[B, Hb, ceil(Tk / block)]`` int32: the smallest rank of each key block."""
    B, Hb, Tk = rank.shape
    nb = -(-Tk // block)
    padded = torch.full((B, Hb, nb * block), PAD_RANK, dtype=torch.int32, device=rank.device)
    padded[:, :, :Tk] = rank
    return padded.view(B, Hb, nb, block).amin(-1).contiguous()


def _tile_bounds(cutoff: torch.Tensor, block_min: torch.Tensor, Tk: int, block_m: int, block_n: int,
                 causal: bool, skip_block: int):
    """Per query tile its largest cutoff ``[B, Hb, nm]`` and (causal, else None) the end of its last row's
    keys ``[nm]``; per key tile its smallest rank ``[B, Hb, nn]`` and first key ``[nn]``."""
    if block_n % skip_block:
        raise ValueError(f"block_n={block_n} must be a multiple of skip_block={skip_block}")
    B, Hb, Tq = cutoff.shape
    dev = cutoff.device
    nm, nn = -(-Tq // block_m), -(-Tk // block_n)
    cut = torch.full((B, Hb, nm * block_m), -1, dtype=torch.int32, device=dev)
    cut[:, :, :Tq] = cutoff
    max_cut = cut.view(B, Hb, nm, block_m).amax(-1)
    per = block_n // skip_block
    bmin = torch.full((B, Hb, nn * per), PAD_RANK, dtype=torch.int32, device=dev)
    bmin[:, :, :block_min.shape[-1]] = block_min
    tile_min = bmin.view(B, Hb, nn, per).amin(-1)
    hi = None
    if causal:
        last = (torch.arange(nm, device=dev) + 1) * block_m
        hi = torch.clamp(torch.clamp(last, max=Tq) + (Tk - Tq), max=Tk)
    return max_cut, hi, tile_min, torch.arange(nn, device=dev) * block_n


def _visit(max_cut, hi, tile_min, start_n):
    """The visit matrix ``[B, Hb, len(max_cut), len(tile_min)]`` of some query tiles and key tiles."""
    visit = tile_min[:, :, None, :] <= max_cut[:, :, :, None]
    if hi is not None:
        visit = visit & (start_n[None, :] < hi[:, None])
    return visit


def tile_visits(cutoff: torch.Tensor, block_min: torch.Tensor, Tk: int, block_m: int, block_n: int,
                causal: bool, skip_block: int = SKIP_BLOCK) -> torch.Tensor:
    """``[B, Hb, ceil(Tq / block_m), ceil(Tk / block_n)]`` bool: does query tile ``m`` visit key tile ``n``?

    Yes iff the key tile's smallest rank (from ``block_min``, ``block_n`` a multiple of ``skip_block``) is at
    most the query tile's largest cutoff and (causal) the key tile starts at or before the diagonal of the
    query tile's last row. Every (row, key) pair that is kept lies in a visited tile pair."""
    return _visit(*_tile_bounds(cutoff, block_min, Tk, block_m, block_n, causal, skip_block))


def compact(visit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``visit [..., n]`` bool -> ``(count [...], index [..., n])`` int32 contiguous: the positions of the
    True entries in ascending order first (the rest of each row is padding, never read)."""
    n = visit.shape[-1]
    pos = torch.arange(n, dtype=torch.int32, device=visit.device).expand_as(visit)
    index = torch.where(visit, pos, n).sort(-1).values.to(torch.int32)
    return visit.sum(-1, dtype=torch.int32).contiguous(), index.contiguous()


def visit_lists(cutoff: torch.Tensor, block_min: torch.Tensor, Tk: int, block_m: int, block_n: int,
                causal: bool, by: str = "query", chunk_elems: int = CHUNK_ELEMS
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The compacted :func:`tile_visits`: ``by="query"``: per query tile its key tiles (``count [B, Hb, nm]``,
    ``index [B, Hb, nm, nn]``); ``by="key"``: per key tile its query tiles (``[B, Hb, nn]``,
    ``[B, Hb, nn, nm]``). Indices ascend. Built over chunks of tiles (``chunk_elems`` visit-matrix entries
    each), so the transient memory beyond the lists is ``O(chunk)``."""
    if by not in ("query", "key"):
        raise ValueError(f"by: expected 'query' or 'key', got {by!r}")
    max_cut, hi, tile_min, start_n = _tile_bounds(cutoff, block_min, Tk, block_m, block_n, causal, SKIP_BLOCK)
    B, Hb, nm = max_cut.shape
    nn = tile_min.shape[-1]
    rows, width = (nm, nn) if by == "query" else (nn, nm)
    count = torch.empty(B, Hb, rows, dtype=torch.int32, device=cutoff.device)
    index = torch.empty(B, Hb, rows, width, dtype=torch.int32, device=cutoff.device)
    step = max(1, chunk_elems // max(B * Hb * width, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if by == "query":
            visit = _visit(max_cut[:, :, r0:r1], None if hi is None else hi[r0:r1], tile_min, start_n)
        else:
            visit = _visit(max_cut, hi, tile_min[:, :, r0:r1], start_n[r0:r1]).transpose(-1, -2)
        count[:, :, r0:r1], index[:, :, r0:r1] = compact(visit)
    return count, index


def dma_select(bias: torch.Tensor, keep_window: int, Tq: int, causal: bool,
               key_padding_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rank [B, Hb, Tk], cutoff [B, Hb, Tq], block_min [B, Hb, ceil(Tk/16)])``, all int32 contiguous."""
    rank = key_ranks(bias, key_padding_mask)
    return rank, row_cutoffs(rank, keep_window, Tq, causal), block_min_ranks(rank)


def keep_mask_from_ranks(rank: torch.Tensor, cutoff: torch.Tensor, causal: bool) -> torch.Tensor:
    """The dense ``[B, Hb, Tq, Tk]`` keep mask these describe (tests only)."""
    Tq, Tk = cutoff.shape[-1], rank.shape[-1]
    keep = rank[:, :, None, :].long() <= cutoff[:, :, :, None].long()
    if causal:
        i = torch.arange(Tq, device=rank.device)[:, None]
        j = torch.arange(Tk, device=rank.device)[None, :]
        keep = keep & (j <= i + (Tk - Tq))
    return keep
