"""Modules trace with torch.compile(fullgraph=True): backend choice happens in Python before any op, so
dispatch, validation and the cache leave no graph break. ``aot_eager`` checks the trace (forward and
backward) without spending CI minutes on code generation."""

import pytest
import torch

import attnzoo as az


@pytest.mark.parametrize(
    "make",
    [
        lambda: az.MultiHeadAttention(32, 4, 2, rope=True, qk_norm=True, knocking="mlp", kv_weights="wgqa"),
        lambda: az.MoHAttention(32, 4, 2, num_shared_heads=1, top_k=2, rope=True),
        lambda: az.DynamicMaskAttention(32, 4, 2, keep_window=4),
    ],
    ids=["mha-gqa-wgqa-kha", "moh", "dma"],
)
def test_fullgraph_forward_backward(make):
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, 7, 32)
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :2] = False
    ref = m(x, key_padding_mask=pad)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), m.q_proj.weight)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = cm(x, key_padding_mask=pad)
    (g,) = torch.autograd.grad(out.square().sum(), m.q_proj.weight)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
