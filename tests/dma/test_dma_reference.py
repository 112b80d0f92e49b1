"""Dynamic Mask Attention (SPEC §5): the op against a brute-force per-row selection, its two limits (dense
attention plus bias; a sliding window at A = 0), tie-breaking, masked keys, and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo import DynamicMaskAttention, MultiHeadAttention
from attnzoo.ops.dma.reference import dma_bias, dma_keep_mask

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-9)


@st.composite
def dma_case(draw, equal_t=False):
    B = draw(st.integers(1, 2))
    Tq = draw(st.integers(1, 13))
    Tk = Tq if equal_t else draw(st.integers(1, 13))
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    D = draw(st.sampled_from([4, 8]))
    Hb = draw(st.sampled_from(sorted({Hkv, H})))
    kw = draw(st.integers(1, 14))
    return B, Tq, Tk, H, Hkv, D, Hb, kw, draw(st.integers(0, 10_000))


def tensors(B, Tq, Tk, H, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, Tk, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, Tk, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    return q, k, v, g


def brute_force_keep(bias, causal, kpm, kw, Tq):
    """Per (b, h, query row): the keys it may see, ranked by (bias, position) descending -- ties go to the
    more recent key -- keep the first ``kw``."""
    B, Hb, Tk = bias.shape
    keep = torch.zeros(B, Hb, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hb):
            for i in range(Tq):
                vis = [j for j in range(Tk) if (not causal or j <= i + Tk - Tq) and (kpm is None or kpm[b, j])]
                ranked = sorted(vis, key=lambda j: (float(bias[b, h, j]), j), reverse=True)
                for j in ranked[:kw]:
                    keep[b, h, i, j] = True
    return keep


@given(dma_case(), st.booleans(), st.booleans())
def test_dma_equals_brute_force_selection(case, causal, padded):
    B, Tq, Tk, H, Hkv, D, Hb, kw, seed = case
    q, k, v, g = tensors(B, Tq, Tk, H, Hkv, D, seed)
    # biases from a small set of values: plenty of ties
    bias = (torch.randint(0, 3, (B, Hb, Tk), generator=g).to(F64) * 0.5).requires_grad_()
    kpm = (torch.rand(B, Tk, generator=g) < 0.75) if padded else None
    o = attnzoo.dynamic_mask_attention(q, k, v, bias, keep_window=kw, causal=causal, key_padding_mask=kpm)
    keep = brute_force_keep(bias.detach(), causal, kpm, kw, Tq)
    ref = attnzoo.attention(q, k, v, bias=bias[:, :, None, :], mask=keep)
    torch.testing.assert_close(o, ref, **TOL)
    do = torch.randn(o.shape, generator=g, dtype=F64)
    got = torch.autograd.grad(o, (q, k, v, bias), do)
    want = torch.autograd.grad(ref, (q, k, v, bias), do)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    # gradient reaches the bias only at keys some row kept
    never_kept = ~keep.any(dim=2)  # [B, Hb, Tk]
    assert torch.all(got[3][never_kept] == 0)


@given(dma_case())
def test_keep_window_at_least_tk_is_attention_plus_bias(case):
    B, Tq, Tk, H, Hkv, D, Hb, _, seed = case
    q, k, v, g = tensors(B, Tq, Tk, H, Hkv, D, seed)
    bias = torch.randn(B, Hb, Tk, generator=g, dtype=F64, requires_grad=True)
    for kw in (Tk, Tk + 5):
        o = attnzoo.dynamic_mask_attention(q, k, v, bias, keep_window=kw, causal=True)
        ref = attnzoo.attention(q, k, v, bias=bias[:, :, None, :], causal=True)
        torch.testing.assert_close(o, ref, **TOL)
        do = torch.randn(o.shape, generator=g, dtype=F64)
        for a, b in zip(torch.autograd.grad(o, (q, k, v, bias), do), torch.autograd.grad(ref, (q, k, v, bias), do)):
            torch.testing.assert_close(a, b, **TOL)


@given(dma_case(equal_t=True), st.sampled_from([0.0, 0.7, -2.0]))
def test_constant_bias_is_a_sliding_window(case, c):
    """A = 0 (init) gives a constant bias; ties go to the most recent keys: a window of keep_window keys."""
    B, Tq, Tk, H, Hkv, D, Hb, kw, seed = case
    q, k, v, g = tensors(B, Tq, Tk, H, Hkv, D, seed)
    bias = torch.full((B, Hb, Tk), c, dtype=F64)
    o = attnzoo.dynamic_mask_attention(q, k, v, bias, keep_window=kw, causal=True)
    ref = attnzoo.attention(q, k, v, causal=True, window=(kw - 1, 0))
    torch.testing.assert_close(o, ref, **TOL)
    # also with Tq != Tk (a decode-like step): the last kw keys before the bottom-right diagonal
    q1 = q[:, -1:]
    o1 = attnzoo.dynamic_mask_attention(q1, k, v, bias, keep_window=kw, causal=True)
    torch.testing.assert_close(o1, attnzoo.attention(q1, k, v, causal=True, window=(kw - 1, 0)), **TOL)


def test_ties_go_to_the_most_recent_key():
    bias = torch.tensor([[[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]]])
    keep = dma_keep_mask(bias, None, 2, 1)[0, 0, 0]
    assert keep.tolist() == [False, False, True, False, True, False]
    # causal rows: row 2 sees keys 0..2, keeps the two most recent of the bias-1 keys (0 and 2)
    vis = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    keep = dma_keep_mask(bias, vis, 2, 6)[0, 0]
    assert keep[2].tolist() == [True, False, True, False, False, False]
    assert keep[1].tolist() == [True, True, False, False, False, False]  # only 2 visible: both kept
    assert keep[5].tolist() == [False, False, True, False, True, False]
    # a strictly larger bias beats recency
    bias = torch.tensor([[[5.0, 1.0, 1.0, 1.0]]])
    assert dma_keep_mask(bias, None, 2, 1)[0, 0, 0].tolist() == [True, False, False, True]


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 12), st.integers(1, 12), st.integers(1, 13),
       st.integers(0, 1000))
def test_selection_never_keeps_masked_keys(B, Hb, Tq, Tk, kw, seed):
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(B, Hb, Tk, generator=g) * 3
    vis = torch.rand(B, 1, Tq, Tk, generator=g) < 0.5
    keep = dma_keep_mask(bias, vis, kw, Tq)
    assert keep.shape == (B, Hb, Tq, Tk)
    assert not (keep & ~vis).any()
    assert torch.equal(keep.sum(-1), vis.expand_as(keep).sum(-1).clamp(max=kw))


def test_huge_bias_on_padded_keys_is_ignored():
    q, k, v, g = tensors(2, 7, 7, 4, 2, 8, 0)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[0, 1] = kpm[1, 4] = kpm[1, 0] = False
    bias = torch.randn(2, 2, 7, generator=g, dtype=F64)
    hi, lo = bias.clone(), bias.clone()
    hi[~kpm[:, None, :].expand_as(hi)] = 1e6
    lo[~kpm[:, None, :].expand_as(lo)] = -1e6
    a = attnzoo.dynamic_mask_attention(q, k, v, hi, keep_window=3, key_padding_mask=kpm)
    b = attnzoo.dynamic_mask_attention(q, k, v, lo, keep_window=3, key_padding_mask=kpm)
    torch.testing.assert_close(a, b, **TOL)
    assert torch.isfinite(a).all()


# ----------------------------------------------------------------------------------------------------
# the bias and the module


@pytest.mark.parametrize("form", ["linear", "exp"])
def test_dma_bias_formula(form):
    g = torch.Generator().manual_seed(0)
    dt = torch.randn(2, 5, 3, generator=g, dtype=F64)
    A = torch.randn(3, generator=g, dtype=F64)
    b = dma_bias(dt, A, form)
    want = A * F.softplus(dt)
    if form == "exp":
        want = torch.exp(want)
    assert b.shape == want.shape
    torch.testing.assert_close(b, want, **TOL)


def test_module_at_init_is_a_sliding_window():
    torch.manual_seed(0)
    kw = 3
    dma = DynamicMaskAttention(32, 4, num_kv_heads=2, keep_window=kw, rope=True, qk_norm=True)
    assert torch.all(dma.A == 0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, rope=True, qk_norm=True, window=(kw - 1, 0))
    missing, unexpected = mha.load_state_dict(dma.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"A", "dt_proj.weight"}
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(dma(x), mha(x), atol=1e-6, rtol=1e-6)
    # and A = 0 already gets a gradient (dt_proj only once A != 0: d bias / d dt = A sigmoid(dt))
    dma(x).square().sum().backward()
    assert dma.A.grad is not None and dma.A.grad.abs().sum() > 0


@pytest.mark.parametrize("form", ["linear", "exp"])
def test_module_with_large_keep_window_is_attention_plus_bias_and_trains_a_and_dt(form):
    torch.manual_seed(0)
    B, T = 2, 8
    m = DynamicMaskAttention(32, 4, num_kv_heads=2, keep_window=T, bias_form=form, dtype=F64)
    with torch.no_grad():
        m.A.copy_(torch.tensor([0.5, -1.0], dtype=F64))
    x = torch.randn(B, T, 32, dtype=F64)
    y = m(x)
    q, k, v, _q_raw = m.project(x, torch.arange(T).expand(B, T))
    bias = dma_bias(m.dt_proj(v.reshape(B, T, -1)), m.A, form).transpose(1, 2)  # [B, Hkv, T]
    o = attnzoo.attention(q, k, v, bias=bias[:, :, None, :], causal=True)
    torch.testing.assert_close(y, m.o_proj(o.reshape(B, T, 32)), **TOL)
    m.zero_grad()
    y.square().sum().backward()
    assert m.A.grad.abs().sum() > 0
    assert m.dt_proj.weight.grad.abs().sum() > 0


def test_module_selection_uses_the_bias():
    """With a learned bias, DMA with keep_window < T differs from the sliding window (selection is live)
    and equals the op on the module's own projections."""
    torch.manual_seed(0)
    B, T, kw = 1, 9, 3
    m = DynamicMaskAttention(32, 4, keep_window=kw, dtype=F64)
    with torch.no_grad():
        m.A.fill_(2.0)
        m.dt_proj.weight.mul_(10)
    x = torch.randn(B, T, 32, dtype=F64)
    q, k, v, _q_raw = m.project(x, torch.arange(T).expand(B, T))
    bias = dma_bias(m.dt_proj(v.reshape(B, T, -1)), m.A).transpose(1, 2)
    keep = brute_force_keep(bias.detach(), True, None, kw, T)
    o = attnzoo.attention(q, k, v, bias=bias[:, :, None, :], mask=keep)
    torch.testing.assert_close(m(x), m.o_proj(o.reshape(B, T, 32)), **TOL)
    window = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-kw)
    assert not torch.equal(keep, window.expand_as(keep))
