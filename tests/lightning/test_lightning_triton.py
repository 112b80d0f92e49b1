"""Lightning attention's Triton kernels (chunked fwd/bwd, recurrent decode) against the PyTorch reference.

Accuracy rule (SPEC §0, attnzoo.testing): against the float64 parallel reference, each output and gradient
(q, k, v, initial state) errs at most 2x the reference evaluated in the kernel's dtype, plus a floor.
Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with
chunk 16 so T ~ 20-50 crosses several chunk boundaries; bf16 only on a GPU (the interpreter's bf16 dot
is wrong).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import backends
from attnzoo.ops.lightning import triton_backend
from attnzoo.ops.lightning.api import lightning_attention, lightning_decode
from attnzoo.ops.lightning.reference import lightning_parallel, lightning_recurrent
from attnzoo.testing import assert_accuracy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if backends.triton_device_reasons(torch.device(DEVICE)):
    pytest.skip("Triton kernels cannot run here: " + "; ".join(backends.triton_device_reasons(torch.device(DEVICE))),
                allow_module_level=True)

from attnzoo.ops.lightning import triton_chunk  # noqa: E402
from attnzoo.ops.lightning.triton_chunk import lightning_chunk  # noqa: E402
from attnzoo.ops.lightning.triton_recurrent import lightning_decode as triton_decode  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
CHUNK = 16 if DEVICE == "cpu" else 64


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setenv("ATTNZOO_FILL_NAN", "1")  # fresh kernel outputs start as NaN: unwritten elements show


def test_outputs_start_as_nan_in_test_mode():
    x = torch.zeros(3, device=DEVICE, dtype=torch.float16)
    assert torch.isnan(triton_chunk._new(2, 5, like=x)).all()
    assert torch.isnan(triton_chunk._new(2, like=x, dtype=torch.float32)).all()


def _make(B, T, H, D, Dv, dtype, *, decay, h0, seed, n_states=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, T, H, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, T, H, Dv, generator=g).to(DEVICE, dtype)
    s = (torch.rand(H, generator=g) * decay).to(DEVICE) if decay else None
    S0 = torch.randn(n_states or B, H, D, Dv, generator=g).to(DEVICE) if h0 else None
    do = torch.randn(B, T, H, Dv, generator=g).to(DEVICE, dtype)
    dS = torch.randn(n_states or B, H, D, Dv, generator=g).to(DEVICE)
    return q, k, v, s, S0, do, dS


def _run(fn, q, k, v, s, S0, do, dS, *, hi: bool, use_dS: bool, **kw):
    """Outputs and gradients ``[o, final_state, dq, dk, dv, (dS0)]`` of ``fn``; ``hi`` runs it in float64."""
    cast = (lambda t: t.double()) if hi else (lambda t: t)
    ins = [cast(t).detach().requires_grad_() for t in (q, k, v)]
    s0 = cast(S0).detach().requires_grad_() if S0 is not None else None
    o, S = fn(*ins, None if s is None else cast(s), 0.7, s0, **kw)
    loss = (o * cast(do)).sum()
    if use_dS:
        loss = loss + (S * cast(dS).to(S.dtype)).sum()
    loss.backward()
    return [t.detach() for t in [o, S] + [t.grad for t in ins] + ([s0.grad] if s0 is not None else [])]


NAMES = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]


def _check(B, T, H, D, Dv, dtype, *, decay, h0, use_dS, seed, cu_seqlens=None, chunk=CHUNK, segments=None):
    n = None if cu_seqlens is None else cu_seqlens.numel() - 1
    args = _make(B, T, H, D, Dv, dtype, decay=decay, h0=h0, seed=seed, n_states=n)
    kw = dict(cu_seqlens=cu_seqlens)
    ref_hi = _run(lightning_parallel, *args, hi=True, use_dS=use_dS, **kw)
    ref_lo = _run(lambda *a, **k: lightning_parallel(*a, upcast=False, **k), *args, hi=False, use_dS=use_dS, **kw)
    out = _run(lightning_chunk, *args, hi=False, use_dS=use_dS, chunk_size=chunk, segments=segments, **kw)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    for name, a, b, c in zip(NAMES, out, ref_hi, ref_lo):
        assert not torch.isnan(a).any(), f"{name}: NaN (an element the kernel never wrote?)"
        assert_accuracy(a, b, c, name=name, dtype=dtype)


@settings(deadline=None)
@given(
    st.fixed_dictionaries(
        dict(
            B=st.integers(1, 2), T=st.integers(1, 3 * CHUNK + 2), H=st.integers(1, 2), D=st.sampled_from([16, 24, 32]),
            Dv=st.sampled_from([16, 20, 32]), dtype=st.sampled_from(DTYPES), decay=st.sampled_from([0.0, 0.05, 1.0]),
            h0=st.booleans(), use_dS=st.booleans(), seed=st.integers(0, 2**16),
        )
    )
)
def test_chunk_matches_reference(p):
    _check(p["B"], p["T"], p["H"], p["D"], p["Dv"], p["dtype"], decay=p["decay"], h0=p["h0"], use_dS=p["use_dS"],
           seed=p["seed"])


@settings(deadline=None, max_examples=10)
@given(
    st.fixed_dictionaries(
        dict(
            B=st.integers(1, 2), T=st.integers(2 * CHUNK, 6 * CHUNK + 5), H=st.integers(1, 2),
            D=st.sampled_from([16, 24]), Dv=st.sampled_from([16, 20]), dtype=st.sampled_from(DTYPES),
            decay=st.sampled_from([0.0, 0.05, 1.0]), h0=st.booleans(), use_dS=st.booleans(),
            segments=st.integers(2, 5), seed=st.integers(0, 2**16),
        )
    )
)
def test_segmented_matches_reference(p):
    """Sequences cut into segments (state pass + closed-form scan + per-segment sweeps, fwd and bwd) give
    the same outputs, final state and gradients (incl. the initial state's) as the reference."""
    _check(p["B"], p["T"], p["H"], p["D"], p["Dv"], p["dtype"], decay=p["decay"], h0=p["h0"], use_dS=p["use_dS"],
           seed=p["seed"], segments=p["segments"])


def test_segment_plan(monkeypatch):
    plan = triton_chunk.segment_plan
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_chunk, "_sm_count", lambda index: 132)
    assert plan(131072, 32 * 2, 16, cuda) == (5, 26224)  # 64 programs -> 5 segments of whole chunks
    assert plan(4096, 32 * 2 * 32, 16, cuda) == (1, 4096)  # batch 32 fills the GPU: never cut
    assert plan(3000, 2, 16, cuda) == (1, 3000)  # too short to pay for the extra passes
    assert plan(131072, 64, 16, torch.device("cpu")) == (1, 131072)  # automatic is off without CUDA
    assert plan(100, 1, 16, torch.device("cpu"), segments=3) == (3, 48)  # forced: ceil(100/3) -> 48 (3 chunks)
    assert plan(40, 1, 16, torch.device("cpu"), segments=4) == (3, 16)  # more segments than chunks: one each
    for T, P in ((17, 2), (33, 3), (100, 7)):  # every cut covers the sequence, the last segment is non-empty
        n, L = plan(T, 1, 16, torch.device("cpu"), segments=P)
        assert L % 16 == 0 and (n - 1) * L < T <= n * L


def test_segmented_equals_varlen_with_chained_states():
    """Cutting is exactly running the segments as sequences whose initial states chain."""
    q, k, v, s, S0, _, _ = _make(1, 70, 2, 16, 16, torch.float32, decay=0.2, h0=True, seed=21)
    with torch.no_grad():
        o_seg, S_seg = lightning_chunk(q, k, v, s, 0.7, S0, chunk_size=CHUNK, segments=3)  # segments of 32 tokens
        o1, S1 = lightning_chunk(q[:, :32], k[:, :32], v[:, :32], s, 0.7, S0, chunk_size=CHUNK)
        o2, S2 = lightning_chunk(q[:, 32:64], k[:, 32:64], v[:, 32:64], s, 0.7, S1, chunk_size=CHUNK)
        o3, S3 = lightning_chunk(q[:, 64:], k[:, 64:], v[:, 64:], s, 0.7, S2, chunk_size=CHUNK)
    torch.testing.assert_close(o_seg, torch.cat([o1, o2, o3], 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S_seg, S3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lengths_not_multiple_of_chunk_and_tiny_head_dims(dtype):
    for T in (1, CHUNK - 1, CHUNK + 1, 2 * CHUNK + 3):
        _check(1, T, 1, 8, 4, dtype, decay=0.3, h0=True, use_dS=True, seed=T)


@pytest.mark.parametrize("D, Dv", [(96, 96), (192, 64), (64, 192), (128, 128), (256, 256)])
def test_head_dims_96_192(D, Dv):
    _check(1, 21, 1, D, Dv, torch.float16, decay=0.05, h0=True, use_dS=True, seed=D)


def test_large_decay_has_no_overflow():
    # s = 30: lambda^15 underflows to 0, and exp(+s * 15) (the masked half) would overflow if ever formed
    q, k, v, _, S0, do, dS = _make(1, 40, 2, 16, 16, torch.float32, decay=0, h0=True, seed=3)
    s = torch.tensor([30.0, 0.0], device=DEVICE)
    out = _run(lightning_chunk, q, k, v, s, S0, do, dS, hi=False, use_dS=True, chunk_size=CHUNK)
    ref = _run(lightning_parallel, q, k, v, s, S0, do, dS, hi=True, use_dS=True)
    for name, a, b in zip(NAMES, out, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen(dtype):
    lens = [5, 0, CHUNK + 3, 2 * CHUNK, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    _check(1, sum(lens), 2, 16, 24, dtype, decay=0.2, h0=True, use_dS=True, seed=7, cu_seqlens=cu)
    _check(1, sum(lens), 2, 16, 24, dtype, decay=0.2, h0=False, use_dS=False, seed=8, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_equals_recurrent_kernel(dtype):
    # the chunked kernel (two chunk sizes) against the fused recurrent kernel run over the whole sequence
    q, k, v, s, S0, _, _ = _make(2, 45, 2, 16, 32, dtype, decay=0.3, h0=True, seed=11)
    state = S0.clone()
    with torch.no_grad():
        o_rec = triton_decode(q, k, v, state, s, 0.7)
        for chunk in (16, 32):
            o_chk, S_chk = lightning_chunk(q, k, v, s, 0.7, S0, chunk_size=chunk)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(o_chk.float(), o_rec.float(), rtol=tol, atol=tol * o_rec.abs().max().item())
            torch.testing.assert_close(S_chk, state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tn, D, Dv", [(1, 16, 16), (3, 24, 40), (16, 96, 32)])
def test_decode_kernel(dtype, Tn, D, Dv):
    q, k, v, s, S0, _, _ = _make(2, Tn, 2, D, Dv, dtype, decay=0.5, h0=True, seed=Tn)
    state = S0.clone()
    with torch.no_grad():
        o = lightning_decode(q, k, v, state, decay=s, scale=0.7, backend="triton")
    o_hi, S_hi = lightning_recurrent(q.double(), k.double(), v.double(), s.double(), 0.7, S0.double())
    o_lo, _ = lightning_recurrent(q, k, v, s, 0.7, S0)
    assert not torch.isnan(o).any()
    assert_accuracy(o, o_hi, o_lo, name="o", dtype=dtype)
    assert_accuracy(state, S_hi, S_hi.float(), name="state", dtype=torch.float32)


def test_api_triton_backend_and_supports():
    q, k, v, s, S0, _, _ = _make(1, 20, 2, 16, 16, torch.float32, decay=0.5, h0=True, seed=0)
    o, S = lightning_attention(q, k, v, decay=s, initial_state=S0, output_final_state=True, backend="triton")
    o_ref, S_ref = lightning_attention(q, k, v, decay=s, initial_state=S0, output_final_state=True, backend="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-4)
    # varlen packed as [N, H, D]
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    S2 = torch.randn(2, 2, 16, 16, device=DEVICE)
    o = lightning_attention(q[0], k[0], v[0], decay=s, initial_state=S2, cu_seqlens=cu, backend="triton")
    torch.testing.assert_close(o, lightning_attention(q[0], k[0], v[0], decay=s, initial_state=S2, cu_seqlens=cu,
                                                      backend="reference"), rtol=1e-4, atol=1e-4)
    # non-contiguous inputs (a head-dim slice of a wider tensor, a transposed layout)
    wide = torch.randn(1, 20, 2, 40, device=DEVICE)
    qn, kn = wide[..., :16], wide[..., 20:36]
    vn = torch.randn(1, 2, 20, 16, device=DEVICE).transpose(1, 2)
    assert not (qn.is_contiguous() or vn.is_contiguous())
    o, S = lightning_attention(qn, kn, vn, decay=s, output_final_state=True, backend="triton")
    o_ref, S_ref = lightning_attention(qn, kn, vn, decay=s, output_final_state=True, backend="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-4)
    # what the Triton backend refuses, it says why (never a silently wrong path)
    kw = dict(scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None)
    reasons = triton_backend._supports_chunk(q=q.double(), k=k.double(), v=v.double(), decay=None, **kw)
    assert any("float64" in r for r in reasons)
    learned = s.clone().requires_grad_()
    assert any("decay" in r for r in triton_backend._supports_chunk(q=q, k=k, v=v, decay=learned, **kw))
    qg = q.clone().requires_grad_()
    assert any("autograd" in r for r in triton_backend._supports_decode(q=qg, k=k, v=v, state=S0, decay=s, scale=1.0))
    if DEVICE == "cpu":
        qb = q.bfloat16()
        assert any("bfloat16" in r for r in triton_backend._supports_chunk(q=qb, k=qb, v=qb, decay=None, **kw))


def test_torch_compile_fullgraph_traces_custom_ops():
    q, k, v, s, S0, do, _ = _make(1, 20, 2, 16, 16, torch.float32, decay=0.5, h0=True, seed=5)

    def f(q, k, v, S0):
        o, S = lightning_attention(q, k, v, decay=s, initial_state=S0, output_final_state=True, backend="triton")
        return o, S

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    ins = [t.clone().requires_grad_() for t in (q, k, v, S0)]
    o, S = compiled(*ins)
    ((o * do).sum() + S.sum()).backward()
    ref_ins = [t.clone().requires_grad_() for t in (q, k, v, S0)]
    o_r, S_r = f(*ref_ins)
    ((o_r * do).sum() + S_r.sum()).backward()
    torch.testing.assert_close(o, o_r)
    for a, b in zip(ins, ref_ins):
        torch.testing.assert_close(a.grad, b.grad)


def test_module_with_triton_backend():
    from attnzoo.modules.lightning import LightningAttention

    torch.manual_seed(0)
    m = LightningAttention(32, 2, head_dim=16, backend="triton", device=DEVICE)
    ref = LightningAttention(32, 2, head_dim=16, backend="reference", device=DEVICE)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 19, 32, device=DEVICE)
    y = m(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(m.parameters()), dy)
    grads_ref = torch.autograd.grad(y_ref, list(ref.parameters()), dy)
    for (name, _), g, g_ref in zip(m.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4, msg=name)
    with torch.no_grad():
        cache = m.new_cache(2)
        steps = [m(x[:, :17], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in (17, 18)]
    torch.testing.assert_close(torch.cat(steps, 1), y.detach(), rtol=1e-4, atol=1e-4)


def test_module_torch_compile_fullgraph():
    from attnzoo.modules.lightning import LightningAttention

    torch.manual_seed(0)
    m = LightningAttention(32, 2, head_dim=16, backend="triton", device=DEVICE)
    x = torch.randn(2, 19, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-4)


def test_custom_ops_opcheck():
    """Fakes, schemas and autograd registrations of the chunked ops agree with their real kernels."""
    q, k, v, s, S0, do, dS = _make(1, 20, 2, 16, 24, torch.float32, decay=0.5, h0=True, seed=4)
    cu = torch.tensor([0, 20], dtype=torch.int32, device=DEVICE)
    rate = s.float()
    flat = [t[0].clone().requires_grad_() for t in (q, k, v)]
    h0 = S0.clone().requires_grad_()
    torch.library.opcheck(torch.ops.attnzoo.lightning_fwd.default, (*flat, rate, cu, h0, 0.7, 16, 1))
    torch.library.opcheck(torch.ops.attnzoo.lightning_fwd.default, (*flat, rate, cu, None, 0.7, 16, 2))
    for segments in (1, 2):
        torch.library.opcheck(torch.ops.attnzoo.lightning_bwd.default,
                              (do[0], dS, *(t.detach() for t in flat), rate, cu, S0, 0.7, 16, segments))
