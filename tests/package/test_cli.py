"""The main job: `attnzoo info` and `attnzoo check` (every backend that runs here against the reference)."""

import subprocess
import sys

from attnzoo import cli


def test_info_lists_every_backend_of_every_op(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("attention", "attention_with_kvcache", "moh_attention", "dynamic_mask_attention"):
        for backend in ("reference", "triton", "cuda"):
            assert any(line.split()[:2] == [op, backend] for line in out.splitlines()), (op, backend)
    assert "no:" in out  # a backend that cannot run says why


def test_check_prints_table_and_passes():
    # a subprocess: the CLI must turn the Triton interpreter on by itself on a CPU-only machine
    env_python = sys.executable
    r = subprocess.run([env_python, "-m", "attnzoo.cli", "check", "--no-progress", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["op", "case", "backend", "dtype", "status"]
    rows = [ln for ln in lines[2:] if ln.strip() and not ln.startswith(" ")]
    assert any(" triton " in ln and " pass " in ln for ln in rows), "the Triton kernels were not checked"
    assert not any(" FAIL " in ln for ln in rows)
    assert "0 failed" in lines[-1]


def test_check_exits_nonzero_on_failure(monkeypatch, capsys):
    from attnzoo import check

    def broken_rows(**_):
        return [check.Row("attention", "dense", "triton", "float32", "FAIL", 1.0, 1e-5)]

    monkeypatch.setattr(check, "run_checks", broken_rows)
    assert cli.main(["check", "--no-progress"]) == 1
    assert "1 failed" in capsys.readouterr().out


def test_info_is_public():
    import attnzoo

    text = attnzoo.info(print_it=False)
    assert text.startswith("attnzoo ") and "backends on" in text
    assert all(hasattr(attnzoo, name) for name in attnzoo.__all__)


def test_help_names_every_command_in_plain_text():
    r = subprocess.run([sys.executable, "-m", "attnzoo.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("info", "check", "bench"):
        assert any(line.strip().startswith(cmd + " ") for line in r.stdout.splitlines()), (cmd, r.stdout)


def test_bench_runs_the_suites_of_the_checkout(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the checkout: found through the installed package's location
    assert cli.main(["bench", "--dry-run", "--suite", "decode"]) == 0
    assert "suite decode:" in capsys.readouterr().out


def test_info_says_auto_never_picks_the_interpreter_and_prints_the_auto_table(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "never a Triton kernel running through the CPU" in out
    assert "the auto policy on cpu" in out
    # on a CPU machine auto picks the torch engine for the softmax core
    assert any(ln.split()[:1] == ["attention"] and ln.rstrip().endswith("-> torch") for ln in out.splitlines()), out
