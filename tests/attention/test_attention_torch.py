"""The "torch" backend of ``attention`` / ``attention_with_kvcache`` against the reference (SPEC §0, §1, §2),
and the masking contract (docs/masking.md) on every backend that can run here.

Every comparison uses SPEC §0's accuracy rule (tests/accuracy.py) on the output, the lse and every
gradient (q, k, v, bias). Chunks are shrunk to 16 query rows so the tiny shapes cross chunk boundaries.
The backend runs twice per case: without ``return_lse`` (the SDPA paths) and with it (explicit chunks).
"""


import torch


import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import backends  # noqa: E402
from attnzoo.ops.attention import torch_backend as TB  # noqa: E402
from attnzoo.ops.attention.reference import attention_reference, attention_with_kvcache_reference  # noqa: E402
from attnzoo.ops.masks import block_mask as bmm  # noqa: E402

from accuracy import assert_close_by_rule, lowp_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(TB, "MAX_CHUNK", 16)


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype=dtype, device=DEV)


def check_torch(q, k, v, *, bias=None, **kw):
    """backend="torch" vs the reference (fp64, and in q's dtype) by the accuracy rule: o (SDPA path, no lse),
    o and lse (lse path), and the gradients of q, k, v (and bias) through each."""
    leaves = {"q": q, "k": k, "v": v}
    if bias is not None and bias.requires_grad:
        leaves["bias"] = bias
    do = torch.randn(q.shape[:-1] + (v.shape[-1],), device=DEV)
    lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
    dl = torch.randn(lse_shape, device=DEV)

    def run(fn, cast, with_lse):
        ins = {n: cast(t).detach().requires_grad_(True) for n, t in leaves.items()}
        kw2 = dict(kw)
        if bias is not None:
            kw2["bias"] = ins.get("bias", cast(bias))
        res = fn(ins["q"], ins["k"], ins["v"], return_lse=with_lse, **kw2)
        o, lse = res if with_lse else (res, None)
        out = {"o": o}
        outs, cots = [o], [do.to(o.dtype)]
        if with_lse:
            out["lse"] = lse
            outs.append(torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
            cots.append(dl.to(lse.dtype))
        gs = torch.autograd.grad(outs, list(ins.values()), cots, allow_unused=True)
        out.update({"d" + n: (torch.zeros_like(ins[n]) if g is None else g) for n, g in zip(ins, gs)})
        return out

    dtype = q.dtype
    for with_lse in (False, True):
        got = run(lambda *a, **k2: attnzoo.attention(*a, backend="torch", **k2), lambda t: t, with_lse)
        ref = run(attention_reference, lambda t: t.double(), with_lse)
        with lowp_reference():
            low = run(attention_reference, lambda t: t.to(dtype), with_lse)
        for name in got:
            assert_close_by_rule(got[name], ref[name], low[name], f"{name} (return_lse={with_lse})", dtype=dtype)
    return got


@st.composite
def heads(draw):
    hkv = draw(st.sampled_from([1, 2]))
    return hkv * draw(st.sampled_from([1, 2])), hkv


@settings(max_examples=20, **SETTINGS)
@given(
    b=st.integers(1, 2), tq=st.integers(1, 40), tk=st.integers(1, 40), hh=heads(), d=st.sampled_from([8, 32]),
    dtype=st.sampled_from(DTYPES), causal=st.booleans(), left=st.sampled_from([-1, -1, 0, 5, 17]),
    right=st.sampled_from([-1, -1, 0, 3, 20]), kpm=st.booleans(), seed=st.integers(0, 2**16),
)
def test_core_matrix(b, tq, tk, hh, d, dtype, causal, left, right, kpm, seed):
    """GQA/MQA, causal (bottom-right, any Tq/Tk), sliding window, key padding."""
    torch.manual_seed(seed)
    H, Hkv = hh
    q, k, v = _rand(b, tq, H, d, dtype=dtype), _rand(b, tk, Hkv, d, dtype=dtype), _rand(b, tk, Hkv, d, dtype=dtype)
    kw = dict(causal=causal, window=(left, right))
    if kpm:
        kw["key_padding_mask"] = torch.rand(b, tk, device=DEV) > 0.3
    check_torch(q, k, v, **kw)


@settings(max_examples=20, **SETTINGS)
@given(
    b=st.integers(1, 2), tq=st.integers(1, 36), tk=st.integers(1, 36), hh=heads(), dtype=st.sampled_from(DTYPES),
    form=st.integers(0, 11), use_bias=st.booleans(), use_mask=st.booleans(), causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bias_and_mask_broadcasts(b, tq, tk, hh, dtype, form, use_bias, use_mask, causal, seed):
    """Additive bias (dbias reduced to its own shape) and bool masks in every broadcast form."""
    torch.manual_seed(seed)
    H, Hkv = hh
    from test_attention_triton import _bias_shapes  # the 12 broadcast forms, as the Triton tests draw them

    shapes = _bias_shapes(b, H, Hkv, tq, tk)
    q, k, v = _rand(b, tq, H, 16, dtype=dtype), _rand(b, tk, Hkv, 16, dtype=dtype), _rand(b, tk, Hkv, 16, dtype=dtype)
    kw = dict(causal=causal)
    bias = None
    if use_bias or not use_mask:
        bias = _rand(*shapes[form % len(shapes)], dtype=dtype).requires_grad_()
    if use_mask:
        kw["mask"] = torch.rand(shapes[(form * 7 + 3) % len(shapes)], device=DEV) > 0.25
    got = check_torch(q, k, v, bias=bias, **kw)
    if bias is not None:
        assert got["dbias"].shape == bias.shape


@pytest.mark.parametrize("builder", ["causal", "window", "document"])
def test_block_mask(builder):
    torch.manual_seed(3)
    B, H, T = 2, 2, 45
    if builder == "causal":
        bm = bmm.causal_block_mask(1, 1, T, T, block_size=(16, 16))
    elif builder == "window":
        bm = bmm.window_block_mask(1, 1, T, T, 9, 0, block_size=(16, 8))
    else:
        doc = torch.tensor([[0] * 20 + [1] * 25, [0] * 7 + [1] * 38])
        bm = bmm.document_block_mask(doc, H=1, block_size=(16, 16))
    q, k, v = (_rand(B, T, H, 16, dtype=torch.float32) for _ in range(3))
    check_torch(q, k, v, block_mask=bm)


@settings(max_examples=20, **SETTINGS)
@given(lens=st.lists(st.integers(0, 30), min_size=1, max_size=4), hh=heads(), causal=st.booleans(),
       window=st.sampled_from([(-1, -1), (3, 0), (2, 2)]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 999))
def test_varlen(lens, hh, causal, window, dtype, seed):
    torch.manual_seed(seed)
    H, Hkv = hh
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    N = int(cu[-1])
    q, k, v = _rand(N, H, 16, dtype=dtype), _rand(N, Hkv, 16, dtype=dtype), _rand(N, Hkv, 16, dtype=dtype)
    check_torch(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal, window=window)


@settings(max_examples=20, **SETTINGS)
@given(b=st.integers(1, 3), tn=st.integers(1, 20), cap=st.integers(20, 50), hh=heads(), paged=st.booleans(),
       causal=st.booleans(), window=st.sampled_from([(-1, -1), (5, 0)]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 999))
def test_kvcache(b, tn, cap, hh, paged, causal, window, dtype, seed):
    """Decode against a contiguous or paged cache, with NaN in every slot past cache_seqlens."""
    torch.manual_seed(seed)
    H, Hkv = hh
    page = 8
    n_pages = -(-cap // page)
    cap = n_pages * page if paged else cap
    lens = torch.randint(tn, cap + 1, (b,), dtype=torch.int32)
    q = _rand(b, tn, H, 16, dtype=dtype)
    kc, vc = _rand(b, cap, Hkv, 16, dtype=dtype), _rand(b, cap, Hkv, 16, dtype=dtype)
    for i, n in enumerate(lens.tolist()):
        kc[i, n:] = float("nan")
        vc[i, n:] = float("nan")
    kw = dict(causal=causal, window=window)
    if paged:
        table = torch.randperm(b * n_pages).view(b, n_pages).to(torch.int32)
        pk = torch.empty(b * n_pages, page, Hkv, 16, dtype=dtype)
        pv = torch.empty_like(pk)
        pk[table.view(-1).long()] = kc.view(b * n_pages, page, Hkv, 16)
        pv[table.view(-1).long()] = vc.view(b * n_pages, page, Hkv, 16)
        kc, vc, kw["block_table"] = pk, pv, table
    got = attnzoo.attention_with_kvcache(q, kc, vc, lens, backend="torch", return_lse=True, **kw)
    ref = attention_with_kvcache_reference(q.double(), kc.double(), vc.double(), lens, return_lse=True, **kw)
    with lowp_reference():
        low = attention_with_kvcache_reference(q, kc, vc, lens, return_lse=True, **kw)
    for name, g, r, lo in zip(("o", "lse"), got, ref, low):
        assert_close_by_rule(g, r, lo, name, dtype=dtype)
    o = attnzoo.attention_with_kvcache(q, kc, vc, lens, backend="torch", **kw)
    assert_close_by_rule(o, ref[0], low[0], "o (no lse)", dtype=dtype)


def test_large_shapes_never_build_a_full_score_matrix():
    """Memory is O(chunk x Tk): every allocation of a masked causal run with a bias is far below one
    [B, H, Tq, Tk] fp32 matrix (the profiler sees every allocation)."""
    from torch.profiler import ProfilerActivity, profile

    B, H, T, D = 1, 4, 1024, 16
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    bias = torch.randn(1, 1, 1, T)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        attnzoo.attention(q, k, v, causal=True, window=(300, 0), bias=bias, backend="torch")
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    full = B * H * T * T * 4
    assert 0 < biggest < full / 8, (biggest, full)


# ---------------------------------------------------------------------------------------------------
# The masking contract (docs/masking.md), on every backend that can run here


def _runnable():
    """reference, torch, and triton where it runs here."""
    out = ["reference", "torch"]
    if not backends.triton_device_reasons(torch.device(DEV)):
        out.append("triton")
    return out




def _empty_row_cases():
    """(name, Tq, Tk, kwargs builder) whose row 0 of batch 0 sees no key."""
    def causal(q, k):
        return dict(causal=True)  # Tq > Tk: the first Tq - Tk rows see nothing

    def window(q, k):
        return dict(window=(0, 0), causal=False)  # Tq > Tk with a zero-width window: row 0 sees key -(Tq-Tk)

    def padding(q, k):
        m = torch.ones(2, k.shape[1], dtype=torch.bool, device=DEV)
        m[0] = False
        return dict(key_padding_mask=m)

    def mask(q, k):
        m = torch.ones(2, 1, q.shape[1], k.shape[1], dtype=torch.bool, device=DEV)
        m[0, 0, 0] = False
        return dict(mask=m)

    def bias_inf(q, k):
        bias = torch.randn(2, 1, q.shape[1], k.shape[1], device=DEV, dtype=q.dtype)
        bias[0, 0, 0] = float("-inf")
        bias[1, 0, 3, ::2] = float("-inf")  # partly excluded row: the rest still counts
        return dict(bias=bias.requires_grad_())

    return [("causal", causal), ("window", window), ("padding", padding), ("mask", mask), ("bias_-inf", bias_inf)]


@pytest.mark.parametrize("backend", _runnable())
@pytest.mark.parametrize("case", _empty_row_cases(), ids=[c[0] for c in _empty_row_cases()])
def test_contract_empty_rows(backend, case):
    """A row that may see no key outputs exactly 0, lse -inf, and its gradients are 0 and finite."""
    name, build = case
    torch.manual_seed(0)
    q = _rand(2, 20, 4, 16, dtype=torch.float32).requires_grad_()
    k = _rand(2, 17, 2, 16, dtype=torch.float32).requires_grad_()
    v = _rand(2, 17, 2, 16, dtype=torch.float32).requires_grad_()
    kw = build(q, k)
    o, lse = attnzoo.attention(q, k, v, return_lse=True, backend=backend, **kw)
    assert (o[0, 0] == 0).all() and torch.isneginf(lse[0, :, 0]).all()
    assert torch.isfinite(o).all()
    leaves = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    gs = torch.autograd.grad(o.square().sum() + torch.where(torch.isfinite(lse), lse, 0).sum(), leaves)
    for g in gs:
        assert torch.isfinite(g).all()
    assert (gs[0][0, 0] == 0).all()  # dq of the empty row
    if "bias" in kw:
        assert (gs[3][0, 0, 0] == 0).all()  # no gradient to the bias of the empty row
        assert (gs[3][1, 0, 3, ::2] == 0).all() and (gs[3][1, 0, 3, 1::2] != 0).any()
    # the backend agrees with the reference everywhere else (fp64 reference, rule in fp32)
    if backend != "reference":
        ref = attention_reference(q.double(), k.double(), v.double(), return_lse=True,
                                  **{n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                                     for n, t in kw.items()})
        with lowp_reference():
            low = attention_reference(q, k, v, return_lse=True, **kw)
        for nm, g, r, lo in zip(("o", "lse"), (o, lse), ref, low):
            assert_close_by_rule(g, r, lo, nm, dtype=torch.float32)


@pytest.mark.parametrize("backend", _runnable())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_finfo_min_row_is_uniform_softmax(backend, dtype):
    """A finite bias is arithmetic: a row whose bias is finfo.min on every key averages V (equal scores),
    as SDPA and eager attention do; it is not an empty row."""
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32  # the Triton kernels take float16/bfloat16/float32
    torch.manual_seed(1)
    q = _rand(1, 6, 2, 16, dtype=dtype)
    k, v = _rand(1, 9, 2, 16, dtype=dtype), _rand(1, 9, 2, 16, dtype=dtype)
    bias = torch.zeros(1, 1, 6, 9, dtype=dtype, device=DEV)
    bias[0, 0, 2] = torch.finfo(dtype).min
    o = attnzoo.attention(q, k, v, bias=bias, backend=backend)
    torch.testing.assert_close(o[0, 2], v[0].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _runnable()[1:])
@pytest.mark.parametrize("fill", ["finfo.min", "-1e9"])
def test_contract_extreme_finite_bias_within_rule(backend, fill):
    """Extreme finite biases (HF-style additive masks) keep outputs and gradients within the rule."""
    torch.manual_seed(2)
    dtype = torch.float32
    q = _rand(2, 12, 4, 16, dtype=dtype)
    k, v = _rand(2, 15, 2, 16, dtype=dtype), _rand(2, 15, 2, 16, dtype=dtype)
    val = torch.finfo(dtype).min if fill == "finfo.min" else -1e9
    bias = torch.zeros(2, 1, 12, 15, dtype=dtype, device=DEV)
    bias[:, :, :, 10:] = val  # HF padding: the last keys masked by a huge negative number
    bias[1, :, 4] = val  # one row masked everywhere
    bias.requires_grad_()
    if backend == "torch":
        check_torch(q, k, v, bias=bias, causal=True)
    else:
        from test_attention_triton import check_attention  # the same rule, the Triton backend

        check_attention(q, k, v, bias=bias, causal=True)


@pytest.mark.parametrize("backend", _runnable())
def test_contract_nan_in_padded_slots_never_leaks(backend):
    """K/V slots excluded by key padding may hold NaN/inf: the result equals the one with zeros there, and
    every gradient is finite."""
    torch.manual_seed(4)
    q = _rand(2, 10, 4, 16, dtype=torch.float32)
    k, v = _rand(2, 13, 2, 16, dtype=torch.float32), _rand(2, 13, 2, 16, dtype=torch.float32)
    kpm = torch.ones(2, 13, dtype=torch.bool, device=DEV)
    kpm[0, 9:] = False
    kpm[1, :4] = False
    clean_k, clean_v = k.masked_fill(~kpm[..., None, None], 0), v.masked_fill(~kpm[..., None, None], 0)
    bad_k = clean_k.masked_fill(~kpm[..., None, None], float("nan"))
    bad_v = clean_v.masked_fill(~kpm[..., None, None], float("inf"))
    for causal in (False, True):
        want = attnzoo.attention(q, clean_k, clean_v, key_padding_mask=kpm, causal=causal, backend=backend)
        ins = [t.clone().requires_grad_() for t in (q, bad_k, bad_v)]
        got = attnzoo.attention(*ins, key_padding_mask=kpm, causal=causal, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for g in torch.autograd.grad(got.sum(), ins):
            assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", _runnable())
def test_contract_nan_past_cache_length_never_leaks(backend):
    torch.manual_seed(5)
    q = _rand(2, 2, 4, 16, dtype=torch.float32)
    kc, vc = _rand(2, 30, 2, 16, dtype=torch.float32), _rand(2, 30, 2, 16, dtype=torch.float32)
    lens = torch.tensor([7, 30], dtype=torch.int32, device=DEV)
    want = attnzoo.attention_with_kvcache(q, kc, vc, lens, backend=backend)
    kc[0, 7:], vc[0, 7:] = float("nan"), float("inf")
    got = attnzoo.attention_with_kvcache(q, kc, vc, lens, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_contract_varlen_rows_with_no_key(backend):
    """Varlen bounds exclude the other sequences' keys: a query sequence paired with an empty key
    sequence outputs 0 with lse -inf."""
    q = torch.randn(9, 2, 8)
    k, v = torch.randn(5, 1, 8), torch.randn(5, 1, 8)
    cq = torch.tensor([0, 4, 9], dtype=torch.int32)
    ck = torch.tensor([0, 5, 5], dtype=torch.int32)
    o, lse = attnzoo.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True, backend=backend)
    assert (o[4:] == 0).all() and torch.isneginf(lse[:, 4:]).all() and torch.isfinite(o).all()


@pytest.mark.parametrize("backend", _runnable())
@pytest.mark.parametrize("fill", ["finfo.min", "-1e9"])
def test_contract_lse_gradient_of_a_huge_bias_row_is_the_softmax(backend, fill):
    """d lse / d bias = softmax: 1/n per key on a row whose bias is one huge finite value everywhere, even
    though lse = bias + log(n) rounds to the bias (autograd of torch.logsumexp would give 1 per key)."""
    torch.manual_seed(5)
    q = _rand(1, 3, 2, 16, dtype=torch.float32)
    k, v = _rand(1, 7, 2, 16, dtype=torch.float32), _rand(1, 7, 2, 16, dtype=torch.float32)
    val = torch.finfo(torch.float32).min if fill == "finfo.min" else -1e9
    bias = torch.zeros(1, 2, 3, 7, device=DEV)
    bias[:, :, 1] = val
    bias.requires_grad_()
    _, lse = attnzoo.attention(q, k, v, bias=bias, return_lse=True, backend=backend)
    (dbias,) = torch.autograd.grad(lse[:, :, 1].sum(), bias)
    torch.testing.assert_close(dbias[:, :, 1], torch.full_like(dbias[:, :, 1], 1 / 7), rtol=1e-5, atol=1e-6)
    assert (dbias[:, :, [0, 2]] == 0).all()
