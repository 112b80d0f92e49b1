"""Compile every attnzoo Triton kernel for a GPU architecture on a machine without a GPU.

The CPU interpreter runs the kernels' logic but never Triton's GPU code generation, so a kernel can pass
every CPU test and still fail to compile (or spill badly) on an H100. This tool closes that gap offline:

- a stand-in Triton driver reports a CUDA target (``--arch 90`` = H100 by default) so launches compile
  without a device;
- every launch ``kernel[grid](...)`` becomes a compile-only warmup; an autotuned kernel compiles *every*
  config its pruning keeps for those arguments;
- the scenarios below drive the public ops and modules (``backend="triton"``) forward and backward over
  the feature matrix on small CPU tensors, so the kernels see the exact arguments, constexprs and
  specializations a real run would (values are garbage: nothing is launched, so nothing is checked);
- each compiled cubin goes through ``cuobjdump --dump-resource-usage`` (Triton bundles one) for its
  registers and stack frame (a stack frame means spilled registers); the table lists them with the
  shared memory Triton reserved, and ``--json`` writes them out.

- each specialization's PTX gives its code generation (static instruction counts, :func:`ptx_features`):
  global loads by width (128-bit ``ld.global.v4`` / 16-byte ``cp.async`` / TMA against narrower ones),
  pipelining (``cp.async`` or TMA bulk copies), tensor-core instructions (``wgmma`` or ``mma.sync``).

``--gate`` compiles only the hot kernels (:data:`HOT`: attention fwd / dQ / dK-dV and decode, MoH and DMA
fwd / dQ / dK-dV, lightning fwd / bwd, KHA-MLP fwd / bwd) in :data:`GATE_SCENARIOS` (head dims 64 and
128), every config their autotuners offer, and fails (exit 1) when one lacks 128-bit tile loads,
pipelined loads, or spills (:func:`gate_problems`); the verdict is printed per family and goes into
``--json``. ``--jobs N`` compiles in N processes.

Exit status 1 if any kernel fails to compile (or, with ``--gate``, fails the gate). Run with the Triton you
want to check (CI has 3.9, the GPU machine 3.6):
``python tools/cross_compile.py [--arch 90] [--dtypes float16,bfloat16] [--families ...] [--gate]``.
``TRITON_INTERPRET`` must be unset (the tool refuses otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import OrderedDict

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as _driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, KernelInterface

# the attnzoo to check: the one in the working directory when there is one (so another checkout can be
# judged with this tool: ``cd ../other && python /path/to/tools/cross_compile.py``), else this tool's own
_CWD = os.getcwd()
ROOT = _CWD if os.path.isfile(os.path.join(_CWD, "attnzoo", "__init__.py")) else \
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attnzoo import backends  # noqa: E402


class CompileOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.run(warmup=True)``: a fixed CUDA target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def refuse(*_a, **_k):
            raise RuntimeError("cross_compile: nothing may be timed (compile-only driver)")
        return refuse

    def is_active(self):
        return True


# (kernel, warps, stages, constexprs, tensor dtypes) -> record (with the cubin) of each specialization
RECORDS: "OrderedDict[tuple, dict]" = OrderedDict()
FAILURES = []
_SCENARIO = ["-"]


def _record(fn: JITFunction, kernel, kwargs):
    name = fn.__name__ if hasattr(fn, "__name__") else getattr(fn, "_fn_name", str(fn))
    meta = kernel.metadata
    const = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr and p.name in kwargs}
    key = (name, meta.num_warps, meta.num_stages, tuple(sorted(const.items())),
           tuple(sorted((k, str(v.dtype)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))))
    if key not in RECORDS:
        RECORDS[key] = {"kernel": name, "scenario": _SCENARIO[0], "num_warps": meta.num_warps,
                        "num_stages": meta.num_stages, "shared_bytes": getattr(meta, "shared", None),
                        "constexprs": const, "cubin": kernel.asm.get("cubin", b""),
                        "ptx": kernel.asm.get("ptx", ""), "key": repr(key)}


def _jit_compile_only(self: JITFunction, grid, args, kwargs):
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
    if ONLY_KERNELS[0] is not None and self.__name__ not in ONLY_KERNELS[0]:
        return None  # --gate: only the hot kernels compile (nothing runs, so skipping a launch is harmless)
    try:
        kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the run goes on
        FAILURES.append((_SCENARIO[0], self.__name__, {k: v for k, v in bound.items() if k.isupper()},
                         "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]))
        return None
    if kernel is not None:
        _record(self, kernel, bound)
    return kernel


FIRST_CONFIG_ONLY = [False]
ONLY_KERNELS = [None]  # a set of kernel names: compile only these (--gate)


def _autotuner_compile_only(self: Autotuner, grid, args, kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    try:
        configs = self.prune_configs(kwargs)
    finally:
        self.nargs = None
    for config in configs[:1] if FIRST_CONFIG_ONLY[0] else configs:
        full = dict(kwargs, **config.all_kwargs())
        _compile_only(self.fn, grid, args, full)


def _compile_only(fn, grid, args, kwargs):
    if isinstance(fn, Autotuner):
        return _autotuner_compile_only(fn, grid, args, kwargs)
    if isinstance(fn, JITFunction):
        return _jit_compile_only(fn, grid, args, kwargs)
    raise TypeError(f"cross_compile: unexpected kernel object {type(fn).__name__}")


def install(arch: int):
    """Make every ``kernel[grid](...)`` a compile-only warmup for ``sm_<arch>`` and let the Triton
    backends accept CPU tensors (their device check would otherwise refuse them)."""
    _driver.set_active(CompileOnlyDriver(arch))
    KernelInterface.__getitem__ = lambda self, grid: (lambda *a, **k: _compile_only(self, grid, a, k))
    real_tensor_reasons = backends.triton_tensor_reasons

    def tensor_reasons(t, name="inputs"):  # dtype checks stay; the CPU-device and CPU-bf16 refusals go
        return [r for r in real_tensor_reasons(t, name) if "interpreter" not in r and "CUDA tensor" not in r]

    backends.triton_device_reasons = lambda device: []
    backends.triton_tensor_reasons = tensor_reasons


# ----------------------------------------------------------------------------------------------------
# Scenarios: public ops and modules, forward + backward, over the feature matrix


def _t(*shape, dtype, grad=True):
    t = torch.randn(*shape, dtype=dtype)
    return t.requires_grad_(grad)


def _backward(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ts = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
    if ts:
        torch.autograd.backward(ts, [torch.ones_like(o) for o in ts])


def scenarios_attention(dtype):
    import attnzoo
    from attnzoo.ops.masks import block_mask as bm

    B, T, H, Hkv = 1, 256, 4, 2
    for D in (64, 96, 128, 256):
        def run(D=D, **kw):
            q, k, v = _t(B, T, H, D, dtype=dtype), _t(B, T, Hkv, D, dtype=dtype), _t(B, T, Hkv, D, dtype=dtype)
            _backward(attnzoo.attention(q, k, v, backend="triton", **kw))
        yield f"attention D={D} causal", lambda run=run: run(causal=True)
        if D in (64, 128):
            yield f"attention D={D} plain", lambda run=run: run()
            yield f"attention D={D} window", lambda run=run: run(causal=True, window=(64, 0))
            yield f"attention D={D} bias[B,H,T,T]", lambda run=run: run(bias=_t(B, H, T, T, dtype=dtype))
            yield f"attention D={D} bias[1,H,1,T]", lambda run=run: run(bias=_t(1, H, 1, T, dtype=dtype))
            yield f"attention D={D} mask", lambda run=run: run(mask=torch.rand(B, 1, T, T) > 0.5)
            yield f"attention D={D} key padding", lambda run=run: run(
                causal=True, key_padding_mask=torch.ones(B, T, dtype=torch.bool))
            yield f"attention D={D} block mask", lambda run=run: run(
                block_mask=bm.causal_block_mask(B, H, T, T, block_size=(128, 128)))

            def varlen(D=D):
                cu = torch.tensor([0, 100, T], dtype=torch.int32)
                q, k, v = _t(T, H, D, dtype=dtype), _t(T, Hkv, D, dtype=dtype), _t(T, Hkv, D, dtype=dtype)
                _backward(attnzoo.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                            backend="triton"))
            yield f"attention D={D} varlen", varlen

            def decode(D=D, paged=False):
                q = _t(4, 2, 8, D, dtype=dtype, grad=False)
                if paged:
                    kc, vc = _t(16, 64, 2, D, dtype=dtype, grad=False), _t(16, 64, 2, D, dtype=dtype, grad=False)
                    table = torch.arange(16, dtype=torch.int32).reshape(4, 4)
                else:
                    kc, vc = _t(4, 256, 2, D, dtype=dtype, grad=False), _t(4, 256, 2, D, dtype=dtype, grad=False)
                    table = None
                lens = torch.full((4,), 200, dtype=torch.int32)
                attnzoo.attention_with_kvcache(q, kc, vc, lens, block_table=table, backend="triton")
            yield f"decode D={D}", decode
            yield f"decode D={D} paged", lambda decode=decode: decode(paged=True)


def scenarios_lightning(dtype):
    import attnzoo
    from attnzoo.ops.lightning import triton_backend as tb
    from attnzoo.ops.lightning.triton_chunk import default_chunk_size

    for D, Dv in ((64, 64), (128, 128), (96, 192), (256, 256)):
        def run(D=D, Dv=Dv):
            q, k, v = _t(2, 200, 4, D, dtype=dtype), _t(2, 200, 4, D, dtype=dtype), _t(2, 200, 4, Dv, dtype=dtype)
            h0 = _t(2, 4, D, Dv, dtype=torch.float32)
            tb.CHUNK_SIZE = default_chunk_size(torch.device("cuda"), D, Dv, dtype)  # what a GPU run picks
            try:
                out = attnzoo.lightning_attention(q, k, v, decay=torch.rand(4), initial_state=h0,
                                                  output_final_state=True, backend="triton")
                _backward(out)
            finally:
                tb.CHUNK_SIZE = None

        def decode(D=D, Dv=Dv):
            with torch.no_grad():
                q, k, v = (_t(2, 4, 4, D, dtype=dtype, grad=False), _t(2, 4, 4, D, dtype=dtype, grad=False),
                           _t(2, 4, 4, Dv, dtype=dtype, grad=False))
                state = torch.zeros(2, 4, D, Dv)
                attnzoo.lightning_decode(q, k, v, state, decay=torch.rand(4), backend="triton")
        yield f"lightning D={D} Dv={Dv}", run
        yield f"lightning decode D={D} Dv={Dv}", decode
        if D == Dv == 64 or D == Dv == 128:
            yield f"lightning D={D} Dv={Dv} segmented", lambda run=run: _segmented(run)


def _segmented(fn):
    """``fn`` with sequences cut into segments (a CPU run would never cut them): the state-only and
    dS-only sweeps compile too."""
    from attnzoo.ops.lightning import triton_backend as tb

    tb.SEGMENTS = 3
    try:
        fn()
    finally:
        tb.SEGMENTS = None


def scenarios_moh(dtype):
    import attnzoo
    from attnzoo.ops.moh.router_api import moh_router

    B, T, H, Hkv = 2, 256, 8, 4
    for D in (64, 128):
        def run(D=D, causal=True):
            q, k, v = _t(B, T, H, D, dtype=dtype), _t(B, T, Hkv, D, dtype=dtype), _t(B, T, Hkv, D, dtype=dtype)
            gates = (torch.rand(B, T, H) * (torch.rand(B, T, H) > 0.5)).to(dtype).requires_grad_()
            _backward(attnzoo.moh_attention(q, k, v, gates, causal=causal, backend="triton"))
        yield f"moh D={D} causal", run
        yield f"moh D={D} non-causal", lambda run=run: run(causal=False)

        def decode(D=D):
            with torch.no_grad():
                q = _t(4, 1, H, D, dtype=dtype, grad=False)
                k, v = _t(4, 300, Hkv, D, dtype=dtype, grad=False), _t(4, 300, Hkv, D, dtype=dtype, grad=False)
                gates = (torch.rand(4, 1, H) > 0.5).to(dtype)
                attnzoo.moh_attention(q, k, v, gates, causal=True, backend="triton")
        yield f"moh decode D={D}", decode

    for normalize in ("code", "paper"):
        def router(normalize=normalize):
            out = moh_router(_t(B, T, 6, dtype=dtype), _t(B, T, 2, dtype=dtype), _t(B, T, 2, dtype=dtype),
                             top_k=3, normalize=normalize, backend="triton")
            (out.gates.float().sum() + out.probs.float().sum()).backward()
        yield f"moh router {normalize}", router


def scenarios_dma(dtype):
    import attnzoo

    for D in (64, 128):
        def run(D=D, causal=True):
            B, T, H, Hkv = 1, 256, 4, 2
            q, k, v = _t(B, T, H, D, dtype=dtype), _t(B, T, Hkv, D, dtype=dtype), _t(B, T, Hkv, D, dtype=dtype)
            bias = _t(B, Hkv, T, dtype=dtype)
            _backward(attnzoo.dynamic_mask_attention(q, k, v, bias, keep_window=64, causal=causal,
                                                     backend="triton"))
        yield f"dma D={D} causal", run
        yield f"dma D={D} non-causal", lambda run=run: run(causal=False)


def scenarios_knocking(dtype):
    import attnzoo

    for D in (64, 128, 256):
        def run(D=D):
            v = _t(2, 128, 4, D, dtype=dtype)
            w_up, w_gate, w_down = _t(D, D, dtype=dtype), _t(D, D, dtype=dtype), _t(D, D, dtype=dtype)
            _backward(attnzoo.kha_mlp(v, w_up, w_gate, w_down, backend="triton"))
        yield f"kha-mlp D={D}", run


QUICK = ("D=64 causal", "D=64 bias[B,H,T,T]", "D=64 mask", "D=64 varlen", "decode D=64", "D=96 Dv=192",
         "D=64 Dv=64", "moh router code", "kha-mlp D=64")  # "D=64 Dv=64" includes the segmented run

FAMILIES = OrderedDict(attention=scenarios_attention, lightning=scenarios_lightning, moh=scenarios_moh,
                       dma=scenarios_dma, knocking=scenarios_knocking)


# ----------------------------------------------------------------------------------------------------
# Resource usage from the cubin


def find_cuobjdump():
    """Triton's bundled cuobjdump (it reads the cubins its own ptxas writes), else one on PATH."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_usage(cubin: bytes, cuobjdump: str):
    """(registers, stack bytes, static shared bytes, local bytes) of the cubin's one kernel; a kernel that
    spills registers shows a stack frame / local memory."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        p = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
    m = _USAGE.search(p.stdout)
    return tuple(int(x) for x in m.groups()) if p.returncode == 0 and m else None


# ----------------------------------------------------------------------------------------------------
# Code generation from the PTX: load widths, pipelining, tensor-core instructions

# ld.global[.qualifiers][.vN].<type><bits> -- Triton moves 16-bit tiles as b32 words (v4.b32 = 8 halves)
_LD = re.compile(r"\bld\.global((?:\.[A-Za-z0-9_:]+)*?)(?:\.v(\d))?\.[bfsu](\d+)\b")
_ST = re.compile(r"\bst\.global((?:\.[A-Za-z0-9_:]+)*?)(?:\.v(\d))?\.[bfsu](\d+)\b")
# cp.async.{ca,cg}.shared.global [dst], [src], <copy bytes>: the LDGSTS of Ampere/Hopper software pipelining
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_TMA = re.compile(r"\bcp\.async\.bulk\.tensor\b")
_WGMMA = re.compile(r"\bwgmma\.mma_async\b")
_MMA = re.compile(r"\bmma\.sync\b")

#: The loads a kernel may have besides its 128-bit tile loads: per-program scalars (sequence bounds, decay
#: rates, block-table entries) and per-row vectors (fp32 log-sum-exp and delta rows, int32 row indices, a
#: gate per row) -- 32-bit or wider, a few per vector. A 16-bit tile loaded narrow shows up as tens to
#: hundreds of 16-bit loads (a [64, 128] fp16 tile on 128 threads: 64 b16 loads against 8 v4.b32), or, loaded
#: in pairs or quads, as more 32/64-bit loads than the kernel has 128-bit ones. So a kernel passes with at
#: most SUB32_LOADS_MAX loads narrower than 32 bits (gathers of 16-bit per-row values) and no more 32/64-bit
#: loads (cp.async included) than max(SCALAR_LOADS_MAX, its 128-bit loads).
SUB32_LOADS_MAX = 8
SCALAR_LOADS_MAX = 8


def ptx_features(ptx: str) -> dict:
    """What the kernel's PTX does with global memory and tensor cores (static instruction counts):
    ``loads`` {bits: n} of ``ld.global`` and ``cp.async`` together, ``ld128`` (128-bit ones),
    ``narrow_loads`` (the rest), ``cp_async`` {bytes: n}, ``tma`` (bulk tensor copies), ``stores``
    {bits: n}, ``wgmma`` / ``mma`` (Hopper warp-group MMAs / Ampere mma.sync)."""
    loads, stores, cp = {}, {}, {}
    for m in _LD.finditer(ptx):
        bits = int(m.group(2) or 1) * int(m.group(3))
        loads[bits] = loads.get(bits, 0) + 1
    for m in _ST.finditer(ptx):
        bits = int(m.group(2) or 1) * int(m.group(3))
        stores[bits] = stores.get(bits, 0) + 1
    for m in _CP_ASYNC.finditer(ptx):
        n = int(m.group(1), 0)
        cp[n] = cp.get(n, 0) + 1
        loads[8 * n] = loads.get(8 * n, 0) + 1
    tma = len(_TMA.findall(ptx))
    ld128 = sum(n for b, n in loads.items() if b >= 128) + tma
    narrow = sum(n for b, n in loads.items() if b < 128)
    return {"loads": dict(sorted(loads.items())), "ld128": ld128, "narrow_loads": narrow,
            "cp_async": dict(sorted(cp.items())), "tma": tma, "stores": dict(sorted(stores.items())),
            "wgmma": len(_WGMMA.findall(ptx)), "mma": len(_MMA.findall(ptx))}


# ----------------------------------------------------------------------------------------------------
# The gate: hot kernels at head dims 64 and 128, every config their autotuners offer

#: family -> the kernels that carry its training and inference time
HOT = OrderedDict(
    attention=("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_decode_kernel"),
    lightning=("_lightning_fwd_kernel", "_lightning_bwd_dq_kernel", "_lightning_bwd_dk_kernel",
               "_lightning_bwd_dv_kernel"),
    moh=("_moh_fwd_kernel", "_moh_bwd_dq_kernel", "_moh_bwd_dkdv_kernel"),
    dma=("_dma_fwd_kernel", "_dma_bwd_dq_kernel", "_dma_bwd_dkdv_kernel"),
    knocking=("_kha_mlp_fwd_kernel", "_kha_mlp_bwd_dv_kernel", "_kha_mlp_bwd_dw_kernel"),
)
#: family -> the scenarios (exact names) the gate compiles: the plain feature set at head dims 64 and 128
#: (attention also with a BlockMask: causal 128x128 blocks with a mask_mod, full and partial blocks)
GATE_SCENARIOS = OrderedDict(
    attention=tuple(f"{s} D={d}{c}" for d in (64, 128) for s, c in (("attention", " causal"), ("attention", " plain"),
                                                                     ("attention", " block mask"), ("decode", ""))),
    lightning=tuple(f"lightning D={d} Dv={d}{s}" for d in (64, 128) for s in ("", " segmented")),
    moh=tuple(f"moh D={d} {c}" for d in (64, 128) for c in ("causal", "non-causal")),
    dma=tuple(f"dma D={d} {c}" for d in (64, 128) for c in ("causal", "non-causal")),
    knocking=tuple(f"kha-mlp D={d}" for d in (64, 128)),
)
GATE_RULES = ("128-bit tile loads (ld.global.v4 / 16-byte cp.async / TMA; besides them at most "
              f"{SUB32_LOADS_MAX} loads under 32 bits and no more 32/64-bit loads than max({SCALAR_LOADS_MAX}, "
              "128-bit loads): scalars and per-row vectors)",
              "pipelined loads (cp.async or TMA in the tile loop)", "no spill (no stack frame, no local memory)")


def gate_problems(rec: dict) -> list:
    """Why one compiled specialization of a hot kernel fails the gate (empty: it passes)."""
    f = rec.get("codegen")
    out = []
    if f is None:
        return ["no PTX"]
    sub32 = sum(n for b, n in f["loads"].items() if b < 32)
    mid = sum(n for b, n in f["loads"].items() if 32 <= b < 128)
    if f["ld128"] == 0 or sub32 > SUB32_LOADS_MAX or mid > max(SCALAR_LOADS_MAX, f["ld128"]):
        cp = ", ".join(f"{n} x {b} B" for b, n in f["cp_async"].items() if b < 16)
        out.append(f"tile loads not 128-bit ({f['ld128']} x 128-bit; "
                   + ", ".join(f"{n} x {b}-bit" for b, n in f["loads"].items() if b < 128)
                   + (f"; of them cp.async {cp}" if cp else "") + ")")
    if not f["cp_async"] and not f["tma"]:
        out.append("loads not pipelined (no cp.async / TMA)")
    if rec.get("stack_bytes") is None:
        out.append("spill unknown (no cuobjdump)")
    elif rec["stack_bytes"] or rec.get("local_bytes"):
        out.append(f"spills (stack {rec['stack_bytes']} B, local {rec.get('local_bytes')} B)")
    return out


def gate_verdict(rows: list, families) -> "OrderedDict[str, dict]":
    """family -> {"ok": bool, "specializations": n, "failures": [...], "missing": [hot kernels never compiled]}."""
    out = OrderedDict()
    for fam in families:
        hot = HOT[fam]
        mine = [r for r in rows if r["kernel"] in hot]
        fails = []
        for r in mine:
            for p in gate_problems(r):
                fails.append(f"{r['kernel']} [{_describe(r)}] {r['scenario']}: {p}")
        missing = sorted(set(hot) - {r["kernel"] for r in mine})
        out[fam] = {"ok": not fails and not missing, "specializations": len(mine), "failures": fails,
                    "missing": missing}
    return out


def _describe(r: dict) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in r["constexprs"].items()
                     if k.startswith(("BLOCK", "BT", "BK", "BV", "BD", "HEAD")))
    return f"{tiles} w{r['num_warps']} s{r['num_stages']}"


def main(argv=None) -> int:
    # checked before any kernel module is imported (the scenarios import them): Triton reads it at definition
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("cross_compile: unset TRITON_INTERPRET (the interpreter never runs GPU code generation)")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100, 80 = A100)")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {list(FAMILIES)}")
    ap.add_argument("--match", default="", help="only scenarios whose name contains this")
    ap.add_argument("--quick", action="store_true",
                    help="a few scenarios per family and the first surviving config of each autotuned kernel "
                         "(CI's fast compile check; --gate is the codegen check)")
    ap.add_argument("--gate", action="store_true",
                    help="compile only the hot kernels, in the gate's scenarios (head dims 64 and 128), every "
                         "config their autotuners offer; exit 1 if any fails: " + "; ".join(GATE_RULES))
    ap.add_argument("--json", help="write the records (no cubins) here")
    ap.add_argument("--no-usage", action="store_true", help="skip the register/spill report")
    ap.add_argument("--jobs", type=int, default=1,
                    help="compile in this many processes (each takes every N-th scenario; the table merges them)")
    ap.add_argument("--shard", default="", help=argparse.SUPPRESS)  # "i/N": a --jobs worker
    args = ap.parse_args(argv)
    if args.gate and (args.quick or args.no_usage):
        ap.error("--gate judges every config and the spills: not with --quick or --no-usage")
    families = args.families.split(",")
    for fam in families:
        if fam not in FAMILIES:
            ap.error(f"--families: unknown family {fam!r}; choose from {list(FAMILIES)}")

    t0 = time.time()
    if args.jobs > 1:
        rows = _run_jobs(args, argv if argv is not None else sys.argv[1:])
    else:
        rows = _compile_all(args, families, t0)
    if args.shard:
        with open(args.json, "w") as f:
            json.dump({"kernels": rows, "failures": [list(x) for x in FAILURES]}, f, default=str)
        return 0
    return _report(args, families, rows, t0)


def _run_jobs(args, argv):
    """``--jobs N``: N child processes, each compiling every N-th scenario (``--shard i/N``); their records
    merged (a specialization two shards both compiled is listed once) and their failures collected."""
    with tempfile.TemporaryDirectory() as d:
        # the same command line less --json / --jobs (and their values), plus the shard and its output
        clean, skip = [], False
        for a in argv:
            if skip:
                skip = False
                continue
            if a in ("--json", "--jobs"):
                skip = True
                continue
            if a.startswith(("--json=", "--jobs=")):
                continue
            clean.append(a)
        procs = []
        for i in range(args.jobs):
            out = os.path.join(d, f"shard{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *clean, "--shard", f"{i}/{args.jobs}", "--json", out]
            procs.append((subprocess.Popen(cmd), out))
        merged = OrderedDict()
        for p, out in procs:
            p.wait()
            if not os.path.exists(out):
                FAILURES.append(("-", "<shard>", {}, f"a --jobs worker exited with status {p.returncode}, no records"))
                continue
            with open(out) as fh:
                part = json.load(fh)
            for r in part["kernels"]:
                feats = r.get("codegen")
                if feats:  # JSON made the {bits: count} keys strings
                    for k in ("loads", "cp_async", "stores"):
                        feats[k] = {int(b): n for b, n in feats[k].items()}
                merged.setdefault(r["key"], r)
            FAILURES.extend(tuple(x) for x in part["failures"])
    return list(merged.values())


def _compile_all(args, families, t0):
    """Run the selected scenarios (this shard's share of them) with compile-only launches; the records with
    registers, spills and the PTX's code-generation features."""
    install(args.arch)
    FIRST_CONFIG_ONLY[0] = args.quick
    if args.gate:
        ONLY_KERNELS[0] = {k for fam in families for k in HOT[fam]}
    shard, n_shards = (int(x) for x in args.shard.split("/")) if args.shard else (0, 1)
    torch.manual_seed(0)
    index = -1
    for fam in families:
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            for name, fn in FAMILIES[fam](dtype):
                if args.match not in name or (args.quick and not any(q in name for q in QUICK)):
                    continue
                if args.gate and name not in GATE_SCENARIOS[fam]:
                    continue
                index += 1
                if index % n_shards != shard:
                    continue
                _SCENARIO[0] = f"{name} {dt}"
                n_before, f_before = len(RECORDS), len(FAILURES)
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - host-side failure of a scenario
                    FAILURES.append((_SCENARIO[0], "<host>", {}, "".join(
                        traceback.format_exception_only(type(e), e)).strip()[-2000:]))
                print(f"[{time.time() - t0:7.1f}s] {_SCENARIO[0]}: {len(RECORDS) - n_before} new kernels"
                      + (f", {len(FAILURES) - f_before} FAILED" if len(FAILURES) > f_before else ""), flush=True)

    cuobjdump = None if args.no_usage else find_cuobjdump()
    rows = []
    for rec in RECORDS.values():
        usage = cubin_usage(rec["cubin"], cuobjdump) if cuobjdump and rec["cubin"] else None
        ptx = rec.get("ptx") or ""
        rec = {k: v for k, v in rec.items() if k not in ("cubin", "ptx")}
        if usage:
            rec.update(registers=usage[0], stack_bytes=usage[1], static_shared_bytes=usage[2], local_bytes=usage[3])
        rec["codegen"] = ptx_features(ptx) if ptx else None
        rec["hot"] = any(rec["kernel"] in HOT[f] for f in HOT)
        rows.append(rec)
    return rows


def _report(args, families, rows, t0) -> int:
    import attnzoo

    print(f"\n{len(rows)} kernel specializations compiled for sm_{args.arch} with triton {triton.__version__} "
          f"in {time.time() - t0:.0f}s; {len(FAILURES)} failures (attnzoo from {os.path.dirname(attnzoo.__file__)})")
    print("ld128: 128-bit global loads (+TMA); nar: narrower loads; async: cp.async bytes x count / TMA; "
          "wgmma: Hopper MMAs (mma.sync as m); * = hot kernel")
    print(f"{'kernel':31s} {'warps':>5s} {'stg':>3s} {'smem KB':>7s} {'regs':>4s} {'stack':>5s} {'ld128':>5s} "
          f"{'nar':>4s} {'async':>10s} {'wgmma':>6s}  tiles | first scenario")
    for r in rows:
        tiles = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith(("BLOCK", "BT", "BK", "BV", "BD")))
        smem = f"{r['shared_bytes'] / 1024:.0f}" if isinstance(r.get("shared_bytes"), int) else "?"
        f = r["codegen"] or {}
        asy = ("tma" if f.get("tma") else "") + " ".join(f"{b}Bx{n}" for b, n in (f.get("cp_async") or {}).items())
        mm = f"{f.get('wgmma', '?')}" + (f"/m{f['mma']}" if f.get("mma") else "")
        name = ("*" if r["hot"] else " ") + r["kernel"][:30]
        print(f"{name:31s} {r['num_warps']:5d} {r['num_stages']:3d} {smem:>7s} {r.get('registers', '?'):>4} "
              f"{r.get('stack_bytes', '?'):>5} {f.get('ld128', '?'):>5} {f.get('narrow_loads', '?'):>4} "
              f"{asy or '-':>10s} {mm:>6s}  {tiles} | {r['scenario']}")
    for scen, kname, const, err in FAILURES:
        print(f"\nFAILED {kname} in '{scen}' {const}\n{err}")
    verdict = None
    if args.gate:
        verdict = gate_verdict(rows, families)
        print(f"\nGATE (sm_{args.arch}, {args.dtypes}, head dims 64/128, every offered config): "
              + "; ".join(GATE_RULES))
        for fam, v in verdict.items():
            print(f"  {fam:10s} {'PASS' if v['ok'] else 'FAIL'}  {v['specializations']} hot specializations, "
                  f"{len(v['failures'])} problems" + (f", never compiled: {v['missing']}" if v["missing"] else ""))
            for line in v["failures"]:
                print(f"      {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
                       "attnzoo": os.path.dirname(attnzoo.__file__),
                       "kernels": rows, "failures": [list(x[:2]) + [x[3]] for x in FAILURES],
                       "gate": verdict}, f, indent=1, default=str)
    if FAILURES:
        return 1
    return 1 if verdict is not None and not all(v["ok"] for v in verdict.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
