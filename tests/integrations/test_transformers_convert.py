"""``attnzoo.integrations.transformers.convert`` on tiny random Llama, Mistral (sliding window), Qwen2
(one full, one sliding layer) and Qwen3 (qk-norm) models built from configs: every variant that can equal
the original at conversion does (logits within SPEC §0's accuracy rule, a left-padded batch), generation
with a cache (Dynamic and Static) gives the tokens of generation without one, and a few optimizer steps
lower the loss."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import attnzoo  # noqa: E402
from attnzoo.errors import InputError  # noqa: E402
from attnzoo.integrations import transformers as azt  # noqa: E402
from attnzoo.testing import assert_accuracy  # noqa: E402

from hf_models import PROMPT_LEN, make_model, prompt  # noqa: E402

KV = 4  # the convert tests use MHA checkpoints (kv heads = heads), as GQA conversion starts from one
EXACT = [
    ("mha", {}),
    ("gqa", dict(num_kv_heads=4)),  # num_kv_heads = heads
    ("moh", dict(num_shared_heads=1, top_k=3)),  # every head active, qnorm router (binary gates)
    ("moh", dict(num_shared_heads=2, top_k=2, router="learned")),
    ("kha", dict(knocking="linear")),
    ("kha", dict(knocking="mlp")),
    ("dma", dict(keep_window=64)),  # keep_window >= length, zero bias
]
EXACT_IDS = ["mha", "gqa", "moh-qnorm", "moh-learned", "kha-linear", "kha-mlp", "dma"]


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double()


@pytest.mark.parametrize("variant, options", EXACT, ids=EXACT_IDS)
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3"])
def test_variant_equals_the_original_at_conversion(name, variant, options):
    base = make_model(name, num_key_value_heads=KV)
    base.set_attn_implementation("sdpa")
    options = dict(options)
    if variant == "dma" and name == "mistral":
        options["keep_window"] = base.config.sliding_window  # at init DMA is a sliding window of keep_window
    if variant == "dma" and name == "qwen2":
        options["layers"] = [0]  # the full-attention layer (a DMA layer replaces a sliding one's window)
    ids, mask = prompt(True)
    conv = azt.convert(copy.deepcopy(base), variant, **options)
    kinds = {type(layer.self_attn).__name__ for layer in conv.model.layers}
    assert azt.HF_CLASSES[variant].__name__ in kinds, kinds
    keep = mask.bool()
    out = logits(conv, ids, mask)[keep]
    hi = logits(copy.deepcopy(base).double(), ids, mask)[keep]
    lo = logits(base, ids, mask)[keep]
    err, tol = assert_accuracy(out, hi, lo, f"{name} {variant} logits", torch.float32)
    print(f"{name} {variant} {options}: max err {err:.2e} (tol {tol:.2e})")


GENERATE = [
    ("llama", "mha", {}),
    ("llama", "gqa", dict(num_kv_heads=2)),
    ("llama", "gqa", dict(num_kv_heads=1, kv_weights="wgqa")),
    ("llama", "moh", dict(num_shared_heads=1, top_k=1)),
    ("llama", "moh", dict(num_shared_heads=1, top_k=2, router="learned")),
    ("llama", "kha", dict(knocking="mlp")),
    ("llama", "dma", dict(keep_window=4)),
    ("llama", "lightning", dict(layers=[0])),  # a 1:1 hybrid of the two layers
    ("mistral", "moh", dict(num_shared_heads=1, top_k=2)),
    ("qwen2", "dma", dict(keep_window=4)),
    ("qwen3", "kha", {}),
]


@pytest.mark.parametrize("name, variant, options", GENERATE, ids=[f"{n}-{v}-{i}" for i, (n, v, _) in enumerate(GENERATE)])
def test_generate_with_cache_equals_without(name, variant, options):
    model = azt.convert(make_model(name, num_key_value_heads=KV), variant, **options)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ids, mask = prompt(True)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
        dynamic = model.generate(ids, attention_mask=mask, **kw)
        static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert want.shape[1] == PROMPT_LEN + 6
    assert torch.equal(dynamic, want), (dynamic.tolist(), want.tolist())
    assert torch.equal(static, want), (static.tolist(), want.tolist())


@pytest.mark.parametrize(
    "variant, options",
    [("gqa", dict(num_kv_heads=2, kv_weights="wgqa")), ("moh", dict(num_shared_heads=1, top_k=2)),
     ("kha", {}), ("dma", dict(keep_window=4)), ("lightning", dict(layers=[0]))],
)
def test_training_lowers_the_loss(variant, options):
    torch.manual_seed(0)
    model = azt.convert(make_model("llama", num_key_value_heads=KV), variant, **options).train()
    ids, mask = prompt(True, batch=4)
    labels = ids.masked_fill(~mask.bool(), -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        aux = [m.aux_loss for m in model.modules() if isinstance(m, attnzoo.MoHAttention) and m.aux_loss is not None]
        if aux:
            loss = loss + 0.01 * torch.stack(aux).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_wgqa_starts_as_mean_pooled_gqa():
    ids, mask = prompt(True)
    gqa = azt.convert(make_model("llama", num_key_value_heads=KV), "gqa", num_kv_heads=2)
    wgqa = azt.convert(make_model("llama", num_key_value_heads=KV), "gqa", num_kv_heads=2, kv_weights="wgqa")
    assert wgqa.model.layers[0].self_attn.kv_weights == "wgqa"
    assert (logits(gqa, ids, mask) - logits(wgqa, ids, mask))[mask.bool()].abs().max() < 1e-5


def test_refusals_name_the_problem():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64))
    with pytest.raises(InputError, match="GPT2Attention"):
        azt.convert(gpt2, "mha")
    with pytest.raises(InputError, match="variant"):
        azt.convert(make_model("llama"), "sparse")
    with pytest.raises(InputError, match="num_heads"):
        azt.convert(make_model("llama"), "mha", num_heads=2)
    with pytest.raises(InputError, match="num_kv_heads"):
        azt.convert(make_model("llama", num_key_value_heads=KV), "gqa", num_kv_heads=3)
    with pytest.raises(InputError, match="layers"):
        azt.convert(make_model("mistral"), "dma", keep_window=4, layers=[0])
