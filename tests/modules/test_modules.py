"""Every softmax module (MHA incl. GQA/MQA/WGQA, MoH with each router, KHA linear/mlp, DMA) through the common
interface: forward + backward on CPU, key padding, and cached decoding equal to the full forward.
(LightningAttention is covered in its own file.)"""

import pytest
import torch

import copy

import attnzoo
from attnzoo import DynamicMaskAttention, KnockingHeadsAttention, MoHAttention, MultiHeadAttention

DIM, H = 32, 4

CONFIGS = {
    "mha": (MultiHeadAttention, {}),
    "gqa": (MultiHeadAttention, dict(num_kv_heads=2)),
    "mqa": (MultiHeadAttention, dict(num_kv_heads=1)),
    "wgqa": (MultiHeadAttention, dict(num_kv_heads=2, kv_weights="wgqa")),
    "moh_code": (MoHAttention, dict(num_shared_heads=1, top_k=2, normalize="code")),
    "moh_paper": (MoHAttention, dict(num_shared_heads=1, top_k=2, normalize="paper")),
    "moh_qnorm": (MoHAttention, dict(num_shared_heads=1, top_k=2, router="qnorm")),
    "moh_gqa": (MoHAttention, dict(num_kv_heads=2, num_shared_heads=2, top_k=1)),
    "kha_linear": (KnockingHeadsAttention, dict(num_kv_heads=2, knocking="linear")),
    "kha_mlp": (KnockingHeadsAttention, dict(knocking="mlp")),
    "kha_mqa": (KnockingHeadsAttention, dict(num_kv_heads=1, knocking="linear")),
    "dma": (DynamicMaskAttention, dict(num_kv_heads=2, keep_window=3)),
    "dma_exp": (DynamicMaskAttention, dict(keep_window=4, bias_form="exp")),
}


def build(name, seed=0, dtype=torch.float32, perturb=True, **extra):
    cls, kw = CONFIGS[name]
    torch.manual_seed(seed)
    m = cls(DIM, H, **{**kw, **extra}, dtype=dtype)
    if perturb:
        # move every parameter off its initial value (routers, knocking matrices, DMA's A, WGQA mixes),
        # so that the tests exercise non-trivial routing / selection / mixing
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return m


def inputs(B=2, T=9, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g, dtype=dtype)
    kpm = torch.ones(B, T, dtype=torch.bool)  # True = real token
    kpm[-1, :2] = False  # left padding
    kpm[0, min(5, T - 1)] = False  # a hole in the middle
    kpm[-1, -1] = False  # right padding
    return x, kpm


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_common_interface(name):
    m = build(name, qkv_bias=True, qk_norm=True, rope=True)
    x, kpm = inputs()
    x.requires_grad_()
    y = m(x, key_padding_mask=kpm)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    loss = y.square().mean()
    if isinstance(m, MoHAttention):
        assert m.aux_loss is not None and m.aux_loss.dim() == 0
        assert m.last_gates.shape == (2, 9, H)
        loss = loss + 0.01 * m.aux_loss
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_proj.bias"):
        p = dict(m.named_parameters())[pname]
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    for pname, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname
    if m.knocking is not None:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.knocking.parameters())
    if name == "wgqa":
        assert m.k_mix.grad.abs().sum() > 0 and m.v_mix.grad.abs().sum() > 0
    if name.startswith("dma"):
        assert m.A.grad.abs().sum() > 0 and m.dt_proj.weight.grad.abs().sum() > 0
    if name in ("moh_code", "moh_paper"):
        assert m.router_routed.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_explicit_head_dim_and_no_bias(name):
    m = build(name, head_dim=6)
    assert m.q_proj.out_features == H * 6 and m.q_proj.bias is None
    x, _ = inputs(B=1, T=5)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padding_tokens_do_not_affect_real_tokens(name):
    """Changing the input at padded positions leaves the outputs at real positions unchanged (they are
    never attended to; MoH's router and DMA's bias are per token)."""
    m = build(name, rope=True)
    x, kpm = inputs()
    x2 = x.clone()
    x2[~kpm] = torch.randn_like(x2[~kpm]) * 10
    with torch.no_grad():
        y = m(x, key_padding_mask=kpm)
        y2 = m(x2, key_padding_mask=kpm)
    # a real token with no real key before it (left padding then causal) sees only itself: fine either way
    torch.testing.assert_close(y[kpm], y2[kpm], atol=1e-5, rtol=1e-5)
    # and without the mask the padded positions do matter (so the check above is not vacuous)
    with torch.no_grad():
        assert (m(x)[kpm] - m(x2)[kpm]).abs().max() > 1e-3


def decode_all(m, x, kpm, prefill):
    """Run ``x`` through ``m`` with a cache: ``prefill`` tokens at once, then one at a time."""
    B, T, _ = x.shape
    cache = m.new_cache(B)
    outs = []
    with torch.no_grad():
        if prefill:
            outs.append(m(x[:, :prefill], key_padding_mask=kpm[:, :prefill], cache=cache))
        for t in range(prefill, T):
            outs.append(m(x[:, t : t + 1], key_padding_mask=kpm[:, t : t + 1], cache=cache))
    assert cache.seq_len == T
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("prefill", [0, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_full_forward(name, prefill):
    m = build(name, rope=True, qk_norm=True, qkv_bias=True)
    # B * T = 34 > dim: the full forward folds KHA-Linear into the weights, decode steps apply it to the
    # activations -- the two paths are checked against each other too
    x, kpm = inputs(T=17)
    with torch.no_grad():
        full = m(x, key_padding_mask=kpm)
    step = decode_all(m, x, kpm, prefill)
    torch.testing.assert_close(step, full, atol=2e-5, rtol=2e-5)
    if isinstance(m, MoHAttention):  # the gates of the last step are the last token's gates
        m(x, key_padding_mask=kpm)
        full_gates = m.last_gates
        decode_all(m, x, kpm, prefill)
        torch.testing.assert_close(m.last_gates, full_gates[:, -1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["mha", "gqa", "moh_code", "kha_mlp", "dma"])
def test_cached_decoding_without_padding_and_reset(name):
    m = build(name, rope=True)
    x, _ = inputs(B=1, T=7)
    ones = torch.ones(1, 7, dtype=torch.bool)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(1)
        step = torch.cat([m(x[:, t : t + 1], cache=cache) for t in range(7)], 1)
        torch.testing.assert_close(step, full, atol=2e-5, rtol=2e-5)
        # after reset the cache starts over
        cache.reset()
        torch.testing.assert_close(decode_all(m, x, ones, 3), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["mha", "dma", "moh_qnorm"])
def test_explicit_position_ids_equal_default(name):
    m = build(name, rope=True)
    x, kpm = inputs()
    with torch.no_grad():
        a = m(x, key_padding_mask=kpm)
        b = m(x, key_padding_mask=kpm, position_ids=torch.arange(9))
        c = m(x, key_padding_mask=kpm, position_ids=torch.arange(9).expand(2, 9))
        d = m(x, key_padding_mask=kpm, position_ids=torch.arange(9) + 3)  # rope is relative: same scores
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    torch.testing.assert_close(a, d, atol=1e-4, rtol=1e-4)


def test_mha_equals_hand_written_attention():
    m = build("gqa", qk_norm=False)
    x, kpm = inputs(dtype=torch.float32)
    B, T, _ = x.shape
    D = DIM // H
    q = m.q_proj(x).view(B, T, H, D)
    k = m.k_proj(x).view(B, T, 2, D).repeat_interleave(2, dim=2)
    v = m.v_proj(x).view(B, T, 2, D).repeat_interleave(2, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    keep = torch.ones(T, T, dtype=torch.bool).tril() & kpm[:, None, None, :]
    p = s.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
    ref = m.o_proj(torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, DIM))
    torch.testing.assert_close(m(x, key_padding_mask=kpm), ref, atol=1e-5, rtol=1e-5)


def test_mha_with_hkv_equal_h_is_mha():
    a = MultiHeadAttention(DIM, H)
    b = MultiHeadAttention(DIM, H, num_kv_heads=H)
    b.load_state_dict(a.state_dict())
    x, kpm = inputs()
    torch.testing.assert_close(a(x, key_padding_mask=kpm), b(x, key_padding_mask=kpm), atol=0, rtol=0)


def test_non_causal_module_sees_the_future():
    m = MultiHeadAttention(DIM, H, causal=False)
    x, _ = inputs(B=1, T=6)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert (m(x)[:, 0] - m(x2)[:, 0]).abs().max() > 1e-4
    mc = MultiHeadAttention(DIM, H, causal=True)
    with torch.no_grad():
        torch.testing.assert_close(mc(x)[:, :-1], mc(x2)[:, :-1], atol=0, rtol=0)


def test_rope_frequencies_stay_fp32_after_module_cast():
    """module.to(bfloat16) must not round the rotary frequencies (an O(1) error at long positions)."""
    m32 = attnzoo.MultiHeadAttention(64, 4, rope=True)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    x = torch.randn(1, 4, 4, 16)
    pos = torch.arange(4000, 4004)[None]
    want = m32.rope(x, pos).to(torch.bfloat16)
    got = m16.rope(x.to(torch.bfloat16), pos)
    assert (got.float() - want.float()).abs().max() < 0.05


def test_failed_call_leaves_the_cache_unchanged():
    m = attnzoo.MultiHeadAttention(32, 4, backend="cuda")  # cannot run here: the call fails after projecting
    cache = m.new_cache(1)
    with pytest.raises(attnzoo.BackendUnavailableError):
        m(torch.randn(1, 3, 32), cache=cache)
    assert cache.seq_len == 0


def test_cache_of_another_kind_is_rejected():
    m = attnzoo.MultiHeadAttention(32, 4)
    other = attnzoo.LightningAttention(32, 4).new_cache(1)
    with pytest.raises(attnzoo.InputError, match="^cache"):
        m(torch.randn(1, 3, 32), cache=other)


def test_generation_steps_use_the_decode_op(monkeypatch):
    """Cached steps of a few tokens go through attention_with_kvcache (flash-decoding on a GPU); the
    prefill, padded calls and calls that need gradients go through attention."""
    from attnzoo.modules import base

    calls = []
    real = base.attention_with_kvcache
    monkeypatch.setattr(base, "attention_with_kvcache", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, 2, rope=True)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2)
        steps = [m(x[:, :4], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert calls == [1] * 5  # the 4-token prefill saw no cached keys: plain attention
