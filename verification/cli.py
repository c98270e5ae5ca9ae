"""``mxverify``: golden vectors, a DUT checker, library conformance and exhaustive sweeps.

    mxverify gen --format fp4_e2m1 --op quantize --level 1 --seed 1 --out vec/
    mxverify check --vectors vec/ --dut dut.hex --report report.xml
    mxverify conformance --against ml_dtypes,gfloat,torchao --level 1
    mxverify exhaustive --format fp4_e2m1 --input float32 --limit 16777216

Exit status: 0 success, 1 mismatches found (check, exhaustive), 2 bad input (one line
on stderr, no traceback). conformance exits 0 with disagreements: the other libraries'
differences are its result, each named with its cause. docs/verification.md describes every file and field.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mxref.cliframe import run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # argparse's default also exits 2; keep it one line
        self.exit(2, f"mxverify: error: {message}\n")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _int(s: str) -> int:
    """Decimal or 0x-prefixed hex (bit patterns read better in hex)."""
    return int(s, 0)


_int.__name__ = "int"   # argparse names the type in its error: "invalid int value", not "_int"


def _seed(s: str) -> int:
    """A 64-bit unsigned seed: the PRNG takes the seed modulo 2^64, so -1 or 2^64 + 1 would
    silently give another seed's vectors while the manifest records a seed that a 64-bit
    testbench PRNG cannot hold."""
    v = int(s)
    if not 0 <= v < 1 << 64:
        raise argparse.ArgumentTypeError(f"{s}: the seed must be in 0 .. 2^64-1")
    return v


_seed.__name__ = "seed"   # argparse: "invalid seed value: 'abc'"


def build_parser() -> argparse.ArgumentParser:
    from mxref.formats import DEFAULT_BLOCK_SIZE
    from verification.cases import LEVELS, OPS
    p = _Parser(prog="mxverify", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    g = sub.add_parser("gen", help="generate golden vectors")
    g.add_argument("--format", required=True)
    g.add_argument("--op", required=True, choices=OPS)
    g.add_argument("--level", default="1", choices=LEVELS)
    g.add_argument("--seed", type=_seed, default=1)
    g.add_argument("--profile", default="ocp")
    g.add_argument("--emit", default="hex,bin,npz,jsonl", type=_csv)
    g.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    g.add_argument("--out", required=True)
    g.add_argument("--force", action="store_true", help="replace an existing --out directory")

    c = sub.add_parser("check", help="check a DUT's outputs against recomputed expectations")
    c.add_argument("--vectors", required=True)
    c.add_argument("--dut", required=True)
    c.add_argument("--dut-format", choices=("hex", "bin", "npz"))
    c.add_argument("--nan", default="any", choices=("any", "exact"))
    c.add_argument("--zero-sign", default="strict", choices=("strict", "ignore"))
    c.add_argument("--max-errors", type=int, default=20, help="failures listed (0 = all)")
    c.add_argument("--report", action="append", default=[],
                   help="write a JSON (*.json) or JUnit XML (*.xml) report; repeatable")
    c.add_argument("--force", action="store_true", help="overwrite existing report files")

    k = sub.add_parser("conformance", help="agreement matrix against other libraries")
    k.add_argument("--against", default="ml_dtypes,torchao,gfloat", type=_csv)
    k.add_argument("--format", default="all", type=_csv)
    k.add_argument("--level", default="1", choices=("1", "2"))
    k.add_argument("--seed", type=_seed, default=1)
    k.add_argument("--json", dest="json_out")
    k.add_argument("--force", action="store_true", help="overwrite an existing --json file")

    e = sub.add_parser("exhaustive", help="all float32 inputs vs an independent second model")
    e.add_argument("--format", required=True)
    e.add_argument("--input", default="float32", choices=("float32",))
    e.add_argument("--profile", default="ocp")
    e.add_argument("--limit", type=_int, default=None, help="check only N patterns")
    e.add_argument("--start", type=_int, default=0, help="first bit pattern (e.g. 0x3F800000)")
    e.add_argument("--chunk", type=int, default=1 << 22)
    e.add_argument("--json", dest="json_out")
    e.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return p


def _refuse_existing(paths, force: bool, inputs=(), what: str = "--report") -> None:
    """Fail before any work, not after it, when an output may not be written (exists
    without --force, is not an earlier mxverify report, is an input, unwritable place)."""
    from mxref.outputs import check_output
    from verification.check import is_report
    for p in paths:
        if p:
            check_output(p, force=force, is_dir=False, marker=is_report, inputs=inputs,
                         what=what, tool="mxverify")


def _write_json(path: str, obj, force: bool) -> None:
    from mxref.outputs import atomic_write
    from verification.check import is_report
    blob = (json.dumps(obj, indent=1) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(blob), force=force, marker=is_report,
                 what="--json", tool="mxverify")


def _gen(a) -> int:
    from verification.vectors import build
    man = build(a.out, a.op, a.format, a.level, a.seed, a.profile, tuple(a.emit), a.force,
                a.block_size)
    counts = ", ".join(f"{k}={v}" for k, v in man["category_counts"].items())
    print(f"wrote {man['n_vectors']} {a.op} vectors ({man['format']}, level {a.level}, "
          f"profile {man['profile']['name']} {man['profile']['hash']}, seed {a.seed}) to "
          f"{a.out}: {counts}")
    return 0


def _check(a) -> int:
    from verification import check as C
    for r in a.report:
        if not (r.endswith(".json") or r.endswith(".xml")):
            raise C.BadInput(f"--report {r}: name it *.json or *.xml")
    # the same report named twice was written once and then refused (exit 2) after the
    # whole check had run and printed its verdict: refuse it before any work
    seen = set()
    for r in a.report:
        real = os.path.realpath(r)
        if real in seen:
            raise C.BadInput(f"--report {r} is given twice; name each report once")
        seen.add(real)
    inputs = [a.vectors, a.dut]   # a report may never replace the suite or the DUT file
    _refuse_existing(a.report, a.force, inputs)
    if a.max_errors < 0:
        raise C.BadInput("--max-errors must be >= 0 (0 lists all)")
    s = C.load_suite(a.vectors)
    dut = C.read_dut(a.dut, s, a.dut_format)
    r = C.compare(s, dut, a.nan, a.zero_sign, a.max_errors)
    print(C.format_text(r))
    for path in a.report:
        C.write_report(path, r, force=a.force, inputs=inputs)
    return 0 if r["verdict"] == "pass" else 1


def _conformance(a) -> int:
    from verification import conformance as K
    _refuse_existing([a.json_out], a.force, what="--json")
    res = K.run(a.against, a.format, a.level, a.seed)
    print(K.format_matrix(res))
    if a.json_out:
        _write_json(a.json_out, res, a.force)
    return 0


def _exhaustive(a) -> int:
    from verification import exhaustive as X
    _refuse_existing([a.json_out], a.force, what="--json")
    r = X.run(a.format, a.profile, a.limit, a.start, a.chunk)
    print(X.format_result(r))
    if a.json_out:
        _write_json(a.json_out, r, a.force)
    return 0 if r["mismatches"] == 0 else 1


def main(argv=None) -> int:
    parsed = []
    # the parser's modules load inside the frame too: Ctrl-C there is one line, exit 130
    rc = run_cli("mxverify", lambda: parsed.append(build_parser().parse_args(argv)))
    if not parsed:
        return rc
    a = parsed[0]   # usage errors: argparse's own exit 2 (SystemExit passes the frame)
    cmd = {"gen": _gen, "check": _check, "conformance": _conformance,
           "exhaustive": _exhaustive}[a.cmd]
    # the inputs are files: an unreadable or malformed one is bad input (exit 2)
    return run_cli(f"mxverify {a.cmd}", lambda: cmd(a),
                   bad_input=(OSError, json.JSONDecodeError))


if __name__ == "__main__":
    sys.exit(main())
