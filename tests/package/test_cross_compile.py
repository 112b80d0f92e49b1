"""Every family's Triton kernels compile for the H100 (sm_90), not just run under the interpreter.

The CPU interpreter never runs Triton's GPU code generation, and the autotuner's pruning only runs on a GPU,
so a kernel (or a config pruner) can pass every CPU test and still break on the first GPU launch.
``tools/cross_compile.py --quick`` drives the public ops forward and backward with a compile-only Triton
driver: every launch compiles (the first config each autotuner keeps) down to a cubin. On a GPU the other
tests compile the kernels for real.
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
