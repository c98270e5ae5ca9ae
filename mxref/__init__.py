"""mxref: the bit-exact golden model of the OCP Microscaling (MX) formats v1.0.

numpy + numba only (never torch). Start with :func:`quantize` / :func:`dequantize`;
formats come from ``specs/formats.toml`` and every implementation-defined choice
from a :class:`Profile`.

The names below load lazily (PEP 562), so ``import mxref`` and the command lines'
``--help`` stay cheap: numba and ml_dtypes load when a name that needs them is used.
"""
from __future__ import annotations

from mxref.lazy import lazy_names
from mxref.version import __version__  # noqa: F401 (mxref.__version__)

# public name -> module that defines it
_LAZY = {
    "MXError": "mxref.errors",
    **dict.fromkeys(("DEFAULT_BLOCK_SIZE", "E8M0", "FORMATS", "FormatInfo", "get_format"),
                    "mxref.formats"),
    **dict.fromkeys(("PRESETS", "Profile", "get_profile", "with_choices"), "mxref.profiles"),
    **dict.fromkeys(("MXArray", "decode", "dequantize", "encode", "quantize",
                     "quantize_dequantize", "quantize_packed", "scale_values", "PackedMXArray"),
                    "mxref.core"),
    **dict.fromkeys(("pack_codes", "unpack_codes", "packed_row_bytes", "packing_name",
                     "pack_llamacpp_mxfp4", "unpack_llamacpp_mxfp4"), "mxref.pack"),
    **dict.fromkeys(("mx_dot", "mx_dot_exact", "mx_matmul"), "mxref.dot"),
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_names(globals(), _LAZY)
