"""Knocking-heads attention (SPEC §4): shared head_dim x head_dim matrices, identity at init (KHA == its base
exactly), exact folding of KHA-Linear, KHA-MLP's formula, and the per-head (not heads-by-heads) action."""

import pytest
import torch

import attnzoo
from attnzoo import DynamicMaskAttention, KnockingHeadsAttention, MoHAttention, MultiHeadAttention
from attnzoo.modules.knocking import KnockingHeads
from attnzoo.ops.knocking.reference import fold_linear_into_proj, kha_linear, kha_mlp

DIM, H = 32, 4
BASES = {
    "mha": (MultiHeadAttention, {}),
    "gqa": (MultiHeadAttention, dict(num_kv_heads=2)),
    "mqa": (MultiHeadAttention, dict(num_kv_heads=1)),
    "moh": (MoHAttention, dict(num_shared_heads=1, top_k=2)),
    "dma": (DynamicMaskAttention, dict(num_kv_heads=2, keep_window=3)),
}


def perturb(m, names=None, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if names is None or any(n.startswith(s) for s in names):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def inputs(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[-1, :2] = False
    return x, kpm


# B * T <= dim applies the matrices to the activations, B * T > dim folds them into the weights on the fly:
# test both
SIZES = [(2, 7), (2, 21)]


@pytest.mark.parametrize("B, T", SIZES)
@pytest.mark.parametrize("form", ["linear", "mlp"])
@pytest.mark.parametrize("base", list(BASES))
def test_kha_at_init_equals_base_exactly(base, form, B, T):
    cls, kw = BASES[base]
    torch.manual_seed(0)
    plain = cls(DIM, H, qkv_bias=True, qk_norm=True, rope=True, **kw)
    perturb(plain, ["A", "dt_proj", "router"])  # non-trivial DMA bias / MoH routing
    knocked = cls(DIM, H, qkv_bias=True, qk_norm=True, rope=True, knocking=form, **kw)
    missing, unexpected = knocked.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("knocking.") for k in missing)
    x, kpm = inputs(B, T)
    with torch.no_grad():
        torch.testing.assert_close(knocked(x, key_padding_mask=kpm), plain(x, key_padding_mask=kpm), atol=0, rtol=0)


@pytest.mark.parametrize("form", ["linear", "mlp"])
@pytest.mark.parametrize("kv", [None, 2, 1])
def test_knocking_heads_attention_entry_point_equals_mha_at_init(form, kv):
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, H, num_kv_heads=kv)
    kha = KnockingHeadsAttention(DIM, H, num_kv_heads=kv, knocking=form)
    kha.load_state_dict(mha.state_dict(), strict=False)
    x, kpm = inputs(2, 9)
    torch.testing.assert_close(kha(x, key_padding_mask=kpm), mha(x, key_padding_mask=kpm), atol=0, rtol=0)
    assert KnockingHeadsAttention(DIM, H).knocking.form == "linear"  # the default form


@pytest.mark.parametrize("B, T", SIZES)
@pytest.mark.parametrize("base", list(BASES))
def test_fold_linear_equals_unfolded(base, B, T):
    cls, kw = BASES[base]
    torch.manual_seed(0)
    m = cls(DIM, H, qkv_bias=True, qk_norm=True, rope=True, knocking="linear", dtype=torch.float64, **kw)
    perturb(m, ["knocking", "A", "dt_proj", "router"], scale=0.3)
    assert not torch.allclose(m.knocking.t_v, torch.eye(DIM // H, dtype=torch.float64))
    f = m.fold()
    assert f.knocking is None and not any("knocking" in n for n, _ in f.named_parameters())
    assert f is not m and m.knocking is not None  # the original is left alone
    x, kpm = inputs(B, T)
    x = x.double()
    torch.testing.assert_close(f(x, key_padding_mask=kpm), m(x, key_padding_mask=kpm), atol=1e-12, rtol=1e-10)
    # folding is not a no-op on the weights
    assert not torch.allclose(f.v_proj.weight, m.v_proj.weight)


@pytest.mark.parametrize("B, T", SIZES)
@pytest.mark.parametrize("kv", [None, 2])
def test_fold_mlp_keeps_the_mlp_and_folds_tq_tk(kv, B, T):
    torch.manual_seed(0)
    m = KnockingHeadsAttention(DIM, H, num_kv_heads=kv, knocking="mlp", qkv_bias=True, rope=True, dtype=torch.float64)
    perturb(m, ["knocking"], scale=0.3)
    f = m.fold()
    assert f.knocking is not None and f.knocking.form == "mlp"
    assert f.knocking.t_q is None and f.knocking.t_k is None
    for n in ("w_up", "w_gate", "w_down"):
        torch.testing.assert_close(getattr(f.knocking, n), getattr(m.knocking, n), atol=0, rtol=0)
    x, kpm = inputs(B, T)
    x = x.double()
    torch.testing.assert_close(f(x, key_padding_mask=kpm), m(x, key_padding_mask=kpm), atol=1e-12, rtol=1e-10)
    # T^Q/T^K went into q_proj/k_proj; v_proj is untouched (the MLP is not linear)
    assert not torch.allclose(f.q_proj.weight, m.q_proj.weight)
    torch.testing.assert_close(f.v_proj.weight, m.v_proj.weight, atol=0, rtol=0)


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_fold_with_convert_fold_and_knock_qk_false(kv):
    torch.manual_seed(0)
    m = KnockingHeadsAttention(DIM, H, num_kv_heads=kv, knock_qk=False, dtype=torch.float64)
    assert m.knocking.t_q is None and m.knocking.t_k is None
    perturb(m, ["knocking"], scale=0.3)
    f = attnzoo.convert.fold(m)
    x, _ = inputs(2, 6)
    x = x.double()
    torch.testing.assert_close(f(x), m(x), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(f.q_proj.weight, m.q_proj.weight, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# the matrices are head_dim x head_dim, shared by all heads


@pytest.mark.parametrize("form", ["linear", "mlp"])
def test_matrices_are_head_dim_square_and_independent_of_head_count(form):
    D = 8
    shapes = set()
    for heads, kv in [(2, 2), (4, 2), (8, 1)]:
        m = KnockingHeadsAttention(heads * D, heads, num_kv_heads=kv, knocking=form)
        for n, p in m.knocking.named_parameters():
            assert p.shape == (D, D), n
            shapes.add((n, tuple(p.shape)))
        n_params = sum(p.numel() for p in m.knocking.parameters())
        assert n_params == (3 if form == "linear" else 5) * D * D
    assert len(shapes) == (3 if form == "linear" else 5)


@pytest.mark.parametrize("form", ["linear", "mlp"])
def test_permuting_heads_commutes_with_knocking(form):
    D, Hq, Hk = 8, 4, 2
    kn = KnockingHeads(D, form)
    perturb(kn, scale=0.5)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, Hq, D, generator=g)
    k = torch.randn(2, 5, Hk, D, generator=g)
    v = torch.randn(2, 5, Hk, D, generator=g)
    pq, pk = torch.randperm(Hq, generator=g), torch.tensor([1, 0])
    a = kn(q, k, v)
    b = kn(q[:, :, pq], k[:, :, pk], v[:, :, pk])
    torch.testing.assert_close(b[0], a[0][:, :, pq], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b[1], a[1][:, :, pk], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b[2], a[2][:, :, pk], atol=1e-6, rtol=1e-6)
    # and each head's output depends on that head alone (no heads-by-heads mixing)
    q2 = q.clone()
    q2[:, :, 0] += 5.0
    c = kn(q2, k, v)
    torch.testing.assert_close(c[0][:, :, 1:], a[0][:, :, 1:], atol=0, rtol=0)


def test_kha_linear_and_mlp_formulas():
    g = torch.Generator().manual_seed(0)
    D = 6
    x = torch.randn(2, 3, 4, D, generator=g, dtype=torch.float64)
    t = torch.randn(D, D, generator=g, dtype=torch.float64)
    want = torch.stack([x[:, :, h] @ t for h in range(4)], dim=2)
    torch.testing.assert_close(kha_linear(x, t), want)
    up, gate, down = (torch.randn(D, D, generator=g, dtype=torch.float64) for _ in range(3))
    want = torch.stack([2 * (((x[:, :, h] @ up) * torch.sigmoid(x[:, :, h] @ gate)) @ down) for h in range(4)], dim=2)
    torch.testing.assert_close(kha_mlp(x, up, gate, down), want)
    # init values: identity up/down, zero gate -> V~ = V
    eye, zero = torch.eye(D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    torch.testing.assert_close(kha_mlp(x, eye, zero, eye), x, atol=0, rtol=0)


def test_fold_linear_into_proj_is_per_head_right_multiplication():
    g = torch.Generator().manual_seed(0)
    Hh, D, dim = 3, 4, 10
    lin = torch.nn.Linear(dim, Hh * D, dtype=torch.float64)
    t = torch.randn(D, D, generator=g, dtype=torch.float64)
    x = torch.randn(5, dim, generator=g, dtype=torch.float64)
    w, b = fold_linear_into_proj(lin.weight, lin.bias, t, Hh)
    want = (lin(x).view(5, Hh, D) @ t).reshape(5, Hh * D)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, b), want)


@pytest.mark.parametrize("T", [3, 20])
def test_module_applies_knocking_after_projection_on_kv_heads(T):
    """Q~ = Q T^Q on the H query heads; K~ = K T^K, V~ = V T^V on the Hkv kv heads (before norm/RoPE)."""
    torch.manual_seed(0)
    m = KnockingHeadsAttention(DIM, H, num_kv_heads=2, qkv_bias=True, dtype=torch.float64)
    perturb(m, ["knocking"], scale=0.3)
    B = 2
    x = torch.randn(B, T, DIM, dtype=torch.float64)
    q, k, v, _q_raw = m.project(x, torch.arange(T).expand(B, T))
    D = DIM // H
    kn = m.knocking
    torch.testing.assert_close(q, m.q_proj(x).view(B, T, H, D) @ kn.t_q)
    torch.testing.assert_close(k, m.k_proj(x).view(B, T, 2, D) @ kn.t_k)
    torch.testing.assert_close(v, m.v_proj(x).view(B, T, 2, D) @ kn.t_v)


@pytest.mark.parametrize("form", ["mlp", "linear"])
@pytest.mark.parametrize("kv_heads", [H, 2])
def test_kha_cache_stores_transformed_values(form, kv_heads):
    torch.manual_seed(0)
    m = KnockingHeadsAttention(DIM, H, num_kv_heads=kv_heads, knocking=form)
    perturb(m, ["knocking"], scale=0.3)
    x, _ = inputs(1, 5)
    cache = m.new_cache(1)
    with torch.no_grad():
        m(x, cache=cache)
        _, _, v, _q_raw = m.project(x, torch.arange(5).expand(1, 5))
        raw_v = m.v_proj(x).view(1, 5, kv_heads, -1)  # the projection before T^V
    torch.testing.assert_close(cache._bufs["v"][:, :5], v)
    assert (v - raw_v).abs().max() > 1e-2  # knocking changed V, so the check above can tell the two apart


def test_knocking_errors_name_the_argument():
    with pytest.raises(attnzoo.InputError) as e:
        KnockingHeadsAttention(DIM, H, knocking=None)
    assert "knocking" in str(e.value)
    with pytest.raises(attnzoo.InputError) as e:
        MultiHeadAttention(DIM, H, knocking="cubic")
    assert "knocking" in str(e.value)


@pytest.mark.parametrize("form", ["linear", "mlp"])
def test_knock_qk_false_keeps_value_transform_only(form):
    """T^Q and T^K are optional; the value transform is always there, and it acts."""
    m = KnockingHeadsAttention(DIM, H, num_kv_heads=2, knocking=form, knock_qk=False)
    names = {n.split(".")[-1] for n, _ in m.named_parameters() if "knock" in n}
    assert not names & {"t_q", "t_k"}
    assert names == ({"t_v"} if form == "linear" else {"w_up", "w_gate", "w_down"})
    perturb(m, ["knocking"], scale=0.3)
    base = MultiHeadAttention(DIM, H, num_kv_heads=2)
    base.load_state_dict({k: v for k, v in m.state_dict().items() if "knock" not in k})
    x, _ = inputs(1, 6)
    assert (m(x) - base(x)).abs().max() > 1e-3  # V is transformed even without T^Q/T^K
