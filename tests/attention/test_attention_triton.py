"""The Triton softmax-attention core (backend="triton") against the PyTorch reference (SPEC §0, §1, §2).

Every comparison uses SPEC §0's accuracy rule (tests/accuracy.py): outputs, lse and every gradient
(q, k, v, bias). Without a GPU the kernels run under the Triton interpreter: shapes are tiny, kernel tiles
are 16 so tile boundaries are crossed, and bf16 is left to GPU runs (the interpreter's bf16 dot is wrong).
Fresh output buffers are NaN-filled (ATTNZOO_FILL_NAN=1) so unwritten elements fail the rule.
"""


import torch


import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import backends  # noqa: E402
from attnzoo.errors import BackendUnavailableError, InputError  # noqa: E402
from attnzoo.ops.attention.reference import attention_reference, attention_with_kvcache_reference  # noqa: E402
from attnzoo.ops.masks import block_mask as bmm  # noqa: E402

from accuracy import assert_close_by_rule, lowp_reference  # noqa: E402

pytestmark = pytest.mark.skipif(
    bool(backends.triton_device_reasons(torch.device("cuda" if torch.cuda.is_available() else "cpu"))),
    reason="Triton cannot run here",
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype=dtype, device=DEV)


def check_attention(q, k, v, *, bias=None, grads=True, grad_floor=None, **kw):
    """Run backend="triton" and the reference (fp64 and the kernel's dtype) and apply the accuracy rule to
    o, lse and the gradients of q, k, v (and bias, if it requires grad). Returns the kernel's results."""
    leaves = {"q": q, "k": k, "v": v}
    if bias is not None and bias.requires_grad:
        leaves["bias"] = bias
    o_shape = q.shape[:-1] + (v.shape[-1],)
    do = torch.randn(o_shape, device=DEV)
    dl = None

    def run(fn, cast):
        nonlocal dl
        ins = {n: cast(t).detach().requires_grad_(grads) for n, t in leaves.items()}
        kw2 = dict(kw)
        if bias is not None:
            kw2["bias"] = ins.get("bias", cast(bias))
        o, lse = fn(ins["q"], ins["k"], ins["v"], return_lse=True, **kw2)
        out = {"o": o, "lse": lse}
        if grads:
            if dl is None:
                dl = torch.randn(lse.shape, device=DEV)
            lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            gs = torch.autograd.grad([o, lse_f], list(ins.values()), [do.to(o.dtype), dl.to(lse.dtype)])
            out.update({"d" + n: g for n, g in zip(ins, gs)})
        return out

    dtype = q.dtype
    got = run(lambda *a, **k2: attnzoo.attention(*a, backend="triton", **k2), lambda t: t)
    ref = run(attention_reference, lambda t: t.double())
    with lowp_reference():
        low = run(attention_reference, lambda t: t.to(dtype) if t.is_floating_point() else t)
    for name in got:
        floor = grad_floor(ref[name]) if (grad_floor is not None and name.startswith("d")) else None
        assert_close_by_rule(got[name], ref[name], low[name], name, dtype=dtype, floor=floor)
    return got


# ---------------------------------------------------------------------------------------------------
# Property tests over the feature matrix


@st.composite
def heads(draw):
    hkv = draw(st.sampled_from([1, 2]))
    return hkv * draw(st.sampled_from([1, 2])), hkv


@settings(max_examples=10, **SETTINGS)
@given(
    b=st.integers(1, 2), tq=st.integers(1, 40), tk=st.integers(1, 40), hh=heads(),
    d=st.sampled_from([8, 32, 64, 96]), dtype=st.sampled_from(DTYPES), causal=st.booleans(),
    left=st.sampled_from([-1, -1, 0, 5, 17]), right=st.sampled_from([-1, -1, 0, 3, 20]),
    kpm=st.booleans(), seed=st.integers(0, 2**16),
)
def test_core_matrix(b, tq, tk, hh, d, dtype, causal, left, right, kpm, seed):
    """GQA/MQA, causal (bottom-right), sliding window, key padding, any Tq/Tk, head dims."""
    torch.manual_seed(seed)
    H, Hkv = hh
    q, k, v = _rand(b, tq, H, d, dtype=dtype), _rand(b, tk, Hkv, d, dtype=dtype), _rand(b, tk, Hkv, d, dtype=dtype)
    kw = dict(causal=causal, window=(left, right))
    if kpm:
        kw["key_padding_mask"] = torch.rand(b, tk, device=DEV) > 0.3
    check_attention(q, k, v, **kw)


def _bias_shapes(B, H, Hkv, Tq, Tk):
    return [(bb, bh, bq, Tk) for bb in (B, 1) for bh in sorted({H, Hkv, 1}) for bq in (Tq, 1)]


@settings(max_examples=10, **SETTINGS)
@given(
    b=st.integers(1, 2), tq=st.integers(1, 24), tk=st.integers(1, 40), hh=heads(), dtype=st.sampled_from(DTYPES),
    form=st.integers(0, 11), use_bias=st.booleans(), use_mask=st.booleans(), causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bias_and_mask_broadcasts(b, tq, tk, hh, dtype, form, use_bias, use_mask, causal, seed):
    """Additive bias (with dbias reduced to its own shape) and dense bool masks in every broadcast form."""
    torch.manual_seed(seed)
    H, Hkv = hh
    shapes = _bias_shapes(b, H, Hkv, tq, tk)
    shape = shapes[form % len(shapes)]
    q, k, v = _rand(b, tq, H, 32, dtype=dtype), _rand(b, tk, Hkv, 32, dtype=dtype), _rand(b, tk, Hkv, 32, dtype=dtype)
    kw = dict(causal=causal)
    bias = None
    if use_bias or not use_mask:
        bias = _rand(*shape, dtype=dtype).requires_grad_()
    if use_mask:
        mshape = shapes[(form * 7 + 3) % len(shapes)]
        kw["mask"] = torch.rand(mshape, device=DEV) > 0.25
    check_attention(q, k, v, bias=bias, **kw)


_FORMS_12 = _bias_shapes(2, 4, 2, 17, 21)  # B=2, H=4, Hkv=2: the 12 forms are all distinct
# per-query biases shared across batches or across all kv heads also have the in-kernel (looping) strategy
_DBIAS_CASES = [(f, False) for f in range(12)] + [
    (f, True) for f, (bb, bh, bq, _) in enumerate(_FORMS_12) if bq == 17 and (bb == 1 or bh == 1)]


@pytest.mark.parametrize("form,in_kernel", _DBIAS_CASES,
                         ids=[f"{_FORMS_12[f]}-{'in_kernel' if i else 'partial'}" for f, i in _DBIAS_CASES])
def test_dbias_every_broadcast_form(form, in_kernel, monkeypatch):
    """dbias of each of the 12 forms, by both strategies for a bias shared across batches / kv heads: a
    small partial buffer summed on the host, or the dK/dV programs looping over the shared dims."""
    from attnzoo.ops.attention import triton_bwd as BW

    shape = _FORMS_12[form]
    plan_loop = BW.dbias_plan(shape, torch.float32, 2, 4, 2, 17, 21, partial_max_bytes=0)
    if in_kernel:
        assert plan_loop.nb_in * plan_loop.nh_in > 1 and plan_loop.buf_shape == shape
    monkeypatch.setattr(BW, "DBIAS_PARTIAL_MAX_BYTES", 0 if in_kernel else 1 << 40)
    torch.manual_seed(form)
    dtype = (torch.float32, torch.float16)[form % 2]
    q = _rand(2, 17, 4, 16, dtype=dtype)
    k, v = _rand(2, 21, 2, 16, dtype=dtype), _rand(2, 21, 2, 16, dtype=dtype)
    bias = _rand(*shape, dtype=dtype).requires_grad_()
    got = check_attention(q, k, v, bias=bias, causal=form % 3 == 0, window=(-1, -1) if form % 3 else (9, -1))
    assert got["dbias"].shape == bias.shape and got["dbias"].dtype == bias.dtype


@pytest.mark.parametrize("form", range(12), ids=[str(f) for f in _FORMS_12])
def test_dense_mask_every_broadcast_form(form):
    """A boolean mask in each of SPEC §1's 12 broadcast forms, with a bias of another form beside it."""
    torch.manual_seed(100 + form)
    dtype = (torch.float32, torch.float16)[form % 2]
    q = _rand(2, 17, 4, 16, dtype=dtype)
    k, v = _rand(2, 21, 2, 16, dtype=dtype), _rand(2, 21, 2, 16, dtype=dtype)
    mask = torch.rand(*_FORMS_12[form], device=DEV) > 0.4
    bias = _rand(*_FORMS_12[(form + 5) % 12], dtype=dtype).requires_grad_()
    got = check_attention(q, k, v, mask=mask, bias=bias, causal=form % 3 == 0)
    assert got["dbias"].shape == bias.shape


def _backward_allocations(fn):
    """Bytes of every tensor allocation made while ``fn`` runs (CPU and GPU), from the profiler's memory
    events (they see allocations inside custom ops and kernels' Python wrappers alike)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=acts, profile_memory=True) as prof:
        out = fn()
    events = prof.events()
    dev_attr = "self_device_memory_usage" if events and hasattr(events[0], "self_device_memory_usage") \
        else "self_cuda_memory_usage"
    sizes = [n for e in events for n in (e.self_cpu_memory_usage, getattr(e, dev_attr, 0)) if n and n > 0]
    return out, sizes


@pytest.mark.parametrize("full", [False, True], ids=["bias_1x1x1xTk", "bias_BxHxTqxTk"])
def test_dbias_never_allocates_full_score_buffer(full):
    """The backward with a trainable bias allocates no fp32 [B, H, Tq, Tk] buffer: a per-key bias costs
    O(B*H*Tk), a full-shape one only its own dbias (written directly in the bias' dtype)."""
    torch.manual_seed(12)
    B, H, Hkv, T, D = 2, 4, 2, 64, 16
    full_fp32 = B * H * T * T * 4
    q = _rand(B, T, H, D, dtype=torch.float16).requires_grad_()
    k, v = (_rand(B, T, Hkv, D, dtype=torch.float16).requires_grad_() for _ in range(2))
    shape = (B, H, T, T) if full else (1, 1, 1, T)
    bias = _rand(*shape, dtype=torch.float16).requires_grad_()
    o = attnzoo.attention(q, k, v, bias=bias, causal=True, backend="triton")
    do = torch.randn_like(o)
    grads, sizes = _backward_allocations(lambda: torch.autograd.grad(o, (q, k, v, bias), do))
    assert grads[3].shape == bias.shape
    assert any(n >= q.numel() * q.element_size() for n in sizes), "the profiler saw no allocation: hook broken?"
    if full:
        assert bias.numel() * bias.element_size() in sizes  # the dbias itself, seen inside the custom op
        assert max(sizes) < full_fp32, f"an allocation of {max(sizes)} bytes >= B*H*Tq*Tk*4 = {full_fp32}"
    else:
        # the largest legitimate allocations are q-sized fp32 temporaries (B*Tq*H*D*4 = full_fp32 / 4)
        assert max(sizes) < full_fp32 // 2, f"an allocation of {max(sizes)} bytes for a [1,1,1,Tk] bias"


def _random_block_mask(B, H, Tq, Tk, bq, bk, with_mod):
    mq, nk = -(-Tq // bq), -(-Tk // bk)
    state = torch.randint(0, 3, (B, H, mq, nk), device=DEV)  # 0 none, 1 partial, 2 full
    pc, pi = bmm._compress(state == 1)
    fc, fi = bmm._compress(state == 2)
    dense = torch.rand(B, H, Tq, Tk, device=DEV) > 0.3

    def mod(b, h, qq, kk):  # evaluated with the full (B, H) of the inputs
        return dense[b % B, h % H, qq, kk]

    return bmm.BlockMask(pc, pi, fc, fi, (bq, bk), (Tq, Tk), mod if with_mod else None)


@settings(max_examples=8, **SETTINGS)
@given(
    b=st.integers(1, 2), tq=st.integers(1, 40), tk=st.integers(1, 40), hh=heads(), dtype=st.sampled_from(DTYPES),
    bq=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]), bm_b=st.booleans(), bm_h=st.booleans(),
    with_mod=st.booleans(), causal=st.booleans(), seed=st.integers(0, 2**16),
)
def test_block_mask(b, tq, tk, hh, dtype, bq, bk, bm_b, bm_h, with_mod, causal, seed):
    """Block sparsity: partial blocks (element mask from mask_mod), full blocks, unlisted blocks skipped."""
    torch.manual_seed(seed)
    H, Hkv = hh
    bm = _random_block_mask(b if bm_b else 1, H if bm_h else 1, tq, tk, bq, bk, with_mod)
    q = _rand(b, tq, H, 32, dtype=dtype)
    k, v = _rand(b, tk, Hkv, 32, dtype=dtype), _rand(b, tk, Hkv, 32, dtype=dtype)
    check_attention(q, k, v, block_mask=bm, causal=causal)


@settings(max_examples=6, **SETTINGS)
@given(
    lens=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=3), hh=heads(),
    dtype=st.sampled_from(DTYPES), causal=st.booleans(), left=st.sampled_from([-1, 4]), seed=st.integers(0, 2**16),
)
def test_varlen(lens, hh, dtype, causal, left, seed):
    torch.manual_seed(seed)
    H, Hkv = hh
    cu_q = torch.tensor([0] + [sum(a for a, _ in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + [sum(c for _, c in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEV)
    nq, nk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = _rand(nq, H, 32, dtype=dtype), _rand(nk, Hkv, 32, dtype=dtype), _rand(nk, Hkv, 32, dtype=dtype)
    got = check_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal, window=(left, -1))
    assert got["lse"].shape == (H, nq)


# ---------------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token(dtype):
    q, k, v = _rand(1, 1, 2, 16, dtype=dtype), _rand(1, 1, 1, 16, dtype=dtype), _rand(1, 1, 1, 16, dtype=dtype)
    check_attention(q, k, v, causal=True)


@pytest.mark.parametrize("tq,tk", [(40, 7), (5, 37), (17, 17)])
def test_tq_ne_tk_causal_fully_masked_rows(tq, tk):
    """With Tq > Tk bottom-right causal leaves the first rows with no key: o = 0, lse = -inf, zero grads."""
    torch.manual_seed(0)
    q = _rand(2, tq, 4, 32, dtype=torch.float32)
    k, v = _rand(2, tk, 2, 32, dtype=torch.float32), _rand(2, tk, 2, 32, dtype=torch.float32)
    got = check_attention(q, k, v, causal=True)
    dead = max(tq - tk, 0)
    if dead:
        assert (got["o"][:, :dead] == 0).all()
        assert torch.isneginf(got["lse"][:, :, :dead]).all()
        assert (got["dq"][:, :dead] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_by_padding_and_mask(dtype):
    torch.manual_seed(1)
    B, T, H, D = 2, 24, 2, 32
    q, k, v = (_rand(B, T, H, D, dtype=dtype) for _ in range(3))
    kpm = torch.rand(B, T, device=DEV) > 0.5
    kpm[1] = False  # batch 1 sees nothing
    mask = torch.rand(1, 1, T, T, device=DEV) > 0.3
    mask[..., 3, :] = False  # row 3 sees nothing in every batch
    bias = _rand(B, H, T, T, dtype=dtype).requires_grad_()
    got = check_attention(q, k, v, key_padding_mask=kpm, mask=mask, bias=bias)
    assert (got["o"][1] == 0).all() and (got["o"][:, 3] == 0).all()
    assert torch.isneginf(got["lse"][1]).all()
    for name in ("dq", "dk", "dv", "dbias"):
        assert torch.isfinite(got[name]).all()
    assert (got["dq"][1] == 0).all() and (got["dk"][1] == 0).all() and (got["dbias"][1] == 0).all()


def test_non_contiguous_inputs():
    """Strides are honoured: q/k/v sliced out of a packed qkv tensor, and a BHTD tensor transposed to BTHD."""
    torch.manual_seed(2)
    B, T, H, D = 2, 33, 4, 32
    qkv = _rand(B, T, 3, H, D + 8, dtype=torch.float16)
    q, k = qkv[:, :, 0, :, :D], qkv[:, :, 1, :, 4 : D + 4]
    v = _rand(B, 2 * H, T, D, dtype=torch.float16).transpose(1, 2)[:, :, ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    bias = _rand(B, H, T, T, dtype=torch.float32).transpose(2, 3).requires_grad_()
    check_attention(q, k, v, causal=True, bias=bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits(dtype):
    """Scores of magnitude ~1e4 (fp16 inputs of ~1e2): the online softmax must not overflow."""
    torch.manual_seed(3)
    q, k = _rand(1, 20, 2, 32, dtype=dtype, scale=40.0), _rand(1, 37, 2, 32, dtype=dtype, scale=40.0)
    v = _rand(1, 37, 2, 32, dtype=dtype)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float())
    assert logits.abs().max() > 5e3
    # The backward recomputes S = Q K^T (fp32 accumulation), which differs from the forward's S by
    # ~eps_fp32 * |S| (another summation order); with |S| ~ 1e4 that perturbs P relatively by that much --
    # inherent to every recomputing (flash) backward, and invisible to a reference that keeps P. The
    # gradients' floor says so (fp32's eps: the accumulation's, not the inputs').
    eps = torch.finfo(torch.float32).eps
    s_max = logits.abs().max().item()
    got = check_attention(q, k, v, scale=1.0, causal=True,
                          grad_floor=lambda r: 4 * eps * s_max * r.abs().max().item())
    assert torch.isfinite(got["o"]).all() and torch.isfinite(got["lse"]).all()


@pytest.mark.parametrize("d,dv", [(32, 32), (64, 64), (96, 96), (40, 24), (128, 128), (192, 192), (256, 256),
                                  (256, 64)])
def test_head_dims(d, dv):
    torch.manual_seed(4)
    q, k = _rand(1, 20, 2, d, dtype=torch.float16), _rand(1, 19, 1, d, dtype=torch.float16)
    v = _rand(1, 19, 1, dv, dtype=torch.float16)
    check_attention(q, k, v, window=(6, 2))


def test_block_mask_builders_and_skipping():
    """The library's builders (causal, sliding window, document, sink) as block masks; block size 32 with
    kernel tile 16 exercises sub-tiling."""
    torch.manual_seed(5)
    B, T, H = 2, 40, 2
    q, k, v = (_rand(B, T, H, 32, dtype=torch.float32) for _ in range(3))
    docs = torch.tensor([[0] * 10 + [1] * 25 + [2] * 5, [0] * 40], device=DEV)
    for bm in (
        bmm.causal_block_mask(1, 1, T, T, block_size=(32, 16), device=DEV),
        bmm.window_block_mask(1, 1, T, T, 6, 0, block_size=(16, 32), device=DEV),
        bmm.document_block_mask(docs, H=1, block_size=(16, 16)),
        bmm.sink_window_block_mask(1, 1, T, T, 2, 8, block_size=(16, 16), device=DEV),
    ):
        check_attention(q, k, v, block_mask=bm)


def test_block_mask_never_loads_unlisted_blocks():
    """K/V rows of unlisted key blocks are NaN: if any were loaded, NaN would reach the output."""
    torch.manual_seed(6)
    T = 48
    q, k, v = (_rand(1, T, 1, 16, dtype=torch.float32) for _ in range(3))
    listed = torch.zeros(1, 1, 3, 3, dtype=torch.bool, device=DEV)
    listed[..., 0, 0] = listed[..., 1, 0] = listed[..., 2, 2] = True  # key block 1 never listed
    c, i = bmm._compress(listed)
    bm = bmm.BlockMask(c, i, None, None, (16, 16), (T, T), None)
    k[:, 16:32] = float("nan")
    v[:, 16:32] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = attnzoo.attention(q, k, v, block_mask=bm, backend="triton")
    assert torch.isfinite(o).all()
    ref_in = [t.detach().double().nan_to_num().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in, block_mask=bm)
    assert (o.double() - ref).abs().max() < 1e-5
    # the backward skips them too: finite gradients, equal to the reference's, and 0 for the skipped keys
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(ref, ref_in, do.double())
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert torch.isfinite(g).all(), name
        assert (g.double() - g_ref).abs().max() < 1e-5, name
    assert (grads[1][:, 16:32] == 0).all() and (grads[2][:, 16:32] == 0).all()


def test_dense_mask_skips_the_tiles_it_empties():
    """A dense bool mask runs as a block mask: a key tile it empties for every query is never loaded
    (NaN there would reach the output and the gradients), in the forward and the backward."""
    from attnzoo.ops.attention.triton_backend import dense_mask_block

    torch.manual_seed(8)
    T = 3 * dense_mask_block(backends.triton_interpreter_on() and DEV == "cpu")
    blk = T // 3
    q = _rand(2, T, 2, 16, dtype=torch.float32).requires_grad_()
    k, v = (_rand(2, T, 1, 16, dtype=torch.float32) for _ in range(2))
    mask = torch.rand(2, 1, T, T, device=DEV) > 0.3
    mask[..., blk : 2 * blk] = False  # the middle key tile is empty for every query
    k[:, blk : 2 * blk] = float("nan")
    v[:, blk : 2 * blk] = float("nan")
    k.requires_grad_()
    v.requires_grad_()
    o = attnzoo.attention(q, k, v, mask=mask, backend="triton")
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert torch.isfinite(o).all() and torch.isfinite(dq).all()
    assert torch.isfinite(dk[:, :blk]).all() and torch.isfinite(dv[:, 2 * blk :]).all()
    ref = attention_reference(q.double(), k.double().nan_to_num(), v.double().nan_to_num(), mask=mask)
    assert (o.double() - ref).abs().max() < 1e-5


def test_backward_is_deterministic():
    """No atomics: dK/dV (and dbias of a bias shared by the group) are summed over the GQA group inside one
    program, so reruns are bit-identical."""
    torch.manual_seed(7)
    q = _rand(1, 33, 4, 32, dtype=torch.float16).requires_grad_()
    k, v = (_rand(1, 33, 1, 32, dtype=torch.float16).requires_grad_() for _ in range(2))
    bias = _rand(1, 1, 33, 33, dtype=torch.float16).requires_grad_()
    do = torch.randn(1, 33, 4, 32, device=DEV, dtype=torch.float16)
    outs = []
    for _ in range(2):
        o = attnzoo.attention(q, k, v, causal=True, bias=bias, backend="triton")
        outs.append(torch.autograd.grad(o, (q, k, v, bias), do))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# What the backend refuses, and tracing


def test_supports_reasons():
    q = torch.randn(1, 8, 2, 16, device=DEV, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        attnzoo.attention(q, q, q, backend="triton")
    q = q.float()
    bm = bmm.causal_block_mask(1, 1, 8, 8, block_size=(8, 8), device=DEV)
    with pytest.raises(BackendUnavailableError, match="multiples of 16"):
        attnzoo.attention(q, q, q, block_mask=bm, backend="triton")
    if DEV == "cpu":
        with pytest.raises(BackendUnavailableError, match="bfloat16"):
            attnzoo.attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), backend="triton")


def test_torch_compile_fullgraph():
    """The custom ops (with fakes and registered autograd) trace without graph breaks."""
    torch.manual_seed(8)
    q, k, v = (_rand(1, 20, 2, 16, dtype=torch.float32).requires_grad_() for _ in range(3))
    bias = _rand(1, 2, 20, 20, dtype=torch.float32).requires_grad_()

    def f(q, k, v, bias):
        return attnzoo.attention(q, k, v, causal=True, bias=bias, backend="triton").square().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, bias)
    grads = torch.autograd.grad(loss, (q, k, v, bias))
    loss_e = f(q, k, v, bias)
    grads_e = torch.autograd.grad(loss_e, (q, k, v, bias))
    assert torch.allclose(loss, loss_e)
    for a, b in zip(grads, grads_e):
        assert torch.allclose(a, b, atol=1e-6)


def test_torch_compile_fullgraph_block_mask_and_decode():
    torch.manual_seed(9)
    q, k, v = (_rand(1, 40, 2, 16, dtype=torch.float32).requires_grad_() for _ in range(3))
    bm = bmm.causal_block_mask(1, 1, 40, 40, block_size=(16, 16))

    def f(q, k, v):
        return attnzoo.attention(q, k, v, block_mask=bm, backend="triton").square().sum()

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(f(q, k, v), (q, k, v))):
        torch.testing.assert_close(a, b)

    qd = _rand(2, 3, 4, 16, dtype=torch.float32)
    kc, vc = _rand(2, 50, 2, 16, dtype=torch.float32), _rand(2, 50, 2, 16, dtype=torch.float32)
    lens = torch.tensor([50, 21], dtype=torch.int32, device=DEV)

    def g(qd, kc, vc, lens):
        return attnzoo.attention_with_kvcache(qd, kc, vc, lens, backend="triton")

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(g, fullgraph=True, backend="aot_eager")(qd, kc, vc, lens),
                               g(qd, kc, vc, lens))


@pytest.mark.skipif(DEV != "cuda", reason="GPU-sized shapes: the native run only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,T,D", [(True, 1024, 128), (False, 777, 64), (True, 2048, 96)])
def test_gpu_sized_shapes(dtype, causal, T, D):
    """Shapes where the autotuned GPU tiles (64..128 rows) cross many tile boundaries, GQA 8/2."""
    torch.manual_seed(T)
    q = _rand(2, T, 8, D, dtype=dtype)
    k, v = _rand(2, T + 13, 2, D, dtype=dtype), _rand(2, T + 13, 2, D, dtype=dtype)
    check_attention(q, k, v, causal=causal)


@pytest.mark.skipif(DEV != "cuda", reason="backend choice on a CUDA tensor")
def test_auto_picks_triton_on_cuda():
    import warnings

    q = _rand(1, 8, 4, 64, dtype=torch.bfloat16)
    assert backends.select("attention", "auto", q=q, k=q, v=q).backend == "triton"
    m = attnzoo.MultiHeadAttention(256, 4, 2, backend="auto").to(DEV, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to the reference warns: here it must not happen
        m(torch.randn(1, 8, 256, device=DEV, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# Decode against a KV cache (contiguous or paged), split-K


def check_decode(q, k_cache, v_cache, lens, **kw):
    got = attnzoo.attention_with_kvcache(q, k_cache, v_cache, lens, return_lse=True, backend="triton", **kw)
    ref = attention_with_kvcache_reference(q.double(), k_cache.double(), v_cache.double(), lens, return_lse=True, **kw)
    with lowp_reference():
        low = attention_with_kvcache_reference(q, k_cache, v_cache, lens, return_lse=True, **kw)
    for name, a, r, lo in zip(("o", "lse"), got, ref, low):
        assert_close_by_rule(a, r, lo, name, dtype=q.dtype)
    return got


@settings(max_examples=10, **SETTINGS)
@given(
    b=st.integers(1, 3), tn=st.sampled_from([1, 2, 5, 16]), hh=heads(), g4=st.booleans(),
    d=st.sampled_from([16, 64, 96]), dtype=st.sampled_from(DTYPES), paged=st.sampled_from([None, 8, 16, 32]),
    causal=st.booleans(), left=st.sampled_from([-1, -1, 0, 9]), right=st.sampled_from([-1, 0, 4]),
    tmax=st.integers(16, 70), seed=st.integers(0, 2**16),
)
def test_decode_matrix(b, tn, hh, g4, d, dtype, paged, causal, left, right, tmax, seed):
    torch.manual_seed(seed)
    H, Hkv = hh
    if g4:
        H = 4 * Hkv  # larger GQA groups: all heads of a group share one read of each KV tile
    tmax = max(tmax, tn)
    q = _rand(b, tn, H, d, dtype=dtype)
    kw = dict(causal=causal, window=(left, right))
    if paged:
        pages_per_seq = -(-tmax // paged)
        n_pages = b * pages_per_seq + 3
        k_cache, v_cache = _rand(n_pages, paged, Hkv, d, dtype=dtype), _rand(n_pages, paged, Hkv, d, dtype=dtype)
        kw["block_table"] = torch.randperm(n_pages, device=DEV)[: b * pages_per_seq].view(b, -1).to(torch.int32)
    else:
        k_cache, v_cache = _rand(b, tmax, Hkv, d, dtype=dtype), _rand(b, tmax, Hkv, d, dtype=dtype)
    lens = torch.randint(tn, tmax + 1, (b,), dtype=torch.int32, device=DEV)
    check_decode(q, k_cache, v_cache, lens, **kw)


def test_decode_non_contiguous_and_limits():
    torch.manual_seed(9)
    B, T, H, D = 2, 40, 4, 32
    kv = _rand(B, T, 2, 2, D, dtype=torch.float16)
    k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]  # interleaved K/V storage
    q = _rand(B, 4, 2 * H, D, dtype=torch.float16)[:, :, ::2]
    lens = torch.tensor([40, 4], dtype=torch.int32, device=DEV)
    check_decode(q, k_cache, v_cache, lens)
    qq = _rand(1, 17, 4, D, dtype=torch.float32)
    kc = _rand(1, 40, 4, D, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="1..16"):
        attnzoo.attention_with_kvcache(qq, kc, kc, torch.tensor([30], dtype=torch.int32, device=DEV), backend="triton")


# ---------------------------------------------------------------------------------------------------
# FlexAttention BlockMask conversion


def test_flex_block_mask_conversion():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from attnzoo.ops.masks.flex import from_flex, to_flex

    torch.manual_seed(10)
    B, H, T = 2, 2, 40
    docs = torch.tensor([[0] * 12 + [1] * 28, [0] * 30 + [1] * 10], device=DEV)

    def doc_causal(b, h, q, k):
        return (docs[b, q] == docs[b, k]) & (k <= q)

    fbm = flex.create_block_mask(doc_causal, B, 1, T, T, device=DEV, BLOCK_SIZE=16)
    bm = from_flex(fbm)
    assert bm.block_size == (16, 16) and bm.seq_lengths == (T, T)
    q, k, v = (_rand(B, T, H, 32, dtype=torch.float32) for _ in range(3))
    check_attention(q, k, v, block_mask=bm)
    # and back: FlexAttention (eager) with the converted mask agrees with attnzoo's reference
    back = to_flex(bm)
    assert torch.equal(back.kv_num_blocks, fbm.kv_num_blocks) and torch.equal(back.full_kv_indices, fbm.full_kv_indices)
    ours = bmm.sink_window_block_mask(1, 1, T, T, 2, 8, block_size=(16, 16), device=DEV)
    o_flex = flex.flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=to_flex(ours))
    o_ref = attention_reference(q, k, v, block_mask=ours)
    assert (o_flex.transpose(1, 2) - o_ref).abs().max() < 1e-5


def _varlen_inputs(lens, H, Hkv, D, dtype):
    cu_q = torch.tensor([0] + [sum(a for a, _ in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + [sum(c for _, c in lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEV)
    nq, nk = int(cu_q[-1]), int(cu_k[-1])
    return cu_q, cu_k, _rand(nq, H, D, dtype=dtype), _rand(nk, Hkv, D, dtype=dtype), _rand(nk, Hkv, D, dtype=dtype)


def test_varlen_max_seqlen_torch_compile():
    """With max_seqlen_q/k given, varlen attention compiles with fullgraph=True (cu_seqlens is never read on
    the host while compiling) and matches eager, forward and backward; eager checks the maxima."""
    torch.manual_seed(13)
    lens = [(7, 11), (13, 4), (13, 25)]
    cu_q, cu_k, q, k, v = _varlen_inputs(lens, 4, 2, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def f(q, k, v, cu_q, cu_k):
        return attnzoo.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=13, max_seqlen_k=25,
                                 causal=True, window=(9, -1), backend="triton")

    torch._dynamo.reset()
    o = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, cu_q, cu_k)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o_e = f(q, k, v, cu_q, cu_k)
    grads_e = torch.autograd.grad(o_e, (q, k, v), do)
    assert torch.equal(o, o_e)
    for a, b in zip(grads, grads_e):
        assert torch.equal(a, b)
    # an upper bound is fine (eager, against the reference through check_attention)
    check_attention(q.detach(), k.detach(), v.detach(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=20,
                    max_seqlen_k=40, causal=True)
    with pytest.raises(InputError, match="max_seqlen_k: 24 is smaller"):
        attnzoo.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=13, max_seqlen_k=24,
                          backend="triton")
    with pytest.raises(InputError, match="max_seqlen_q: expected an int"):
        attnzoo.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=13.0, backend="triton")
    with pytest.raises(InputError, match="only meaningful with varlen"):
        attnzoo.attention(q[None], k[None], v[None], max_seqlen_q=13, backend="triton")
    # the reference backend accepts and ignores them
    attnzoo.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=13, max_seqlen_k=25,
                      backend="reference")


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the custom ops."""
    from attnzoo.ops.attention import triton_backend as TB

    TB._kernels(), TB._decode_kernels()
    torch.manual_seed(11)
    q = _rand(1, 17, 2, 16, dtype=torch.float32).requires_grad_()
    k, v = (_rand(1, 17, 1, 16, dtype=torch.float32).requires_grad_() for _ in range(2))
    bias = _rand(1, 1, 17, 17, dtype=torch.float32).requires_grad_()
    kw = dict(q=q, k=k, v=v, bias=bias, masks=[None] * 9, scale=0.25, causal=True, window=[-1, -1],
              max_seqlen=[17, 17], block_size=[0, 0])
    torch.library.opcheck(torch.ops.attnzoo.attention_fwd.default, (), kw)
    kpm = torch.rand(1, 17, device=DEV) > 0.3
    kw.update(masks=[None, kpm] + [None] * 7, causal=False, window=[5, 2])
    torch.library.opcheck(torch.ops.attnzoo.attention_fwd.default, (), kw)
    for name, n in (("attention_fwd", 10), ("attention_bwd", 15), ("attention_decode", 9)):
        assert len(getattr(torch.ops.attnzoo, name).default._schema.arguments) == n <= 15
    qd, kc = _rand(1, 2, 2, 16, dtype=torch.float32), _rand(1, 20, 1, 16, dtype=torch.float32)
    lens = torch.tensor([10], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.attnzoo.attention_decode.default, (qd, kc, kc, lens, None, 0.25, True, -1, -1))
