"""``attnzoo info | check | bench``.

- ``info``: versions, devices, and for each op which backends can run here and why not.
- ``check``: every backend that can run here, of every op, against the reference (outputs and
  gradients, SPEC §0's rule); prints a table, exits non-zero on any failure. Without a GPU the Triton
  kernels run through the interpreter.
- ``bench``: the benchmark suites (see ``benchmarks/``), on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional


def _enable_interpreter_without_gpu() -> None:
    # Must happen before any Triton kernel module is imported (kernels are imported lazily).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def info(print_it: bool = True) -> str:
    """Versions, devices, and for each op which backends can run here and why not (``attnzoo info``)."""
    import torch

    import attnzoo
    from attnzoo import backends
    from attnzoo.check import _dispatch_kwargs, all_cases

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    lines = [
        f"attnzoo  {attnzoo.__version__}",
        f"python   {platform.python_version()}",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {triton_v}" + (" (CPU interpreter on)" if backends.triton_interpreter_on() else ""),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}    {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("gpu      none (CPU only)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    lines += ["", f"backends on {device} (for a small sample input of each op):"]
    seen = set()
    for case in all_cases():
        if case.op in seen:
            continue
        seen.add(case.op)
        inputs = {}
        for k, v in case.make(torch.Generator().manual_seed(0)).items():
            if isinstance(v, torch.Tensor):
                v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
            inputs[k] = v
        for b, rs in backends.why_not(case.op, **_dispatch_kwargs(case, inputs)).items():
            lines.append(f"  {case.op:<24} {b:<10} " + ("yes" if not rs else "no:  " + "; ".join(rs)))
    text = "\n".join(lines)
    if print_it:
        print(text)
    return text


def cmd_info(args) -> int:
    _enable_interpreter_without_gpu()
    info()
    return 0


def cmd_check(args) -> int:
    _enable_interpreter_without_gpu()
    import torch

    from attnzoo.check import format_table, run_checks

    dtypes = None
    if args.dtype:
        dtypes = [getattr(torch, d) for d in args.dtype]
    rows = run_checks(dtypes=dtypes, device=args.device, progress=not args.no_progress)
    print(format_table(rows))
    failed = [r for r in rows if r.status == "FAIL"]
    passed = [r for r in rows if r.status == "pass"]
    print(f"\n{len(passed)} passed, {len(failed)} failed, {len(rows) - len(passed) - len(failed)} skipped")
    return 1 if failed else 0


def cmd_bench(argv: List[str]) -> int:
    from benchmarks.runner import main as bench_main

    return bench_main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    parser = argparse.ArgumentParser(prog="attnzoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, which backends can run here and why not")
    pc = sub.add_parser("check", help="every available backend against the reference")
    pc.add_argument("--dtype", action="append", choices=["float16", "bfloat16", "float32"], help="repeatable")
    pc.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    pc.add_argument("--no-progress", action="store_true")
    sub.add_parser("bench", help="benchmark suites (attnzoo bench --help)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
