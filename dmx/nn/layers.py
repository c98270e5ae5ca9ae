"""Quantized linear layers and whole-model helpers.

* :class:`MXLinear` -- a fixed MX format for the weight (and optionally the input).
* :class:`DMXLinear` -- the dMX layer: one learnable float32 offset moves the weight
  and input-activation format along a ladder (paper.md 2.2-2.4).
* :func:`wrap_model`, :func:`apply_formats`, :func:`set_temperature`,
  :func:`hard_assignment`, :func:`dmx_parameters`.

Weights are blocked along the input dimension (the last dim of the [out, in] weight),
activations along their last dim with dynamic per-block scales, blocks of
mxref.DEFAULT_BLOCK_SIZE (OCP's k = 32, from specs/formats.toml).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import mxref
from mxref.formats import DEFAULT_BLOCK_SIZE

from dmx.errors import DMXError
# torch-free, so that building the command line's parsers does not load torch; re-exported
from dmx.nn.names import FUSED_GROUPS, NEVER_QUANTIZED, fused_key, fused_units  # noqa: F401
from dmx.quant.anneal import abs_ste, anneal_map, clamp_ste, hard_rung
from dmx.quant.backends import Backend, as_backend, choose
from dmx.quant.fakequant import fake_quantize
from dmx.quant.ladders import Ladder, get_ladder
from dmx.quant.realfmt import real_format_linear

__all__ = ["MXLinear", "DMXLinear", "wrap_model", "apply_formats", "set_temperature",
           "hard_assignment", "dmx_parameters", "FUSED_GROUPS", "fused_key", "fused_units",
           "linear_of", "set_submodule"]

DEFAULT_TEMPERATURE = 0.4  # code units (paper T_doc = 8), the schedule's start


class _WeightCache:
    """Quantized weight reused while the weight and format are unchanged and no gradient
    is being recorded (evaluation), keyed on the tensor's version counter."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, weight: torch.Tensor, fmt: str, block_size: int,
            backend=Backend.AUTO) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return fake_quantize(weight, fmt, -1, block_size, backend=backend)
        key = (fmt, block_size, weight.data_ptr(), weight._version, weight.dtype, weight.device,
               backend)
        if key != self.key:
            self.value = fake_quantize(weight, fmt, -1, block_size, backend=backend)
            self.key = key
        return self.value


def _check_linear(linear) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise DMXError(f"expected a torch.nn.Linear, got {type(linear).__name__}")
    return linear


class _LinearView(nn.Module):
    """Shared read-only views of the wrapped nn.Linear (code that reads .weight keeps working)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self):
        return self.linear.bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features


class MXLinear(_LinearView):
    """nn.Linear with MX fake-quantized weight (and input, if ``act_fmt``), fixed formats."""

    def __init__(self, linear: nn.Linear, weight_fmt: str, act_fmt: str | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, profile="ocp"):
        super().__init__()
        self.linear = _check_linear(linear)
        self.weight_fmt = mxref.get_format(weight_fmt).key
        self.act_fmt = None if act_fmt is None else mxref.get_format(act_fmt).key
        self.block_size = int(block_size)
        self.profile = mxref.get_profile(profile)
        self._cache = _WeightCache()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, weight={self.weight_fmt}, "
                f"act={self.act_fmt}, block={self.block_size}, profile={self.profile.name}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.profile.name == "ocp":
            w = self._cache.get(self.linear.weight, self.weight_fmt, self.block_size)
        else:
            w = fake_quantize(self.linear.weight, self.weight_fmt, -1, self.block_size,
                              self.profile)
        if self.act_fmt is not None:
            x = fake_quantize(x, self.act_fmt, -1, self.block_size, self.profile)
        return F.linear(x, w, self.linear.bias)


def _init_offset(ladder: Ladder, init) -> float:
    if init == "low":
        return ladder.low.position
    if init == "high":
        return ladder.high.position
    if isinstance(init, (int, float)) and not isinstance(init, bool):
        return float(init)
    raise DMXError(f"init must be 'low', 'high' or a number, got {init!r}")


class DMXLinear(_LinearView):
    """The dMX layer: weight and input format set by one learnable offset on a ladder.

    ``offset`` is the raw offset b_hat, a float32 0-d Parameter (float32 even in a bf16
    model: the BF16 lesson), shared by tied layers. Forward: b_hat is clamped to the
    ladder (straight-through), mapped by ``anneal_map`` at ``temperature`` to the position
    b, and b to real (e, m) bits for :func:`real_format_quantize`. In hard mode (``.hard``
    or eval mode) the rung the step map selects is applied with the bit-exact
    :func:`fake_quantize`: the format a layer trains with is the format it deploys with.
    ``backend`` ("auto", "torch", "triton"; :mod:`dmx.quant.backends`) picks the kernels
    of both modes: "auto" runs CUDA inputs through Triton (dmx.quant.triton_ops).
    """

    def __init__(self, linear: nn.Linear, ladder="fp8-fp4", offset: nn.Parameter | None = None,
                 quantize_input: bool = True, block_size: int = DEFAULT_BLOCK_SIZE, init="low",
                 parameterization: str = "clamp", backend=Backend.AUTO):
        super().__init__()
        if parameterization not in ("clamp", "abs"):
            raise DMXError(f"parameterization must be 'clamp' or 'abs', got {parameterization!r}")
        self.linear = _check_linear(linear)
        self.ladder = get_ladder(ladder)
        if offset is None:
            offset = nn.Parameter(torch.tensor(_init_offset(self.ladder, init),
                                               dtype=torch.float32,
                                               device=linear.weight.device))
        elif not (isinstance(offset, nn.Parameter) and offset.dim() == 0
                  and offset.dtype == torch.float32):
            raise DMXError("offset must be a 0-d float32 nn.Parameter (shared by tied layers)")
        self.offset = offset
        self.quantize_input = bool(quantize_input)
        self.parameterization = parameterization
        self.block_size = int(block_size)
        self.backend = as_backend(backend)
        self.temperature = DEFAULT_TEMPERATURE
        self.hard = False
        # soft mode only: -1 applies this step's quantization errors mirrored (v - (Q(v) - v));
        # set per step by the search under --error-signs random (dmx.search.train)
        self.error_sign = 1.0
        # soft mode only: a ladder position (float32 0-d tensor) used instead of the anneal
        # map's, the offset's gradient passed straight through; set per step by the search
        # under --explore (dmx.search.train)
        self.explore_position: torch.Tensor | None = None
        self.fused_group: str | None = None
        self._cache = _WeightCache()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, ladder={self.ladder.name}, "
                f"quantize_input={self.quantize_input}, block={self.block_size}, "
                f"offset={self.parameterization}, backend={self.backend.value}, "
                f"T={self.temperature:g}, hard={self.hard}")

    @property
    def hard_mode(self) -> bool:
        return self.hard or not self.training

    def raw_offset(self) -> torch.Tensor:
        """b_hat, the raw offset as the anneal map sees it before the clamp: the Parameter
        itself, or its absolute value (``parameterization="abs"``, the paper recipe)."""
        return abs_ste(self.offset) if self.parameterization == "abs" else self.offset

    def position(self) -> torch.Tensor:
        """Ladder position b (float32 0-d), differentiable w.r.t. the offset unless hard."""
        b_hat = clamp_ste(self.raw_offset(), self.ladder.low.position,
                          self.ladder.high.position)
        if self.explore_position is not None and not self.hard_mode:
            return self.explore_position + (b_hat - b_hat.detach())
        return anneal_map(b_hat, self.temperature, self.ladder, hard=self.hard_mode)

    def current_bits(self) -> torch.Tensor:
        """Element bits 1 + e + m of the current format (float32 0-d)."""
        return self.ladder.element_bits(self.position())

    def hard_format(self) -> str:
        """mxref key of the rung this layer deploys with (the hard step map of the offset)."""
        return hard_rung(self.raw_offset(), self.ladder).fmt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        if self.hard_mode:
            fmt = self.hard_format()
            wq = self._cache.get(w, fmt, self.block_size, self.backend)
            if self.quantize_input:
                x = fake_quantize(x, fmt, -1, self.block_size, backend=self.backend)
        else:
            # the Triton kernels apply no error sign and take the offset, not a position:
            # a signed or exploring step takes the torch path
            if (choose(x, self.backend) is Backend.TRITON and self.error_sign == 1.0
                    and self.explore_position is None):
                # one pass per tensor instead of ~70 small torch ops (the step is launch-bound)
                from dmx.quant import triton_ops
                return triton_ops.soft_forward(self, x)
            b = self.position()
            e, m = self.ladder.exp_bits(b), self.ladder.man_bits(b)
            cap = self.ladder.max_cap
            # Q(x), Q(w) and their graphs are recomputed in backward, one layer at a time
            return real_format_linear(x, w, self.linear.bias, e, m, self.block_size, cap,
                                      self.quantize_input, self.error_sign)
        return F.linear(x, wq, self.linear.bias)


# ----------------------------------------------------------------------------- model helpers
def _compile(patterns, what: str):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = (patterns,)
    try:
        return [re.compile(p) for p in patterns]
    except re.error as err:
        raise DMXError(f"bad {what} regex: {err}") from None


def linear_of(model: nn.Module, name: str) -> nn.Linear:
    """The nn.Linear at ``name``: the module itself, or the one a wrapper (MXLinear,
    DMXLinear) holds as ``.linear``."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise DMXError(f"formats names {name!r}, which is not a module of the model") from None
    linear = mod if isinstance(mod, nn.Linear) else getattr(mod, "linear", None)
    if not isinstance(linear, nn.Linear):
        raise DMXError(f"formats names {name!r}, a {type(mod).__name__}, not a linear layer")
    return linear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at the dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap_model(model: nn.Module, ladder="fp8-fp4", include=None, exclude=NEVER_QUANTIZED,
               quantize_activations: bool = True, tie_fused: bool = True,
               init="low", parameterization: str = "clamp",
               names=None, backend=Backend.AUTO) -> dict[str, DMXLinear]:
    """Replace the model's nn.Linear layers by DMXLinear, in place; returns {name: layer}.

    ``include``/``exclude``: regexes searched in module names (include None = all);
    ``names``: if given, only these of the selected layers (an export-target plan).
    ``tie_fused``: q/k/v_proj of one block share one offset, and so do gate/up_proj
    (serving engines fuse them into one matmul, so they must deploy in one format).
    ``backend``: "auto", "torch" or "triton" for every layer (:mod:`dmx.quant.backends`).
    """
    ladder = get_ladder(ladder)
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude") or []
    # the nn.Linear inside an existing MXLinear/DMXLinear is not wrapped again
    wrapped = [n + "." for n, m in model.named_modules() if isinstance(m, _LinearView)]
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and n
               and not any(n.startswith(w) for w in wrapped)
               and (inc is None or any(p.search(n) for p in inc))
               and not any(p.search(n) for p in exc)
               and (names is None or n in names)]
    if not targets and wrapped and not any(   # every linear left is inside a wrapper
            type(m) is nn.Linear and n and not any(n.startswith(w) for w in wrapped)
            and not any(p.search(n) for p in exc) for n, m in model.named_modules()):
        raise DMXError("the model's linears are already wrapped (DMXLinear/MXLinear), and "
                       "are not wrapped again; start from a freshly loaded model")
    if not targets:   # said in the flags' terms, with a name the patterns are matched against
        given = " ".join([*(f"--include {p!r}" for p in include or ()),
                          *(f"--exclude {p!r}" for p in exclude or ()
                            if p not in NEVER_QUANTIZED)])
        never = _compile(NEVER_QUANTIZED, "exclude")
        example = next((n for n, m in model.named_modules() if type(m) is nn.Linear and n
                        and not any(p.search(n) for p in never)), None)
        named = f"; its linears are named like {example}" if example else ""
        raise DMXError(f"{given or 'the selection'} matches no linear layer to quantize "
                       f"(lm_head and embeddings are never quantized){named}: fix the "
                       f"patterns (Python regexes, searched in the names)")
    shared: dict[str, nn.Parameter] = {}
    layers: dict[str, DMXLinear] = {}
    for name, linear in targets:
        key = fused_key(name) if tie_fused else None
        layer = DMXLinear(linear, ladder, offset=shared.get(key) if key else None,
                          quantize_input=quantize_activations, init=init,
                          parameterization=parameterization, backend=backend)
        if key:
            shared.setdefault(key, layer.offset)
            layer.fused_group = key
        set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def apply_formats(model: nn.Module, formats: dict, act_formats: dict | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE, profile="ocp") -> dict[str, MXLinear]:
    """Replace the named linears (nn.Linear, DMXLinear or MXLinear) by MXLinear, in place.

    ``formats``: {module name: weight format key}; ``act_formats``: {name: format or None}
    (names missing from it get unquantized inputs).
    """
    act_formats = act_formats or {}
    unknown = set(act_formats) - set(formats)
    if unknown:
        raise DMXError(f"act_formats names without a weight format: {sorted(unknown)[:5]}")
    out = {}
    for name, fmt in formats.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise DMXError(f"apply_formats: the model has no module {name!r}") from None
        linear = mod if type(mod) is nn.Linear else getattr(mod, "linear", None)
        if not isinstance(linear, nn.Linear):
            raise DMXError(f"apply_formats: {name!r} is a {type(mod).__name__}, not a linear")
        layer = MXLinear(linear, fmt, act_formats.get(name), block_size, profile)
        set_submodule(model, name, layer)
        out[name] = layer
    return out


def _dmx_layers(model: nn.Module) -> dict[str, DMXLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DMXLinear)}


def set_temperature(model: nn.Module, T: float) -> None:
    """Set the anneal temperature (code units) of every DMXLinear in the model."""
    T = float(T)
    if not T > 0:
        raise DMXError(f"temperature must be positive, got {T}")
    for layer in _dmx_layers(model).values():
        layer.temperature = T


def hard_assignment(model: nn.Module) -> dict[str, str]:
    """{module name: mxref format key} each DMXLinear deploys with."""
    return {n: layer.hard_format() for n, layer in _dmx_layers(model).items()}


def dmx_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The unique offset Parameters (tied layers share one), in model order."""
    seen, out = set(), []
    for layer in _dmx_layers(model).values():
        if id(layer.offset) not in seen:
            seen.add(id(layer.offset))
            out.append(layer.offset)
    return out
