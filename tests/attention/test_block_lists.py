"""Host-side builders the block-mask kernels rely on: the band-limited block lists
(:func:`attnzoo.ops.masks.block_mask.band_limited_lists`, which let the kernels walk the listed blocks with no
band test of their own) and the padded element mask (:func:`attnzoo.ops.attention.triton_fwd.pad_elem_mask`)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.ops.masks.block_mask import _compress, band_limited_lists

from bands import BAND_MODES, band_args


def band(Tq, Tk, causal, left, right):
    """[Tq, Tk] bool: the causal/window band of SPEC §0 (bottom-right aligned)."""
    d = torch.arange(Tk).view(1, Tk) - torch.arange(Tq).view(Tq, 1) - (Tk - Tq)
    keep = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal or right >= 0:
        keep &= d <= (0 if causal else right)
    if left >= 0:
        keep &= d >= -left
    return keep


def listed(num, idx, nk):
    """[B, H, Mq, nk] bool: which key blocks each row lists."""
    pos = torch.arange(idx.shape[-1])
    valid = pos < num[..., None]
    out = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(valid, idx.long(), nk), True)
    return out[..., :nk]


@settings(max_examples=40)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    Tq=st.integers(1, 80),
    Tk=st.integers(1, 80),
    bq=st.sampled_from([16, 32]),
    bk=st.sampled_from([16, 32]),
    p=st.sampled_from([0.3, 0.7, 1.0]),
    mode=st.sampled_from(BAND_MODES),
    left=st.integers(0, 40),
    right=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_band_limited_lists_keep_exactly_the_blocks_the_band_reaches(B, H, Tq, Tk, bq, bk, p, mode, left, right, seed):
    gen = torch.Generator().manual_seed(seed)
    mq, nk = -(-Tq // bq), -(-Tk // bk)
    blocks = torch.rand(B, H, mq, nk, generator=gen) < p
    num, idx = _compress(blocks)
    # scramble the unused tail of each row: only the first num entries may matter
    idx = torch.where(torch.arange(nk) < num[..., None], idx, torch.randint(0, nk, idx.shape, generator=gen,
                                                                           dtype=torch.int32))
    causal, wl, wr = band_args(mode, left, right)
    got_num, got_idx = band_limited_lists(num, idx, Tq, Tk, (bq, bk), causal=causal, window_left=wl, window_right=wr)
    assert got_num.dtype == num.dtype and got_idx.dtype == idx.dtype and got_idx.shape == idx.shape

    # brute force: block (m, n) meets the band iff some in-range element of it is in the band
    bnd = torch.zeros(mq * bq, nk * bk, dtype=torch.bool)
    bnd[:Tq, :Tk] = band(Tq, Tk, causal, wl, wr)
    reach = bnd.view(mq, bq, nk, bk).any(dim=(1, 3))
    want = blocks & reach
    assert torch.equal(got_num, want.sum(-1).to(num.dtype))
    assert torch.equal(listed(got_num, got_idx, nk), want)
    # the kept blocks keep their order (ascending here, as _compress lists them)
    for b in range(B):
        for h in range(H):
            for m in range(mq):
                row = got_idx[b, h, m, : int(got_num[b, h, m])].tolist()
                assert row == sorted(row)


def test_band_limited_lists_without_band_are_untouched():
    num, idx = _compress(torch.rand(1, 1, 3, 4) < 0.5)
    got = band_limited_lists(num, idx, 40, 60, (16, 16), causal=False)
    assert got[0] is num and got[1] is idx
    assert band_limited_lists(None, None, 40, 60, (16, 16), causal=True) == (None, None)


def test_band_limited_lists_causal_example():
    """Tq = Tk = 64, 16-blocks, every block listed: causal keeps the lower triangle of blocks; a left
    window of 16 keeps the diagonal and the one before it."""
    num, idx = _compress(torch.ones(1, 1, 4, 4, dtype=torch.bool))
    n, i = band_limited_lists(num, idx, 64, 64, (16, 16), causal=True)
    assert n.view(-1).tolist() == [1, 2, 3, 4]
    assert [i[0, 0, m, : m + 1].tolist() for m in range(4)] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    n, i = band_limited_lists(num, idx, 64, 64, (16, 16), causal=True, window_left=16)
    assert n.view(-1).tolist() == [1, 2, 2, 2]
    assert [i[0, 0, m, : int(n[0, 0, m])].tolist() for m in range(4)] == [[0], [0, 1], [1, 2], [2, 3]]


@pytest.mark.parametrize("tk", [1, 16, 37, 64])
def test_pad_elem_mask(tk):
    from attnzoo.ops.attention.triton_fwd import pad_elem_mask

    assert pad_elem_mask(None) is None
    em = torch.rand(2, 1, 5, tk) < 0.5
    got = pad_elem_mask(em)
    cols = -(-tk // 16) * 16
    if cols == tk:
        assert got is em  # aligned already: no copy
    else:
        assert got.shape == (2, 1, 5, cols) and got.dtype == em.dtype and got.stride(-1) == 1
        assert torch.equal(got[..., :tk], em) and not got[..., tk:].any()
    # a strided key dim is copied to unit stride
    wide = torch.rand(2, 1, 5, 2 * cols) < 0.5
    strided = wide[..., ::2]
    got = pad_elem_mask(strided)
    assert got.stride(-1) == 1 and torch.equal(got[..., : strided.shape[-1]], strided)
