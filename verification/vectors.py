"""Vector layouts, expected outputs (from mxref), and the hex / bin / npz / jsonl writers.

One vector = the input fields followed by the expected-output fields of
:func:`layout`. Field widths are whole bytes; every value is an unsigned integer
(float32 as its bit pattern, E8M0 and element codes in the low bits of a byte).

* ``vectors.hex``  one vector per line, each field as fixed-width upper-case hex
  (most significant digit first), fields joined by ``_`` in layout order; the first
  field is the most significant part of the line read as one ``$readmemh`` word.
  ``expected.hex`` holds only the output fields (the DUT file layout).
* ``vectors.bin``  records of the same fields, each little-endian, no padding;
  ``expected.bin`` the output fields only.
* ``vectors.npz``  one uint array per field ([N, count]) plus ``category`` (int16
  index into the manifest's ``categories``).
* ``vectors.jsonl`` one JSON object per vector: index, category, fields in hex and
  decoded values.
* ``manifest.json`` everything needed to recompute and check (see :func:`manifest`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

import mxref
from mxref.core import MXArray
from mxref.errors import MXError
from mxref.formats import DEFAULT_BLOCK_SIZE
from mxref.outputs import canonical_sha256, check_output, output_dir, sha256_file

MANIFEST_NAME = "manifest.json"
SELF_HASH = "manifest_sha256"   # the manifest's own canonical sha256 (without this key)

SCHEMA = "mxverify-vectors/1"
EMITS = ("hex", "bin", "npz", "jsonl")
_UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32}


@dataclass(frozen=True)
class Field:
    name: str
    count: int
    bits: int          # 8 or 32
    kind: str          # "f32", "scale", "code"
    role: str          # "in" or "out"

    @property
    def hex_digits(self) -> int:
        return self.bits // 4

    @property
    def nbytes(self) -> int:
        return self.count * self.bits // 8

    def to_dict(self) -> dict:
        return {"name": self.name, "count": self.count, "bits": self.bits, "kind": self.kind,
                "role": self.role, "hex_digits_each": self.hex_digits}


def layout(op: str, block_size: int, dot_blocks: int = 2) -> list[Field]:
    bs = block_size
    if op == "quantize":
        return [Field("x", bs, 32, "f32", "in"), Field("scale", 1, 8, "scale", "out"),
                Field("codes", bs, 8, "code", "out")]
    if op == "dequantize":
        return [Field("scale", 1, 8, "scale", "in"), Field("codes", bs, 8, "code", "in"),
                Field("y", bs, 32, "f32", "out")]
    if op == "dot":
        K = bs * dot_blocks
        return [Field("scale_a", dot_blocks, 8, "scale", "in"),
                Field("codes_a", K, 8, "code", "in"),
                Field("scale_b", dot_blocks, 8, "scale", "in"),
                Field("codes_b", K, 8, "code", "in"),
                Field("y", 1, 32, "f32", "out")]
    if op == "convert":
        return [Field("x", 1, 32, "f32", "in"), Field("code", 1, 8, "code", "out")]
    raise MXError(f"unknown op {op!r}")


def outputs_of(fields: list[Field]) -> list[Field]:
    return [f for f in fields if f.role == "out"]


def inputs_of(fields: list[Field]) -> list[Field]:
    return [f for f in fields if f.role == "in"]


# --------------------------------------------------------------------------- expected (mxref)
def expected(op: str, fmt, profile, block_size: int, inputs: dict) -> dict:
    """Expected output fields for the input fields, computed by mxref."""
    fmt, profile = mxref.get_format(fmt), mxref.get_profile(profile)
    if op == "quantize":
        x = np.ascontiguousarray(inputs["x"], np.uint32).view(np.float32)
        mx = mxref.quantize(x, fmt, axis=-1, block_size=block_size, profile=profile)
        return {"scale": mx.scales.reshape(-1, 1), "codes": mx.codes}
    if op == "convert":
        x = np.ascontiguousarray(inputs["x"], np.uint32).view(np.float32)
        return {"code": mxref.encode(x, fmt, profile).reshape(-1, 1)}
    if op == "dequantize":
        codes = np.ascontiguousarray(inputs["codes"], np.uint8)
        scales = np.ascontiguousarray(inputs["scale"], np.uint8)
        mx = MXArray(codes, scales, fmt, codes.shape, 1, block_size, profile)
        return {"y": mxref.dequantize(mx, np.float32).view(np.uint32)}
    if op == "dot":
        # mx_matmul entries are computed exactly as mx_dot (default accumulation:
        # float32, sequential); the diagonal of small chunks avoids one call per vector.
        ca, cb = (np.ascontiguousarray(inputs[k], np.uint8) for k in ("codes_a", "codes_b"))
        sa, sb = (np.ascontiguousarray(inputs[k], np.uint8) for k in ("scale_a", "scale_b"))
        n, K = ca.shape
        y = np.empty((n, 1), np.float32)
        step = 64
        for i in range(0, n, step):
            j = min(n, i + step)
            a = MXArray(ca[i:j], sa[i:j], fmt, (j - i, K), 1, block_size, profile)
            b = MXArray(cb[i:j], sb[i:j], fmt, (j - i, K), 1, block_size, profile)
            y[i:j, 0] = np.diagonal(mxref.mx_matmul(a, b))
        return {"y": y.view(np.uint32)}
    raise MXError(f"unknown op {op!r}")


# --------------------------------------------------------------------------- encoding
def to_hex_lines(fields: list[Field], arrays: dict) -> list[str]:
    """One line per vector: fixed-width hex fields joined by '_'."""
    n = next(iter(arrays.values())).shape[0]
    cols = []
    for f in fields:
        a = np.asarray(arrays[f.name]).astype(np.uint64).reshape(n, f.count)
        fmt = "%0{}X".format(f.hex_digits)
        cols.append([[fmt % v for v in row] for row in a.tolist()])
    return ["_".join(t for c in cols for t in c[i]) for i in range(n)]


def to_bin(fields: list[Field], arrays: dict) -> bytes:
    n = next(iter(arrays.values())).shape[0]
    parts = [np.asarray(arrays[f.name]).astype("<u%d" % (f.bits // 8)).reshape(n, f.count)
             .view(np.uint8).reshape(n, -1) for f in fields]
    return np.concatenate(parts, axis=1).tobytes() if parts else b""


def from_bin(fields: list[Field], blob: bytes, n: int) -> dict:
    rec = sum(f.nbytes for f in fields)
    a = np.frombuffer(blob, dtype=np.uint8).reshape(n, rec)
    out, off = {}, 0
    for f in fields:
        chunk = np.ascontiguousarray(a[:, off:off + f.nbytes])
        out[f.name] = chunk.view("<u%d" % (f.bits // 8)).astype(_UINT[f.bits]).reshape(n, f.count)
        off += f.nbytes
    return out


def decode_field(f: Field, values, fmt) -> list:
    """Human-readable values of one field (JSON-safe: NaN/Inf as strings)."""
    v = np.asarray(values).reshape(-1)
    if f.kind == "f32":
        with np.errstate(invalid="ignore"):   # signalling NaN patterns
            vals = v.astype(np.uint32).view(np.float32).astype(np.float64)
    elif f.kind == "scale":
        vals = mxref.scale_values(v.astype(np.uint8), np.float64)
    else:
        vals = np.asarray(fmt.decode_table)[v.astype(np.int64)]
    return [x if math.isfinite(x) else str(x) for x in vals.tolist()]


# --------------------------------------------------------------------------- writing
def write_suite(tmpdir: str, fields: list[Field], arrays: dict, categories: np.ndarray,
                cat_names: list[str], fmt, emit: tuple[str, ...]) -> dict:
    """Write the emitted files into ``tmpdir``; returns {file name: description}."""
    written = {}
    outs = outputs_of(fields)
    if "hex" in emit:
        for name, flds in (("vectors.hex", fields), ("expected.hex", outs)):
            with open(os.path.join(tmpdir, name), "w", newline="\n") as fh:
                for line in to_hex_lines(flds, arrays):
                    fh.write(line + "\n")
            written[name] = "hex lines, fields: " + ", ".join(f.name for f in flds)
    if "bin" in emit:
        for name, flds in (("vectors.bin", fields), ("expected.bin", outs)):
            with open(os.path.join(tmpdir, name), "wb") as fh:
                fh.write(to_bin(flds, arrays))
            written[name] = "little-endian records, fields: " + ", ".join(f.name for f in flds)
    if "npz" in emit:
        idx = {c: i for i, c in enumerate(cat_names)}
        cat = np.array([idx[c] for c in categories], np.int16)
        data = {f.name: np.asarray(arrays[f.name], _UINT[f.bits]) for f in fields}
        with open(os.path.join(tmpdir, "vectors.npz"), "wb") as fh:
            np.savez(fh, category=cat, **data)
        written["vectors.npz"] = "one array per field, plus category"
    if "jsonl" in emit:
        lists = {f.name: np.asarray(arrays[f.name]).tolist() for f in fields}
        decoded = {f.name: decode_field(f, arrays[f.name], fmt) for f in fields}
        with open(os.path.join(tmpdir, "vectors.jsonl"), "w", newline="\n") as fh:
            for i in range(len(categories)):
                rec = {"index": i, "category": categories[i]}
                for f in fields:
                    row = lists[f.name][i]
                    rec[f.name] = ["%0*X" % (f.hex_digits, v) for v in row]
                    rec[f.name + "_value"] = decoded[f.name][i * f.count:(i + 1) * f.count]
                fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        written["vectors.jsonl"] = "one JSON object per vector, hex and decoded values"
    return written


# --------------------------------------------------------------------------- the suite
def manifest(op, fmt, profile, level, seed, block_size, fields, runs, n, files) -> dict:
    from verification.cases import DOT_BLOCKS
    counts: dict = {}
    for c, _, k in runs:
        counts[c] = counts.get(c, 0) + k
    return {
        "schema": SCHEMA,
        "tool": {"name": "mxverify", "mxref_version": mxref.__version__},
        "format": fmt.key, "op": op, "level": str(level), "seed": int(seed),
        "block_size": block_size,
        "dot": {"blocks_per_vector": DOT_BLOCKS, "accum": "float32", "order": "sequential"}
        if op == "dot" else None,
        "profile": profile.to_dict(),
        "prng": "xoshiro256** seeded by splitmix64(seed) (verification/prng.py)",
        "n_vectors": n,
        "categories": list(counts),
        "category_counts": counts,
        "category_runs": [{"category": c, "first": f0, "count": k} for c, f0, k in runs],
        "layout": {
            "fields": [f.to_dict() for f in fields],
            "hex": "one vector per line; fields in this order, each value fixed-width upper-case "
                   "hex (MSB first), all joined by '_'; the first field is the most significant "
                   "part of the line as one $readmemh word; expected.hex / DUT hex: the 'out' "
                   "fields only",
            "bin": "records of the fields in this order, each value little-endian, no padding; "
                   "expected.bin / DUT bin: the 'out' fields only",
            "record_bytes": sum(f.nbytes for f in fields),
            "out_record_bytes": sum(f.nbytes for f in outputs_of(fields)),
            "out_hex_digits": sum(f.count * f.hex_digits for f in outputs_of(fields)),
        },
        "files": files,
    }


def build(out: str, op: str, fmt, level="1", seed: int = 1, profile="ocp",
          emit=("hex", "bin", "npz", "jsonl"), force: bool = False,
          block_size: int = DEFAULT_BLOCK_SIZE,
          progress: bool = False) -> dict:
    """Generate a suite into directory ``out`` atomically; returns the manifest.

    ``force`` replaces only an earlier suite (a directory with manifest.json)."""
    from verification.cases import generate
    fmt, profile = mxref.get_format(fmt), mxref.get_profile(profile)
    bad = [e for e in emit if e not in EMITS]
    if bad or not emit:
        raise MXError(f"--emit {','.join(emit)}: choose from {','.join(EMITS)}")
    where = dict(force=force, marker=MANIFEST_NAME, what="--out", tool="mxverify gen")
    check_output(out, is_dir=True, **where)   # before the work
    cases = generate(op, fmt, level, seed, block_size)
    arrays = dict(cases.fields)
    arrays.update(expected(op, fmt, profile, block_size, cases.fields))
    fields = layout(op, block_size)
    cats = cases.category_of()
    names = list(dict.fromkeys(c for c, _, _ in cases.runs))
    with output_dir(out, **where) as tmp:
        desc = write_suite(tmp, fields, arrays, cats, names, fmt, tuple(emit))
        files = {name: {"sha256": sha256_file(os.path.join(tmp, name)),
                        "bytes": os.path.getsize(os.path.join(tmp, name)), "content": d}
                 for name, d in sorted(desc.items())}
        man = manifest(op, fmt, profile, level, seed, block_size, fields, cases.runs,
                       cases.n, files)
        man[SELF_HASH] = canonical_sha256(man)
        with open(os.path.join(tmp, MANIFEST_NAME), "w", newline="\n") as fh:
            json.dump(man, fh, indent=1, sort_keys=True)
            fh.write("\n")
    return man
