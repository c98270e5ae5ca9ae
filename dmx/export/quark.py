"""OUT -> AMD Quark checkpoint (``quant_method: quark``; vLLM's Quark loader serves it).

Layout, from amd-quark 0.10 ``quark/torch/utils/pack.py`` and vLLM's Quark schemes:

* ``<name>.weight`` uint8 packed along K, ``<name>.weight_scale`` uint8 [N, K/32] E8M0
  (bias 127) -- vLLM ``QuarkOCP_MX.create_weights``.
* FP4 (``Pack_fp4``): byte i = e[2i] | e[2i+1] << 4 -- OUT's ``fp4-lo-first``.
* FP6 E2M3/E3M2 (``Pack_fp6``): codes a,b,c,d -> 24-bit word a | b<<6 | c<<12 | d<<18,
  written low byte first -- OUT's ``fp6-le24``. Quark's variable names call the bytes
  ``byte2, byte1, byte0`` but it writes ``cat([word & 0xFF, word >> 8 & 0xFF, word >> 16])``;
  the comment there says the layout is what ``mfma_scale_f32_16x16x128_f8f6f4`` expects.
  Verified with amd-quark 0.13's own code (wheel unpacked outside this environment, its
  optional onnx imports stubbed): ``create_pack_method("per_group", "fp6_e2m3" | "fp6_e3m2"
  | "fp4")`` -- what Quark's export calls for OCP MX specs (``OCP_MXFP6E2M3Spec`` etc. have
  ``dtype`` fp6_*/fp4, not ``mx``) -- packs to exactly these bytes and unpacks them to
  mxref's element values (``tests/test_export_targets.py::test_quark_own_packers_agree``
  runs that check wherever amd-quark is installed). Scales: ``to_e8m0_uint8`` =
  round(log2(scale)) + 127 as uint8.
* MXFP8 E4M3 *weights* are refused: amd-quark (0.13), which transformers runs Quark
  checkpoints with, cannot dequantize a per_group fp8_e4m3 weight (``dequantize_fp8`` has
  per_tensor/per_channel/per_block only; generate fails with "Unsupported QuantSchema:
  per_group for quant_dtype: fp8_e4m3"), and no vLLM was at hand to show it serves one.
  MXFP8 *activations* (``input_tensors``, dynamic) run: Quark fake-quantizes them per group.

config.json: ``layer_quant_config`` has one entry per quantized module (exact names:
vLLM matches a pattern without ``*`` by substring, so full names are unambiguous), the
``exclude`` list names lm_head, and ``export`` carries ``kv_cache_group`` and
``pack_method`` as vLLM's ``QuarkConfig.from_config`` requires.
"""
from __future__ import annotations

import json

import numpy as np

import mxref
from mxref.formats import DEFAULT_BLOCK_SIZE, E8M0

from dmx.errors import DMXError
from dmx.export import hfdir, rules
from dmx.export.verify import compare

TARGET = "quark"
DTYPE_OF = {"fp4_e2m1": "fp4", "fp6_e2m3": "fp6_e2m3", "fp6_e3m2": "fp6_e3m2",
            "fp8_e4m3": "fp8_e4m3"}
FMT_OF = {v: k for k, v in DTYPE_OF.items()}
ALTERNATIVE = "rerun `dmx search` with a ladder of FP4/FP6/FP8 E4M3 formats"
# weight formats amd-quark can dequantize (per_group + e8m0): dequantize_fp4_fp6_per_group
WEIGHT_DTYPES = ("fp4_e2m1", "fp6_e2m3", "fp6_e3m2")


def tensor_spec(fmt: str, dynamic: bool) -> dict:
    return {"dtype": DTYPE_OF[fmt], "qscheme": "per_group", "group_size": DEFAULT_BLOCK_SIZE,
            "ch_axis": -1,
            "scale_format": "e8m0", "scale_type": "float", "is_dynamic": dynamic,
            "symmetric": None, "round_method": "half_even", "mx_element_dtype": None,
            "observer_cls": "PerBlockMXObserver", "is_scale_quant": False}


def layer_config(layer) -> dict:
    return {"weight": tensor_spec(layer.fmt, False),
            "input_tensors": (None if layer.act_format is None
                              else tensor_spec(layer.act_format, True)),
            "output_tensors": None, "bias": None}


def quantization_config(layers, exclude=("lm_head",)) -> dict:
    return {"quant_method": "quark", "producer": {"name": "dmx"},
            "global_quant_config": {"weight": None, "input_tensors": None,
                                    "output_tensors": None, "bias": None},
            "layer_type_quant_config": {},
            "layer_quant_config": {n: layer_config(l) for n, l in sorted(layers.items())},
            # every full-precision module: an unlisted one would get global_quant_config
            "exclude": [n for n in exclude if n not in layers],
            "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
                       "weight_format": "real_quantized", "weight_merge_groups": None}}


def check(src, allow_unfused: bool) -> None:
    rules.check_vllm(src, TARGET, DTYPE_OF, ALTERNATIVE, allow_unfused)
    fp8 = sorted(n for n, l in src.layers.items() if l.fmt not in WEIGHT_DTYPES)
    if fp8:
        raise DMXError(f"{len(fp8)} layer(s) with MXFP8 weights (first {fp8[0]}): in a Quark "
                       f"checkpoint they load but cannot run (amd-quark 0.13 has no per-group FP8 "
                       f"dequantization: 'Unsupported QuantSchema: per_group for quant_dtype: "
                       f"fp8_e4m3'); use --to compressed-tensors (MXFP4 + MXFP8), or rerun "
                       f"`dmx search` with --ladder fp6-fp4 for Quark")


def layer_tensors(layer) -> dict:
    # Quark's FP4/FP6 byte layouts are mxref's fp4-lo-first / fp6-le24 (docstring)
    return {"weight": hfdir.uint8_tensor(mxref.pack_codes(layer.codes, layer.fmt)),
            "weight_scale": hfdir.uint8_tensor(layer.scales)}


def write(src, dest, max_shard_bytes: int = hfdir.DEFAULT_SHARD_BYTES) -> None:
    hfdir.write_checkpoint(src, dest, layer_tensors,
                           quantization_config(src.layers, src.unquantized_modules()),
                           max_shard_bytes)


# ---------------------------------------------------------------- read back
def _unpack_quark_fp6(packed: np.ndarray, K: int) -> np.ndarray:
    """Quark ``Pack_fp6.unpack`` written out independently of mxref (the check must not
    reuse the writer's code): 3 bytes (b0, b1, b2) -> 4 codes."""
    b = packed.reshape(packed.shape[0], -1, 3).astype(np.uint8)
    v0 = b[..., 0] & 0x3F
    v1 = (b[..., 0] >> 6) | ((b[..., 1] & 0x0F) << 2)
    v2 = (b[..., 1] >> 4) | ((b[..., 2] & 0x03) << 4)
    v3 = b[..., 2] >> 2
    return np.stack([v0, v1, v2, v3], axis=-1).reshape(packed.shape[0], -1)[:, :K]


def _unpack_quark_fp4(packed: np.ndarray, K: int) -> np.ndarray:
    """Quark ``Pack_fp4.unpack``: low nibble first."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out[:, :K]


def read_back(src, dest) -> list:
    """Decode each layer by the documented Quark layout, driven by config.json alone."""
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    if qc.get("quant_method") != "quark" or "export" not in qc:
        raise ValueError("config.json has no Quark quantization_config with an export block")
    tensors = hfdir.read_tensors(dest)
    checks = []
    for name, spec in qc["layer_quant_config"].items():
        w = spec["weight"]
        fmt = FMT_OF[w["dtype"]]
        if (w["qscheme"], w["group_size"], w["scale_format"]) != ("per_group", DEFAULT_BLOCK_SIZE,
                                                                   "e8m0"):
            raise ValueError(f"{name}: not an OCP MX weight spec: {w}")
        weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"].numpy()
        K = scale.shape[1] * DEFAULT_BLOCK_SIZE
        if fmt == "fp4_e2m1":
            codes = _unpack_quark_fp4(weight.numpy(), K)
        else:
            codes = _unpack_quark_fp6(weight.numpy(), K)
        # value = element * 2^(scale - bias): element values from the format's code table
        elem = mxref.get_format(fmt).decode_table.astype(np.float64)[codes]
        exps = np.repeat(scale.astype(np.float64) - E8M0.bias, DEFAULT_BLOCK_SIZE, axis=1)
        values = elem * np.exp2(exps)
        layer = src.layers[name]
        checks.append(compare(name, f"quark {w['dtype']}", layer.values(),
                              values.astype(np.float32),
                              bytes_equal=bool(np.array_equal(codes, layer.codes)
                                               and np.array_equal(scale, layer.scales))))
    missing = set(src.layers) - set(qc["layer_quant_config"])
    if missing:
        raise ValueError(f"layers missing from layer_quant_config: {sorted(missing)[:3]}")
    return checks
