"""The DUT checker (a ``testfloat_ver`` for MX): hashes first, recompute, compare bits.

1. Every file listed in ``manifest.json`` must exist with its recorded SHA-256.
2. Inputs are read from the suite (``vectors.bin``, else ``.npz``, else ``.hex``) and
   the expected outputs are RECOMPUTED by mxref with the recorded profile (the
   expected fields stored in the suite are not trusted).
3. The DUT file holds the output fields only, in the suite's layout (``expected.hex``
   / ``expected.bin`` are valid DUT files; npz: one array per output field).
4. Comparison is bit for bit; ``--nan any`` lets any NaN match any NaN and
   ``--zero-sign ignore`` lets +0 match -0. Every mismatch is located (vector, block,
   element, field) and described (hex, decoded, XOR mask, distance in code steps).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

import mxref
from mxref.errors import MXError
from mxref.formats import FLOAT32
from verification import vectors as V

_HEX_OK = re.compile(r"^[0-9A-Fa-f]*$")


class BadInput(MXError):
    """A malformed suite or DUT file: the CLI prints it on one line and exits 2."""


# --------------------------------------------------------------------------- loading
@dataclass
class Suite:
    dir: str
    man: dict
    fields: list
    fmt: object
    profile: object

    @property
    def n(self) -> int:
        return int(self.man["n_vectors"])

    @property
    def outs(self):
        return V.outputs_of(self.fields)

    def category_of(self) -> np.ndarray:
        out = np.empty(self.n, dtype=object)
        for r in self.man["category_runs"]:
            # str() as in the counts: an int category must not fall out of the histograms
            out[r["first"]:r["first"] + r["count"]] = str(r["category"])
        return out


def load_suite(d: str) -> Suite:
    mpath = os.path.join(d, "manifest.json")
    if not os.path.isfile(mpath):
        raise BadInput(f"{mpath}: no manifest.json; point --vectors at a directory made by "
                       f"'mxverify gen'")
    try:
        with open(mpath) as fh:
            man = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{mpath}:{getattr(e, 'lineno', 1)}: invalid JSON ({e.__class__.__name__}); "
                       f"regenerate the suite") from None
    need = ("schema", "op", "format", "profile", "block_size", "n_vectors", "files",
            "category_runs")
    missing = [k for k in need if k not in man] if isinstance(man, dict) else list(need)
    if missing or man.get("schema") != V.SCHEMA:
        raise BadInput(f"{mpath}:1: not an {V.SCHEMA} manifest (missing: "
                       f"{', '.join(missing) or 'schema'}); regenerate the suite")
    _check_self_hash(man, mpath)
    _check_manifest_types(man, mpath)
    for name, info in sorted(man["files"].items()):
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            raise BadInput(f"{p}: listed in the manifest but missing; regenerate the suite")
        h = V.sha256_file(p)
        if h != info["sha256"]:
            raise BadInput(f"{p}: SHA-256 {h[:16]}... does not match the manifest "
                           f"({info['sha256'][:16]}...); the file was modified or corrupted")
    try:
        fmt = mxref.get_format(man["format"])
        profile = mxref.Profile.from_dict(man["profile"])
    except MXError as e:
        raise BadInput(f"{mpath}:1: {e}") from None
    try:
        fields = V.layout(man["op"], int(man["block_size"]))
    except (MXError, KeyError, TypeError, ValueError) as e:
        raise BadInput(f"{mpath}:1: op {man['op']!r} / block_size {man['block_size']!r} "
                       f"unusable ({e}); regenerate the suite") from None
    suite = Suite(d, man, fields, fmt, profile)
    _check_consistent(suite, mpath)
    return suite


def _suite_broken(mpath: str, what: str) -> BadInput:
    return BadInput(f"{mpath}: the suite is inconsistent ({what}); the manifest was edited or "
                    f"the suite is damaged, so the DUT is not checked: regenerate the suite "
                    f"with 'mxverify gen'")


def _check_manifest_types(man: dict, mpath: str) -> None:
    """The manifest's containers must have the types gen writes: a manifest without a
    self hash (older suites) may have been edited by hand, and a wrong type there (files
    as a list, a profile of null, a sha256 that is a number) used to end in a Python
    traceback instead of the one-line bad-input error."""
    files = man["files"]
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
            for k, v in files.items()):
        raise _suite_broken(mpath, "'files' must map each file name to its sha256 and size")
    for key in ("profile", "layout", "category_counts"):   # the last two are optional
        if (key == "profile" or man.get(key) is not None) and not isinstance(man.get(key), dict):
            raise _suite_broken(mpath, f"'{key}' must be a JSON object")


def _check_self_hash(man: dict, mpath: str) -> None:
    """The manifest's own canonical sha256 (suites from before it was recorded have none)."""
    from mxref.outputs import canonical_sha256
    if V.SELF_HASH not in man:
        return
    rest = {k: v for k, v in man.items() if k != V.SELF_HASH}
    try:
        ok = canonical_sha256(rest) == man[V.SELF_HASH]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise _suite_broken(mpath, f"its content does not match its {V.SELF_HASH}")


def _check_consistent(s: Suite, mpath: str) -> None:
    """What the manifest says must agree with itself and with the files' sizes, so that a
    wrong suite is blamed before the DUT is."""
    try:
        n = int(s.man["n_vectors"])
        runs = [(str(r["category"]), int(r["first"]), int(r["count"]))
                for r in s.man["category_runs"]]
    except (KeyError, TypeError, ValueError):
        raise _suite_broken(mpath, "n_vectors / category_runs unreadable") from None
    pos = 0
    for _, first, count in runs:
        if first != pos or count < 0:
            raise _suite_broken(mpath, f"category_runs do not tile the vectors at {pos}")
        pos += count
    if pos != n or n < 0:
        raise _suite_broken(mpath, f"n_vectors {n} but category_runs cover {pos}")
    # the JUnit report has one testcase per category of category_counts while failures
    # are attributed through category_runs: if the two disagreed, a failing DUT could get
    # a JUnit file with failures="0" (a CI pass), so they must agree
    counts = s.man.get("category_counts")
    if counts is not None and counts != _run_counts(runs):
        raise _suite_broken(mpath, "category_counts do not match category_runs")
    recorded = (s.man.get("layout") or {}).get("fields")
    if recorded is not None and recorded != [f.to_dict() for f in s.fields]:
        raise _suite_broken(mpath, f"its field layout is not that of op {s.man['op']} with "
                                   f"block size {s.man['block_size']}")
    for name, flds in (("vectors.bin", s.fields), ("expected.bin", s.outs)):
        info = s.man["files"].get(name)
        if info is not None:
            size = os.path.getsize(os.path.join(s.dir, name))
            rec = sum(f.nbytes for f in flds)
            if size != n * rec:
                raise _suite_broken(mpath, f"{name} holds {size} bytes, n_vectors {n} x "
                                           f"{rec}-byte records is {n * rec}")


def _run_counts(runs) -> dict:
    """Vectors per category from (category, first, count) runs."""
    counts: dict = {}
    for c, _, k in runs:
        counts[c] = counts.get(c, 0) + k
    return counts


def _parse_hex(path: str, fields: list, n_expected: int | None) -> dict:
    """Read hex vector lines (fields joined by '_' or not; '//' comments and blanks skipped)."""
    digits = sum(f.count * f.hex_digits for f in fields)
    rows = []
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw.startswith(b"\xef\xbb\xbf"):   # a UTF-8 byte-order mark (Windows editors):
        raw = raw[3:]                         # still a text file, not a binary dump
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not a text file (non-ASCII bytes); use --dut-format bin "
                       f"or npz for binary dumps") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.split("//", 1)[0].strip()
        if not s:
            continue
        s = s.replace("_", "")
        if not _HEX_OK.match(s):
            bad = next(c for c in s if c not in "0123456789abcdefABCDEF")
            # C-style 0x prefixes: the line is valid once they are dropped (a bare "0x" can
            # also be $fwrite's "%02h" of a byte whose low nibble is X, hence the check)
            unprefixed = re.sub(r"(^|_)0[xX](?=[0-9A-Fa-f])", r"\1",
                                line.split("//", 1)[0].strip()).replace("_", "")
            if _HEX_OK.match(unprefixed) and len(unprefixed) == digits:
                raise BadInput(f"{path}:{lineno}: '0x' prefix; write each value as bare hex "
                               f"digits ({digits} per line, fields "
                               f"{', '.join(f.name for f in fields)}), as expected.hex does")
            if bad in "xXzZ":   # what $fwrite("%h") prints for an X/Z bit: a DUT problem
                raise BadInput(f"{path}:{lineno}: {bad!r} is an unknown (X/Z) value the "
                               f"simulation wrote: the DUT drove X or Z on an output for "
                               f"this vector (unreset or undriven logic); fix that, then "
                               f"check again")
            raise BadInput(f"{path}:{lineno}: invalid hex digit {bad!r}; each line must be "
                           f"{digits} hex digits (fields {', '.join(f.name for f in fields)})")
        if len(s) != digits:
            raise BadInput(f"{path}:{lineno}: line has {len(s)} hex digits, expected {digits} "
                           f"(fields {', '.join(f'{f.name}[{f.count}]x{f.hex_digits}' for f in fields)})")
        rows.append((lineno, s))
    if n_expected is not None and len(rows) != n_expected:
        where = rows[-1][0] + 1 if rows and len(rows) < n_expected else (
            rows[n_expected][0] if rows else 1)
        raise BadInput(f"{path}:{where}: {len(rows)} vectors, the suite has {n_expected}; "
                       f"the file is truncated or has extra lines")
    out = {}
    if not rows:
        return {f.name: np.zeros((0, f.count), V._UINT[f.bits]) for f in fields}
    off = 0
    for f in fields:
        w = f.count * f.hex_digits
        vals = [int(s[off + j * f.hex_digits: off + (j + 1) * f.hex_digits], 16)
                for _, s in rows for j in range(f.count)]
        out[f.name] = np.array(vals, dtype=np.uint64).astype(V._UINT[f.bits]).reshape(-1, f.count)
        off += w
    return out


def _parse_bin(path: str, fields: list, n: int) -> dict:
    rec = sum(f.nbytes for f in fields)
    size = os.path.getsize(path)
    if size % rec:
        raise BadInput(f"{path}: {size} bytes is not a whole number of {rec}-byte records "
                       f"(truncated at record {size // rec}?)")
    if size // rec != n:
        raise BadInput(f"{path}: {size // rec} records, the suite has {n}; the file is "
                       f"truncated or has extra records")
    with open(path, "rb") as fh:
        return V.from_bin(fields, fh.read(), n)


def _fit(path: str, f, a: np.ndarray) -> np.ndarray:
    """The values as the field's unsigned type, after checking that every one fits its
    width: a wider or negative value is a DUT/file error, never truncated into a pass."""
    a = np.asarray(a).reshape(-1)
    if a.size:
        bad = np.nonzero((a < 0) | (a > (1 << f.bits) - 1))[0] if a.dtype.kind == "i" \
            else np.nonzero(a > (1 << f.bits) - 1)[0]
        if bad.size:
            i = int(bad[0])
            raise BadInput(f"{path}: {f.name}[{i // f.count}][{i % f.count}] = {int(a[i])} "
                           f"does not fit the field's {f.bits} unsigned bits ({bad.size} such "
                           f"value(s)); write bit patterns as unsigned {f.bits}-bit integers")
    return a.astype(V._UINT[f.bits])


def _parse_npz(path: str, fields: list, n: int) -> dict:
    from mxref.npzfile import read_npz
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04" and magic != b"PK\x05\x06":
        # not a zip at all (a hex or bin dump named or flagged npz): say that, rather than
        # numpy's advice about pickled data and allow_pickle
        raise BadInput(f"{path}: not an .npz (zip) file; write it with numpy.savez, or pass "
                       f"--dut-format hex|bin for a hex or binary dump")
    try:
        z = read_npz(path, ".npz (write it with numpy.savez)")
    except MXError as e:
        raise BadInput(str(e)) from None
    out = {}
    for f in fields:
        if f.name not in z:
            raise BadInput(f"{path}: key {f.name!r} missing; expected keys "
                           f"{', '.join(x.name for x in fields)}")
        a = z[f.name]
        if not np.issubdtype(a.dtype, np.integer):
            raise BadInput(f"{path}: key {f.name!r} has dtype {a.dtype}; store bit patterns "
                           f"as unsigned integers")
        if a.size != n * f.count:
            raise BadInput(f"{path}: key {f.name!r} has {a.size} values, expected "
                           f"{n} x {f.count}; the DUT output has the wrong vector count")
        # the right number of values is not enough: a [count, N] (transposed) array was
        # reshaped to [N, count] and every element landed in the wrong vector, so a correct
        # DUT was reported as failing thousands of elements
        if a.shape not in ((n, f.count), (n * f.count,)):
            raise BadInput(f"{path}: key {f.name!r} has shape {list(a.shape)}, expected "
                           f"[{n}, {f.count}] (vectors x values, or flat in that order); "
                           f"transpose or reshape it before saving")
        out[f.name] = _fit(path, f, a).reshape(n, f.count)
    return out


def _parse_jsonl(path: str, fields: list, n: int) -> dict:
    cols = {f.name: [] for f in fields}
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                rec = json.loads(line)
                for f in fields:
                    cols[f.name].append([int(h, 16) for h in rec[f.name]])
            except (ValueError, KeyError, TypeError):
                raise BadInput(f"{path}:{lineno}: malformed vector record") from None
    if len(cols[fields[0].name]) != n:
        raise BadInput(f"{path}: {len(cols[fields[0].name])} vectors, the manifest says {n}")
    return {f.name: _fit(path, f, np.array(cols[f.name], dtype=object).astype(np.int64))
            .reshape(n, f.count) for f in fields}


def read_inputs(s: Suite) -> dict:
    """The suite's fields (inputs, and the stored expected outputs that are only used to
    check the suite's own consistency), from the first vector file it holds."""
    readers = (("vectors.bin", lambda p: _parse_bin(p, s.fields, s.n)),
               ("vectors.npz", lambda p: _parse_npz(p, s.fields, s.n)),
               ("vectors.hex", lambda p: _parse_hex(p, s.fields, s.n)),
               ("vectors.jsonl", lambda p: _parse_jsonl(p, s.fields, s.n)))
    for name, read in readers:
        if name in s.man["files"]:
            return read(os.path.join(s.dir, name))
    raise BadInput(f"{s.dir}: the suite holds no vector file (vectors.bin/.npz/.hex/.jsonl)")


def read_dut(path: str, s: Suite, dut_format: str | None) -> dict:
    # a pipe (`vvp ... | mxverify check --dut /dev/stdin`, `<(...)`) exists but is not a
    # regular file: it used to be reported as "not found"; hex is read in one pass, so a
    # pipe works for it, while bin needs the file's size and npz needs to seek
    if not os.path.exists(path):
        raise BadInput(f"{path}: DUT file not found")
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a directory; --dut takes the DUT's output file")
    fmt = dut_format or {".hex": "hex", ".txt": "hex", ".mem": "hex", ".bin": "bin",
                         ".npz": "npz"}.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise BadInput(f"{path}: cannot tell the DUT file format from its name; pass "
                       f"--dut-format hex|bin|npz")
    if fmt != "hex" and not os.path.isfile(path):
        raise BadInput(f"{path}: not a regular file (a pipe?); a {fmt} DUT output must be "
                       f"a file: write it to one, or stream hex with --dut-format hex")
    if fmt == "hex":
        return _parse_hex(path, s.outs, s.n)
    if fmt == "bin":
        return _parse_bin(path, s.outs, s.n)
    if fmt == "npz":
        return _parse_npz(path, s.outs, s.n)
    raise BadInput(f"--dut-format {fmt}: choose hex, bin or npz")


# --------------------------------------------------------------------------- comparing
def _is_nan(f, v: np.ndarray, fmt) -> np.ndarray:
    v = v.astype(np.int64)
    if f.kind == "f32":
        inf, frac = FLOAT32.inf_bits, FLOAT32.frac_mask
        return ((v & inf) == inf) & ((v & frac) != 0)
    if f.kind == "scale":
        return v == mxref.E8M0.nan_code
    inr = v < fmt.n_codes
    return inr & np.isnan(np.asarray(fmt.decode_table)[np.where(inr, v, 0)])


def _is_zero(f, v: np.ndarray, fmt) -> np.ndarray:
    v = v.astype(np.int64)
    if f.kind == "f32":
        return (v & FLOAT32.abs_mask) == 0
    if f.kind == "scale":
        return np.zeros(v.shape, bool)
    inr = v < fmt.n_codes
    return inr & (np.asarray(fmt.decode_table)[np.where(inr, v, 0)] == 0)


def ordinal(f, v, fmt) -> np.ndarray:
    """Position of each value on its format's ordered number line (for code-step distance)."""
    v = np.asarray(v).astype(np.int64)
    if f.kind == "scale":
        return v
    if f.kind == "f32":
        mag = v & FLOAT32.abs_mask
        return np.where(v & FLOAT32.sign_mask, -mag, mag)
    if fmt.is_int:
        return np.where(v & fmt.sign_bit, v - fmt.n_codes, v)
    mag = v & (fmt.sign_bit - 1)
    return np.where(v & fmt.sign_bit, -mag, mag)


def _mismatch_class(f, e: int, g: int, fmt) -> str:
    ea, ga = np.array([e]), np.array([g])
    if f.kind == "scale":
        return "scale_nan" if (e == mxref.E8M0.nan_code) != (g == mxref.E8M0.nan_code) else "scale"
    if _is_nan(f, ea, fmt)[0] or _is_nan(f, ga, fmt)[0]:
        return "nan"
    if _is_zero(f, ea, fmt)[0] and _is_zero(f, ga, fmt)[0]:
        return "zero_sign"
    d = abs(int(ordinal(f, ea, fmt)[0] - ordinal(f, ga, fmt)[0]))
    sign = (1 << 31) if f.kind == "f32" else fmt.sign_bit
    if (e ^ g) == sign and not (f.kind == "code" and fmt.is_int):
        return "sign"
    if d == 1:
        return "one_step"
    return "far"


def compare(s: Suite, dut: dict, nan: str = "any", zero_sign: str = "strict",
            max_errors: int = 20, inputs: dict | None = None) -> dict:
    """Recompute, compare and summarise. ``max_errors`` (0 = all) caps the listed failures."""
    if nan not in ("any", "exact"):
        raise BadInput(f"--nan {nan}: choose any or exact")
    if zero_sign not in ("strict", "ignore"):
        raise BadInput(f"--zero-sign {zero_sign}: choose strict or ignore")
    inputs = read_inputs(s) if inputs is None else inputs
    try:
        exp = V.expected(s.man["op"], s.fmt, s.profile, int(s.man["block_size"]), inputs)
    except MXError as e:
        raise BadInput(f"{s.dir}: the suite's inputs are invalid: {e}") from None
    _check_stored_expected(s, inputs, exp)
    cats = s.category_of()
    bs = int(s.man["block_size"])
    failures, n_bad = [], 0
    bad_vectors = np.zeros(s.n, bool)
    by_cat: dict = {}
    by_class: dict = {}
    by_field: dict = {}
    for f in s.outs:
        e = np.asarray(exp[f.name]).reshape(s.n, f.count).astype(np.uint64)
        g = np.asarray(dut[f.name]).reshape(s.n, f.count).astype(np.uint64)
        ok = e == g
        if nan == "any":
            ok |= _is_nan(f, e, s.fmt) & _is_nan(f, g, s.fmt)
        if zero_sign == "ignore":
            ok |= _is_zero(f, e, s.fmt) & _is_zero(f, g, s.fmt)
        if f.kind == "code":   # a code beyond the format's width is always wrong
            ok &= g < s.fmt.n_codes
        vi, ei = np.nonzero(~ok)
        n_bad += len(vi)
        bad_vectors[vi] = True
        by_field[f.name] = by_field.get(f.name, 0) + len(vi)
        for v, el in zip(vi.tolist(), ei.tolist()):
            ev, gv = int(e[v, el]), int(g[v, el])
            in_fmt = gv < s.fmt.n_codes or f.kind != "code"
            cls = _mismatch_class(f, ev, gv, s.fmt) if in_fmt else "out_of_range"
            by_class[cls] = by_class.get(cls, 0) + 1
            by_cat[cats[v]] = by_cat.get(cats[v], 0) + 1
            if max_errors and len(failures) >= max_errors:
                continue
            dec = V.decode_field(f, [ev], s.fmt)[0], (V.decode_field(f, [gv], s.fmt)[0]
                                                     if in_fmt else "out of range")
            block = el if f.kind == "scale" else (el // bs if s.man["op"] != "dot" else None)
            failures.append({
                "vector": v, "category": cats[v], "field": f.name,
                "block": block, "element": None if f.kind == "scale" or f.count == 1 else el,
                "expected": "%0*X" % (f.hex_digits, ev), "got": "%0*X" % (f.hex_digits, gv),
                "expected_value": dec[0], "got_value": dec[1],
                "xor": "%0*X" % (f.hex_digits, ev ^ gv),
                "steps": int(ordinal(f, [gv], s.fmt)[0] - ordinal(f, [ev], s.fmt)[0])
                if in_fmt else None,
                "class": cls})
    # from category_runs, which also attribute every failure above: the histograms and
    # the JUnit testcases can then never miss a failing category (a manifest without
    # category_counts used to give a JUnit file with no testcase at all for a failing DUT)
    counts = _run_counts((str(r["category"]), 0, int(r["count"]))
                         for r in s.man["category_runs"])
    return {
        "verdict": "pass" if n_bad == 0 else "fail",
        "vectors": s.n, "failing_vectors": int(bad_vectors.sum()), "mismatches": n_bad,
        "op": s.man["op"], "format": s.fmt.key, "profile": s.profile.to_dict(),
        "policy": {"nan": nan, "zero_sign": zero_sign},
        "mismatches_by_field": by_field,
        "mismatches_by_category": by_cat, "mismatches_by_class": by_class,
        "category_counts": counts,
        "failing_vectors_by_category": {c: int(bad_vectors[cats == c].sum()) for c in counts},
        "failures": failures,
    }


def _check_stored_expected(s: Suite, stored: dict, exp: dict) -> None:
    """The suite's stored expected outputs must be what mxref recomputes from its inputs
    and manifest; otherwise the suite (an edited format/profile, another mxref), not the
    DUT, is wrong. The recomputation stays what the DUT is compared against."""
    for f in s.outs:
        if f.name not in stored:
            continue
        e = np.asarray(exp[f.name]).reshape(s.n, f.count).astype(np.uint64)
        g = np.asarray(stored[f.name]).reshape(s.n, f.count).astype(np.uint64)
        same = (e == g) | (_is_nan(f, e, s.fmt) & _is_nan(f, g, s.fmt))
        if not same.all():
            v = int(np.nonzero(~same.all(axis=1))[0][0])
            raise _suite_broken(os.path.join(s.dir, V.MANIFEST_NAME),
                                f"its stored expected {f.name} differ from mxref's "
                                f"recomputation for format {s.fmt.key}, profile "
                                f"{s.profile.name}, first at vector {v}")


# --------------------------------------------------------------------------- reports
def format_text(r: dict) -> str:
    lines = []
    for fl in r["failures"]:
        where = f"vector {fl['vector']} ({fl['category']})"
        if fl["block"] is not None:
            where += f" block {fl['block']}"
        if fl["element"] is not None:
            where += f" element {fl['element']}"
        lines.append(f"{where} {fl['field']}: expected {fl['expected']} ({fl['expected_value']}) "
                     f"got {fl['got']} ({fl['got_value']}) xor {fl['xor']} "
                     f"steps {fl['steps']} [{fl['class']}]")
    if r["mismatches"] > len(r["failures"]):
        lines.append(f"... {r['mismatches'] - len(r['failures'])} more mismatches not listed "
                     f"(raise --max-errors, 0 = all)")
    if r["verdict"] == "pass":
        lines.append(f"In {r['vectors']} vectors ({r['op']} {r['format']}, profile "
                     f"{r['profile']['name']}), no errors found.")
    else:
        lines.append("mismatches by category: " + ", ".join(
            f"{k}={v}" for k, v in sorted(r["mismatches_by_category"].items())))
        lines.append("mismatches by class: " + ", ".join(
            f"{k}={v}" for k, v in sorted(r["mismatches_by_class"].items())))
        lines.append(f"FAIL: {r['failing_vectors']} of {r['vectors']} vectors differ "
                     f"({r['mismatches']} fields/elements) ({r['op']} {r['format']}, profile "
                     f"{r['profile']['name']})")
    return "\n".join(lines)


def junit_xml(r: dict) -> str:
    """One JUnit testcase per case category; a failing one carries its first mismatch."""
    from xml.sax.saxutils import quoteattr
    cats = r["category_counts"]
    nfail = sum(1 for c in cats if r["failing_vectors_by_category"].get(c))
    name = f"mxverify.{r['op']}.{r['format']}.{r['profile']['name']}"
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuite name={quoteattr(name)} tests="{len(cats)}" failures="{nfail}" errors="0">']
    for c, n in cats.items():
        bad = r["failing_vectors_by_category"].get(c, 0)
        out.append(f'  <testcase classname={quoteattr(name)} name={quoteattr(c)}>')
        if bad:
            first = next((f for f in r["failures"] if f["category"] == c), None)
            msg = f"{bad} of {n} vectors differ"
            detail = json.dumps(first) if first else ""
            out.append(f'    <failure message={quoteattr(msg)}>{_esc(detail)}</failure>')
        out.append('  </testcase>')
    out.append('</testsuite>')
    return "\n".join(out) + "\n"


def _esc(s: str) -> str:
    from xml.sax.saxutils import escape
    return escape(s)


def write_report(path: str, r: dict, force: bool = False, inputs=()) -> None:
    """Write a JSON/JUnit report atomically (``force`` replaces an earlier report only,
    never one of ``inputs``)."""
    from mxref.outputs import atomic_write
    if path.endswith(".xml"):
        blob = junit_xml(r).encode()
    elif path.endswith(".json"):
        blob = (json.dumps(r, indent=1, default=str) + "\n").encode()
    else:
        raise BadInput(f"--report {path}: name it *.json or *.xml")
    atomic_write(path, lambda fh: fh.write(blob), force=force, marker=is_report,
                 inputs=inputs, what="--report", tool="mxverify")


def is_report(path) -> bool:
    """A report mxverify wrote (what --force may replace): JUnit XML or JSON of ours."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    # check reports hold "verdict", exhaustive ones "mismatches", conformance "matrix"
    return head.startswith(b'<?xml') and b'<testsuite name="mxverify.' in head \
        or head.startswith(b"{") and any(k in head for k in (b'"verdict"', b'"mismatches"',
                                                               b'"matrix"'))
