"""``attnzoo study all --quick`` (issue 15): every study runs end to end on CPU into a temporary folder
and its outputs check out -- the files exist, every training loss is finite and falls, cached generation
equals uncached, KHA fold() is exact, uptraining after conversion lowers the loss."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUDIES = ("mqar", "charlm", "conversion")


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    r = subprocess.run(
        [sys.executable, "-m", "attnzoo.studies", "all", "--quick", "--out", str(out), "-q"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_every_output_is_written(quick_out):
    for name in STUDIES:
        assert (quick_out / f"{name}.json").is_file()
        assert (quick_out / f"{name}.md").is_file()
        pngs = list(quick_out.glob(f"{name}*.png"))
        assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    readme = (quick_out / "README.md").read_text()
    assert "What the studies show" in readme and "QUICK" in readme


@pytest.mark.parametrize("name", STUDIES)
def test_json_records_what_a_run_needs(quick_out, name):
    r = json.loads((quick_out / f"{name}.json").read_text())
    assert r["problems"] == []
    assert r["environment"]["attnzoo_version"] and r["environment"]["backend_requested"] == "auto"
    assert r["config"]["seeds"] and r["wall_seconds"] > 0 and r["runs"]
    for run in r["runs"]:
        assert "seed" in run and run["wall_seconds"] > 0
        assert run["train"]["backends"], "the backend auto picked is recorded"
        losses = run["train"]["loss"]
        assert len(losses) > 0 and all(math.isfinite(x) for x in losses)
        assert all(math.isfinite(v) for v in run["eval"].values())


def test_losses_fall_from_scratch(quick_out):
    for name in ("mqar", "charlm"):
        for run in json.loads((quick_out / f"{name}.json").read_text())["runs"]:
            losses = run["train"]["loss"]
            assert statistics.fmean(losses[-5:]) < statistics.fmean(losses[:5]), run["name"]


def test_every_variant_ran(quick_out):
    from attnzoo.studies import charlm, mqar

    assert {r["variant"] for r in json.loads((quick_out / "mqar.json").read_text())["runs"]} == set(mqar.VARIANT_LIST)
    cl = json.loads((quick_out / "charlm.json").read_text())
    assert {r["variant"] for r in cl["runs"]} == set(charlm.VARIANT_LIST)
    for run in cl["runs"]:
        gen = run["checks"]["generation"]
        assert gen["tokens_equal"] and gen["max_abs_logit_diff"] < 1e-3, run["name"]
        if run["variant"].startswith("kha"):
            assert run["checks"]["fold"]["max_abs_logit_diff"] < 1e-3
        if run["variant"].startswith("moh"):
            assert run["checks"]["head_usage"]["layers"]
    cv = json.loads((quick_out / "conversion.json").read_text())
    for run in cv["runs"]:
        assert run["eval"]["loss_uptrained"] <= run["eval"]["loss_converted"] + 1e-3


def test_cli_dispatches_study():
    from attnzoo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0
