"""Host-side schedules built from the MoH packing (SPEC §3): :func:`attnzoo.ops.moh.packing.key_tile_row_ranges`,
the packed-row run that the dK/dV kernel walks for each key tile, against a brute-force reach test."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.ops.moh.packing import key_tile_row_ranges, pack_active_rows

from bands import BAND_MODES, band_args


def brute_force_ranges(rows, counts, Tq, Tk, block_n, causal, window_left, window_right):
    """[B, H, n_tiles, 2]: for each key tile, the packed indices of the rows whose causal/window band
    meets keys [start, start + block_n) -- checked to be one contiguous run, then returned as [lo, hi)."""
    B, H, _ = rows.shape
    diag = Tk - Tq
    right = 0 if causal else window_right
    has_right = causal or window_right >= 0
    n_tiles = -(-Tk // block_n)
    out = torch.zeros(B, H, n_tiles, 2, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            c = int(counts[b * H + h])
            pos = rows[b, h, :c].tolist()
            for n in range(n_tiles):
                start, end = n * block_n, n * block_n + block_n - 1
                reach = [(not has_right or p + diag + right >= start) and
                         (window_left < 0 or p + diag - window_left <= end) for p in pos]
                idx = [i for i, r in enumerate(reach) if r]
                if idx:
                    assert idx == list(range(idx[0], idx[-1] + 1)), "reaching rows are not one run"
                    out[b, h, n] = torch.tensor([idx[0], idx[-1] + 1])
                else:  # an empty run: lo == hi (where is free; the kernel visits nothing)
                    out[b, h, n] = -1
    return out


@settings(max_examples=40)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    Tq=st.integers(1, 70),
    extra_k=st.integers(0, 20),
    block_n=st.sampled_from([1, 7, 16, 64]),
    frac=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    mode=st.sampled_from(BAND_MODES),
    left=st.integers(0, 20),
    right=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_key_tile_row_ranges_match_brute_force(B, H, Tq, extra_k, block_n, frac, mode, left, right, seed):
    Tk = Tq + extra_k
    gen = torch.Generator().manual_seed(seed)
    gates = torch.rand(B, Tq, H, generator=gen).masked_fill(torch.rand(B, Tq, H, generator=gen) >= frac, 0.0)
    causal, wl, wr = band_args(mode, left, right)
    p = pack_active_rows(gates, 16)
    got = key_tile_row_ranges(p.rows, p.counts, Tq, Tk, block_n, causal=causal, window_left=wl, window_right=wr)
    want = brute_force_ranges(p.rows, p.counts, Tq, Tk, block_n, causal, wl, wr)
    assert got.dtype == torch.int32 and got.is_contiguous() and got.shape == want.shape
    lo, hi = got[..., 0], got[..., 1]
    assert bool((0 <= lo).all()) and bool((lo <= hi).all())
    assert bool((hi <= p.counts.view(B, H, 1)).all())
    empty = want[..., 0] < 0
    assert torch.equal(lo == hi, empty), "a run is empty exactly when no row reaches the tile"
    assert torch.equal(got[~empty], want[~empty])


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (3, 0)), (False, (2, 5))])
def test_key_tile_row_ranges_small_example(causal, window):
    """Positions 1, 4, 5, 9 of a 10-token head, Tq = Tk = 10, key tiles of 4: the runs by hand."""
    gates = torch.zeros(1, 10, 1)
    gates[0, [1, 4, 5, 9], 0] = 1.0
    p = pack_active_rows(gates, 16)
    got = key_tile_row_ranges(p.rows, p.counts, 10, 10, 4, causal=causal, window_left=window[0],
                              window_right=window[1])[0, 0].tolist()
    want = {
        (False, (-1, -1)): [[0, 4], [0, 4], [0, 4]],  # every row sees every tile
        (True, (-1, -1)): [[0, 4], [1, 4], [3, 4]],  # keys 0-3: rows >= 0; keys 4-7: >= 4; keys 8-9: >= 8
        (True, (3, 0)): [[0, 3], [1, 4], [3, 4]],  # and i - 3 <= tile end: i <= 6, <= 10, <= 14
        (False, (2, 5)): [[0, 3], [0, 4], [1, 4]],  # i + 5 >= start, i - 2 <= end
    }[(causal, window)]
    assert got == want
