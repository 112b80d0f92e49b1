"""Bad input gets an attnzoo.InputError naming the argument, before any compute (DESIGN: "Bad input gets a
clear error naming the argument, the shape or dtype it got and what it needs"); forcing a backend that cannot
run raises BackendUnavailableError listing, per backend, why not."""

import pytest
import torch

import attnzoo
from attnzoo import backends
from attnzoo import DynamicMaskAttention, KnockingHeadsAttention, MoHAttention, MultiHeadAttention
from attnzoo.ops.masks import block_mask as M

B, T, H, HKV, D = 2, 5, 4, 2, 8


def assert_names(err, name):
    """The message leads with the argument's name ("k: has 2 heads, ..."): a bare substring test would
    let single letters like "k" match anywhere."""
    msg = str(err.value)
    assert msg.startswith(name), f"expected the message to name {name!r}: {msg!r}"


def qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, T, H, D, generator=g, dtype=dtype),
        torch.randn(B, T, HKV, D, generator=g, dtype=dtype),
        torch.randn(B, T, HKV, D, generator=g, dtype=dtype),
    )


def packed(n=7):
    return torch.randn(n, H, D), torch.randn(n, HKV, D), torch.randn(n, HKV, D)


def cu(*vals, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype)


q0, k0, v0 = qkv()
pq, pk, pv = packed()

# (id, argument name expected in the message, call)
ATTENTION_CASES = [
    ("q_rank", "q", lambda: attnzoo.attention(q0[0], k0, v0)),
    ("k_rank", "k", lambda: attnzoo.attention(q0, k0[None], v0)),
    ("v_rank", "v", lambda: attnzoo.attention(q0, k0, v0[0])),
    ("q_not_tensor", "q", lambda: attnzoo.attention(q0.tolist(), k0, v0)),
    ("q_int_dtype", "q", lambda: attnzoo.attention(q0.long(), k0, v0)),
    ("heads_not_dividing", "k", lambda: attnzoo.attention(torch.randn(B, T, 3, D), k0, v0)),
    ("kv_heads_mismatch", "v", lambda: attnzoo.attention(q0, k0, torch.randn(B, T, 1, D))),
    ("dtype_mismatch_k", "k", lambda: attnzoo.attention(q0, k0.double(), v0)),
    ("dtype_mismatch_v", "v", lambda: attnzoo.attention(q0, k0, v0.half())),
    ("device_mismatch_k", "k", lambda: attnzoo.attention(q0, k0.to("meta"), v0)),
    ("device_mismatch_v", "v", lambda: attnzoo.attention(q0, k0, v0.to("meta"))),
    ("head_dim_512", "q", lambda: attnzoo.attention(*(torch.randn(1, 2, 1, 512) for _ in range(3)))),
    ("k_head_dim", "k", lambda: attnzoo.attention(q0, torch.randn(B, T, HKV, 4), v0)),
    ("batch_mismatch", "k", lambda: attnzoo.attention(q0, k0[:1], v0[:1])),
    ("cu_not_start_0", "cu_seqlens_q", lambda: attnzoo.attention(pq, pk, pv, cu_seqlens_q=cu(1, 7), cu_seqlens_k=cu(0, 7))),
    ("cu_decreasing", "cu_seqlens_q", lambda: attnzoo.attention(pq, pk, pv, cu_seqlens_q=cu(0, 5, 3, 7), cu_seqlens_k=cu(0, 2, 3, 7))),
    ("cu_wrong_total", "cu_seqlens_k", lambda: attnzoo.attention(pq, pk, pv, cu_seqlens_q=cu(0, 7), cu_seqlens_k=cu(0, 6))),
    ("cu_wrong_dtype", "cu_seqlens_q", lambda: attnzoo.attention(pq, pk, pv, cu_seqlens_q=cu(0, 7, dtype=torch.float32), cu_seqlens_k=cu(0, 7))),
    ("cu_2d", "cu_seqlens_k", lambda: attnzoo.attention(pq, pk, pv, cu_seqlens_q=cu(0, 7), cu_seqlens_k=cu(0, 7)[None])),
    ("cu_only_one", "cu_seqlens", lambda: attnzoo.attention(pq, pk, pv, cu_seqlens_q=cu(0, 7))),
    ("cu_count_mismatch", "cu_seqlens_k", lambda: attnzoo.attention(pq, pk, pv, cu_seqlens_q=cu(0, 7), cu_seqlens_k=cu(0, 3, 7))),
    ("varlen_4d_q", "q", lambda: attnzoo.attention(q0, k0, v0, cu_seqlens_q=cu(0, 5), cu_seqlens_k=cu(0, 5))),
    ("varlen_with_bias", "bias", lambda: attnzoo.attention(pq, pk, pv, cu_seqlens_q=cu(0, 7), cu_seqlens_k=cu(0, 7), bias=torch.zeros(1, 1, 7, 7))),
    ("bias_heads_3", "bias", lambda: attnzoo.attention(q0, k0, v0, bias=torch.zeros(B, 3, T, T))),
    ("bias_batch_3", "bias", lambda: attnzoo.attention(q0, k0, v0, bias=torch.zeros(3, 1, T, T))),
    ("bias_tq", "bias", lambda: attnzoo.attention(q0, k0, v0, bias=torch.zeros(1, 1, T + 1, T))),
    ("bias_tk_1", "bias", lambda: attnzoo.attention(q0, k0, v0, bias=torch.zeros(1, 1, T, 1))),
    ("bias_rank3", "bias", lambda: attnzoo.attention(q0, k0, v0, bias=torch.zeros(H, T, T))),
    ("bias_device", "bias", lambda: attnzoo.attention(q0, k0, v0, bias=torch.zeros(1, 1, T, T, device="meta"))),
    ("mask_float", "mask", lambda: attnzoo.attention(q0, k0, v0, mask=torch.ones(1, 1, T, T))),
    ("mask_shape", "mask", lambda: attnzoo.attention(q0, k0, v0, mask=torch.ones(1, 1, T, T + 2, dtype=torch.bool))),
    ("kpm_shape", "key_padding_mask", lambda: attnzoo.attention(q0, k0, v0, key_padding_mask=torch.ones(B, T + 1, dtype=torch.bool))),
    ("kpm_transposed", "key_padding_mask", lambda: attnzoo.attention(q0, torch.randn(B, 3, HKV, D), torch.randn(B, 3, HKV, D), key_padding_mask=torch.ones(3, B, dtype=torch.bool))),
    ("kpm_float", "key_padding_mask", lambda: attnzoo.attention(q0, k0, v0, key_padding_mask=torch.ones(B, T))),
    ("kpm_rank", "key_padding_mask", lambda: attnzoo.attention(q0, k0, v0, key_padding_mask=torch.ones(B, 1, 1, T, dtype=torch.bool))),
    ("window_neg", "window", lambda: attnzoo.attention(q0, k0, v0, window=(-2, 0))),
    ("window_len", "window", lambda: attnzoo.attention(q0, k0, v0, window=(3,))),
    ("window_float", "window", lambda: attnzoo.attention(q0, k0, v0, window=(1.5, 0))),
    ("window_int", "window", lambda: attnzoo.attention(q0, k0, v0, window=4)),
    ("scale_neg", "scale", lambda: attnzoo.attention(q0, k0, v0, scale=-1.0)),
    ("backend_name", "backend", lambda: attnzoo.attention(q0, k0, v0, backend="tpu")),
    ("block_mask_type", "block_mask", lambda: attnzoo.attention(q0, k0, v0, block_mask=torch.ones(1, 1, T, T, dtype=torch.bool))),
    ("block_mask_lengths", "block_mask", lambda: attnzoo.attention(q0, k0, v0, block_mask=M.causal_block_mask(1, 1, T + 1, T, (4, 4)))),
    ("block_mask_heads", "block_mask", lambda: attnzoo.attention(q0, k0, v0, block_mask=M.causal_block_mask(1, 3, T, T, (4, 4)))),
]


@pytest.mark.parametrize("name, call", [(c[1], c[2]) for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES])
def test_attention_bad_input(name, call):
    with pytest.raises(attnzoo.InputError) as e:
        call()
    assert_names(e, name)
    assert isinstance(e.value, ValueError)  # InputError is a ValueError


def test_errors_say_what_was_got_and_needed():
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.attention(q0, k0, v0, bias=torch.zeros(B, 3, T, T))
    msg = str(e.value)
    assert "(2, 3, 5, 5)" in msg and "3" in msg
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.attention(q0[0], k0, v0)
    assert "rank" in str(e.value) and "3" in str(e.value)
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.attention(*(torch.randn(1, 2, 1, 512) for _ in range(3)))
    assert "512" in str(e.value)


def test_validation_runs_before_any_compute():
    """A bad argument is reported even when the tensors would make the compute itself fail."""
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.attention(q0.to("meta"), k0.to("meta"), v0.to("meta"), window=(-5, 0))
    assert "window" in str(e.value)


KV = dict(
    q=torch.randn(B, 1, H, D),
    k_cache=torch.randn(B, 8, HKV, D),
    v_cache=torch.randn(B, 8, HKV, D),
    cache_seqlens=torch.tensor([3, 8], dtype=torch.int32),
)


def kvcall(**over):
    kw = {**KV, **over}
    return lambda: attnzoo.attention_with_kvcache(
        kw.pop("q"), kw.pop("k_cache"), kw.pop("v_cache"), kw.pop("cache_seqlens"), **kw
    )


KVCACHE_CASES = [
    ("q_rank", "q", kvcall(q=torch.randn(B, H, D))),
    ("cache_dtype", "k_cache", kvcall(k_cache=KV["k_cache"].double())),
    ("cache_device", "v_cache", kvcall(v_cache=KV["v_cache"].to("meta"))),
    ("heads", "k_cache", kvcall(k_cache=torch.randn(B, 8, 3, D), v_cache=torch.randn(B, 8, 3, D))),
    ("seqlens_too_long", "cache_seqlens", kvcall(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32))),
    ("seqlens_shape", "cache_seqlens", kvcall(cache_seqlens=torch.tensor([3], dtype=torch.int32))),
    ("seqlens_float", "cache_seqlens", kvcall(cache_seqlens=torch.tensor([3.0, 4.0]))),
    ("block_table_rows", "block_table", kvcall(block_table=torch.zeros(3, 2, dtype=torch.int32))),
    ("cache_batch", "k_cache", kvcall(k_cache=torch.randn(3, 8, HKV, D), v_cache=torch.randn(3, 8, HKV, D))),
    ("window", "window", kvcall(window=(0, -3))),
    ("backend", "backend", kvcall(backend="gpu")),
]


@pytest.mark.parametrize("name, call", [(c[1], c[2]) for c in KVCACHE_CASES], ids=[c[0] for c in KVCACHE_CASES])
def test_attention_with_kvcache_bad_input(name, call):
    with pytest.raises(attnzoo.InputError) as e:
        call()
    assert_names(e, name)


OTHER_OPS = [
    ("moh_gates_shape", "gates", lambda: attnzoo.moh_attention(q0, k0, v0, torch.ones(B, T, H + 1))),
    ("moh_gates_device", "gates", lambda: attnzoo.moh_attention(q0, k0, v0, torch.ones(B, T, H, device="meta"))),
    ("moh_heads", "k", lambda: attnzoo.moh_attention(torch.randn(B, T, 3, D), k0, v0, torch.ones(B, T, 3))),
    ("dma_bias_shape", "bias", lambda: attnzoo.dynamic_mask_attention(q0, k0, v0, torch.zeros(B, 3, T), keep_window=2)),
    ("dma_bias_rank", "bias", lambda: attnzoo.dynamic_mask_attention(q0, k0, v0, torch.zeros(B, HKV, 1, T), keep_window=2)),
    ("dma_keep_window", "keep_window", lambda: attnzoo.dynamic_mask_attention(q0, k0, v0, torch.zeros(B, HKV, T), keep_window=0)),
    ("dma_keep_window_float", "keep_window", lambda: attnzoo.dynamic_mask_attention(q0, k0, v0, torch.zeros(B, HKV, T), keep_window=2.0)),
    ("dma_kpm", "key_padding_mask", lambda: attnzoo.dynamic_mask_attention(q0, k0, v0, torch.zeros(B, HKV, T), keep_window=2, key_padding_mask=torch.ones(B, 1, dtype=torch.bool))),
]


@pytest.mark.parametrize("name, call", [(c[1], c[2]) for c in OTHER_OPS], ids=[c[0] for c in OTHER_OPS])
def test_other_ops_bad_input(name, call):
    with pytest.raises(attnzoo.InputError) as e:
        call()
    assert_names(e, name)


CONSTRUCTORS = [
    ("kv_not_dividing", "num_kv_heads", lambda: MultiHeadAttention(32, 4, num_kv_heads=3)),
    ("kv_zero", "num_kv_heads", lambda: MultiHeadAttention(32, 4, num_kv_heads=0)),
    ("kv_more_than_heads", "num_kv_heads", lambda: MultiHeadAttention(32, 4, num_kv_heads=8)),
    ("head_dim_512", "head_dim", lambda: MultiHeadAttention(32, 4, head_dim=512)),
    ("head_dim_0", "head_dim", lambda: MultiHeadAttention(32, 4, head_dim=0)),
    ("dim_not_divisible", "head_dim", lambda: MultiHeadAttention(30, 4)),
    ("num_heads_0", "num_heads", lambda: MultiHeadAttention(32, 0)),
    ("dim_neg", "dim", lambda: MultiHeadAttention(-32, 4)),
    ("kv_weights", "kv_weights", lambda: MultiHeadAttention(32, 4, num_kv_heads=2, kv_weights="learned")),
    ("rope_type", "rope", lambda: MultiHeadAttention(32, 4, rope="yes")),
    ("rope_head_dim", "rope", lambda: MultiHeadAttention(32, 4, rope=attnzoo.RotaryEmbedding(16))),
    ("moh_top_k_0", "top_k", lambda: MoHAttention(32, 4, num_shared_heads=1, top_k=0)),
    ("moh_top_k_big", "top_k", lambda: MoHAttention(32, 4, num_shared_heads=1, top_k=4)),
    ("moh_shared", "num_shared_heads", lambda: MoHAttention(32, 4, num_shared_heads=5)),
    ("moh_router", "router", lambda: MoHAttention(32, 4, router="random")),
    ("moh_normalize", "normalize", lambda: MoHAttention(32, 4, normalize="softmax")),
    ("moh_kv", "num_kv_heads", lambda: MoHAttention(32, 4, num_kv_heads=3)),
    ("moh_head_dim", "head_dim", lambda: MoHAttention(32, 4, head_dim=512)),
    ("dma_keep_window_0", "keep_window", lambda: DynamicMaskAttention(32, 4, keep_window=0)),
    ("dma_keep_window_float", "keep_window", lambda: DynamicMaskAttention(32, 4, keep_window=1.5)),
    ("dma_bias_form", "bias_form", lambda: DynamicMaskAttention(32, 4, bias_form="cubic")),
    ("dma_window", "window", lambda: DynamicMaskAttention(32, 4, window=(4, 0))),
    ("dma_kv", "num_kv_heads", lambda: DynamicMaskAttention(32, 4, num_kv_heads=3)),
    ("kha_kv", "num_kv_heads", lambda: KnockingHeadsAttention(32, 4, num_kv_heads=3)),
    ("kha_head_dim", "head_dim", lambda: KnockingHeadsAttention(32, 4, head_dim=300)),
]


@pytest.mark.parametrize("name, call", [(c[1], c[2]) for c in CONSTRUCTORS], ids=[c[0] for c in CONSTRUCTORS])
def test_module_constructor_rejects(name, call):
    with pytest.raises(attnzoo.InputError) as e:
        call()
    assert_names(e, name)


@pytest.mark.parametrize("cls", [MultiHeadAttention, MoHAttention, DynamicMaskAttention, KnockingHeadsAttention])
def test_module_call_rejects_bad_input(cls):
    m = cls(32, 4)
    x = torch.randn(2, 5, 32)
    for bad_x in (torch.randn(2, 5, 16), torch.randn(5, 32)):
        with pytest.raises(attnzoo.InputError) as e:
            m(bad_x)
        assert_names(e, "x")
    for kpm in (torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool, device="meta")):
        with pytest.raises(attnzoo.InputError) as e:
            m(x, key_padding_mask=kpm)
        assert_names(e, "key_padding_mask")
    with pytest.raises(attnzoo.InputError) as e:
        m(x, position_ids=torch.arange(4))
    assert_names(e, "position_ids")
    with pytest.raises(attnzoo.InputError) as e:
        m(x, cache=m.new_cache(3))
    assert_names(e, "cache")


# ----------------------------------------------------------------------------------------------------
# forcing a backend that cannot run


@pytest.mark.parametrize(
    "call",
    [
        lambda: attnzoo.attention(q0, k0, v0, backend="cuda"),
        lambda: attnzoo.attention_with_kvcache(**KV, backend="cuda"),
        lambda: attnzoo.moh_attention(q0, k0, v0, torch.ones(B, T, H), backend="cuda"),
        lambda: attnzoo.dynamic_mask_attention(q0, k0, v0, torch.zeros(B, HKV, T), keep_window=2, backend="cuda"),
    ],
    ids=["attention", "kvcache", "moh", "dma"],
)
def test_forcing_cuda_lists_a_reason_per_backend(call):
    with pytest.raises(attnzoo.BackendUnavailableError) as e:
        call()
    msg = str(e.value)
    assert "'cuda'" in msg or "cuda" in msg
    # every backend that cannot run these inputs is listed with its reason(s)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip().startswith("- ")]
    listed = {ln[2:].split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in lines}
    assert "cuda" in listed and listed["cuda"] != backends.CAN_RUN
    # every backend is listed: with its reason(s), or saying that it can run these inputs
    assert set(listed) == set(backends.BACKENDS), (set(listed), msg)
    assert all(reason for reason in listed.values())
    assert listed["reference"] == backends.CAN_RUN and listed["torch"] == backends.CAN_RUN


def test_forcing_cuda_on_a_module_raises_at_call():
    m = MultiHeadAttention(32, 4, backend="cuda")
    with pytest.raises(attnzoo.BackendUnavailableError) as e:
        m(torch.randn(1, 3, 32))
    assert "cuda" in str(e.value)


def test_module_with_bad_backend_name_raises_input_error_at_construction():
    with pytest.raises(attnzoo.InputError) as e:
        MultiHeadAttention(32, 4, backend="fast")
    assert_names(e, "backend")


# -- issue 11: inputs a new user tried that got the wrong kind of answer -------------------------------


ALL_MODULES = [MultiHeadAttention, MoHAttention, KnockingHeadsAttention, DynamicMaskAttention, attnzoo.LightningAttention]


@pytest.mark.parametrize("cls", ALL_MODULES)
@pytest.mark.parametrize(
    "word, value",
    [
        ("window", (-2, 0)), ("window", (True, 0)), ("scale", -1.0), ("scale", float("inf")), ("scale", 0.0),
        ("backend", "gpu"), ("causal", "yes"), ("qkv_bias", 1),
    ],
)
def test_module_constructor_rejects_bad_word(cls, word, value):
    if cls in (DynamicMaskAttention, attnzoo.LightningAttention) and word == "window":
        pytest.skip("these modules take no window word")
    if cls is attnzoo.LightningAttention and word == "causal":
        value = False  # LightningAttention is causal by construction: only True is accepted
    with pytest.raises(attnzoo.InputError) as e:
        cls(32, 4, **{word: value})
    assert_names(e, word)


@pytest.mark.parametrize("decay", [float("inf"), float("nan"), -0.5, torch.tensor([0.1, float("inf"), 0.1, 0.1])])
def test_lightning_module_rejects_bad_decay_at_construction(decay):
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.LightningAttention(32, 4, decay=decay)
    assert_names(e, "decay")


@pytest.mark.parametrize("decay", [float("inf"), -1.0])
def test_lightning_op_rejects_bad_decay(decay):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.lightning_attention(q, q, q, decay=decay)
    assert_names(e, "decay")


def test_moh_top_k_that_cannot_hold_is_an_error_not_silently_zero():
    with pytest.raises(attnzoo.InputError) as e:
        MoHAttention(64, 8, num_shared_heads=8, top_k=3)
    assert_names(e, "top_k")
    m = MoHAttention(64, 8, num_shared_heads=8)  # every head shared, nothing routed: top_k None is fine
    assert m.top_k == 0 and m.config["top_k"] == 0
    m = MoHAttention(64, 8, num_shared_heads=2, top_k=3)
    assert m.top_k == 3 and m.config["top_k"] == 3


@pytest.mark.parametrize("cls", ALL_MODULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.float16])
def test_module_input_of_another_dtype_is_an_input_error(cls, dtype):
    m = cls(32, 4)
    x = torch.randn(1, 3, 32).to(dtype)
    with pytest.raises(attnzoo.InputError) as e:
        m(x)
    assert_names(e, "x")


def test_module_input_under_autocast_may_differ_from_the_parameters():
    m = MultiHeadAttention(32, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(1, 3, 32))
    assert y.shape == (1, 3, 32) and torch.isfinite(y.float()).all()


def test_scale_true_and_window_true_are_not_numbers():
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.attention(q0, k0, v0, window=(True, 0))
    assert_names(e, "window")
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.attention(q0, k0, v0, scale=True)
    assert_names(e, "scale")
    with pytest.raises(attnzoo.InputError) as e:
        attnzoo.attention(q0, k0, v0, scale=float("inf"))
    assert_names(e, "scale")


def test_cache_made_by_another_module_configuration_is_refused():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2)
    dma = DynamicMaskAttention(32, 4, num_kv_heads=2, keep_window=4)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        cache = mha.new_cache(1)
        mha(x, cache=cache)
        # a DMA layer would read its per-key bias from a buffer the MHA cache never wrote
        with pytest.raises(attnzoo.InputError) as e:
            dma(x[:, :1], cache=cache)
        assert_names(e, "cache")
        other_heads = MultiHeadAttention(32, 4, num_kv_heads=4)
        with pytest.raises(attnzoo.InputError) as e:
            other_heads(x[:, :1], cache=cache)
        assert_names(e, "cache")
        assert cache.seq_len == 3  # refused calls leave the cache as it was
        lightning = attnzoo.LightningAttention(32, 4)
        with pytest.raises(attnzoo.InputError) as e:
            lightning(x[:, :1], cache=cache)
        assert_names(e, "cache")
        # a module of the same configuration (e.g. a copy) may continue it
        twin = MultiHeadAttention(32, 4, num_kv_heads=2)
        twin.load_state_dict(mha.state_dict())
        twin(x[:, :1], cache=cache)
        assert cache.seq_len == 4
