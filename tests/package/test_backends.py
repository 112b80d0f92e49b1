"""The backend registry (DESIGN "Backends"): auto follows the one written table (on CPU every op goes to
the "torch" backend), why_not lists reasons per backend, forcing a backend that cannot run lists every
backend's reasons, auto never picks the Triton CPU interpreter, and on CUDA a fallback warns once."""

import warnings

import pytest
import torch

import attnzoo
from attnzoo import backends
from attnzoo.errors import BackendUnavailableError, InputError
from attnzoo.ops.attention.reference import attention_reference


def attention_inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2, 8, generator=g).to(device)
    k = torch.randn(1, 4, 2, 8, generator=g).to(device)
    v = torch.randn(1, 4, 2, 8, generator=g).to(device)
    # the full keyword set attnzoo.attention hands to backends
    return dict(q=q, k=k, v=v, causal=True, scale=None, window=(-1, -1), bias=None, mask=None, block_mask=None,
                key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False)


def test_public_ops_are_registered_with_a_reference_and_torch():
    for op in ("attention", "attention_with_kvcache", "moh_attention", "dynamic_mask_attention",
               "lightning_attention", "lightning_decode"):
        assert op in backends.ops()
        assert {"reference", "torch"} <= {i.backend for i in backends.implementations(op)}


def test_auto_on_cpu_selects_the_torch_backend():
    inputs = attention_inputs()
    impl = backends.select("attention", "auto", **inputs)
    assert impl.backend == "torch" and impl.op == "attention"
    # and running it computes attention: the reference's result within fp32 rounding
    torch.testing.assert_close(impl.fn(**inputs), attention_reference(**inputs))
    torch.testing.assert_close(backends.dispatch("attention", "auto", **inputs), attention_reference(**inputs))
    assert backends.select("attention", "reference", **inputs).backend == "reference"


def test_auto_table_on_cpu_picks_torch_for_every_op():
    rows = backends.auto_table(torch.device("cpu"))
    ops = {r["op"] for r in rows}
    assert {"attention", "attention_with_kvcache", "moh_attention", "dynamic_mask_attention",
            "lightning_attention", "lightning_decode"} <= ops
    for r in rows:
        assert r["device"] == "other" and r["order"][-1] == "reference"
        assert "triton" not in r["order"]  # never the interpreter
        if r["op"] in ("attention", "attention_with_kvcache", "moh_attention", "dynamic_mask_attention",
                       "lightning_attention", "lightning_decode"):
            assert r["picks"] == "torch", r
    text = backends.format_auto_table(torch.device("cpu"))
    assert "attention" in text and "torch" in text


def test_auto_table_on_cuda_rows():
    """The written policy for CUDA: proven engines for the features they cover, Triton for the rest."""
    rows = backends.auto_table(torch.device("cuda"))
    by = {(r["op"], r["when"]): r for r in rows}
    plain = next(r for (op, when), r in by.items() if op == "attention" and when.startswith("plain"))
    assert plain["order"][:2] == ["flash_attn", "torch"]
    varlen = next(r for (op, when), r in by.items() if op == "attention" and when.startswith("varlen"))
    assert varlen["order"][:3] == ["flash_attn", "xformers", "torch"]
    masked = next(r for (op, when), r in by.items() if op == "attention" and "bias" in when)
    assert masked["order"][0] == "triton" and "torch" in masked["fallback"]
    for op in ("moh_attention", "dynamic_mask_attention", "lightning_attention", "kha_mlp"):
        assert next(r for r in rows if r["op"] == op)["order"][0] == "triton"


def test_auto_row_matches_features(monkeypatch):
    monkeypatch.setattr(backends, "_device_of", lambda inputs: torch.device("cuda"))
    i = attention_inputs()
    assert backends.auto_row("attention", i).when.startswith("plain")
    assert "bias" in backends.auto_row("attention", {**i, "bias": torch.zeros(1)}).when
    assert "bias" in backends.auto_row("attention", {**i, "key_padding_mask": torch.ones(1, 4, dtype=torch.bool)}).when
    assert backends.auto_row("attention", {**i, "cu_seqlens_q": torch.zeros(2)}).when.startswith("varlen")


def test_auto_on_cuda_warns_once_when_a_masked_attention_falls_back_to_torch(monkeypatch):
    """A bias on CUDA belongs to the Triton kernels; without them auto runs torch, but never silently."""
    monkeypatch.setattr(backends, "_device_of", lambda inputs: torch.device("cuda"))
    i = {**attention_inputs(), "bias": torch.zeros(1, 1, 4, 4)}
    for key in [k for k in backends._warned if k[0] == "attention"]:
        backends._warned.discard(key)
    # the inputs live on the CPU, so triton's own supports() says why not (no CUDA tensor / interpreter off)
    monkeypatch.setitem(backends._REGISTRY["attention"], "triton", backends.Implementation(
        "attention", "triton", lambda **kw: None, lambda **_: ["triton is not installed (test)"], 10))
    with pytest.warns(UserWarning, match="triton is not installed"):
        assert backends.select("attention", "auto", **i).backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("attention", "auto", **i).backend == "torch"


def test_unavailable_error_lists_every_backend():
    i = {**attention_inputs(), "q": attention_inputs()["q"].to(torch.int32)}
    with pytest.raises(BackendUnavailableError) as e:
        backends.select("attention", "torch", **i)
    msg = str(e.value)
    for b in ("torch", "triton", "cuda", "flash_attn", "xformers"):
        assert f"- {b}:" in msg, (b, msg)


def test_why_not_lists_reasons_for_every_backend():
    reasons = backends.why_not("attention", **attention_inputs())
    assert set(reasons) == set(backends.BACKENDS)
    assert reasons["reference"] == []
    assert reasons["cuda"] and all(isinstance(r, str) and r for r in reasons["cuda"])
    for b, rs in reasons.items():
        assert isinstance(rs, list)
    # an op that does not exist: every backend says so
    none = backends.why_not("no_such_op")
    assert all(none[b] for b in backends.BACKENDS)


def test_bad_backend_name_and_unknown_op():
    with pytest.raises(InputError) as e:
        backends.select("attention", "fastest", **attention_inputs())
    assert str(e.value).startswith("backend")
    with pytest.raises(BackendUnavailableError):
        backends.select("no_such_op", "auto")


def test_public_ops_auto_runs_torch_on_cpu():
    """auto on CPU is the torch backend (bitwise), and it computes what the reference does."""
    i = attention_inputs()
    q, k, v = i["q"], i["k"], i["v"]
    for fn, args, kw in [
        (attnzoo.attention, (q, k, v), dict(causal=True)),
        (attnzoo.moh_attention, (q, k, v, torch.rand(1, 4, 2)), dict(causal=True)),
        (attnzoo.dynamic_mask_attention, (q, k, v, torch.randn(1, 2, 4)), dict(keep_window=2)),
        (attnzoo.attention_with_kvcache, (q[:, -1:], k, v, torch.tensor([4], dtype=torch.int32)), {}),
        (attnzoo.lightning_attention, (q, k, v), dict(decay=0.1)),
    ]:
        auto = fn(*args, **kw)
        torch.testing.assert_close(auto, fn(*args, **kw, backend="torch"), atol=0, rtol=0)
        torch.testing.assert_close(auto, fn(*args, **kw, backend="reference"))


# ----------------------------------------------------------------------------------------------------
# the dispatch rules, on a throwaway op


@pytest.fixture
def toy_op():
    name = "test_backends_toy_op"
    yield name
    backends._REGISTRY.pop(name, None)
    for key in [k for k in backends._warned if k[0] == name]:
        backends._warned.discard(key)


def test_auto_takes_the_highest_priority_backend_that_can_run(toy_op):
    backends.register(toy_op, "reference", priority=0)(lambda **kw: "ref")
    backends.register(toy_op, "cuda", priority=20, supports=lambda x, **_: [] if x > 0 else ["x must be > 0"])(
        lambda **kw: "cuda"
    )
    assert backends.dispatch(toy_op, "auto", x=1) == "cuda"
    assert backends.dispatch(toy_op, "auto", x=-1) == "ref"
    assert backends.dispatch(toy_op, "reference", x=1) == "ref"
    with pytest.raises(BackendUnavailableError) as e:
        backends.select(toy_op, "cuda", x=-1)
    msg = str(e.value)
    assert "x must be > 0" in msg and "cuda" in msg
    assert "no triton implementation" in msg  # a backend with no implementation says so


def test_auto_with_no_runnable_backend_lists_reasons(toy_op):
    backends.register(toy_op, "reference", priority=0, supports=lambda **_: ["reference says no"])(lambda **kw: 0)
    backends.register(toy_op, "cuda", priority=1, supports=lambda **_: ["cuda says no"])(lambda **kw: 1)
    with pytest.raises(BackendUnavailableError) as e:
        backends.select(toy_op, "auto", x=torch.zeros(1))
    assert "reference says no" in str(e.value) and "cuda says no" in str(e.value)


def test_auto_never_picks_the_triton_interpreter_on_cpu(toy_op):
    backends.register(toy_op, "reference", priority=0)(lambda **kw: "ref")
    backends.register(toy_op, "triton", priority=10)(lambda **kw: "triton")
    x = torch.zeros(2)
    assert backends.select(toy_op, "auto", x=x).backend == "reference"
    assert backends.select(toy_op, "triton", x=x).backend == "triton"  # explicitly asked: it runs


def test_auto_on_cuda_warns_once_when_falling_back_to_reference(toy_op, monkeypatch):
    backends.register(toy_op, "reference", priority=0)(lambda **kw: "ref")
    backends.register(toy_op, "triton", priority=10, supports=lambda **_: ["head dim 300 is too large"])(
        lambda **kw: "triton"
    )
    monkeypatch.setattr(backends, "_device_of", lambda inputs: torch.device("cuda"))
    with pytest.warns(UserWarning, match="head dim 300 is too large"):
        assert backends.select(toy_op, "auto", x=1).backend == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select(toy_op, "auto", x=1).backend == "reference"  # once per reason


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError):
        backends.register("attention", "tpu", priority=0)


def test_triton_device_reasons():
    assert backends.triton_device_reasons(torch.device("meta"))  # never runnable on meta
    if backends.triton_importable():
        assert backends.triton_device_reasons(torch.device("cuda")) == []


def test_auto_on_cuda_warns_even_when_only_the_reference_exists(toy_op, monkeypatch):
    """An op with no fast implementation yet must not run the reference on CUDA silently."""
    backends.register(toy_op, "reference", priority=0)(lambda **kw: "ref")
    monkeypatch.setattr(backends, "_device_of", lambda inputs: torch.device("cuda"))
    with pytest.warns(UserWarning, match="no triton implementation"):
        assert backends.select(toy_op, "auto", x=1).backend == "reference"
