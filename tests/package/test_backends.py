"""The backend registry (DESIGN "Backends"): auto on CPU picks the reference, why_not lists reasons per
backend, forcing a backend that cannot run lists them, auto never picks the Triton CPU interpreter, and on
CUDA a fallback to the reference warns once."""

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


def test_public_ops_are_registered_with_a_reference():
    for op in ("attention", "attention_with_kvcache", "moh_attention", "dynamic_mask_attention"):
        assert op in backends.ops()
        assert any(i.backend == "reference" for i in backends.implementations(op))


def test_auto_on_cpu_selects_the_reference():
    inputs = attention_inputs()
    impl = backends.select("attention", "auto", **inputs)
    assert impl.backend == "reference" and impl.op == "attention"
    # and running it is the reference computation
    torch.testing.assert_close(impl.fn(**inputs), attention_reference(**inputs), atol=0, rtol=0)
    torch.testing.assert_close(backends.dispatch("attention", "auto", **inputs), attention_reference(**inputs))
    assert backends.select("attention", "reference", **inputs).backend == "reference"


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


def test_public_ops_auto_equals_reference_on_cpu():
    i = attention_inputs()
    q, k, v = i["q"], i["k"], i["v"]
    for fn, args, kw in [
        (attnzoo.attention, (q, k, v), dict(causal=True)),
        (attnzoo.moh_attention, (q, k, v, torch.rand(1, 4, 2)), dict(causal=True)),
        (attnzoo.dynamic_mask_attention, (q, k, v, torch.randn(1, 2, 4)), dict(keep_window=2)),
        (attnzoo.attention_with_kvcache, (q[:, -1:], k, v, torch.tensor([4], dtype=torch.int32)), {}),
    ]:
        torch.testing.assert_close(fn(*args, **kw), fn(*args, **kw, backend="reference"), atol=0, rtol=0)


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
