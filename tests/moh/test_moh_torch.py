"""MoH attention's "torch" backend (SPEC §3: only active (token, head) rows are computed) against the
reference: outputs and the gradients of q, k, v and the gates by the accuracy rule (SPEC §0); chunks of
a few packed rows on both paths (masked chunks of 8 rows; CPU flash prefix + band in chunks of 4-token
blocks, streams of several kv heads side by side), heads active on every token as plain attention. Inactive gates get no gradient; an all-inactive call keeps its inputs in the graph.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnzoo.ops.moh import torch_backend as TB
from attnzoo.ops.moh.api import moh_attention
from attnzoo.ops.moh.reference import moh_attention_reference

from accuracy import check_op_against_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(TB, "CHUNK", 8)
    monkeypatch.setattr(TB, "BAND", 4)  # flash path: blocks of 4 tokens, chunks of >= 6 rows or 12 tokens
    monkeypatch.setattr(TB, "FLASH_MIN_ROWS", 6)
    monkeypatch.setattr(TB, "FLASH_MAX_SPAN", 12)


def _check_against_reference(q, k, v, gates, do, dtype, **kw):
    """The torch backend's output and q, k, v, gates gradients against the reference by the accuracy rule;
    returns the backend's ``[o, dq, dk, dv, dgates]``."""
    return check_op_against_reference(lambda *a, **k2: moh_attention(*a, backend="torch", **k2),
                                      moh_attention_reference, (q, k, v, gates), do,
                                      ("o", "dq", "dk", "dv", "dgates"), dtype=dtype, **kw)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(1, 2), tq=st.integers(1, 36), tk=st.integers(1, 36), hkv=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 2, 4]), frac=st.sampled_from([0.0, 0.3, 0.7, 1.0]), causal=st.booleans(),
       window=st.sampled_from([(-1, -1), (4, 0), (3, 5)]), kpm=st.booleans(), dtype=st.sampled_from(DTYPES),
       full_head=st.booleans(), seed=st.integers(0, 9999))
def test_against_reference(b, tq, tk, hkv, g, frac, causal, window, kpm, dtype, full_head, seed):
    torch.manual_seed(seed)
    H = hkv * g
    q = torch.randn(b, tq, H, 16, device=DEV).to(dtype)
    k, v = (torch.randn(b, tk, hkv, 16, device=DEV).to(dtype) for _ in range(2))
    gates = torch.rand(b, tq, H, device=DEV) + 0.5
    drop = torch.rand(b, tq, H, device=DEV) >= frac
    if full_head:  # the first head of the last kv group is active on every token (a shared head)
        drop[..., H - g] = False
    gates = torch.where(drop, torch.zeros_like(gates), gates).to(dtype)
    kw = dict(causal=causal, window=window)
    if kpm:
        kw["key_padding_mask"] = torch.rand(b, tk, device=DEV) > 0.3
    do = torch.randn(b, tq, H, 16, device=DEV)
    got = _check_against_reference(q, k, v, gates, do, dtype, **kw)
    inactive = gates == 0
    assert (got[0][inactive] == 0).all() and (got[4][inactive] == 0).all()
    assert (got[1][inactive] == 0).all()  # no gradient reaches an inactive query row


@pytest.mark.parametrize("train", [True, False])
def test_cost_follows_active_rows(train, monkeypatch):
    """Only active rows reach the attention: with a quarter of the rows of three heads active, the masked
    (band) calls of the CPU flash path see those rows, each once, plus at most ``PAD_LIMIT`` of padding (two
    kv heads' streams side by side); the prefix calls see no others; the fourth head, active on every token,
    runs as one causal SDPA call over its T rows."""
    import torch.nn.functional as F

    import attnzoo.ops.attention.torch_backend as ATB

    band, prefix, dense = [], [], []
    real_sdpa, real_flash = F.scaled_dot_product_attention, TB._flash

    def spy_sdpa(q, *a, **k):
        dense.append(q.shape[-2] * q.shape[-3] * q.shape[0])
        return real_sdpa(q, *a, **k)

    def spy_flash(q, k, v, scale, mask):
        (prefix if mask is None else band).append(q.shape[-2] * q.shape[-3])
        return real_flash(q, k, v, scale, mask)

    monkeypatch.setattr(TB, "_flash", spy_flash)
    monkeypatch.setattr(ATB.F, "scaled_dot_product_attention", spy_sdpa)
    torch.manual_seed(0)
    B, T, H = 1, 64, 4
    q, k, v = torch.randn(B, T, H, 16), torch.randn(B, T, 2, 16), torch.randn(B, T, 2, 16)
    q.requires_grad_(train)
    gates = torch.zeros(B, T, H)
    gates[:, ::4, :3] = 1.0
    gates[:, :, 3] = 1.0
    o = moh_attention(q, k, v, gates, causal=True, backend="torch")
    if train:
        o.sum().backward()
    active = int((gates[..., :3] != 0).sum())
    assert active <= sum(band) <= TB.PAD_LIMIT * active
    assert 0 < sum(prefix) <= sum(band)
    assert dense == [T]


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(1, 2), tq=st.integers(1, 40), extra=st.integers(0, 20), g=st.sampled_from([1, 4]),
       frac=st.sampled_from([0.1, 0.3, 0.9]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 9999),
       pad_limit=st.sampled_from([1.0, 100.0]))
def test_prefix_band_path(b, tq, extra, g, frac, dtype, seed, pad_limit):
    """Causal rows on CPU split each chunk's keys into an unmasked prefix (the flash kernel with its lse) and
    a masked band, merged by lse; the backward runs the flash backward per part with the merged output and
    lse: outputs and all gradients by the accuracy rule, ``Tk >= Tq`` (bottom-right causal); the (batch, kv
    head) streams side by side with padding (``PAD_LIMIT`` 100) or each on its own (1.0)."""
    torch.manual_seed(seed)
    H, tk = 2 * g, tq + extra
    q = torch.randn(b, tq, H, 16, device=DEV).to(dtype)
    k, v = (torch.randn(b, tk, 2, 16, device=DEV).to(dtype) for _ in range(2))
    gates = torch.where(torch.rand(b, tq, H, device=DEV) < frac, torch.rand(b, tq, H, device=DEV) + 0.5,
                        torch.zeros(b, tq, H, device=DEV)).to(dtype)
    do = torch.randn(b, tq, H, 16, device=DEV)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TB, "PAD_LIMIT", pad_limit)
        _check_against_reference(q, k, v, gates, do, dtype, causal=True)


@settings(max_examples=50, deadline=None)
@given(tq=st.integers(1, 200), streams=st.integers(1, 3), per_token=st.integers(1, 4),
       density=st.floats(0.02, 1.0), offset=st.integers(0, 9), seed=st.integers(0, 9999))
def test_stream_plan_and_band_masks(tq, streams, per_token, density, offset, seed):
    """The CPU flash path's plan for streams of packed rows (several heads' rows per token): every stream's
    rows land in the slots in order, each once, padding after them; chunks break only at block boundaries
    (rows of one token stay together), stay within the span limit and hold ``FLASH_MIN_ROWS`` rows in some
    stream unless the span limit or the end closed them; ``split`` / ``hi`` are the diagonals of the chunk's
    first and one past its last row over all streams; the gathered band masks equal the direct comparison
    ``key > the row's diagonal`` (padding slots see the whole band)."""
    g = torch.Generator().manual_seed(seed)
    pos_list = []
    for _ in range(streams):
        act = torch.rand(tq, per_token, generator=g) < density
        act[torch.randint(0, tq, (1,), generator=g)] = True  # at least one row
        pos_list.append(act.reshape(-1).nonzero()[:, 0] // per_token)
    plan = TB._stream_plan(pos_list, offset)
    S, N = plan.src.shape
    assert S == streams and N == sum(R for _, R, _, _ in plan.chunks)
    for s, pos in enumerate(pos_list):
        assert torch.equal(plan.src[s][plan.valid[s]], torch.arange(pos.shape[0]))  # each row once, in order
    expect_off = 0
    for c, (off, R, split, hi) in enumerate(plan.chunks):
        assert off == expect_off and R > 0
        expect_off += R
        rows = [pos[plan.src[s, off : off + R][plan.valid[s, off : off + R]]] for s, pos in enumerate(pos_list)]
        assert max(r.shape[0] for r in rows) == R
        assert all(plan.valid[s, off : off + r.shape[0]].all() and not plan.valid[s, off + r.shape[0] : off + R].any()
                   for s, r in enumerate(rows))  # rows first, then padding
        nonempty = [r for r in rows if r.shape[0]]
        first, last = min(int(r[0]) for r in nonempty), max(int(r[-1]) for r in nonempty)
        assert (split, hi) == (first + offset, last + offset + 1)
        assert last // TB.BAND - first // TB.BAND < TB.FLASH_MAX_SPAN // TB.BAND
        if c + 1 < len(plan.chunks):
            nxt = plan.chunks[c + 1][0]
            firsts_next = [int(pos[plan.src[s, nxt]]) for s, pos in enumerate(pos_list) if plan.valid[s, nxt]]
            assert min(firsts_next) // TB.BAND > last // TB.BAND  # a block is never cut
            span_full = (min(firsts_next) // TB.BAND - first // TB.BAND) * TB.BAND >= TB.FLASH_MAX_SPAN
            assert R >= TB.FLASH_MIN_ROWS or span_full
    masks = TB._band_masks(plan.rel, plan.chunks, torch.float32)
    for (off, R, split, hi), mask in zip(plan.chunks, masks):
        j = torch.arange(split, hi)
        for s, pos in enumerate(pos_list):
            valid = plan.valid[s, off : off + R]
            diag = pos[plan.src[s, off : off + R]] + offset
            want = torch.where(j[None, :] > diag[:, None], float("-inf"), 0.0)
            assert torch.equal(mask[0, s][valid], want[valid])
            assert (mask[0, s][~valid] == 0).all()
