"""dmx's import graph follows the layers drawn in docs/ARCHITECTURE.md: no circle, and no
import that runs back up; the three packages import only downwards; dmx does not retype
the usual format constants (448, 57344, E8M0's -127, block size 32 defaults).

Every module's imports are read with ast (function-level ones too: a lazy import is still
a dependency). ``from pkg import name`` counts as an import of ``pkg.name`` when that is a
module, else of ``pkg``. Rules:

* no import circle among dmx's modules;
* a module imports only from its own layer or the layers below it (LAYERS, bottom first);
* inside a package, a submodule never imports the package's own ``__init__`` (the
  package's face sits above its parts);
* the root ``dmx/__init__.py`` imports nothing of dmx statically (its names are lazy), so
  importing it from anywhere (e.g. for ``__version__``) is not an arrow up.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

DMX = Path(__file__).resolve().parent.parent / "dmx"

# Bottom to top; a module belongs to the first entry that is it or a package above it.
LAYERS = (
    ("base", ("dmx.errors", "dmx.threads", "dmx.data", "dmx.outdir.layout")),
    ("quant", ("dmx.quant", "dmx.rotate")),
    ("nn", ("dmx.nn",)),
    ("outdir", ("dmx.outdir",)),
    ("export", ("dmx.export",)),
    ("search", ("dmx.search",)),
    ("eval", ("dmx.eval",)),
    ("entry", ("dmx.demo", "dmx.cli", "dmx.__main__")),
)


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(DMX.rglob("*.py")):
        parts = path.relative_to(DMX.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _imports(name: str, path: Path) -> set[str]:
    """The dmx modules ``name`` imports (anywhere in the file)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    if name.endswith(".__main__"):  # ``python -m pkg``: an entry point, on top
        return len(LAYERS) - 1
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer of LAYERS; add it (and to "
                         f"docs/ARCHITECTURE.md)")


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "dmx":
            layer_of(name)


def test_root_imports_nothing_of_dmx():
    assert GRAPH["dmx"] == set(), GRAPH["dmx"]


def _upward(graph) -> list[str]:
    bad = []
    for name, deps in graph.items():
        if name == "dmx":
            continue
        for dep in deps:
            if dep == "dmx":
                continue  # the root: lazy names only (test above)
            if layer_of(dep) > layer_of(name):
                bad.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} "
                           f"({LAYERS[layer_of(dep)][0]})")
            if name.startswith(dep + ".") and MODULES[dep].name == "__init__.py" \
                    and not name.endswith(".__main__"):  # __main__: the entry, on top
                bad.append(f"{name} imports its own package's __init__ ({dep})")
    return sorted(bad)


def _cycle(graph) -> list[str] | None:
    """One import circle (as a path), or None: depth-first search with colours."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_runs_back_up():
    bad = _upward(GRAPH)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_circle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_circles_and_upward_arrows():
    """The rules above can fail: the circle this issue removed (quant <-> nn), drawn again."""
    graph = {"dmx.quant.fakequant": {"dmx.nn.layers"}, "dmx.nn.layers": {"dmx.quant.fakequant"},
             "dmx.export.plan": {"dmx.export"}}
    assert set(_cycle(graph)) == {"dmx.quant.fakequant", "dmx.nn.layers"}
    assert _upward(graph) == ["dmx.export.plan imports its own package's __init__ (dmx.export)",
                              "dmx.quant.fakequant (quant) imports dmx.nn.layers (nn)"]
    # function-level imports are read too (dmx.outdir.read imports dmx.nn.layers in load())
    assert "dmx.nn.layers" in _imports("dmx.outdir.read", MODULES["dmx.outdir.read"])


# ----------------------------------------------------------------------------- packages
# The three packages, bottom first (docs/ARCHITECTURE.md): each imports only those below.
FORBIDDEN = {"mxref": ("torch", "dmx", "verification"), "verification": ("dmx",)}


def _top_level_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_packages_import_only_downwards():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((DMX.parent / package).rglob("*.py")):
            for name in sorted(_top_level_imports(path) & set(forbidden)):
                bad.append(f"{path.relative_to(DMX.parent)} imports {name}")
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- constants
# Format constants are written once, in specs/formats.toml; dmx reads them from mxref
# (FormatInfo, E8M0, DEFAULT_BLOCK_SIZE, the IEEE layouts). The usual retyped ones:
FORMAT_LITERALS = {448: "E4M3's max normal", 57344: "E5M2's max normal"}
BLOCK_NAMES = ("block", "block_size", "group_size")


def _retyped_constants(path: Path) -> list[str]:
    found = []
    for node in ast.walk(_tree(path)):
        where = f"{path.relative_to(DMX.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and type(node.value) in (int, float) \
                and node.value in FORMAT_LITERALS:
            found.append(f"{where}: {node.value} ({FORMAT_LITERALS[node.value]})")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
                and isinstance(node.operand, ast.Constant) and node.operand.value == 127:
            found.append(f"{where}: -127 (E8M0.min_exp)")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) \
                + list(node.args.defaults) + list(node.args.kw_defaults)
            for arg, default in zip(args, defaults):
                if arg.arg in BLOCK_NAMES and isinstance(default, ast.Constant) \
                        and default.value == 32:
                    found.append(f"{where}: {arg.arg}=32 (mxref.DEFAULT_BLOCK_SIZE)")
        elif isinstance(node, ast.keyword) and node.arg in BLOCK_NAMES \
                and isinstance(node.value, ast.Constant) and node.value.value == 32:
            found.append(f"{where}: {node.arg}=32 (mxref.DEFAULT_BLOCK_SIZE)")
    return found


def test_dmx_does_not_retype_format_constants():
    found = [hit for path in MODULES.values() for hit in _retyped_constants(path)]
    assert not found, "format constants typed in dmx (read them from mxref):\n" + "\n".join(found)


def test_the_constant_check_sees_retyped_constants(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def q(x, block_size=32, cap=448.0):\n    return max(x, -127)\n")
    global DMX
    saved, DMX = DMX, tmp_path / "dmx"   # (paths are reported relative to DMX's parent)
    try:
        hits = _retyped_constants(bad)
    finally:
        DMX = saved
    assert len(hits) == 3, hits
