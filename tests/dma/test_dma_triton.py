"""Dynamic mask attention on the Triton backend against the reference (SPEC §5): outputs and the
gradients of q, k, v and the bias, by SPEC §0's rule (interpreter on CPU, tiny shapes)."""


import torch


import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attnzoo as az  # noqa: E402
from attnzoo import backends  # noqa: E402

from accuracy import assert_close_by_rule, lowp_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bool(backends.triton_device_reasons(torch.device(DEV))), reason="Triton cannot run here")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@settings(max_examples=8)
@given(
    B=st.integers(1, 2), Tq=st.integers(1, 37), extra=st.integers(0, 6),
    heads=st.sampled_from([(2, 1), (4, 2), (2, 2)]), keep=st.integers(1, 20), ties=st.booleans(),
    causal=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)
def test_matches_reference(B, Tq, extra, heads, keep, ties, causal, dtype, seed):
    H, Hkv = heads
    Tk = Tq + extra
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, t, h, 32, generator=g) for t, h in ((Tq, H), (Tk, Hkv), (Tk, Hkv)))
    bias = torch.zeros(B, Hkv, Tk) if ties else torch.randn(B, Hkv, Tk, generator=g)
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    kpm[-1, : Tk // 4] = False
    do = torch.randn(B, Tq, H, 32, generator=g)

    def run(backend, dt):
        ts = [t.to(DEV, dt).requires_grad_() for t in (q, k, v)] + [bias.to(DEV).double().requires_grad_()
                                                                     if dt == torch.float64 else bias.to(DEV).requires_grad_()]
        o = az.dynamic_mask_attention(*ts, keep_window=keep, causal=causal, key_padding_mask=kpm.to(DEV), backend=backend)
        return [o] + list(torch.autograd.grad((o.float() * do.to(DEV)).sum(), ts))

    got = run("triton", dtype)
    hi = run("reference", torch.float64)
    with lowp_reference():
        lo = run("reference", dtype)
    for name, a, b, c in zip(("o", "dq", "dk", "dv", "dbias"), got, hi, lo):
        assert_close_by_rule(a, b, c, f"{name} ({dtype})", dtype=dtype)


def test_module_triton_equals_reference_backend():
    torch.manual_seed(0)
    m = az.DynamicMaskAttention(64, 4, 2, keep_window=5, backend="reference").to(DEV)
    with torch.no_grad():
        m.A.fill_(0.7)
    x = torch.randn(2, 23, 64, device=DEV)
    y_ref = m(x)
    m.backend = "triton"
    torch.testing.assert_close(m(x), y_ref, atol=2e-5, rtol=1e-4)
