"""Format descriptions, loaded from ``specs/formats.toml`` (the single source of truth).

One :class:`FormatInfo` describes any MX element type; :data:`E8M0` describes the
shared scale. Nothing here types a format constant: every number comes from the
TOML file, and the values the file *states* (max normal, min subnormal, ...) are
checked against the values *derived* from the bit layout when this module loads.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from mxref.errors import MXError


def _spec_path() -> Path:
    # Installed wheels carry a copy next to this module; a source checkout has a
    # symlink here pointing at specs/formats.toml.
    here = Path(str(resources.files("mxref"))) / "formats.toml"
    if here.exists():
        return here
    return Path(__file__).resolve().parent.parent / "specs" / "formats.toml"


@dataclass(frozen=True)
class ScaleInfo:
    name: str
    bits: int
    bias: int
    min_exp: int
    max_exp: int
    nan_code: int

    def decode(self, code: int) -> float:
        """Value of one E8M0 code as a Python float (NaN for the NaN code)."""
        code = int(code)
        if not 0 <= code < (1 << self.bits):
            raise MXError(f"scale code {code:#x} out of range for {self.name}")
        if code == self.nan_code:
            return math.nan
        return math.ldexp(1.0, code - self.bias)


@dataclass(frozen=True)
class FormatInfo:
    """One MX element type. ``key`` is the project-wide name (e.g. ``fp4_e2m1``)."""

    key: str
    name: str
    mx_name: str
    kind: str  # "float" or "int"
    bits: int
    emax: int
    max_normal: float
    min_subnormal: float
    max_code: int
    exp_bits: int = 0
    man_bits: int = 0
    bias: int = 0
    min_normal: float = 0.0
    frac_bits: int = 0
    min_value: float = 0.0
    inf_codes: tuple[int, ...] = ()
    nan_codes: tuple[int, ...] = field(default_factory=tuple)

    # ---- derived, never stored in the TOML -------------------------------------
    @property
    def is_int(self) -> bool:
        return self.kind == "int"

    @property
    def n_codes(self) -> int:
        return 1 << self.bits

    @property
    def sign_bit(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal (subnormal exponent)."""
        return 0 if self.is_int else 1 - self.bias

    @property
    def step_bits(self) -> int:
        """Significand fraction bits (mantissa bits; INT8: fraction bits)."""
        return self.frac_bits if self.is_int else self.man_bits

    def decode_code(self, code: int) -> float:
        """Exact value of one element code (by formula, from the bit layout)."""
        code = int(code)
        if not 0 <= code < self.n_codes:
            raise MXError(f"code {code:#x} out of range for {self.key} ({self.bits} bits)")
        if self.is_int:
            q = code - self.n_codes if code & self.sign_bit else code
            return math.ldexp(q, -self.frac_bits)
        sign = -1.0 if code & self.sign_bit else 1.0
        mag = code & (self.sign_bit - 1)
        if mag in self.nan_codes:
            return math.nan
        if mag in self.inf_codes:
            return sign * math.inf
        e = mag >> self.man_bits
        m = mag & ((1 << self.man_bits) - 1)
        if e == 0:
            return sign * math.ldexp(m, self.emin - self.man_bits)
        return sign * math.ldexp((1 << self.man_bits) + m, e - self.bias - self.man_bits)

    @cached_property
    def decode_table(self) -> np.ndarray:
        """float64 value of every code (index = code). Read-only."""
        t = np.array([self.decode_code(c) for c in range(self.n_codes)], dtype=np.float64)
        t.flags.writeable = False
        return t

    @property
    def max_pow2(self) -> float:
        """Largest power of two representable: the §6.3 divisor, 2^emax."""
        return math.ldexp(1.0, self.emax)

    def _check(self) -> None:
        t = self.decode_table
        finite = t[np.isfinite(t)]
        derived = {
            "max_normal": float(finite.max()),
            "min_subnormal": float(np.abs(finite[finite != 0]).min()),
            "decode(max_code)": t[self.max_code],
            "emax": math.frexp(float(finite.max()))[1] - 1,
        }
        stated = {
            "max_normal": self.max_normal,
            "min_subnormal": self.min_subnormal,
            "decode(max_code)": self.max_normal,
            "emax": self.emax,
        }
        if not self.is_int:
            derived["min_normal"] = math.ldexp(1.0, self.emin)
            stated["min_normal"] = self.min_normal
        else:
            derived["min_value"] = float(finite.min())
            stated["min_value"] = self.min_value
        for k in derived:
            if derived[k] != stated[k]:
                raise MXError(f"specs/formats.toml: {self.key}.{k} states {stated[k]} "
                              f"but the bit layout gives {derived[k]}")

    def __str__(self) -> str:
        return self.key


def _load() -> tuple[dict[str, FormatInfo], ScaleInfo, int]:
    with open(_spec_path(), "rb") as f:
        raw = tomllib.load(f)
    fmts = {}
    for key, d in raw["elements"].items():
        d = dict(d)
        d["inf_codes"] = tuple(d.get("inf_codes", ()))
        d["nan_codes"] = tuple(d.get("nan_codes", ()))
        info = FormatInfo(key=key, **d)
        info._check()
        fmts[key] = info
    scale = ScaleInfo(**raw["scale"]["e8m0"])
    return fmts, scale, int(raw["default_block_size"])


FORMATS, E8M0, DEFAULT_BLOCK_SIZE = _load()

# Names users already know map onto the canonical keys.
ALIASES = {
    "mxfp4": "fp4_e2m1", "fp4": "fp4_e2m1", "e2m1": "fp4_e2m1",
    "mxfp6": "fp6_e2m3", "mxfp6_e2m3": "fp6_e2m3", "e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2", "e3m2": "fp6_e3m2",
    "mxfp8": "fp8_e4m3", "mxfp8_e4m3": "fp8_e4m3", "e4m3": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2", "e5m2": "fp8_e5m2",
    "mxint8": "int8",
}


def get_format(name: str | FormatInfo) -> FormatInfo:
    """Look a format up by key (``fp4_e2m1``) or a common alias (``mxfp4``)."""
    if isinstance(name, FormatInfo):
        return name
    key = str(name).lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise MXError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)} "
                      f"(aliases: {', '.join(ALIASES)})")
    return FORMATS[key]
