"""``attnzoo bench --suite cpu``: runs without a GPU, its sweep covers what issue 12 asks, a worker measures
time and peak memory of every provider, and the report states each goal as met or missed from the numbers."""

import json

from benchmarks import runner
from benchmarks.suites import cpu, cpu_report


def test_cpu_suite_is_allowed_without_a_gpu(capsys):
    assert runner.main(["--suite", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "attention causal fwd x=16384" in out and "moh T=4096" in out


def test_full_sweep_covers_the_issue():
    cs = cpu.cases("full")
    groups = {c["group"] for c in cs}
    assert {"attention causal", "attention", "lightning", "dma w=64", "dma w=512", "moh T=4096"} <= groups
    assert {c["x"] for c in cs if c["group"] == "moh T=4096"} == {0.25, 0.5, 0.75, 1.0}
    assert max(c["x"] for c in cs if c["group"] == "lightning") == 65536
    assert any(c["group"].startswith("module") for c in cs)
    for c in cs:
        if c["group"].startswith("attention"):
            assert {"sdpa", "torch", "reference"} <= set(c["providers"])


def test_worker_measures_time_and_memory(capsys):
    case = next(c for c in cpu.cases("quick") if c["group"] == "attention causal" and c["x"] == 256
                and c["mode"] == "fwd+bwd")
    cpu.worker(case, ["sdpa", "torch"], "time")
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert {r["provider"] for r in recs} == {"sdpa", "torch"}
    for r in recs:
        assert r["status"] == "ok" and r["time_ms"] > 0 and len(r["times_ms"]) >= 3
    cpu.worker(case, ["sdpa", "torch"], "memory")
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert {r["provider"] for r in recs} == {"sdpa", "torch"}
    for r in recs:
        assert r["status"] == "ok" and "time_ms" not in r
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0


def test_spawn_times_with_the_default_allocator_and_measures_memory_pinned():
    """Memory and time come from separate workers: the pinned mmap threshold (needed for exact peaks) would
    otherwise slow every large allocation of the timed calls."""
    case = next(c for c in cpu.cases("quick") if c["group"] == "attention causal" and c["x"] == 256
                and c["mode"] == "fwd")
    got = cpu._spawn(case, ["sdpa", "torch"], 120)
    for p in ("sdpa", "torch"):
        assert got[p]["status"] == "ok" and got[p]["time_ms"] > 0 and "peak_bytes" in got[p]


def test_report_states_goals_from_the_numbers(tmp_path):
    def rec(group, x, mode, prov, ms, mib):
        return dict(group=group, x=x, mode=mode, provider=prov, status="ok", time_ms=ms, peak_bytes=mib * 2**20)

    records = [rec("attention causal", 1024, "fwd", "sdpa", 10, 4), rec("attention causal", 1024, "fwd", "torch", 15, 4)]
    for T in (1024, 4096, 16384):
        records += [rec("lightning", T, "fwd", "torch", T / 100, T / 100)]
    records += [rec("moh T=4096", 0.5, "fwd", "dense", 10, 1), rec("moh T=4096", 0.5, "fwd", "torch", 6, 1)]
    data = dict(records=records, created_utc="x", wall_s=1, level="full", environment={},
                shapes=dict(B=1, H=8, Hkv=2, D=64, dim=512), measurement=dict(ref_max_bytes=2**30))
    lines = "\n".join(cpu_report.goals(data))
    assert "attention time <= 1.3x SDPA**: MISSED -- worst 1.50x" in lines
    assert "lightning fwd linear in T**: met" in lines and "MoH 50% active <= 0.65x dense** (moh T=4096 fwd): met" in lines
    md = cpu_report.write(data, tmp_path, plots=False)
    assert "## Goals" in md.read_text()
