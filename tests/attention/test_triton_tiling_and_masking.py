"""The Triton softmax kernels' loop split and SPEC §0's masking contract, against the reference.

* Interior/boundary split: with causal or a sliding window the key loops (forward, dQ) and query loops
  (dK/dV) visit boundary tiles with the band/bounds test and interior tiles without it. Shapes here span
  several interpreter tiles (16) on both sides of the band, so every loop part runs, alone and with
  bias, dense mask and key padding.
* §0.1: a row that may see no key -- here because its bias is ``-inf`` on every key -- outputs 0, lse
  ``-inf``, zero finite gradients.
* §0.3: keys excluded by key padding or by the cache length never contribute, even when their K/V slots
  hold NaN or inf (attention, decode, MoH, DMA).
"""


import torch


import pytest  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import backends  # noqa: E402
from attnzoo.ops.attention.reference import attention_reference, attention_with_kvcache_reference  # noqa: E402

from accuracy import assert_close_by_rule, lowp_reference  # noqa: E402
from test_attention_triton import DEV, _rand, check_attention  # noqa: E402

pytestmark = pytest.mark.skipif(
    bool(backends.triton_device_reasons(torch.device(DEV))), reason="Triton cannot run here"
)


# ---------------------------------------------------------------------------------------------------
# Interior / boundary split


@pytest.mark.parametrize("tq,tk,causal,window", [
    (70, 70, True, (-1, -1)),      # causal: interior tiles left of the diagonal
    (50, 83, True, (-1, -1)),      # Tq < Tk: the diagonal shifted right
    (83, 50, True, (-1, -1)),      # Tq > Tk: first rows see nothing
    (70, 70, False, (20, 0)),      # window: boundary tiles on both sides of a narrow interior
    (64, 96, False, (40, 9)),      # two-sided window, tile-aligned queries
    (70, 70, True, (37, -1)),      # causal + left window
    (33, 77, False, (-1, -1)),     # no band: every full tile is interior, the last partial one is not
])
@pytest.mark.parametrize("extra", ["none", "bias", "mask", "kpm"])
def test_interior_boundary_split(tq, tk, causal, window, extra):
    torch.manual_seed(tq * 131 + tk)
    dtype = torch.float32 if extra in ("none", "mask") else torch.float16
    B, H, Hkv, D = 2, 2, 1, 32
    q, k, v = _rand(B, tq, H, D, dtype=dtype), _rand(B, tk, Hkv, D, dtype=dtype), _rand(B, tk, Hkv, D, dtype=dtype)
    kw = dict(causal=causal, window=window)
    bias = None
    if extra == "bias":
        bias = _rand(B, H, tq, tk, dtype=dtype).requires_grad_()
    if extra == "mask":
        kw["mask"] = torch.rand(B, 1, tq, tk, device=DEV) > 0.2
    if extra == "kpm":
        kw["key_padding_mask"] = torch.rand(B, tk, device=DEV) > 0.2
    check_attention(q, k, v, bias=bias, **kw)


# ---------------------------------------------------------------------------------------------------
# SPEC §0.1: rows that see no key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_minus_inf_on_every_key_is_an_empty_row(dtype):
    """Compared with the reference given the same exclusion as a boolean mask (the reference itself returns
    NaN for a row whose bias is -inf everywhere, against SPEC §0.1; reported to its owner)."""
    torch.manual_seed(5)
    B, T, H, D = 1, 37, 2, 32
    q, k, v = (_rand(B, T, H, D, dtype=dtype) for _ in range(3))
    bias = _rand(B, H, T, T, dtype=dtype)
    bias[:, :, 4] = float("-inf")  # row 4 sees no key
    bias[:, 1, 20:30] = float("-inf")  # rows 20..29 of head 1 too
    bias[:, 0, :, 7] = float("-inf")  # and key 7 is excluded for head 0
    keep = ~torch.isneginf(bias)
    do = torch.randn(B, T, H, D, device=DEV)

    def run(fn, cast, bias_in, **kw):
        ins = [cast(t).detach().requires_grad_() for t in (q, k, v, bias_in)]
        o, lse = fn(*ins[:3], bias=ins[3], return_lse=True, **kw)
        grads = torch.autograd.grad(o, ins, do.to(o.dtype))
        return dict(zip(("o", "lse", "dq", "dk", "dv", "dbias"), (o, lse, *grads)))

    got = run(lambda *a, **kw: attnzoo.attention(*a, backend="triton", **kw), lambda t: t, bias)
    finite_bias = bias.masked_fill(~keep, 0.0)
    ref = run(attention_reference, lambda t: t.double(), finite_bias, mask=keep)
    with lowp_reference():
        low = run(attention_reference, lambda t: t, finite_bias, mask=keep)
    ref["dbias"] = ref["dbias"].masked_fill(~keep, 0.0)
    low["dbias"] = low["dbias"].masked_fill(~keep, 0.0)
    for name in got:
        assert_close_by_rule(got[name], ref[name], low[name], name, dtype=dtype)
    assert (got["o"][:, 4] == 0).all() and (got["o"][:, 20:30, 1] == 0).all()
    assert torch.isneginf(got["lse"][:, :, 4]).all() and torch.isneginf(got["lse"][:, 1, 20:30]).all()
    for name in ("dq", "dk", "dv", "dbias"):
        assert torch.isfinite(got[name]).all(), name
    assert (got["dq"][:, 4] == 0).all() and (got["dbias"][:, :, 4] == 0).all()


# ---------------------------------------------------------------------------------------------------
# SPEC §0.2: a finite bias is arithmetic, never exclusion


@pytest.mark.parametrize("dtype,value", [
    (torch.float32, -1e9), (torch.float32, "min"), (torch.float16, "min"), (torch.float16, -3e4),
])
@pytest.mark.parametrize("where", ["row", "keys"])
def test_extreme_finite_bias(dtype, value, where):
    """A row whose bias is -1e9 / finfo.min on every key is softmax of (nearly) equal scores, as SDPA gives
    -- not an empty row (finfo.min * log2(e) overflows to -inf in a log2-domain kernel); with the extreme
    value on some keys only, those keys get ~0 weight. Outputs, lse and all gradients within the rule
    (the backward must not lose log(l) under a huge row max)."""
    torch.manual_seed(10)
    B, T, H, D = 1, 37, 2, 32
    value = torch.finfo(dtype).min if value == "min" else value
    q, k, v = (_rand(B, T, H, D, dtype=dtype) for _ in range(3))
    bias = _rand(B, H, T, T, dtype=dtype)
    if where == "row":
        bias[:, :, 5] = value
        bias[:, 1, 20:24] = value
    else:
        bias[..., ::3] = value
    if where == "keys":
        got = check_attention(q, k, v, bias=bias.requires_grad_(), causal=True)
        assert torch.isfinite(got["lse"]).all()
        return
    # Rows at -1e9 / finfo.min: no gradient through lse here -- the reference's own logsumexp backward
    # (exp(s - lse) with lse rounded to the row max) gives every key weight 1 instead of 1/n on such rows
    # (reported to the reference's owner); the kernel keeps the row max and log(l) apart.
    do = torch.randn(B, T, H, D, device=DEV)

    def run(fn, cast):
        ins = [cast(t).detach().requires_grad_() for t in (q, k, v, bias)]
        o, lse = fn(*ins[:3], bias=ins[3], return_lse=True)
        grads = torch.autograd.grad(o, ins, do.to(o.dtype))
        return dict(zip(("o", "lse", "dq", "dk", "dv", "dbias"), (o, lse, *grads)))

    got = run(lambda *a, **kw: attnzoo.attention(*a, backend="triton", **kw), lambda t: t)
    ref = run(attention_reference, lambda t: t.double())
    with lowp_reference():
        low = run(attention_reference, lambda t: t)
    for name in got:
        assert_close_by_rule(got[name], ref[name], low[name], name, dtype=dtype)
    assert torch.isfinite(got["lse"]).all()


# ---------------------------------------------------------------------------------------------------
# SPEC §0.3: excluded keys never contribute, whatever their K/V slots hold


def _poison(t, where, value):
    t = t.detach().clone()
    t[where] = value
    return t


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_holding_nan_or_inf_never_contribute(value, causal):
    torch.manual_seed(6)
    B, Tq, Tk, H, Hkv, D = 2, 29, 45, 4, 2, 32
    q = _rand(B, Tq, H, D, dtype=torch.float16)
    k, v = _rand(B, Tk, Hkv, D, dtype=torch.float16), _rand(B, Tk, Hkv, D, dtype=torch.float16)
    kpm = torch.rand(B, Tk, device=DEV) > 0.3
    kpm[:, -1] = True  # (every row keeps a visible key under causal)
    pad = ~kpm
    bias = _rand(B, H, Tq, Tk, dtype=torch.float16).requires_grad_()
    k_bad, v_bad = _poison(k, pad, value), _poison(v, pad, value)
    do = torch.randn(B, Tq, H, D, device=DEV)

    def run(fn, kk, vv, cast):
        ins = [cast(t).detach().requires_grad_() for t in (q, kk, vv, bias)]
        o, lse = fn(*ins[:3], bias=ins[3], causal=causal, key_padding_mask=kpm, return_lse=True)
        grads = torch.autograd.grad(o, ins, do.to(o.dtype))
        return dict(zip(("o", "lse", "dq", "dk", "dv", "dbias"), (o, lse, *grads)))

    got = run(lambda *a, **kw: attnzoo.attention(*a, backend="triton", **kw), k_bad, v_bad, lambda t: t)
    ref = run(attention_reference, k, v, lambda t: t.double())
    with lowp_reference():
        low = run(attention_reference, k, v, lambda t: t)
    for name in got:
        assert_close_by_rule(got[name], ref[name], low[name], name, dtype=torch.float16)
    assert (got["dk"][pad] == 0).all() and (got["dv"][pad] == 0).all()


@pytest.mark.parametrize("paged", [False, True])
def test_cache_slots_past_the_length_holding_nan_never_contribute(paged):
    torch.manual_seed(7)
    B, Tn, H, Hkv, D, cap = 3, 2, 4, 2, 32, 48
    q = _rand(B, Tn, H, D, dtype=torch.float16)
    lens = torch.tensor([5, 31, 48], dtype=torch.int32, device=DEV)
    kw = {}
    if paged:
        page = 16
        k_cache, v_cache = _rand(B * cap // page, page, Hkv, D, dtype=torch.float16), _rand(
            B * cap // page, page, Hkv, D, dtype=torch.float16)
        table = torch.arange(B * cap // page, device=DEV, dtype=torch.int32).view(B, -1)
        kw["block_table"] = table
        slot = torch.arange(cap, device=DEV)[None, :] >= lens[:, None]  # [B, cap]
        dead = slot.view(B, cap // page, page).reshape(-1, page)
    else:
        k_cache, v_cache = _rand(B, cap, Hkv, D, dtype=torch.float16), _rand(B, cap, Hkv, D, dtype=torch.float16)
        dead = torch.arange(cap, device=DEV)[None, :] >= lens[:, None]
    k_bad, v_bad = _poison(k_cache, dead, float("nan")), _poison(v_cache, dead, float("nan"))
    got = attnzoo.attention_with_kvcache(q, k_bad, v_bad, lens, return_lse=True, backend="triton", causal=True, **kw)
    ref = attention_with_kvcache_reference(q.double(), k_cache.double(), v_cache.double(), lens, return_lse=True,
                                           causal=True, **kw)
    with lowp_reference():
        low = attention_with_kvcache_reference(q, k_cache, v_cache, lens, return_lse=True, causal=True, **kw)
    for name, a, r, lo in zip(("o", "lse"), got, ref, low):
        assert_close_by_rule(a, r, lo, name, dtype=torch.float16)


def test_moh_padded_keys_holding_nan_never_contribute():
    torch.manual_seed(8)
    B, T, H, Hkv, D = 2, 40, 4, 2, 32
    q = _rand(B, T, H, D, dtype=torch.float32)
    k, v = _rand(B, T, Hkv, D, dtype=torch.float32), _rand(B, T, Hkv, D, dtype=torch.float32)
    gates = torch.rand(B, T, H, device=DEV) * (torch.rand(B, T, H, device=DEV) > 0.4)
    kpm = torch.rand(B, T, device=DEV) > 0.3
    pad = ~kpm
    k_bad, v_bad = _poison(k, pad, float("nan")), _poison(v, pad, float("nan"))
    do = torch.randn(B, T, H, D, device=DEV)

    def run(kk, vv, backend):
        ins = [t.detach().clone().requires_grad_() for t in (q, kk, vv, gates)]
        o = attnzoo.moh_attention(*ins, key_padding_mask=kpm, backend=backend)
        return [o, *torch.autograd.grad(o, ins, do)]

    got = run(k_bad, v_bad, "triton")
    ref = run(k, v, "reference")
    for name, a, r in zip(("o", "dq", "dk", "dv", "dgates"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5, msg=name)
    assert (got[2][pad] == 0).all() and (got[3][pad] == 0).all()


def test_dma_padded_keys_holding_nan_never_contribute():
    torch.manual_seed(9)
    B, T, H, Hkv, D = 2, 48, 4, 2, 32
    q = _rand(B, T, H, D, dtype=torch.float32)
    k, v = _rand(B, T, Hkv, D, dtype=torch.float32), _rand(B, T, Hkv, D, dtype=torch.float32)
    bias = _rand(B, Hkv, T, dtype=torch.float32)
    kpm = torch.rand(B, T, device=DEV) > 0.3
    kpm[:, 0] = True
    pad = ~kpm
    k_bad, v_bad = _poison(k, pad, float("nan")), _poison(v, pad, float("nan"))
    do = torch.randn(B, T, H, D, device=DEV)

    def run(kk, vv, backend):
        ins = [t.detach().clone().requires_grad_() for t in (q, kk, vv, bias)]
        o = attnzoo.dynamic_mask_attention(*ins, keep_window=12, causal=True, key_padding_mask=kpm, backend=backend)
        return [o, *torch.autograd.grad(o, ins, do)]

    got = run(k_bad, v_bad, "triton")
    ref = run(k, v, "reference")
    for name, a, r in zip(("o", "dq", "dk", "dv", "dbias"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5, msg=name)
