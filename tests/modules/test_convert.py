"""Checkpoint surgery (SPEC §2, §3): MHA -> GQA/MQA by mean pooling, WGQA (init == mean pooling, folds to
GQA), MHA -> MoH, and swapping modules inside a model."""

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import MoHAttention, MultiHeadAttention
from attnzoo import convert
from attnzoo.convert import fold, mha_to_gqa, mha_to_moh, mha_to_wgqa, swap_modules

DIM, H, D = 32, 4, 8
F64 = torch.float64


def mha(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {**dict(qkv_bias=True, rope=True, qk_norm=True, dtype=F64), **kw}
    return MultiHeadAttention(DIM, H, **kw)


def tie_kv_heads_within_groups(m, hkv):
    """Make every key/value head equal to the first head of its contiguous group (weights and biases)."""
    g = H // hkv
    with torch.no_grad():
        for proj in (m.k_proj, m.v_proj):
            w = proj.weight.view(H, D, DIM)
            b = proj.bias.view(H, D)
            for h in range(H):
                w[h] = w[(h // g) * g]
                b[h] = b[(h // g) * g]


def x_and_mask(B=2, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, DIM, generator=g, dtype=F64)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :3] = False
    return x, kpm


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("hkv", [2, 1])
def test_gqa_conversion_of_grouped_equal_heads_is_exact(hkv):
    src = mha()
    tie_kv_heads_within_groups(src, hkv)
    before = snapshot(src)
    gqa = mha_to_gqa(src, hkv)
    assert isinstance(gqa, MultiHeadAttention) and gqa.num_kv_heads == hkv
    assert gqa.k_proj.out_features == hkv * D and gqa.v_proj.out_features == hkv * D
    x, kpm = x_and_mask()
    torch.testing.assert_close(gqa(x, key_padding_mask=kpm), src(x, key_padding_mask=kpm), atol=1e-12, rtol=1e-10)
    # the source is untouched
    for k, v in src.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("hkv", [2, 1])
def test_gqa_conversion_mean_pools_each_contiguous_group(hkv):
    src = mha()
    gqa = mha_to_gqa(src, hkv)
    g = H // hkv
    for name in ("k_proj", "v_proj"):
        w = getattr(src, name).weight.view(H, D, DIM)
        b = getattr(src, name).bias.view(H, D)
        want_w = torch.stack([w[j * g : (j + 1) * g].mean(0) for j in range(hkv)]).reshape(hkv * D, DIM)
        want_b = torch.stack([b[j * g : (j + 1) * g].mean(0) for j in range(hkv)]).reshape(-1)
        torch.testing.assert_close(getattr(gqa, name).weight, want_w)
        torch.testing.assert_close(getattr(gqa, name).bias, want_b)
    # q/o projections and norms are copied as they are
    for name in ("q_proj.weight", "q_proj.bias", "o_proj.weight", "q_norm.weight", "k_norm.weight"):
        assert torch.equal(gqa.state_dict()[name], src.state_dict()[name])
    # with distinct heads the conversion does change the function (so the exact test above is meaningful)
    x, _ = x_and_mask()
    assert (gqa(x) - src(x)).abs().max() > 1e-3


@pytest.mark.parametrize("hkv", [2, 1])
def test_wgqa_starts_as_mean_pooling(hkv):
    src = mha()
    wg = mha_to_wgqa(src, hkv)
    assert wg.kv_weights == "wgqa" and wg.num_kv_heads == hkv
    torch.testing.assert_close(wg.k_mix, torch.full((H,), hkv / H, dtype=F64))
    torch.testing.assert_close(wg.v_mix, torch.full((H,), hkv / H, dtype=F64))
    # it keeps one K/V projection per original head
    assert wg.k_proj.out_features == H * D
    x, kpm = x_and_mask()
    ref = mha_to_gqa(src, hkv)
    torch.testing.assert_close(wg(x, key_padding_mask=kpm), ref(x, key_padding_mask=kpm), atol=1e-12, rtol=1e-10)
    # and folding an untrained WGQA module gives the mean-pooled GQA weights
    f = wg.fold()
    torch.testing.assert_close(f.k_proj.weight, ref.k_proj.weight, atol=1e-14, rtol=0)
    torch.testing.assert_close(f.v_proj.bias, ref.v_proj.bias, atol=1e-14, rtol=0)


@pytest.mark.parametrize("hkv", [2, 1])
def test_fold_of_trained_wgqa_equals_it(hkv):
    wg = mha_to_wgqa(mha(), hkv)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        wg.k_mix.copy_(torch.randn(H, generator=g, dtype=F64))
        wg.v_mix.copy_(torch.randn(H, generator=g, dtype=F64))
    for f in (wg.fold(), fold(wg)):
        assert f.kv_weights is None and not hasattr(f, "k_mix") and not hasattr(f, "v_mix")
        assert f.k_proj.out_features == hkv * D
        assert sum(p.numel() for p in f.parameters()) == sum(p.numel() for p in mha_to_gqa(mha(), hkv).parameters())
        x, kpm = x_and_mask()
        torch.testing.assert_close(f(x, key_padding_mask=kpm), wg(x, key_padding_mask=kpm), atol=1e-12, rtol=1e-10)
        # a trained mix differs from mean pooling
        assert (f(x) - mha_to_gqa(mha(), hkv)(x)).abs().max() > 1e-3
    # the weighted sum, by hand: kv head j = sum_{i in G_j} w_i K_i
    grp = H // hkv
    w = wg.k_proj.weight.view(H, D, DIM)
    want = torch.stack([sum(wg.k_mix[i] * w[i] for i in range(j * grp, (j + 1) * grp)) for j in range(hkv)])
    torch.testing.assert_close(wg.fold().k_proj.weight, want.reshape(hkv * D, DIM))


def test_wgqa_trains_its_mixing_weights():
    wg = mha_to_wgqa(mha(), 2)
    x, _ = x_and_mask()
    wg(x).square().sum().backward()
    assert wg.k_mix.grad.abs().sum() > 0 and wg.v_mix.grad.abs().sum() > 0


def test_wgqa_module_constructed_directly_with_equal_heads_equals_gqa():
    torch.manual_seed(0)
    wg = MultiHeadAttention(DIM, H, num_kv_heads=2, kv_weights="wgqa", dtype=F64)
    x, _ = x_and_mask()
    f = wg.fold()
    torch.testing.assert_close(f(x), wg(x), atol=1e-12, rtol=1e-10)


def test_mha_to_moh_copies_weights_and_leaves_source_alone():
    src = mha()
    before = snapshot(src)
    moh = mha_to_moh(src, num_shared_heads=2, top_k=1)
    assert isinstance(moh, MoHAttention)
    assert moh.num_shared_heads == 2 and moh.top_k == 1 and moh.num_routed_heads == 2
    for k, v in src.state_dict().items():
        assert torch.equal(moh.state_dict()[k], v)
        assert torch.equal(v, before[k])
    assert moh.router_routed.dtype == F64 and torch.all(moh.router_routed == 0)
    x, _ = x_and_mask()
    moh(x)
    assert torch.all(moh.last_gates[..., :2] == 1)


def test_gqa_conversion_of_knocking_module_with_equal_heads():
    """T^K/T^V are shared by all heads, so pooling commutes with KHA-Linear."""
    torch.manual_seed(0)
    src = attnzoo.KnockingHeadsAttention(DIM, H, qkv_bias=True, dtype=F64)
    with torch.no_grad():
        for p in src.knocking.parameters():
            p.add_(0.2 * torch.randn_like(p))
    tie_kv_heads_within_groups(src, 2)
    gqa = mha_to_gqa(src, 2)
    assert gqa.knocking is not None
    x, kpm = x_and_mask()
    torch.testing.assert_close(gqa(x, key_padding_mask=kpm), src(x, key_padding_mask=kpm), atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------
# module swapping


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM, dtype=F64)
        self.attn = mha()

    def forward(self, x):
        return x + self.attn(self.norm(x))


def test_swap_modules_in_sequential_and_modulelist():
    model = nn.Sequential(Block(), nn.Linear(DIM, DIM, dtype=F64), Block())
    listed = nn.ModuleList([mha(), nn.ReLU(), mha(seed=1)])
    for m in (*[b.attn for b in (model[0], model[2])], listed[0], listed[2]):
        tie_kv_heads_within_groups(m, 2)
    x, _ = x_and_mask()
    want = model(x)
    old = [model[0].attn, model[2].attn]

    def conv(m):
        return mha_to_gqa(m, 2) if isinstance(m, MultiHeadAttention) else None

    assert swap_modules(model, conv) is model
    assert swap_modules(listed, conv) is listed
    for m in (model[0].attn, model[2].attn, listed[0], listed[2]):
        assert isinstance(m, MultiHeadAttention) and m.num_kv_heads == 2
    assert model[0].attn is not old[0] and model[2].attn is not old[1]
    assert isinstance(model[1], nn.Linear) and isinstance(listed[1], nn.ReLU)
    assert isinstance(model[0].norm, nn.LayerNorm)
    torch.testing.assert_close(model(x), want, atol=1e-12, rtol=1e-10)
    # the swapped modules are registered: they show up in parameters() / state_dict()
    assert sum(1 for n in model.state_dict() if n.endswith("attn.k_proj.weight")) == 2
    assert all(model.state_dict()[f"{i}.attn.k_proj.weight"].shape == (2 * D, DIM) for i in (0, 2))


def test_swap_modules_does_not_recurse_into_replacements():
    model = nn.Sequential(mha())
    calls = []

    def conv(m):
        calls.append(type(m).__name__)
        return mha_to_moh(m, num_shared_heads=1, top_k=3) if type(m) is MultiHeadAttention else None

    swap_modules(model, conv)
    assert isinstance(model[0], MoHAttention)
    assert calls.count("MultiHeadAttention") == 1


# ----------------------------------------------------------------------------------------------------
# errors


def test_converter_errors_name_the_argument():
    with pytest.raises(attnzoo.InputError) as e:
        mha_to_gqa(mha(), 3)
    assert "num_kv_heads" in str(e.value)
    with pytest.raises(attnzoo.InputError) as e:
        mha_to_wgqa(mha(), 0)
    assert "num_kv_heads" in str(e.value)
    with pytest.raises(attnzoo.InputError) as e:
        mha_to_gqa(mha(num_kv_heads=2), 1)  # already GQA
    assert "module" in str(e.value)
    with pytest.raises(attnzoo.InputError) as e:
        mha_to_gqa(nn.Linear(4, 4), 1)
    assert "module" in str(e.value)
    with pytest.raises(attnzoo.InputError) as e:
        mha_to_moh(mha(), num_shared_heads=1, top_k=4)
    assert "top_k" in str(e.value)


def test_folded_kha_is_a_plain_mha_that_converts():
    folded = convert.fold(attnzoo.KnockingHeadsAttention(64, 4))
    assert type(folded) is attnzoo.MultiHeadAttention
    x = torch.randn(1, 5, 64)
    assert convert.mha_to_gqa(folded, 2)(x).shape == x.shape


def test_dma_is_not_silently_converted():
    dma = attnzoo.DynamicMaskAttention(64, 4, keep_window=3, bias_form="exp")
    for fn in (lambda m: convert.mha_to_gqa(m, 2), lambda m: convert.mha_to_wgqa(m, 2), lambda m: convert.mha_to_moh(m, 1, 2)):
        with pytest.raises(attnzoo.InputError, match="^module"):
            fn(dma)
