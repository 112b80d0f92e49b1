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

Exit status 1 if any kernel fails to compile. Run with the Triton you want to check (CI has 3.9, the GPU
machine 3.6): ``python tools/cross_compile.py [--arch 90] [--dtypes float16,bfloat16] [--families ...]``.
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

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("cross_compile: unset TRITON_INTERPRET (the interpreter never runs GPU code generation)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, KernelInterface  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
                        "constexprs": const, "cubin": kernel.asm.get("cubin", b"")}


def _jit_compile_only(self: JITFunction, grid, args, kwargs):
    bound = dict(zip(self.arg_names, args))
    bound.update(kwargs)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100, 80 = A100)")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {list(FAMILIES)}")
    ap.add_argument("--match", default="", help="only scenarios whose name contains this")
    ap.add_argument("--quick", action="store_true",
                    help="a few scenarios per family and the first surviving config of each autotuned kernel "
                         "(what CI runs)")
    ap.add_argument("--json", help="write the records (no cubins) here")
    ap.add_argument("--no-usage", action="store_true", help="skip the register/spill report")
    args = ap.parse_args(argv)

    install(args.arch)
    FIRST_CONFIG_ONLY[0] = args.quick
    t0 = time.time()
    torch.manual_seed(0)
    for fam in args.families.split(","):
        if fam not in FAMILIES:
            ap.error(f"--families: unknown family {fam!r}; choose from {list(FAMILIES)}")
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            for name, fn in FAMILIES[fam](dtype):
                if args.match not in name or (args.quick and not any(q in name for q in QUICK)):
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
        rec = {k: v for k, v in rec.items() if k != "cubin"}
        if usage:
            rec.update(registers=usage[0], stack_bytes=usage[1], static_shared_bytes=usage[2], local_bytes=usage[3])
        rows.append(rec)
    print(f"\n{len(rows)} kernel specializations compiled for sm_{args.arch} with triton {triton.__version__} "
          f"in {time.time() - t0:.0f}s; {len(FAILURES)} failures")
    print(f"{'kernel':30s} {'warps':>5s} {'stg':>3s} {'smem KB':>7s} {'regs':>4s} {'stack':>5s}  tiles | first scenario")
    for r in rows:
        tiles = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.startswith(("BLOCK", "BT", "BK", "BV", "BD")))
        smem = f"{r['shared_bytes'] / 1024:.0f}" if isinstance(r.get("shared_bytes"), int) else "?"
        print(f"{r['kernel'][:30]:30s} {r['num_warps']:5d} {r['num_stages']:3d} {smem:>7s} {r.get('registers', '?'):>4} "
              f"{r.get('stack_bytes', '?'):>5}  {tiles} | {r['scenario']}")
    for scen, kname, const, err in FAILURES:
        print(f"\nFAILED {kname} in '{scen}' {const}\n{err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
                       "kernels": rows, "failures": [list(x[:2]) + [x[3]] for x in FAILURES]}, f, indent=1,
                      default=str)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
