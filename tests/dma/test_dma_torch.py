"""Dynamic mask attention's "torch" backend (SPEC §5, O(T x keep_window)) against the reference.

Accuracy rule (SPEC §0) on the output and the gradients of q, k, v and the bias; chunks of 8 rows so the
running top-``keep_window`` carry crosses chunks. Ties (a constant bias) must give exactly the reference's
sliding window; padded keys never count, even holding NaN; cost follows keep_window (no Tq x Tk buffer).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnzoo.ops.dma import torch_backend as TB
from attnzoo.ops.dma.api import dynamic_mask_attention
from attnzoo.ops.dma.reference import dynamic_mask_attention_reference

from accuracy import check_op_against_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(TB, "CHUNK", 8)
    monkeypatch.setattr(TB, "GROUP_ELEMS", 4096)  # several groups of batched chunks


def _check(q, k, v, bias, **kw):
    do = torch.randn(q.shape[:-1] + (v.shape[-1],), device=DEV)
    check_op_against_reference(lambda *a, **k2: dynamic_mask_attention(*a, backend="torch", **k2),
                               dynamic_mask_attention_reference, (q, k, v, bias), do,
                               ("o", "dq", "dk", "dv", "dbias"), dtype=q.dtype, **kw)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(1, 2), tq=st.integers(1, 40), tk=st.integers(1, 40), hkv=st.sampled_from([1, 2]),
       g=st.sampled_from([1, 2]), per_q_head=st.booleans(), w=st.integers(1, 20), causal=st.booleans(),
       kpm=st.booleans(), ties=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 9999))
def test_against_reference(b, tq, tk, hkv, g, per_q_head, w, causal, kpm, ties, dtype, seed):
    torch.manual_seed(seed)
    H = hkv * g
    hb = H if per_q_head else hkv
    q = torch.randn(b, tq, H, 16, device=DEV).to(dtype)
    k, v = (torch.randn(b, tk, hkv, 16, device=DEV).to(dtype) for _ in range(2))
    bias = (torch.randint(0, 3, (b, hb, tk), device=DEV).float() if ties else torch.randn(b, hb, tk, device=DEV))
    kw = dict(keep_window=w, causal=causal)
    if kpm:
        kw["key_padding_mask"] = torch.rand(b, tk, device=DEV) > 0.3
    _check(q, k, v, bias.to(dtype), **kw)


def test_constant_bias_is_a_sliding_window():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 50, 2, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.zeros(1, 2, 50, dtype=torch.float64)
    import attnzoo

    got = dynamic_mask_attention(q, k, v, bias, keep_window=6, backend="torch")
    want = attnzoo.attention(q, k, v, causal=True, window=(5, 0), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_nan_in_padded_slots_never_leaks():
    torch.manual_seed(1)
    q = torch.randn(2, 30, 2, 8)
    k, v = torch.randn(2, 30, 1, 8), torch.randn(2, 30, 1, 8)
    bias = torch.randn(2, 1, 30)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1, 20:] = False
    want = dynamic_mask_attention(q, k, v, bias, keep_window=5, causal=False, key_padding_mask=kpm, backend="torch")
    k[1, 20:], v[1, 20:] = float("nan"), float("inf")
    got = dynamic_mask_attention(q, k, v, bias, keep_window=5, causal=False, key_padding_mask=kpm, backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ref = dynamic_mask_attention_reference(q, k, v, bias, keep_window=5, causal=False, key_padding_mask=kpm)
    torch.testing.assert_close(ref, want)


def test_memory_follows_keep_window(monkeypatch):
    """No Tq x Tk buffer: at T=2048, keep_window=32 the largest allocation of forward+backward is far below
    one [H, T, T] fp32 matrix (the chunks batched per group hold O(T x (keep_window + chunk)))."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(TB, "CHUNK", 64)
    B, T, H, D = 1, 2048, 2, 16
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    bias = torch.randn(B, H, T, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        dynamic_mask_attention(q, k, v, bias, keep_window=32, backend="torch").sum().backward()
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    assert 0 < biggest < H * T * T * 4 / 8, biggest
