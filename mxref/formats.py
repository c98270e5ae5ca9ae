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
class IEEELayout:
    """An IEEE 754 binary input type (float64/32/16, bfloat16): the widths stated in
    ``[ieee.*]``; every mask and special pattern is derived from them."""

    name: str
    bits: int
    exp_bits: int
    man_bits: int
    bias: int

    @property
    def dtype(self) -> np.dtype:
        # "bfloat16" is registered with numpy by ml_dtypes, imported here rather than at
        # module load: the command lines read this module to build their parsers
        import ml_dtypes  # noqa: F401
        return np.dtype(self.name)

    @property
    def uint(self) -> type:
        """The same-width unsigned integer type its bit patterns are viewed as."""
        return np.dtype(f"uint{self.bits}").type

    @property
    def exp_all_ones(self) -> int:
        return (1 << self.exp_bits) - 1

    @property
    def sign_shift(self) -> int:
        return self.bits - 1

    @property
    def sign_mask(self) -> int:
        return 1 << self.sign_shift

    @property
    def abs_mask(self) -> int:
        return self.sign_mask - 1

    @property
    def frac_mask(self) -> int:
        return (1 << self.man_bits) - 1

    @property
    def hidden_bit(self) -> int:
        """The implicit leading 1 of a normal significand; also the pattern of the
        smallest positive normal (exponent field 1, fraction 0)."""
        return 1 << self.man_bits

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal (-126 for float32)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite binade (127 for float32)."""
        return self.exp_all_ones - 1 - self.bias

    @property
    def inf_bits(self) -> int:
        return self.exp_all_ones << self.man_bits

    @property
    def qnan_bits(self) -> int:
        """The canonical quiet NaN (top fraction bit set)."""
        return self.inf_bits | (1 << (self.man_bits - 1))

    @property
    def max_finite_bits(self) -> int:
        return self.inf_bits - 1

    @property
    def kernel_layout(self) -> tuple[int, int, int, int]:
        """(mantissa bits, bias, exponent all-ones, exponent bits): the ``lay`` argument
        of the :mod:`mxref.kernels` kernels."""
        return (self.man_bits, self.bias, self.exp_all_ones, self.exp_bits)

    def pack(self, sign: int, efield: int, mfield: int) -> int:
        """The pattern with these sign, exponent field and fraction field."""
        return (sign << self.sign_shift) | (efield << self.man_bits) | mfield

    def _check(self) -> None:
        derived = (1 << (self.exp_bits - 1)) - 1
        if self.bias != derived or 1 + self.exp_bits + self.man_bits != self.bits:
            raise MXError(f"specs/formats.toml: ieee.{self.name} states bias {self.bias}, "
                          f"{self.bits} bits but the widths give bias {derived}, "
                          f"{1 + self.exp_bits + self.man_bits} bits")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ScaleInfo:
    name: str
    bits: int
    bias: int
    min_exp: int
    max_exp: int
    nan_code: int

    @property
    def n_codes(self) -> int:
        return 1 << self.bits

    @property
    def min_code(self) -> int:
        """Code of the smallest scale 2^min_exp (0x00)."""
        return self.min_exp + self.bias

    @property
    def max_code(self) -> int:
        """Code of the largest scale 2^max_exp (0xFE)."""
        return self.max_exp + self.bias

    @property
    def unit_code(self) -> int:
        """Code of the scale 1.0 (2^0): the bias."""
        return self.bias

    def _check(self) -> None:
        if not (0 <= self.min_code <= self.max_code < self.nan_code < self.n_codes):
            raise MXError(f"specs/formats.toml: scale.{self.name}: codes of min_exp "
                          f"{self.min_exp}, max_exp {self.max_exp} and nan_code "
                          f"{self.nan_code:#x} do not fit {self.bits} bits in that order")

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
    def max_normal_significand(self) -> float:
        """max_normal / 2^emax, in [1, 2): 1.5 for FP4, 1.75 for FP8 E4M3."""
        return math.ldexp(self.max_normal, -self.emax)

    @property
    def max_normal_odd(self) -> tuple[int, int]:
        """(P, Q) with max_normal = P * 2^Q and P odd (the rceil rule's exact bound)."""
        mant, expo = math.frexp(self.max_normal)   # mant in [0.5, 1), exact
        p, q = int(math.ldexp(mant, 53)), expo - 53
        while p % 2 == 0:
            p //= 2
            q += 1
        return p, q

    def max_normal_fraction(self, man_bits: int) -> int:
        """The RCEIL max-normal fraction: the fraction field of max_normal in a binary
        layout with ``man_bits`` mantissa bits (e.g. 23 for float32). An amax in the same
        binade as max_normal * 2^k needs scale 2^(k+1) exactly when its fraction field is
        larger. Raises when max_normal is not exact with that many bits."""
        frac = math.ldexp(self.max_normal_significand - 1.0, man_bits)
        if frac != int(frac):
            raise MXError(f"{self.key}: max_normal {self.max_normal} has no exact "
                          f"{man_bits}-bit fraction")
        return int(frac)

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


def _load() -> tuple[dict[str, FormatInfo], ScaleInfo, int, dict[str, IEEELayout]]:
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
    scale._check()
    ieee = {}
    for key, d in raw["ieee"].items():
        ieee[key] = IEEELayout(name=key, **d)
        ieee[key]._check()
    return fmts, scale, int(raw["default_block_size"]), ieee


FORMATS, E8M0, DEFAULT_BLOCK_SIZE, IEEE_LAYOUTS = _load()
# The input type every format value is exact in, and the fast kernels compute in.
FLOAT32 = IEEE_LAYOUTS["float32"]


def ieee_layout(dtype) -> IEEELayout:
    """The :class:`IEEELayout` of a numpy dtype (or its name); MXError for others."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in IEEE_LAYOUTS:
        raise MXError(f"unsupported input dtype {name}; use float32, float64, float16 "
                      f"or bfloat16 (ml_dtypes.bfloat16)")
    return IEEE_LAYOUTS[name]

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
