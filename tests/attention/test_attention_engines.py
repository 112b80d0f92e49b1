"""The flash-attn and xformers engines (backends "flash_attn", "xformers").

On CPU (always): each engine's ``supports`` logic -- every feature it declares unsupported says why -- and
its glue (layouts, GQA, varlen, lse sign, decode arguments) against fake modules injected into
``sys.modules`` that compute with the reference; and the auto table picking them on CUDA when they can run.
Where the real libraries import on a GPU: the engines against the reference by SPEC §0's rule; skipped
elsewhere with the reason.
"""

import importlib.machinery
import math
import sys
import types

import pytest
import torch

import attnzoo
from attnzoo import backends
from attnzoo.ops.attention import flash_attn_backend as FA
from attnzoo.ops.attention import xformers_backend as XF
from attnzoo.ops.attention.reference import attention_reference, attention_with_kvcache_reference

from accuracy import assert_close_by_rule, lowp_reference


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


@pytest.fixture(autouse=True)
def fresh_availability():
    """The engines cache whether their library is importable (once per process); the fakes below change
    that within the process, so each test starts and ends with empty caches."""
    FA._spec.cache_clear()
    XF.installed.cache_clear()
    yield
    FA._spec.cache_clear()
    XF.installed.cache_clear()


def _inputs(B=2, Tq=9, Tk=13, H=4, Hkv=2, D=16, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, h, D, generator=g).to(dtype) for T, h in ((Tq, H), (Tk, Hkv), (Tk, Hkv))]


def _kw(**over):
    kw = dict(causal=False, scale=None, window=(-1, -1), bias=None, mask=None, block_mask=None,
              key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              return_lse=False)
    kw.update(over)
    return kw


# ---------------------------------------------------------------------------------------------------
# flash-attn: a fake FA2 module computing with the reference


@pytest.fixture
def fake_flash(monkeypatch):
    calls = []

    def ref_lse(o, lse):  # flash-attn marks rows with no key with lse = +inf
        return o, lse.masked_fill(torch.isneginf(lse), float("inf"))

    def flash_attn_func(q, k, v, softmax_scale, causal, window_size, return_attn_probs=False):
        calls.append(("func", dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size)))
        o, lse = attention_reference(q, k, v, causal=causal, scale=softmax_scale, window=window_size, return_lse=True)
        return (*ref_lse(o, lse), None) if return_attn_probs else o

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size,
                               return_attn_probs=False):
        assert cu_q.dtype == torch.int32 and isinstance(max_q, int) and isinstance(max_k, int)
        calls.append(("varlen", dict(max_q=max_q, max_k=max_k)))
        o, lse = attention_reference(q, k, v, causal=causal, scale=softmax_scale, window=window_size,
                                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
        return (*ref_lse(o, lse), None) if return_attn_probs else o

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size,
                                return_softmax_lse=False):
        assert cache_seqlens.dtype == torch.int32
        calls.append(("kvcache", dict(paged=block_table is not None)))
        o, lse = attention_with_kvcache_reference(q, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                                  causal=causal, scale=softmax_scale, window=window_size,
                                                  return_lse=True)
        return ref_lse(o, lse) if return_softmax_lse else o

    mod = _module("flash_attn", flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func,
                  flash_attn_with_kvcache=flash_attn_with_kvcache, __version__="2.99-fake")
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    for name in ("flash_attn_interface", "flash_attn.cute"):
        monkeypatch.setitem(sys.modules, name, None)  # not importable
    # CPU tensors stand in for CUDA ones: only the device check is lifted
    real = FA.device_reasons
    monkeypatch.setattr(FA, "device_reasons", lambda device: [r for r in real(device) if "CUDA" not in r])
    return calls


def test_flash_not_installed_says_so():
    if FA.library() is not None:
        pytest.skip("flash-attn is installed here")
    q, k, v = _inputs()
    reasons = FA.supports_attention(q, k, v, **_kw())
    assert any("not installed" in r for r in reasons)
    assert "flash_attn" not in sys.modules  # availability never imports it


def test_flash_supports_declares_every_unsupported_feature(fake_flash):
    q, k, v = _inputs()
    assert FA.library() == "flash_attn"
    assert FA.supports_attention(q, k, v, **_kw(causal=True, window=(4, 0))) == []
    cases = {
        "dtype": (dict(), [t.float() for t in (q, k, v)]),
        "bias": (dict(bias=torch.zeros(1, 1, 9, 13)), None),
        "mask": (dict(mask=torch.ones(1, 1, 9, 13, dtype=torch.bool)), None),
        "key_padding_mask": (dict(key_padding_mask=torch.ones(2, 13, dtype=torch.bool)), None),
        "head dim": (dict(), _inputs(D=20)),
    }
    for word, (over, ins) in cases.items():
        reasons = FA.supports_attention(*(ins or (q, k, v)), **_kw(**over))
        assert any(word in r for r in reasons), (word, reasons)
    v_big = torch.randn(2, 13, 2, 32, dtype=torch.float16)
    assert any("v head dim" in r for r in FA.supports_attention(q, k, v_big, **_kw()))
    qg = q.clone().requires_grad_()
    assert any("lse" in r for r in FA.supports_attention(qg, k, v, **_kw(return_lse=True)))
    # decode: paged blocks must be a multiple of 256; inference only
    kc = torch.randn(4, 16, 2, 16, dtype=torch.float16)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    table = torch.zeros(2, 2, dtype=torch.int32)
    assert any("256" in r for r in FA.supports_decode(q[:, :1], kc, kc, lens, block_table=table))
    assert any("inference" in r for r in FA.supports_decode(qg[:, :1], kc, kc, lens))


def test_flash_glue_matches_the_reference(fake_flash):
    q, k, v = _inputs()
    for kw in (dict(causal=True), dict(window=(3, 2)), dict(causal=True, window=(4, 0))):
        o = attnzoo.attention(q, k, v, backend="flash_attn", **kw)
        torch.testing.assert_close(o, attention_reference(q, k, v, **kw), rtol=0, atol=0)
    assert fake_flash[-1] == ("func", dict(softmax_scale=1 / math.sqrt(16), causal=True, window_size=(4, 0)))
    # rows with no key: flash's +inf lse comes back as -inf (causal, Tq > Tk)
    q2, k2, v2 = _inputs(Tq=13, Tk=9)
    o, lse = attnzoo.attention(q2, k2, v2, causal=True, return_lse=True, backend="flash_attn")
    assert torch.isneginf(lse[:, :, :4]).all() and (o[:, :4] == 0).all()
    # varlen: int32 cu_seqlens and the longest lengths
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    qv, kv_, vv = (torch.randn(12, h, 16, dtype=torch.float16) for h in (4, 2, 2))
    o = attnzoo.attention(qv, kv_, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="flash_attn")
    torch.testing.assert_close(o, attention_reference(qv, kv_, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True))
    assert fake_flash[-1] == ("varlen", dict(max_q=7, max_k=7))
    # decode
    kc, vc = (torch.randn(2, 20, 2, 16, dtype=torch.float16) for _ in range(2))
    lens = torch.tensor([7, 20], dtype=torch.int32)
    o = attnzoo.attention_with_kvcache(q[:, :2], kc, vc, lens, backend="flash_attn")
    torch.testing.assert_close(o, attention_with_kvcache_reference(q[:, :2], kc, vc, lens), rtol=0, atol=0)


def test_auto_on_cuda_picks_flash_for_its_features_only(fake_flash, monkeypatch):
    monkeypatch.setattr(backends, "_device_of", lambda inputs: torch.device("cuda"))
    q, k, v = _inputs()
    assert backends.select("attention", "auto", q=q, k=k, v=v, **_kw(causal=True)).backend == "flash_attn"
    kpm = torch.ones(2, 13, dtype=torch.bool)
    picked = backends.select("attention", "auto", q=q, k=k, v=v, **_kw(key_padding_mask=kpm)).backend
    assert picked != "flash_attn"  # padding belongs to the kernels' row of the table
    row = next(r for r in backends.auto_table(torch.device("cuda")) if r["op"] == "attention"
               and r["when"].startswith("plain"))
    assert row["picks"] == "flash_attn" and "flash_attn" not in row["unavailable"]


# ---------------------------------------------------------------------------------------------------
# xformers: a fake module whose memory_efficient_attention applies the structured masks with the reference


class _Bias:
    def __init__(self, causal, window=None, seqlens=None):
        self.causal, self.window, self.seqlens = causal, window, seqlens

    def make_local_attention(self, w):
        return _Bias(self.causal, w, self.seqlens)


@pytest.fixture
def fake_xformers(monkeypatch):
    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
        calls.append(dict(ndim=q.dim(), bias=attn_bias))
        if q.dim() == 5:  # [B, M, Hkv, G, K] -> BTHD with contiguous groups
            B, M, Hkv, G, K = q.shape
            q, k, v = q.reshape(B, M, Hkv * G, K), k[:, :, :, 0], v[:, :, :, 0]
        kw = dict(scale=scale)
        if attn_bias is not None:
            kw.update(causal=attn_bias.causal, window=(attn_bias.window - 1, 0) if attn_bias.window else (-1, -1))
            if attn_bias.seqlens is not None:
                lq, lk = attn_bias.seqlens
                kw.update(cu_seqlens_q=torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32),
                          cu_seqlens_k=torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32))
                o = attention_reference(q[0], k[0], v[0], **kw)[None]
                return o if calls[-1]["ndim"] == 4 else o.reshape(B, M, Hkv, G, -1)
        o = attention_reference(q, k, v, **kw)
        return o if calls[-1]["ndim"] == 4 else o.reshape(B, M, Hkv, G, -1)

    ab = _module(
        "xformers.ops.fmha.attn_bias",
        LowerTriangularFromBottomRightMask=lambda: _Bias(True),
        LowerTriangularFromBottomRightLocalAttentionMask=lambda w: _Bias(True, w),
        BlockDiagonalMask=types.SimpleNamespace(from_seqlens=lambda lq, lk: _Bias(False, None, (lq, lk))),
        BlockDiagonalCausalFromBottomRightMask=types.SimpleNamespace(
            from_seqlens=lambda lq, lk: _Bias(True, None, (lq, lk))),
    )
    for name, mod in (("xformers", _module("xformers")), ("xformers.ops", _module(
            "xformers.ops", memory_efficient_attention=memory_efficient_attention)),
            ("xformers.ops.fmha", _module("xformers.ops.fmha")), ("xformers.ops.fmha.attn_bias", ab)):
        monkeypatch.setitem(sys.modules, name, mod)
    real = XF.device_reasons
    monkeypatch.setattr(XF, "device_reasons", lambda device: [r for r in real(device) if "CUDA" not in r])
    return calls


def test_xformers_not_installed_says_so():
    if XF.installed():
        pytest.skip("xformers is installed here")
    q, k, v = _inputs()
    assert any("not installed" in r for r in XF.supports_attention(q, k, v, **_kw()))


def test_xformers_supports_declares_every_unsupported_feature(fake_xformers):
    q, k, v = _inputs()
    assert XF.supports_attention(q, k, v, **_kw(causal=True, window=(4, -1))) == []
    for over, word in ((dict(return_lse=True), "lse"), (dict(window=(2, 2), causal=True), "window"),
                       (dict(window=(2, -1)), "window"), (dict(bias=torch.zeros(1)), "bias"),
                       (dict(key_padding_mask=torch.ones(2, 13, dtype=torch.bool)), "key_padding_mask")):
        assert any(word in r for r in XF.supports_attention(q, k, v, **_kw(**over))), over
    q2, k2, v2 = _inputs(Tq=13, Tk=9)
    assert any("Tq=13 > Tk=9" in r for r in XF.supports_attention(q2, k2, v2, **_kw(causal=True)))


def test_xformers_glue_matches_the_reference(fake_xformers):
    q, k, v = _inputs()
    for kw in (dict(), dict(causal=True), dict(causal=True, window=(3, -1))):
        o = attnzoo.attention(q, k, v, backend="xformers", **kw)
        torch.testing.assert_close(o, attention_reference(q, k, v, **kw), rtol=0, atol=0)
    assert fake_xformers[-1]["ndim"] == 5  # GQA went through the grouped 5-D form
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    qv, kv_, vv = (torch.randn(12, h, 16, dtype=torch.float16) for h in (4, 2, 2))
    o = attnzoo.attention(qv, kv_, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, backend="xformers")
    torch.testing.assert_close(o, attention_reference(qv, kv_, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True))
    assert fake_xformers[-1]["bias"].seqlens == ([5, 7], [5, 7])


# ---------------------------------------------------------------------------------------------------
# the real engines, where they import (GPU)

CUDA = torch.cuda.is_available()
flash_here = CUDA and FA.library(torch.device("cuda")) is not None
xformers_here = CUDA and XF.installed()


def _rule(backend, q, k, v, **kw):
    got = attnzoo.attention(q, k, v, backend=backend, **kw)
    ref = attention_reference(q.double(), k.double(), v.double(), **kw)
    with lowp_reference():
        low = attention_reference(q, k, v, **kw)
    assert_close_by_rule(got, ref, low, f"{backend} o", dtype=q.dtype)


@pytest.mark.skipif(not flash_here, reason="flash-attn is not importable on a CUDA device here")
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window=(32, 0), causal=True), dict(window=(7, 9))])
def test_flash_real(kw):
    q, k, v = (t.cuda() for t in _inputs(Tq=100, Tk=130, H=8, Hkv=2, D=64, dtype=torch.bfloat16))
    _rule("flash_attn", q, k, v, **kw)
    kc, vc = (torch.randn(2, 512, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([100, 512], dtype=torch.int32, device="cuda")
    o = attnzoo.attention_with_kvcache(q[:, :1], kc, vc, lens, backend="flash_attn")
    ref = attention_with_kvcache_reference(q[:, :1].double(), kc.double(), vc.double(), lens)
    with lowp_reference():
        low = attention_with_kvcache_reference(q[:, :1], kc, vc, lens)
    assert_close_by_rule(o, ref, low, "flash decode", dtype=q.dtype)


@pytest.mark.skipif(not xformers_here, reason="xformers is not importable on a CUDA device here")
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window=(32, -1), causal=True)])
def test_xformers_real(kw):
    q, k, v = (t.cuda() for t in _inputs(Tq=100, Tk=130, H=8, Hkv=2, D=64, dtype=torch.float16))
    _rule("xformers", q, k, v, **kw)
