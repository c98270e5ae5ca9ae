"""Before a search or baseline: which layers an export target can hold (``--export-target``).

Its own module (not dmx.export.rules) because it reads each backend's format table, and the
backends import the rules.
"""
from __future__ import annotations

from mxref.formats import DEFAULT_BLOCK_SIZE

from dmx.errors import DMXError

__all__ = ["supported_formats", "plan_for_target"]


def supported_formats(target: str) -> frozenset:
    """The element formats ``target`` can store (each backend's own table)."""
    if target == "compressed-tensors":
        from dmx.export.compressed_tensors import FORMAT_OF as table
    elif target == "quark":   # weights: amd-quark cannot run MXFP8 weights (quark.check)
        from dmx.export.quark import WEIGHT_DTYPES as table
    elif target == "gguf":
        from dmx.export.gguf_export import EIGHT_BIT
        table = ("fp4_e2m1",) + EIGHT_BIT
    else:
        raise DMXError(f"unknown export target {target!r}")
    return frozenset(table)


ANY_TARGETS = ("compressed-tensors", "gguf")


def plan_for_target(shapes: dict, ladder, target: str) -> tuple[list[str], dict[str, str]]:
    """Before a search or baseline: which of the layers ``shapes`` ({name: (out, in)})
    ``target`` can hold in every format they may take. ``ladder``: a ladder (name or
    Ladder: every rung), or one element format key (a uniform baseline's ``--format``).
    ``target``: a backend name, "any" (what all of them accept) or "none" (no check).
    Returns (kept names, {excluded name: reason}); a format the target cannot store at
    all raises (excluding layers cannot fix that).
    """
    from dmx.export.targets import TARGETS

    if target == "none":
        return list(shapes), {}
    formats, what, other = _formats_to_store(ladder)
    # "any" = compressed-tensors and gguf: Quark holds no MXFP8 weights, the default ladder's
    # top rung, so a Quark export is planned with --export-target quark
    targets = ANY_TARGETS if target == "any" else (target,)
    for t in targets:
        missing = [f for f in formats if f not in supported_formats(t)]
        if missing:
            others = [o for o in TARGETS if all(f in supported_formats(o) for f in formats)]
            hint = f"--export-target {others[0]}, " if others else ""
            raise DMXError(f"{what}: {t} cannot store {', '.join(missing)}; use "
                           f"{hint}{other}, or --export-target none to quantize anyway")
    kept, excluded = [], {}
    for name, (_, in_features) in shapes.items():
        if in_features % DEFAULT_BLOCK_SIZE:
            excluded[name] = (f"in_features {in_features} is not a multiple of "
                              f"{DEFAULT_BLOCK_SIZE} (MX kernels read whole blocks)")
        else:
            kept.append(name)
    if not kept:
        raise DMXError(f"no layer can be exported to {target}: every in_features is ragged; "
                       f"use --export-target none to quantize anyway")
    return kept, excluded


def _formats_to_store(ladder) -> tuple[list[str], str, str]:
    """(element formats, how the message names them, the flag that changes them)."""
    from dmx.quant.ladders import LADDERS, get_ladder
    if isinstance(ladder, str) and ladder not in LADDERS:
        import mxref
        fmt = mxref.get_format(ladder).key
        return [fmt], f"--format {fmt}", "another --format"
    lad = get_ladder(ladder)
    return [r.fmt for r in lad.rungs], f"ladder {lad.name}", "another --ladder"
