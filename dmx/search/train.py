"""The dMX optimization loop: learn one float32 offset per layer (group), weights frozen.

Objective per step (paper.md 2.5-2.6): next-token cross-entropy on a calibration batch,
optionally + the KL divergence from the unquantized model's next-token distribution
(``distill``), or that KL alone (``ce`` off: the paired signal, without the one-hot target's
variance). The budget (dmx.search.recipe): ``hinge`` adds the paper's target-aware penalty
R_t = max(0, lam (avg_bits - target)); ``project`` shifts all offsets after every step so
that the soft average lies in [floor, target] (dmx.search.assign.project_to_budget);
``bound`` (the default) holds the same band by shrinking all offsets over the target and
stretching the step under the floor (dmx.search.assign.bound_to_budget). The gradient is
clipped or normalised to ``max_grad_norm`` (``grad_norm``) before the SGD step. The anneal
temperature follows :class:`dmx.quant.anneal.TemperatureSchedule`.

Learned rotations (``--rotate learned``, a :class:`dmx.rotate.LearnedRotations`) take one
Cayley step per step from the same loss, after the offsets' SGD step; their gradients are
summed over the ranks with the offsets' and are not clipped or normalised (the Cayley step
bounds itself, lr <= 1/||A||). Their matrices and optimizer state go into the checkpoint.

Determinism: the batch of step s is a function of (seed, s) only (see
:func:`batch_indices`), so a run resumed from a checkpoint takes exactly the steps an
uninterrupted run would have taken and ends with the same offsets.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from dmx.quant.anneal import TemperatureSchedule
from dmx.errors import DMXError
from dmx.nn.layers import dmx_parameters, set_temperature
from dmx.nn.bits import average_bits
from dmx.search.penalty import hinge_penalty
from dmx.search.losses import attention_kl, distill_kl, next_token_ce
from dmx.search.recipe import SearchConfig

__all__ = ["SearchInterrupted", "batch_indices", "quantization_bypassed", "forward_logits",
           "forward_outputs", "eager_attention", "hard_bits", "train_offsets",
           "checkpoint_blocks", "error_signs", "signed_step", "explore_positions",
           "exploring_step"]


class SearchInterrupted(Exception):
    """Ctrl-C during the search; the state after the last finished step is in ``checkpoint``."""

    def __init__(self, step: int, checkpoint, message: str | None = None):
        super().__init__(message or f"interrupted after step {step}; checkpoint saved to "
                                    f"{checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


def batch_indices(seed: int, step: int, n_windows: int, batch_size: int) -> torch.Tensor:
    """Window indices of step ``step``: consecutive slices of a stream of epochs, each epoch
    a permutation seeded by (seed, epoch). Every window is seen once per epoch (the
    reference trains one epoch), and the result depends on (seed, step) only."""
    if n_windows < 1:
        raise DMXError("no calibration windows to train on")
    first = step * batch_size
    out = []
    for pos in range(first, first + batch_size):
        epoch, i = divmod(pos, n_windows)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_windows, generator=g)[i]))
    return torch.tensor(out, dtype=torch.long)


def _decoder_blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of a Hugging Face causal LM: the ModuleList holding
    config.num_hidden_layers modules (model.model.layers for Llama/Qwen/Mistral...)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and n:
            return module
    raise DMXError("--gradient-checkpointing: found no list of config.num_hidden_layers "
                   "decoder blocks in this model; run without it")


def checkpoint_blocks(model) -> int:
    """Recompute each decoder block's activations in backward instead of keeping them
    (activation memory of one block instead of all; one extra forward per step).

    Our own wrapper rather than transformers' gradient_checkpointing_enable(): that one
    only checkpoints modules in training mode, and the search keeps the model in eval
    mode (no dropout). Non-reentrant checkpointing: the frozen inputs need no grad, and
    the recomputed forward is the same computation (same temperature, same offsets), so
    the offsets' gradients are unchanged bit for bit. Returns the number of blocks."""
    from torch.utils.checkpoint import checkpoint

    blocks = _decoder_blocks(model)
    for block in blocks:
        if getattr(block, "_dmx_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward  # instance attribute: shadows the class's forward
        block._dmx_checkpointed = True
    return len(blocks)


@contextlib.contextmanager
def quantization_bypassed(layers: dict):
    """Inside, every DMXLinear runs its plain full-precision nn.Linear: the reference model
    for distillation without keeping a second copy of the weights."""
    try:
        for layer in layers.values():
            layer.forward = layer.linear.forward  # instance attribute shadows the method
        yield
    finally:
        for layer in layers.values():
            layer.__dict__.pop("forward", None)


def hard_bits(layers: dict, weighting: str = "simple") -> float:
    """Average bits the layers would deploy with now (every offset on its rung)."""
    saved = {name: layer.hard for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.hard = True
        with torch.no_grad():
            return float(average_bits(layers, weighting))
    finally:
        for name, layer in layers.items():
            layer.hard = saved[name]


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits of ``ids`` without the KV cache (the search's forward pass)."""
    return forward_outputs(model, ids)[0]


def forward_outputs(model, ids: torch.Tensor, attentions: bool = False):
    """(logits, attention probabilities per layer or None) of ``ids`` without the KV cache."""
    out = model(input_ids=ids, use_cache=False, output_attentions=attentions)
    return out.logits, (tuple(out.attentions) if attentions else None)


@contextlib.contextmanager
def eager_attention(model, needed: bool):
    """Attention computed by the model's eager code while ``needed`` (--attn-distill: the
    fused kernels do not return the probabilities), then the model's own again."""
    before = getattr(model.config, "_attn_implementation", None)
    if not needed or before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _data_parallel_loss(dist, loss, logged: dict, penalty, share):
    """This rank's part of the global loss: its CE (+ KL, + attention KL) weighted by its
    share of the batch, the penalty on rank 0 only (counted once), so the gradients summed
    over the ranks are those of the single-process loss. Also returns the global value of
    each term in ``logged`` (None stays None; the logged values, the same on every rank)."""
    from dmx.search.distributed import reduce_sum

    local = loss.float() * share
    if dist.is_main:
        local = local + penalty.to(local.device)
    present = [k for k, v in logged.items() if v is not None]
    sums = reduce_sum(dist, [logged[k].detach() * share for k in present])
    return local, {**logged, **dict(zip(present, sums))}


def train_offsets(model, layers: dict, windows: torch.Tensor, cfg: SearchConfig,
                  resume_state: dict | None = None,
                  save: Callable[[dict], object] | None = None,
                  callback: Callable[[int, dict], None] | None = None,
                  progress: bool = True, dist=None, checkpoint_every: int = 50,
                  rotations=None) -> list[dict]:
    """Run steps [start, cfg.steps) and return the per-step log (from step 0 on resume).

    ``windows``: LongTensor [n, seqlen] of token ids (on the model's device).
    ``save(state)``: writes a checkpoint; called every ``checkpoint_every`` steps and on
    Ctrl-C (then :class:`SearchInterrupted` is raised). ``callback(step, record)`` runs after
    each finished step (tests use it to interrupt a run).
    ``dist``: a :class:`dmx.search.distributed.DistContext` for data parallel training (torchrun):
    each rank runs its slice of every step's global batch and the gradients are summed
    over the ranks (see dmx.search.distributed); None or a single process: the plain loop.
    ``rotations``: a :class:`dmx.rotate.LearnedRotations` on ``model`` to train with the
    offsets (None: the weights' rotation, if any, is fixed).
    """
    params = dmx_parameters(model)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0)
    schedule = TemperatureSchedule(cfg.steps, cfg.delay, cfg.t_start, cfg.t_end)
    log: list[dict] = []
    start = 0
    if resume_state is not None:
        with torch.no_grad():
            for p, saved in zip(params, resume_state["offsets"], strict=True):
                p.copy_(saved.to(p.device))
        optimizer.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["rng"])
        log = list(resume_state["log"])
        start = int(resume_state["step"])
        if rotations is not None:
            if "rotations" not in resume_state:
                raise DMXError("--resume: the checkpoint has no learned rotations; start "
                               "over with --force")
            rotations.load_state_dict(resume_state["rotations"])

    def state_now(step: int) -> dict:
        state = {"step": step, "offsets": [p.detach().cpu().clone() for p in params],
                 "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "log": log}
        if rotations is not None:
            state["rotations"] = rotations.state_dict()
        return state

    for layer in layers.values():
        layer.hard = False
        layer.train()  # the rest of the model stays as it is (eval: no dropout)
    bar = tqdm(total=cfg.steps, initial=start, desc="dmx search", unit="step",
               disable=not progress, dynamic_ncols=True)
    step = start
    with eager_attention(model, cfg.attn_distill > 0):
        try:
            while step < cfg.steps:
                record = _train_step(model, layers, windows, cfg, optimizer, schedule, step,
                                     dist, rotations)
                log.append(record)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['ce']:.3f}", pen=f"{record['penalty']:.3f}",
                                bits=f"{record['avg_bits']:.2f}",
                                hard=f"{record['hard_bits']:.2f}", T=f"{record['T']:.2f}",
                                refresh=False)
                # the last step saves too: a crash while OUT is written then resumes straight
                # to writing it
                if save is not None and ((checkpoint_every and step % checkpoint_every == 0)
                                         or step == cfg.steps):
                    save(state_now(step))
                if callback is not None:
                    callback(step, record)
        except KeyboardInterrupt:
            bar.close()
            if save is None:
                raise
            # ``step`` counts finished steps: the checkpoint resumes exactly after the last one
            raise SearchInterrupted(step, save(state_now(step))) from None
    bar.close()
    return log


def _offset_stats(layers: dict, params: list) -> dict:
    """The raw offsets b_hat after a step (the anneal map's input), one per Parameter in
    model order, and their range: what the report draws as trajectories."""
    first = {}
    for layer in layers.values():
        first.setdefault(id(layer.offset), layer)
    raw = [float(first[id(p)].raw_offset().detach()) for p in params]
    return {"offset_min": min(raw), "offset_max": max(raw), "offset_mean": sum(raw) / len(raw),
            "offsets": raw}


def _l2_norm(grads: list) -> float:
    """The L2 norm of all ``grads`` together (0.0 for none)."""
    if not grads:
        return 0.0
    dev = grads[0].device  # --device-map: the parameters can sit on several GPUs
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm().to(dev)
                                                       for g in grads])))


def _scale_gradients(params: list, cfg: SearchConfig) -> float:
    """Clip the offsets' gradient at L2 norm ``max_grad_norm`` (``clip``, the Hugging
    Face trainer's rule) or rescale it to root-mean-square 1 per offset (``normalize``);
    returns the L2 norm before. ``normalize`` keeps the direction (the relative sizes
    between layers: the ranking signal) and makes ``lr`` the typical per-step move of an
    offset in ladder units, whatever the model's loss scale or number of layers."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = _l2_norm(grads)
    if cfg.grad_norm == "clip" and norm > cfg.max_grad_norm:
        factor = cfg.max_grad_norm / norm
    elif cfg.grad_norm == "normalize" and norm > 0:
        factor = math.sqrt(len(grads)) / norm
    else:
        factor = 1.0
    if factor != 1.0:
        for g in grads:
            g.mul_(factor)
    return norm


def _precondition_by_slope(params: list, layers: dict, T: float) -> None:
    """``--precondition slope``: divide each offset's gradient by the slope of the anneal map
    at that offset, relative to the slope at the low rung (a factor in (0, 1]), in place.

    Why: dL/d(offset) = dL/d(position) * slope(offset). Starting at the low rung, every
    offset sits on the flat tail of the sigmoid (slope 0.14 at T 0.4 on fp8-fp4, 14x
    less than mid-ladder), so the layers the first noisy gradients raised get a gradient up
    to 14x larger for the same sensitivity, and keep the budget (at 4.5 bits on
    SmolLM2-135M, the first step's top 26 held 16 of the 26 final picks). Divided, the
    step follows dL/d(position): how much the loss wants this layer's format, wherever
    its offset sits. Measured *worse* there (BENCHMARKS.md "Search recipes", variants),
    so no recipe uses it: the lock-in is not (only) the slope's."""
    from dmx.quant.anneal import anneal_map
    from dmx.search.assign import effective_offsets

    layer = next(iter(layers.values()))
    lad = layer.ladder
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    _, eff = effective_offsets(with_grad, layer.parameterization, lad.low.position,
                               lad.high.position)
    with torch.enable_grad():
        eff = torch.cat([eff, torch.tensor([lad.low.position], dtype=eff.dtype)])
        eff.requires_grad_(True)
        slope, = torch.autograd.grad(anneal_map(eff, T, lad).sum(), eff)
    factor = (slope[-1] / slope[:-1]).clamp(max=1.0)
    for p, f in zip(with_grad, factor):
        p.grad.mul_(float(f))


def _project_to_budget_tangent(params: list, layers: dict, cfg: SearchConfig) -> None:
    """``--precondition tangent``: remove from the offsets' gradient its component along
    the bound budget's shrink direction (each effective offset by its weight in the
    average, dmx.search.assign.bound_to_budget), in place.

    Why: at the target, every step's gradient pushes most offsets up (more bits lower the
    loss) and the bound takes a common amount back after the step. With momentum 0.99 that
    push accumulates: on SmolLM2-135M the bound took back 0.2-0.5 ladder units per step
    in the anneal phase (up to 1.1 in 96-step runs), and a step where it did not cancel
    moved every offset at once (2.7 units changed rung per step, up to 11). Projected, the
    momentum keeps only the exchange between layers, which is the ranking."""
    from dmx.search.assign import _offset_coefficients, effective_offsets

    with_grad = [p for p in params if p.grad is not None]
    if len(with_grad) < 2:
        return
    weight = _offset_coefficients(layers, params, cfg.weighting)
    weight = weight[[i for i, p in enumerate(params) if p.grad is not None]]
    weight = (weight / weight.min()).to(torch.float64)
    raw, _ = effective_offsets(with_grad, cfg.parameterization, -math.inf, math.inf)
    sign = torch.where(raw < 0, -1.0, 1.0) if cfg.parameterization == "abs" else \
        torch.ones_like(raw)
    n = sign * weight  # d(effective offsets)/d(raw) times the shrink's weights
    g = torch.stack([p.grad.detach().double().cpu().reshape(()) for p in with_grad])
    g = g - (g @ n) / (n @ n) * n
    for p, v in zip(with_grad, g):
        p.grad.copy_(v.to(p.grad.dtype).reshape(p.grad.shape))


def error_signs(layers: dict, seed: int, step: int) -> dict:
    """``--error-signs random``: one sign (+1 or -1) per offset for this step, a function of
    (seed, step) only (resumed runs and data-parallel ranks draw the same), given to each
    layer as ``error_sign``; tied layers share their offset's sign. Returns {name: sign}.

    Why: the loss's gradient with respect to one offset holds, besides that layer's own
    error's effect, cross terms with every other layer's error. At a low budget (every layer
    MXFP4 but a few) those cross terms are large and specific to the calibration tokens:
    exact one-layer swaps measured in the search's own context made a 4.5-bit assignment
    worse on held-out text (BENCHMARKS.md). With independent random signs a cross term
    s_i s_j (...) has mean zero over the steps while the layer's own term (s_i^2 = 1) stays;
    what remains of it in each step is noise, which combining seeds averages out (at 4.5
    bits on SmolLM2-135M; at 5 and 6 bits the noise cost more than it removed)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7_919 * int(step) + 1)
    signs = _per_offset(layers, lambda layer: 1.0 if torch.rand((), generator=g) < 0.5
                        else -1.0)
    for name, layer in layers.items():
        layer.error_sign = signs[name]
    return signs


def _per_offset(layers: dict, draw) -> dict:
    """{name: draw(layer)}, drawn once per offset in model order (tied layers share it)."""
    by_offset, drawn = {}, {}
    for name, layer in layers.items():
        key = id(layer.offset)
        if key not in by_offset:
            by_offset[key] = draw(layer)
        drawn[name] = by_offset[key]
    return drawn


def _offsets_average(layers: dict, weighting: str) -> torch.Tensor:
    """The soft average bits of the offsets (the anneal map's positions), also in an
    exploring step, whose forward pass uses random positions (--explore)."""
    drawn = {name: layer.explore_position for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.explore_position = None
        return average_bits(layers, weighting)
    finally:
        for name, layer in layers.items():
            layer.explore_position = drawn[name]


def explore_positions(layers: dict, seed: int, step: int) -> dict:
    """``--explore``: one ladder position per offset for this step, uniform between the low
    and the high rung, a function of (seed, step) only (resumed runs and data-parallel
    ranks draw the same), given to each layer as ``explore_position``; tied layers share
    their offset's. Returns {name: position}."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_033 + 104_729 * int(step) + 3)

    def draw(layer) -> float:
        lo, hi = layer.ladder.low.position, layer.ladder.high.position
        return lo + (hi - lo) * float(torch.rand((), generator=g))
    positions = _per_offset(layers, draw)
    for name, layer in layers.items():
        layer.explore_position = torch.tensor(positions[name], dtype=torch.float32,
                                              device=layer.offset.device)
    return positions


def exploring_step(cfg: SearchConfig, step: int) -> bool:
    """Whether step ``step`` draws random ladder positions: the first ``explore`` of the
    steps."""
    return step < cfg.explore * cfg.steps


def signed_step(cfg: SearchConfig, step: int) -> bool:
    """Whether step ``step`` draws random error signs: with ``--error-signs random``, the
    first ``error_signs_until`` of the steps."""
    return cfg.error_signs == "random" and step < cfg.error_signs_until * cfg.steps


def _train_step(model, layers, windows, cfg: SearchConfig, optimizer, schedule, step,
                dist=None, rotations=None) -> dict:
    T = schedule.at(step)
    set_temperature(model, T)
    if signed_step(cfg, step):
        error_signs(layers, cfg.seed, step)
    if exploring_step(cfg, step):
        explore_positions(layers, cfg.seed, step)
    try:
        return _step(model, layers, windows, cfg, optimizer, schedule, step, T, dist,
                     rotations)
    finally:  # the soft model outside a step (its scoring, the checkpoints) is Q(v) at the
        for layer in layers.values():  # anneal map's positions
            layer.error_sign = 1.0
            layer.explore_position = None


def _step(model, layers, windows, cfg: SearchConfig, optimizer, schedule, step, T, dist,
          rotations) -> dict:
    ids = windows[batch_indices(cfg.seed, step, windows.shape[0], cfg.batch_size)]
    parallel = dist is not None and dist.enabled
    if parallel:  # this rank's slice of the global batch, and its share of it
        ids, share = dist.rank_slice(ids, cfg.batch_size)
    kl = attn = None
    attend = cfg.attn_distill > 0
    if cfg.distill or attend:
        with torch.no_grad(), quantization_bypassed(layers):
            ref_logits, ref_att = forward_outputs(model, ids, attend)
    logits, att = forward_outputs(model, ids, attend)
    ce = next_token_ce(logits, ids)
    loss = ce if cfg.ce else None  # the CE is logged either way
    if cfg.distill:
        kl = distill_kl(logits, ref_logits)
        loss = kl if loss is None else loss + kl
    if attend:
        attn = attention_kl(att, ref_att)
        weighted = cfg.attn_distill * attn
        loss = weighted if loss is None else loss + weighted
    avg = _offsets_average(layers, cfg.weighting)  # float32 whatever the model dtype
    lam = cfg.lam if cfg.budget == "hinge" else 0.0  # bound/project: the budget is not a loss
    penalty = hinge_penalty(avg, cfg.target_bits, lam)
    if parallel:
        loss, logged = _data_parallel_loss(dist, loss, {"ce": ce, "kl": kl, "attn": attn},
                                           penalty, share)
        ce, kl, attn = logged["ce"], logged["kl"], logged["attn"]
        terms = ([ce] if cfg.ce else []) + ([kl] if kl is not None else [])
        terms += [cfg.attn_distill * attn] if attn is not None else []
        value = float(sum(t.float() for t in terms) + penalty.detach().to(ce.device))
    else:
        loss = loss.float() + penalty.to(loss.device)  # .to: --device-map spreads the layers
        value = float(loss.detach())
    if not math.isfinite(value):
        raise DMXError(f"the loss became {value} at step {step}; try a smaller --lr")
    optimizer.zero_grad(set_to_none=True)
    rot_params = [] if rotations is None else rotations.parameters()
    if rotations is not None:
        rotations.zero_grad()
    loss.backward()
    params = optimizer.param_groups[0]["params"]
    if parallel:
        from dmx.search.distributed import all_reduce_grads

        all_reduce_grads(dist, params + rot_params)
    if cfg.precondition == "slope" and T <= cfg.t_start:  # before the anneal starts
        _precondition_by_slope(params, layers, T)
    if cfg.precondition == "tangent" and float(avg.detach()) >= cfg.target_bits - 1e-3:
        _project_to_budget_tangent(params, layers, cfg)
    grad_norm = _scale_gradients(params, cfg) if cfg.grad_norm != "none" else None
    before = [p.detach().clone() for p in params] if cfg.budget == "bound" else None
    optimizer.step()
    rotation = {}
    if rotations is not None:  # the same loss's gradient, unscaled (see the docstring)
        rotation["rotation_grad_norm"] = _l2_norm([p.grad for p in rot_params
                                                   if p.grad is not None])
        rotations.step()
    shift = stretch = None
    if cfg.budget == "project":  # the next step's forward meets the budget
        from dmx.search.assign import project_to_budget
        shift = project_to_budget(layers, params, cfg.target_bits, cfg.weighting,
                                  schedule.at(step + 1), cfg.offset_margin,
                                  floor=cfg.budget_floor(step + 1))
    elif cfg.budget == "bound":  # the same band, held without moving unchosen layers
        from dmx.search.assign import bound_to_budget
        held = bound_to_budget(layers, params, before, cfg.target_bits, cfg.weighting,
                               schedule.at(step + 1), cfg.offset_margin,
                               cfg.parameterization, floor=cfg.budget_floor(step + 1),
                               max_stretch=cfg.max_stretch, held_on=cfg.budget_average)
        shift, stretch = held["shift"], held["stretch"]
    return {"step": step, "T": T, "loss": value, "ce": float(ce.detach()),
            "kl": None if kl is None else float(kl.detach()),
            "attn_kl": None if attn is None else float(attn.detach()),
            "penalty": float(penalty.detach()),
            "avg_bits": float(avg.detach()),
            "hard_bits": hard_bits(layers, cfg.weighting), "grad_norm": grad_norm,
            "shift": shift, "stretch": stretch, "floor": cfg.budget_floor(step), **rotation,
            **_offset_stats(layers, params)}
