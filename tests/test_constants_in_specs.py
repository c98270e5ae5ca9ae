"""No MX or float32 format constant is typed outside specs/formats.toml.

The Python sources of every folder in PACKAGES are read token by token (comments and
strings, docstrings included, are not code and are skipped) and by syntax tree, and each
number that looks like a format constant fails the test unless ALLOWED lists it with a
reason. The suspicious values are partly *derived from the specs* (every format's max
normal and its max-normal significand), so a format added to formats.toml is covered
without touching this file.

To cover another folder (e.g. ``dmx``), add it to PACKAGES and fix or allow what it lists.
"""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from mxref.formats import FORMATS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["mxref", "verification"]

# ---------------------------------------------------------------------------- what is suspicious
# Written as a float (448.0, 7.5) or as an int of 3+ digits (448, 57344): the max normals
# (small ints such as 6 or 28 are too common as plain counts to flag).
_MAX_NORMALS = {f.max_normal for f in FORMATS.values()}
# The RCEIL fraction and its relatives: max_normal / 2^emax (1.75, 1.875, ...) and that
# minus one (0.875, ...), as float literals; 0.5/0.75/1.5 are too common to flag.
_FRACTIONS = ({f.max_normal_significand for f in FORMATS.values()}
              | {f.max_normal_significand - 1 for f in FORMATS.values()}) - {0.5, 0.75, 1.5}
# Other formats' maxima that must come from specs too (E4M3FNUZ 240, the closed form 480).
_OTHER_MAXIMA = {240, 480}
# E8M0: bias 127 / 0x7F and the range ends -127, 254 / 0xFE; float32: the exponent limits
# 126, 149 and float64's 1022/1023; float32 bit patterns.
_INT_VALUES = {127, 126, 149, 254, 1022, 1023}
_HEX_PATTERNS = {0x7F, 0xFE, 0x7F800000, 0x7FFFFF, 0x007FFFFF, 0x7FFFFFFF, 0x800000,
                 0x80000000, 0x7FC00000, 0x7F7FFFFF, 0xFF800000, 0x807FFFFF, 0xBFFFFFFF}
BLOCK_SIZE = 32

# ---------------------------------------------------------------------------- justified exceptions
# (path, the literal as written, a piece of its source line) -> why it may stay.
ALLOWED = {
    ("mxref/pack.py", "32", "LLAMACPP_BLOCK = 32"):
        "llama.cpp's QK_MXFP4 (ggml-common.h): a third-party layout constant, not OCP's k",
}


def _sources():
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            yield p.relative_to(ROOT).as_posix(), p.read_text()


def _number(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def _token_hits(rel: str, src: str) -> list[tuple[str, int, str, str]]:
    """(path, line, literal, why) of suspicious number tokens."""
    hits = []
    lines = src.splitlines()
    toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    for i, t in enumerate(toks):
        if t.type != tokenize.NUMBER:
            continue
        text, v = t.string, _number(t.string)
        if v is None or isinstance(v, complex):
            continue
        is_hex = text.lower().startswith("0x")
        is_float = isinstance(v, float)
        why = None
        if v in _MAX_NORMALS and (is_float or (not is_hex and v >= 100)):
            why = "a format's max normal"
        elif v in _OTHER_MAXIMA and not is_hex:
            why = "an FP8 variant's max normal"
        elif is_float and v in _FRACTIONS:
            why = "a max-normal significand (the RCEIL fraction)"
        elif is_hex and v in _HEX_PATTERNS:
            why = "an E8M0 code or a float32 bit pattern"
        elif not is_hex and not is_float and v in _INT_VALUES:
            why = "an E8M0 bias/limit or a float32/float64 exponent limit"
        if why:
            hits.append((rel, t.start[0], text, why, lines[t.start[0] - 1]))
    return hits


def _is_block_name(node) -> bool:
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return "block" in name.lower()


def _is_32(node) -> bool:
    return isinstance(node, ast.Constant) and node.value == BLOCK_SIZE and type(node.value) is int


def _block_size_hits(rel: str, src: str) -> list[tuple[str, int, str, str, str]]:
    """The block size typed as a default argument, a comparison or a BLOCK-named constant."""
    hits, lines = [], src.splitlines()

    def hit(node, why):
        hits.append((rel, node.lineno, "32", why, lines[node.lineno - 1]))

    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            pos = a.posonlyargs + a.args
            for arg, d in zip(pos[len(pos) - len(a.defaults):], a.defaults):
                if _is_32(d) and "block" in arg.arg.lower():
                    hit(d, "the block size as a default argument")
            for arg, d in zip(a.kwonlyargs, a.kw_defaults):
                if d is not None and _is_32(d) and "block" in arg.arg.lower():
                    hit(d, "the block size as a default argument")
        elif isinstance(node, ast.Call):
            flags = [a.value for a in node.args
                     if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            for kw in node.keywords:
                if kw.arg == "default" and _is_32(kw.value) and any("block" in f for f in flags):
                    hit(kw.value, "the block size as a CLI default")
                if kw.arg and "block" in kw.arg.lower() and _is_32(kw.value):
                    hit(kw.value, "the block size passed as a literal")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_block_name(s) for s in sides) and any(_is_32(s) for s in sides):
                hit(node, "the block size compared as a literal")
        elif isinstance(node, ast.Assign):
            if _is_32(node.value) and any(_is_block_name(t) for t in node.targets):
                hit(node, "the block size as a module constant")
    return hits


def _all_hits():
    for rel, src in _sources():
        yield from _token_hits(rel, src)
        yield from _block_size_hits(rel, src)


def _allowed(hit) -> bool:
    rel, _, text, _, line = hit
    return any(rel == p and text == t and piece in line for (p, t, piece) in ALLOWED)


def test_no_format_constant_outside_specs():
    bad = [h for h in _all_hits() if not _allowed(h)]
    assert not bad, (
        "format constants typed outside specs/formats.toml (read them from mxref.formats: "
        "FORMATS[...].max_normal, .max_normal_significand, .max_normal_fraction(m), E8M0, "
        "IEEE_LAYOUTS / FLOAT32, DEFAULT_BLOCK_SIZE), or add a justified entry to ALLOWED:\n"
        + "\n".join(f"  {rel}:{ln}: {text} ({why}): {line.strip()}"
                    for rel, ln, text, why, line in bad))


def test_every_allowed_entry_is_still_used():
    """A stale allow-list entry would silently permit the next such literal."""
    hits = list(_all_hits())
    for key, reason in ALLOWED.items():
        assert reason.strip(), f"{key}: an allowed literal needs a reason"
        p, t, piece = key
        assert any(h[0] == p and h[2] == t and piece in h[4] for h in hits), \
            f"ALLOWED entry {key} matches nothing any more: remove it"


def test_the_scan_finds_planted_literals():
    """The scan itself can fail: each kind of literal it looks for is caught."""
    planted = ("def f(x, block_size=32):\n"
               "    if block == 32:\n"
               "        return x * 448.0 + 57344 + 1.75 + 0x7F800000 - 127\n")
    hits = _token_hits("planted.py", planted) + _block_size_hits("planted.py", planted)
    found = {h[2] for h in hits}
    assert {"32", "448.0", "57344", "1.75", "0x7F800000", "127"} <= found, found
    assert len([h for h in hits if h[2] == "32"]) == 2
    clean = "def g(n, bits=6):\n    return n * 2 + 0xFF + 1.5  # 448 in a comment\n\"\"\"127\"\"\"\n"
    assert _token_hits("clean.py", clean) == [] and _block_size_hits("clean.py", clean) == []
