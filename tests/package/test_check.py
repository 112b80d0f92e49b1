"""``attnzoo check``: every row passes here, the torch backend is checked, the table carries a legend, and
without a terminal the progress is one flushed line per row (log-friendly)."""

from attnzoo import check


def _one_case():
    return [c for c in check._attention_cases() if c.name == "gqa causal Tq!=Tk"]


def test_torch_backend_is_checked_and_logged_line_by_line(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(check, "all_cases", _one_case)
    rows = check.run_checks(dtypes=[torch.float32], device="cpu", progress=True)
    err = capsys.readouterr().err
    by_backend = {r.backend: r for r in rows}
    assert by_backend["torch"].status == "pass" and by_backend["torch"].max_err <= by_backend["torch"].tol
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == len(rows)  # one line per row, no progress bar redraws
    assert all(ln.startswith(f"[{i + 1}/") for i, ln in enumerate(lines))
    assert any("/ torch float32: pass" in ln for ln in lines)
    assert "\r" not in err


def test_table_has_a_legend():
    text = check.format_table([check.Row("attention", "dense", "torch", "float32", "pass", 1e-7, 2e-5)])
    assert "max err:" in text and "tol:" in text and "SPEC" in text


def test_every_row_of_the_check_passes_here():
    """The README's main job, ``attnzoo check``, on this machine's devices and dtypes: no row fails (a FAIL
    row is a backend outside SPEC §0's accuracy rule, or a crash)."""
    rows = check.run_checks(progress=False)
    failed = [f"{r.op} / {r.case} / {r.backend} {r.dtype}: err {r.max_err:.2e} tol {r.tol:.2e} {r.note}"
              for r in rows if r.status == "FAIL"]
    assert not failed, "\n".join(failed)
    assert any(r.status == "pass" and r.backend == "torch" for r in rows)
