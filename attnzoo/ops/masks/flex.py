"""Conversion between :class:`attnzoo.BlockMask` and PyTorch FlexAttention's ``BlockMask``.

Both store, per ``(batch, head, query block)``, the partial key blocks (``kv_num_blocks``/``kv_indices``,
the element-wise ``mask_mod`` applies) and the full ones (``full_kv_num_blocks``/``full_kv_indices``,
no per-element test), with the same ``mask_mod(b, h, q_idx, kv_idx)`` signature -- so conversion shares
the tensors and keeps the mask_mod. FlexAttention's "no mask_mod" is its ``noop_mask``; attnzoo's is None.
The transposed (query-block) lists FlexAttention keeps for its backward are rebuilt by ``from_kv_blocks``.
"""

from __future__ import annotations

from attnzoo.ops.masks.block_mask import BlockMask


def _noop_mask():
    from torch.nn.attention.flex_attention import noop_mask

    return noop_mask


def from_flex(bm) -> BlockMask:
    """A ``torch.nn.attention.flex_attention.BlockMask`` -> :class:`attnzoo.BlockMask` (tensors shared)."""
    mask_mod = getattr(bm, "mask_mod", None)
    if mask_mod is _noop_mask():
        mask_mod = None
    block_size = bm.BLOCK_SIZE
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    return BlockMask(
        kv_num_blocks=bm.kv_num_blocks,
        kv_indices=bm.kv_indices,
        full_kv_num_blocks=bm.full_kv_num_blocks,
        full_kv_indices=bm.full_kv_indices,
        block_size=tuple(int(s) for s in block_size),
        seq_lengths=tuple(int(s) for s in bm.seq_lengths),
        mask_mod=mask_mod,
    )


def to_flex(bm: BlockMask):
    """:class:`attnzoo.BlockMask` -> ``torch.nn.attention.flex_attention.BlockMask`` (tensors shared)."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    kw = dict(
        full_kv_num_blocks=bm.full_kv_num_blocks,
        full_kv_indices=bm.full_kv_indices,
        BLOCK_SIZE=tuple(bm.block_size),
        mask_mod=bm.mask_mod if bm.mask_mod is not None else _noop_mask(),
    )
    try:
        return FlexBlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, seq_lengths=tuple(bm.seq_lengths), **kw)
    except TypeError:  # older torch without seq_lengths: lengths are the padded block extents
        return FlexBlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, **kw)
