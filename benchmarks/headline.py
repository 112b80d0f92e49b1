"""The headline GPU measurements and a streaming ``attnzoo check``: the steps of ``benchmarks/gpu_run.sh``.

``python -m benchmarks.headline --out DIR [--deadline-s S] [--dry-run]``
    A fixed, short list of cases taken from the suites (nothing is redefined here: shapes, inputs, FLOPs
    -- FlashAttention-3's formula, see :mod:`benchmarks.flops` -- and providers come from
    ``benchmarks/suites`` and :mod:`benchmarks.providers`; each measurement is
    :func:`benchmarks.runner.measure`, i.e. ``triton.testing.do_bench``): attention forward and backward,
    causal and not, 4k-16k tokens, bf16, head dim 128; decode; lightning; MoH; DMA -- attnzoo against
    SDPA's FlashAttention-2 and cuDNN backends (for MoH the same two under the dense-then-mask scheme;
    for DMA SDPA's efficient backend with the dense mask, the only SDPA backend that takes one).
    Ordered by value: first one case per family, then the remaining sequence lengths. Each record is
    appended to ``DIR/headline.jsonl`` (and flushed) the moment it is measured, after one environment
    line (GPU, driver, torch, triton, commit); no case starts once ``--deadline-s`` has passed.
    Timing only: outputs are not compared with an fp32 gold answer here (``attnzoo check`` and the GPU
    tests do that), so records carry ``checked: false``.

``python -m benchmarks.headline check [--deadline-s S] [--dry-run]``
    ``attnzoo check`` (every backend of every op against the reference), one case at a time, its rows
    printed as each case finishes.

``--dry-run`` (what CI runs, no GPU): resolves every case and provider by name, imports what the real run
imports and prints the plan, timing nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

# (suite, case name, providers) in the order they run; names are the suites' own (full level)
_ATTN = ("attnzoo-triton", "sdpa-flash", "sdpa-cudnn")
_MOH = ("attnzoo-triton", "dense-mask-sdpa-flash", "dense-mask-sdpa-cudnn")
_DMA = ("attnzoo-dma-triton", "sdpa-efficient-densemask")
_LIGHTNING = ("attnzoo-triton",)  # no SDPA equivalent; fla-core / lightning-attn join where installed
_LIGHTNING_PEERS = ("fla-chunk", "fla-recurrent", "lightning-attn")


def _attention(mode: str, causal: bool, T: int) -> Tuple[str, str, Tuple[str, ...]]:
    return ("attention", f"{mode} {'causal' if causal else 'full'} D=128 MHA 16/16 T={T // 1024}k", _ATTN)


FIRST: List[Tuple[str, str, Tuple[str, ...]]] = [
    _attention("fwd", True, 8192), _attention("bwd", True, 8192),
    _attention("fwd", False, 8192), _attention("bwd", False, 8192),
    ("decode", "Tn=1 B=8 GQA 32/8 contiguous Tk=16k", _ATTN),
    ("lightning", "fwd H=32 D=128 T=8k", _LIGHTNING + _LIGHTNING_PEERS),
    ("lightning", "fwd+bwd H=32 D=128 T=8k", _LIGHTNING + _LIGHTNING_PEERS),
    ("lightning", "decode step H=32 D=128 B=64", _LIGHTNING + _LIGHTNING_PEERS),
    ("moh", "fwd causal T=8k H=32 D=128 active=0.75", _MOH),
    ("moh", "fwd+bwd causal T=8k H=32 D=128 active=0.75", _MOH),
    ("sparse", "DMA fwd causal T=8192 H=16/8 D=128 keep_window=1024", _DMA),
    ("sparse", "DMA fwd+bwd causal T=8192 H=16/8 D=128 keep_window=1024", _DMA),
]
THEN: List[Tuple[str, str, Tuple[str, ...]]] = [
    _attention(mode, causal, T) for T in (4096, 16384) for causal in (True, False) for mode in ("fwd", "bwd")
] + [
    ("decode", "Tn=1 B=64 GQA 32/8 contiguous Tk=4k", _ATTN),
    ("decode", "Tn=1 B=1 GQA 32/8 contiguous Tk=128k", _ATTN),
]
HEADLINE = FIRST + THEN
DTYPE = "bfloat16"
UNCHECKED = "timing only: not compared with the fp32 gold answer here (attnzoo check and the GPU tests do that)"


def plan(entries: Sequence[Tuple[str, str, Tuple[str, ...]]] = HEADLINE):
    """``[(suite, case, [providers])]`` resolved from the suites by name; a name that no longer exists is
    an error (KeyError naming it), so a renamed case cannot silently drop out of the headline."""
    from benchmarks import suites as S

    out, cache = [], {}
    for suite_name, case_name, wanted in entries:
        if suite_name not in cache:
            suite = S.get(suite_name)
            cache[suite_name] = (suite, {c.name: c for c in suite.cases("full")},
                                 {p.name: p for p in suite.providers()})
        suite, cases, provs = cache[suite_name]
        if case_name not in cases:
            raise KeyError(f"headline: suite {suite_name!r} has no case {case_name!r}")
        missing = [p for p in wanted if p not in provs]
        if missing:
            raise KeyError(f"headline: suite {suite_name!r} has no provider(s) {missing}")
        case = cases[case_name]
        out.append((suite, case, [provs[p] for p in wanted if provs[p].applies(case)]))
    return out


def _write(f, rec: Dict[str, Any]) -> None:
    from benchmarks.runner import _json_safe

    f.write(json.dumps(_json_safe(rec)) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_headline(out_dir: str, deadline_s: float, dry: bool, timing: str = "quick") -> int:
    t0 = time.monotonic()
    steps = plan()
    if dry:
        print(f"headline (dry run): {len(steps)} cases, {sum(len(p) for _, _, p in steps)} measurements, {DTYPE}")
        for suite, case, provs in steps:
            print(f"  {suite.name:9s} {case.name:55s} {case.mode:7s} flops={case.flops or 0:.3g} bytes="
                  f"{case.bytes or 0:.3g} | {', '.join(p.name for p in provs)}")
        import importlib

        for mod in ("benchmarks.runner", "triton.testing"):  # what the real run imports
            importlib.import_module(mod)
        return 0

    import torch

    from benchmarks.runner import environment, measure, triton_bench, TIMING

    if not torch.cuda.is_available():
        print("headline: no CUDA GPU here (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, DTYPE)
    env = environment(device)
    bandwidth = (env.get("gpu") or {}).get("bandwidth_bytes_per_s")
    bench = triton_bench(**TIMING[timing])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "headline.jsonl")
    print(f"headline: {len(steps)} cases -> {path}; GPU {(env.get('gpu') or {}).get('name')}, driver "
          f"{env.get('driver')}, torch {env.get('torch')}, triton {env.get('triton')}, commit {env.get('commit')}",
          flush=True)
    done = 0
    with open(path, "a") as f:
        _write(f, {"kind": "environment", "schema": "attnzoo.headline/1", "dtype": DTYPE, "timing": TIMING[timing],
                   "autotune": os.environ.get("ATTNZOO_AUTOTUNE", "all"), "environment": env})
        for suite, case, provs in steps:
            for prov in provs:
                left = deadline_s - (time.monotonic() - t0)
                if left <= 0:
                    print(f"headline: deadline reached ({deadline_s:.0f} s) after {done} measurements", flush=True)
                    return 0
                reason = prov.unavailable_reason(device)
                if reason:
                    rec = {"suite": suite.name, "case": case.name, "provider": prov.name, "status": "unavailable",
                           "message": reason}
                else:
                    inputs = suite.make_inputs(case, device, dtype)
                    t = time.monotonic()
                    rec = measure(suite, case, prov, inputs, {"error": "skipped", "grads": {}}, device, DTYPE,
                                  bench, bandwidth)
                    rec["wall_s"] = round(time.monotonic() - t, 2)
                    if rec.get("message", "").startswith("not checked"):
                        rec["message"] = UNCHECKED
                    del inputs
                    torch.cuda.empty_cache()
                rec["kind"] = "measurement"
                _write(f, rec)
                done += 1
                rate = (f"{rec['tflops']:.1f} TFLOP/s" if rec.get("tflops") else
                        f"{rec['gbps']:.0f} GB/s" if rec.get("gbps") else "")
                ms = f"{rec['ms']:.3f} ms" if rec.get("ms") else ""
                print(f"[{time.monotonic() - t0:6.1f}s] {suite.name:9s} {case.name:55s} {prov.name:26s} "
                      f"{rec.get('status')} {ms} {rate} {'' if rec.get('status') == 'ok' else rec.get('message', '')}",
                      flush=True)
    print(f"headline: all {done} measurements in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


def run_check(deadline_s: float, dry: bool) -> int:
    """``attnzoo check``, one case at a time, rows printed as each case finishes (and no case started
    once the deadline has passed)."""
    t0 = time.monotonic()
    from attnzoo import check as C

    cases = C.all_cases()
    if dry:
        print(f"check (dry run): {len(cases)} cases")
        for case in cases:
            print(f"  {case.op:28s} {case.name}")
        return 0
    import torch

    all_cases = C.all_cases
    n_pass = n_fail = n_skip = 0
    header = True
    try:
        for i, case in enumerate(cases):
            if time.monotonic() - t0 > deadline_s:
                print(f"check: deadline reached ({deadline_s:.0f} s) after {i} of {len(cases)} cases", flush=True)
                break
            C.all_cases = lambda case=case: [case]  # run_checks walks all_cases(): one case per call
            rows = C.run_checks(device="cuda" if torch.cuda.is_available() else "cpu", progress=False)
            table = C.format_table(rows).splitlines()
            print("\n".join(table if header else table[2:]), flush=True)
            header = False
            n_pass += sum(r.status == "pass" for r in rows)
            n_fail += sum(r.status == "FAIL" for r in rows)
            n_skip += sum(r.status == "skip" for r in rows)
    finally:
        C.all_cases = all_cases
    print(f"\n{n_pass} passed, {n_fail} failed, {n_skip} skipped in {time.monotonic() - t0:.0f} s", flush=True)
    return 1 if n_fail else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="headline", choices=["headline", "check"])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/attnzoo-out"))
    ap.add_argument("--deadline-s", type=float, default=300.0, help="start nothing after this many seconds")
    ap.add_argument("--timing", choices=["quick", "full"], default="quick", help="do_bench warmup/rep (runner.TIMING)")
    ap.add_argument("--dry-run", action="store_true", help="plan and imports only (no GPU needed)")
    args = ap.parse_args(argv)
    if args.what == "check":
        return run_check(args.deadline_s, args.dry_run)
    return run_headline(args.out, args.deadline_s, args.dry_run, args.timing)


if __name__ == "__main__":
    sys.exit(main())
