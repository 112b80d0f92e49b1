"""The softmax attention reference (SPEC §0, §1) against PyTorch's scaled_dot_product_attention and against
hand-built masks, in float64 so that equality is tight.

SDPA's layout is BHTD and its ``is_causal`` is top-left; attnzoo is BTHD and bottom-right. They overlap
when ``Tq == Tk``; elsewhere the tests hand SDPA an explicit mask built here, element by element.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo.ops.attention.reference import attention_reference
from attnzoo.ops.masks import block_mask as M

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-9)


# ----------------------------------------------------------------------------------------------------
# helpers


@st.composite
def shapes(draw, equal_t=False):
    B = draw(st.integers(1, 2))
    Tq = draw(st.integers(1, 17))
    Tk = Tq if equal_t else draw(st.integers(1, 17))
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    D = draw(st.sampled_from([4, 8, 16]))
    return B, Tq, Tk, H, Hkv, D


def make_qkv(B, Tq, Tk, H, Hkv, D, seed=0, dtype=F64, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, Tk, Hkv, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, Tk, Hkv, Dv or D, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def diag_mask(Tq, Tk, causal, left=-1, right=-1):
    """[Tq, Tk] visibility built element by element from SPEC §0 (bottom-right diagonal)."""
    m = torch.zeros(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        for j in range(Tk):
            d = j - (i + Tk - Tq)
            ok = True
            if causal and d > 0:
                ok = False
            if left >= 0 and d < -left:
                ok = False
            if right >= 0 and d > right:
                ok = False
            m[i, j] = ok
    return m


def to_heads(t, H):
    """Expand a [b, Hkv, tq, Tk] mask/bias to H heads with contiguous groups (SPEC §0)."""
    return t if t.shape[1] in (1, H) else t.repeat_interleave(H // t.shape[1], dim=1)


def sdpa(q, k, v, *, keep=None, bias=None, causal=False, scale=None):
    """SDPA oracle in BTHD. ``keep`` (bool, broadcastable to [B, H, Tq, Tk]) and ``bias`` are combined
    into one float mask; rows with no visible key are answered with 0 by the oracle itself (SPEC §0), not by
    relying on SDPA for them."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    attn_mask = None
    empty = None
    if bias is not None:
        attn_mask = to_heads(bias, H).expand(B, H, Tq, Tk)
    if keep is not None:
        keep = to_heads(keep, H).expand(B, H, Tq, Tk)
        empty = ~keep.any(-1)  # [B, H, Tq]
        safe = keep | empty[..., None]
        neg = torch.zeros(B, H, Tq, Tk, dtype=q.dtype).masked_fill(~safe, float("-inf"))
        attn_mask = neg if attn_mask is None else attn_mask + neg
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, is_causal=causal,
        scale=scale, enable_gqa=True,
    )
    if empty is not None:
        o = o.masked_fill(empty[..., None], 0.0)
    return o.transpose(1, 2)


def grads(out, inputs, seed=1, retain_graph=False):
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, do, allow_unused=True, retain_graph=retain_graph)


def assert_all_close(a, b, **tol):
    tol = tol or TOL
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **tol)
    else:
        torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------------------------------
# against SDPA


@given(shapes(equal_t=True), st.booleans(), st.sampled_from([None, 0.3]))
def test_matches_sdpa_self_attention(shp, causal, scale):
    q, k, v = make_qkv(*shp)
    o = attnzoo.attention(q, k, v, causal=causal, scale=scale)
    ref = sdpa(q, k, v, causal=causal, scale=scale)
    assert_all_close(o, ref)
    assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))


@given(shapes())
def test_non_causal_cross_attention_matches_sdpa(shp):
    q, k, v = make_qkv(*shp, Dv=shp[-1] * 2 if shp[-1] < 16 else 4)
    o = attnzoo.attention(q, k, v)
    ref = sdpa(q, k, v)
    assert o.shape == (*q.shape[:3], v.shape[-1])
    assert_all_close(o, ref)
    assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))


@given(shapes())
def test_causal_is_bottom_right(shp):
    B, Tq, Tk, H, Hkv, D = shp
    q, k, v = make_qkv(*shp)
    o = attnzoo.attention(q, k, v, causal=True)
    keep = diag_mask(Tq, Tk, causal=True)
    ref = sdpa(q, k, v, keep=keep[None, None])
    assert_all_close(o, ref)
    assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))
    if Tq == Tk:  # where the two conventions agree, SDPA's own is_causal too
        assert_all_close(o, sdpa(q, k, v, causal=True))
    if Tq > Tk:  # the first Tq - Tk queries see no key at all
        assert torch.all(o[:, : Tq - Tk] == 0)


def test_causal_bottom_right_differs_from_top_left():
    """Guards the test above: with Tq < Tk the two conventions give different answers."""
    q, k, v = make_qkv(1, 3, 7, 2, 2, 8)
    o = attnzoo.attention(q, k, v, causal=True)
    top_left = sdpa(q, k, v, causal=True)
    assert (o - top_left).abs().max() > 1e-3
    # the last query of a bottom-right causal mask sees every key
    torch.testing.assert_close(o[:, -1], sdpa(q, k, v)[:, -1], **TOL)


@st.composite
def broadcast_shape(draw, B, H, Hkv, Tq, Tk):
    return (
        draw(st.sampled_from(sorted({B, 1}))),
        draw(st.sampled_from(sorted({H, Hkv, 1}))),
        draw(st.sampled_from(sorted({Tq, 1}))),
        Tk,
    )


@given(shapes(), st.data())
def test_bool_mask_matches_sdpa(shp, data):
    B, Tq, Tk, H, Hkv, D = shp
    mshape = data.draw(broadcast_shape(B, H, Hkv, Tq, Tk))
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(mshape, generator=g) < 0.6
    causal = data.draw(st.booleans())
    q, k, v = make_qkv(*shp)
    o = attnzoo.attention(q, k, v, mask=mask, causal=causal)
    keep = to_heads(mask, H) & diag_mask(Tq, Tk, causal)
    ref = sdpa(q, k, v, keep=keep)
    assert_all_close(o, ref)
    assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))


@pytest.mark.parametrize("b_one", [False, True])
@pytest.mark.parametrize("h_kind", ["H", "Hkv", "1"])
@pytest.mark.parametrize("tq_one", [False, True])
def test_bias_every_broadcast_form(b_one, h_kind, tq_one):
    B, Tq, Tk, H, Hkv, D = 2, 5, 7, 4, 2, 8
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D)
    shape = (1 if b_one else B, {"H": H, "Hkv": Hkv, "1": 1}[h_kind], 1 if tq_one else Tq, Tk)
    bias = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    o = attnzoo.attention(q, k, v, bias=bias, causal=True)
    ref = sdpa(q, k, v, bias=bias, keep=diag_mask(Tq, Tk, True)[None, None])
    assert_all_close(o, ref)
    g = grads(o, (q, k, v, bias))
    g_ref = grads(ref, (q, k, v, bias))
    assert g[3].shape == bias.shape
    assert g[3].abs().sum() > 0
    assert_all_close(g, g_ref)


def test_bias_is_not_scaled():
    q, k, v = make_qkv(1, 4, 6, 2, 2, 8)
    bias = torch.randn(1, 2, 4, 6, dtype=F64)
    o = attnzoo.attention(q, k, v, bias=bias, scale=0.25)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.25 + bias
    ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    torch.testing.assert_close(o, ref, **TOL)


@given(shapes(), st.booleans())
def test_gqa_equals_mha_with_repeated_kv_heads(shp, causal):
    B, Tq, Tk, H, Hkv, D = shp
    q, k, v = make_qkv(*shp)
    o = attnzoo.attention(q, k, v, causal=causal)
    # query head h reads kv head h // (H // Hkv): contiguous groups
    kr = torch.stack([k[:, :, h // (H // Hkv)] for h in range(H)], dim=2)
    vr = torch.stack([v[:, :, h // (H // Hkv)] for h in range(H)], dim=2)
    ref = attnzoo.attention(q, kr, vr, causal=causal)
    assert_all_close(o, ref)
    # dK/dV are summed over the query heads of each group (autograd through the stack does just that)
    assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))


def test_gqa_groups_are_contiguous_not_interleaved():
    q, k, v = make_qkv(1, 3, 5, 4, 2, 8)
    o = attnzoo.attention(q, k, v)
    interleaved = attnzoo.attention(q, k[:, :, [0, 1, 0, 1]], v[:, :, [0, 1, 0, 1]])
    contiguous = attnzoo.attention(q, k[:, :, [0, 0, 1, 1]], v[:, :, [0, 0, 1, 1]])
    torch.testing.assert_close(o, contiguous, **TOL)
    assert (o - interleaved).abs().max() > 1e-3


@given(
    shapes(),
    st.integers(-1, 6),
    st.integers(-1, 6),
    st.booleans(),
)
def test_sliding_window_equals_explicit_mask(shp, left, right, causal):
    B, Tq, Tk, H, Hkv, D = shp
    q, k, v = make_qkv(*shp)
    o = attnzoo.attention(q, k, v, window=(left, right), causal=causal)
    keep = diag_mask(Tq, Tk, causal, left, right)[None, None]
    ref = sdpa(q, k, v, keep=keep)
    assert_all_close(o, ref)
    assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))
    assert_all_close(o, attnzoo.attention(q, k, v, mask=keep))


@given(shapes())
def test_key_padding_mask_equals_explicit_mask(shp):
    B, Tq, Tk, H, Hkv, D = shp
    q, k, v = make_qkv(*shp)
    kpm = torch.rand(B, Tk, generator=torch.Generator().manual_seed(9)) < 0.7  # True = real token
    o = attnzoo.attention(q, k, v, key_padding_mask=kpm, causal=True)
    ref = attnzoo.attention(q, k, v, mask=kpm[:, None, None, :], causal=True)
    assert_all_close(o, ref)
    keep = kpm[:, None, None, :] & diag_mask(Tq, Tk, True)
    assert_all_close(o, sdpa(q, k, v, keep=keep))
    # padding keys do not influence the output: changing their values changes nothing
    k2 = k.detach().clone()
    v2 = v.detach().clone()
    k2[~kpm] = 1e3
    v2[~kpm] = -1e3
    assert_all_close(attnzoo.attention(q, k2, v2, key_padding_mask=kpm, causal=True), o)


# ----------------------------------------------------------------------------------------------------
# fully masked rows, lse


@pytest.mark.parametrize("how", ["mask", "key_padding", "causal_tq_gt_tk", "window"])
def test_fully_masked_row_is_zero_with_lse_neg_inf_and_zero_grads(how):
    B, Tq, Tk, H, Hkv, D = 2, 6, 4, 2, 1, 8
    q, k, v = make_qkv(B, Tq, Tk, H, Hkv, D)
    bias = torch.randn(B, H, Tq, Tk, dtype=F64).requires_grad_()
    kw = {}
    dead = torch.zeros(B, H, Tq, dtype=torch.bool)
    if how == "mask":
        mask = torch.ones(B, H, Tq, Tk, dtype=torch.bool)
        mask[0, 1, 3] = False
        mask[1, :, 0] = False
        dead[0, 1, 3] = dead[1, :, 0] = True
        kw = dict(mask=mask)
    elif how == "key_padding":
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        kpm[1] = False
        dead[1] = True
        kw = dict(key_padding_mask=kpm)
    elif how == "causal_tq_gt_tk":
        kw = dict(causal=True)
        dead[:, :, : Tq - Tk] = True
    else:  # a window entirely to the right of the diagonal's reach for the first rows
        kw = dict(window=(0, 0), causal=False)
        dead[:, :, : Tq - Tk] = True
    o, lse = attnzoo.attention(q, k, v, bias=bias, return_lse=True, **kw)
    dead_o = dead.transpose(1, 2)  # [B, Tq, H]
    assert torch.all(o[dead_o] == 0)
    assert torch.all(lse[dead] == float("-inf"))
    assert torch.isfinite(lse[~dead]).all()
    assert (o[~dead_o].abs().sum(-1) > 0).all()
    gq, gk, gv, gb = grads(o, (q, k, v, bias), retain_graph=True)
    for g in (gq, gk, gv, gb):
        assert torch.isfinite(g).all()
    assert torch.all(gq[dead_o] == 0)
    assert torch.all(gb[dead] == 0)
    # the same through lse: a -inf row contributes no gradient and no NaN
    lse_f = lse.masked_fill(dead, 0.0)
    gq2, gb2 = torch.autograd.grad(lse_f.sum(), (q, bias))
    assert torch.isfinite(gq2).all() and torch.isfinite(gb2).all()
    assert torch.all(gq2[dead_o] == 0)


@given(shapes(), st.booleans(), st.booleans())
def test_return_lse_equals_logsumexp_of_scores(shp, causal, with_bias):
    B, Tq, Tk, H, Hkv, D = shp
    q, k, v = make_qkv(*shp)
    scale = 0.7
    bias = torch.randn(B, Hkv, 1, Tk, dtype=F64) if with_bias else None
    o, lse = attnzoo.attention(q, k, v, causal=causal, scale=scale, bias=bias, return_lse=True)
    assert lse.shape == (B, H, Tq)
    assert lse.dtype in (torch.float32, torch.float64)
    kr = k.repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if with_bias:
        s = s + bias.repeat_interleave(H // Hkv, dim=1)
    s = s.masked_fill(~diag_mask(Tq, Tk, causal), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1).to(lse.dtype), **TOL)
    torch.testing.assert_close(o, attnzoo.attention(q, k, v, causal=causal, scale=scale, bias=bias), **TOL)


def test_lse_is_fp32_for_low_precision():
    q, k, v = make_qkv(1, 5, 5, 2, 2, 8, dtype=torch.float16)
    o, lse = attnzoo.attention(q, k, v, causal=True, return_lse=True)
    assert o.dtype == torch.float16 and lse.dtype == torch.float32
    o32, lse32 = attnzoo.attention(q.float(), k.float(), v.float(), causal=True, return_lse=True)
    torch.testing.assert_close(lse, lse32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.float(), o32, atol=2e-3, rtol=2e-3)


def test_large_logits_are_stable():
    q, k, v = make_qkv(1, 6, 6, 2, 2, 8)
    q = (q.detach() * 300).requires_grad_()
    o, lse = attnzoo.attention(q, k, v, causal=True, return_lse=True)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(o, sdpa(q, k, v, causal=True), **TOL)


# ----------------------------------------------------------------------------------------------------
# varlen


@st.composite
def varlen_case(draw):
    n = draw(st.integers(1, 3))
    lq = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    same = draw(st.booleans())
    lk = lq if same else draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    D = draw(st.sampled_from([4, 8, 16]))
    return lq, lk, H, Hkv, D


@given(varlen_case(), st.booleans(), st.sampled_from([(-1, -1), (2, 0), (1, 1)]))
def test_varlen_equals_loop_over_sequences(case, causal, window):
    lq, lk, H, Hkv, D = case
    g = torch.Generator().manual_seed(11)
    q = torch.randn(sum(lq), H, D, dtype=F64, generator=g).requires_grad_()
    k = torch.randn(sum(lk), Hkv, D, dtype=F64, generator=g).requires_grad_()
    v = torch.randn(sum(lk), Hkv, D, dtype=F64, generator=g).requires_grad_()
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    o, lse = attnzoo.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=causal, window=window, return_lse=True)
    assert o.shape == q.shape and lse.shape == (H, sum(lq))
    outs, lses = [], []
    for i in range(len(lq)):
        qs, ks, vs = q[cq[i] : cq[i + 1]][None], k[ck[i] : ck[i + 1]][None], v[ck[i] : ck[i + 1]][None]
        oi, li = attnzoo.attention(qs, ks, vs, causal=causal, window=window, return_lse=True)
        outs.append(oi[0])
        lses.append(li[0])
    ref, ref_lse = torch.cat(outs), torch.cat(lses, -1)
    assert_all_close(o, ref)
    assert_all_close(lse, ref_lse)
    if o.numel():
        assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))


def test_varlen_does_not_leak_across_sequences():
    H, D = 2, 8
    q = torch.randn(7, H, D, dtype=F64)
    k = torch.randn(7, H, D, dtype=F64)
    v = torch.randn(7, H, D, dtype=F64)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    o = attnzoo.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    v2 = v.clone()
    v2[3:] += 100.0
    o2 = attnzoo.attention(q, k, v2, cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch.testing.assert_close(o[:3], o2[:3], **TOL)
    assert (o[3:] - o2[3:]).abs().min() > 1.0


# ----------------------------------------------------------------------------------------------------
# block masks


@given(shapes(), st.sampled_from([(4, 4), (3, 5), (8, 2), (16, 16)]), st.data())
def test_block_mask_equals_dense_mask(shp, block_size, data):
    B, Tq, Tk, H, Hkv, D = shp
    q, k, v = make_qkv(*shp)
    bshape = (data.draw(st.sampled_from(sorted({B, 1}))), data.draw(st.sampled_from(sorted({H, 1}))), Tq, Tk)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    # blocky random mask: some blocks all True, some all False, some mixed
    dense = torch.rand(bshape, generator=g) < 0.5
    dense |= diag_mask(Tq, Tk, True)  # plus causal structure so whole blocks become full
    bm = M.block_mask_from_dense(dense, block_size)
    o = attnzoo.attention(q, k, v, block_mask=bm)
    ref = attnzoo.attention(q, k, v, mask=dense)
    assert_all_close(o, ref)
    assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))
    assert_all_close(o, sdpa(q, k, v, keep=dense))


@pytest.mark.parametrize(
    "build, kwargs",
    [
        ("causal", dict(causal=True)),
        ("window", dict(causal=True, window=(8, 0))),
        ("sink", None),
        ("document", None),
    ],
)
def test_block_mask_builders_in_attention(build, kwargs):
    B, T, H, D = 2, 19, 2, 8
    q, k, v = make_qkv(B, T, T, H, H, D)
    bs = (4, 4)
    if build == "causal":
        bm = M.causal_block_mask(1, 1, T, T, block_size=bs)
    elif build == "window":
        bm = M.window_block_mask(1, 1, T, T, left=8, right=0, block_size=bs)
    elif build == "sink":
        bm = M.sink_window_block_mask(1, 1, T, T, num_sink=2, window=9, block_size=bs)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        kwargs = dict(mask=((j <= i) & ((j < 2) | (j > i - 9)))[None, None])
    else:
        doc = torch.tensor([0] * 8 + [1] * 9 + [2] * 2)
        bm = M.document_block_mask(doc, block_size=bs)
        kwargs = dict(mask=((doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[None, None])
    # the structure holds both kinds of listed blocks
    assert int(bm.full_kv_num_blocks.sum()) > 0 and int(bm.kv_num_blocks.sum()) > 0
    o = attnzoo.attention(q, k, v, block_mask=bm)
    ref = attnzoo.attention(q, k, v, **kwargs)
    assert_all_close(o, ref)
    assert_all_close(grads(o, (q, k, v)), grads(ref, (q, k, v)))


def test_hand_built_block_mask_full_and_partial():
    """A BlockMask written by hand (no builder): unlisted blocks stay hidden even if mask_mod says keep,
    full blocks ignore mask_mod, partial blocks apply it."""
    Tq, Tk, bq, bk = 6, 7, 4, 4  # Mq = 2, Nk = 2
    # query block 0: key block 1 full; query block 1: key block 0 partial, key block 1 not listed
    bm = attnzoo.BlockMask(
        kv_num_blocks=torch.tensor([[[0, 1]]], dtype=torch.int32),
        kv_indices=torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32),
        full_kv_num_blocks=torch.tensor([[[1, 0]]], dtype=torch.int32),
        full_kv_indices=torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32),
        block_size=(bq, bk),
        seq_lengths=(Tq, Tk),
        mask_mod=lambda b, h, qi, ki: (qi + ki) % 2 == 0,
    )
    want = torch.zeros(Tq, Tk, dtype=torch.bool)
    want[0:4, 4:7] = True
    for i in range(4, 6):
        for j in range(0, 4):
            want[i, j] = (i + j) % 2 == 0
    torch.testing.assert_close(bm.to_dense(1, 1)[0, 0], want)
    q, k, v = make_qkv(1, Tq, Tk, 2, 2, 8)
    assert_all_close(attnzoo.attention(q, k, v, block_mask=bm), sdpa(q, k, v, keep=want[None, None]))


# ----------------------------------------------------------------------------------------------------
# KV-cache decoding


@given(
    st.integers(1, 2),
    st.integers(1, 3),
    st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 1)]),
    st.sampled_from([4, 8, 16]),
    st.integers(0, 1000),
    st.sampled_from([(-1, -1), (3, 0)]),
)
def test_kvcache_contiguous_equals_attention_over_valid_prefix(B, Tn, heads, D, seed, window):
    H, Hkv = heads
    Tmax = 13
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tn, H, D, dtype=F64, generator=g)
    kc = torch.randn(B, Tmax, Hkv, D, dtype=F64, generator=g)
    vc = torch.randn(B, Tmax, Hkv, D, dtype=F64, generator=g)
    lens = torch.randint(Tn, Tmax + 1, (B,), generator=g, dtype=torch.int32)
    o, lse = attnzoo.attention_with_kvcache(q, kc, vc, lens, window=window, return_lse=True)
    for b in range(B):
        n = int(lens[b])
        ob, lb = attnzoo.attention(
            q[b : b + 1], kc[b : b + 1, :n], vc[b : b + 1, :n], causal=True, window=window, return_lse=True
        )
        torch.testing.assert_close(o[b : b + 1], ob, **TOL)
        torch.testing.assert_close(lse[b : b + 1], lb, **TOL)
    # garbage beyond the valid prefix is never read
    kc2, vc2 = kc.clone(), vc.clone()
    for b in range(B):
        kc2[b, int(lens[b]) :] = float("nan")
        vc2[b, int(lens[b]) :] = float("nan")
    torch.testing.assert_close(attnzoo.attention_with_kvcache(q, kc2, vc2, lens, window=window), o, **TOL)


@given(st.integers(1, 2), st.integers(1, 2), st.sampled_from([2, 4]), st.integers(0, 1000))
def test_kvcache_paged_with_shuffled_block_table(B, Tn, page, seed):
    H, Hkv, D = 4, 2, 8
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = 4
    num_pages = B * pages_per_seq + 3  # spare pages hold garbage
    # the logical contiguous cache, then scattered into pages through a shuffled table
    Tmax = pages_per_seq * page
    kc = torch.randn(B, Tmax, Hkv, D, dtype=F64, generator=g)
    vc = torch.randn(B, Tmax, Hkv, D, dtype=F64, generator=g)
    q = torch.randn(B, Tn, H, D, dtype=F64, generator=g)
    perm = torch.randperm(num_pages, generator=g)
    table = perm[: B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
    kp = torch.full((num_pages, page, Hkv, D), float("nan"), dtype=F64)
    vp = torch.full((num_pages, page, Hkv, D), float("nan"), dtype=F64)
    for b in range(B):
        for p in range(pages_per_seq):
            kp[table[b, p]] = kc[b, p * page : (p + 1) * page]
            vp[table[b, p]] = vc[b, p * page : (p + 1) * page]
    lens = torch.randint(Tn, Tmax + 1, (B,), generator=g, dtype=torch.int32)
    o = attnzoo.attention_with_kvcache(q, kp, vp, lens, block_table=table)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, attnzoo.attention_with_kvcache(q, kc, vc, lens), **TOL)
    for b in range(B):
        n = int(lens[b])
        ref = attnzoo.attention(q[b : b + 1], kc[b : b + 1, :n], vc[b : b + 1, :n], causal=True)
        torch.testing.assert_close(o[b : b + 1], ref, **TOL)


def test_reference_function_and_api_agree():
    q, k, v = make_qkv(2, 5, 9, 4, 2, 8)
    bias = torch.randn(2, 1, 5, 9, dtype=F64)
    a = attnzoo.attention(q, k, v, causal=True, bias=bias, backend="reference")
    b = attention_reference(q, k, v, causal=True, bias=bias)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # default scale is 1/sqrt(D)
    torch.testing.assert_close(
        attnzoo.attention(q, k, v), attnzoo.attention(q, k, v, scale=1 / math.sqrt(8)), atol=0, rtol=0
    )
