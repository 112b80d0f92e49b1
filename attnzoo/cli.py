"""attnzoo's command line: efficient attention variants, checked against their reference.

commands:
  info    versions, devices, and for each op which backends can run here and why not
  check   every backend that can run here, of every op, against the PyTorch reference (outputs and
          gradients, SPEC section 0's accuracy rule); a table; exits non-zero on any failure. Without a
          GPU the Triton kernels run through the CPU interpreter.
  study   small training studies of the variants on CPU (`attnzoo study --help`; `--quick` for a smoke run)
  bench   the benchmark suites of a checkout of the attnzoo repository (benchmarks/ is not installed);
          `attnzoo bench --help` lists them, `attnzoo bench --dry-run` shows what a run would do.

Run `attnzoo COMMAND --help` for a command's options.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from attnzoo.environment import info


def _enable_interpreter_without_gpu() -> None:
    # Must happen before any Triton kernel module is imported (kernels are imported lazily).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


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


def benchmarks_root() -> Optional[Path]:
    """The checkout holding ``benchmarks/`` (which is not installed with the package): ``ATTNZOO_REPO``, else
    the current directory, else the checkout this attnzoo was installed from (an editable install)."""
    import attnzoo

    candidates = [os.environ.get("ATTNZOO_REPO"), os.getcwd(), str(Path(attnzoo.__file__).resolve().parents[1])]
    for c in candidates:
        if c and (Path(c) / "benchmarks" / "runner.py").is_file():
            return Path(c)
    return None


def cmd_bench(argv: List[str]) -> int:
    root = benchmarks_root()
    if root is None:
        print("attnzoo bench: the benchmark suites live in a checkout of the attnzoo repository (benchmarks/ is "
              "not installed with the package); run this inside the checkout or set ATTNZOO_REPO to it.",
              file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.runner import main as bench_main

    return bench_main(argv)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] == "study":
        from attnzoo.studies import main as study_main

        return study_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="attnzoo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{info,check,study,bench}")
    sub.add_parser("info", help="versions, devices, which backends can run here and why not")
    pc = sub.add_parser("check", help="every available backend against the reference")
    pc.add_argument("--dtype", action="append", choices=["float16", "bfloat16", "float32"], help="repeatable")
    pc.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    pc.add_argument("--no-progress", action="store_true")
    sub.add_parser("study", help="training studies (attnzoo study --help)")
    sub.add_parser("bench", help="benchmark suites (attnzoo bench --help)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
