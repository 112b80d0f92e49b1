"""DMA visit lists (SPEC §5): the key tiles each query tile walks (and the query tiles each key tile walks
in dK/dV) equal a brute-force evaluation of their rule, cover every kept (row, key) pair, follow
``keep_window`` rather than ``Tk``; the kernels' padded key / row tables hold what they claim; padded keys
holding NaN in their K/V slots never reach the output or the gradients (SPEC §0.3)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import backends
from attnzoo.ops.dma.selection import (
    PAD_RANK, compact, dma_select, keep_mask_from_ranks, tile_visits, visit_lists,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(bool(backends.triton_device_reasons(torch.device(DEV))),
                                  reason="Triton cannot run here")


def _brute_visits(rank, cut, bm, bn, causal):
    """The rule, tile by tile from the ranks and cutoffs themselves (no block minima)."""
    B, Hb, Tk = rank.shape
    Tq = cut.shape[-1]
    nm, nn = -(-Tq // bm), -(-Tk // bn)
    out = torch.zeros(B, Hb, nm, nn, dtype=torch.bool)
    for b in range(B):
        for h in range(Hb):
            for m in range(nm):
                rows = range(m * bm, min(Tq, (m + 1) * bm))
                max_cut = max(int(cut[b, h, i]) for i in rows)
                last = rows[-1]
                for n in range(nn):
                    keys = range(n * bn, min(Tk, (n + 1) * bn))
                    if causal and keys[0] > last + (Tk - Tq):
                        continue
                    out[b, h, m, n] = min(int(rank[b, h, j]) for j in keys) <= max_cut
    return out


def _case(B, Tq, Tk, Hb, keep, kind, pad, causal, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        bias = torch.zeros(B, Hb, Tk)
    elif kind == "ints":
        bias = torch.randint(-2, 3, (B, Hb, Tk), generator=g).float()
    else:
        bias = torch.randn(B, Hb, Tk, generator=g)
    kpm = (torch.rand(B, Tk, generator=g) > 0.3) if pad else None
    return dma_select(bias, keep, Tq, causal, kpm)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2), Tq=st.integers(1, 70), dk=st.integers(-20, 40), Hb=st.integers(1, 2),
    keep=st.integers(1, 40), kind=st.sampled_from(["zeros", "ints", "randn"]), pad=st.booleans(),
    causal=st.booleans(), tiles=st.sampled_from([(16, 16), (16, 32), (32, 16), (64, 64), (32, 64)]),
    chunk=st.sampled_from([1, 3]), seed=st.integers(0, 2**16),
)
def test_visits_equal_brute_force_and_cover_every_kept_pair(B, Tq, dk, Hb, keep, kind, pad, causal, tiles, chunk,
                                                            seed):
    Tk = max(1, Tq + dk)
    bm, bn = tiles
    rank, cut, bmin = _case(B, Tq, Tk, Hb, keep, kind, pad, causal, seed)
    visit = tile_visits(cut, bmin, Tk, bm, bn, causal)
    assert torch.equal(visit, _brute_visits(rank, cut, bm, bn, causal))
    # every kept (row, key) pair lies in a visited (query tile, key tile) pair
    kept = keep_mask_from_ranks(rank, cut, causal)  # [B, Hb, Tq, Tk]
    nm, nn = visit.shape[-2:]
    padded = torch.zeros(B, Hb, nm * bm, nn * bn, dtype=torch.bool)
    padded[:, :, :Tq, :Tk] = kept
    kept_tiles = padded.view(B, Hb, nm, bm, nn, bn).any(-1).any(-2)
    assert not (kept_tiles & ~visit).any()
    # the compacted lists, both ways: ascending visited tiles first
    for by, vis in (("query", visit), ("key", visit.transpose(-1, -2))):
        count, index = visit_lists(cut, bmin, Tk, bm, bn, causal, by=by)
        # built in chunks of a few tiles: the same lists
        c1, i1 = visit_lists(cut, bmin, Tk, bm, bn, causal, by=by, chunk_elems=chunk * vis.shape[-1])
        assert torch.equal(c1, count) and torch.equal(i1, index)
        assert count.dtype == index.dtype == torch.int32 and index.is_contiguous()
        assert torch.equal(count, vis.sum(-1).to(torch.int32))
        for b in range(B):
            for h in range(Hb):
                for r in range(vis.shape[-2]):
                    want = vis[b, h, r].nonzero().flatten().to(torch.int32)
                    assert torch.equal(index[b, h, r, : int(count[b, h, r])], want)


def test_compact():
    g = torch.Generator().manual_seed(3)
    visit = torch.rand(3, 4, 9, generator=g) > 0.6
    visit[0, 0] = False
    visit[0, 1] = True
    count, index = compact(visit)
    for i in range(3):
        for j in range(4):
            want = visit[i, j].nonzero().flatten().to(torch.int32)
            assert int(count[i, j]) == len(want)
            assert torch.equal(index[i, j, : len(want)], want)
    assert int(count[0, 0]) == 0 and torch.equal(index[0, 1], torch.arange(9, dtype=torch.int32))


@pytest.mark.parametrize("causal", [True, False])
def test_visits_follow_keep_window_not_tk(causal):
    """Equal biases (a sliding window of w keys): a query tile visits at most the tiles the window and its
    own rows span, however long the sequence -- the work is O(T x keep_window)."""
    T, w, bm, bn = 2048, 40, 64, 64
    rank, cut, bmin = dma_select(torch.zeros(1, 1, T), w, T, causal, None)
    count, _ = visit_lists(cut, bmin, T, bm, bn, causal)
    if causal:
        assert int(count.max()) <= -(-(w + bm) // bn) + 1
    else:  # every row keeps the same w most recent keys
        assert int(count.max()) <= -(-w // bn) + 1
    assert int(count.sum()) < (T // bm) * (T // bn) // 8


def test_no_visits_for_rows_that_see_nothing():
    """A query tile whose rows all have cutoff -1 (every key padded) visits no key tile."""
    rank, cut, bmin = dma_select(torch.zeros(1, 1, 40), 4, 40, True, torch.zeros(1, 40, dtype=torch.bool))
    assert (cut == -1).all() and (rank == PAD_RANK).all()
    count, _ = visit_lists(cut, bmin, 40, 16, 16, True)
    assert int(count.sum()) == 0
    count, _ = visit_lists(cut, bmin, 40, 16, 16, True, by="key")
    assert int(count.sum()) == 0


def test_tile_visits_rejects_unaligned_key_tiles():
    rank, cut, bmin = dma_select(torch.zeros(1, 1, 40), 4, 40, True, None)
    with pytest.raises(ValueError, match="block_n"):
        tile_visits(cut, bmin, 40, 16, 24, True)
    with pytest.raises(ValueError, match="by"):
        visit_lists(cut, bmin, 40, 16, 16, True, by="rows")


@needs_triton
def test_key_and_row_tables():
    from attnzoo.ops.dma.triton_dma import KEY_PAD, key_table, row_table

    g = torch.Generator().manual_seed(5)
    B, H, Hb, Tq, Tk = 2, 4, 2, 37, 131
    bias = torch.randn(B, Hb, Tk, generator=g).half()
    kpm = torch.rand(B, Tk, generator=g) > 0.2
    rank, cut, _ = dma_select(bias.float(), 9, Tq, True, kpm)
    kt = key_table(rank, bias)
    assert kt.shape == (B, Hb, 2 * KEY_PAD, 2) and kt.dtype == torch.float32
    assert torch.equal(kt[:, :, :Tk, 0].contiguous().view(torch.int32), rank)
    assert torch.equal(kt[:, :, :Tk, 1], bias.float())
    assert (kt[:, :, Tk:, 0].contiguous().view(torch.int32) == PAD_RANK).all() and (kt[:, :, Tk:, 1] == 0).all()
    lse, delta = torch.randn(B, H, Tq, generator=g), torch.randn(B, H, Tq, generator=g)
    lse[0, 1, 3] = float("-inf")
    rt = row_table(lse, delta, cut)
    assert rt.shape == (B, H, KEY_PAD, 4)
    assert torch.equal(rt[:, :, :Tq, 0], lse) and torch.equal(rt[:, :, :Tq, 1], delta)
    cut_h = rt[:, :, :Tq, 2].contiguous().view(torch.int32)
    assert torch.equal(cut_h, cut.repeat_interleave(H // Hb, dim=1))  # head h reads selection head h // (H/Hb)
    assert (rt[:, :, Tq:, 2].contiguous().view(torch.int32) == -1).all()
    assert (rt[:, :, Tq:, :2] == 0).all() and (rt[..., 3] == 0).all()


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_nan_in_padded_kv_slots_never_leaks(causal):
    """Scattered padded keys (inside visited key tiles) hold NaN in K and V: outputs and gradients equal the
    reference on zeroed slots (SPEC §0.3), and the padded keys get zero dK, dV, dbias."""
    from attnzoo.ops.dma.reference import dynamic_mask_attention_reference
    from attnzoo.ops.dma.triton_dma import dma_triton

    g = torch.Generator().manual_seed(7)
    B, T, H, Hkv, D, keep = 2, 53, 4, 2, 16, 6
    q = torch.randn(B, T, H, D, generator=g)
    k, v = (torch.randn(B, T, Hkv, D, generator=g) for _ in range(2))
    bias = torch.randn(B, Hkv, T, generator=g)
    kpm = torch.rand(B, T, generator=g) > 0.35
    kpm[:, 0] = True
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[~kpm] = float("nan")
    v_nan[~kpm] = float("inf")
    k[~kpm] = 0.0
    v[~kpm] = 0.0
    do = torch.randn(B, T, H, D, generator=g)

    def run(fn, kk, vv, dt):
        ts = [t.to(DEV, dt).requires_grad_() for t in (q, kk, vv, bias)]
        o = fn(*ts, keep_window=keep, causal=causal, key_padding_mask=kpm.to(DEV))
        return [o] + list(torch.autograd.grad((o.to(dt) * do.to(DEV, dt)).sum(), ts))

    got = run(dma_triton, k_nan, v_nan, torch.float32)
    ref = run(dynamic_mask_attention_reference, k, v, torch.float64)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dbias"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double().cpu(), b.cpu(), atol=2e-5, rtol=1e-4, msg=name)
    pad = ~kpm.to(DEV)
    assert (got[2][pad] == 0).all() and (got[3][pad] == 0).all()
    assert (got[4].transpose(1, 2)[pad] == 0).all()


@needs_triton
def test_kernel_tiles_fit_the_tables(monkeypatch):
    """Every tile the launchers pick (GPU and interpreter) divides the side tables' padding, and its key
    tile is whole block-minimum blocks."""
    from attnzoo.ops import triton_common as TC
    from attnzoo.ops.dma import triton_dma
    from attnzoo.ops.dma.selection import SKIP_BLOCK

    for interp in (True, False):
        monkeypatch.setattr(TC, "interpreter", lambda interp=interp: interp)
        for kind in ("fwd", "dq", "dkdv"):
            for d in (16, 32, 64, 96, 128, 256):
                bm, bn, _w = triton_dma._blocks(kind, d)
                assert triton_dma.KEY_PAD % bm == 0 and triton_dma.KEY_PAD % bn == 0, (kind, d)
                assert bn % SKIP_BLOCK == 0, (kind, d)
