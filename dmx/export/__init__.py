"""``dmx export OUT --to compressed-tensors|quark|gguf -o DIR``: deployable checkpoints from OUT.

Every export goes: read and check OUT (hashes) -> refuse what the target cannot hold or
serve -> write into a temporary sibling of DIR -> read it back with the target's own
reader and compare with mxref bit for bit -> rename into DIR. A failure at any step
leaves nothing at DIR.
"""
from __future__ import annotations

from pathlib import Path

from dmx.errors import DMXError
from dmx.export.targets import TARGETS, target_module

__all__ = ["TARGETS", "export", "add_export_parser", "run_export"]


def export(out_dir, to: str, dest, allow_unfused: bool = False, verify: bool = True,
           force: bool = False, log=print, **write_options) -> list:
    """Export OUT to ``dest``; returns the read-back checks (empty when ``verify`` is False).

    ``write_options`` go to the target's writer (e.g. ``max_shard_bytes``).
    """
    from dmx.outdir.read import read_out
    from dmx.outdir.write import parents_made

    mod = target_module(to)
    dest = Path(dest)
    if not Path(out_dir).is_dir():   # named by read_out, before any directory is made
        read_out(out_dir)
    # the parents of DIR are made for the export and removed again if it fails
    with parents_made(dest, "-o/--output"):
        return _export(out_dir, mod, to, dest, allow_unfused, verify, force, log,
                       write_options)


def _export(out_dir, mod, to, dest, allow_unfused, verify, force, log, write_options):
    from mxref.outputs import check_output, output_dir

    from dmx.export import verify as vfy
    from dmx.outdir.read import check_config_fits, read_out

    rules = dict(force=force, marker=is_export_dir, inputs=[out_dir], what="-o/--output",
                 tool="dmx export", error=DMXError)
    check_output(dest, is_dir=True, **rules)   # before reading OUT: fail fast
    src = read_out(out_dir)   # every file's hash checked
    from dmx.rotate.info import refuse_online_rotations
    refuse_online_rotations(src.manifest, to)   # no runtime applies dmx's online R4
    mod.check(src, allow_unfused)   # what the target cannot hold, named first
    check_config_fits(src)
    if to == "gguf" and any(l.act_format for l in src.layers.values()):
        log("note: GGUF stores weights only; llama.cpp quantizes activations its own way, "
            "so the activation formats of OUT are not carried over")
    with output_dir(dest, **rules) as tmp:
        mod.write(src, tmp, **write_options)
        checks = []
        if verify:
            try:
                checks = mod.read_back(src, tmp)
            except Exception as err:   # the target's reader rejected our file: a dmx bug
                raise DMXError(f"{to} read-back failed ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:160] if str(err) else ''}); "
                               f"nothing written to {dest}; please report this as a bug") \
                    from None
            log(vfy.summary_table(to, checks))
            bad = vfy.failures(checks, lossy_kinds=("Q8_0",))
            if bad:
                raise DMXError(f"{to} read-back differs from OUT for {len(bad)} layer(s), first "
                               f"{bad[0].name} ({bad[0].mismatches} elements); nothing written "
                               f"to {dest}; please report this as a bug")
            lossy = [c for c in checks if c.stored_as == "Q8_0"]
            if lossy:
                log(f"note: {len(lossy)} 8-bit MX layer(s) stored as Q8_0 (llama.cpp has no "
                    f"MXFP8): max abs error vs the MX weights "
                    f"{max(c.max_abs_err for c in lossy):.3g}")
        narrowed = mod.narrowed_to_f16(src) if to == "gguf" else []
        if narrowed:
            log(f"note: {len(narrowed)} unquantized float32 tensor(s) stored as F16 "
                f"(llama.cpp's converter default), e.g. {narrowed[0]}")
    log(f"wrote {dest} ({to})")
    return checks


def is_export_dir(path) -> bool:
    """An earlier `dmx export` output, what --force may replace: a GGUF directory, or a
    sharded Hugging Face directory carrying the dmx manifest (copied for provenance)."""
    from dmx.export.gguf_export import GGUF_NAME
    from dmx.export.hfdir import INDEX
    from dmx.outdir.layout import MANIFEST_NAME
    path = Path(path)
    return (path / GGUF_NAME).is_file() or ((path / INDEX).is_file()
                                            and (path / MANIFEST_NAME).is_file())


# ------------------------------------------------------------------- CLI
def add_export_parser(subparsers):
    """Register ``dmx export`` on the dmx CLI's subparsers; returns the parser."""
    p = subparsers.add_parser(
        "export", help="write a deployable checkpoint (vLLM, llama.cpp) from a dmx OUT dir",
        description="Export a dmx OUT directory to compressed-tensors or Quark (vLLM) or "
                    "GGUF (llama.cpp), then read it back and check it bit for bit.")
    p.add_argument("out", help="OUT directory written by `dmx search` / `dmx baseline`")
    p.add_argument("--to", required=True, choices=TARGETS, help="target format")
    p.add_argument("-o", "--output", required=True, help="directory to create")
    p.add_argument("--allow-unfused", action="store_true",
                   help="allow q/k/v or gate/up of one block in different formats "
                        "(vLLM cannot load that; for engines that do not fuse)")
    p.add_argument("--verify", dest="verify", action="store_true", default=True,
                   help="read the result back and compare with mxref (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the read-back check")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run_export)
    return p


def run_export(args) -> int:
    """The CLI action (errors and exit codes: dmx.cli's one frame)."""
    export(args.out, args.to, args.output, allow_unfused=args.allow_unfused,
           verify=args.verify, force=args.force)
    return 0
