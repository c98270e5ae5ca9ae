"""mxref: the bit-exact golden model of the OCP Microscaling (MX) formats v1.0.

numpy + numba only (never torch). Start with :func:`quantize` / :func:`dequantize`;
formats come from ``specs/formats.toml`` and every implementation-defined choice
from a :class:`Profile`.
"""
from mxref.errors import MXError
from mxref.formats import DEFAULT_BLOCK_SIZE, E8M0, FORMATS, FormatInfo, get_format
from mxref.profiles import PRESETS, Profile, get_profile, with_choices
from mxref.core import (MXArray, PackedMXArray, decode, dequantize, encode, quantize,
                        quantize_dequantize, quantize_packed, scale_values)
from mxref.pack import (pack_codes, pack_llamacpp_mxfp4, packed_row_bytes, packing_name,
                        unpack_codes, unpack_llamacpp_mxfp4)
from mxref.dot import mx_dot, mx_dot_exact, mx_matmul
from mxref.version import __version__  # noqa: F401 (mxref.__version__)

__all__ = ["MXError", "DEFAULT_BLOCK_SIZE", "E8M0", "FORMATS", "FormatInfo", "get_format",
           "PRESETS", "Profile", "get_profile", "with_choices", "MXArray", "decode",
           "dequantize", "encode", "quantize", "quantize_dequantize", "quantize_packed",
           "scale_values", "PackedMXArray", "pack_codes", "unpack_codes", "packed_row_bytes",
           "packing_name", "pack_llamacpp_mxfp4", "unpack_llamacpp_mxfp4", "mx_dot",
           "mx_dot_exact", "mx_matmul"]
