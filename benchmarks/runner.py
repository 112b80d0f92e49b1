"""``attnzoo bench`` / ``python -m benchmarks``: run the suites, write results, plots and the report.

For every case a suite defines, the runner makes one set of inputs, computes the fp32 gold answer, and
for every importable provider: builds it, runs it once and compares its output (and, for backward modes,
its gradients) with the gold answer -- a provider that disagrees is recorded as ``mismatch`` and *not*
timed -- then times it with ``triton.testing.do_bench`` (median, the L2 cache flushed before every
repetition by do_bench itself) and records its peak memory. Results go to
``<out>/<gpu>/<suite>-<UTC time>.json`` (schema in :mod:`benchmarks.report`), a PNG beside each, and
``benchmarks/RESULTS.md`` is regenerated from every results file, newest per GPU and suite.

A benchmark measures; it never asserts speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"
DEFAULT_REPORT = HERE / "RESULTS.md"
SCHEMA = "attnzoo.bench/1"
STATUSES = ("ok", "mismatch", "unsupported", "error", "oom")
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "fp32": "float32",
          "float32": "float32"}
TIMING = {"full": dict(warmup=25, rep=100), "quick": dict(warmup=10, rep=30)}

NO_GPU_LINE = ("attnzoo bench: no CUDA GPU is visible here (torch.cuda.is_available() is False); the benchmark "
               "suites only run on a GPU -- `attnzoo bench --dry-run` lists the suites, shapes and the providers "
               "importable here.")


# ----------------------------------------------------------------------------------------------------
# progress


class _Bar:
    """A minimal stand-in for tqdm (used when tqdm is not installed): ``[####....] 12/40 text``."""

    def __init__(self, total: int, desc: str, stream=None, width: int = 24):
        self.total, self.desc, self.n, self.width = max(total, 0), desc, 0, width
        self.stream = stream or sys.stderr
        self.text = ""
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = -1.0
        self._draw(force=True)

    def set_postfix_str(self, text: str, refresh: bool = True):
        self.text = text
        self._draw()

    def update(self, n: int = 1):
        self.n += n
        self._draw(force=self.n >= self.total)

    def _draw(self, force: bool = False):
        now = time.monotonic()
        if not force and not self._tty and now - self._last < 10:
            return  # keep logs short when not on a terminal
        self._last = now
        filled = int(self.width * self.n / self.total) if self.total else self.width
        line = f"{self.desc}: [{'#' * filled}{'.' * (self.width - filled)}] {self.n}/{self.total} {self.text}"
        self.stream.write(("\r" + line[:150].ljust(150)) if self._tty else line[:150] + "\n")
        self.stream.flush()

    def close(self):
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm  # type: ignore

        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)
    except Exception:  # noqa: BLE001 - tqdm missing or broken: use the fallback
        return _Bar(total, desc)


# ----------------------------------------------------------------------------------------------------
# environment


def _run(cmd: Sequence[str], cwd=None) -> Optional[str]:
    try:
        r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit(root: Path = HERE.parent) -> Dict[str, Any]:
    sha = _run(["git", "rev-parse", "HEAD"], cwd=root)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return {"commit": sha, "dirty": bool(dirty) if dirty is not None else None}


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"H100-80GB-HBM3"``: the results folder of a GPU."""
    s = re.sub(r"^(NVIDIA|AMD)\s+", "", name.strip())
    s = re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")
    return s or "unknown-gpu"


def environment(device=None) -> Dict[str, Any]:
    """GPU, driver, CUDA, torch, triton, every peer's version and the git commit."""
    import torch

    from benchmarks import flops as F
    from benchmarks.providers import library_versions

    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "libraries": library_versions(),
    }
    env["triton"] = env["libraries"].get("triton")
    env["attnzoo"] = env["libraries"].get("attnzoo")
    try:
        import attnzoo

        env["attnzoo"] = getattr(attnzoo, "__version__", env["attnzoo"])
    except Exception:  # noqa: BLE001
        pass
    env.update(git_commit())
    if device is not None and getattr(device, "type", None) == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        clock = getattr(p, "memory_clock_rate", None)
        width = getattr(p, "memory_bus_width", None)
        env["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "memory_bytes": p.total_memory,
            "bandwidth_bytes_per_s": F.peak_bandwidth(p.name, clock, width),
            "count": torch.cuda.device_count(),
        }
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if env["driver"]:
            env["driver"] = env["driver"].splitlines()[0].strip()
    else:
        env["gpu"] = None
        env["driver"] = None
    return env


# ----------------------------------------------------------------------------------------------------
# measuring


def triton_bench(warmup: int, rep: int) -> Callable[..., float]:
    """``bench(fn, grad_to_none) -> ms``: ``triton.testing.do_bench``, median, L2 flushed per repetition."""
    from triton.testing import do_bench

    def bench(fn, grad_to_none=None):
        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none or None, return_mode="median"))

    return bench


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _classify(exc: BaseException) -> str:
    import torch

    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower():
        return "oom"
    text = str(exc)
    if (isinstance(exc, NotImplementedError) or type(exc).__name__ == "BackendUnavailableError"
            or "No available kernel" in text or "No viable backend" in text):
        return "unsupported"
    return "error"


def _message(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"[:400]


def _sync(device):
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def base_record(case, provider, dtype_name: str) -> Dict[str, Any]:
    return {
        "suite": case.suite, "case": case.name, "group": case.group, "x_name": case.x_name, "x": case.x,
        "mode": case.mode, "metric": case.metric, "shape": dict(case.shape),
        "params": {k: v for k, v in case.params.items() if not k.startswith("_")}, "dtype": dtype_name,
        "provider": provider.name, "role": provider.role, "library": provider.library, "version": provider.version,
        "status": None, "checked": False, "errors": {}, "message": "",
        "ms": None, "tflops": None, "tflops_effective": None, "gbps": None, "bandwidth_util": None,
        "tokens_per_s": None, "peak_mem_bytes": None,
        "flops": case.flops, "flops_effective": case.flops_effective, "bytes": case.bytes,
    }


def fill_rates(rec: Dict[str, Any], ms: float, bandwidth: Optional[float]) -> None:
    from benchmarks import flops as F

    rec["ms"] = ms
    rec["tflops"] = F.tflops(rec["flops"], ms)
    rec["tflops_effective"] = F.tflops(rec["flops_effective"], ms)
    rec["gbps"] = F.gbps(rec["bytes"], ms)
    if rec["gbps"] is not None and bandwidth:
        rec["bandwidth_util"] = rec["gbps"] * 1e9 / bandwidth
    tokens = rec.pop("_tokens", None)
    if tokens:
        rec["tokens_per_s"] = tokens / (ms * 1e-3)


def measure(suite, case, provider, inputs, gold, device, dtype_name: str, bench, bandwidth=None) -> Dict[str, Any]:
    """Build, check, then time one provider on one case. Never raises: failures become the status."""
    import torch

    from benchmarks.suites.base import as_tuple, check_outputs

    rec = base_record(case, provider, dtype_name)
    reason = provider.supports(case)
    if reason:
        rec.update(status="unsupported", message=reason)
        return rec
    # fresh autograd leaves sharing the inputs' storage: identical values for every provider
    x = dict(inputs)
    for n in suite.grad_inputs:
        if n in x:
            x[n] = inputs[n].detach().requires_grad_(case.needs_grad)
    dout = inputs.get("dout")
    try:
        with warnings_captured() as caught:
            built = provider.build(case, x)
            if case.needs_grad and not built.leaves:
                built.leaves = {n: x[n] for n in suite.grad_inputs if n in x}
            with built.context():
                # 1. check against the gold answer
                grad_ctx = torch.enable_grad() if case.needs_grad else torch.no_grad()
                with grad_ctx:
                    out = built.fn()
                    grads = None
                    if case.needs_grad:
                        as_tuple(out)[0].backward(dout)
                        grads = {n: suite.canonical_grad(n, g, inputs) for n, g in built.grads().items()}
                _sync(device)
                if gold.get("error"):
                    rec["message"] = f"not checked: the gold answer failed ({gold['error']})"
                else:
                    ok, errs, msg = check_outputs(suite, dtype_name, out, gold["out"], grads,
                                                  gold["grads"] if case.needs_grad else None)
                    rec["errors"], rec["checked"] = errs, True
                    if not ok:
                        rec.update(status="mismatch", message=f"disagrees with the reference: {msg}")
                        return rec
                del out, grads
                for t in list(built.leaves.values()) + list(built.grad_to_none):
                    t.grad = None
                # 2. time
                zero = list(built.leaves.values()) + list(built.grad_to_none)
                if case.mode == "bwd":
                    with torch.enable_grad():
                        first = as_tuple(built.fn())[0]

                    def fn():
                        first.backward(dout, retain_graph=True)
                elif case.needs_grad:
                    def fn():
                        with torch.enable_grad():
                            as_tuple(built.fn())[0].backward(dout)
                else:
                    def fn():
                        with torch.no_grad():
                            return built.fn()
                if getattr(device, "type", None) == "cuda":
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                    fn()
                    _sync(device)
                    rec["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device) - before)
                for t in zero:
                    t.grad = None
                ms = bench(fn, grad_to_none=zero)
        rec["status"] = "ok"
        rec["_tokens"] = case.tokens
        fill_rates(rec, ms, bandwidth)
        if caught and not rec["message"]:
            rec["message"] = f"warning: {caught[0]}"[:400]
    except Exception as exc:  # noqa: BLE001 - one provider's failure must not stop the suite
        rec.update(status=_classify(exc), message=_message(exc))
    finally:
        rec.pop("_tokens", None)
        if getattr(device, "type", None) == "cuda":
            torch.cuda.empty_cache()
    return rec


@contextlib.contextmanager
def warnings_captured():
    import warnings

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        msgs: List[str] = []
        try:
            yield msgs
        finally:
            msgs.extend(str(x.message).splitlines()[0] for x in w if str(x.message))


def run_suite(suite, cases, providers, device, dtype, *, bench, bandwidth=None, bar=None) -> List[Dict[str, Any]]:
    """Every (case, provider) pair of one suite -> records. Inputs and the gold answer are made once per
    ``case.input_key`` (cases are grouped so that equal keys are adjacent) and freed afterwards."""
    import torch

    from benchmarks.suites.base import dtype_name as _dn

    dname = _dn(dtype)
    records = []
    grad_keys = {c.input_key for c in cases if c.needs_grad}
    cur_key, inputs, gold = object(), None, None
    for case in cases:
        if case.input_key != cur_key:
            inputs = gold = None
            if getattr(device, "type", None) == "cuda":
                torch.cuda.empty_cache()
            cur_key = case.input_key
            inputs = suite.make_inputs(case, device, dtype)
        for prov in providers:
            if not prov.applies(case):
                continue
            if bar is not None:
                bar.set_postfix_str(f"{case.name[:60]} | {prov.name}", refresh=False)
            if gold is None and not prov.supports(case):
                try:
                    gold = suite.gold(case, inputs, with_grads=case.input_key in grad_keys)
                except Exception as exc:  # noqa: BLE001
                    gold = {"error": _message(exc), "out": None, "grads": {}}
                    if getattr(device, "type", None) == "cuda":
                        torch.cuda.empty_cache()
            records.append(measure(suite, case, prov, inputs, gold or {"error": "no gold", "grads": {}}, device, dname,
                                   bench, bandwidth))
            if bar is not None:
                bar.update(1)
    return records


# ----------------------------------------------------------------------------------------------------
# planning (shared by --dry-run and a real run)


def plan(suite_names: Sequence[str], level: str, provider_filter: Optional[Sequence[str]] = None):
    from benchmarks import suites as S

    out = []
    for name in suite_names:
        suite = S.get(name)
        provs = suite.providers()
        if provider_filter:
            provs = [p for p in provs if p.name in provider_filter]
        out.append((suite, suite.cases(level), provs))
    return out


def provider_table(providers, device) -> List[Dict[str, Any]]:
    rows = []
    for p in providers:
        ok, version, note = p.status()
        rows.append({"name": p.name, "role": p.role, "library": p.library, "version": version, "importable": ok,
                     "usable": p.unavailable_reason(device) is None, "reason": p.unavailable_reason(device) or "",
                     "note": p.note})
    return rows


def dry_run(plans, level: str, dtype_name: str, stream=None, list_cases: bool = False) -> None:
    """What a run would do: providers and, per suite, its case count and first/last case (every case with
    ``list_cases``)."""
    import torch

    stream = stream or sys.stdout
    w = stream.write
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    total = sum(len(c) for _, c, _ in plans)
    w(f"attnzoo bench --dry-run: {len(plans)} suite(s), {total} cases, {'quick' if level == 'quick' else 'full'} sweep, "
      f"{dtype_name}; nothing is run.\n")
    w(f"GPU here: {gpu or 'none -- a real run refuses here'}\n\n")
    seen: Dict[str, Any] = {}
    for _, _, provs in plans:
        for p in provs:
            seen.setdefault((p.name, p.library), p)
    w("Providers (importable here? version):\n")
    for p in seen.values():
        ok, version, note = p.status()
        state = "importable" if ok else f"not importable ({note})"
        cuda = ", needs CUDA" if p.needs_cuda else ""
        w(f"  {p.name:26s} {p.role:9s} {p.library:14s} {str(version or '-'):22s} {state}{cuda}\n")
    for suite, cases, provs in plans:
        usable = [p.name for p in provs if p.status()[0]]
        missing = [p.name for p in provs if not p.status()[0]]
        w(f"\nsuite {suite.name}: {len(cases)} cases -- {suite.description}\n")
        w(f"  providers importable: {', '.join(usable) or '-'}\n")
        if missing:
            w(f"  providers not importable: {', '.join(missing)}\n")
        shown = cases if list_cases or len(cases) <= 3 else [cases[0], cases[-1]]
        for i, c in enumerate(shown):
            if i == 1 and shown is not cases:
                w(f"    ... {len(cases) - 2} more (--list shows every case)\n")
            w(f"    {c.describe()}\n")


# ----------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from benchmarks import suites as S

    ap = argparse.ArgumentParser(
        prog="attnzoo bench",
        description="Benchmark attnzoo against its peers on the same inputs in the same run (GPU only).",
    )
    ap.add_argument("--suite", dest="suites", action="extend", nargs="+", metavar="NAME",
                    help=f"suites to run (default: all): {', '.join(S.NAMES)}")
    ap.add_argument("--quick", action="store_true", help="a small sweep per suite (target: under 5 minutes on an H100)")
    ap.add_argument("--out", type=Path, default=DEFAULT_RESULTS,
                    help="results root; files go to OUT/<gpu>/ (default: benchmarks/results)")
    ap.add_argument("--dry-run", action="store_true",
                    help="summarise the suites, shapes and importable providers; run nothing")
    ap.add_argument("--list", dest="list_cases", action="store_true", help="with --dry-run: every case, not a summary")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (default bf16)")
    ap.add_argument("--providers", action="extend", nargs="+", metavar="NAME", help="only these providers")
    ap.add_argument("--report", type=Path, default=None,
                    help="the Markdown report to regenerate (default: benchmarks/RESULTS.md for the default --out, "
                         "else OUT/RESULTS.md)")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the report and plots from OUT")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    ap.add_argument("--warmup", type=int, default=None, help="do_bench warmup in ms (default 25, quick 10)")
    ap.add_argument("--rep", type=int, default=None, help="do_bench repetition time in ms (default 100, quick 30)")
    # development aid: the whole flow on CPU with tiny shapes and no timing; output marked synthetic
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return ap


def _report_path(args) -> Path:
    if args.report is not None:
        return args.report
    try:
        same = args.out.resolve() == DEFAULT_RESULTS.resolve()
    except OSError:
        same = False
    return DEFAULT_REPORT if same else args.out / "RESULTS.md"


def write_results(out_root: Path, suite_name: str, records, env, meta, synthetic: bool = False) -> Path:
    slug = gpu_slug(env["gpu"]["name"]) if env.get("gpu") else "cpu"
    folder = out_root / slug
    folder.mkdir(parents=True, exist_ok=True)
    stamp = meta["created_utc"].replace(":", "").replace("-", "")
    path = folder / f"{suite_name}-{stamp}.json"
    data = {"schema": SCHEMA, "synthetic": synthetic, "suite": suite_name, **meta, "environment": env,
            "records": records}
    if synthetic:
        data = {"_comment": "SYNTHETIC: `--smoke` run on CPU with tiny shapes and no timing (every ms is a "
                            "placeholder). Not a measurement.", **data}
    path.write_text(json.dumps(_json_safe(data), indent=1) + "\n")
    return path


def main(argv: Optional[List[str]] = None) -> int:
    from benchmarks import suites as S

    args = build_parser().parse_args(argv)
    names = args.suites or list(S.NAMES)
    unknown = [n for n in names if n not in S.NAMES and n not in S.CPU_NAMES]
    if unknown:
        print(f"attnzoo bench: unknown suite(s) {', '.join(unknown)}; known: {', '.join(S.NAMES + S.CPU_NAMES)}",
              file=sys.stderr)
        return 2
    cpu_names = [n for n in names if n in S.CPU_NAMES]
    if cpu_names:  # the CPU suite runs anywhere, by its own driver (subprocesses, time and peak memory)
        from benchmarks.suites import cpu

        if args.dry_run:
            for c in cpu.cases("quick" if args.quick else "full"):
                print(f"cpu  {c['name']:40s} providers: {', '.join(c['providers'])}")
        else:
            out = None if args.out.resolve() == DEFAULT_RESULTS.resolve() else args.out / "cpu"
            rc = cpu.main("quick" if args.quick else "full", out, plots=not args.no_plots)
            if rc:
                return rc
        names = [n for n in names if n not in S.CPU_NAMES]
        if not names:
            return 0
    level = "tiny" if args.smoke else "quick" if args.quick else "full"
    dtype_name = DTYPES[args.dtype]
    report_path = _report_path(args)

    if args.report_only:
        from benchmarks import report

        report.regenerate(args.out, report_path, plots=not args.no_plots)
        print(f"wrote {report_path}")
        return 0

    plans = plan(names, level, args.providers)
    if args.dry_run:
        dry_run(plans, level, dtype_name, list_cases=args.list_cases)
        return 0

    import torch

    from benchmarks import report

    if args.smoke:
        if args.out.resolve() == DEFAULT_RESULTS.resolve():
            print("attnzoo bench: --smoke needs --out (its output is synthetic and must not land in "
                  "benchmarks/results)", file=sys.stderr)
            return 2
        device, dtype_name = torch.device("cpu"), "float32"
        env = environment(None)
        env["gpu"] = {"name": "CPU smoke (synthetic, untimed)", "capability": None, "sm_count": None,
                      "memory_bytes": None, "bandwidth_bytes_per_s": None, "count": 0}
        timing = {"warmup": 0, "rep": 0}

        def bench(fn, grad_to_none=None):  # runs once, times nothing
            fn()
            return 1.0
    else:
        if not torch.cuda.is_available():
            print(NO_GPU_LINE, file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        env = environment(device)
        timing = dict(TIMING[level])
        if args.warmup is not None:
            timing["warmup"] = args.warmup
        if args.rep is not None:
            timing["rep"] = args.rep
        bench = triton_bench(**timing)
    dtype = getattr(torch, dtype_name)
    bandwidth = env["gpu"]["bandwidth_bytes_per_s"]
    t0 = time.monotonic()
    written = []
    for suite, cases, provs in plans:
        table = provider_table(provs, device)
        usable = [p for p in provs if p.unavailable_reason(device) is None]
        created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        bar = progress(sum(1 for c in cases for p in usable if p.applies(c)), suite.name)
        ts = time.monotonic()
        try:
            records = run_suite(suite, cases, usable, device, dtype, bench=bench, bandwidth=bandwidth, bar=bar)
        finally:
            bar.close()
        meta = {
            "created_utc": created, "quick": args.quick, "level": level, "dtype": dtype_name,
            "argv": list(argv) if argv is not None else sys.argv[1:], "wall_s": round(time.monotonic() - ts, 1),
            "measurement": {"timer": "triton.testing.do_bench", "return_mode": "median", "l2_flush": True,
                            **timing, "check": "relative max error vs an fp32 reference before timing"},
            "providers": table,
        }
        meta["measurement"]["timer"] = "none (--smoke)" if args.smoke else meta["measurement"]["timer"]
        path = write_results(args.out, suite.name, records, env, meta, synthetic=args.smoke)
        written.append(path)
        counts: Dict[str, int] = {}
        for r in records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        print(f"{suite.name}: {len(records)} records ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) -> {path}")
        if not args.no_plots:
            png = report.plot_results(json.loads(path.read_text()), path.with_suffix(".png"))
            if png is None:
                print(f"{suite.name}: plot skipped ({report.PLOT_UNAVAILABLE})")
    report.regenerate(args.out, report_path, plots=False)
    print(f"wrote {report_path} ({len(written)} results file(s), {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
