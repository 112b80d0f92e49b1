"""``attnzoo.integrations.timm.convert`` on a tiny random timm ViT (2 blocks, dim 64, 4 heads, 17 tokens):
the converted model's logits and gradients equal the original's within SPEC §0's accuracy rule (the
original in fp64 is the reference, in fp32 the low-precision one), for qk-norm off, RMS and LayerNorm;
each variant that can equal the original at conversion does; a few optimizer steps lower the loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from timm.layers import RmsNorm  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo.errors import InputError  # noqa: E402
from attnzoo.integrations import timm as azt  # noqa: E402
from attnzoo.testing import assert_accuracy  # noqa: E402

TOKENS = 17  # 16 patches + the class token


def make_vit(qk_norm="off", seed=0, **kw):
    torch.manual_seed(seed)
    words = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10, qkv_bias=True)
    if qk_norm != "off":
        words["qk_norm"] = True
    if qk_norm == "rms":
        words["norm_layer"] = RmsNorm  # timm takes the qk-norm from the blocks' norm layer
    model = VisionTransformer(**words, **kw)
    with torch.no_grad():  # move every weight off its init (norm weights 1, biases 0) so copies are checked
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def images(seed=0, batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x.to(next(model.parameters()).dtype)).double()


def grads_by_timm_names(model):
    """Gradients keyed by the original timm model's parameter names: a converted module's q/k/v projections
    are concatenated back into timm's fused ``qkv``, ``o_proj`` is ``proj``; other names are unchanged."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and "_proj." not in name:
            out[name] = p.grad.double()
    for prefix, mod in model.named_modules():
        if isinstance(mod, attnzoo.MultiHeadAttention):
            for kind in ("weight", "bias"):
                parts = [getattr(getattr(mod, f"{n}_proj"), kind) for n in "qkv"]
                if parts[0] is not None:
                    out[f"{prefix}.qkv.{kind}"] = torch.cat([t.grad for t in parts]).double()
                if getattr(mod.o_proj, kind) is not None:
                    out[f"{prefix}.proj.{kind}"] = getattr(mod.o_proj, kind).grad.double()
    return out


def grads(model, x):
    model.zero_grad()
    model(x.to(next(model.parameters()).dtype)).logsumexp(-1).mean().backward()
    return grads_by_timm_names(model)


@pytest.mark.parametrize("qk_norm", ["off", "rms", "layer"])
def test_converted_vit_matches_logits_and_gradients(qk_norm):
    vit = make_vit(qk_norm)
    x = images()
    conv = azt.convert(copy.deepcopy(vit), "mha")
    attn = conv.blocks[0].attn
    assert isinstance(attn, attnzoo.MultiHeadAttention) and attn.o_proj.bias is not None
    want_norm = {"off": type(None), "rms": nn.RMSNorm, "layer": nn.LayerNorm}[qk_norm]
    assert isinstance(attn.q_norm, want_norm)
    hi = copy.deepcopy(vit).double()
    err, tol = assert_accuracy(logits(conv, x), logits(hi, x), logits(vit, x), "logits", torch.float32)
    print(f"qk_norm={qk_norm}: logits max err {err:.2e} (tol {tol:.2e})")
    g_out, g_hi, g_lo = grads(conv, x), grads(hi, x), grads(vit, x)
    assert g_out.keys() == g_hi.keys(), sorted(g_out.keys() ^ g_hi.keys())
    worst = max(assert_accuracy(g_out[n], g_hi[n], g_lo[n], n, torch.float32)[0] for n in g_hi)
    print(f"qk_norm={qk_norm}: gradient max err {worst:.2e}")


@pytest.mark.parametrize(
    "variant, options",
    [
        ("moh", dict(num_shared_heads=1, top_k=3)),  # every head active
        ("moh", dict(num_shared_heads=0, top_k=4, router="qnorm")),
        ("kha", dict(knocking="linear")),
        ("kha", dict(knocking="mlp")),
        ("dma", dict(keep_window=TOKENS)),
    ],
    ids=["moh-learned", "moh-qnorm", "kha-linear", "kha-mlp", "dma"],
)
def test_variants_equal_the_original_at_conversion(variant, options):
    vit = make_vit("layer")
    x = images()
    conv = azt.convert(copy.deepcopy(vit), variant, **options)
    assert isinstance(conv.blocks[1].attn, azt.VARIANTS[variant])
    err, tol = assert_accuracy(logits(conv, x), logits(copy.deepcopy(vit).double(), x), logits(vit, x), "logits",
                               torch.float32)
    print(f"{variant} {options}: logits max err {err:.2e} (tol {tol:.2e})")


@pytest.mark.parametrize(
    "variant, options",
    [("mha", {}), ("moh", dict(num_shared_heads=1, top_k=2)), ("kha", {}), ("dma", dict(keep_window=8))],
)
def test_training_lowers_the_loss(variant, options):
    vit = azt.convert(make_vit("rms"), variant, **options).train()
    x, y = images(batch=8), torch.arange(8) % 10
    opt = torch.optim.AdamW(vit.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(vit(x), y)
        if variant == "moh":
            loss = loss + 0.01 * sum(m.aux_loss for m in vit.modules() if isinstance(m, attnzoo.MoHAttention))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_refusals_name_the_problem():
    with pytest.raises(InputError, match="variant"):
        azt.convert(make_vit(), "lightning")
    gated = make_vit()
    gated.blocks[1].attn = timm.layers.Attention(64, 4, gated=True)
    with pytest.raises(InputError, match="blocks.1.attn: a gated"):
        azt.convert(gated, "mha")
    with pytest.raises(InputError, match="Sequential has no timm.layers.Attention"):
        azt.convert(nn.Sequential(nn.Linear(4, 4)), "mha")
    with pytest.raises(InputError, match="num_heads"):
        azt.convert(make_vit(), "mha", num_heads=2)
    conv = azt.convert(make_vit(), "mha")
    with pytest.raises(InputError, match="attn_mask"):
        conv.blocks[0].attn(torch.randn(1, TOKENS, 64), attn_mask=torch.ones(1, 1, TOKENS, TOKENS, dtype=torch.bool))


@pytest.mark.parametrize("bad", ["layernorm", 2, "RMS"])
def test_module_qk_norm_words_are_validated(bad):
    with pytest.raises(InputError, match="qk_norm"):
        attnzoo.MultiHeadAttention(64, 4, qk_norm=bad)
    with pytest.raises(InputError, match="out_bias"):
        attnzoo.MoHAttention(64, 4, out_bias="yes")


@pytest.mark.parametrize("qk_norm", [True, "rms", "layer"])
def test_module_words_survive_surgery_and_generation(qk_norm):
    """``out_bias`` and the qk-norm kind are constructor words: attnzoo.convert's rebuilds carry them, and a
    cached causal module with them gives the full forward's output token by token."""
    torch.manual_seed(0)
    mha = attnzoo.MultiHeadAttention(64, 4, qk_norm=qk_norm, out_bias=True, rope=True)
    want_norm = nn.LayerNorm if qk_norm == "layer" else nn.RMSNorm
    assert isinstance(mha.q_norm, want_norm) and mha.o_proj.bias is not None
    with torch.no_grad():
        mha.o_proj.bias.normal_()
        x = torch.randn(2, 9, 64)
        full = mha(x)
        moh = attnzoo.convert.mha_to_moh(mha, num_shared_heads=1, top_k=3)  # every head active
        gqa = attnzoo.convert.mha_to_gqa(mha, num_kv_heads=4)
        assert isinstance(moh.q_norm, want_norm) and torch.equal(moh.o_proj.bias, mha.o_proj.bias)
        assert (moh(x) - full).abs().max() < 1e-5 and (gqa(x) - full).abs().max() < 1e-5
        cache = mha.new_cache(2)
        steps = torch.cat([mha(x[:, t : t + 1], cache=cache) for t in range(9)], 1)
    assert (steps - full).abs().max() < 1e-5
