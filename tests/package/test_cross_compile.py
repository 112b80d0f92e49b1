"""Every family's Triton kernels compile for the H100 (sm_90), not just run under the interpreter.

The CPU interpreter never runs Triton's GPU code generation, and the autotuner's pruning only runs on a GPU,
so a kernel (or a config pruner) can pass every CPU test and still break on the first GPU launch.
``tools/cross_compile.py --quick`` drives the public ops forward and backward with a compile-only Triton
driver: every launch compiles (the first config each autotuner keeps) down to a cubin. On a GPU the other
tests compile the kernels for real.

``--gate`` (one test per family) holds the hot kernels at head dims 64 and 128, fp16 and bf16, in every
config their autotuners offer, to 128-bit tile loads, pipelined loads and zero spill, read from the PTX and
the cubin; the rules themselves are tested on PTX excerpts.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# one kernel name per launch site the quick scenarios must reach
EXPECTED = {
    "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_decode_kernel", "_decode_merge_kernel",
    "_lightning_fwd_kernel", "_lightning_bwd_dq_kernel", "_lightning_bwd_dk_kernel", "_lightning_bwd_dv_kernel",
    "_lightning_decode_kernel", "_pack_rows_kernel", "_tile_offsets_kernel", "_moh_fwd_kernel",
    "_moh_bwd_dq_kernel", "_moh_bwd_dkdv_kernel", "_router_fwd_kernel", "_router_bwd_kernel", "_dma_fwd_kernel",
    "_dma_bwd_dq_kernel", "_dma_bwd_dkdv_kernel", "_kha_mlp_fwd_kernel", "_kha_mlp_bwd_dv_kernel",
    "_kha_mlp_bwd_dw_kernel",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernels for real")
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "kernels.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "cross_compile.py"), "--quick", "--arch", "90",
         "--dtypes", "float16,bfloat16", "--no-usage", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    names = {k["kernel"] for k in report["kernels"]}
    assert EXPECTED <= names, f"launch sites not reached: {sorted(EXPECTED - names)}"
    dtypes = {k["scenario"].rsplit(" ", 1)[-1] for k in report["kernels"]}
    assert dtypes == {"float16", "bfloat16"}


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cross_compile.py"), "--quick"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode != 0 and "unset TRITON_INTERPRET" in res.stderr


# ----------------------------------------------------------------------------------------------------
# The code-generation report and its gate


def _tool():
    """tools/cross_compile.py as a module (importing it neither installs the compile-only driver nor
    imports any kernel)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cross_compile", os.path.join(ROOT, "tools", "cross_compile.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# excerpts in Triton's PTX spelling (sm_90): a pipelined, vectorised tile loop and a narrow, unpipelined one
_GOOD_PTX = """
    @%p1 ld.global.b32 { %r1 }, [ %rd1 + 0 ];
    @%p2 ld.global.b32 { %r2 }, [ %rd2 + 0 ];
    @%p3 ld.global.L1::evict_last.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd3 + 0 ];
    @%p4 cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
    @%p5 cp.async.cg.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 0x10, %r10;
    cp.async.commit_group;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd6, %rd7, %p6, 1, 1, 0, 1;
    @%p7 st.global.v4.b32 [ %rd8 + 0 ], { %r11, %r12, %r13, %r14 };
"""
_NARROW_PTX = "\n".join(["    @%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];"] * 16
                        + ["    mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};"])


def test_ptx_features_reads_load_widths_pipelining_and_mmas():
    cc = _tool()
    good = cc.ptx_features(_GOOD_PTX)
    assert good["loads"] == {32: 2, 128: 3}
    assert (good["ld128"], good["narrow_loads"], good["cp_async"], good["tma"]) == (3, 2, {16: 2}, 0)
    assert (good["wgmma"], good["mma"], good["stores"]) == (1, 0, {128: 1})
    bad = cc.ptx_features(_NARROW_PTX)
    assert bad["loads"] == {16: 16} and bad["ld128"] == 0 and bad["narrow_loads"] == 16
    assert (bad["cp_async"], bad["wgmma"], bad["mma"]) == ({}, 0, 1)
    tma = cc.ptx_features("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], "
                          "[%rd1, {%r2, %r3}], [%r4];")
    assert tma["tma"] == 1 and tma["ld128"] == 1 and tma["narrow_loads"] == 0


def test_gate_rules():
    cc = _tool()
    rec = {"kernel": "_k", "constexprs": {}, "num_warps": 4, "num_stages": 2, "scenario": "s",
           "stack_bytes": 0, "local_bytes": 0, "codegen": cc.ptx_features(_GOOD_PTX)}
    assert cc.gate_problems(rec) == []
    spill = dict(rec, stack_bytes=8)
    assert [p for p in cc.gate_problems(spill) if "spill" in p]
    narrow = dict(rec, codegen=cc.ptx_features(_NARROW_PTX))
    problems = cc.gate_problems(narrow)
    assert any("not 128-bit" in p for p in problems) and any("not pipelined" in p for p in problems)
    # per-row fp32 vectors (log-sum-exp, delta) pipelined as 4-byte cp.async beside 128-bit tiles: allowed
    rows_ptx = _GOOD_PTX + "    @%p9 cp.async.ca.shared.global [ %r20 + 0 ], [ %rd20 + 0 ], 0x4, %r21;\n" * 3
    assert cc.gate_problems(dict(rec, codegen=cc.ptx_features(rows_ptx))) == []
    # a 16-bit tile moved in pairs: more 32-bit loads than 128-bit ones
    pairs = _GOOD_PTX + "    @%p1 ld.global.b32 { %r1 }, [ %rd1 + 0 ];\n" * 16
    assert any("not 128-bit" in p for p in cc.gate_problems(dict(rec, codegen=cc.ptx_features(pairs))))
    assert cc.gate_problems(dict(rec, stack_bytes=None))  # no cuobjdump: the spill rule cannot pass
    # a family passes only with every hot kernel compiled and clean
    rows = [dict(rec, kernel=k) for k in cc.HOT["knocking"]]
    assert cc.gate_verdict(rows, ["knocking"])["knocking"]["ok"]
    assert not cc.gate_verdict(rows[:-1], ["knocking"])["knocking"]["ok"]
    assert not cc.gate_verdict(rows[:-1] + [spill | {"kernel": rows[-1]["kernel"]}], ["knocking"])["knocking"]["ok"]


# Every family's hot kernels hold the gate (issue 13); a new family joins this list when it passes
# `tools/cross_compile.py --gate --families NAME`.
GATED_FAMILIES = ["lightning", "knocking", "attention", "moh", "dma"]


@pytest.mark.parametrize("family", GATED_FAMILIES)
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernels for real")
def test_codegen_gate(family, tmp_path):
    """Every hot kernel of ``family`` at head dims 64 and 128, fp16 and bf16, sm_90, in every config its
    autotuner offers: 128-bit tile loads, pipelined loads, no spill (tools/cross_compile.py --gate)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "gate.json"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "cross_compile.py"), "--gate", "--families", family,
         "--jobs", "2", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert out.exists(), res.stdout[-6000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == [], report["failures"]
    verdict = report["gate"][family]
    assert verdict["specializations"] > 0
    assert verdict["ok"], (f"{family}: {len(verdict['failures'])} problems, never compiled: {verdict['missing']}\n"
                           + "\n".join(verdict["failures"][:60]))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
