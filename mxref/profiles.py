"""Profiles: every implementation-defined choice of OCP MX v1.0, named and explicit.

A :class:`Profile` is frozen and hashable; every quantized output records the one it
was made with (by name and by a hash of all its choices). ``specs/semantics.md``
explains each field, the spec section it comes from and who uses each alternative.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace

from mxref.errors import MXError

# Integer codes passed to the Numba kernels (they cannot take strings cheaply).
SCALE_RULES = {"floor": 0, "rceil": 1}
ROUNDINGS = {"rne": 0, "away": 1}
FP8_OVERFLOWS = {"sat": 0, "ovf": 1}
INT8_RANGES = {"symmetric": 0, "asymmetric": 1}


@dataclass(frozen=True)
class Profile:
    """The implementation-defined choices (defaults = preset ``ocp``).

    scale_rule      "floor": X = 2^(floor(log2 amax) - emax_elem)  (§6.3, exact, from exponent bits)
                    "rceil": X = 2^ceil(log2(amax / max_normal))    (NVIDIA cuBLAS/TE, torchao RCEIL)
    rounding        "rne": round half to even (§6.3 must);  "away": ties away from zero (microxcaling)
    fp8_overflow    "sat": clamp to +/-max normal (§6.3 step 2); "ovf": E4M3 -> NaN, E5M2 -> Inf (OFP8 OVF)
    flush_subnormals  FP32-subnormal inputs are read as signed zero before anything else (paper Alg. 1)
    int8_range      "symmetric": never produce -128 (-2.0);  "asymmetric": allow it
    The rest is fixed for every profile (see specs/semantics.md): all-zero block -> scale 0x00;
    any NaN/Inf in a block -> scale 0xFF and element codes 0; scale exponent clamped to [-127, 127].
    """

    name: str = "ocp"
    scale_rule: str = "floor"
    rounding: str = "rne"
    fp8_overflow: str = "sat"
    flush_subnormals: bool = False
    int8_range: str = "symmetric"

    def __post_init__(self):
        for fname, table in (("scale_rule", SCALE_RULES), ("rounding", ROUNDINGS),
                             ("fp8_overflow", FP8_OVERFLOWS), ("int8_range", INT8_RANGES)):
            v = getattr(self, fname)
            # isinstance first: a list or dict (e.g. from an edited .npz profile JSON) is
            # unhashable, and `in table` raised a TypeError traceback instead of this line
            if not isinstance(v, str) or v not in table:
                raise MXError(f"profile field {fname}={v!r} is not one of {', '.join(table)}")
        if not isinstance(self.flush_subnormals, bool):
            raise MXError("profile field flush_subnormals must be true or false")

    def choices(self) -> dict:
        """All choices except the name: what the hash covers."""
        d = asdict(self)
        d.pop("name")
        return d

    @property
    def hash(self) -> str:
        """Short SHA-256 of the canonical JSON of all choices (name excluded)."""
        blob = json.dumps(self.choices(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hash"] = self.hash
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        known = {f.name for f in fields(cls)}
        extra = set(d) - known - {"hash"}
        if extra:
            raise MXError(f"unknown profile fields: {', '.join(sorted(extra))}")
        p = cls(**{k: v for k, v in d.items() if k in known})
        if "hash" in d and d["hash"] != p.hash:
            raise MXError(f"profile {p.name!r}: recorded hash {d['hash']} does not match its "
                          f"choices ({p.hash}); the file was edited or is corrupt")
        return p

    def kernel_args(self) -> tuple[int, int, int, int, int]:
        """The choices as small integers, in the order the Numba kernels take them."""
        return (SCALE_RULES[self.scale_rule], ROUNDINGS[self.rounding],
                FP8_OVERFLOWS[self.fp8_overflow], int(self.flush_subnormals),
                INT8_RANGES[self.int8_range])


PRESETS: dict[str, Profile] = {
    # The project's reading of OCP MX v1.0 §6.3.
    "ocp": Profile(),
    # NVIDIA cuBLAS / TransformerEngine MXFP8 and torchao's RCEIL mode.
    "rceil": Profile(name="rceil", scale_rule="rceil"),
    # microsoft/microxcaling defaults: ties away from zero.
    "microxcaling": Profile(name="microxcaling", rounding="away"),
    # OFP8 non-saturating conversion (OVF) for FP8 elements.
    "ocp_ovf": Profile(name="ocp_ovf", fp8_overflow="ovf"),
    # Paper Algorithm 1: FP32-subnormal inputs become zero.
    "ocp_ftz": Profile(name="ocp_ftz", flush_subnormals=True),
    # INT8 using the full two's complement range (gfloat's MXINT8).
    "int8_asym": Profile(name="int8_asym", int8_range="asymmetric"),
}


def get_profile(p: "str | Profile | dict | None") -> Profile:
    """A preset by name, a dict of choices, or a Profile (returned as is)."""
    if p is None:
        return PRESETS["ocp"]
    if isinstance(p, Profile):
        return p
    if isinstance(p, dict):
        return Profile.from_dict(p)
    if p in PRESETS:
        return PRESETS[p]
    raise MXError(f"unknown profile {p!r}; choose one of: {', '.join(PRESETS)}")


def with_choices(base: "str | Profile", name: str | None = None, **choices) -> Profile:
    """A copy of ``base`` with some choices changed (named ``custom`` unless given a name)."""
    return replace(get_profile(base), name=name or "custom", **choices)
