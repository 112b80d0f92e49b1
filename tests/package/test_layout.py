"""The package's shape (issue 11): what installs, what ``import attnzoo`` pulls in, no import circles."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "attnzoo"


def test_import_attnzoo_imports_neither_the_cli_nor_the_benchmarks():
    code = (
        "import sys, attnzoo; "
        "print(' '.join(m for m in sys.modules if m == 'attnzoo.cli' or m.split('.')[0] == 'benchmarks'))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"import attnzoo imported: {r.stdout.strip()}"


def test_the_wheel_installs_only_attnzoo(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".whl",
                                                             ".hypothesis", ".pytest_cache", "results"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel without build isolation here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("attnzoo-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"attnzoo"}, tops


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(path: Path, modules: set) -> set:
    """Modules of the package that ``path`` imports when it is imported (module-level statements only;
    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = me.split(".") if is_pkg else me.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in modules:
                        out.add(full)
                    elif base in modules:
                        out.add(base)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
    visit(tree.body)
    out.discard(me)
    return out


def test_no_import_circle_inside_the_package():
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _top_level_imports(f, modules) for f in files}
    # a package's __init__ importing its own submodules (registration) is not a circle: only explicit edges
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
