"""Block-sparse mask structure (SPEC §1) and its builders.

A :class:`BlockMask` lists, for every ``(batch, head, query block)``, the key blocks to visit, split into
*full* blocks (every element visible; no per-element test) and *partial* blocks (the per-element
``mask_mod`` decides). Key blocks listed in neither are never loaded. This is the layout of PyTorch
FlexAttention's ``BlockMask`` (``kv_num_blocks``/``kv_indices`` are the partial blocks,
``full_kv_num_blocks``/``full_kv_indices`` the full ones), so one converts into the other.

Shapes: ``kv_num_blocks [B|1, H|1, Mq]`` int32, ``kv_indices [B|1, H|1, Mq, Nk]`` int32 (only the first
``kv_num_blocks`` entries of each row are meaningful), with ``Mq = ceil(Tq / block_q)`` and
``Nk = ceil(Tk / block_k)``. ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` takes broadcastable index
tensors, as FlexAttention's does; ``None`` keeps every element of a partial block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from attnzoo.errors import InputError

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BlockMask:
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: Optional[torch.Tensor] = None
    full_kv_indices: Optional[torch.Tensor] = None
    block_size: Tuple[int, int] = (128, 128)
    seq_lengths: Tuple[int, int] = (0, 0)  # (Tq, Tk) the mask was built for
    mask_mod: Optional[MaskMod] = None

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        b, h, _ = self.kv_num_blocks.shape
        return (b, h, self.seq_lengths[0], self.seq_lengths[1])

    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited, averaged over batch and heads."""
        bq, bk = self.block_size
        nk = -(-self.seq_lengths[1] // bk)
        visited = self.kv_num_blocks.float()
        if self.full_kv_num_blocks is not None:
            visited = visited + self.full_kv_num_blocks.float()
        return float(visited.mean() / max(nk, 1))

    def to_dense(self, B: int, H: int, device=None) -> torch.Tensor:
        """The element mask ``[B, H, Tq, Tk]`` bool (True = visible) this block mask stands for."""
        Tq, Tk = self.seq_lengths
        bq, bk = self.block_size
        device = device or self.kv_num_blocks.device
        mq, nk = -(-Tq // bq), -(-Tk // bk)

        def listed(num, idx):
            # [b, h, Mq, Nk] bool: key block n is among the first num[b, h, m] entries of idx[b, h, m]
            pos = torch.arange(idx.shape[-1], device=idx.device)
            valid = pos < num[..., None].to(idx.device)
            out = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool, device=idx.device)
            safe_idx = torch.where(valid, idx.long().clamp(0, nk - 1), torch.full_like(idx.long(), nk))
            out.scatter_(-1, safe_idx, True)
            return out[..., :nk]

        partial = listed(self.kv_num_blocks, self.kv_indices).to(device)
        full = (
            listed(self.full_kv_num_blocks, self.full_kv_indices).to(device)
            if self.full_kv_num_blocks is not None
            else torch.zeros_like(partial)
        )
        partial = partial.expand(B, H, mq, nk)
        full = full.expand(B, H, mq, nk)

        def to_elems(blocks):
            return blocks.repeat_interleave(bq, dim=2)[:, :, :Tq].repeat_interleave(bk, dim=3)[:, :, :, :Tk]

        dense = to_elems(full)
        part = to_elems(partial)
        if self.mask_mod is not None:
            part = part & _eval_mask_mod(self.mask_mod, B, H, Tq, Tk, device)
        return dense | part


def _eval_mask_mod(mask_mod: MaskMod, B: int, H: int, Tq: int, Tk: int, device) -> torch.Tensor:
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    qi = torch.arange(Tq, device=device).view(1, 1, Tq, 1)
    ki = torch.arange(Tk, device=device).view(1, 1, 1, Tk)
    return torch.as_tensor(mask_mod(b, h, qi, ki), device=device).bool().expand(B, H, Tq, Tk)


def _compress(blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, H, Mq, Nk] bool -> (count [B, H, Mq] int32, indices [B, H, Mq, Nk] int32, listed first in order)."""
    count = blocks.sum(-1).to(torch.int32)
    nk = blocks.shape[-1]
    # stable sort puts listed blocks first, in increasing block order
    key = torch.where(blocks, torch.arange(nk, device=blocks.device), nk + torch.arange(nk, device=blocks.device))
    idx = key.argsort(dim=-1, stable=True).to(torch.int32)
    return count, idx


def band_limited_lists(num: torch.Tensor, idx: torch.Tensor, Tq: int, Tk: int, block_size: Tuple[int, int], *,
                       causal: bool, window_left: int = -1, window_right: int = -1
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block lists (``num [B, H, Mq]``, ``idx [B, H, Mq, Nk]``) with the key blocks that lie wholly outside
    the causal/window band of their query block dropped (SPEC §0: query ``i`` sees key ``j`` iff
    ``-left <= j - i - (Tk - Tq) <= right``; causal means ``right = 0``). The kept blocks stay first in each
    row, in their order; the lists are returned unchanged without a band. Lets a kernel walk the lists
    with no per-block band test (a data-dependent test around the tile loads stops their pipelining)."""
    has_right = causal or window_right >= 0
    has_left = window_left >= 0
    if num is None or not (has_right or has_left):
        return num, idx
    bq, bk = block_size
    Mq, W = idx.shape[-2], idx.shape[-1]
    dev = idx.device
    diag = Tk - Tq
    m = torch.arange(Mq, device=dev).view(Mq, 1)
    q_first = m * bq
    q_last = torch.clamp(m * bq + bq, max=Tq) - 1
    kb = idx.long()
    keep = torch.arange(W, device=dev) < num[..., None].long()
    if has_right:
        right = 0 if causal else window_right
        keep = keep & (kb * bk <= q_last + diag + right)
    if has_left:
        keep = keep & (torch.clamp(kb * bk + bk, max=Tk) - 1 >= q_first + diag - window_left)
    count = keep.sum(-1).to(num.dtype)
    order = (~keep).to(torch.int8).argsort(dim=-1, stable=True)
    return count, torch.gather(idx, -1, order).to(idx.dtype)


def block_mask_from_dense(mask: torch.Tensor, block_size: Tuple[int, int] = (128, 128)) -> BlockMask:
    """Build a :class:`BlockMask` from a dense bool ``mask [B|1, H|1, Tq, Tk]`` (True = visible).

    Blocks entirely visible become full blocks; blocks partly visible become partial blocks whose
    ``mask_mod`` reads the dense mask back.
    """
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise InputError(f"mask: expected a 4-D bool tensor [B|1, H|1, Tq, Tk], got {mask.dtype} {tuple(mask.shape)}")
    B, H, Tq, Tk = mask.shape
    bq, bk = block_size
    mq, nk = -(-Tq // bq), -(-Tk // bk)
    pad = torch.zeros(B, H, mq * bq, nk * bk, dtype=torch.bool, device=mask.device)
    pad[:, :, :Tq, :Tk] = mask
    inside = torch.zeros_like(pad)
    inside[:, :, :Tq, :Tk] = True
    tiles = pad.view(B, H, mq, bq, nk, bk)
    in_tiles = inside.view(B, H, mq, bq, nk, bk)
    anyv = tiles.any(dim=(3, 5))
    # full: every in-range element visible
    allv = (tiles | ~in_tiles).all(dim=(3, 5)) & anyv
    partial = anyv & ~allv
    pc, pi = _compress(partial)
    fc, fi = _compress(allv)
    dense = mask

    def mask_mod(b, h, q, k):
        bb = b if dense.shape[0] > 1 else torch.zeros_like(b)
        hh = h if dense.shape[1] > 1 else torch.zeros_like(h)
        return dense[bb, hh, q, k]

    return BlockMask(pc, pi, fc, fi, (bq, bk), (Tq, Tk), mask_mod)


def block_mask_from_mask_mod(
    mask_mod: MaskMod, B: int, H: int, Tq: int, Tk: int, block_size: Tuple[int, int] = (128, 128), device=None
) -> BlockMask:
    """Build a :class:`BlockMask` by evaluating ``mask_mod`` (FlexAttention's signature) densely.

    ``B``/``H`` may be 1 when the mask does not depend on them. The dense evaluation is
    ``O(B H Tq Tk)`` bits; this is a builder, not a hot path.
    """
    dense = _eval_mask_mod(mask_mod, B, H, Tq, Tk, device or "cpu")
    bm = block_mask_from_dense(dense, block_size)
    bm.mask_mod = mask_mod
    return bm


def causal_mask_mod(Tq: int, Tk: int) -> MaskMod:
    """Bottom-right aligned causal (SPEC §0): query i sees key j iff j <= i + (Tk - Tq)."""
    off = Tk - Tq
    return lambda b, h, q, k: k <= q + off


def window_mask_mod(Tq: int, Tk: int, left: int, right: int = 0) -> MaskMod:
    """Sliding window around the bottom-right diagonal; ``-1`` = unbounded on that side."""
    off = Tk - Tq

    def mod(b, h, q, k):
        d = k - (q + off)
        ok = torch.ones_like(d, dtype=torch.bool)
        if left >= 0:
            ok = ok & (d >= -left)
        if right >= 0:
            ok = ok & (d <= right)
        return ok

    return mod


def document_mask_mod(doc_ids: torch.Tensor, causal: bool = True) -> MaskMod:
    """Tokens attend only within their own document; ``doc_ids [T]`` (or ``[B, T]``) ints."""

    def mod(b, h, q, k):
        d = doc_ids if doc_ids.dim() == 2 else doc_ids.unsqueeze(0)
        bb = b if d.shape[0] > 1 else torch.zeros_like(b)
        same = d[bb, q] == d[bb, k]
        return same & (k <= q) if causal else same

    return mod


def sink_window_mask_mod(Tq: int, Tk: int, num_sink: int, window: int) -> MaskMod:
    """StreamingLLM-style: the first ``num_sink`` keys plus a causal window of ``window`` keys."""
    off = Tk - Tq
    return lambda b, h, q, k: (k <= q + off) & ((k < num_sink) | (k > q + off - window))


def causal_block_mask(B, H, Tq, Tk, block_size=(128, 128), device=None) -> BlockMask:
    return block_mask_from_mask_mod(causal_mask_mod(Tq, Tk), B, H, Tq, Tk, block_size, device)


def window_block_mask(B, H, Tq, Tk, left, right=0, block_size=(128, 128), device=None) -> BlockMask:
    return block_mask_from_mask_mod(window_mask_mod(Tq, Tk, left, right), B, H, Tq, Tk, block_size, device)


def document_block_mask(doc_ids, H=1, causal=True, block_size=(128, 128)) -> BlockMask:
    T = doc_ids.shape[-1]
    B = doc_ids.shape[0] if doc_ids.dim() == 2 else 1
    return block_mask_from_mask_mod(document_mask_mod(doc_ids, causal), B, H, T, T, block_size, doc_ids.device)


def sink_window_block_mask(B, H, Tq, Tk, num_sink, window, block_size=(128, 128), device=None) -> BlockMask:
    return block_mask_from_mask_mod(sink_window_mask_mod(Tq, Tk, num_sink, window), B, H, Tq, Tk, block_size, device)
