"""``attn_implementation="attnzoo"`` against ``"sdpa"`` on tiny random Llama, Mistral (sliding window) and
Qwen2 models built from configs (nothing downloaded): logits within SPEC §0's accuracy rule (fp64 SDPA is
the reference, SDPA in the test's dtype the low-precision one), the same greedy tokens with DynamicCache
and StaticCache, and gradients of a training step."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnzoo.errors import InputError  # noqa: E402
from attnzoo.integrations import transformers as azt  # noqa: E402
from attnzoo.testing import assert_accuracy  # noqa: E402

from hf_models import PROMPT_LEN, VOCAB, make_model, prompt  # noqa: E402

azt.register()

MODELS = ["llama", "mistral", "qwen2"]


def with_impl(model, impl):
    model.set_attn_implementation(impl)
    return model


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double()


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left_padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_matches_sdpa(name, dtype, padded):
    base = make_model(name)
    ids, mask = prompt(padded)
    ref_hi = logits(with_impl(copy.deepcopy(base).double(), "sdpa"), ids, mask)
    low = base.to(dtype)
    ref_lo = logits(with_impl(low, "sdpa"), ids, mask)
    out = logits(with_impl(low, "attnzoo"), ids, mask)
    keep = mask.bool()  # padded positions' logits are meaningless under either implementation
    err, tol = assert_accuracy(out[keep], ref_hi[keep], ref_lo[keep], f"{name} logits", dtype)
    print(f"{name} {dtype} padded={padded}: max err {err:.2e} (tol {tol:.2e})")


def assert_same_tokens(model, got, want, mask, dtype, what):
    """Greedy tokens must be equal. In fp16 a step whose two best tokens are closer than fp16 SDPA's own
    logit error (a tie at that precision; SDPA and attnzoo may break it differently) may differ: the
    first divergence must be such a tie under the fp64 model, judged by the accuracy rule."""
    if torch.equal(got, want):
        return
    assert dtype != torch.float32, f"{what}: {got.tolist()} != {want.tolist()}"
    diff = (got != want).any(0).nonzero()
    t = int(diff[0])
    rows = (got[:, t] != want[:, t]).nonzero().flatten()
    prefix = got[:, :t]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], t - mask.shape[1], dtype=mask.dtype)], 1)
    hi = logits(with_impl(copy.deepcopy(model).double(), "sdpa"), prefix, full_mask)[:, -1]
    lo = logits(with_impl(model, "sdpa"), prefix, full_mask)[:, -1]
    for r in rows.tolist():
        gap = (hi[r, got[r, t]] - hi[r, want[r, t]]).abs().item()
        tie = 2 * (lo[r] - hi[r]).abs().max().item() + 1e-3
        assert gap <= tie, f"{what}: token {t} of row {r} differs ({got[r, t]} vs {want[r, t]}) with an fp64 gap {gap:.2e} > {tie:.2e}"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_generate_same_tokens(name, dtype, cache):
    model = make_model(name).to(dtype)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    for padded in (False, True):
        ids, mask = prompt(padded)
        with torch.no_grad():
            want = with_impl(model, "sdpa").generate(ids, attention_mask=mask, **kw)
            got = with_impl(model, "attnzoo").generate(ids, attention_mask=mask, **kw)
        assert_same_tokens(model, got, want, mask, dtype, f"{name} {cache} padded={padded}")


@pytest.mark.parametrize("name", MODELS)
def test_training_step_gradients(name):
    torch.manual_seed(1)
    ids, mask = prompt(True)
    labels = ids.masked_fill(~mask.bool(), -100)

    def grads(model, impl):
        model = with_impl(model, impl).train()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    base = make_model(name)
    hi = grads(copy.deepcopy(base).double(), "sdpa")
    lo = grads(copy.deepcopy(base), "sdpa")
    out = grads(base, "attnzoo")
    assert out.keys() == hi.keys()
    worst = max((assert_accuracy(out[n], hi[n], lo[n], n, torch.float32)[0] for n in hi))
    print(f"{name}: max gradient error {worst:.2e}")


def test_register_puts_the_mask_function_beside_the_attention_function():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert azt.register() == "attnzoo"
    assert AttentionInterface._global_mapping["attnzoo"] is azt.attnzoo_attention_forward
    assert AttentionMaskInterface._global_mapping["attnzoo"] is azt.attnzoo_mask
    from hf_models import make_config

    model = transformers.AutoModelForCausalLM.from_config(make_config("qwen2"), attn_implementation="attnzoo")
    assert model.config._attn_implementation == "attnzoo"


def test_left_padded_batch_reaches_attnzoo_with_a_mask(monkeypatch):
    """The bug of the issue: with the attention function alone registered, transformers passed
    attention_mask=None and a left-padded batch was silently wrong."""
    seen = []
    real = azt._attend

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append(attention_mask)
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(azt, "_attend", spy)
    model = with_impl(make_model("llama"), "attnzoo")
    ids, mask = prompt(True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert seen and all(m is not None and m.dtype == torch.bool for m in seen)


def test_decode_steps_use_attention_with_kvcache(monkeypatch):
    calls = []
    real = azt.attention_with_kvcache
    monkeypatch.setattr(azt, "attention_with_kvcache", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = with_impl(make_model("llama"), "attnzoo")
    ids, mask = prompt(False)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 2 * 2  # 2 decode steps after the prefill, 2 layers


def test_static_cache_prefill_sees_only_filled_slots():
    """An empty StaticCache hands over its whole capacity as keys with no mask (top-left causal); the
    result must equal a prefill without a cache."""
    model = with_impl(make_model("llama"), "attnzoo")
    ids, mask = prompt(False)
    cache = transformers.StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    assert (got - want).abs().max().item() < 1e-5


def test_compiled_training_step_matches_eager():
    """Dynamo traces a training step through attnzoo without a graph break (``fullgraph=True``, a left-padded
    batch); the "aot_eager" compiler backend traces forward and backward yet keeps the test to seconds on a
    CPU (inductor's code generation is torch's business)."""
    torch._dynamo.reset()
    model = with_impl(make_model("llama"), "attnzoo").train()
    eager = copy.deepcopy(model)
    ids, mask = prompt(True)
    labels = ids.masked_fill(~mask.bool(), -100)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = compiled(input_ids=ids, attention_mask=mask, labels=labels).loss
    want = eager(input_ids=ids, attention_mask=mask, labels=labels).loss
    got.backward()
    want.backward()
    assert (got - want).abs().item() < 1e-5
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-5, name


def test_unsupported_features_raise():
    model = with_impl(make_model("llama", attention_dropout=0.1), "attnzoo").train()
    ids, _ = prompt(False)
    with pytest.raises(InputError, match="dropout"):
        model(input_ids=ids)
    assert VOCAB and PROMPT_LEN
