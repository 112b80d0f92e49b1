"""Block masks (SPEC §1): every builder's ``to_dense`` equals its mask_mod evaluated element by element, the
block structure is consistent (full blocks fully visible, unlisted blocks empty), and ``density()`` counts
visited block pairs. Lengths are deliberately not multiples of the block size."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo.ops.masks import block_mask as M

BLOCKS = [(4, 4), (3, 5), (8, 2), (16, 16), (5, 3)]


def eval_elementwise(mask_mod, B, H, Tq, Tk):
    """mask_mod evaluated one scalar index at a time (independent of the library's broadcast evaluation)."""
    out = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                for j in range(Tk):
                    r = mask_mod(torch.tensor(b), torch.tensor(h), torch.tensor(i), torch.tensor(j))
                    out[b, h, i, j] = bool(r)
    return out


def check_structure(bm: attnzoo.BlockMask, dense: torch.Tensor):
    """Listed blocks are valid, distinct and disjoint between full/partial; full blocks are entirely
    visible, partial ones partly, unlisted ones not at all (they are never loaded)."""
    Tq, Tk = bm.seq_lengths
    bq, bk = bm.block_size
    mq, nk = -(-Tq // bq), -(-Tk // bk)
    assert bm.kv_num_blocks.shape[-1] == mq and bm.kv_indices.shape[-1] == nk
    assert bm.kv_num_blocks.dtype == torch.int32 and bm.kv_indices.dtype == torch.int32
    B, H = dense.shape[:2]
    for b in range(B):
        for h in range(H):
            bb = b if bm.kv_num_blocks.shape[0] > 1 else 0
            hh = h if bm.kv_num_blocks.shape[1] > 1 else 0
            for m in range(mq):
                part = bm.kv_indices[bb, hh, m, : bm.kv_num_blocks[bb, hh, m]].tolist()
                full = bm.full_kv_indices[bb, hh, m, : bm.full_kv_num_blocks[bb, hh, m]].tolist()
                assert len(set(part)) == len(part) and len(set(full)) == len(full)
                assert not set(part) & set(full)
                assert all(0 <= n < nk for n in part + full)
                for n in range(nk):
                    tile = dense[b, h, m * bq : (m + 1) * bq, n * bk : (n + 1) * bk]
                    if n in full:
                        assert tile.all()
                    elif n in part:
                        assert tile.any() and not tile.all()
                    else:
                        assert not tile.any()


dims = st.integers(1, 21)


@given(dims, dims, st.sampled_from(BLOCKS), st.integers(1, 2), st.integers(1, 2))
def test_causal_block_mask(Tq, Tk, bs, B, H):
    bm = M.causal_block_mask(B, H, Tq, Tk, block_size=bs)
    dense = bm.to_dense(B, H)
    assert dense.shape == (B, H, Tq, Tk) and dense.dtype == torch.bool
    want = eval_elementwise(M.causal_mask_mod(Tq, Tk), B, H, Tq, Tk)
    assert torch.equal(dense, want)
    # and the formula itself: bottom-right causal
    assert torch.equal(want[0, 0], torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq))
    check_structure(bm, want)


@given(dims, dims, st.sampled_from(BLOCKS), st.integers(-1, 7), st.integers(-1, 4))
def test_window_block_mask(Tq, Tk, bs, left, right):
    bm = M.window_block_mask(1, 1, Tq, Tk, left, right, block_size=bs)
    want = eval_elementwise(M.window_mask_mod(Tq, Tk, left, right), 1, 1, Tq, Tk)
    assert torch.equal(bm.to_dense(1, 1), want)
    for i in range(Tq):
        for j in range(Tk):
            d = j - (i + Tk - Tq)
            assert bool(want[0, 0, i, j]) == ((left < 0 or d >= -left) and (right < 0 or d <= right))
    check_structure(bm, want)


@given(st.integers(1, 21), st.sampled_from(BLOCKS), st.booleans(), st.integers(0, 1000), st.booleans())
def test_document_block_mask(T, bs, causal, seed, batched):
    g = torch.Generator().manual_seed(seed)
    B = 2 if batched else 1
    doc = torch.randint(0, 3, (B, T), generator=g).sort(-1).values
    ids = doc if batched else doc[0]
    bm = M.document_block_mask(ids, H=2, causal=causal, block_size=bs)
    dense = bm.to_dense(B, 2)
    want = eval_elementwise(M.document_mask_mod(ids, causal), B, 2, T, T)
    assert torch.equal(dense, want)
    for b in range(B):
        same = doc[b][:, None] == doc[b][None, :]
        if causal:
            same &= torch.ones(T, T, dtype=torch.bool).tril()
        assert torch.equal(want[b, 0], same)
    check_structure(bm, want)


@given(dims, dims, st.sampled_from(BLOCKS), st.integers(0, 4), st.integers(1, 6))
def test_sink_window_block_mask(Tq, Tk, bs, num_sink, window):
    bm = M.sink_window_block_mask(1, 1, Tq, Tk, num_sink, window, block_size=bs)
    want = eval_elementwise(M.sink_window_mask_mod(Tq, Tk, num_sink, window), 1, 1, Tq, Tk)
    assert torch.equal(bm.to_dense(1, 1), want)
    off = Tk - Tq
    for i in range(Tq):
        visible = {j for j in range(Tk) if j <= i + off and (j < num_sink or j > i + off - window)}
        assert set(torch.nonzero(want[0, 0, i]).flatten().tolist()) == visible
    check_structure(bm, want)


@given(st.integers(1, 2), st.integers(1, 2), dims, dims, st.sampled_from(BLOCKS), st.integers(0, 1000),
       st.sampled_from([0.0, 0.3, 0.9, 1.0]))
def test_block_mask_from_dense_round_trip(B, H, Tq, Tk, bs, seed, p):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(B, H, Tq, Tk, generator=g) < p
    dense |= torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq) & (torch.rand(1, generator=g) < 0.5)
    bm = M.block_mask_from_dense(dense, bs)
    assert bm.seq_lengths == (Tq, Tk) and bm.block_size == bs
    assert torch.equal(bm.to_dense(B, H), dense)
    check_structure(bm, dense)


def test_block_mask_from_dense_broadcast_dims():
    dense = torch.rand(1, 1, 9, 11, generator=torch.Generator().manual_seed(0)) < 0.5
    bm = M.block_mask_from_dense(dense, (4, 4))
    assert bm.kv_num_blocks.shape[:2] == (1, 1)
    out = bm.to_dense(2, 3)
    assert out.shape == (2, 3, 9, 11)
    assert torch.equal(out, dense.expand(2, 3, 9, 11))


def test_block_mask_from_mask_mod_depends_on_batch_and_head():
    mod = lambda b, h, q, k: ((q + k + b + h) % 3) == 0  # noqa: E731
    bm = M.block_mask_from_mask_mod(mod, 2, 3, 7, 10, block_size=(4, 4))
    assert torch.equal(bm.to_dense(2, 3), eval_elementwise(mod, 2, 3, 7, 10))


def blocks_visited(dense, bs):
    """Fraction of (query block, key block) pairs with any visible element, by hand."""
    B, H, Tq, Tk = dense.shape
    bq, bk = bs
    mq, nk = -(-Tq // bq), -(-Tk // bk)
    n = 0
    for b in range(B):
        for h in range(H):
            for m in range(mq):
                for j in range(nk):
                    n += bool(dense[b, h, m * bq : (m + 1) * bq, j * bk : (j + 1) * bk].any())
    return n / (B * H * mq * nk)


@given(dims, dims, st.sampled_from(BLOCKS), st.integers(0, 100))
def test_density(Tq, Tk, bs, seed):
    dense = torch.rand(1, 2, Tq, Tk, generator=torch.Generator().manual_seed(seed)) < 0.2
    bm = M.block_mask_from_dense(dense, bs)
    d = bm.density()
    assert 0.0 <= d <= 1.0
    assert d == pytest.approx(blocks_visited(dense, bs))


def test_density_known_values():
    full = M.block_mask_from_dense(torch.ones(1, 1, 10, 13, dtype=torch.bool), (4, 4))
    assert full.density() == pytest.approx(1.0)
    empty = M.block_mask_from_dense(torch.zeros(1, 1, 10, 13, dtype=torch.bool), (4, 4))
    assert empty.density() == 0.0
    # causal with n x n blocks of equal size: n(n+1)/2 of n^2 block pairs
    n, bs = 5, 4
    causal = M.causal_block_mask(1, 1, n * bs, n * bs, block_size=(bs, bs))
    assert causal.density() == pytest.approx((n + 1) / (2 * n))
    # a narrow window is sparser than causal
    window = M.window_block_mask(1, 1, n * bs, n * bs, 2, 0, block_size=(bs, bs))
    assert window.density() < causal.density()


def test_block_mask_from_dense_rejects_non_bool():
    with pytest.raises(attnzoo.InputError) as e:
        M.block_mask_from_dense(torch.ones(1, 1, 4, 4), (4, 4))
    assert "mask" in str(e.value)
