"""Small training studies of attnzoo's variants on CPU (``attnzoo study``; ``python -m attnzoo.studies``).

Tiny decoder-only models built from attnzoo's modules (default ``backend="auto"``), trained on data that
ships with Python or is generated, 3 seeds each:

- ``mqar``: multi-query associative recall with the pairs beyond a short window (dense MHA, sliding window,
  DMA, lightning, MoH, KHA);
- ``charlm``: a character LM on CPython's ``pydoc_data.topics`` (MHA, GQA, MoH 75%/50%, KHA linear/MLP, DMA,
  lightning), with MoH's load-balance loss, KHA ``fold()`` and cached generation checked;
- ``conversion``: the trained MHA char-LM converted to GQA and MoH with ``attnzoo.convert``, then uptrained.

Each study writes ``<study>.json`` (config, seeds, per-step losses, eval metrics, wall time, versions,
backends used), PNG plots and ``<study>.md``; ``all`` also writes ``README.md`` (the report) beside them.
``--quick`` is a smoke run (about a minute for all studies on 2 cores) that checks its own outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STUDIES = ("mqar", "charlm", "conversion")


def _module(name):
    from attnzoo.studies import charlm, conversion, mqar

    return {"mqar": mqar, "charlm": charlm, "conversion": conversion}[name]


def check_outputs(out: Path, names, results: dict) -> list:
    """The self-checks of a run: every file written, every loss finite and falling (each study's own
    checks: cached == uncached generation, fold exact, uptraining lowers the loss)."""
    problems = []
    for name in names:
        for suffix in (".json", ".md"):
            if not (out / f"{name}{suffix}").is_file():
                problems.append(f"missing {name}{suffix}")
        if not list(out.glob(f"{name}*.png")):
            problems.append(f"no {name}*.png plot")
        problems += results[name]["problems"]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnzoo study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=STUDIES + ("all", "report"),
                        help="a study, 'all' (then the README report), or 'report' (re-render plots, study reports and README.md "
                        "from the JSON files in --out)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models, few steps, one seed")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/studies, or "
                        "benchmarks/studies/quick with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds")
    parser.add_argument("--steps", type=int, default=None, help="override the training (uptraining) steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("benchmarks/studies") / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        if not args.quiet:
            print(msg, flush=True)

    from attnzoo.studies import report

    if args.name == "report":  # re-render every study's plots and markdown from its JSON, then README.md
        import json

        for name in STUDIES:
            if (out / f"{name}.json").is_file():
                result = json.loads((out / f"{name}.json").read_text())
                _module(name).plot(out, result)
                (out / f"{name}.md").write_text(_module(name).report(result))
        report.write_readme(out)
        log(f"wrote {out / 'README.md'}")
        return 0
    names = STUDIES if args.name == "all" else (args.name,)
    results, t0 = {}, time.perf_counter()
    for name in names:
        results[name] = _module(name).run(out, args.quick, log, seeds=args.seeds, steps=args.steps)
        log(f"[{name}] done in {results[name]['wall_seconds']:.0f} s -> {out / (name + '.md')}")
    if args.name == "all":
        report.write_readme(out)
    problems = check_outputs(out, names, results)
    log(f"total {time.perf_counter() - t0:.0f} s; self-checks: " + ("all passed" if not problems else "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
