"""Tiny random transformers models built from configs (2 layers, hidden 64, vocab 128): nothing is
downloaded."""

from __future__ import annotations

import torch

VOCAB = 128
PROMPT_LEN = 12
PAD = 4  # left padding of the second row in padded prompts


def make_config(name: str, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if name == "llama":
        cfg = tf.LlamaConfig(**{**common, **overrides})
    elif name == "mistral":  # a window shorter than the prompt, so it matters
        cfg = tf.MistralConfig(**{**common, "sliding_window": 5, **overrides})
    elif name == "qwen2":  # layer 0 full attention, layer 1 sliding
        cfg = tf.Qwen2Config(**{**common, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1,
                                **overrides})
    elif name == "qwen3":
        cfg = tf.Qwen3Config(**{**common, "head_dim": 16, **overrides})
    else:
        raise ValueError(name)
    return cfg


def make_model(name: str, seed: int = 0, **overrides):
    import transformers as tf

    cfg = make_config(name, **overrides)
    cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "qwen3": tf.Qwen3ForCausalLM}[name]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model


def prompt(padded: bool, batch: int = 2, seed: int = 0):
    """``(input_ids, attention_mask)``; with ``padded`` the second row is left-padded by ``PAD`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, PROMPT_LEN), generator=g)
    mask = torch.ones(batch, PROMPT_LEN, dtype=torch.long)
    if padded:
        mask[1, :PAD] = 0
        ids[1, :PAD] = 0
    return ids, mask
