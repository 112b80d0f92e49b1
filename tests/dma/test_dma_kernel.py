"""DMA's mask-free path (SPEC §5): rank/cutoff selection equals the reference keep mask exactly, and the
rank-threshold Triton kernels match the float64 reference (outputs and gradients of q, k, v, bias) by
SPEC §0's rule; key tiles that no row keeps are never loaded."""


import torch


import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attnzoo import backends  # noqa: E402
from attnzoo.ops.dma.reference import dma_selection, dynamic_mask_attention_reference  # noqa: E402
from attnzoo.ops.dma.selection import (  # noqa: E402
    SKIP_BLOCK, block_min_ranks, dma_select, keep_mask_from_ranks, key_ranks, row_cutoffs,
)

from accuracy import assert_close_by_rule, lowp_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = not backends.triton_device_reasons(torch.device(DEV))
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton cannot run here")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _bias(kind, B, Hb, Tk, g):
    if kind == "zeros":
        return torch.zeros(B, Hb, Tk)
    if kind == "ints":  # many ties
        return torch.randint(-2, 3, (B, Hb, Tk), generator=g).float()
    return torch.randn(B, Hb, Tk, generator=g)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 2), Tq=st.integers(1, 40), dk=st.integers(-6, 9), Hb=st.integers(1, 3),
    keep=st.integers(1, 50), kind=st.sampled_from(["zeros", "ints", "randn"]), causal=st.booleans(),
    pad=st.sampled_from(["none", "some", "all_last"]), chunk=st.sampled_from([1, 7, 1 << 24]),
    seed=st.integers(0, 2**16),
)
def test_selection_equals_reference(B, Tq, dk, Hb, keep, kind, causal, pad, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    Tk = max(1, Tq + dk)
    bias = _bias(kind, B, Hb, Tk, g)
    kpm = None
    if pad == "some":
        kpm = torch.rand(B, Tk, generator=g) > 0.3
    elif pad == "all_last":
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[-1] = False
    q, k = torch.zeros(B, Tq, Hb, 4), torch.zeros(B, Tk, Hb, 4)
    ref = dma_selection(q, k, bias, keep, causal, kpm).expand(B, Hb, Tq, Tk)
    rank = key_ranks(bias, kpm)
    cut = row_cutoffs(rank, keep, Tq, causal, chunk_elems=chunk * B * Hb * Tk)
    assert torch.equal(keep_mask_from_ranks(rank, cut, causal), ref)
    # block minima: the smallest rank of each SKIP_BLOCK keys
    bmin = block_min_ranks(rank)
    for n in range(bmin.shape[-1]):
        assert torch.equal(bmin[..., n], rank[..., n * SKIP_BLOCK:(n + 1) * SKIP_BLOCK].amin(-1))


def test_selection_sliding_window_on_ties():
    """Equal biases: exactly a sliding window of keep_window keys (ties toward the more recent key)."""
    T, w = 23, 5
    rank, cut, _ = dma_select(torch.zeros(1, 1, T), w, T, True, None)
    keep = keep_mask_from_ranks(rank, cut, True)[0, 0]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(keep, (j <= i) & (j > i - w))


def _run(fn, q, k, v, bias, dt, bias_dt, do, **kw):
    ts = [t.to(DEV, dt).requires_grad_() for t in (q, k, v)] + [bias.to(DEV, bias_dt).requires_grad_()]
    o = fn(*ts, **kw)
    return [o] + list(torch.autograd.grad((o.float() * do.to(DEV)).sum(), ts))


@needs_triton
@settings(max_examples=10, deadline=None)
@given(
    B=st.integers(1, 2), Tq=st.integers(1, 37), dk=st.integers(-5, 9),
    heads=st.sampled_from([(2, 1, 1), (4, 2, 2), (2, 2, 2), (4, 2, 4)]), keep=st.integers(1, 45),
    kind=st.sampled_from(["zeros", "ints", "randn"]), causal=st.booleans(), pad=st.booleans(),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference(B, Tq, dk, heads, keep, kind, causal, pad, dtype, seed):
    from attnzoo.ops.dma.triton_dma import dma_triton

    H, Hkv, Hb = heads
    Tk = max(1, Tq + dk)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, t, h, 24, generator=g) for t, h in ((Tq, H), (Tk, Hkv), (Tk, Hkv)))
    bias = _bias(kind, B, Hb, Tk, g)
    kpm = None
    if pad:
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[-1, : (Tk + 1) // 3] = False
        kpm = kpm.to(DEV)
    do = torch.randn(B, Tq, H, 24, generator=g)
    kw = dict(keep_window=keep, causal=causal, key_padding_mask=kpm)
    got = _run(dma_triton, q, k, v, bias, dtype, torch.float32, do, **kw)
    hi = _run(dynamic_mask_attention_reference, q, k, v, bias, torch.float64, torch.float64, do, **kw)
    with lowp_reference():
        lo = _run(dynamic_mask_attention_reference, q, k, v, bias, dtype, torch.float32, do, **kw)
    for name, a, b, c in zip(("o", "dq", "dk", "dv", "dbias"), got, hi, lo):
        assert_close_by_rule(a, b, c, f"{name} ({dtype})", dtype=dtype)


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_unkept_key_tiles_are_skipped(causal):
    """Keys [64, 128) have a bias far below every other key, so no row keeps them (every row that can see
    them sees >= keep_window better keys): filled with NaN, they must never be loaded -- forward and
    backward stay finite and equal the reference with those rows zeroed."""
    from attnzoo.ops.dma.triton_dma import dma_triton

    g = torch.Generator().manual_seed(0)
    B, T, H, D, keep = 1, 160, 2, 16, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    bias = torch.randn(B, H, T, generator=g)
    bias[..., 64:128] = -100.0
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, 64:128] = float("nan")
    v_nan[:, 64:128] = float("nan")
    k[:, 64:128] = 0.0
    v[:, 64:128] = 0.0
    do = torch.randn(B, T, H, D, generator=g)
    kw = dict(keep_window=keep, causal=causal)
    got = _run(dma_triton, q, k_nan, v_nan, bias, torch.float32, torch.float32, do, **kw)
    ref = _run(dynamic_mask_attention_reference, q, k, v, bias, torch.float64, torch.float64, do, **kw)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dbias"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=name)


@needs_triton
def test_keep_window_at_least_tk_is_causal_attention():
    from attnzoo.ops.dma.triton_dma import dma_triton

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 21, 2, 16, generator=g) for _ in range(3))
    bias = torch.randn(2, 2, 21, generator=g)
    kw = dict(keep_window=21, causal=True)
    torch.testing.assert_close(dma_triton(q.to(DEV), k.to(DEV), v.to(DEV), bias.to(DEV), **kw).cpu(),
                               dynamic_mask_attention_reference(q, k, v, bias, **kw).float(), atol=2e-5, rtol=1e-4)
