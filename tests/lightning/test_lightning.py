"""Lightning attention (SPEC §6): the PyTorch reference, decay presets, the op's validation and the module.

The Triton kernels are tested in test_lightning_triton.py.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import backends
from attnzoo.errors import InputError
from attnzoo.modules.lightning import LightningAttention, LightningCache
from attnzoo.ops.lightning.api import lightning_attention, lightning_decode
from attnzoo.ops.lightning.decay import alibi_slopes, decay_rates
from attnzoo.ops.lightning.reference import lightning_parallel, lightning_recurrent

f64 = torch.float64


def _inputs(B, T, H, D, Dv, *, decay, h0, seed=0, dtype=f64, n_states=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    s = torch.rand(H, generator=g, dtype=f64).to(dtype) * decay if decay else None
    S0 = torch.randn(n_states or B, H, D, Dv, generator=g, dtype=dtype) if h0 else None
    return q, k, v, s, S0


shapes = st.fixed_dictionaries(
    dict(
        B=st.integers(1, 2), T=st.integers(1, 24), H=st.integers(1, 3), D=st.integers(1, 9), Dv=st.integers(1, 9),
        decay=st.sampled_from([0.0, 0.1, 1.0, 5.0]), h0=st.booleans(), scale=st.sampled_from([1.0, 0.3]),
        seed=st.integers(0, 2**16),
    )
)


# ---------------------------------------------------------------------------------------------------
# reference


@settings(deadline=None)
@given(shapes)
def test_parallel_equals_recurrent_fp64(p):
    q, k, v, s, S0 = _inputs(p["B"], p["T"], p["H"], p["D"], p["Dv"], decay=p["decay"], h0=p["h0"], seed=p["seed"])
    o1, S1 = lightning_parallel(q, k, v, s, p["scale"], S0)
    o2, S2 = lightning_recurrent(q, k, v, s, p["scale"], S0)
    assert o1.dtype == f64 and S1.dtype == f64
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S1, S2, rtol=1e-10, atol=1e-10)


def test_parallel_equals_recurrent_gradients_fp64():
    q, k, v, s, S0 = _inputs(2, 9, 2, 3, 4, decay=0.7, h0=True, seed=1)
    ins = [t.requires_grad_() for t in (q, k, v, s, S0)]
    go, gS = torch.randn(2, 9, 2, 4, dtype=f64), torch.randn(2, 2, 3, 4, dtype=f64)
    grads = []
    for fn in (lightning_parallel, lightning_recurrent):
        o, S = fn(*ins[:3], ins[3], 0.5, ins[4])
        grads.append(torch.autograd.grad((o * go).sum() + (S * gS).sum(), ins))
    for a, b in zip(*grads):  # the decay rates get gradients in the reference too
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradcheck(lambda *x: lightning_parallel(*x[:3], x[3], 0.5, x[4]), ins)


def test_hand_computed_two_tokens():
    # T=2, D=Dv=1: S_0 = k0 v0, o0 = q0 k0 v0; S_1 = lam k0 v0 + k1 v1, o1 = q1 S_1
    q = torch.tensor([2.0, 3.0], dtype=f64).view(1, 2, 1, 1)
    k = torch.tensor([5.0, 7.0], dtype=f64).view(1, 2, 1, 1)
    v = torch.tensor([11.0, 13.0], dtype=f64).view(1, 2, 1, 1)
    s = torch.tensor([math.log(2.0)], dtype=f64)  # lambda = 1/2
    o, S = lightning_parallel(q, k, v, s, 1.0)
    assert o.flatten().tolist() == pytest.approx([2 * 55, 3 * (55 / 2 + 91)])
    assert S.item() == pytest.approx(55 / 2 + 91)


@settings(deadline=None)
@given(shapes, st.integers(0, 24))
def test_split_and_chain_state_equals_one_pass(p, cut):
    T = p["T"]
    cut = min(cut, T)
    q, k, v, s, S0 = _inputs(p["B"], T, p["H"], p["D"], p["Dv"], decay=p["decay"], h0=p["h0"], seed=p["seed"])
    o, S = lightning_attention(q, k, v, decay=s, scale=p["scale"], initial_state=S0, output_final_state=True)
    o1, S1 = lightning_attention(q[:, :cut], k[:, :cut], v[:, :cut], decay=s, scale=p["scale"], initial_state=S0,
                                 output_final_state=True)
    o2, S2 = lightning_attention(q[:, cut:], k[:, cut:], v[:, cut:], decay=s, scale=p["scale"], initial_state=S1,
                                 output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S2, S, rtol=1e-10, atol=1e-10)


@settings(deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=4), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_varlen_equals_loop_over_sequences(lens, h0, packed3, seed):
    H, D, Dv = 2, 3, 4
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    N = int(cu[-1])
    q, k, v, s, S0 = _inputs(1, N, H, D, Dv, decay=0.5, h0=h0, seed=seed, n_states=len(lens))
    args = (q[0], k[0], v[0]) if packed3 else (q, k, v)
    o, S = lightning_attention(*args, decay=s, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (args[0].shape[:-1] + (Dv,)) and S.shape == (len(lens), H, D, Dv)
    o = o if packed3 else o[0]
    for i in range(len(lens)):
        a, b = int(cu[i]), int(cu[i + 1])
        oi, Si = lightning_recurrent(q[:, a:b], k[:, a:b], v[:, a:b], s, 1.0, None if S0 is None else S0[i : i + 1])
        torch.testing.assert_close(o[a:b], oi[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(S[i : i + 1], Si, rtol=1e-10, atol=1e-10)


def test_low_precision_reference_runs_in_its_dtype():
    q, k, v, s, S0 = _inputs(1, 10, 2, 8, 8, decay=0.5, h0=True, dtype=torch.float16)
    o, S = lightning_parallel(q, k, v, s, 1.0, S0.float(), upcast=False)
    assert o.dtype == torch.float16 and S.dtype == torch.float32
    o_hi, _ = lightning_parallel(q.double(), k.double(), v.double(), s.double(), 1.0, S0.double())
    assert (o.double() - o_hi).abs().max() < 0.05 * o_hi.abs().max()


# ---------------------------------------------------------------------------------------------------
# decay presets


def test_decay_alibi_h8_hand_checked():
    # 2^(-8h/8) = 2^-h, h = 1..8, single layer: factor 1 + 1e-5
    want = [2.0**-h * (1 + 1e-5) for h in range(1, 9)]
    assert decay_rates(8).tolist() == pytest.approx(want, rel=1e-6)
    # layer factor 1 - l/(L-1) + 1e-5: layer 2 of 5 -> 0.5 + 1e-5; the last layer -> 1e-5
    assert decay_rates(8, "alibi", 2, 5).tolist() == pytest.approx([2.0**-h * (0.5 + 1e-5) for h in range(1, 9)])
    assert decay_rates(8, "alibi", 4, 5).tolist() == pytest.approx([2.0**-h * 1e-5 for h in range(1, 9)])


def test_decay_alibi_non_power_of_two_interleaves():
    # H=6: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every other 8-head slope: 2^-1, 2^-3
    assert alibi_slopes(6) == pytest.approx([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    assert alibi_slopes(12)[:8] == pytest.approx(alibi_slopes(8))
    assert len(alibi_slopes(12)) == 12 and len(set(alibi_slopes(12))) == 12


def test_decay_paper_and_none():
    # (8h/H) * (1 - l/L), h = 0..H-1
    assert decay_rates(4, "paper", 1, 2).tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert decay_rates(8, "paper").tolist() == pytest.approx([float(h) for h in range(8)])
    for none in (None, 0, "none"):
        assert decay_rates(3, none).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(InputError, match="preset"):
        decay_rates(4, "linear")
    with pytest.raises(InputError, match="layer_idx"):
        decay_rates(4, "alibi", 3, 3)


# ---------------------------------------------------------------------------------------------------
# op validation and dispatch


def test_auto_picks_torch_on_cpu():
    """The auto table sends lightning on CPU to the chunked torch backend (O(T)), never the interpreter."""
    q, k, v, s, _ = _inputs(1, 4, 2, 4, 4, decay=0.5, h0=False, dtype=torch.float32)
    impl = backends.select("lightning_attention", "auto", q=q, k=k, v=v, decay=s, scale=1.0, initial_state=None,
                           output_final_state=False, cu_seqlens=None)
    assert impl.backend == "torch"


def test_scalar_decay_and_defaults():
    q, k, v, _, _ = _inputs(2, 5, 3, 4, 2, decay=0, h0=False)
    o = lightning_attention(q, k, v, decay=0.25)
    ref, _ = lightning_recurrent(q, k, v, torch.full((3,), 0.25, dtype=f64))
    torch.testing.assert_close(o, ref)
    o, S = lightning_attention(q, k, v, output_final_state=True)
    assert S.dtype == f64 and S.shape == (2, 3, 4, 2)
    o32, S32 = lightning_attention(q.float(), k.float(), v.float(), output_final_state=True)
    assert S32.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(q=torch.randn(2, 3, 4)), "q"),
        (dict(k=torch.randn(1, 5, 2, 3)), "k"),
        (dict(v=torch.randn(1, 4, 2, 3)), "v"),
        (dict(v=torch.randn(1, 5, 2, 4, dtype=torch.float64)), "v"),
        (dict(q=torch.randn(1, 5, 2, 300), k=torch.randn(1, 5, 2, 300)), "q"),
        (dict(decay=torch.ones(3)), "decay"),
        (dict(decay=torch.tensor([0.1, -0.5])), "decay"),
        (dict(decay=-1.0), "decay"),
        (dict(decay=torch.tensor([0.1, float("nan")])), "decay"),
        (dict(decay="alibi"), "decay"),
        (dict(scale=float("inf")), "scale"),
        (dict(initial_state=torch.zeros(1, 2, 4, 3)), "initial_state"),
        (dict(initial_state=torch.zeros(1, 2, 4, 4, dtype=torch.float16)), "initial_state"),
        (dict(cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), "cu_seqlens"),
        (dict(q=torch.randn(2, 5, 2, 4), k=torch.randn(2, 5, 2, 4), v=torch.randn(2, 5, 2, 4),
              cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)), "q"),
        (dict(output_final_state=1), "output_final_state"),
    ],
)
def test_validation_names_the_argument(kwargs, arg):
    base = dict(q=torch.randn(1, 5, 2, 4), k=torch.randn(1, 5, 2, 4), v=torch.randn(1, 5, 2, 4))
    base.update(kwargs)
    q, k, v = base.pop("q"), base.pop("k"), base.pop("v")
    with pytest.raises(InputError, match=rf"^{arg}\b"):
        lightning_attention(q, k, v, **base)


def test_decode_reference_updates_state_in_place():
    q, k, v, s, S0 = _inputs(2, 3, 2, 4, 5, decay=0.5, h0=True)
    state = S0.clone()
    o = lightning_decode(q, k, v, state, decay=s, scale=0.5)
    ref_o, ref_S = lightning_recurrent(q, k, v, s, 0.5, S0)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(state, ref_S)
    with pytest.raises(InputError, match="^state"):
        lightning_decode(q, k, v, S0.float(), decay=s)


# ---------------------------------------------------------------------------------------------------
# module


def _module(**kw):
    torch.manual_seed(0)
    kw.setdefault("dtype", torch.float32)
    return LightningAttention(32, 4, **kw)


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2, decay="paper", silu_v=True), dict(decay=None, scale=0.5)])
def test_module_decode_through_cache_equals_full_forward(kw):
    m = _module(layer_idx=1, num_layers=3, **kw)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2)
        assert isinstance(cache, LightningCache) and cache.state.shape == (2, 4, 8, 8)
        steps = [m(x[:, t : t + 1], cache=cache) for t in range(11)]
        assert cache.seq_len == 11
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
        # prefill longer than the decode path's token budget, then decode
        cache2 = m.new_cache(2)
        pre = m(torch.cat([x, x], 1)[:, :20], cache=cache2)
        rest = m(torch.cat([x, x], 1)[:, 20:], cache=cache2)
        torch.testing.assert_close(torch.cat([pre, rest], 1), m(torch.cat([x, x], 1)), rtol=1e-5, atol=1e-5)
        assert cache2.seq_len == 22


def test_module_forward_backward_cpu_uses_torch():
    """On CPU the module's auto backend is the chunked torch backend (the auto table), and training works."""
    m = _module()
    x = torch.randn(2, 9, 32, requires_grad=True)
    calls = []
    impl = backends._REGISTRY["lightning_attention"]["torch"]
    orig = impl.fn
    try:
        object.__setattr__(impl, "fn", lambda **kw: calls.append(1) or orig(**kw))
        y = m(x)
    finally:
        object.__setattr__(impl, "fn", orig)
    assert calls == [1]
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_module_training_through_cache_keeps_graph():
    m = _module()
    x = torch.randn(1, 6, 32)
    cache = m.new_cache(1)
    a = m(x[:, :3], cache=cache)
    b = m(x[:, 3:], cache=cache)  # needs grad: chunk op with the state, not the in-place decode
    torch.testing.assert_close(torch.cat([a, b], 1), m(x), rtol=1e-5, atol=1e-5)
    torch.cat([a, b], 1).sum().backward()
    assert m.q_proj.weight.grad is not None


def test_module_key_padding_mask():
    m = _module()
    x = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 5:] = False  # right padding
    with torch.no_grad():
        y = m(x, key_padding_mask=mask)
        assert (y[~mask] == 0).all()
        torch.testing.assert_close(y[0, 3:], m(x[:1, 3:])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y[1, :5], m(x[1:, :5])[0], rtol=1e-5, atol=1e-5)
        # left padding into a fresh cache leaves the state exact
        c1, c2 = m.new_cache(1), m.new_cache(1)
        m(x[:1], key_padding_mask=mask[:1], cache=c1)
        m(x[:1, 3:], cache=c2)
        torch.testing.assert_close(c1.state, c2.state, rtol=1e-5, atol=1e-6)


def test_module_decay_stays_fp32_and_follows_device():
    m = _module().to(torch.bfloat16)
    assert m.decay.dtype == torch.float32 and m.q_proj.weight.dtype == torch.bfloat16
    assert m.decay.tolist() == decay_rates(4).tolist()
    m = _module(decay=torch.tensor([0.0, 0.5, 1.0, 2.0]))
    assert m.decay.tolist() == [0.0, 0.5, 1.0, 2.0]
    assert "decay" not in m.state_dict()


@pytest.mark.parametrize(
    "kw, arg",
    [
        (dict(causal=False), "causal"),
        (dict(rope=True), "rope"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(knocking="linear"), "knocking"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(decay="linear"), "decay"),
        (dict(decay=torch.ones(3)), "decay"),
        (dict(decay=-0.5), "decay"),
    ],
)
def test_module_rejects_unsupported(kw, arg):
    with pytest.raises(InputError, match=rf"^{arg}\b"):
        LightningAttention(32, 4, **kw)


def test_module_call_validation():
    m = _module()
    with pytest.raises(InputError, match="^x"):
        m(torch.randn(2, 5, 16))
    with pytest.raises(InputError, match="^key_padding_mask"):
        m(torch.randn(2, 5, 32), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="^cache"):
        m(torch.randn(2, 5, 32), cache=m.new_cache(3))


@pytest.mark.parametrize("silu_v,kv_heads", [(False, 4), (True, 2)])
def test_module_equals_its_formula(silu_v, kv_heads):
    """The layer, written out by hand (SPEC §6's TransNormer/MiniMax form) from the module's own weights:
    o = RMSNorm(lightning(SiLU(x Wq), SiLU(x Wk), [SiLU](x Wv))) * sigmoid(x Wg), then Wo."""
    torch.manual_seed(2)
    m = LightningAttention(32, 4, kv_heads, head_dim=8, silu_v=silu_v, layer_idx=1, num_layers=4,
                           dtype=torch.float64)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    B, T, H, D = 2, 11, 4, 8
    silu = lambda t: t * torch.sigmoid(t)  # noqa: E731
    q = silu(x @ m.q_proj.weight.T).view(B, T, H, D)
    k = silu(x @ m.k_proj.weight.T).view(B, T, kv_heads, D).repeat_interleave(H // kv_heads, 2)
    v = (x @ m.v_proj.weight.T).view(B, T, kv_heads, D).repeat_interleave(H // kv_heads, 2)
    v = silu(v) if silu_v else v
    lam = torch.exp(-decay_rates(H, "alibi", layer_idx=1, num_layers=4).double())
    o = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(D, D, dtype=torch.float64)
            for t in range(T):
                S = lam[h] * S + torch.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = q[b, t, h] @ S
    o = o.reshape(B, T, H * D)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * m.norm.weight
    want = (o * torch.sigmoid(x @ m.g_proj.weight.T)) @ m.o_proj.weight.T
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)
