"""The benchmark suite's CPU-side logic: FLOP/byte formulas, the results schema, report and plot
generation from a synthetic fixture, ``--dry-run``, the refusal without a GPU, and the check-before-time
pipeline. Nothing here times anything or asserts a speed: the timer is a stub returning a constant."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import flops as F
from benchmarks import report, runner
from benchmarks import suites as S
from benchmarks.providers import Built, Provider
from benchmarks.suites.base import gold_attention

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "benchmarks" / "fixtures" / "bench_results_sample.json"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny CPU tensors: one intra-op thread is fastest and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stub_bench(calls=None, ms=1.0):
    """Runs the function once (so errors surface) and returns a constant: no timing."""

    def bench(fn, grad_to_none=None):
        fn()
        if calls is not None:
            calls.append(fn)
        return ms

    return bench


# ----------------------------------------------------------------------------------------------------
# FLOP and byte formulas against hand-computed cases


def test_attention_area_hand_counts():
    assert F.attention_area(4, 4, causal=False) == 16
    assert F.attention_area(4, 4, causal=True) == 1 + 2 + 3 + 4
    # bottom-right causal with Tk > Tq: rows see 3, 4, 5, 6 keys
    assert F.attention_area(4, 6, causal=True) == 3 + 4 + 5 + 6
    # Tq > Tk: the first rows see nothing (0, 0, 1, 2)
    assert F.attention_area(4, 2, causal=True) == 0 + 0 + 1 + 2
    # sliding window (left=2, right=0) around the diagonal, not causal-flagged: 1, 2, 3, 3, 3
    assert F.attention_area(5, 5, causal=False, window=(2, 0)) == 1 + 2 + 3 + 3 + 3
    assert F.attention_area(5, 5, causal=True, window=(1, -1)) == 1 + 2 + 2 + 2 + 2


def test_attention_flops_fa3_formula():
    # 2 * B * H * (D + Dv) * area: B=2, H=3, D=Dv=8, causal 4x4 (area 10)
    assert F.attention_flops(2, 3, 4, 4, 8, causal=True) == 2 * 2 * 3 * 16 * 10 == 1920
    assert F.attention_flops(2, 3, 4, 4, 8, causal=True, mode="bwd") == 2.5 * 1920
    assert F.attention_flops(2, 3, 4, 4, 8, causal=True, mode="fwd+bwd") == 3.5 * 1920
    # dense: the familiar 4 * B * H * T^2 * D when Dv == D
    assert F.attention_flops(1, 1, 1024, 1024, 128) == 4 * 1024 * 1024 * 128
    # Dv != D and an explicit area
    assert F.attention_flops(1, 1, 4, 4, 8, 16) == 2 * 24 * 16
    assert F.attention_flops(1, 2, 8, 8, 4, area=5) == 2 * 2 * 8 * 5
    with pytest.raises(ValueError):
        F.attention_flops(1, 1, 4, 4, 8, mode="sideways")


def test_sparse_areas():
    # 2x2 blocks of 128 over 200 tokens: blocks (0,0), (1,0), (1,1) -> 128*128 + 72*128 + 72*72
    assert F.block_sparse_area([[[1, 0], [1, 1]]], 200, 200, (128, 128)) == 16384 + 9216 + 5184
    blocks = torch.tensor([[[[True, False], [True, True]]], [[[False, True], [False, False]]]])  # [2, 1, 2, 2]
    assert F.block_sparse_area(blocks, 256, 256, (128, 128)) == 4 * 128 * 128
    # DMA: each causal row keeps min(i + 1, w): w=2, T=5 -> 1, 2, 2, 2, 2
    assert F.dma_area(5, 2) == 9
    assert F.dma_area(5, 99) == F.attention_area(5, 5, causal=True) == 15
    assert F.dma_area(5, 2, causal=False) == 10
    dense, eff = F.moh_flops(1, 4, 8, 16, 0.5)
    assert dense == F.attention_flops(1, 4, 8, 8, 16, causal=True) and eff == dense / 2


def test_decode_bytes_and_area():
    # SPEC §2: 2 * B * Tk * Hkv * D * bytes for K and V, plus q read and o written
    kv = 2 * 2 * 100 * 2 * 64 * 2
    q_and_o = 2 * (2 * 1 * 8 * 64 * 2)
    assert F.decode_bytes(2, 1, 8, 2, 64, cache_lens=100, elem=2) == kv + q_and_o == 106496
    # per-entry cache lengths: 100 + 50 cached tokens
    assert F.decode_bytes(2, 1, 8, 2, 64, cache_lens=[100, 50], elem=2) == 150 * 2 * 128 * 2 + q_and_o
    with pytest.raises(ValueError):
        F.decode_bytes(2, 1, 8, 2, 64, cache_lens=[100], elem=2)
    # 4 new queries against 10 cached keys (bottom-right causal): 7 + 8 + 9 + 10
    assert F.decode_area(4, 10) == 34
    assert F.decode_area(4, 10, causal=False) == 40


def test_linear_attention_counts():
    assert F.linear_attention_flops(1, 10, 2, 4) == 4 * 10 * 2 * 16
    assert F.linear_attention_flops(1, 10, 2, 4, mode="fwd+bwd") == 3 * 4 * 10 * 2 * 16
    # state [1, 2, 4, 4] fp32 read and written + q, k, v, o of one token in bf16
    assert F.linear_decode_bytes(1, 2, 4, elem=2) == 2 * 2 * 16 * 4 + 2 * 16 * 2 == 320


def test_module_and_kha_counts():
    B, T, dim, H, Hkv, D = 1, 4, 8, 2, 1, 4
    proj = 2 * B * T * dim * (H + 2 * Hkv) * D + 2 * B * T * H * D * dim
    core = F.attention_flops(B, H, T, T, D, causal=True)
    assert F.mha_module_flops(B, T, dim, H, Hkv, D) == proj + core
    assert F.mha_module_flops(B, T, dim, H, Hkv, D, mode="fwd+bwd") == 3 * proj + 3.5 * core
    assert F.kha_extra_flops(B, T, H, Hkv, D, "linear") == 2 * B * T * (H + 2 * Hkv) * D * D
    assert F.kha_extra_flops(B, T, H, Hkv, D, "mlp") == 3 * 2 * B * T * Hkv * D * D


def test_rates_and_bandwidth():
    assert F.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert F.gbps(3e9, 500.0) == pytest.approx(6.0)
    assert F.tflops(1e12, 0) is None and F.gbps(None, 1.0) is None
    # H100 SXM: 2619 MHz HBM3 clock, 5120-bit bus, double data rate
    assert F.peak_bandwidth("NVIDIA H100 80GB HBM3", 2_619_000, 5120) == pytest.approx(3.352e12, rel=1e-3)
    assert F.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert F.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert F.peak_bandwidth("Some Unknown Accelerator") is None
    assert F.elem_bytes(torch.bfloat16) == 2 and F.elem_bytes("float32") == 4


def test_cases_carry_the_formulas():
    for c in S.get("attention").cases("full"):
        s = c.shape
        assert c.flops == F.attention_flops(s["B"], s["H"], s["T"], s["T"], s["D"], causal=c.params["causal"], mode=c.mode)
    for c in S.get("decode").cases("full"):
        s = c.shape
        assert c.bytes == F.decode_bytes(s["B"], s["Tn"], s["H"], s["Hkv"], s["D"], cache_lens=s["Tk"], elem=2)


# ----------------------------------------------------------------------------------------------------
# the sweeps the issue asks for


def test_suite_sweeps():
    att = S.get("attention").cases("full")
    assert {c.shape["D"] for c in att} == {64, 128, 256}
    assert {c.mode for c in att} == {"fwd", "bwd", "fwd+bwd"}
    assert {c.params["causal"] for c in att} == {True, False}
    assert min(c.shape["T"] for c in att) == 512 and max(c.shape["T"] for c in att) == 16384
    assert {c.shape["B"] * c.shape["T"] for c in att} == {16384}  # fixed tokens per batch
    assert any(c.shape["H"] == 32 and c.shape["Hkv"] == 8 for c in att)  # GQA
    dec = S.get("decode").cases("full")
    assert {c.shape["Tn"] for c in dec} >= {1, 16}
    assert min(c.shape["Tk"] for c in dec) == 1024 and max(c.shape["Tk"] for c in dec) == 131072
    assert {c.shape["B"] for c in dec} >= {1, 64}
    assert {c.shape["Hkv"] for c in dec} == {8, 1} and {c.params["paged"] for c in dec} == {True, False}
    lt = S.get("lightning").cases("full")
    seqs = [c.shape["T"] for c in lt if c.mode != "step"]
    assert min(seqs) == 1024 and max(seqs) == 131072
    assert {c.mode for c in lt} == {"fwd", "fwd+bwd", "step"}
    moh = S.get("moh").cases("full")
    assert {c.x for c in moh if c.params["kind"] == "core"} == {0.5, 0.75, 0.9, 1.0}
    assert {c.params["kind"] for c in moh} == {"core", "layer", "decode"}
    sp = S.get("sparse").cases("full")
    assert {c.params["kind"] for c in sp} == {"block", "dma"}
    assert all(c.flops_effective <= c.flops for c in sp)
    kn = S.get("knocking").cases("full")
    assert {c.params["base"] for c in kn} == {"mha", "gqa", "moh"}
    for name in S.NAMES:  # quick is a strict subset in size
        assert 0 < len(S.get(name).cases("quick")) < len(S.get(name).cases("full"))
        names = [c.name for c in S.get(name).cases("full")]
        assert len(names) == len(set(names))


def test_dma_kept_ties_go_to_recent_keys():
    from benchmarks.suites.sparse import dma_kept

    kept = dma_kept(torch.zeros(1, 1, 6), keep_window=2)[0, 0]
    i = torch.arange(6)
    window = (i.view(1, 6) <= i.view(6, 1)) & (i.view(1, 6) > i.view(6, 1) - 2)
    assert torch.equal(kept, window)  # equal biases: exactly a sliding window of 2
    bias = torch.tensor([[[5.0, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    kept = dma_kept(bias, keep_window=2)[0, 0]
    assert kept[5].tolist() == [True, False, False, False, False, True]  # the big bias, then the newest


def test_lightning_gold_matches_the_recurrence():
    from benchmarks.suites.lightning import alibi_decay, lightning_gold

    torch.manual_seed(0)
    B, T, H, D = 1, 37, 2, 4
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    s = alibi_decay(H).double()
    S0 = torch.randn(B, H, D, D, dtype=torch.float64)
    o, st = lightning_gold(q, k, v, s, scale=0.5, initial_state=S0, chunk=8)
    state = S0.clone()
    lam = torch.exp(-s).view(1, H, 1, 1)
    for t in range(T):
        state = lam * state + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        ref = 0.5 * torch.einsum("bhd,bhde->bhe", q[:, t], state)
        assert torch.allclose(o[:, t].double(), ref, atol=1e-4)
    assert torch.allclose(st.double(), state, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# the moh suite: head-sparse core (with attnzoo's dense core as the denominator), layer, decode


def test_moh_module_flops_hand_count():
    B, T, dim, H, D = 1, 4, 8, 2, 4
    proj = 2 * B * T * dim * 3 * H * D + 2 * B * T * H * D * dim
    router = 2 * B * T * dim * H
    core = F.attention_flops(B, H, T, T, D, causal=True)
    dense, eff = F.moh_module_flops(B, T, dim, H, H, D, 0.5)
    assert dense == proj + router + core and eff == proj + router + core / 2
    dense, eff = F.moh_module_flops(B, T, dim, H, H, D, 0.5, mode="fwd+bwd")
    assert dense == 3 * (proj + router) + 3.5 * core and eff == 3 * (proj + router) + 3.5 * core / 2
    # no routed heads and every head active: exactly the MHA layer
    assert F.moh_module_flops(B, T, dim, H, H, D, 1.0, routed_heads=0) == (F.mha_module_flops(B, T, dim, H, H, D),) * 2
    with pytest.raises(ValueError):
        F.moh_module_flops(B, T, dim, H, H, D, 0.0)
    with pytest.raises(ValueError):
        F.moh_module_flops(B, T, dim, H, H, D, 0.5, mode="sideways")


def test_moh_grid_covers_the_issue():
    cases = S.get("moh").cases("full")
    core = [c for c in cases if c.params["kind"] == "core"]
    assert {c.mode for c in core} == {"fwd", "fwd+bwd"}
    assert {c.shape["D"] for c in core} == {64, 128} and {c.shape["H"] for c in core} == {16, 32}
    assert {c.shape["T"] for c in core} == {2048, 4096, 8192, 16384}
    for D in (64, 128):  # every (D, mode, T) has the full rho sweep, with rho = 1 as the dense core's row
        for mode in ("fwd", "fwd+bwd"):
            for T in (2048, 4096, 8192, 16384):
                xs = {c.x for c in core if c.shape["D"] == D and c.mode == mode and c.shape["T"] == T}
                assert xs == {0.5, 0.75, 0.9, 1.0}, (D, mode, T)
    assert all(c.params["unit_gates"] == (c.x == 1.0) for c in core)
    layer = [c for c in cases if c.params["kind"] == "layer"]
    target = [c for c in layer if c.x == 0.5 and c.mode == "fwd+bwd" and c.shape["B"] * c.shape["T"] == 8192]
    assert target and all(c.shape["dim"] == c.shape["H"] * 128 for c in layer)
    assert all(c.params["num_shared_heads"] == 0 and c.params["top_k"] == round(c.x * c.shape["H"]) for c in layer)
    dec = [c for c in cases if c.params["kind"] == "decode"]
    assert {c.shape["Tk"] for c in dec} == {4096, 8192, 16384, 32768}
    assert all(c.shape["Tn"] == 1 and c.shape["B"] == 16 and (c.shape["H"], c.shape["Hkv"]) == (32, 8) for c in dec)
    assert {c.x for c in dec} == {0.0, 0.25, 0.5} and all(c.params["idle_kv_groups"] == c.x * 8 for c in dec)
    quick = S.get("moh").cases("quick")
    assert {c.params["kind"] for c in quick} == {"core", "layer", "decode"} and len(quick) <= 16
    assert any(c.params["kind"] == "layer" and c.x == 0.5 and c.mode == "fwd+bwd" for c in quick)


@pytest.mark.parametrize("level", ["tiny", "quick", "full"])
def test_moh_cases_carry_the_formulas(level):
    for c in S.get("moh").cases(level):
        s, p = c.shape, c.params
        k = p["active_heads"]
        if p["kind"] == "core":
            assert (c.flops, c.flops_effective) == F.moh_flops(s["B"], s["H"], s["T"], s["D"], k / s["H"], mode=c.mode)
            assert c.tokens == s["B"] * s["T"] and k == max(1, round(c.x * s["H"]))
        elif p["kind"] == "layer":
            assert (c.flops, c.flops_effective) == F.moh_module_flops(
                s["B"], s["T"], s["dim"], s["H"], s["Hkv"], s["D"], k / s["H"], mode=c.mode)
            assert c.flops_effective < c.flops or c.x == 1.0
        else:
            assert c.mode == "decode" and c.flops is None
            assert c.bytes == F.decode_bytes(s["B"], 1, s["H"], s["Hkv"], s["D"], cache_lens=s["Tk"], elem=2)
    # cases that share inputs and a gold answer are the same computation
    keys = {}
    for c in S.get("moh").cases(level):
        keys.setdefault(c.input_key, set()).add((c.params["kind"], c.params["active_heads"], tuple(c.shape.items())))
    assert all(len(v) == 1 for v in keys.values())


def test_moh_tiny_inputs_have_the_stated_routing():
    suite = S.get("moh")
    for c in suite.cases("tiny"):
        x = suite.make_inputs(c, "cpu", torch.float32)
        k = c.params["active_heads"]
        if c.params["kind"] == "layer":
            H = c.shape["H"]
            feats = x["x"][..., :H]
            # distinct per token, and exactly a permutation of (i - H/2) / 8 (exact in bf16)
            want = (torch.arange(H).float() - H // 2) / 8
            assert torch.equal(feats.sort(-1).values, want.expand_as(feats))
            assert torch.equal(feats.bfloat16().float(), feats)
            continue
        active = x["gates"] != 0
        assert (active.sum(-1) == k).all()
        if c.params["kind"] == "decode":
            H, Hkv = c.shape["H"], c.shape["Hkv"]
            per_group = active.view(*active.shape[:2], Hkv, H // Hkv).any(-1)
            assert ((~per_group).sum(-1) == c.params["idle_kv_groups"]).all()
        elif c.params["unit_gates"]:
            assert (x["gates"] == 1).all()
        else:
            g = x["gates"][active]
            assert (g >= 0.5).all() and (g <= 1.5).all()


def _moh_layer_case(x=0.5, mode="fwd+bwd"):
    return next(c for c in S.get("moh").cases("tiny") if c.params["kind"] == "layer" and c.x == x and c.mode == mode)


@pytest.mark.parametrize("rho", [0.5, 1.0])
def test_moh_dense_then_mask_layer_matches_the_reference_module(rho):
    """The dense-then-mask baseline layer (SDPA flash core, benchmarks code) and the bounded-memory gold core
    compute the reference-backend module's function: outputs, input and weight gradients (fp32, CPU)."""
    from benchmarks.suites.moh import build_moh_layer, gold_core, sdpa_dense_then_mask

    suite = S.get("moh")
    case = _moh_layer_case(rho)
    inputs = suite.make_inputs(case, "cpu", torch.float32)
    results = {}
    for name, kw in (("reference", dict(backend="reference")), ("dense-then-mask", dict(core=sdpa_dense_then_mask)),
                     ("gold-core", dict(core=gold_core))):
        mod = build_moh_layer(case, torch.device("cpu"), torch.float32, **kw)
        mod.train(True)
        x = inputs["x"].clone().requires_grad_(True)
        out = mod(x)
        out.backward(inputs["dout"])
        results[name] = (out.detach(), x.grad, mod.o_proj.weight.grad, mod.router_routed.grad, mod.last_gates)
    ref = results["reference"]
    H = case.shape["H"]
    assert ((ref[4] != 0).sum(-1) == round(rho * H)).all()  # exactly rho of the heads of every token
    for name in ("dense-then-mask", "gold-core"):
        got = results[name]
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the suite's gold is that same function
    gold = suite.gold(case, inputs, with_grads=True)
    torch.testing.assert_close(gold["out"], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gold["grads"]["x"], ref[1], rtol=1e-4, atol=1e-5)


def test_moh_layer_routing_is_the_same_in_every_precision():
    from benchmarks.suites.moh import build_moh_layer, sdpa_dense_then_mask

    suite = S.get("moh")
    case = _moh_layer_case(0.5, "fwd")
    pattern = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = suite.make_inputs(case, "cpu", dtype)["x"]
        mod = build_moh_layer(case, torch.device("cpu"), dtype, core=sdpa_dense_then_mask)
        with torch.no_grad():
            mod(x)
        pattern[dtype] = mod.last_gates != 0
    assert torch.equal(pattern[torch.float32], pattern[torch.bfloat16])


def test_moh_providers_and_the_check_on_cpu():
    """Every tiny moh case (core, layer, decode) through the runner with the CPU-capable providers: attnzoo's
    reference and the dense-then-mask SDPA peer (its GPU-only flag lifted) pass the check; a layer whose core
    forgets the gates, and the dense core on gated inputs, are caught as mismatches."""
    import dataclasses

    from benchmarks.suites.moh import DENSE_CORE, build_moh_layer, sdpa_dense_then_mask

    suite = S.get("moh")
    cases = suite.cases("tiny")
    provs = {p.name: p for p in suite.providers()}
    assert not provs["attnzoo-reference"].needs_cuda
    gpu_only = ("attnzoo-triton", DENSE_CORE, "dense-mask-sdpa-flash", "dense-mask-sdpa-cudnn", "dense-mask-flash-attn")
    assert all(provs[n].needs_cuda for n in gpu_only)
    assert provs[DENSE_CORE].role == "base"
    assert [c.x for c in cases if provs[DENSE_CORE].applies(c)] == [1.0, 1.0]
    assert all(c.params["kind"] == "core" for c in cases if provs[DENSE_CORE].applies(c))

    def no_gates(q, k, v, gates, *, causal, scale=None):
        return sdpa_dense_then_mask(q, k, v, torch.ones_like(gates), causal=causal, scale=scale)

    def forgetful(case, x):
        if case.params["kind"] == "layer":
            mod = build_moh_layer(case, x["x"].device, x["x"].dtype, core=no_gates)
            mod.train(case.needs_grad)
            return Built(lambda: mod(x["x"]))
        return Built(lambda: no_gates(x["q"], x["k"], x["v"], x["gates"], causal=True))

    def gate_free_core(case, x):
        return Built(lambda: no_gates(x["q"], x["k"], x["v"], x["gates"], causal=True))

    run = [provs["attnzoo-reference"], dataclasses.replace(provs["dense-mask-sdpa-flash"], needs_cuda=False),
           dataclasses.replace(provs[DENSE_CORE], name="dense-core-anywhere", needs_cuda=False, build=gate_free_core,
                               applies=lambda c: c.params["kind"] == "core"),
           Provider("forgetful", "peer", "torch", forgetful, needs_cuda=False)]
    recs = runner.run_suite(suite, cases, run, torch.device("cpu"), torch.float32, bench=stub_bench())
    by = {(r["provider"], r["case"]): r for r in recs}
    for c in cases:
        for name in ("attnzoo-reference", "dense-mask-sdpa-flash"):
            r = by[(name, c.name)]
            assert r["status"] == "ok" and r["checked"], r
            if c.needs_grad:
                assert set(r["errors"]) >= ({"dx"} if c.params["kind"] == "layer" else {"dq", "dk", "dv"})
        # the router's gates are never all exactly 1 (a softmax of distinct logits); decode's are random
        gated = not c.params.get("unit_gates", False)
        assert by[("forgetful", c.name)]["status"] == ("mismatch" if gated else "ok"), c.name
        if c.params["kind"] == "core":
            # gate-free dense attention is the right answer exactly where every gate is 1
            assert by[("dense-core-anywhere", c.name)]["status"] == ("ok" if c.params["unit_gates"] else "mismatch")


def test_dense_core_ratios():
    from benchmarks.suites.moh import dense_core_ratios

    def rec(provider, group, x, ms, kind="core", status="ok"):
        return {"provider": provider, "group": group, "x": x, "ms": ms, "status": status, "params": {"kind": kind}}

    records = [rec("attnzoo-triton", "g", 0.5, 3.0), rec("attnzoo-triton", "g", 1.0, 10.5),
               rec("attnzoo-dense-core", "g", 1.0, 10.0), rec("dense-mask-sdpa-flash", "g", 0.5, 9.0),
               rec("attnzoo-triton", "h", 0.5, 1.0),  # no denominator in group h
               rec("attnzoo-triton", "l", 0.5, 1.0, kind="layer"),
               rec("attnzoo-dense-core", "l", 1.0, 2.0, kind="layer"),
               rec("attnzoo-triton", "g", 0.75, None, status="mismatch")]
    assert dense_core_ratios(records) == {("g", 0.5): pytest.approx(0.3), ("g", 1.0): pytest.approx(1.05)}


# ----------------------------------------------------------------------------------------------------
# check before time: the measurement pipeline with a stub timer


class _AttentionProvider:
    """Provider factories for the pipeline test (plain PyTorch)."""

    @staticmethod
    def correct(case, x):
        def fn():
            o, _ = gold_attention(x["q"], x["k"], x["v"], causal=case.params["causal"])
            return o.to(x["q"].dtype)
        # gold_attention detaches; use a differentiable formulation for backward modes
        if case.needs_grad:
            from attnzoo.ops.attention.reference import attention_reference

            return Built(lambda: attention_reference(x["q"], x["k"], x["v"], causal=case.params["causal"]))
        return Built(fn)

    @staticmethod
    def wrong_mask(case, x):
        from attnzoo.ops.attention.reference import attention_reference

        return Built(lambda: attention_reference(x["q"], x["k"], x["v"], causal=not case.params["causal"]))


def test_pipeline_checks_before_timing():
    suite = S.get("attention")
    cases = [c for c in suite.cases("tiny") if c.shape["Hkv"] != c.shape["H"]][:3]  # GQA: fwd, bwd, fwd+bwd
    assert {c.mode for c in cases} == {"fwd", "bwd", "fwd+bwd"}

    def boom(case, x):
        raise RuntimeError("kernel exploded")

    def absent(case, x):
        raise NotImplementedError("not written yet")

    provs = [
        Provider("good", "attnzoo", "torch", _AttentionProvider.correct, needs_cuda=False),
        Provider("wrong", "peer", "torch", _AttentionProvider.wrong_mask, needs_cuda=False),
        Provider("boom", "peer", "torch", boom, needs_cuda=False),
        Provider("absent", "peer", "torch", absent, needs_cuda=False),
        Provider("refuses", "peer", "torch", _AttentionProvider.correct, needs_cuda=False,
                 supports=lambda c: "no thanks"),
        Provider("elsewhere", "peer", "torch", _AttentionProvider.correct, needs_cuda=False,
                 applies=lambda c: False),
    ]
    calls = []
    recs = runner.run_suite(suite, cases, provs, torch.device("cpu"), torch.float32, bench=stub_bench(calls, 2.0))
    by = {(r["provider"], r["mode"]): r for r in recs}
    assert not any(r["provider"] == "elsewhere" for r in recs)
    for mode in ("fwd", "bwd", "fwd+bwd"):
        good = by[("good", mode)]
        assert good["status"] == "ok" and good["checked"] and good["ms"] == 2.0, good
        assert good["tflops"] == pytest.approx(F.tflops(good["flops"], 2.0))
        if mode != "fwd":
            assert {"dq", "dk", "dv"} <= set(good["errors"])
        bad = by[("wrong", mode)]
        assert bad["status"] == "mismatch" and bad["ms"] is None and "disagrees" in bad["message"]
        assert by[("boom", mode)]["status"] == "error" and "kernel exploded" in by[("boom", mode)]["message"]
        assert by[("absent", mode)]["status"] == "unsupported"
        assert by[("refuses", mode)]["status"] == "unsupported" and by[("refuses", mode)]["message"] == "no thanks"
    assert len(calls) == 3  # only the agreeing provider was ever handed to the timer


# what each suite must time on a GPU: attnzoo's kernels and the peers/baselines its issue names
_REQUIRED_PROVIDERS = {
    "attention": {"attnzoo-triton", "sdpa-flash", "sdpa-cudnn", "flex"},
    "decode": {"attnzoo-triton", "sdpa-flash", "flash-attn"},
    "sparse": {"attnzoo-triton", "attnzoo-dma-triton", "flex"},
    "lightning": {"attnzoo-triton", "lightning-attn", "fla-chunk", "fla-recurrent"},
    "moh": {"attnzoo-triton", "attnzoo-dense-core", "dense-mask-sdpa-flash"},
    "knocking": {"base", "kha-linear", "kha-mlp", "kha-linear-folded"},
}


@pytest.mark.parametrize("name", S.NAMES)
def test_every_suite_has_attnzoo_and_its_peers(name):
    names = {p.name for p in S.get(name).providers()}
    assert _REQUIRED_PROVIDERS[name] <= names, sorted(_REQUIRED_PROVIDERS[name] - names)


@pytest.mark.parametrize("name", S.NAMES)
def test_every_suite_runs_its_cpu_providers(name):
    """Each suite's inputs, gold answer and the providers that can run on CPU agree (tiny shapes)."""
    suite = S.get(name)
    cases = suite.cases("tiny")
    cases = [c for c in cases if c.mode in ("fwd", "step", "decode")][:2] + [c for c in cases if c.needs_grad][:1]
    dev = torch.device("cpu")
    provs = [p for p in suite.providers() if p.unavailable_reason(dev) is None]
    if not provs:
        pytest.skip(f"no provider of {name} runs on CPU here")
    recs = runner.run_suite(suite, cases, provs, dev, torch.float32, bench=stub_bench())
    assert recs
    for r in recs:
        assert r["status"] in ("ok", "unsupported"), r
        if r["status"] == "ok":
            assert r["checked"], r
    assert any(r["status"] == "ok" for r in recs)


# ----------------------------------------------------------------------------------------------------
# results schema


def test_fixture_is_a_marked_synthetic_valid_results_file():
    data = json.loads(FIXTURE.read_text())
    assert data["synthetic"] is True and "SYNTHETIC" in data["_comment"]
    assert report.validate(data) == []
    assert not list((ROOT / "benchmarks" / "results").rglob("bench_results_sample*"))
    for r in report.records_of(data):
        assert r["environment"]["gpu"]["name"] and r["environment"]["torch"]


def test_schema_catches_problems():
    data = json.loads(FIXTURE.read_text())
    bad = json.loads(json.dumps(data))
    del bad["environment"]["driver"]
    bad["records"][0]["status"] = "fast"
    bad["records"][1]["ms"] = "1.0"
    mism = next(r for r in bad["records"] if r["status"] == "mismatch")
    mism["ms"] = 1.0
    del bad["records"][2]["version"]
    problems = report.validate(bad)
    text = "\n".join(problems)
    assert "environment.driver" in text and "records[0].status" in text and "records[1].ms" in text
    assert "must not be timed" in text and "records[2].version" in text
    assert report.validate({"schema": "other"})
    assert report.validate([]) == ["top level is not an object"]


def test_written_results_validate(tmp_path):
    suite = S.get("attention")
    cases = suite.cases("tiny")[:2]
    provs = [Provider("good", "attnzoo", "torch", _AttentionProvider.correct, needs_cuda=False)]
    recs = runner.run_suite(suite, cases, provs, torch.device("cpu"), torch.float32, bench=stub_bench())
    env = runner.environment(None)
    env["gpu"] = {"name": "NVIDIA Test GPU 80GB", "capability": "9.0", "sm_count": 1, "memory_bytes": 1,
                  "bandwidth_bytes_per_s": 1e12, "count": 1}
    meta = {"created_utc": "2026-02-03T04:05:06Z", "quick": True, "level": "tiny", "dtype": "float32", "argv": [],
            "wall_s": 0.0, "measurement": {"timer": "stub"}, "providers": runner.provider_table(provs, "cpu")}
    path = runner.write_results(tmp_path, "attention", recs, env, meta)
    assert path.parent.name == "Test-GPU-80GB" and path.name == "attention-20260203T040506Z.json"
    data = json.loads(path.read_text())
    assert report.validate(data) == [], report.validate(data)
    for key in ("gpu", "driver", "cuda", "torch", "triton", "libraries", "commit"):
        assert key in data["environment"]
    assert set(data["environment"]["libraries"]) >= {"xformers", "flash-attn", "fla-core", "lightning-attn", "flash-dmattn"}


def test_gpu_slug():
    assert runner.gpu_slug("NVIDIA H100 80GB HBM3") == "H100-80GB-HBM3"
    assert runner.gpu_slug("NVIDIA H200") == "H200"
    assert runner.gpu_slug("  ") == "unknown-gpu"


# ----------------------------------------------------------------------------------------------------
# report and plots from the fixture


def _results_tree(tmp_path, copies=(("2026-01-01T00:00:00Z", None),)):
    base = json.loads(FIXTURE.read_text())
    folder = tmp_path / "results" / "SYNTHETIC-GPU"
    folder.mkdir(parents=True)
    for created, tweak in copies:
        data = json.loads(json.dumps(base))
        data["created_utc"] = created
        if tweak:
            tweak(data)
        (folder / f"attention-{created.replace(':', '').replace('-', '')}.json").write_text(json.dumps(data))
    return tmp_path / "results"


def test_report_from_fixture(tmp_path):
    results = _results_tree(tmp_path)
    md = tmp_path / "RESULTS.md"
    text = report.regenerate(results, md, plots=False)
    assert md.read_text() == text
    assert "## SYNTHETIC-GPU" in text and "SYNTHETIC FIXTURE" in text
    assert "| case | attnzoo-triton | attnzoo-reference | sdpa-flash | sdpa-cudnn | xformers | flex |" in text
    assert "**mismatch**" in text and "OOM" in text and "n/s" in text
    # attnzoo-triton runs at 0.9 x sdpa-flash's time, sdpa-cudnn at 0.8 x: best peer / attnzoo = 0.8 / 0.9
    assert f"{0.8 / 0.9:.2f}x" in text
    assert "flash-attn (flash_attn is not installed)" in text  # providers not run are named
    assert "xformers on fwd causal D=128 MHA 16/16 T=16384: mismatch" in text
    assert "No GPU results" not in text


def test_report_keeps_the_newest_file_per_gpu_and_suite(tmp_path):
    def newer(data):
        for r in data["records"]:
            if r["provider"] == "attnzoo-triton" and r["ms"]:
                r["ms"] = r["ms"] / 2
                r["tflops"] = r["tflops"] * 2

    results = _results_tree(tmp_path, (("2026-01-01T00:00:00Z", None), ("2026-03-01T00:00:00Z", newer)))
    text = report.render(report.newest(report.load_all(results)), tmp_path / "RESULTS.md")
    assert "2026-03-01T00:00:00Z" in text and "2026-01-01T00:00:00Z" not in text
    assert f"{0.8 / 0.45:.2f}x" in text


def test_report_without_results(tmp_path):
    (tmp_path / "results").mkdir()
    text = report.regenerate(tmp_path / "results", tmp_path / "RESULTS.md", plots=False)
    assert "No GPU results exist yet" in text


def test_committed_results_md_matches_the_results_folder():
    committed = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    if not list((ROOT / "benchmarks" / "results").glob("*/*.json")):
        assert "No GPU results exist yet" in committed
    assert committed.startswith("# attnzoo benchmark results")


def test_plot_from_fixture(tmp_path):
    pytest.importorskip("matplotlib")
    data = json.loads(FIXTURE.read_text())
    png = report.plot_results(data, tmp_path / "attention.png")
    assert png is not None and png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = _results_tree(tmp_path / "tree")
    text = report.regenerate(results, tmp_path / "tree" / "RESULTS.md", plots=True)
    assert "![attention](results/SYNTHETIC-GPU/attention-20260101T000000Z.png)" in text


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    data = json.loads(FIXTURE.read_text())
    assert report.plot_results(data, tmp_path / "x.png") is None
    results = _results_tree(tmp_path)
    text = report.regenerate(results, tmp_path / "RESULTS.md", plots=True)
    assert "matplotlib" in capsys.readouterr().err and "| case |" in text
    assert not list(results.rglob("*.png"))


def test_speedup_ignores_the_reference_and_failures():
    recs = {
        "a": {"role": "attnzoo", "status": "ok", "ms": 2.0},
        "r": {"role": "reference", "status": "ok", "ms": 0.1},
        "p": {"role": "peer", "status": "ok", "ms": 3.0},
        "q": {"role": "peer", "status": "mismatch", "ms": None},
    }
    assert report.speedup(recs) == 1.5
    assert report.speedup({"r": recs["r"], "p": recs["p"]}) is None
    assert report.overheads({"base": {"status": "ok", "ms": 2.0}, "kha-mlp": {"status": "ok", "ms": 2.1}}) == {
        "kha-mlp": pytest.approx(0.05)}


# ----------------------------------------------------------------------------------------------------
# CLI: --dry-run and the refusal without a GPU


def test_dry_run_lists_suites_shapes_and_providers(tmp_path, capsys):
    rc = runner.main(["--dry-run", "--quick", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    for name in S.NAMES:
        assert f"suite {name}:" in out
    assert "Providers (importable here? version):" in out
    assert "sdpa-flash" in out and "torch" in out and "flex" in out
    assert "xformers" in out and "lightning-attn" in out and "flash-dmattn" in out
    assert "B=" in out and "T=" in out  # shapes
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_dry_run_single_suite_full(capsys):
    assert runner.main(["--dry-run", "--suite", "moh"]) == 0  # a summary: count, first and last case
    out = capsys.readouterr().out
    n = len(S.get('moh').cases('full'))
    assert f"suite moh: {n} cases" in out and f"... {n - 2} more (--list shows every case)" in out
    assert runner.main(["--dry-run", "--list", "--suite", "moh"]) == 0  # every case
    out = capsys.readouterr().out
    assert f"suite moh: {n} cases" in out and "suite attention" not in out and "more (--list" not in out
    assert "attnzoo-dense-core" in out and "kind=layer" in out and "kind=decode" in out


def test_refuses_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = runner.main(["--quick", "--suite", "attention", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 2
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--dry-run" in lines[0]
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_smoke_run_end_to_end(tmp_path, capsys):
    """The whole flow (cases, check, records, results file, plot, report) on CPU with tiny shapes and a
    placeholder timer; its output is marked synthetic."""
    out = tmp_path / "out"
    assert runner.main(["--smoke", "--suite", "attention", "--no-plots", "--out", str(out)]) == 0
    files = list(out.glob("*/attention-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["synthetic"] is True and report.validate(data) == []
    assert {r["status"] for r in data["records"]} == {"ok"} and all(r["checked"] for r in data["records"])
    text = (out / "RESULTS.md").read_text()
    assert "SYNTHETIC" in text and "attnzoo-reference" in text
    # never into the real results folder
    assert runner.main(["--smoke", "--suite", "attention"]) == 2


def test_unknown_suite(capsys):
    assert runner.main(["--suite", "nope", "--dry-run"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_report_only(tmp_path, capsys):
    results = _results_tree(tmp_path)
    assert runner.main(["--report-only", "--no-plots", "--out", str(results)]) == 0
    assert (results / "RESULTS.md").read_text().startswith("# attnzoo benchmark results")


def test_python_dash_m_entry_points():
    import benchmarks
    import benchmarks.__main__  # noqa: F401  (importable without running)

    assert callable(benchmarks.main)


def test_progress_fallback():
    buf = io.StringIO()
    bar = runner._Bar(4, "suite", stream=buf)
    bar.set_postfix_str("case | provider")
    for _ in range(4):
        bar.update()
    bar.close()
    assert "4/4" in buf.getvalue() and "[########################]" in buf.getvalue()


def test_moh_report_shows_ratio_to_own_dense_core(tmp_path):
    """The moh section states each core time over attnzoo's dense core (the rho + 0.1 target)."""
    import copy
    import json
    from pathlib import Path

    from benchmarks import report

    base = json.loads((Path(__file__).parent / "fixtures" / "bench_results_sample.json").read_text())
    data = copy.deepcopy(base)
    data["suite"] = "moh"
    proto = base["records"][0]
    recs = []
    for prov, x, ms in (("attnzoo-dense-core", 1.0, 2.0), ("attnzoo-triton", 0.5, 1.1), ("attnzoo-triton", 1.0, 2.1)):
        r = copy.deepcopy(proto)
        r.update(suite="moh", provider=prov, x=x, ms=ms, group="fwd core", x_name="active_fraction",
                 case=f"fwd core active={x}", params={"kind": "core"}, metric="ms")
        recs.append(r)
    data["records"] = recs
    text = "\n".join(report.render_suite(tmp_path / "moh.json", data, tmp_path))
    assert "target <= rho + 0.1" in text
    assert "rho=0.5: 0.55" in text and "rho=1.0: 1.05" in text
