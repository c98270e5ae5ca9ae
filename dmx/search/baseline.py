"""Baselines the dMX search is compared with (paper.md 2.7), written as OUT directories.

* uniform: every quantizable linear in one format (weights and inputs, or weights only).
* kl: KL-divergence layer selection. Each unit -- a linear, or with ``--tie-fused`` a
  fused group (q/k/v, gate/up of one block, kept in one format as vLLM needs; by the
  search's rule, on for the vLLM export targets) -- is quantized
  alone to the ladder's low rung, everything else unquantized; its sensitivity is the
  mean per-token KL(unquantized || quantized) of next-token distributions on calibration
  windows. Then, starting from every unit on the low rung, units are promoted in order of
  decreasing sensitivity to the high rung (then to the middle rungs of a 3-rung ladder)
  whenever the promotion keeps the average bits (simple or size-weighted, the search's
  definition) at or below the target; a unit that does not fit is skipped, so the
  budget is met as closely as the units allow, never exceeded.

Both take ``--export-target`` as ``dmx search`` does: the layers that target cannot hold
stay in full precision, said on stderr with the coverage.

``--rotate hadamard|random`` folds the same fixed R1/R2 rotations as ``dmx search
--rotate hadamard`` into the weights first (dmx.rotate.rotate_model, seeded by --seed), so
a baseline and a search compare like for like; the manifest records them (``rotation``).
``--rotate-online r4`` adds the online R4 (dmx.rotate.online), as ``dmx search`` does.
``--rotate-from OUT`` folds the learned R1/R2 a ``dmx search --rotate learned`` OUT kept
(dmx.rotate.saved), so the baseline quantizes the same rotated weights the search did.

``--sensitivities-from KL_OUT`` takes the sensitivities an earlier KL baseline recorded
instead of measuring them again: a budget sweep pays for the forward passes once. Only
the promotion depends on the budget, so the result is the one a fresh run gives; every
setting the sensitivities depend on (model, calibration text, windows, seed, low format,
inputs quantized or not, layers, units, rotation) must match, or the run is refused with
the field that differs.

Public API: ``quantizable_layers(model, include=None) -> [names]``,
``uniform_baseline(model_dir, fmt, out, ...) -> dict``,
``kl_sensitivities(model, units, windows, low_fmt, ...) -> {unit: kl}``,
``greedy_promote(units, sensitivity, shapes, ladder, target, weighting, weights_only)``,
``kl_baseline(model_dir, target_bits, out, ...) -> dict``,
``add_baseline_parser(subparsers)`` / ``run_baseline(args)``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mxref
from dmx.errors import DMXError
from dmx.quant.ladders import check_target_bits  # noqa: F401 (API: one rule, in dmx.quant.ladders)
from dmx.nn.names import NEVER_QUANTIZED
from dmx.nn.names import fused_units  # noqa: F401 (API: one definition, in dmx.nn.names)
from dmx.search.recipe import EXPORT_TARGETS, WEIGHTINGS, check_choice, tie_fused_for

__all__ = ["METHODS", "ROTATIONS", "quantizable_layers", "fused_units", "uniform_baseline",
           "kl_sensitivities", "greedy_promote", "kl_baseline", "check_target_bits",
           "add_baseline_parser", "run_baseline"]

METHODS = ("uniform", "kl")
ROTATIONS = ("none", "hadamard", "random")  # fixed ones (learned needs the search's loop)


DEFAULT_EXCLUDE = NEVER_QUANTIZED


def quantizable_layers(model, include=None, exclude=()) -> list[str]:
    """Names of the linears dMX quantizes (wrap_model's selection: all but lm_head and
    embeddings and ``exclude``, or those matching ``include``), model left as it was."""
    from dmx.nn.layers import wrap_model
    layers = wrap_model(model, include=include,  # the one definition of the selection
                        exclude=DEFAULT_EXCLUDE + tuple(exclude or ()))
    for name, layer in layers.items():
        model.set_submodule(name, layer.linear)   # undo: plain nn.Linear again
    return list(layers)


def select_layers(model, include, ladder, export_target: str = "any", say=print,
                  exclude=()) -> list[str]:
    """The linears a search or baseline quantizes: :func:`quantizable_layers`, minus those
    ``export_target`` cannot hold (dmx.export.plan.plan_for_target), said with the
    coverage. Fused units stay whole (their layers share in_features)."""
    from dmx.export.plan import plan_for_target

    names = quantizable_layers(model, include, exclude)
    shapes = _shapes(model, names)
    kept, excluded = plan_for_target(shapes, ladder, export_target)
    if excluded:
        total = sum(o * i for o, i in shapes.values())
        covered = sum(shapes[n][0] * shapes[n][1] for n in kept)
        reasons = sorted(set(excluded.values()))
        say(f"export target {export_target}: leaving {len(excluded)} of {len(names)} linears "
            f"in full precision ({'; '.join(reasons)}): "
            f"{', '.join(list(excluded)[:6])}{' ...' if len(excluded) > 6 else ''}; "
            f"{len(kept)} quantized, {100.0 * covered / total:.1f}% of the linear weights "
            f"(--export-target none quantizes them all)")
    return kept


def _formats_for(names, fmt, weights_only):
    return {n: fmt for n in names}, {n: (None if weights_only else fmt) for n in names}


def _shapes(model, names) -> dict:
    return {n: tuple(model.get_submodule(n).weight.shape) for n in names}


def _note(msg: str) -> None:
    """A note on stderr, as dmx search says its own (the layer plan of --export-target)."""
    print(f"dmx baseline: {msg}", file=sys.stderr)


def _check_rotation(model_dir, rotate: str, rotate_kind: str, rotate_online=(),
                    rotate_from=None):
    """Bad --rotate/--rotate-kind/--rotate-online/--rotate-from (or a model type rotations
    do not support) fail before the weights load. Returns what ``--rotate-from`` read
    (matrices, the manifest's rotation record), or None, so it is read once."""
    from dmx.rotate.fold import check_model_type
    from dmx.rotate.hadamard import KINDS
    from dmx.rotate.online import parse_online
    online = parse_online(rotate_online)
    if rotate not in ROTATIONS:
        raise DMXError(f"--rotate must be one of {', '.join(ROTATIONS)}, got {rotate!r}")
    if rotate_kind not in KINDS:
        raise DMXError(f"--rotate-kind must be one of {', '.join(KINDS)}, got {rotate_kind!r}")
    if rotate != "hadamard" and rotate_kind != "auto" and not online:
        raise DMXError(f"--rotate-kind {rotate_kind} picks the matrix of --rotate hadamard "
                       f"(and of --rotate-online r4); add one or drop it")
    saved = None
    if rotate_from is not None:
        if rotate != "none":
            raise DMXError(f"--rotate-from takes the rotations of {rotate_from}; drop "
                           f"--rotate {rotate}")
        from dmx.outdir import read_rotations
        saved = read_rotations(rotate_from)  # refuses an OUT without learned rotations
    if rotate != "none" or online or rotate_from is not None:
        from dmx import data
        check_model_type(data.check_causal_lm_dir(model_dir).get("model_type"))
    return saved


def _load(model_dir, device, rotate: str = "none", rotate_kind: str = "auto", seed: int = 0,
          rotate_online=(), rotate_from=None, saved=None):
    """The model with frozen weights (baselines never train), rotated as asked (``saved``:
    what _check_rotation read from ``rotate_from``); and the ``(meta, extra_files)``
    additions of write_out that record the rotation."""
    from dmx.data import load_model
    model = load_model(model_dir, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    from dmx.rotate import out_config_files, rotate_model, rotate_online as online_r4
    info = None if rotate == "none" else rotate_model(model, rotate, seed=seed,
                                                      kind=rotate_kind)
    if saved is not None:  # the learned R1/R2 a search OUT kept
        from dmx.rotate.saved import apply_rotations
        info = apply_rotations(model, *saved)
    info = online_r4(model, rotate_online, info, kind=rotate_kind, seed=seed)
    if info is None:
        return model, {}, {}
    record = info.to_manifest()
    if rotate_from is not None:
        record["from"] = str(rotate_from)
    return model, {"rotation": record}, out_config_files(model_dir, info)


# ----------------------------------------------------------------------------- uniform
def uniform_baseline(model_dir, fmt: str, out, weights_only: bool = False, include=None,
                     device: str = "cpu", force: bool = False, rotate: str = "none",
                     rotate_kind: str = "auto", seed: int = 0, rotate_online=(),
                     export_target: str = "any", rotate_from=None) -> dict:
    """Write OUT with every quantizable linear that ``export_target`` can hold in ``fmt``
    (after the fixed ``rotate`` rotation, seeded by ``seed``); returns a summary."""
    from dmx import outdir
    from dmx.nn.bits import average_bits_of
    t0 = time.time()
    fmt = mxref.get_format(fmt).key
    if mxref.get_format(fmt).bits not in (4, 6, 8):
        raise DMXError(f"--format {fmt}: OUT stores 4-, 6- and 8-bit MX formats only")
    check_choice("--export-target", export_target, EXPORT_TARGETS)
    outdir.check_new_out(out, force, [model_dir])
    saved = _check_rotation(model_dir, rotate, rotate_kind, rotate_online, rotate_from)
    model, rot_meta, extra_files = _load(model_dir, device, rotate, rotate_kind, seed,
                                         rotate_online, rotate_from, saved)
    names = select_layers(model, include, fmt, export_target, _note)
    formats, acts = _formats_for(names, fmt, weights_only)
    meta = {"method": "uniform", "ladder": None, "target_bits": None, "seed": int(seed),
            "baseline": {"format": fmt, "weights_only": bool(weights_only),
                         "export_target": export_target},
            "wall_time_s": round(time.time() - t0, 3), **rot_meta}
    outdir.write_out(out, model, formats, acts, model_dir, meta, force, extra_files=extra_files)
    bits = average_bits_of(formats, acts, _shapes(model, names))
    return {"out": str(out), "formats": formats, "avg_bits": bits,
            "wall_time_s": meta["wall_time_s"]}


# ----------------------------------------------------------------------------- kl
def kl_sensitivities(model, units, windows, low_fmt: str, weights_only: bool = False,
                     batch_size: int = 4, progress: bool = True,
                     replay_blocks: bool = True) -> dict:
    """{unit: mean per-token KL(unquantized || unit alone in low_fmt)} on ``windows``.

    The reference distribution of a batch is computed once and every unit is scored
    against it before the next batch, so only one batch of reference logits is held. A
    unit's pass starts at its own decoder block, the blocks before it replaying the
    reference pass's outputs (dmx.search.replay): the same logits, bit for bit, 1.45x
    faster on SmolLM2-135M (benchmarks/bench_kl_replay.py). ``replay_blocks=False``: full
    passes (the benchmark's anchor, the tests' reference).
    """
    import torch
    from tqdm.auto import tqdm

    from dmx.nn.layers import apply_formats
    from dmx.search.losses import distill_kl  # the search's KL(reference || quantized), float32
    from dmx.search.replay import BlockReplay

    originals = {n: model.get_submodule(n) for u in units for n in u}
    replay = BlockReplay(model, units, enabled=replay_blocks)
    totals = {u: 0.0 for u in units}
    batches = range(0, windows.shape[0], batch_size)
    bar = tqdm(total=len(batches) * len(units), desc="dmx baseline kl", unit="fwd",
               disable=not progress, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for i in batches:
                ids = windows[i:i + batch_size]
                with replay.recording():
                    ref = model(input_ids=ids, use_cache=False).logits
                if i == 0 and not replay.check(
                        lambda: model(input_ids=ids, use_cache=False).logits, ref):
                    _note("this model's blocks do not replay exactly; KL runs full passes")
                for u in units:
                    apply_formats(model, *_formats_for(u, low_fmt, weights_only))
                    try:
                        with replay.from_block(replay.block_of[u]):
                            logits = model(input_ids=ids, use_cache=False).logits
                    finally:
                        for n in u:
                            model.set_submodule(n, originals[n])
                    totals[u] += float(distill_kl(logits, ref)) * ids.shape[0]
                    bar.update(1)
    finally:
        bar.close()
    return {u: t / windows.shape[0] for u, t in totals.items()}


def greedy_promote(units, sensitivity: dict, shapes: dict, ladder, target: float,
                   weighting: str = "simple", weights_only: bool = False) -> dict:
    """{name: format}: all units low, then promoted by decreasing sensitivity while the
    average bits stay <= target (see the module docstring)."""
    from dmx.nn.bits import average_bits_of
    key = {"simple": "simple", "size": "size_weighted"}[weighting]
    fmt_of = {u: ladder.low.fmt for u in units}

    def avg(assign):
        formats = {n: f for u, f in assign.items() for n in u}
        acts = {n: (None if weights_only else f) for n, f in formats.items()}
        return average_bits_of(formats, acts, shapes)[key]

    order = sorted(units, key=lambda u: -sensitivity[u])
    higher = [r.fmt for r in sorted(ladder.rungs, key=lambda r: -r.bits)][:-1]
    for fmt in higher:  # the high rung first, then the middle ones
        for u in order:
            if fmt_of[u] != ladder.low.fmt:
                continue
            trial = {**fmt_of, u: fmt}
            if avg(trial) <= target + 1e-9:
                fmt_of = trial
    return {n: f for u, f in fmt_of.items() for n in u}


def kl_baseline(model_dir, target_bits: float, out, ladder: str = "fp8-fp4",
                weighting: str = "simple", calib=None, samples: int = 16,
                seqlen: int | None = None, seed: int = 0, weights_only: bool = False,
                include=None, batch_size: int = 4, device: str = "cpu", force: bool = False,
                progress: bool = True, rotate: str = "none", rotate_kind: str = "auto",
                rotate_online=(), export_target: str = "any",
                tie_fused: bool | None = None, rotate_from=None,
                sensitivities_from=None, exclude=()) -> dict:
    """Write OUT with the KL layer-selection assignment (on the model after the fixed
    ``rotate`` rotation, seeded by ``seed``); returns a summary. ``export_target`` and
    ``tie_fused`` (None: the search's rule, :func:`dmx.search.recipe.tie_fused_for`)
    choose the layers and units as ``dmx search`` does, so the two compare like for like.
    ``sensitivities_from``: an earlier KL OUT whose recorded sensitivities are reused
    (checked to have been measured under the same settings). ``exclude``: regexes of
    linears left out, as the search's --exclude (`dmx search --seeds --fuse-kl`)."""
    from dmx import data, outdir
    from dmx.nn.bits import average_bits_of
    from dmx.quant.ladders import get_ladder

    t0 = time.time()
    lad = get_ladder(ladder)
    target = check_target_bits(target_bits, lad)
    check_choice("--weighting", weighting, WEIGHTINGS)
    check_choice("--export-target", export_target, EXPORT_TARGETS)
    tie = tie_fused_for(export_target, tie_fused)
    outdir.check_new_out(out, force, [model_dir])
    data.check_text_files("--calib", calib)
    saved = _check_rotation(model_dir, rotate, rotate_kind, rotate_online, rotate_from)
    config = data.check_causal_lm_dir(model_dir)
    if seqlen is None:  # the search's 2048, capped by what the model was trained for
        seqlen = min(2048, int(config.get("max_position_embeddings") or 2048))
    calib_files = [str(f) for f in calib] if calib else [str(data.default_calibration_file())]
    # the text is checked before the weights load: bad calibration input fails fast
    windows = data.calibration_windows(data.load_tokenizer(model_dir), calib_files, seqlen,
                                       samples, seed)
    measured = {"weights_only": bool(weights_only), "calib": calib_files,
                "samples": int(windows.shape[0]), "seqlen": int(seqlen),
                "low_format": lad.low.fmt, "export_target": export_target, "tie_fused": tie}
    earlier = None if sensitivities_from is None else _earlier_kl(
        sensitivities_from, {"source_model": str(Path(model_dir).resolve()),
                             "seed": int(seed), **measured})
    model, rot_meta, extra_files = _load(model_dir, device, rotate, rotate_kind, seed,
                                         rotate_online, rotate_from, saved)
    windows = windows.to(next(model.parameters()).device)
    notes = []  # said after the reuse checks: a refusal is the one line on stderr
    names = select_layers(model, include, lad, export_target, notes.append, exclude)
    units = fused_units(names) if tie else [(n,) for n in names]
    if earlier is not None:
        sens = _reuse_sensitivities(sensitivities_from, earlier, units, rot_meta)
    for note in notes:
        _note(note)
    if earlier is None:
        sens = kl_sensitivities(model, units, windows, lad.low.fmt, weights_only, batch_size,
                                progress)
    shapes = _shapes(model, names)
    formats = greedy_promote(units, sens, shapes, lad, target, weighting, weights_only)
    acts = {n: (None if weights_only else f) for n, f in formats.items()}
    achieved = average_bits_of(formats, acts, shapes)
    meta = {"method": "kl", "ladder": lad.name, "target_bits": target, "seed": int(seed),
            "baseline": {"weighting": weighting, **measured,
                         # what was asked: a short text records fewer "samples", and a
                         # rerun asking the same is the same baseline (--fuse-kl keeps it)
                         "samples_requested": int(samples),
                         # the layer selection asked for (the layers chosen are `layers`)
                         "include": None if include is None else list(include),
                         "exclude": list(exclude or ()),
                         "sensitivity": {"+".join(u): s for u, s in
                                         sorted(sens.items(), key=lambda kv: -kv[1])},
                         **({} if sensitivities_from is None else
                            {"sensitivities_from": str(sensitivities_from)})},
            "wall_time_s": round(time.time() - t0, 3), **rot_meta}
    outdir.write_out(out, model, formats, acts, model_dir, meta, force, extra_files=extra_files)
    return {"out": str(out), "formats": formats, "avg_bits": achieved, "target_bits": target,
            "sensitivity": sens, "wall_time_s": meta["wall_time_s"]}


def _earlier_kl(out, expect: dict) -> dict:
    """The manifest of the KL OUT ``--sensitivities-from`` names (its seal checked), after
    checking the settings its sensitivities were measured under equal ``expect``."""
    from dmx.outdir import read_manifest
    flag = f"--sensitivities-from {out}"
    m = read_manifest(out)
    if m["method"] != "kl":
        raise DMXError(f"{flag}: a {m['method']} OUT has no sensitivities; pass an OUT of "
                       f"`dmx baseline --method kl`")
    recorded = {"source_model": m["source_model"], "seed": m["seed"], **m["baseline"]}
    # the same files, however the two command lines spelled their paths
    same_files = {"calib": lambda files: [str(Path(f).resolve()) for f in files or ()]}
    for key, want in expect.items():
        norm = same_files.get(key, lambda v: v)
        if norm(recorded.get(key)) != norm(want):
            raise DMXError(f"{flag}: its sensitivities were measured with {key} "
                           f"{recorded.get(key)!r}, this run has {want!r}; rerun without "
                           f"--sensitivities-from or match it")
    return m


def _reuse_sensitivities(out, earlier: dict, units, rot_meta: dict) -> dict:
    """{unit: kl} recorded in ``earlier`` (a KL OUT's manifest), for exactly ``units`` on
    the same rotated model."""
    flag = f"--sensitivities-from {out}"
    if earlier.get("rotation") != rot_meta.get("rotation"):
        raise DMXError(f"{flag}: its model was rotated otherwise ({earlier.get('rotation')}"
                       f" vs {rot_meta.get('rotation')}); pass the same --rotate/--rotate-from")
    recorded = earlier["baseline"]["sensitivity"]
    keys = {"+".join(u) for u in units}
    if set(recorded) != keys:
        diff = sorted(set(recorded) ^ keys)
        raise DMXError(f"{flag}: it scored other units ({len(diff)} differ, e.g. {diff[0]}); "
                       f"pass the same --include and --export-target")
    print(f"dmx baseline kl: {len(units)} sensitivities reused from {out} (no forward "
          f"passes)", file=sys.stderr)
    return {u: float(recorded["+".join(u)]) for u in units}


# ----------------------------------------------------------------------------- CLI
def add_baseline_parser(subparsers):
    p = subparsers.add_parser(
        "baseline", help="uniform or KL-selection baseline, written as an OUT directory",
        description="Baselines for dMX (paper 2.7). --method uniform: every linear in "
                    "--format. --method kl: score each layer (fused q/k/v and gate/up as one "
                    "with --tie-fused) "
                    "by the KL divergence of next-token distributions when it alone is in the "
                    "ladder's low format, then give the high format to the most sensitive "
                    "layers while the average bits stay <= --target-bits.")
    p.add_argument("--model", required=True, help="local Hugging Face causal-LM directory, or a "
                   ".gguf file (converted once to a cached float32 directory)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--format", metavar="FMT",
                   help="uniform: the format (fp4_e2m1, fp6_e2m3, fp6_e3m2, fp8_e4m3, fp8_e5m2)")
    p.add_argument("--target-bits", type=float,
                   help="kl: average element bits to meet (MXFP4 = 4, MXFP8 = 8)")
    p.add_argument("--ladder", default="fp8-fp4",
                   help="kl: formats a layer can take: fp8-fp4 (default), fp6-fp4, fp8-fp6-fp4")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="simple",
                   help="kl: average the budget uses: simple (per layer, default) or size")
    p.add_argument("--calib", nargs="+", metavar="FILE",
                   help="kl: calibration text file(s) (default: the embedded wiki.valid.raw)")
    p.add_argument("--samples", type=int, default=16, help="kl: calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="kl: tokens per window (default 2048, capped by the model's positions)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration windows (kl) and of --rotate random")
    p.add_argument("--batch-size", type=int, default=4, help="kl: windows per forward")
    p.add_argument("--weights-only", action="store_true", help="leave the inputs unquantized")
    p.add_argument("--include", action="append", metavar="REGEX",
                   help="quantize only linears whose name matches (repeatable)")
    p.add_argument("--export-target", choices=EXPORT_TARGETS, default="any",
                   help="leave out the layers this target cannot hold, as dmx search does "
                        "(any = the layers compressed-tensors and gguf both accept, default; "
                        "units stay untied, see --tie-fused; none = no check)")
    p.add_argument("--tie-fused", action=argparse.BooleanOptionalAction, default=None,
                   help="kl: score and promote q/k/v and gate/up of a block as one unit, as "
                        "vLLM serves them (default: as dmx search, off, on with "
                        "--export-target compressed-tensors or quark)")
    p.add_argument("--rotate", choices=ROTATIONS, default="none",
                   help="fold fixed rotations into the weights first, as dmx search --rotate "
                        "does: none (default), hadamard or random (seeded by --seed); see "
                        "docs/rotations.md")
    p.add_argument("--rotate-from", metavar="OUT", default=None,
                   help="fold the learned rotations of a dmx search --rotate learned OUT "
                        "into the weights first, so a baseline and that search share one "
                        "rotated model")
    p.add_argument("--rotate-kind", default="auto",
                   help="the Hadamard of --rotate hadamard: auto (default), block, kron, "
                        "random")
    p.add_argument("--rotate-online", action="append", metavar="R4", default=None,
                   help="r4: also a Hadamard on down_proj's input, folded into its weight "
                        "and applied at run time; only dmx eval applies it, so such an OUT "
                        "cannot be exported (docs/rotations.md)")
    p.add_argument("--sensitivities-from", metavar="KL_OUT", default=None,
                   help="kl: reuse the sensitivities an earlier KL OUT measured under the "
                        "same settings (another --target-bits: a budget sweep measures once)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from dmx.threads import add_threads_arg
    add_threads_arg(p)
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    p.set_defaults(func=run_baseline)
    return p


def run_baseline(args) -> int:
    from collections import Counter

    from dmx.threads import apply_threads
    apply_threads(args)
    if args.method == "uniform":
        if not args.format:
            raise DMXError("--method uniform needs --format FMT (e.g. fp4_e2m1 or fp8_e4m3)")
        if args.target_bits is not None:
            raise DMXError("--target-bits goes with --method kl; uniform has its format's bits")
        if args.tie_fused is not None:
            raise DMXError("--tie-fused goes with --method kl; uniform gives every layer "
                           "one format")
        if args.sensitivities_from is not None:
            raise DMXError("--sensitivities-from goes with --method kl; uniform measures "
                           "nothing")
        res = uniform_baseline(args.model, args.format, args.out, args.weights_only,
                               args.include, args.device, args.force, args.rotate,
                               args.rotate_kind, args.seed, args.rotate_online,
                               args.export_target, args.rotate_from)
    else:
        if args.target_bits is None:
            raise DMXError("--method kl needs --target-bits B (average element bits)")
        if args.format:
            raise DMXError("--format goes with --method uniform; kl picks from --ladder")
        res = kl_baseline(args.model, args.target_bits, args.out, args.ladder, args.weighting,
                          args.calib, args.samples, args.seqlen, args.seed, args.weights_only,
                          args.include, args.batch_size, args.device, args.force,
                          progress=not args.no_progress, rotate=args.rotate,
                          rotate_kind=args.rotate_kind, rotate_online=args.rotate_online,
                          export_target=args.export_target, tie_fused=args.tie_fused,
                          rotate_from=args.rotate_from,
                          sensitivities_from=args.sensitivities_from)
    counts = Counter(res["formats"].values())
    mix = ", ".join(f"{n} x {fmt}" for fmt, n in sorted(counts.items()))
    b = res["avg_bits"]
    target = f", target {res['target_bits']:g}" if res.get("target_bits") is not None else ""
    print(f"dmx baseline {args.method}: {len(res['formats'])} layers -> {mix}")
    print(f"dmx baseline {args.method}: average bits {b['simple']:.3f} (size-weighted "
          f"{b['size_weighted']:.3f}){target}")
    print(f"dmx baseline {args.method}: wrote {res['out']} in {res['wall_time_s']:.1f} s")
    return 0
