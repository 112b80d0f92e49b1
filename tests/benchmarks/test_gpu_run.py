"""benchmarks/gpu_run.sh, dry-run on a CPU (``GPU_RUN_DRY=1``): every step's command runs -- the headline plan
resolves every case and provider by name, ``attnzoo check`` lists its cases, pytest collects the GPU subset --
within the file budget the GPU machine returns, and the one deadline is shared out between the steps."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _dry(tmp_path, **env):
    out = tmp_path / "out"
    e = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    e.update(GPU_RUN_DRY="1", OUT=str(out), **env)
    res = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    return res, out


def test_dry_run_exercises_every_step(tmp_path):
    from benchmarks import headline

    res, out = _dry(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["check.log", "headline.log", "pytest.log", "run.log"] and len(files) <= 8
    run_log = (out / "run.log").read_text()
    for step in ("headline", "check", "pytest"):
        assert f"{step}: rc=0" in run_log, run_log
    plan = (out / "headline.log").read_text()
    assert f"{len(headline.HEADLINE)} cases" in plan
    for suite, case, provs in headline.HEADLINE:
        assert case in plan, case
    for name in ("sdpa-flash", "sdpa-cudnn", "attnzoo-triton", "attnzoo-dma-triton"):
        assert name in plan
    from attnzoo.check import all_cases

    assert f"check (dry run): {len(all_cases())} cases" in (out / "check.log").read_text()
    collected = (out / "pytest.log").read_text()
    assert "tests collected" in collected and "error" not in collected.lower(), collected[-2000:]


def test_steps_share_one_deadline(tmp_path):
    """With almost no time left every step is skipped, yet the script ends cleanly with its logs."""
    res, out = _dry(tmp_path, GPU_RUN_DEADLINE="20")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run_log = (out / "run.log").read_text()
    assert "headline: skipped" in run_log and "check: skipped" in run_log, run_log


def test_headline_covers_every_family_first():
    from benchmarks import headline

    first = {suite for suite, _, _ in headline.FIRST}
    assert first == {"attention", "decode", "lightning", "moh", "sparse"}
    attention = [case for suite, case, _ in headline.HEADLINE if suite == "attention"]
    assert len(attention) == len(set(attention)) == 12  # fwd / bwd x causal / not x 4k, 8k, 16k
    assert all("D=128" in c for c in attention)
    with pytest.raises(KeyError, match="no case"):
        headline.plan([("attention", "no such case", ("attnzoo-triton",))])
