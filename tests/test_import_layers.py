"""The import graph of the golden model and the verification kit has no circle.

Every ``import`` counts, also those inside functions (a function-level import that runs
back up a layer is a circle too, only a deferred one). Modules are read with ``ast``, not
imported, so the test is fast and sees every branch. Extend PACKAGES to cover more.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["mxref", "verification"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import sub`` -> pkg.sub)."""
    out: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative import
                    pkg = m.split(".") if is_pkg else m.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                while t and t not in mods:      # mxref.formats.X -> mxref.formats
                    t = t.rpartition(".")[0]
                if t and t != m:
                    out[m].add(t)
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return comps


def test_no_import_circle():
    edges = _edges(_modules())
    # A package's __init__ importing its own modules is the normal direction; a module
    # importing its package's __init__ (``from mxref import X``) runs back up.
    assert _cycles(edges) == [], (
        "import circles (every import counts, also inside functions): move what both "
        "sides need into a lower module")


def test_mxref_modules_never_import_the_package_facade():
    """mxref/__init__.py re-exports the API from the modules; a module importing it back
    (``from mxref import X``) runs up a layer. The command line (cli, __main__) sits above
    the API and may use it."""
    edges = _edges(_modules())
    up = sorted(m for m, targets in edges.items()
                if m.startswith("mxref.") and m not in ("mxref.cli", "mxref.__main__")
                and "mxref" in targets)
    assert up == [], f"import from the defining module instead: {up}"


def test_mxref_never_imports_verification_or_torch():
    mods = _modules()
    for m, path in mods.items():
        if not m.startswith("mxref"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                assert top not in ("verification", "dmx", "torch"), f"{m} imports {name}"


def test_the_cycle_finder_finds_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
