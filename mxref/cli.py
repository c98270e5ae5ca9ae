"""``mxref`` command line: formats table, quantize/dequantize .npy <-> .npz, decode, sweep.

Every bad input is a one-line ``mxref: error: ...`` on stderr with exit code 2 and no
traceback; a failed sweep exits 1 (the shared frame: :mod:`mxref.cliframe`). numpy
and the golden model load inside the commands, within that frame (Ctrl-C: one line,
exit 130), and ``--help`` loads neither numba nor ml_dtypes.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING

from mxref.cliframe import EXIT_FAILED, run_cli
from mxref.errors import MXError

if TYPE_CHECKING:   # numpy loads inside the commands (the module docstring says why)
    import numpy as np


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors like MXError: one line, exit 2."""

    def error(self, message):
        raise MXError(message)


# --------------------------------------------------------------------------- formats
def _codes_text(codes) -> str:
    return ", ".join(f"{c:#04x}" for c in codes) if codes else "-"


def formats_table() -> str:
    from mxref.formats import E8M0, FORMATS
    head = ("format", "MX name", "bits", "E/M", "bias", "emax", "max normal",
            "min normal", "min subnormal", "Inf codes", "NaN codes")
    rows = []
    for f in FORMATS.values():
        layout = f"int{f.bits} (frac {f.frac_bits})" if f.is_int else f"E{f.exp_bits}M{f.man_bits}"
        sign = f.sign_bit
        infs = [c for i in f.inf_codes for c in (i, i | sign)]
        nans = [c for i in f.nan_codes for c in (i, i | sign)]
        rows.append((f.key, f.mx_name, str(f.bits), layout, "-" if f.is_int else str(f.bias),
                     str(f.emax), repr(f.max_normal),
                     "-" if f.is_int else repr(f.min_normal), repr(f.min_subnormal),
                     _codes_text(infs), _codes_text(nans)))
    rows.append(("e8m0 (scale)", "-", str(E8M0.bits), "E8M0", str(E8M0.bias),
                 str(E8M0.max_exp), f"2^{E8M0.max_exp}", f"2^{E8M0.min_exp}", "-", "-",
                 f"{E8M0.nan_code:#04x}"))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def cmd_formats(args) -> int:
    print(formats_table())
    return 0


# --------------------------------------------------------------------------- quantize
def _load_npy(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise MXError(f"{path} does not exist")
    import numpy as np
    from mxref.npzfile import numpy_source
    try:
        x = np.load(numpy_source(path), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        # EOFError: numpy's answer to an empty (0-byte) file; it was a traceback
        raise MXError(f"{path} is not a readable .npy file ({e})") from None
    if not isinstance(x, np.ndarray):
        raise MXError(f"{path} is an .npz archive; pass a single-array .npy file")
    if x.dtype.kind == "V" and x.dtype.itemsize == 2 and x.dtype.names is None:
        # numpy has no bfloat16: np.save of an ml_dtypes.bfloat16 array records "|V2"
        import ml_dtypes
        x = x.view(ml_dtypes.bfloat16)
    return x


def _is_npy(path) -> bool:
    """A .npy file (numpy's magic): what `mxref dequantize` writes and --force may replace."""
    with open(path, "rb") as fh:
        return fh.read(6) == b"\x93NUMPY"


def _out_kind(suffix: str):
    from mxref.outputs import is_mxref_npz
    return is_mxref_npz if suffix == ".npz" else _is_npy


def _check_out(args, suffix: str) -> None:
    """Before any work: the output's name, and that it may be written (never the input;
    --force only over a previous mxref output)."""
    from mxref.outputs import check_output
    if not args.output.endswith(suffix):
        raise MXError(f"output {args.output} must end in {suffix}")
    check_output(args.output, force=args.force, is_dir=False, marker=_out_kind(suffix),
                 inputs=[args.input], what="-o/--output", tool="mxref")


def _write_out(args, suffix: str, write) -> None:
    from mxref.cliframe import one_line
    from mxref.outputs import atomic_write
    try:
        atomic_write(args.output, write, force=args.force, marker=_out_kind(suffix),
                     inputs=[args.input], what="-o/--output", tool="mxref")
    except OSError as e:
        # still exit 1 (an OS error, not bad input), but say which file: a full disk
        # surfaced as numpy's bare "262144 requested and 25568 written"
        raise OSError(f"could not write -o/--output {args.output} ({one_line(e)}); nothing "
                      f"was written there: check free space and permissions, or choose "
                      f"another -o/--output") from None


def cmd_quantize(args) -> int:
    import numpy as np
    import mxref
    from mxref.npzfile import npz_arrays
    _check_out(args, ".npz")
    x = _load_npy(args.input)
    mx = mxref.quantize(x, args.format, axis=args.axis, block_size=args.block_size,
                        profile=args.profile)
    arrays = npz_arrays(mx)
    _write_out(args, ".npz", lambda f: np.savez(f, **arrays))
    print(f"{args.input} {x.dtype}{list(x.shape)} -> {args.output}: {mx.fmt.key}, "
          f"{mx.n_blocks} block{'' if mx.n_blocks == 1 else 's'} of {mx.block_size} along axis {mx.axis}, "
          f"profile {mx.profile.name} ({mx.profile.hash})")
    return 0


def cmd_dequantize(args) -> int:
    import numpy as np
    import mxref
    from mxref.npzfile import load_npz
    _check_out(args, ".npy")
    mx = load_npz(args.input)
    y = mxref.dequantize(mx, dtype=args.dtype)
    _write_out(args, ".npy", lambda f: np.save(f, y))
    print(f"{args.input} -> {args.output}: {y.dtype}{list(y.shape)}")
    return 0


# --------------------------------------------------------------------------- decode
def _parse_code(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise MXError(f"code {text!r} is not an integer; write it as 0x7e, 0b0111, or 126") \
            from None


def _bit_fields(code: int, widths) -> str:
    bits = format(code, f"0{sum(widths)}b")
    out, i = [], 0
    for w in widths:
        out.append(bits[i:i + w])
        i += w
    return ".".join(p for p in out if p)


def _fmt_value(v: float) -> str:
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v!r}" if abs(v) >= 2 ** -20 or v == 0 else f"{v!r} (2^{math.log2(abs(v)):g})"


def cmd_decode(args) -> int:
    from mxref.formats import E8M0, get_format
    codes = [_parse_code(c) for c in args.codes]
    # every line is built (and every code range-checked) before any is printed: a bad
    # code after good ones used to leave a partial table on stdout next to the exit 2
    if args.format.lower() in ("e8m0", "scale"):
        lines = [f"{c:#04x}  {format(c, '08b')}  {_fmt_value(E8M0.decode(c))}"
                 for c in codes]
    else:
        fmt = get_format(args.format)
        widths = (1, fmt.bits - 1) if fmt.is_int else (1, fmt.exp_bits, fmt.man_bits)
        lines = [f"{c:#04x}  {_bit_fields(c, widths)}  {_fmt_value(fmt.decode_code(c))}"
                 for c in codes]   # decode_code: range-checked, one-line error
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------- sweep
def _parse_count(text: str) -> int:
    t = text.replace("**", "^")
    try:
        if "^" in t:
            b, e = t.split("^")
            b, e = int(b), int(e)
        else:
            return int(t, 0)
    except ValueError:
        raise MXError(f"{text!r} is not a count; write e.g. 16777216, 2^24 or 0x1000000") \
            from None
    if abs(b) > 1 and e > 64:   # 10^999999999 computed for minutes (and GBs) before any check
        raise MXError(f"{text!r} is too large; no count here is above 2^64")
    return b ** e


def cmd_sweep(args) -> int:
    from mxref.sweep import sweep_format
    res = sweep_format(args.format, args.profile, chunk=_parse_count(args.chunk),
                       stride=_parse_count(args.stride), progress=not args.no_progress)
    print(res.summary())
    return 0 if res.ok else EXIT_FAILED


# --------------------------------------------------------------------------- pack
def cmd_pack(args) -> int:
    import numpy as np
    from mxref.npzfile import load_npz
    from mxref.pack import LLAMACPP_BLOCK, pack_codes, pack_llamacpp_mxfp4, packing_name
    _check_out(args, ".npz")
    mx = load_npz(args.input)
    if args.layout == "llamacpp":
        if mx.fmt.key != "fp4_e2m1" or mx.block_size != LLAMACPP_BLOCK:
            raise MXError(f"the llama.cpp layout holds MXFP4 with block size "
                          f"{LLAMACPP_BLOCK} only")
        arrays = dict(blocks=pack_llamacpp_mxfp4(mx.codes, mx.scales),
                      layout=np.str_("llamacpp-mxfp4"))
    else:
        arrays = dict(packed=pack_codes(mx.codes, mx.fmt), scales=mx.scales,
                      layout=np.str_(packing_name(mx.fmt)))
    arrays.update(format=np.str_(mx.fmt.key), K=np.int64(mx.codes.shape[-1]))
    _write_out(args, ".npz", lambda f: np.savez(f, **arrays))
    print(f"{args.input} -> {args.output}: layout {str(arrays['layout'])}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from mxref.version import __version__
    from mxref.formats import DEFAULT_BLOCK_SIZE
    from mxref.profiles import PRESETS
    p = _Parser(prog="mxref", description="Bit-exact OCP MX v1.0 golden model.")
    p.add_argument("--version", action="version", version=f"mxref {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("formats", help="table of element formats and the E8M0 scale")
    s.set_defaults(func=cmd_formats)

    s = sub.add_parser("quantize", help="MX-quantize a .npy array into an .npz")
    s.add_argument("input", help="input .npy (float32, float64, float16 or bfloat16)")
    s.add_argument("--format", "-f", required=True, help="element format, e.g. fp4_e2m1")
    s.add_argument("--axis", type=int, default=-1, help="blocked axis (default -1)")
    s.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"elements per block (default {DEFAULT_BLOCK_SIZE})")
    s.add_argument("--profile", default="ocp", choices=sorted(PRESETS),
                   help="implementation-defined choices (default ocp)")
    s.add_argument("-o", "--output", required=True, help="output .npz")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("dequantize", help="decode an mxref .npz back to a .npy array")
    s.add_argument("input", help="input .npz written by `mxref quantize`")
    s.add_argument("-o", "--output", required=True, help="output .npy")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.set_defaults(func=cmd_dequantize)

    s = sub.add_parser("decode", help="print the value of element (or E8M0) codes")
    s.add_argument("--format", "-f", required=True, help="element format, or e8m0")
    s.add_argument("codes", nargs="+", help="codes: 0x7e, 0b0111 or decimal")
    s.set_defaults(func=cmd_decode)

    s = sub.add_parser("sweep", help="encode every float32 bit pattern and check the results")
    s.add_argument("--format", "-f", required=True, help="element format")
    s.add_argument("--profile", default="ocp", choices=sorted(PRESETS))
    s.add_argument("--chunk", default="2^24", help="patterns per chunk (default 2^24)")
    s.add_argument("--stride", default="1",
                   help="check every n-th pattern only (default 1 = all 2^32)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("pack", help="pack the codes of an mxref .npz into bytes")
    s.add_argument("input", help="input .npz written by `mxref quantize`")
    s.add_argument("--layout", default="native", choices=["native", "llamacpp"],
                   help="native: fp4-lo-first / fp6-le24 / byte; llamacpp: GGUF MXFP4 blocks")
    s.add_argument("-o", "--output", required=True, help="output .npz")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.set_defaults(func=cmd_pack)
    return p


def main(argv=None) -> int:
    def body():
        args = build_parser().parse_args(argv)   # usage errors are MXError (_Parser)
        return args.func(args)
    return run_cli("mxref", body)


if __name__ == "__main__":
    sys.exit(main())
