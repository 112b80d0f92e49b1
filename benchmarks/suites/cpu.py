"""``attnzoo bench --suite cpu``: attnzoo's torch backend on the CPU against PyTorch SDPA and the reference,
time and peak memory, in one run (so every ratio compares numbers taken minutes apart on the same machine).

Each case runs in fresh subprocesses (the fast providers apart from the reference, which may be slow or
large; memory and time each in their own process). Memory: inputs are built, then per provider the
resident-set high-water mark is reset (``/proc/self/clear_refs``) and one call's peak RSS above the
pre-call RSS is its memory (``VmHWM`` - ``VmRSS``; glibc's mmap threshold is pinned in that process so
freed buffers go back to the OS). Time: with the default allocator, the providers are timed in
interleaved rounds (A B A B ...) and the median per provider is kept -- the machine is shared, so
interleaving spreads load changes over every provider alike. Wall-clock ``time.perf_counter``.

Shapes: B=1, 8 query heads, 2 kv heads, head dim 64, fp32 (the issue's numbers). The reference is skipped
where its estimated memory exceeds ``REF_MAX_BYTES`` (or a case exceeds ``CASE_TIMEOUT_S``).

Goals (issue 12), each stated in ``GOALS`` and evaluated in the README this writes: attention within 1.3x
of SDPA's time and 2x its memory; lightning and DMA time and memory linear in T (16k under 1 GiB); MoH at
50% active heads at most 0.65x the dense cost.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

NAME = "cpu"
SCHEMA = "attnzoo.bench-cpu/1"
B, H, HKV, D, DIM = 1, 8, 2, 64, 512
REF_MAX_BYTES = 3 * 2**30
CASE_TIMEOUT_S = 240
ROUND_BUDGET_S = 2.5  # timing rounds continue until this much time was spent (at least 3 rounds, at most
MAX_ROUNDS = 25       # MAX_ROUNDS; a single round when one call takes longer than the budget)
HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "results" / "cpu"

GOALS = {
    "attention_time": "attention (torch backend) within 1.3x of SDPA's time",
    "attention_memory": "attention (torch backend) within 2x of SDPA's peak memory",
    "linear": "lightning and DMA time and memory linear in T; 16k under 1 GiB",
    "moh": "MoH at 50% active heads at most 0.65x the dense cost",
}


# ----------------------------------------------------------------------------------------------------
# the cases


def _case(group, x, mode, providers, **params):
    name = f"{group} {mode} x={x}"
    return dict(group=group, x=x, mode=mode, providers=providers, params=params, name=name)


def cases(level: str = "full") -> List[Dict[str, Any]]:
    """The sweep. ``full`` is sized to finish in under 20 minutes on 2 shared cores: attention fwd and
    fwd+bwd at 256..16k, lightning 1k..64k and DMA 1k..32k (both modes), the modules forward at 1k and 4k
    (MHA also fwd+bwd), MoH at 4k forward and 2k forward+backward."""
    quick = level != "full"
    T_fwd = [256, 1024, 4096] if quick else [256, 1024, 4096, 16384]
    T_bwd = [256, 1024] if quick else [256, 1024, 4096, 16384]
    out = []
    for causal in (True, False):
        g = "attention causal" if causal else "attention"
        for T in T_fwd:
            out.append(_case(g, T, "fwd", ["sdpa", "torch", "reference"], T=T, causal=causal))
        for T in T_bwd:
            out.append(_case(g, T, "fwd+bwd", ["sdpa", "torch", "reference"], T=T, causal=causal))
    for kind in ("mha", "moh", "dma", "lightning", "kha"):
        for T in ([1024] if quick else [1024, 4096]):
            out.append(_case(f"module {kind}", T, "fwd", ["linears+sdpa", "module"], T=T, kind=kind))
    out.append(_case("module mha", 1024, "fwd+bwd", ["linears+sdpa", "module"], T=1024, kind="mha"))

    def yardstick(T):  # causal SDPA at the same T, up to 16k (beyond, it alone would take minutes)
        return ["sdpa"] if T <= 16384 else []

    long_fwd = [1024, 4096, 16384] if quick else [1024, 4096, 16384, 65536]
    for T in long_fwd:
        out.append(_case("lightning", T, "fwd", ["torch", "reference"] + yardstick(T), T=T))
    for T in long_fwd:
        out.append(_case("lightning", T, "fwd+bwd", ["torch", "reference"] + yardstick(T), T=T))
    for w in (64, 512):
        for mode in ("fwd", "fwd+bwd"):
            for T in ([1024, 4096, 16384] if quick else [1024, 4096, 16384, 32768]):
                out.append(_case(f"dma w={w}", T, mode, ["torch", "reference"] + yardstick(T), T=T, keep_window=w))
    for frac in (0.25, 0.5, 0.75, 1.0):
        out.append(_case("moh T=4096", frac, "fwd", ["dense", "torch"], T=4096, frac=frac))
        out.append(_case("moh T=2048", frac, "fwd+bwd", ["dense", "torch", "reference"], T=2048, frac=frac))
    return out


def reference_estimate(case) -> float:
    """Bytes the reference would hold (its [B, H, T, T] score-sized buffers), for the skip rule."""
    T = case["params"]["T"]
    n_buffers = 8 if case["mode"] == "fwd+bwd" else 4
    if case["group"].startswith("dma"):
        n_buffers += 4  # the keep mask's sort over [B, Hkv, T, T] (values + int64 indices)
    return B * H * T * T * 4 * n_buffers


# ----------------------------------------------------------------------------------------------------
# what each provider runs (inside the worker subprocess)


def _make(case):
    import torch

    p = case["params"]
    g = torch.Generator().manual_seed(0)
    T = p["T"]
    grad = case["mode"] == "fwd+bwd"
    group = case["group"]

    def r(*shape, s=1.0):
        t = torch.randn(*shape, generator=g) * s
        return t.requires_grad_(grad)

    if group.startswith("module"):
        return dict(x=r(B, T, DIM))
    if group == "lightning":
        return dict(q=r(B, T, H, D, s=0.1), k=r(B, T, H, D, s=0.1), v=r(B, T, H, D))
    inputs = dict(q=r(B, T, H, D), k=r(B, T, HKV, D), v=r(B, T, HKV, D))
    if group.startswith("dma"):
        inputs["bias"] = r(B, HKV, T)
    if group.startswith("moh"):
        scores = torch.rand(B, T, H, generator=g)
        k = max(1, round(p["frac"] * H))
        keep = scores.argsort(-1, descending=True).argsort(-1) < k  # top-k heads per token
        inputs["gates"] = torch.where(keep, 1.0, 0.0).requires_grad_(grad)
    return inputs


def _linears_sdpa(T):
    """The baseline of the module cases: four Linears and SDPA (causal, GQA)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    qp, kp, vp, op = nn.Linear(DIM, H * D, bias=False), nn.Linear(DIM, HKV * D, bias=False), \
        nn.Linear(DIM, HKV * D, bias=False), nn.Linear(H * D, DIM, bias=False)

    def fwd(x):
        q = qp(x).view(B, T, H, D).transpose(1, 2)
        k = kp(x).view(B, T, HKV, D).transpose(1, 2)
        v = vp(x).view(B, T, HKV, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return op(o.transpose(1, 2).reshape(B, T, H * D))

    del torch
    return fwd


def _module(kind):
    import attnzoo as M

    kw = dict(num_kv_heads=HKV)
    if kind == "mha":
        return M.MultiHeadAttention(DIM, H, **kw)
    if kind == "moh":
        return M.MoHAttention(DIM, H, num_shared_heads=2, top_k=3, **kw)  # 5 of 8 heads active per token
    if kind == "dma":
        return M.DynamicMaskAttention(DIM, H, keep_window=512, **kw)
    if kind == "lightning":
        return M.LightningAttention(DIM, H)
    if kind == "kha":
        return M.KnockingHeadsAttention(DIM, H, knocking="mlp", **kw)
    raise ValueError(kind)


def _fn(case, provider, inputs):
    """A closure running ``provider`` on ``case`` once (forward, plus backward for fwd+bwd)."""
    import torch
    import torch.nn.functional as F

    import attnzoo

    p, group = case["params"], case["group"]
    T = p["T"]

    if group.startswith("module"):
        f = _linears_sdpa(T) if provider == "linears+sdpa" else _module(p["kind"])
        call = lambda: f(inputs["x"])  # noqa: E731
    elif provider == "sdpa":  # causal softmax attention at the same shape: the cost floor of the group
        causal = p.get("causal", True)
        if group == "lightning":
            q, k, v = (inputs[n].transpose(1, 2) for n in "qkv")
            call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        else:
            q, k, v = (inputs[n].transpose(1, 2) for n in "qkv")
            call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # noqa: E731
    elif group.startswith("attention"):
        call = lambda: attnzoo.attention(inputs["q"], inputs["k"], inputs["v"], causal=p["causal"],  # noqa: E731
                                         backend=provider)
    elif group == "lightning":
        call = lambda: attnzoo.lightning_attention(inputs["q"], inputs["k"], inputs["v"], decay=0.05,  # noqa: E731
                                                   backend=provider)
    elif group.startswith("dma"):
        call = lambda: attnzoo.dynamic_mask_attention(  # noqa: E731
            inputs["q"], inputs["k"], inputs["v"], inputs["bias"], keep_window=p["keep_window"], backend=provider)
    elif group.startswith("moh"):
        if provider == "dense":  # every head computed (SDPA through the torch backend), then the gates
            call = lambda: attnzoo.attention(inputs["q"], inputs["k"], inputs["v"], causal=True,  # noqa: E731
                                             backend="torch") * inputs["gates"][..., None]
        else:
            call = lambda: attnzoo.moh_attention(inputs["q"], inputs["k"], inputs["v"], inputs["gates"],  # noqa: E731
                                                 causal=True, backend=provider)
    else:
        raise ValueError(group)

    if case["mode"] == "fwd":
        def run():
            with torch.no_grad():
                call()
        return run
    leaves = [t for t in inputs.values() if t.requires_grad]

    def run_bwd():
        for t in leaves:
            t.grad = None
        out = call()
        out.sum().backward()
    return run_bwd


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(case: Dict[str, Any], providers: List[str], measure: str = "time") -> None:
    """Measure ``providers`` on ``case``: ``measure="memory"`` one call's peak RSS each (in the process with
    glibc's mmap threshold pinned, see :func:`_spawn`), ``"time"`` interleaved rounds (the default allocator,
    as users run). One JSON line per provider on stdout (flushed as soon as known)."""
    import torch

    torch.manual_seed(0)
    fns, mem = {}, {}
    for prov in providers:
        inputs = _make(case)
        fn = _fn(case, prov, inputs)
        import gc

        gc.collect()
        before = _status_kb("VmRSS:")
        ok = measure == "memory" and _reset_hwm()
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a provider that cannot run this case: recorded, the others go on
            print(json.dumps(dict(provider=prov, status="error", error=f"{type(e).__name__}: {e}"[:300])), flush=True)
            continue
        first = time.perf_counter() - t0
        mem[prov] = (_status_kb("VmHWM:") - before) * 1024 if ok else None
        fns[prov] = (fn, first)
    if measure == "memory":
        for prov in fns:
            print(json.dumps(dict(provider=prov, status="ok", peak_bytes=mem[prov])), flush=True)
        return
    times = {p: [] for p in fns}
    spent, rounds = 0.0, 0
    slow = max((f for _, f in fns.values()), default=0) > ROUND_BUDGET_S
    while fns and (rounds < (1 if slow else 3) or (spent < ROUND_BUDGET_S and rounds < MAX_ROUNDS)):
        for prov, (fn, _) in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[prov].append(dt * 1e3)
            spent += dt
        rounds += 1
    for prov in fns:
        print(json.dumps(dict(provider=prov, status="ok", time_ms=statistics.median(times[prov]),
                              times_ms=times[prov], first_call_ms=fns[prov][1] * 1e3)),
              flush=True)


# ----------------------------------------------------------------------------------------------------
# the driver


def _spawn_one(case, providers, timeout, measure):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if measure == "memory":  # freed buffers go back to the OS at once, so the RSS high-water mark is the call's
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "benchmarks.suites.cpu", "--worker", json.dumps(case), "--measure", measure,
           "--providers", *providers]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(HERE.parent))
        lines, err = r.stdout, (r.stderr[-400:] if r.returncode else "")
        rc = r.returncode
    except subprocess.TimeoutExpired as e:
        lines = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timeout after {timeout} s", "timeout"
    got = {}
    for ln in lines.splitlines():
        try:
            d = json.loads(ln)
            got[d["provider"]] = d
        except (ValueError, KeyError):
            pass
    for p in providers:
        if p not in got:
            got[p] = dict(provider=p, status="timeout" if rc == "timeout" else "crashed", error=err)
    return got


def _spawn(case, providers, timeout):
    """Time and memory of ``providers`` on ``case``, each in its own worker process: memory with glibc's mmap
    threshold pinned low (every large buffer is its own mapping, returned on free, so the RSS high-water mark
    is exact), time with the default allocator -- the pinned one turns every large allocation into an
    mmap + page faults + munmap, which would charge code that allocates per chunk for a setting no user has."""
    mem = _spawn_one(case, providers, timeout, "memory")
    got = _spawn_one(case, providers, timeout, "time")
    for p in providers:
        if got[p]["status"] == "ok":
            got[p]["peak_bytes"] = mem[p].get("peak_bytes") if mem[p]["status"] == "ok" else None
    return got


def run(level: str = "full", log=sys.stderr) -> List[Dict[str, Any]]:
    records = []
    todo = cases(level)
    t0 = time.monotonic()
    for i, case in enumerate(todo):
        fast = [p for p in case["providers"] if p != "reference"]
        results = _spawn(case, fast, CASE_TIMEOUT_S)
        if "reference" in case["providers"]:
            est = reference_estimate(case)
            if est > REF_MAX_BYTES:
                results["reference"] = dict(provider="reference", status="skipped",
                                            error=f"estimated {est / 2**30:.1f} GiB > {REF_MAX_BYTES / 2**30:.0f} GiB")
            else:
                results.update(_spawn(case, ["reference"], CASE_TIMEOUT_S // 2))
        for p in case["providers"]:
            rec = dict(case=case["name"], group=case["group"], x=case["x"], mode=case["mode"], params=case["params"],
                       **results[p])
            records.append(rec)
        summary = ", ".join(
            f"{p} {results[p]['time_ms']:.1f} ms {results[p]['peak_bytes'] / 2**20 if results[p]['peak_bytes'] is not None else float('nan'):.0f} MiB"
            if results[p]["status"] == "ok" else f"{p} {results[p]['status']}" for p in case["providers"])
        log.write(f"[{i + 1}/{len(todo)} {time.monotonic() - t0:.0f}s] {case['name']}: {summary}\n")
        log.flush()
    return records


def environment() -> Dict[str, Any]:
    import torch

    env = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
               cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    try:
        env["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                       cwd=str(HERE.parent)).stdout.strip()
    except OSError:
        pass
    return env


def main(level: str = "full", out: Optional[Path] = None, plots: bool = True) -> int:
    out = Path(out) if out is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    t0 = time.monotonic()
    env = environment()
    records = run(level)
    env["load_avg_at_end"] = os.getloadavg()
    data = dict(schema=SCHEMA, suite=NAME, created_utc=created, level=level, wall_s=round(time.monotonic() - t0, 1),
                shapes=dict(B=B, H=H, Hkv=HKV, D=D, dim=DIM, dtype="float32"),
                measurement=dict(timer="time.perf_counter, median of interleaved rounds",
                                 memory="peak RSS above the pre-call RSS of one call (VmHWM reset via clear_refs)",
                                 ref_max_bytes=REF_MAX_BYTES, case_timeout_s=CASE_TIMEOUT_S),
                environment=env, records=records)
    stamp = created.replace(":", "").replace("-", "")
    path = out / f"cpu-{stamp}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    from benchmarks.suites import cpu_report

    md = cpu_report.write(dict(data, _path=str(path)), out, plots=plots)
    print(f"cpu: {len(records)} records -> {path}; {md}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--providers", nargs="*", default=[])
    ap.add_argument("--measure", choices=("time", "memory"), default="time")
    ap.add_argument("--level", default="full")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker), a.providers, a.measure)
    else:
        sys.exit(main(a.level, a.out))
