"""The head-sparse MoH kernels (backend="triton") against the dense reference (SPEC §3).

Reference = full attention times the gates (inactive pairs get no gate gradient). Outputs and the gradients
of q, k, v and the gates are held to SPEC §0's rule. Under the interpreter: tiny shapes, 16-row tiles so
packed tiles cross boundaries; fresh buffers are NaN-filled so unwritten active rows fail.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ATTNZOO_FILL_NAN"] = "1"

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
