"""Run mxverify's cases through other MX implementations and NAME why they disagree.

Adapters (each imported lazily; a library that is not installed is skipped with a note):

* ``ml_dtypes``: element casts (``x.astype(float4_e2m1fn)`` ...) on the ``convert`` cases;
* ``torchao``: ``torchao.prototype.mx_formats.mx_tensor.to_mx`` with every
  ``ScaleCalculationMode`` on the ``quantize`` cases (torch is imported only here);
* ``gfloat``: ``compute_scale_amax`` + ``encode_block`` with its mxfp/mxint formats.

A disagreeing case is explained by re-running it through mxref with the alternative
that reproduces the library's bytes exactly: another profile (``rceil``: scale rule
rceil; ``microxcaling``: ties away; ``ocp_ovf``: OFP8 overflow; ``ocp_ftz``: subnormal
flush; ``int8_asym``: -128), a float32 ``log2`` scale, swapped FP4 nibbles, or mxref's
elements under the library's own scale (another scale rule). NaN/Inf cases are named
as such. Whatever none of these reproduces is reported as ``unexplained``.
"""
from __future__ import annotations


import numpy as np

import mxref
from mxref.errors import MXError
from verification.cases import generate

LIBRARIES = ("ml_dtypes", "torchao", "gfloat")
ALT_PROFILES = [("rceil", "scale rule: rceil"), ("microxcaling", "tie rounding: ties away"),
                ("ocp_ovf", "saturation: OFP8 overflow to NaN/Inf"),
                ("ocp_ftz", "FP32 subnormal flush"), ("int8_asym", "-128: INT8 asymmetric range")]
NAN_CAUSE = "NaN/Inf handling"
LIB_SCALE = "scale rule: another rule (mxref's elements agree given the library's scale)"


# --------------------------------------------------------------------------- adapters
def _mldtypes_cast(fmt, x32):
    import ml_dtypes
    name = {"fp4_e2m1": "float4_e2m1fn", "fp6_e2m3": "float6_e2m3fn",
            "fp6_e3m2": "float6_e3m2fn", "fp8_e4m3": "float8_e4m3fn",
            "fp8_e5m2": "float8_e5m2"}.get(fmt.key)
    if name is None:
        return None
    with np.errstate(all="ignore"):
        return x32.astype(getattr(ml_dtypes, name)).view(np.uint8)


def _torchao_variants():
    import torch  # noqa: F401  (only conformance adapters import torch)
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    return [m.name for m in ScaleCalculationMode]


def _torchao_quantize(fmt, x32, mode):
    import torch
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx
    dt = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
          "fp6_e2m3": "fp6_e2m3", "fp6_e3m2": "fp6_e3m2",
          "fp4_e2m1": torch.float4_e2m1fn_x2}.get(fmt.key)
    if dt is None:
        return None
    s, q = to_mx(torch.from_numpy(x32.copy()), dt, x32.shape[1], ScaleCalculationMode[mode])
    scales = s.view(torch.uint8).numpy().reshape(-1).copy()
    raw = q.view(torch.uint8).numpy().copy()
    codes = mxref.unpack_codes(raw, fmt, x32.shape[1]) if fmt.bits == 4 else raw
    return scales, np.asarray(codes, np.uint8).reshape(x32.shape)


def _gfloat_quantize(fmt, x32):
    import gfloat.formats as GF
    from gfloat.block import compute_scale_amax, encode_block
    fi = {"fp4_e2m1": GF.format_info_mxfp4_e2m1, "fp6_e2m3": GF.format_info_mxfp6_e2m3,
          "fp6_e3m2": GF.format_info_mxfp6_e3m2, "fp8_e4m3": GF.format_info_mxfp8_e4m3,
          "fp8_e5m2": GF.format_info_mxfp8_e5m2, "int8": GF.format_info_mxint8}[fmt.key]
    scales = np.zeros(len(x32), np.int32)
    codes = np.zeros(x32.shape, np.uint8)
    raised = np.zeros(len(x32), bool)
    for i, row in enumerate(x32):
        try:
            with np.errstate(all="ignore"):
                sc = compute_scale_amax(fi.etype.emax, row)
                enc = list(encode_block(fi, sc, row / sc))
            scales[i] = enc[0]
            codes[i] = np.array(enc[1:]) & (fmt.n_codes - 1)
        except (ValueError, OverflowError, AssertionError):
            raised[i] = True
    return scales.astype(np.uint8), codes, raised


# --------------------------------------------------------------------------- explaining
def _f32_log2_scale(x32, fmt) -> int | None:
    """floor(log2(amax)) computed in float32 (numpy), clipped as gfloat does."""
    amax = np.max(np.abs(x32))
    if amax == 0 or not np.isfinite(amax):
        return None
    with np.errstate(all="ignore"):
        e = int(np.floor(np.log2(np.float32(amax)))) - fmt.emax
    return min(max(e, mxref.E8M0.min_exp), mxref.E8M0.max_exp)


def _models(fmt, x, lib_scales):
    """Alternative models: name -> (scales, codes) for all rows, each re-run through mxref."""
    E = mxref.E8M0
    out = {}
    for pname, cause in ALT_PROFILES:
        if pname == "int8_asym" and not fmt.is_int:
            continue
        mx = mxref.quantize(x, fmt, profile=pname)
        out[cause] = (mx.scales[:, 0], mx.codes)
    ocp = mxref.quantize(x, fmt)
    for asym in ((False, True) if fmt.is_int else (False,)):
        sc, cd = ocp.scales[:, 0].copy(), ocp.codes.copy()
        for i, row in enumerate(x):
            e = _f32_log2_scale(row, fmt)
            if e is not None:
                sc[i] = e + E.bias
                cd[i] = mxref.encode(row, fmt, "int8_asym" if asym else "ocp", scale_exp=e)
        out["scale rule: float32 log2 error" + (" + -128" if asym else "")] = (sc, cd)
    # tiny blocks (scale code 0x00 = 2^-127): libraries that cannot form 2^127 as a float32
    # reciprocal scale the elements by 2^-126 (torchao FLOOR) or flush them (torchao RCEIL)
    tiny = {"elements scaled by 2^-126": E.min_exp + 1, "elements flushed to zero": 1 << 12}
    for base, label in (("ocp", ""), ("rceil", "scale rule: rceil + ")):
        mx = ocp if base == "ocp" else mxref.quantize(x, fmt, profile=base)
        for what, exp in tiny.items():
            sc, cd = mx.scales[:, 0].copy(), mx.codes.copy()
            for i in np.nonzero(sc == 0)[0]:
                cd[i] = mxref.encode(x[i], fmt, base, scale_exp=exp)
            out[f"{label}scale 2^-127: {what}"] = (sc, cd)
    if fmt.bits == 4:
        out["packing: FP4 nibble order"] = (ocp.scales[:, 0],
                                            ocp.codes.reshape(len(x), -1, 2)[:, :, ::-1]
                                            .reshape(len(x), -1))
    # another scale rule: mxref's elements under the library's own (non-NaN) scale
    cd = ocp.codes.copy()
    for i, row in enumerate(x):
        if lib_scales[i] != E.nan_code:
            cd[i] = mxref.encode(row, fmt, "ocp", scale_exp=int(lib_scales[i]) - E.bias)
    out[LIB_SCALE] = (lib_scales, cd)
    return out


def explain_blocks(fmt, x, scales, codes, disagree) -> list[str]:
    """Causes for the disagreeing rows. A model counts as *the* cause only if it
    reproduces the library on every finite row (agreeing ones too), so a
    coincidence on a few rows (e.g. rceil vs a float32 log2 near 2^k) is refuted."""
    finite = np.all(np.isfinite(x), axis=1)
    models = _models(fmt, x, scales)
    hits = {m: (sc == scales) & np.all(cd == codes, axis=1) for m, (sc, cd) in models.items()}
    consistent = [m for m, h in hits.items() if h[finite].all()]
    causes = []
    for i in np.nonzero(disagree)[0].tolist():
        if not finite[i]:
            causes.append(NAN_CAUSE)
            continue
        c = next((m for m in consistent if hits[m][i]), None)
        if c is None and hits[LIB_SCALE][i]:   # conditioned on its scale: never "consistent"
            c = LIB_SCALE
        if c is None:
            c = next((m + " (partial: not consistent over all cases)" for m, h in hits.items()
                      if h[i]), "unexplained")
        causes.append(c)
    return causes


def _explain_subset(fmt, x, sc, codes, agree, ok):
    idx = np.nonzero(ok)[0]
    return explain_blocks(fmt, x[idx], sc[idx], codes[idx], ~agree[idx])


def explain_element(fmt, x, code) -> str:
    if not np.isfinite(x):
        alt = mxref.encode(np.array([x], np.float32), fmt, "ocp_ovf")[0]
        if np.isinf(x) and alt == code:
            return "saturation: OFP8 overflow to NaN/Inf"
        return NAN_CAUSE
    for pname, cause in ALT_PROFILES:
        if mxref.encode(np.array([x], np.float32), fmt, pname)[0] == code:
            return cause
    return "unexplained"


# --------------------------------------------------------------------------- running
def _tally(rows, causes, lib, variant, fmt, cats, agree, explain):
    for c in dict.fromkeys(cats):
        m = cats == c
        rows.append({"library": lib, "variant": variant, "format": fmt.key, "category": c,
                     "agree": int(agree[m].sum()), "total": int(m.sum())})
    for i in np.nonzero(~agree)[0].tolist():
        cause = explain(i)
        key = (lib, variant, fmt.key, cause)
        if key not in causes:
            causes[key] = {"library": lib, "variant": variant, "format": fmt.key,
                           "cause": cause, "count": 0, "example_case": i,
                           "example_category": cats[i]}
        causes[key]["count"] += 1


def run(against=LIBRARIES, formats="all", level="1", seed=1, progress=True) -> dict:
    bad = [a for a in against if a not in LIBRARIES]
    if bad:
        raise MXError(f"--against {','.join(bad)}: choose from {','.join(LIBRARIES)}")
    fmts = list(mxref.FORMATS) if formats in ("all", ["all"]) else list(formats)
    fmts = [mxref.get_format(f) for f in fmts]
    # an empty list (--against '' or --format ',', e.g. an unset shell variable) compared
    # nothing and exited 0 with an empty matrix, which reads as "all agree"
    if not against:
        raise MXError(f"--against is empty; name one or more of {','.join(LIBRARIES)}")
    if not fmts:
        raise MXError(f"--format is empty; name one or more of {','.join(mxref.FORMATS)} "
                      f"or all")
    rows, causes, skipped = [], {}, []
    for lib in against:
        try:
            if lib == "ml_dtypes":
                import ml_dtypes  # noqa: F401
                variants = ["cast"]
            elif lib == "torchao":
                variants = _torchao_variants()
            else:
                import gfloat  # noqa: F401
                variants = ["quantize_block"]
        except ImportError as e:
            skipped.append({"library": lib, "reason": f"not installed ({e})"})
            continue
        for fmt in fmts:
            if lib == "ml_dtypes":
                cs = generate("convert", fmt, level, seed)
                x = cs.fields["x"].reshape(-1).view(np.float32)
                got = _mldtypes_cast(fmt, x)
                if got is None:
                    skipped.append({"library": lib, "format": fmt.key,
                                    "reason": "ml_dtypes has no scalar type for this format"})
                    continue
                want = mxref.encode(x, fmt, "ocp")
                _tally(rows, causes, lib, "cast", fmt, cs.category_of(), got == want,
                       lambda i: explain_element(fmt, x[i], got[i]))
                continue
            cs = generate("quantize", fmt, level, seed)
            x = cs.fields["x"].view(np.float32)
            ref = mxref.quantize(x, fmt)
            for variant in variants:
                raised = np.zeros(len(x), bool)
                if lib == "torchao":
                    try:
                        out = _torchao_quantize(fmt, x, variant)
                    except Exception as e:   # an adapter failure is reported, not fatal
                        skipped.append({"library": lib, "variant": variant, "format": fmt.key,
                                        "reason": f"to_mx failed: {type(e).__name__}: {e}"[:200]})
                        continue
                    if out is None:
                        skipped.append({"library": lib, "format": fmt.key,
                                        "reason": "torchao MX has no element type for this format"})
                        break
                    sc, codes = out
                else:
                    sc, codes, raised = _gfloat_quantize(fmt, x)
                agree = (sc == ref.scales[:, 0]) & np.all(codes == ref.codes, axis=1) & ~raised
                ok = ~raised
                named = dict(zip(np.nonzero(~agree & ok)[0].tolist(),
                                 explain_blocks(fmt, x[ok], sc[ok], codes[ok], (~agree)[ok])
                                 if ok.all() else _explain_subset(fmt, x, sc, codes, agree, ok)))

                def explain(i, named=named, raised=raised):
                    if raised[i]:
                        return NAN_CAUSE + " (raises)" if not np.all(np.isfinite(x[i])) \
                            else "raises"
                    return named[i]
                _tally(rows, causes, lib, variant, fmt, cs.category_of(), agree, explain)
    return {"level": str(level), "seed": seed, "matrix": rows,
            "causes": sorted(causes.values(), key=lambda c: (c["library"], c["variant"],
                                                             c["format"], -c["count"])),
            "skipped": skipped}


def format_matrix(res: dict) -> str:
    """Agreement per library/variant x format, by category, then the named causes."""
    lines = ["agreement with mxref (profile ocp) per library / variant / format; categories "
             "listed where not all cases agree (agree/total):"]
    groups: dict = {}
    for r in res["matrix"]:
        groups.setdefault((r["library"], r["variant"], r["format"]), []).append(r)
    for (lib, var, fmt), rs in groups.items():
        a, t = sum(r["agree"] for r in rs), sum(r["total"] for r in rs)
        cells = " ".join(f"{r['category']}={r['agree']}/{r['total']}" for r in rs
                         if r["agree"] != r["total"])
        lines.append(f"{lib:9s} {var:14s} {fmt:9s} {100 * a / t:6.2f}% ({a}/{t})"
                     + (f"  disagree in: {cells}" if cells else ""))
    lines.append("")
    lines.append("named causes of disagreement:")
    for c in res["causes"]:
        lines.append(f"  {c['library']:9s} {c['variant']:14s} {c['format']:9s} "
                     f"{c['count']:5d}  {c['cause']}  (e.g. case {c['example_case']}, "
                     f"{c['example_category']})")
    for s in res["skipped"]:
        lines.append(f"skipped: {s}")
    return "\n".join(lines)
