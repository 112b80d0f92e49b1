"""Mixture-of-Head attention (SPEC §3): router gates by hand, the load-balance loss by hand, MoH with every
head active == MHA, the qnorm router, and the moh_attention core == attention * gates."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo import MoHAttention, MultiHeadAttention
from attnzoo.convert import mha_to_moh
from attnzoo.ops.moh.router import learned_router, load_balance_loss, qnorm_router

F64 = torch.float64


def rand_x(B, T, dim, seed=0, dtype=torch.float32):
    return torch.randn(B, T, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def padding(B, T):
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[-1, :2] = False
    kpm[0, -1] = False
    return kpm


def randomize(m, names, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            p = getattr(m, n)
            if p is not None:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# ----------------------------------------------------------------------------------------------------
# MoH with every head active == MHA


@pytest.mark.parametrize(
    "dim, H, Hkv, hs",
    [(32, 4, None, 1), (32, 4, 2, 0), (48, 12, None, 0), (48, 12, None, 1), (48, 12, 4, 3), (40, 10, None, 4)],
)
def test_all_heads_active_equals_mha(dim, H, Hkv, hs):
    torch.manual_seed(0)
    mha = MultiHeadAttention(dim, H, num_kv_heads=Hkv, qkv_bias=True, qk_norm=True, rope=True)
    moh = mha_to_moh(mha, num_shared_heads=hs, top_k=H - hs)
    assert isinstance(moh, MoHAttention) and moh.top_k == H - hs
    x, kpm = rand_x(2, 7, dim), padding(2, 7)
    y_mha = mha(x, key_padding_mask=kpm)
    y_moh = moh(x, key_padding_mask=kpm)
    assert torch.all(moh.last_gates == 1)  # exactly 1: "a fresh MoH layer behaves like MHA"
    torch.testing.assert_close(y_moh, y_mha, atol=0, rtol=0)
    # the same by copying the state dict into a directly constructed MoH module
    moh2 = MoHAttention(dim, H, num_kv_heads=Hkv, qkv_bias=True, qk_norm=True, rope=True, num_shared_heads=hs,
                        top_k=H - hs)
    missing, unexpected = moh2.load_state_dict(mha.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("router_") for k in missing)
    torch.testing.assert_close(moh2(x, key_padding_mask=kpm), y_mha, atol=0, rtol=0)
    # qnorm router with every routed head active: binary gates all 1
    moh_q = mha_to_moh(mha, num_shared_heads=hs, top_k=H - hs, router="qnorm")
    torch.testing.assert_close(moh_q(x, key_padding_mask=kpm), y_mha, atol=0, rtol=0)


def test_mha_to_moh_partial_routing_equals_mha_on_active_heads():
    """With top_k < routed heads, a converted layer equals MHA with the inactive heads' output rows zeroed."""
    torch.manual_seed(0)
    dim, H, hs, k = 32, 4, 1, 2
    mha = MultiHeadAttention(dim, H)
    moh = mha_to_moh(mha, num_shared_heads=hs, top_k=k)
    x = rand_x(2, 6, dim)
    y = moh(x)
    g = moh.last_gates
    assert set(g.unique().tolist()) <= {0.0, 1.0} and torch.all(g.sum(-1) == hs + k)
    B, T = 2, 6
    q, kk, v, _q_raw = mha.project(x, torch.arange(T).expand(B, T))
    o = attnzoo.attention(q, kk, v, causal=True) * g[..., None]
    torch.testing.assert_close(y, mha.o_proj(o.reshape(B, T, dim)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hs, hr, k", [(0, 12, 12), (1, 11, 11), (3, 12, 7), (2, 10, 8), (12, 0, 0), (1, 3, 1),
                                       (5, 14, 13)])
def test_code_gates_exactly_one_at_init(hs, hr, k):
    H = hs + hr
    m = MoHAttention(4 * H, H, num_shared_heads=hs, top_k=k if hr else None)
    m(rand_x(2, 5, 4 * H))
    g = m.last_gates
    active = g != 0
    assert torch.all(g[active] == 1.0)
    assert torch.all(active[..., :hs])  # shared heads always active
    assert torch.all(active[..., hs:].sum(-1) == k)


# ----------------------------------------------------------------------------------------------------
# gates by hand


def gates_by_hand(x, w_r, w_s, w_h, k, normalize):
    x = x.double()
    code = normalize == "code"
    out = []
    a = None
    if w_h is not None:
        a = torch.softmax(x @ w_h.double().T, -1) * (2 if code else 1)
    if w_s is not None:
        hs = w_s.shape[0]
        g = torch.softmax(x @ w_s.double().T, -1) * (hs if code else 1)
        out.append(g * a[..., :1] if a is not None else g)
    p = torch.softmax(x @ w_r.double().T, -1)
    idx = p.topk(k, -1).indices
    sel = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
    g = torch.where(sel, p, 0.0)
    if code:
        g = k * g / g.sum(-1, keepdim=True)
    out.append(g * a[..., 1:] if a is not None else g)
    return torch.cat(out, -1), p, sel


@pytest.mark.parametrize("normalize", ["code", "paper"])
@pytest.mark.parametrize("hs, k", [(0, 2), (1, 2), (2, 1), (2, 3)])
def test_learned_router_gates_match_formula(normalize, hs, k):
    dim, H = 24, 6
    m = MoHAttention(dim, H, num_shared_heads=hs, top_k=k, normalize=normalize)
    randomize(m, ["router_routed", "router_shared", "router_mix"], scale=0.5)
    x = rand_x(2, 5, dim)
    m(x)
    want, _, sel = gates_by_hand(x, m.router_routed, m.router_shared, m.router_mix, k, normalize)
    torch.testing.assert_close(m.last_gates.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.equal(m.last_gates[..., hs:] != 0, sel)
    if normalize == "code" and hs:
        # routed gates of one token sum to k * a2, shared to h_s * a1, and a1 + a2 == 2
        a = torch.softmax(x.double() @ m.router_mix.double().T, -1) * 2
        torch.testing.assert_close(m.last_gates[..., hs:].double().sum(-1), k * a[..., 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.last_gates[..., :hs].double().sum(-1), hs * a[..., 0], atol=1e-5, rtol=1e-5)
    if normalize == "paper":
        # paper form: no renormalisation -- all gates of a token sum to at most a1 + a2 = 1
        assert torch.all(m.last_gates.sum(-1) <= 1 + 1e-6)


@pytest.mark.parametrize("form", ["code", "paper"])
@pytest.mark.parametrize("with_padding", [False, True])
def test_aux_loss_matches_spec_formula(form, with_padding):
    dim, H, hs, k = 32, 8, 2, 3
    m = MoHAttention(dim, H, num_shared_heads=hs, top_k=k, aux_loss_form=form)
    randomize(m, ["router_routed", "router_shared", "router_mix"], scale=0.7, seed=3)
    B, T = 2, 9
    x = rand_x(B, T, dim, seed=4)
    kpm = padding(B, T) if with_padding else None
    m(x, key_padding_mask=kpm)
    _, p, sel = gates_by_hand(x, m.router_routed, m.router_shared, m.router_mix, k, "code")
    real = kpm if with_padding else torch.ones(B, T, dtype=torch.bool)
    hr = H - hs
    n = int(real.sum())
    rows = [(b, t) for b in range(B) for t in range(T) if real[b, t]]
    P = [sum(float(p[b, t, i]) for b, t in rows) / n for i in range(hr)]
    f = [sum(float(sel[b, t, i]) for b, t in rows) / n for i in range(hr)]
    want = torch.tensor(sum(Pi * fi for Pi, fi in zip(P, f)) * (hr if form == "code" else 1), dtype=F64)
    torch.testing.assert_close(m.aux_loss.double(), want, atol=1e-6, rtol=1e-6)
    if with_padding:  # padding really is excluded: the unmasked loss differs
        m(x)
        assert abs(float(m.aux_loss) - float(want)) > 1e-6
        m(x, key_padding_mask=kpm)
    # the loss trains the router (through P)
    m.aux_loss.backward()
    assert m.router_routed.grad is not None and m.router_routed.grad.abs().sum() > 0


def test_aux_loss_uniform_router_value():
    """At init (uniform P = 1/h_r, each token selects k heads) sum_i P_i f_i = k / h_r; code form = k."""
    m = MoHAttention(32, 8, num_shared_heads=2, top_k=3)
    m(rand_x(2, 5, 32))
    torch.testing.assert_close(float(m.aux_loss), 3.0, atol=1e-6, rtol=0)
    m = MoHAttention(32, 8, num_shared_heads=2, top_k=3, aux_loss_form="paper")
    m(rand_x(2, 5, 32))
    torch.testing.assert_close(float(m.aux_loss), 3.0 / 6, atol=1e-6, rtol=0)


def test_load_balance_loss_function():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 5, generator=g), -1)
    sel = torch.zeros(2, 4, 5, dtype=torch.bool).scatter(-1, probs.topk(2, -1).indices, True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    P = probs[mask].mean(0)
    f = sel[mask].float().mean(0)
    torch.testing.assert_close(load_balance_loss(probs, sel, "paper", mask), (P * f).sum())
    torch.testing.assert_close(load_balance_loss(probs, sel, "code", mask), 5 * (P * f).sum())


# ----------------------------------------------------------------------------------------------------
# qnorm router


def test_qnorm_router_binary_topk_by_query_norm_and_straight_through():
    dim, H, hs, k = 32, 8, 2, 3
    torch.manual_seed(0)
    m = MoHAttention(dim, H, num_shared_heads=hs, top_k=k, router="qnorm", rope=True)
    assert not any(n.startswith("router_") for n, _ in m.named_parameters())
    B, T = 2, 6
    x = rand_x(B, T, dim)
    y = m(x)
    g = m.last_gates
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(g[..., :hs] == 1)
    # top-k of the routed heads' query norms (RoPE keeps norms, so the raw projection gives the same ranking)
    norms = m.q_proj(x).view(B, T, H, -1)[:, :, hs:].norm(dim=-1)
    want = torch.zeros_like(norms, dtype=torch.bool).scatter(-1, norms.topk(k, -1).indices, True)
    assert torch.equal(g[..., hs:] == 1, want)
    assert torch.isfinite(y).all()
    # the output equals dense attention times the binary gates
    q, kk, v, _q_raw = m.project(x, torch.arange(T).expand(B, T))
    o = attnzoo.attention(q, kk, v, causal=True) * g[..., None]
    torch.testing.assert_close(y, m.o_proj(o.reshape(B, T, dim)), atol=1e-6, rtol=1e-6)
    # straight-through: gradient of the gates reaches q_proj, equal to the gradient of the soft gates
    w = torch.randn(B, T, H, generator=torch.Generator().manual_seed(1))
    q, _, _, _q_raw = m.project(x, torch.arange(T).expand(B, T))
    gates = m.route(x, q)
    (gq,) = torch.autograd.grad((gates * w).sum(), m.q_proj.weight)
    assert gq.abs().sum() > 0
    q, _, _, _q_raw = m.project(x, torch.arange(T).expand(B, T))
    soft = k * torch.softmax(q[:, :, hs:].float().norm(dim=-1), -1)
    (gq_soft,) = torch.autograd.grad((soft * w[..., hs:]).sum(), m.q_proj.weight)
    torch.testing.assert_close(gq, gq_soft, atol=1e-6, rtol=1e-5)


def test_qnorm_router_function_values():
    q = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = qnorm_router(q, num_shared=1, top_k=2)
    assert out.gates.shape == (2, 3, 5)
    assert torch.all(out.gates[..., 0] == 1)
    assert torch.all(out.gates[..., 1:].sum(-1) == 2)
    assert torch.equal(out.selected, out.gates[..., 1:] == 1)
    out.gates.sum().backward()  # sum of soft gates is constant (k): gradient ~0 but defined
    assert torch.isfinite(q.grad).all()


def test_learned_router_function_no_shared():
    x = rand_x(1, 4, 8)
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    out = learned_router(x, w, None, None, top_k=2, normalize="code")
    want, p, sel = gates_by_hand(x, w, None, None, 2, "code")
    torch.testing.assert_close(out.gates.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.probs.double(), p, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.selected, sel)


# ----------------------------------------------------------------------------------------------------
# the functional core


@st.composite
def moh_case(draw):
    B = draw(st.integers(1, 2))
    Tq = draw(st.integers(1, 17))
    Tk = draw(st.integers(1, 17))
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    D = draw(st.sampled_from([4, 8, 16]))
    return B, Tq, Tk, H, Hkv, D, draw(st.booleans()), draw(st.integers(0, 1000))


@given(moh_case())
def test_moh_attention_equals_attention_times_gates(case):
    B, Tq, Tk, H, Hkv, D, causal, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, H, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, Tk, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, Tk, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    gates = (torch.rand(B, Tq, H, generator=g, dtype=F64) * (torch.rand(B, Tq, H, generator=g) < 0.6)).requires_grad_()
    kpm = torch.rand(B, Tk, generator=g) < 0.8
    o = attnzoo.moh_attention(q, k, v, gates, causal=causal, key_padding_mask=kpm)
    base = attnzoo.attention(q, k, v, causal=causal, key_padding_mask=kpm)
    ref = base * gates[..., None]
    torch.testing.assert_close(o, ref, atol=1e-12, rtol=1e-12)
    assert torch.all(o[gates == 0] == 0)  # inactive rows are 0
    do = torch.randn(o.shape, generator=g, dtype=F64)
    got = torch.autograd.grad(o, (q, k, v, gates), do)
    want = torch.autograd.grad(ref, (q, k, v), do)
    for a, b in zip(got[:3], want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    # dgate = rowsum(dO * O_unscaled) for active pairs; an inactive pair's attention is never computed, so
    # its gate gets no gradient (the contract a head-sparse kernel can keep)
    dgate = torch.where(gates != 0, (do * base.detach()).sum(-1), 0.0)
    torch.testing.assert_close(got[3], dgate, atol=1e-10, rtol=1e-9)


def test_qnorm_router_scores_queries_before_qk_norm():
    """QK-norm equalises query norms; the qnorm router must rank the projected queries before it."""
    torch.manual_seed(0)
    B, T, dim, H, hs, k = 2, 9, 32, 4, 1, 1
    m = attnzoo.MoHAttention(dim, H, num_shared_heads=hs, top_k=k, router="qnorm", qk_norm=True, rope=True)
    x = torch.randn(B, T, dim)
    m(x)
    norms = m.q_proj(x).view(B, T, H, -1)[:, :, hs:].norm(dim=-1)
    want = torch.zeros_like(norms, dtype=torch.bool).scatter(-1, norms.topk(k, -1).indices, True)
    assert torch.equal(m.last_gates[..., hs:] == 1, want)


def test_topk_ties_go_to_the_lower_head():
    from attnzoo.ops.moh.router import topk_mask

    mask = topk_mask(torch.zeros(3, 6), 3)
    assert mask.tolist() == [[True, True, True, False, False, False]] * 3
