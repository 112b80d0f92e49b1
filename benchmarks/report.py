"""Results files -> ``benchmarks/RESULTS.md`` and one PNG per results file.

Results file (``benchmarks/results/<gpu>/<suite>-<UTC time>.json``, schema ``attnzoo.bench/1``)::

    {"schema", "synthetic": false, "suite", "created_utc", "quick", "level", "dtype", "argv", "wall_s",
     "measurement": {"timer", "return_mode", "l2_flush", "warmup", "rep", "check"},
     "providers": [{"name", "role", "library", "version", "importable", "usable", "reason", "note"}],
     "environment": {"gpu": {"name", "capability", "sm_count", "memory_bytes", "bandwidth_bytes_per_s"},
                     "driver", "cuda", "cudnn", "torch", "triton", "attnzoo", "python", "platform",
                     "libraries": {name: version or null}, "commit", "dirty"},
     "records": [{"suite", "case", "group", "x_name", "x", "mode", "metric", "shape", "params", "dtype",
                  "provider", "role", "library", "version", "status", "checked", "errors", "message",
                  "ms", "tflops", "tflops_effective", "gbps", "bandwidth_util", "tokens_per_s",
                  "peak_mem_bytes", "flops", "flops_effective", "bytes"}]}

The environment is stored once per file and belongs to every record in it (:func:`records_of` attaches
it). ``status`` is one of ok / mismatch (disagreed with the reference: not timed) / unsupported / error /
oom. ``role``: attnzoo, peer, reference (attnzoo's PyTorch reference, never counted as attnzoo's best) or
base (the knocking suite's unmodified module).

``python -m benchmarks.report [--results DIR] [--out RESULTS.md] [--no-plots]`` regenerates the report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

SCHEMA = "attnzoo.bench/1"
HERE = Path(__file__).resolve().parent
PLOT_UNAVAILABLE = "matplotlib is not installed here (pip install matplotlib)"
STATUSES = ("ok", "mismatch", "unsupported", "error", "oom")
ROLES = ("attnzoo", "peer", "reference", "base")
METRICS = {"tflops": "TFLOP/s", "gbps": "GB/s", "ms": "ms"}

TOP_FIELDS = {"schema": str, "suite": str, "created_utc": str, "environment": dict, "records": list,
              "measurement": dict, "providers": list}
RECORD_FIELDS = {"suite": str, "case": str, "group": str, "x_name": str, "x": (int, float), "mode": str,
                 "metric": str, "shape": dict, "params": dict, "dtype": str, "provider": str, "role": str,
                 "library": str, "status": str, "checked": bool, "message": str}
RECORD_NUMBERS = ("ms", "tflops", "tflops_effective", "gbps", "bandwidth_util", "tokens_per_s", "peak_mem_bytes",
                  "flops", "flops_effective", "bytes")
ENV_FIELDS = ("gpu", "driver", "cuda", "torch", "triton", "libraries", "commit")


# ----------------------------------------------------------------------------------------------------
# schema


def validate(data: Any) -> List[str]:
    """Problems with a results file's content (empty list = valid)."""
    problems: List[str] = []
    if not isinstance(data, dict):
        return ["top level is not an object"]
    if data.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
    for k, t in TOP_FIELDS.items():
        if not isinstance(data.get(k), t):
            problems.append(f"{k}: missing or not {t.__name__}")
    env = data.get("environment") if isinstance(data.get("environment"), dict) else {}
    for k in ENV_FIELDS:
        if k not in env:
            problems.append(f"environment.{k}: missing")
    if isinstance(env.get("gpu"), dict) and not env["gpu"].get("name"):
        problems.append("environment.gpu.name: missing")
    for i, r in enumerate(data.get("records") or []):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where}: not an object")
            continue
        for k, t in RECORD_FIELDS.items():
            if not isinstance(r.get(k), t) or (t is not bool and isinstance(r.get(k), bool)):
                problems.append(f"{where}.{k}: missing or not {getattr(t, '__name__', t)}")
        for k in RECORD_NUMBERS:
            v = r.get(k, "absent")
            if v == "absent":
                problems.append(f"{where}.{k}: missing (null when not measured)")
            elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                problems.append(f"{where}.{k}: not a number or null")
        if r.get("status") not in STATUSES:
            problems.append(f"{where}.status: {r.get('status')!r} not in {STATUSES}")
        if r.get("role") not in ROLES:
            problems.append(f"{where}.role: {r.get('role')!r} not in {ROLES}")
        if r.get("metric") not in METRICS:
            problems.append(f"{where}.metric: {r.get('metric')!r} not in {tuple(METRICS)}")
        if r.get("status") == "ok" and not isinstance(r.get("ms"), (int, float)):
            problems.append(f"{where}: status ok without ms")
        if r.get("status") == "mismatch" and r.get("ms") is not None:
            problems.append(f"{where}: a mismatching provider must not be timed")
        if "version" not in r:
            problems.append(f"{where}.version: missing (null when unknown)")
    return problems


def load(path: Path) -> Dict[str, Any]:
    data = json.loads(Path(path).read_text())
    problems = validate(data)
    if problems:
        raise ValueError(f"{path}: not a valid results file: " + "; ".join(problems[:5]))
    return data


def records_of(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The file's records, each carrying the file's environment under ``environment``."""
    return [dict(r, environment=data["environment"]) for r in data["records"]]


def load_all(results_dir: Path) -> List[Tuple[Path, Dict[str, Any]]]:
    out = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        try:
            out.append((path, load(path)))
        except (ValueError, OSError) as e:
            print(f"report: skipping {path}: {e}", file=sys.stderr)
    return out


def newest(files: List[Tuple[Path, Dict[str, Any]]]) -> Dict[str, Dict[str, Tuple[Path, Dict[str, Any]]]]:
    """``{gpu folder: {suite: (path, data)}}`` keeping the newest file of each (gpu, suite)."""
    sel: Dict[str, Dict[str, Tuple[Path, Dict[str, Any]]]] = {}
    for path, data in files:
        gpu = path.parent.name
        cur = sel.setdefault(gpu, {}).get(data["suite"])
        if cur is None or (data["created_utc"], path.name) > (cur[1]["created_utc"], cur[0].name):
            sel[gpu][data["suite"]] = (path, data)
    return sel


# ----------------------------------------------------------------------------------------------------
# analysis


def value(r: Dict[str, Any], metric: Optional[str] = None) -> Optional[float]:
    if r.get("status") != "ok":
        return None
    v = r.get(metric or r["metric"])
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def ordered(seq):
    seen, out = set(), []
    for s in seq:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def by_case(records) -> Dict[Tuple[str, Any], Dict[str, Dict[str, Any]]]:
    """``{(group, x): {provider: record}}`` in the records' order."""
    out: Dict[Tuple[str, Any], Dict[str, Dict[str, Any]]] = {}
    for r in records:
        out.setdefault((r["group"], r["x"]), {})[r["provider"]] = r
    return out


def speedup(case_records: Dict[str, Dict[str, Any]]) -> Optional[float]:
    """Best peer time / best attnzoo time for one case (> 1: attnzoo is faster). The knocking suite's
    base module counts as the peer. attnzoo's reference never counts. None when either side is missing."""
    az = [r["ms"] for r in case_records.values() if r["role"] == "attnzoo" and r["status"] == "ok" and r["ms"]]
    peer = [r["ms"] for r in case_records.values() if r["role"] in ("peer", "base") and r["status"] == "ok" and r["ms"]]
    if not az or not peer:
        return None
    return min(peer) / min(az)


def overheads(case_records: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """Knocking: ``t_form / t_base - 1`` per KHA form."""
    base = case_records.get("base")
    if not base or base["status"] != "ok" or not base["ms"]:
        return {}
    return {p: r["ms"] / base["ms"] - 1 for p, r in case_records.items()
            if p != "base" and r["status"] == "ok" and r["ms"]}


# ----------------------------------------------------------------------------------------------------
# plots


def _log_axis(x_name: str, xs) -> bool:
    xs = [x for x in xs if isinstance(x, (int, float)) and x > 0]
    return x_name in ("T", "cache_len", "B", "keep_window") and len(xs) > 1 and max(xs) / min(xs) >= 8


def plot_results(data: Dict[str, Any], png_path: Path) -> Optional[Path]:
    """One PNG for one results file: a panel per group, a line per provider (the group's metric against
    the swept quantity) and beneath it attnzoo's speedup over the best peer. None if matplotlib is
    missing (the caller says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    records = data["records"]
    groups = ordered(r["group"] for r in records)
    if not groups:
        return None
    cases = by_case(records)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = plt.figure(figsize=(5.2 * ncols, 4.6 * nrows))
    outer = fig.add_gridspec(nrows, ncols, hspace=0.55, wspace=0.3)
    handles = {}
    styles = {"attnzoo": dict(lw=2.2, ls="-"), "peer": dict(lw=1.3, ls="-"), "reference": dict(lw=1.0, ls=":"),
              "base": dict(lw=1.6, ls="--")}
    for gi, group in enumerate(groups):
        inner = outer[gi // ncols, gi % ncols].subgridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
        ax = fig.add_subplot(inner[0])
        axr = fig.add_subplot(inner[1], sharex=ax)
        recs = [r for r in records if r["group"] == group]
        metric = recs[0]["metric"]
        x_name = recs[0]["x_name"]
        xs = ordered(r["x"] for r in recs)
        for prov in ordered(r["provider"] for r in recs):
            pts = [(r["x"], value(r)) for r in recs if r["provider"] == prov]
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            role = next(r["role"] for r in recs if r["provider"] == prov)
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, label=prov,
                              **styles.get(role, {}))
            handles.setdefault(prov, line)
        ratio = [(x, speedup(cases[(group, x)])) for x in xs]
        ratio = [(x, y) for x, y in ratio if y is not None]
        if ratio:
            axr.plot([p[0] for p in ratio], [p[1] for p in ratio], marker="s", ms=3.5, color="black")
        else:
            axr.text(0.5, 0.5, "n/a", transform=axr.transAxes, ha="center", va="center", color="grey")
        axr.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(group, fontsize=9)
        ax.set_ylabel(METRICS[metric], fontsize=8)
        axr.set_ylabel("base/KHA" if data["suite"] == "knocking" else "attnzoo\nvs best", fontsize=7)
        axr.set_xlabel(x_name, fontsize=8)
        if _log_axis(x_name, xs):
            ax.set_xscale("log", base=2)
        ax.tick_params(labelsize=7, labelbottom=False)
        axr.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        axr.grid(alpha=0.3)
    env = data["environment"]
    gpu = (env.get("gpu") or {}).get("name", "?")
    title = f"attnzoo bench: {data['suite']} on {gpu} ({data.get('dtype', '')}, {data['created_utc']}"
    title += ", quick)" if data.get("quick") else ")"
    if data.get("synthetic"):
        title = "SYNTHETIC FIXTURE, not a measurement\n" + title
    fig.suptitle(title, fontsize=10)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(6, len(handles)),
                   fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.06 + 0.02 * math.ceil(len(handles) / 6) if nrows > 1 else 0.2, top=0.9 if nrows > 1 else 0.82)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------------------------------
# Markdown


def _fmt(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return ""
    st = r["status"]
    if st != "ok":
        return {"mismatch": "**mismatch**", "unsupported": "n/s", "error": "error", "oom": "OOM"}.get(st, st)
    m = r["metric"]
    v = value(r)
    if v is None:
        return "?"
    if m == "ms":
        s = f"{v:.3f}" if v < 10 else f"{v:.1f}"
        eff = r.get("tflops_effective")
        return f"{s} ({eff:.0f})" if isinstance(eff, (int, float)) else s
    s = f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    if m == "gbps" and isinstance(r.get("bandwidth_util"), (int, float)):
        s += f" ({100 * r['bandwidth_util']:.0f}%)"
    return s


def _env_lines(data: Dict[str, Any]) -> List[str]:
    env = data["environment"]
    gpu = env.get("gpu") or {}
    bw = gpu.get("bandwidth_bytes_per_s")
    libs = ", ".join(f"{k} {v}" for k, v in sorted((env.get("libraries") or {}).items())
                     if v and k not in ("torch", "triton", "attnzoo"))
    return [
        f"- GPU: {gpu.get('name', '?')} (sm {gpu.get('capability', '?')}, {gpu.get('sm_count', '?')} SMs, "
        f"{(gpu.get('memory_bytes') or 0) / 2**30:.0f} GiB, peak bandwidth {bw / 1e12:.2f} TB/s)" if bw else
        f"- GPU: {gpu.get('name', '?')}",
        f"- driver {env.get('driver')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}, attnzoo {env.get('attnzoo')} at commit `{(env.get('commit') or '?')[:12]}`"
        f"{' (uncommitted changes)' if env.get('dirty') else ''}",
        f"- peers installed: {libs or 'none besides torch'}",
    ]


def render_suite(path: Path, data: Dict[str, Any], md_dir: Path) -> List[str]:
    records = data["records"]
    suite = data["suite"]
    lines = [f"### {suite}" + (" -- SYNTHETIC FIXTURE, not a measurement" if data.get("synthetic") else ""), ""]
    meas = data.get("measurement", {})
    lines.append(f"`{os.path.relpath(path, md_dir)}` -- {data['created_utc']}, {data.get('dtype', '?')}, "
                 f"{data.get('level') or ('quick' if data.get('quick') else 'full')} sweep, {meas.get('timer', '?')} "
                 f"(median; warmup {meas.get('warmup', '?')} ms, rep {meas.get('rep', '?')} ms; L2 flushed), "
                 f"commit `{(data['environment'].get('commit') or '?')[:12]}`.")
    lines.append("")
    png = path.with_suffix(".png")
    if png.exists():
        lines += [f"![{suite}]({os.path.relpath(png, md_dir)})", ""]
    provs = ordered(r["provider"] for r in records)
    absent = [p for p in data.get("providers", []) if not p.get("usable", True)]
    if absent:
        lines.append("Not run here: " + "; ".join(f"{p['name']} ({p.get('reason') or 'unavailable'})" for p in absent) + ".")
        lines.append("")
    metric_names = ordered(METRICS[r["metric"]] for r in records)
    unit = " / ".join(metric_names)
    if "ms" in metric_names and any(r.get("tflops_effective") for r in records):
        unit += " (effective TFLOP/s in brackets)"
    if "GB/s" in metric_names:
        unit += " (GB/s: share of peak bandwidth in brackets)"
    last = "overhead vs base" if suite == "knocking" else "attnzoo vs best peer"
    lines.append(f"Cells: {unit}; n/s = not supported; **mismatch** = disagreed with the reference, not timed.")
    lines.append("")
    lines.append("| case | " + " | ".join(provs) + f" | {last} |")
    lines.append("|---|" + "---|" * (len(provs) + 1))
    for (group, x), recs in by_case(records).items():
        first = next(iter(recs.values()))
        label = f"{group}, {first['x_name']}={x}"
        if suite == "knocking":
            ov = overheads(recs)
            tail = ", ".join(f"{p} {100 * v:+.1f}%" for p, v in ov.items()) or "n/a"
        else:
            s = speedup(recs)
            tail = f"{s:.2f}x" if s is not None else "n/a"
        lines.append(f"| {label} | " + " | ".join(_fmt(recs.get(p)) for p in provs) + f" | {tail} |")
    lines.append("")
    if suite == "moh":
        from benchmarks.suites.moh import dense_core_ratios

        ratios = dense_core_ratios(records)
        if ratios:
            lines.append("MoH core time / attnzoo's dense core with every head (target <= rho + 0.1): "
                         + "; ".join(f"{g}, rho={x}: {v:.2f}" for (g, x), v in sorted(ratios.items())))
            lines.append("")
    bad = [r for r in records if r["status"] in ("mismatch", "error", "oom")]
    if bad:
        lines.append("<details><summary>Mismatches and failures</summary>")
        lines.append("")
        for r in bad:
            lines.append(f"- {r['provider']} on {r['case']}: {r['status']} -- {r['message']}")
        lines += ["", "</details>", ""]
    return lines


def render(selection, md_path: Path) -> str:
    md_dir = Path(md_path).resolve().parent
    lines = [
        "# attnzoo benchmark results",
        "",
        "Generated by `attnzoo bench` (or `python -m benchmarks.report`) from `benchmarks/results/<gpu>/*.json`,",
        "the newest file per GPU and suite. Do not edit by hand. How the numbers are made: a provider's output",
        "(and gradients) must match an fp32 reference before it is timed; times are `triton.testing.do_bench`",
        "medians with the L2 cache flushed; TFLOP/s follow FlashAttention-3's formula (query heads x unmasked",
        "area); decode is GB/s of KV (or state) moved against the GPU's peak bandwidth. See `benchmarks/flops.py`.",
        "",
    ]
    if not selection:
        lines += [
            "**No GPU results exist yet.** Nothing here has been measured: run `attnzoo bench` (or",
            "`attnzoo bench --quick`) on a GPU machine, commit `benchmarks/results/<gpu>/`, and regenerate this page",
            "with `python -m benchmarks.report`.",
            "",
        ]
        return "\n".join(lines)
    for gpu in sorted(selection):
        files = selection[gpu]
        newest_file = max(files.values(), key=lambda pd: pd[1]["created_utc"])
        synthetic = any(d.get("synthetic") for _, d in files.values())
        lines += [f"## {gpu}" + (" (SYNTHETIC FIXTURE, not a measurement)" if synthetic else ""), ""]
        lines += _env_lines(newest_file[1]) + [""]
        for suite in sorted(files, key=_suite_order):
            path, data = files[suite]
            lines += render_suite(path, data, md_dir)
    return "\n".join(lines)


def _suite_order(name: str):
    order = ("attention", "decode", "lightning", "moh", "sparse", "knocking")
    return (order.index(name) if name in order else len(order), name)


def regenerate(results_dir: Path = HERE / "results", md_path: Path = HERE / "RESULTS.md", plots: bool = True) -> str:
    """Rewrite ``md_path`` from every results file under ``results_dir`` (newest per GPU and suite),
    drawing any missing or stale PNG first when ``plots``."""
    selection = newest(load_all(Path(results_dir)))
    if plots:
        for files in selection.values():
            for path, data in files.values():
                png = path.with_suffix(".png")
                if not png.exists() or png.stat().st_mtime < path.stat().st_mtime:
                    if plot_results(data, png) is None:
                        print(f"report: plots skipped: {PLOT_UNAVAILABLE}", file=sys.stderr)
                        plots = False
                        break
            if not plots:
                break
    text = render(selection, Path(md_path))
    Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    Path(md_path).write_text(text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description="Regenerate RESULTS.md and plots")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    regenerate(args.results, args.out, plots=not args.no_plots)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
