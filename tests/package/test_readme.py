"""The README's promises: its two set-up commands, CI running the test one, and a true status table."""

import re
from pathlib import Path

import attnzoo
from attnzoo import backends

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_exactly_two_setup_commands():
    blocks = [b.strip() for b in bash_blocks()]
    assert len(blocks) == 2, blocks
    assert blocks[0].endswith("attnzoo check")
    assert blocks[1].endswith("pytest -q")
    for b in blocks:
        assert b.startswith("python3 -m pip install -q torch==2.13.0 &&"), "torch must be installed first"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert bash_blocks()[1].strip() in ci.splitlines()


def test_status_table_is_true():
    table = README.split("<!-- status-table -->")[1].split("<!-- /status-table -->")[0]
    header, _, *rows = table.strip().splitlines()
    columns = [c.strip() for c in header.strip().strip("|").split("|")][1:]
    assert rows and set(columns) == set(backends.BACKENDS), columns
    op_of_row = {
        "attention": "attention",
        "attention_with_kvcache": "attention_with_kvcache",
        "moh_attention / MoHAttention": "moh_attention",
        "dynamic_mask_attention / DynamicMaskAttention": "dynamic_mask_attention",
        "lightning_attention / LightningAttention": "lightning_attention",
        'KHA-MLP (knocking="mlp")': "kha_mlp",
    }
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        op = op_of_row[cells[0]]
        have = {i.backend for i in backends.implementations(op)}
        for name, cell in zip(columns, cells[1:]):
            claims = cell.startswith("yes")
            assert claims == (name in have), f"README says {cell!r} for {op}/{name}; registered: {sorted(have)}"
    assert attnzoo.__version__


def test_readme_examples_run():
    """The usage examples in the README run as written."""
    (code,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y"].shape == (2, 128, 512)
    assert scope["o"].shape == (2, 64, 8, 64) and scope["lse"].shape == (2, 8, 64)


def test_relative_links_of_the_readme_and_docs_resolve():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert (ROOT / "docs" / "spec.md").is_file() and (ROOT / "docs" / "design.md").is_file()
    assert (ROOT / "LICENSE").is_file()
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: link to {target} does not resolve"
