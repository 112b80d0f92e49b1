"""The README (markdown tables with ratios, the goals met or missed) and PNG plots of a ``--suite cpu`` run."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

MiB = 2**20


def _index(records) -> Dict:
    """``{(group, mode): {x: {provider: record}}}``."""
    out: Dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        out[(r["group"], r["mode"])][r["x"]][r["provider"]] = r
    return out


def _ok(r) -> bool:
    return r is not None and r.get("status") == "ok"


def _t(r) -> Optional[float]:
    return r["time_ms"] if _ok(r) else None


def _m(r) -> Optional[float]:
    return r["peak_bytes"] if _ok(r) and r.get("peak_bytes") is not None else None


def _fmt_t(r) -> str:
    if r is None:
        return ""
    if not _ok(r):
        return r.get("status", "?")
    return f"{r['time_ms']:.1f}"


def _fmt_m(r) -> str:
    m = _m(r)
    return "" if m is None else f"{m / MiB:.0f}"


def _ratio(a, b) -> str:
    return "" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _slope(xs, ys) -> Optional[float]:
    """Least-squares slope of log(y) on log(x) (1.0 = linear, 2.0 = quadratic)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def _table(idx, group, mode, main, base, others=()):
    rows = idx.get((group, mode))
    if not rows:
        return []
    provs = [main, base, *others]
    head = ["x"] + [f"{p} ms" for p in provs] + [f"{main}/{base} time"] + [f"{p} MiB" for p in provs] + \
        [f"{main}/{base} mem"] + [f"{main}/{o} time" for o in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in sorted(rows):
        rs = rows[x]
        cells = [f"{x:g}"] + [_fmt_t(rs.get(p)) for p in provs] + [_ratio(_t(rs.get(main)), _t(rs.get(base)))]
        cells += [_fmt_m(rs.get(p)) for p in provs] + [_ratio(_m(rs.get(main)), _m(rs.get(base)))]
        cells += [_ratio(_t(rs.get(main)), _t(rs.get(o))) for o in others]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goals(data) -> List[str]:
    """One line per goal: measured numbers and met / missed."""
    idx = _index(data["records"])
    out = []
    # attention: torch vs sdpa, every case
    tr, mr = [], []
    for (group, mode), rows in idx.items():
        if not group.startswith("attention"):
            continue
        for x, rs in rows.items():
            a, s = rs.get("torch"), rs.get("sdpa")
            if _t(a) and _t(s):
                tr.append((_t(a) / _t(s), f"{group} {mode} T={x:g}"))
            if _m(a) is not None and _m(s) is not None:
                mr.append(((_m(a) + MiB) / (_m(s) + MiB), f"{group} {mode} T={x:g}"))
    if tr:
        worst = max(tr)
        med = sorted(r for r, _ in tr)[len(tr) // 2]
        out.append(f"- **attention time <= 1.3x SDPA**: {'met' if worst[0] <= 1.3 else 'MISSED'} -- worst "
                   f"{worst[0]:.2f}x ({worst[1]}), median {med:.2f}x over {len(tr)} cases.")
    if mr:
        worst = max(mr)
        out.append(f"- **attention memory <= 2x SDPA** (peaks + 1 MiB, so near-zero peaks do not make "
                   f"ratios): {'met' if worst[0] <= 2 else 'MISSED'} -- worst {worst[0]:.2f}x ({worst[1]}).")
    # linear in T
    for prefix in ("lightning", "dma w=64", "dma w=512"):
        for mode in ("fwd", "fwd+bwd"):
            rows = idx.get((prefix, mode))
            if not rows:
                continue
            xs = sorted(x for x in rows if _ok(rows[x].get("torch")))
            if len(xs) < 2:
                continue
            ts = [_t(rows[x]["torch"]) for x in xs]
            ms = [_m(rows[x]["torch"]) for x in xs]
            st, sm = _slope(xs, ts), _slope(xs, [max(m or 0, 1) for m in ms])
            at16 = rows.get(16384, {}).get("torch")
            m16 = _m(at16)
            lin = st is not None and st <= 1.2 and (m16 is None or m16 < 2**30)
            out.append(
                f"- **{prefix} {mode} linear in T**: {'met' if lin else 'MISSED'} -- time slope "
                f"{st:.2f} (log-log, 1 = linear) over T={xs[0]}..{xs[-1]}, memory slope "
                f"{sm:.2f}" + (f", 16k peak {m16 / MiB:.0f} MiB" if m16 is not None else "") + ".")
    # MoH
    for group in ("moh T=4096", "moh T=2048"):
        for mode in ("fwd", "fwd+bwd"):
            rows = idx.get((group, mode))
            if not rows or 0.5 not in rows:
                continue
            a, d = _t(rows[0.5].get("torch")), _t(rows[0.5].get("dense"))
            if a and d:
                out.append(f"- **MoH 50% active <= 0.65x dense** ({group} {mode}): "
                           f"{'met' if a / d <= 0.65 else 'MISSED'} -- {a / d:.2f}x "
                           f"(at 25/75/100%: " + ", ".join(
                               _ratio(_t(rows[f].get('torch')), _t(rows[f].get('dense'))) + "x"
                               for f in (0.25, 0.75, 1.0) if f in rows) + ").")
    return out


def write(data: Dict[str, Any], out: Path, plots: bool = True) -> Path:
    idx = _index(data["records"])
    env = data["environment"]
    lines = [
        "# CPU benchmark: attnzoo's torch backend vs PyTorch SDPA and the reference",
        "",
        f"Generated by `attnzoo bench --suite cpu` ({data['created_utc']}, {data['wall_s']:.0f} s, level "
        f"{data['level']}); the numbers are in `{Path(data.get('_path', 'cpu-*.json')).name}` beside this file. "
        f"Shapes: B={data['shapes']['B']}, {data['shapes']['H']} query / {data['shapes']['Hkv']} kv heads, head dim "
        f"{data['shapes']['D']}, fp32, model dim {data['shapes']['dim']} for the modules. torch {env.get('torch')}, "
        f"{env.get('threads')} threads, {env.get('cores')} cores; load average "
        f"{tuple(round(x, 1) for x in env.get('load_avg_at_start', ()))} at start and "
        f"{tuple(round(x, 1) for x in env.get('load_avg_at_end', ()))} at the end (the machine is shared: timings "
        "are noisy, which is why providers are timed in interleaved rounds in one process and compared as ratios).",
        "",
        "Time: median ms of interleaved rounds. Memory: peak RSS above the pre-call RSS of one call, MiB. "
        "`reference` is skipped where it would need more than "
        f"{data['measurement']['ref_max_bytes'] / 2**30:.0f} GiB. `sdpa` in the lightning / DMA groups is causal "
        "softmax attention at the same shape (a yardstick, not the same math).",
        "",
        "## Goals",
        "",
        *goals(data),
        "",
    ]
    specs = [
        ("attention causal", "torch", "sdpa", ("reference",)),
        ("attention", "torch", "sdpa", ("reference",)),
    ]
    for group, main, base, others in specs:
        for mode in ("fwd", "fwd+bwd"):
            t = _table(idx, group, mode, main, base, others)
            if t:
                lines += [f"## {group}, {mode} (x = T)", "", *t, ""]
    for (group, mode) in sorted(k for k in idx if k[0].startswith("module")):
        lines += [f"## {group}, {mode} (x = T; module = attnzoo, auto backend)", "",
                  *_table(idx, group, mode, "module", "linears+sdpa"), ""]
    for group in ("lightning", "dma w=64", "dma w=512"):
        for mode in ("fwd", "fwd+bwd"):
            t = _table(idx, group, mode, "torch", "reference", ("sdpa",))
            if t:
                lines += [f"## {group}, {mode} (x = T)", "", *t, ""]
    for group in ("moh T=4096", "moh T=2048"):
        for mode in ("fwd", "fwd+bwd"):
            t = _table(idx, group, mode, "torch", "dense", ("reference",))
            if t:
                lines += [f"## {group}, {mode} (x = fraction of active heads; dense = every head, then gates)", "",
                          *t, ""]
    if plots:
        png = plot(data, out / "cpu.png")
        if png is not None:
            lines += ["## Plots", "", f"![time and memory per group]({png.name})", ""]
    md = out / "README.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def plot(data, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    idx = _index(data["records"])
    keys = sorted(k for k in idx if not k[0].startswith("module"))
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 2.6 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        rows = idx[key]
        provs = sorted({p for rs in rows.values() for p in rs})
        for col, (get, label) in enumerate(((_t, "ms"), (lambda r: (_m(r) or 0) / MiB if _m(r) is not None else None,
                                                          "peak MiB"))):
            ax = axes[row][col]
            for p in provs:
                pts = [(x, get(rows[x].get(p))) for x in sorted(rows)]
                pts = [(x, y) for x, y in pts if y is not None and y > 0]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{key[0]} {key[1]}: {label}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
