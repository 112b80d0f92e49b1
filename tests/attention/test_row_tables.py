"""The padded per-row side tables the backward kernels read a tile of rows from with one aligned load
(``triton_common.row_table``; attention dK/dV's ``triton_bwd.row_table``; MoH dK/dV's
``triton_moh.packed_row_table``; DMA's tables are checked in tests/dma/test_dma_visits.py): each holds
exactly the unpacked values it stands for, padded so that every tile a kernel reads stays inside."""

import pytest
import torch

from attnzoo import backends
from attnzoo.ops import triton_common as TC

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(bool(backends.triton_device_reasons(torch.device(DEV))),
                                  reason="Triton cannot run here")


def _bits(t):
    return t.contiguous().view(torch.int32)


def test_row_table_layout_and_padding():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 37, generator=g)
    b = torch.randint(-5, 100, (2, 3, 37), generator=g, dtype=torch.int32)
    c = torch.randn(2, 3, 37, generator=g).half()
    t = TC.row_table([a, b, c], [1.5, -1, 0.0])
    assert t.shape == (2, 3, TC.ROW_PAD, 4) and t.dtype == torch.float32
    assert torch.equal(t[..., :37, 0], a)
    assert torch.equal(_bits(t[..., :37, 1]), b)  # integers travel as their bits
    assert torch.equal(t[..., :37, 2], c.float())
    assert (t[..., 37:, 0] == 1.5).all() and (_bits(t[..., 37:, 1]) == -1).all() and (t[..., 37:, 2] == 0).all()
    assert (t[..., 3] == 0).all()  # the unused fourth column

    # two columns: 8-byte rows; a None column is zeros; ``extra`` rows past the end stay inside the table
    t2 = TC.row_table([a, None], [0.0, 0.0], extra=TC.ROW_PAD)
    assert t2.shape == (2, 3, 2 * TC.ROW_PAD, 2)
    assert torch.equal(t2[..., :37, 0], a) and (t2[..., 1] == 0).all()
    exact = torch.randn(1, TC.ROW_PAD, generator=g)
    assert TC.row_table([exact], [0.0]).shape == (1, TC.ROW_PAD, 2)
    assert TC.row_table([exact], [0.0], extra=1).shape == (1, 2 * TC.ROW_PAD, 2)
    assert TC.row_table([torch.zeros(4, 0)], [0.0]).shape == (4, TC.ROW_PAD, 2)


def test_row_table_rejects_bad_columns():
    with pytest.raises(ValueError, match="share one shape"):
        TC.row_table([torch.zeros(2, 5), torch.zeros(2, 6)], [0.0, 0.0])
    with pytest.raises(ValueError, match="1 to 4 columns"):
        TC.row_table([torch.zeros(5)] * 5, [0.0] * 5)
    with pytest.raises(ValueError, match="1 to 4 columns"):
        TC.row_table([torch.zeros(5)], [0.0, 0.0])


@needs_triton
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_attention_dkdv_row_table(with_bias, varlen):
    """(lse, 0, delta, 0) or, with a bias, (row max, log2 l, delta, 0) per row, in the lse's own layout
    (``[B, H, Tq]``, varlen ``[H, Nq]``); padded rows 0; ``extra`` rows readable past the end."""
    from attnzoo.ops.attention.triton_bwd import row_table

    g = torch.Generator().manual_seed(1)
    shape = (3, 50) if varlen else (2, 3, 50)
    lse = torch.randn(*shape, generator=g)
    lse.view(-1)[7] = float("-inf")  # a row that saw no key
    delta = torch.randn(*shape, generator=g)
    stats = torch.randn(2, *shape, generator=g) if with_bias else None
    extra = TC.ROW_PAD if varlen else 96  # a varlen tile past the packed rows / a 96-row BlockMask block
    t = row_table(lse, stats, delta, extra)
    R = shape[-1]
    assert t.shape[:-2] == shape[:-1] and t.shape[-1] == 4 and t.shape[-2] % TC.ROW_PAD == 0
    assert t.shape[-2] >= R + extra and t.shape[-2] >= -(-R // 96) * 96
    first, second = (stats[0], stats[1]) if with_bias else (lse, torch.zeros_like(lse))
    assert torch.equal(t[..., :R, 0], first) and torch.equal(t[..., :R, 1], second)
    assert torch.equal(t[..., :R, 2], delta) and (t[..., 3] == 0).all()
    assert (t[..., R:, :] == 0).all()
    assert t.is_contiguous() and t.stride(-2) == 4  # 16-byte rows: every row starts 16-byte aligned


@needs_triton
def test_moh_packed_row_table_matches_the_packing():
    """Packed row r of head (b, h) holds (position, lse, delta, gate) of rows[b, h, r] for r < count, and
    (T, 0, 0, 0) past the count and in the padding."""
    from attnzoo.ops.moh.packing import pack_active_rows
    from attnzoo.ops.moh.triton_moh import packed_row_table

    g = torch.Generator().manual_seed(2)
    B, T, H = 2, 45, 3
    gates = torch.rand(B, T, H, generator=g) * (torch.rand(B, T, H, generator=g) > 0.4)
    gates[1, :, 2] = 0.0  # a head with no active row
    gates = gates.half()
    packed = pack_active_rows(gates, 16)
    lse = torch.randn(B, H, T, generator=g)
    delta = torch.randn(B, H, T, generator=g)
    t = packed_row_table(packed.rows, packed.counts, lse, delta, gates)
    assert t.shape == (B, H, TC.ROW_PAD, 4)
    counts = packed.counts.reshape(B, H)
    for b in range(B):
        for h in range(H):
            n = int(counts[b, h])
            pos = packed.rows[b, h, :n].long()
            assert torch.equal(_bits(t[b, h, :n, 0]), pos.int())
            assert torch.equal(t[b, h, :n, 1], lse[b, h, pos])
            assert torch.equal(t[b, h, :n, 2], delta[b, h, pos])
            assert torch.equal(t[b, h, :n, 3], gates[b, pos, h].float())
            assert (_bits(t[b, h, n:, 0]) == T).all() and (t[b, h, n:, 1:] == 0).all()
    assert int(counts[1, 2]) == 0
