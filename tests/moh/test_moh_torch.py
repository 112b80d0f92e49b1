"""MoH attention's "torch" backend (SPEC §3: only active (token, head) rows are computed) against the
reference: outputs and the gradients of q, k, v and the gates by the accuracy rule (SPEC §0); chunks of
8 packed rows. Inactive gates get no gradient; an all-inactive call keeps its inputs in the graph.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnzoo.ops.moh import torch_backend as TB
from attnzoo.ops.moh.api import moh_attention
from attnzoo.ops.moh.reference import moh_attention_reference

from accuracy import assert_close_by_rule, lowp_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(TB, "CHUNK", 8)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(1, 2), tq=st.integers(1, 36), tk=st.integers(1, 36), hkv=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 2, 4]), frac=st.sampled_from([0.0, 0.3, 0.7, 1.0]), causal=st.booleans(),
       window=st.sampled_from([(-1, -1), (4, 0), (3, 5)]), kpm=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 9999))
def test_against_reference(b, tq, tk, hkv, g, frac, causal, window, kpm, dtype, seed):
    torch.manual_seed(seed)
    H = hkv * g
    q = torch.randn(b, tq, H, 16, device=DEV).to(dtype)
    k, v = (torch.randn(b, tk, hkv, 16, device=DEV).to(dtype) for _ in range(2))
    gates = torch.rand(b, tq, H, device=DEV) + 0.5
    gates = torch.where(torch.rand(b, tq, H, device=DEV) < frac, gates, torch.zeros_like(gates)).to(dtype)
    kw = dict(causal=causal, window=window)
    if kpm:
        kw["key_padding_mask"] = torch.rand(b, tk, device=DEV) > 0.3
    do = torch.randn(b, tq, H, 16, device=DEV)

    def run(fn, cast):
        ins = [cast(t).detach().requires_grad_() for t in (q, k, v, gates)]
        o = fn(*ins, **kw)
        return [o] + list(torch.autograd.grad(o, ins, do.to(o.dtype)))

    got = run(lambda *a, **k2: moh_attention(*a, backend="torch", **k2), lambda t: t)
    ref = run(moh_attention_reference, lambda t: t.double())
    with lowp_reference():
        low = run(moh_attention_reference, lambda t: t)
    for name, a, r, lo in zip(("o", "dq", "dk", "dv", "dgates"), got, ref, low):
        assert_close_by_rule(a, r, lo, name, dtype=dtype)
    inactive = gates == 0
    assert (got[0][inactive] == 0).all() and (got[4][inactive] == 0).all()
    assert (got[1][inactive] == 0).all()  # no gradient reaches an inactive query row


@pytest.mark.parametrize("train", [True, False])
def test_cost_follows_active_rows(train, monkeypatch):
    """Only active rows reach the attention: with a quarter of the rows active, the attention calls see a
    quarter of the query rows (training: masked SDPA; inference: the unmasked prefix kernel)."""
    import torch.nn.functional as F

    import attnzoo.ops.attention.torch_backend as ATB

    seen = []
    real_sdpa, real_lse = F.scaled_dot_product_attention, TB.sdpa_with_lse

    def spy(q, *a, **k):
        seen.append(q.shape[-2] * q.shape[-3] * q.shape[0])
        return real_sdpa(q, *a, **k)

    def spy_lse(q, *a, **k):
        seen.append(q.shape[-2] * q.shape[-3] * q.shape[0])
        return real_lse(q, *a, **k)

    monkeypatch.setattr(TB, "sdpa_with_lse", spy_lse)
    torch.manual_seed(0)
    B, T, H = 1, 64, 4
    q, k, v = torch.randn(B, T, H, 16), torch.randn(B, T, 2, 16), torch.randn(B, T, 2, 16)
    q.requires_grad_(train)
    gates = torch.zeros(B, T, H)
    gates[:, ::4] = 1.0
    try:
        ATB.F.scaled_dot_product_attention = spy
        moh_attention(q, k, v, gates, causal=True, backend="torch")
    finally:
        ATB.F.scaled_dot_product_attention = real_sdpa
    assert sum(seen) == int((gates != 0).sum())


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(1, 2), tq=st.integers(1, 40), tk=st.integers(1, 40), g=st.sampled_from([1, 4]),
       frac=st.sampled_from([0.3, 1.0]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 9999))
def test_inference_prefix_band_path(b, tq, tk, g, frac, dtype, seed):
    """Without gradients, causal rows on CPU split each chunk's keys into an unmasked prefix (SDPA's flash
    kernel with its lse) and a masked band, merged by lse: the same result by the accuracy rule."""
    torch.manual_seed(seed)
    H = 2 * g
    q = torch.randn(b, tq, H, 16, device=DEV).to(dtype)
    k, v = (torch.randn(b, tk, 2, 16, device=DEV).to(dtype) for _ in range(2))
    gates = torch.where(torch.rand(b, tq, H, device=DEV) < frac, 1.0, 0.0).to(dtype)
    with torch.no_grad():
        got = moh_attention(q, k, v, gates, causal=True, backend="torch")
        ref = moh_attention_reference(q.double(), k.double(), v.double(), gates.double(), causal=True)
        with lowp_reference():
            low = moh_attention_reference(q, k, v, gates, causal=True)
    assert_close_by_rule(got, ref, low, "o", dtype=dtype)
