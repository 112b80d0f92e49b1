"""The head-sparse MoH kernels (backend="triton") against the dense reference (SPEC §3).

Reference = full attention times the gates (inactive pairs get no gate gradient). Outputs and the gradients
of q, k, v and the gates are held to SPEC §0's rule. Under the interpreter: tiny shapes, 16-row tiles so
packed tiles cross boundaries; fresh buffers are NaN-filled so unwritten active rows fail.
"""

import contextlib

import torch


import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attnzoo as az  # noqa: E402
from attnzoo import backends  # noqa: E402
from attnzoo.ops.moh.packing import pack_active_rows  # noqa: E402

from accuracy import assert_close_by_rule, lowp_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bool(backends.triton_device_reasons(torch.device(DEV))), reason="Triton cannot run here")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def make_gates(B, T, H, active_frac, gen, num_shared=0):
    g = torch.rand(B, T, H, generator=gen) + 0.25
    drop = torch.rand(B, T, H, generator=gen) >= active_frac
    drop[..., :num_shared] = False
    return g.masked_fill(drop, 0.0)


def run_case(B, Tq, Tk, H, Hkv, D, gates, dtype, *, causal, window=(-1, -1), kpm=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=gen)
    k = torch.randn(B, Tk, Hkv, D, generator=gen)
    v = torch.randn(B, Tk, Hkv, D, generator=gen)
    do = torch.randn(B, Tq, H, D, generator=gen)
    kw = dict(causal=causal, window=window, key_padding_mask=None if kpm is None else kpm.to(DEV))

    def run(backend, dt):
        ts = [t.to(DEV, dt).requires_grad_() for t in (q, k, v, gates)]
        o = az.moh_attention(*ts, backend=backend, **kw)
        grads = torch.autograd.grad((o.float() * do.to(DEV)).sum(), ts)
        return [o] + list(grads)

    got = run("triton", dtype)
    hi = run("reference", torch.float64)
    with lowp_reference():
        lo = run("reference", dtype)
    for name, a, b, c in zip(("o", "dq", "dk", "dv", "dgates"), got, hi, lo):
        assert_close_by_rule(a, b, c, f"{name} ({dtype})", dtype=dtype)
    return got


@settings(max_examples=10)
@given(
    B=st.integers(1, 2),
    Tq=st.integers(1, 40),
    extra_k=st.integers(0, 9),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (3, 1)]),
    D=st.sampled_from([16, 32, 24]),
    frac=st.sampled_from([0.0, 0.3, 0.6, 1.0]),
    causal=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_matches_dense_reference(B, Tq, extra_k, heads, D, frac, causal, dtype, seed):
    H, Hkv = heads
    gates = make_gates(B, Tq, H, frac, torch.Generator().manual_seed(seed))
    run_case(B, Tq, Tq + extra_k, H, Hkv, D, gates, dtype, causal=causal, seed=seed)


@pytest.mark.parametrize("window,causal", [((5, 0), True), ((3, 4), False), ((0, 0), False)])
def test_window_and_padding(window, causal):
    B, T, H, Hkv = 2, 35, 4, 2
    gates = make_gates(B, T, H, 0.5, torch.Generator().manual_seed(1), num_shared=1)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :7] = False  # left padding: early rows of batch 1 see no key at all
    run_case(B, T, T, H, Hkv, 32, gates, torch.float32, causal=causal, window=window, kpm=kpm)


def test_all_active_equals_core_attention():
    B, T, H, Hkv, D = 2, 33, 4, 2, 32
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, T, h, D, generator=gen, device="cpu").to(DEV) for h in (H, Hkv, Hkv))
    ones = torch.ones(B, T, H, device=DEV)
    o_moh = az.moh_attention(q, k, v, ones, causal=True, backend="triton")
    o_ref = az.attention(q, k, v, causal=True, backend="reference")
    assert_close_by_rule(o_moh, o_ref.double(), o_ref, "all heads active", dtype=torch.float32)


def test_inactive_rows_are_zero_and_get_no_gradient():
    B, T, H, D = 1, 20, 2, 16
    gates = torch.zeros(B, T, H)
    gates[0, ::3, 0] = 1.0
    q, k, v = (torch.randn(B, T, H, D, device=DEV, requires_grad=True) for _ in range(3))
    g = gates.to(DEV).requires_grad_()
    o = az.moh_attention(q, k, v, g, causal=True, backend="triton")
    inactive = (gates == 0).to(DEV)
    assert torch.all(o[inactive] == 0)
    dq, dg = torch.autograd.grad(o.square().sum() + o.sum(), (q, g))
    assert torch.all(dq[inactive] == 0) and torch.all(dg[inactive] == 0)
    assert dq[~inactive].abs().sum() > 0


def test_packing_schedule():
    gates = torch.zeros(2, 10, 3)
    gates[0, [1, 4, 9], 0] = 1.0
    gates[1, :, 2] = 0.5
    p = pack_active_rows(gates, block_m=4)
    assert p.counts.tolist() == [3, 0, 0, 0, 0, 10]
    assert p.rows[0, 0, :3].tolist() == [1, 4, 9]
    assert p.rows[1, 2].tolist() == list(range(10))
    assert p.tile_offsets.tolist() == [0, 1, 1, 1, 1, 1, 4]  # ceil(3/4) = 1 tile, ceil(10/4) = 3 tiles


def test_module_triton_equals_reference_backend():
    torch.manual_seed(0)
    m = az.MoHAttention(64, 4, 2, num_shared_heads=1, top_k=2, rope=True, backend="reference").to(DEV)
    with torch.no_grad():
        m.router_routed.normal_(0, 0.5)
    x = torch.randn(2, 19, 64, device=DEV)
    y_ref = m(x)
    m.backend = "triton"
    y = m(x)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Decode: a few queries without gradient go through the split-K decode kernel with gates


@contextlib.contextmanager
def decode_calls():
    """Records launches of the split-K decode kernel (True = with gates), so a test knows which path ran."""
    from attnzoo.ops.attention import triton_decode

    calls = []
    real = triton_decode.decode_launch

    def spy(*args, **kw):
        calls.append(kw.get("gates") is not None)
        return real(*args, **kw)

    triton_decode.decode_launch = spy
    try:
        yield calls
    finally:
        triton_decode.decode_launch = real


@settings(max_examples=10)
@given(
    B=st.integers(1, 3),
    Tq=st.integers(1, 16),
    Tk=st.integers(1, 70),
    heads=st.sampled_from([(1, 1), (4, 1), (4, 2), (6, 3), (8, 2)]),
    D=st.sampled_from([16, 24, 64]),
    frac=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    causal=st.booleans(),
    window=st.sampled_from([(-1, -1), (7, 0), (5, 3)]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_decode_matches_dense_reference(B, Tq, Tk, heads, D, frac, causal, window, dtype, seed):
    H, Hkv = heads
    gen = torch.Generator().manual_seed(seed)
    gates = make_gates(B, Tq, H, frac, gen)
    q = torch.randn(B, Tq, H, D, generator=gen)
    k = torch.randn(B, Tk, Hkv, D, generator=gen)
    v = torch.randn(B, Tk, Hkv, D, generator=gen)

    def run(backend, dt):
        with torch.no_grad():
            return az.moh_attention(*(t.to(DEV, dt) for t in (q, k, v, gates)), causal=causal, window=window,
                                    backend=backend)

    with decode_calls() as calls:
        got = run("triton", dtype)
    assert calls == [True]
    hi = run("reference", torch.float64)
    with lowp_reference():
        lo = run("reference", dtype)
    assert_close_by_rule(got, hi, lo, f"moh decode o ({dtype})", dtype=dtype)


def test_decode_never_reads_idle_kv_heads():
    """kv heads none of whose query heads is active are never read: NaN there must not reach the output."""
    B, Tq, Tk, H, Hkv, D = 2, 3, 150, 8, 4, 32
    gen = torch.Generator().manual_seed(5)
    gates = torch.rand(B, Tq, H, generator=gen) + 0.5
    idle = torch.tensor([[0, 2], [1, 3]])  # per batch, two kv heads with every query head (G = 2) inactive
    for b in range(B):
        for kvh in idle[b].tolist():
            gates[b, :, 2 * kvh:2 * kvh + 2] = 0
    gates[0, 1, 3] = 0  # and one inactive row inside an active group
    q = torch.randn(B, Tq, H, D, generator=gen, device="cpu").to(DEV)
    k, v = (torch.randn(B, Tk, Hkv, D, generator=gen, device="cpu").to(DEV) for _ in range(2))
    k_bad, v_bad = k.clone(), v.clone()
    for b in range(B):
        k_bad[b, :, idle[b]] = float("nan")
        v_bad[b, :, idle[b]] = float("nan")
    with torch.no_grad(), decode_calls() as calls:
        got = az.moh_attention(q, k_bad, v_bad, gates.to(DEV), causal=True, backend="triton")
        ref = az.moh_attention(q, k, v, gates.to(DEV), causal=True, backend="reference")
    assert calls == [True]
    assert torch.isfinite(got).all()
    assert torch.all(got[gates.to(DEV) == 0] == 0)
    assert_close_by_rule(got, ref.double(), ref, "moh decode with idle kv heads", dtype=torch.float32)


def test_decode_path_only_without_gradient_or_padding():
    B, T, H, D = 1, 4, 2, 16
    q, k, v = (torch.randn(B, T, H, D, device=DEV) for _ in range(3))
    gates = torch.ones(B, T, H, device=DEV)
    kpm = torch.ones(B, T, dtype=torch.bool, device=DEV)
    with decode_calls() as calls:
        az.moh_attention(q, k, v, gates, causal=True, backend="triton", key_padding_mask=kpm)
        az.moh_attention(q, k, v, gates.requires_grad_(), causal=True, backend="triton")
    assert calls == []  # padding, then a gradient: both take the packed-row kernels


def test_module_generation_triton_equals_reference_backend():
    torch.manual_seed(1)
    m = az.MoHAttention(64, 8, 2, num_shared_heads=2, top_k=3, rope=True, backend="reference").to(DEV).eval()
    with torch.no_grad():
        m.router_routed.normal_(0, 0.5)
    x = torch.randn(2, 23, 64, device=DEV)
    outs = {}
    for backend in ("reference", "triton"):
        m.backend = backend
        cache = m.new_cache(2)
        with torch.no_grad(), decode_calls() as calls:
            steps = [m(x[:, :20], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(20, 23)]
        outs[backend] = torch.cat(steps, 1)
    assert calls == ([True] * 3 if backend == "triton" else [])  # the three one-token steps
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=2e-5, rtol=1e-4)


def test_decode_op_checks_and_compiles_fullgraph():
    from attnzoo.ops.moh import triton_moh  # noqa: F401 - registers attnzoo::moh_decode

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 4, 16, generator=gen).to(DEV)
    k, v = (torch.randn(2, 40, 2, 16, generator=gen).to(DEV) for _ in range(2))
    gates = make_gates(2, 2, 4, 0.5, gen).to(DEV)
    torch.library.opcheck(torch.ops.attnzoo.moh_decode.default, (q, k, v, gates, 0.25, True, -1, -1))

    def f(q, k, v, g):
        return az.moh_attention(q, k, v, g, causal=True, backend="triton")

    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, gates),
                                   f(q, k, v, gates))


@pytest.mark.parametrize("causal", [True, False])
def test_module_training_step_triton_equals_reference_backend(causal):
    """A whole MoH layer (router, GQA, RoPE, padding) forward and backward, causal (LM) and not (ViT)."""
    torch.manual_seed(3)
    m = az.MoHAttention(64, 4, 2, num_shared_heads=1, top_k=2, rope=causal, causal=causal, backend="reference").to(DEV)
    with torch.no_grad():
        m.router_routed.normal_(0, 0.5)
    x = torch.randn(2, 21, 64, device=DEV)
    kpm = torch.ones(2, 21, dtype=torch.bool, device=DEV)
    kpm[1, :4] = False
    out = {}
    for backend in ("reference", "triton"):
        m.backend = backend
        y = m(x, key_padding_mask=kpm)
        loss = (y * torch.linspace(-1, 1, y.numel(), device=DEV).view_as(y)).sum() + m.aux_loss
        out[backend] = [y] + list(torch.autograd.grad(loss, list(m.parameters())))
    names = ["y"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, out["triton"], out["reference"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_custom_ops_opcheck():
    from attnzoo.ops.moh import triton_moh

    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 19, 4, 16, generator=gen).to(DEV).requires_grad_()
    k, v = (torch.randn(1, 19, 2, 16, generator=gen).to(DEV).requires_grad_() for _ in range(2))
    gates = make_gates(1, 19, 4, 0.6, gen).to(DEV).requires_grad_()
    args = (q, k, v, gates, None, 0.25, True, -1, -1)
    torch.library.opcheck(torch.ops.attnzoo.moh_attention_fwd.default, args)
    o, lse, rows, counts, offs = triton_moh.moh_attention_fwd(*(t.detach() if torch.is_tensor(t) else t for t in args))
    do = torch.randn_like(o)
    torch.library.opcheck(torch.ops.attnzoo.moh_attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), gates.detach(), o, lse, rows, counts, offs, None,
                           0.25, True, -1, -1))


@settings(max_examples=8)
@given(
    T=st.integers(1, 37),
    layout=st.sampled_from([(4, 2, 1, 1), (6, 3, 2, 2), (8, 2, 2, 3), (5, 5, 0, 4)]),  # H, Hkv, shared, top_k
    causal=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_router_top_k_gates_match_dense_reference(T, layout, causal, dtype, seed):
    """Gates from the real router (shared heads first, top-k of the routed ones), not a random pattern."""
    from attnzoo.ops.moh.router_api import moh_router

    H, Hkv, shared, top_k = layout
    gen = torch.Generator().manual_seed(seed)
    routed = torch.randn(2, T, H - shared, generator=gen)
    shared_logits = torch.randn(2, T, shared, generator=gen) if shared else None
    mix = torch.randn(2, T, 2, generator=gen) if shared else None
    gates = moh_router(routed, shared_logits, mix, top_k=top_k, backend="reference").gates
    assert int((gates[..., shared:] != 0).sum(-1).max()) <= top_k
    run_case(2, T, T + 3, H, Hkv, 16, gates.detach(), dtype, causal=causal, seed=seed)
