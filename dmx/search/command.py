"""`dmx search`: learn a per-layer MX format assignment for a causal LM under a bit budget.

    dmx search --model DIR --target-bits 6.0 -o OUT [--recipe default|paper]

Every setting that changes the result is one :class:`dmx.search.recipe.SearchConfig` (a named
recipe plus the flags given), written whole into the manifest. Loads the model (weights
frozen), wraps the linears the export target can hold in DMXLinear, learns the float32
offsets (dmx.search.train), puts every layer on a rung (the raw hard assignment), repairs the
budget (dmx.search.assign: fit, then the optional fill, reported separately) and writes OUT
through dmx.outdir.write.write_out with ``search_log.jsonl`` (one line per step: loss, penalty,
soft and hard bits, temperature, every offset). Checkpoints go to OUT.partial/; Ctrl-C
saves one and prints the ``--resume`` command.

Rotations (``--rotate``, docs/rotations.md): ``hadamard`` folds fixed R1/R2 into the
weights before wrap_model; ``learned`` parametrizes R1/R2 on the wrapped model
(dmx.rotate.LearnedRotations), trains them with the offsets (dmx.search.train) and folds them
right after the last step, so the hard assignment, the repair and OUT see plain rotated
weights. The manifest's ``rotation`` records what was done; an untied lm_head gets its
config.json (``tie_word_embeddings: false``).

Scale-out: under ``torchrun`` the search is data parallel (dmx.search.distributed: ``--batch-size``
is the global batch, split over the processes; rank 0 writes checkpoints and OUT);
``--device-map auto`` spreads one model over the GPUs of one process (accelerate).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from dmx.errors import DMXError
from dmx.outdir.layout import SEARCH_LOG_NAME
from dmx.search.recipe import RECIPES, SearchConfig

__all__ = ["add_search_parser", "run_search", "search", "search_seeds", "seed_out_dir",
           "END_EVAL_WINDOWS"]

END_EVAL_WINDOWS = 4  # calibration windows scored with the soft, raw-hard and repaired model


# ----------------------------------------------------------------------------- config
def make_config(config, recipe: str = "default", **settings) -> SearchConfig:
    """A SearchConfig from a SearchConfig (+ changes) or a target (+ recipe + settings)."""
    if isinstance(config, SearchConfig):
        changes = {k: v for k, v in settings.items() if v is not None}
        if not changes:
            return config.checked()
        return SearchConfig.from_recipe(config.recipe, **{**dataclasses.asdict(config),
                                                          **changes})
    return SearchConfig.from_recipe(recipe, target_bits=config, **settings)


def _check_paths(model_dir, cfg: SearchConfig, out, force, resume, ckpt_dir):
    if not Path(model_dir).is_dir():
        raise DMXError(f"--model {model_dir}: no such directory; pass a local Hugging Face "
                       f"model directory or a .gguf file")
    from dmx.data import check_text_files
    check_text_files("--calib", cfg.calib)
    from dmx.outdir.write import check_new_out, refuse_inside
    # OUT (and its OUT.partial) inside the model directory: check_new_out refuses only an
    # existing path inside an input, so the first run wrote into the model directory and
    # the same command with --force was then refused ("is part of the input")
    refuse_inside("-o/--out", out, [model_dir])
    check_new_out(out, force, [model_dir, *(cfg.calib or ())])
    if ckpt_dir is not None:
        _check_checkpoint_dir(Path(ckpt_dir), out, model_dir)
    # a ladder rung the export target cannot store: refused here, before the model loads
    # (select_layers says the same, but only after the weights and the text were read)
    from dmx.export.plan import plan_for_target
    plan_for_target({"probe": (32, 32)}, cfg.ladder, cfg.export_target)  # one 32-wide layer
    has_ckpt = ckpt_dir is not None and (Path(ckpt_dir) / "checkpoint.pt").is_file()
    if has_ckpt and not resume and not force:
        raise DMXError(f"an interrupted search left a checkpoint in {ckpt_dir}; add --resume "
                       f"to continue it or --force to start over")


def _check_checkpoint_dir(ckpt_dir: Path, out, model_dir) -> None:
    """Before the model loads: where the checkpoints go must be a directory of its own.
    Without this, --checkpoint-dir equal to -o trained to the end and then failed ("OUT
    already exists") with OUT blocked by the checkpoint, and a file in the way failed at
    the first save with "[Errno 17] File exists" (exit 1)."""
    from dmx.outdir.write import dirs_to_make, is_inside
    from dmx.search.checkpoint import default_checkpoint_dir

    if is_inside(ckpt_dir, out):
        raise DMXError(f"--checkpoint-dir {ckpt_dir} is -o/--out {out} or inside it: OUT is "
                       f"written whole when the search ends; put the checkpoints elsewhere "
                       f"(default: {default_checkpoint_dir(out)})")
    if is_inside(ckpt_dir, model_dir):
        raise DMXError(f"--checkpoint-dir {ckpt_dir} is inside the input directory "
                       f"{model_dir} (the model); put the checkpoints elsewhere")
    dirs_to_make(ckpt_dir, f"--checkpoint-dir {ckpt_dir}",
                 "remove it or pass another --checkpoint-dir")


def _resolve_data(cfg: SearchConfig, model_dir, say) -> SearchConfig:
    """Absolute calibration paths, the default sample count, --seqlen capped at the
    model's positions (with a note): what the manifest and checkpoints record."""
    from dmx import data

    model_config = data.check_causal_lm_dir(model_dir)
    if cfg.rotate != "none" or cfg.rotate_online:  # before the weights load
        from dmx.rotate.fold import check_model_type
        check_model_type(model_config.get("model_type"))
    calib = cfg.calib or (str(data.default_calibration_file()),)
    if not cfg.calib and not Path(calib[0]).is_file():
        raise DMXError(f"the embedded calibration text {calib[0]} is missing; pass --calib FILE")
    changes = {"calib": tuple(str(Path(f).resolve()) for f in calib)}
    seqlen = data.cap_seqlen(cfg.seqlen, model_config.get("max_position_embeddings"), say)
    if seqlen != cfg.seqlen:
        changes["seqlen"] = seqlen
    if cfg.samples is None:
        changes["samples"] = cfg.steps * cfg.batch_size  # one epoch, as the reference
    return cfg.replace(**changes)


def _resume_command(cfg: SearchConfig, model_dir, out, ckpt_dir, explicit_ckpt_dir: bool,
                    run_flags: dict) -> str:
    """The command line that continues this search (printed on Ctrl-C): the recipe plus
    every setting that differs from it, plus where it ran."""
    flags = ["dmx", "search", "--model", str(model_dir), "--target-bits",
             repr(cfg.target_bits), "--recipe", cfg.recipe]
    base = SearchConfig.from_recipe(cfg.recipe, target_bits=cfg.target_bits)
    for f in dataclasses.fields(SearchConfig):
        value, default = getattr(cfg, f.name), getattr(base, f.name)
        if f.name in ("target_bits", "recipe") or value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            if f.name == "calib":
                flags += [flag, *value]
            else:
                for v in value:
                    flags += [flag, v]
        elif value is not None:
            flags += [flag, str(value)]
    for flag, value in run_flags.items():
        if isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        elif value not in (None, False):
            flags += [flag] if value is True else [flag, str(value)]
    if explicit_ckpt_dir:
        flags += ["--checkpoint-dir", str(ckpt_dir)]
    flags += ["--resume", "-o", str(out)]
    return shlex.join(flags)


# ----------------------------------------------------------------------------- search
def search(model_dir, config, *, out=None, force: bool = False, resume: bool = False,
           progress: bool = True, callback=None, device: str = "cpu", device_map=None,
           checkpoint_dir=None, checkpoint_every: int = 50,
           gradient_checkpointing: bool = False, recipe: str = "default", say=None,
           **settings) -> dict:
    """Run a dMX search and write OUT; returns a summary dict (formats, achieved bits, ...).

    ``config``: a :class:`SearchConfig`, or the target bits (then ``recipe`` and any
    SearchConfig field as keyword ``settings`` build one). The other arguments say where
    and how it runs, not what it finds: ``callback(step, record)`` after every step;
    ``device_map`` ("auto", ...) places the model with accelerate over the GPUs;
    ``gradient_checkpointing`` recomputes each decoder block in backward (same
    gradients). Raises DMXError on bad input and :class:`dmx.search.train.SearchInterrupted`
    on Ctrl-C (after saving a checkpoint). Under torchrun (``WORLD_SIZE`` > 1) every
    process runs its share of each step's ``batch_size`` windows and only rank 0 writes.
    """
    t0 = time.time()
    say = say or (lambda msg: print(f"dmx search: {msg}", file=sys.stderr))
    cfg = make_config(config, recipe, **settings)
    if int(checkpoint_every) != checkpoint_every or checkpoint_every < 0:
        raise DMXError(f"--checkpoint-every must be >= 0 (0 = only on Ctrl-C), got "
                       f"{checkpoint_every!r}")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise DMXError(f"--device must be cpu or cuda, got {device!r}")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DMXError("--device cuda: no CUDA device is available; use --device cpu")
    from dmx.search import distributed
    dctx = distributed.setup(device, batch_size=cfg.batch_size, device_map=device_map)
    device = dctx.device  # cuda:LOCAL_RANK under torchrun
    if not dctx.is_main:
        say = lambda msg: None  # noqa: E731  rank 0 speaks
    from dmx.search.checkpoint import (check_same_config, default_checkpoint_dir, load_checkpoint,
                                save_checkpoint)

    if out is None:
        raise DMXError("-o/--out is required: the directory to write the searched model to")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    distributed.agree(dctx, _check_paths, model_dir, cfg, out, force, resume, ckpt_dir)
    cfg = distributed.agree(dctx, _resolve_data, cfg, model_dir, say)
    if dctx.is_main and force and not resume and (ckpt_dir / "checkpoint.pt").is_file():
        (ckpt_dir / "checkpoint.pt").unlink()  # --force without --resume: start over

    import torch

    from dmx import data
    from dmx.search.baseline import select_layers
    from dmx.nn.layers import hard_assignment, wrap_model
    from dmx.quant.ladders import get_ladder
    from dmx.nn.bits import average_bits
    from dmx.search.train import train_offsets

    lad = get_ladder(cfg.ladder)
    checked = {"model": str(Path(model_dir).resolve()), **cfg.to_dict()}
    resume_state = None
    if resume:
        resume_state = distributed.on_main(dctx, load_checkpoint, ckpt_dir, broadcast=True)
        check_same_config(resume_state["config"], checked, ckpt_dir / "checkpoint.pt")

    model, tokenizer = distributed.agree(dctx, data.load_model_and_tokenizer, model_dir,
                                         device=device, device_map=device_map)
    windows = distributed.agree(dctx, data.calibration_windows, tokenizer, list(cfg.calib),
                                cfg.seqlen, cfg.samples, cfg.seed)  # the same on every rank
    windows = windows.to(model.device)
    for p in model.parameters():
        p.requires_grad_(False)  # only the offsets learn
    model.eval()  # no dropout; wrap_model's DMXLinears are switched to train mode by the loop
    rotation = None  # the RotationInfo once the rotations are in the weights
    if cfg.rotate == "hadamard":  # fixed: folded before anything is wrapped
        from dmx.rotate import rotate_model
        rotation = distributed.agree(dctx, rotate_model, model, "hadamard", seed=cfg.seed,
                                     kind=cfg.rotate_kind)
    if cfg.rotate_online:  # R4: folded into down_proj, its input rotated at run time
        from dmx.rotate import rotate_online
        rotation = distributed.agree(dctx, rotate_online, model, cfg.rotate_online,
                                     rotation, kind=cfg.rotate_kind, seed=cfg.seed)
    names = distributed.agree(dctx, select_layers, model, cfg.include, lad, cfg.export_target,
                              say, cfg.exclude)
    start = "low"
    if cfg.init == "target":  # where the soft average equals the target at the first T
        from dmx.search.assign import offset_for_bits
        start = offset_for_bits(lad, cfg.target_bits, cfg.t_start)
    layers = distributed.agree(dctx, wrap_model, model, lad, include=cfg.include,
                               quantize_activations=not cfg.weights_only, init=start,
                               tie_fused=cfg.tie_fused, parameterization=cfg.parameterization,
                               names=set(names))
    distributed.pin_layer_devices(layers)  # Triton launches on the current GPU
    learned = None
    if cfg.rotate == "learned":  # after wrap_model: a parametrized Linear is not wrapped
        from dmx.rotate import LearnedRotations
        learned = distributed.agree(dctx, LearnedRotations, model, init="hadamard",
                                    seed=cfg.seed, kind=cfg.rotate_kind, lr=cfg.rotation_lr)
    if gradient_checkpointing:
        from dmx.search.train import checkpoint_blocks
        checkpoint_blocks(model)

    elapsed_before = float(resume_state.get("elapsed_s", 0.0)) if resume_state else 0.0
    run_start = time.time()

    def save(state):
        elapsed = elapsed_before + time.time() - run_start
        return save_checkpoint(ckpt_dir, {**state, "config": checked, "elapsed_s": elapsed})

    log = train_offsets(model, layers, windows, cfg, resume_state=resume_state,
                        save=save if dctx.is_main else None, callback=callback,
                        progress=progress and dctx.is_main, dist=dctx,
                        checkpoint_every=int(checkpoint_every), rotations=learned)
    train_s = elapsed_before + time.time() - run_start
    if learned is not None:  # everything below sees plain rotated weights, as OUT will
        orthogonality = learned.orthogonality_error()
        learned_matrices = learned.matrices()  # kept in OUT: dmx baseline --rotate-from
        from dmx.rotate.online import carry_online
        rotation = carry_online(learned.fold(), rotation)  # R4 (if any) stays recorded
    end_windows = windows[:END_EVAL_WINDOWS]
    end_ppl = {"windows": int(end_windows.shape[0]), "seqlen": cfg.seqlen,
               "soft": _calib_ppl(model, end_windows)}  # the soft model at the final T
    final_offsets = None
    if cfg.average_last > 0:  # the assignment from the mean of the last steps' offsets
        final_offsets = {n: float(layer.raw_offset().detach()) for n, layer in layers.items()}
        set_mean_offsets(model, log, cfg.average_last, lad)
    # the offsets the assignment is made from, before anything below moves a unit to a rung
    trained = {n: float(layer.raw_offset().detach()) for n, layer in layers.items()}

    for layer in layers.values():
        layer.hard = True  # deploy: every layer on its rung, bit-exact fake quantization
        layer.eval()
    raw_formats = hard_assignment(model)
    with torch.no_grad():
        raw_bits = {"simple": float(average_bits(layers, "simple")),
                    "size_weighted": float(average_bits(layers, "size"))}
    end_ppl["hard_raw"] = _calib_ppl(model, end_windows)
    from dmx.search.assign import repair_layers

    # the anneal can end the hard choice under (or a step over) the budget: fit, then fill
    repair = repair_layers(layers, lad, cfg.target_bits, cfg.weighting, fill=cfg.fill_budget)
    formats = hard_assignment(model)
    end_ppl["hard_repaired"] = (end_ppl["hard_raw"] if formats == raw_formats
                                else _calib_ppl(model, end_windows))
    act_formats = {n: (formats[n] if layers[n].quantize_input else None) for n in formats}
    with torch.no_grad():
        achieved = {"simple": float(average_bits(layers, "simple")),
                    "size_weighted": float(average_bits(layers, "size"))}
    summary = _log_summary(log)
    meta = {"method": "dmx", "ladder": lad.name, "target_bits": cfg.target_bits,
            "seed": cfg.seed, "wall_time_s": round(elapsed_before + time.time() - t0, 3),
            "search": {"config": cfg.to_dict(), "train_seconds": round(train_s, 3),
                       "raw_bits": raw_bits, "achieved_bits": achieved,
                       "budget_repair": repair, "end_ppl": end_ppl,
                       "raw_formats_differ": sorted(n for n in formats
                                                    if formats[n] != raw_formats[n]),
                       **summary}}
    extra_files = {}
    if rotation is not None:
        from dmx.rotate import out_config_files
        meta["rotation"] = rotation.to_manifest()
        if learned is not None:  # max |R R^T - I| of the float32 matrices before the fold
            meta["rotation"]["orthogonality_error"] = orthogonality
        extra_files = out_config_files(model_dir, rotation)  # lm_head untied: config.json
        if learned is not None:
            from dmx.rotate.saved import ROTATIONS_NAME, rotations_bytes
            extra_files[ROTATIONS_NAME] = rotations_bytes(learned_matrices)
    log_text = _search_log_lines(cfg, layers, log, trained, raw_formats, formats, raw_bits,
                                 achieved, repair, end_ppl, meta.get("rotation"),
                                 final_offsets)
    from dmx import outdir
    distributed.on_main(dctx, outdir.write_out, out, model, formats, act_formats, model_dir, meta,
                        force, extra_files={SEARCH_LOG_NAME: log_text, **extra_files})
    if not dctx.is_main:
        pass  # rank 0 wrote OUT and removes the checkpoint
    elif checkpoint_dir is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the search is done: OUT replaces it
    else:
        (ckpt_dir / "checkpoint.pt").unlink(missing_ok=True)
    return {"out": str(out), "config": cfg, "formats": formats, "raw_formats": raw_formats,
            "act_formats": act_formats, "achieved_bits": achieved, "raw_bits": raw_bits,
            "target_bits": cfg.target_bits, "ladder": lad.name, "log": log,
            "offsets": trained, "end_ppl": end_ppl, "train_seconds": train_s,
            "wall_seconds": time.time() - t0, "model": model, "budget_repair": repair,
            "rotation": meta.get("rotation"), **summary}


def seed_out_dir(out, seed: int) -> Path:
    """Where ``dmx search --seeds`` keeps the search of one seed: ``OUT.seeds/seed-<s>``, a
    sibling of OUT (as OUT.partial), so OUT stays one plain OUT."""
    out = Path(out)
    return out.with_name(out.name + ".seeds") / f"seed-{int(seed)}"


def _kept_seed_out(seed_out: Path, model_dir, cfg: SearchConfig) -> bool:
    """True when ``seed_out`` already holds this very search (same model, every setting
    equal: a rerun would find the same); False when there is nothing there yet. A
    different search there is refused: --force reruns it."""
    from dmx.outdir import read_manifest
    from dmx.outdir.layout import MANIFEST_NAME
    from dmx.search.recipe import config_from_dict

    if not (seed_out / MANIFEST_NAME).is_file():
        return False
    m = read_manifest(seed_out)  # sealed: what it holds is what the search wrote
    theirs = (m.get("search") or {}).get("config")
    same_model = Path(m["source_model"]).resolve() == Path(model_dir).resolve()
    if m["method"] == "dmx" and theirs and same_model and config_from_dict(theirs) == cfg:
        return True
    raise DMXError(f"{seed_out} holds another search (other model or settings); pass "
                   f"--force to rerun seed {cfg.seed} there, or choose another -o")


# --fuse-kl's KL baselines: calibration windows each. 4, what every fusion in BENCHMARKS.md
# was measured with; 16 (a KL baseline's own default) fused no better on SmolLM2-135M
# (seeds 0-1, ties at every budget on both texts) and takes 3x the time
# (BENCHMARKS.md, "KL on 16 windows")
FUSE_KL_SAMPLES = 4


def search_seeds(model_dir, config, seeds, *, out=None, force: bool = False,
                 resume: bool = False, progress: bool = True, device: str = "cpu",
                 checkpoint_dir=None, checkpoint_every: int = 50,
                 gradient_checkpointing: bool = False, recipe: str = "default", say=None,
                 report=None, jobs: int = 1, threads: int | None = None,
                 fuse_kl: bool = False, kl_samples: int = FUSE_KL_SAMPLES, **settings) -> dict:
    """``dmx search --seeds``: the search once per seed into ``OUT.seeds/seed-<s>``
    (:func:`seed_out_dir`), then their offsets combined into OUT (dmx.search.combine:
    mean offset, nearest rung, budget repair by the mean). A seed whose OUT already holds
    the same search is kept, so rerunning an interrupted command continues it (a seed
    interrupted mid-way continues from its checkpoint with --resume). ``report(seed,
    result)`` after each seed searched (not after one kept). ``jobs`` > 1 runs that many
    seeds at a time, each in a process of its own with ``threads`` CPU threads (default:
    the cores shared out), by dmx.search.seed_pool. ``fuse_kl``: then one KL baseline per
    seed (calibration seed = the search's, ``kl_samples`` windows of the search's text and
    --seqlen, the search's layers and units) into ``OUT.seeds/kl-<s>`` (kept on a rerun when
    it holds the same baseline), and the combination fused with them (`dmx combine --kl`,
    dmx.search.rank_fusion). Returns combine_searches' summary plus ``seed_outs`` (and
    ``kl_outs``)."""
    from dmx.search import distributed
    from dmx.search.checkpoint import CHECKPOINT_NAME, default_checkpoint_dir
    from dmx.search.combine import combine_searches

    say = say or (lambda msg: print(f"dmx search: {msg}", file=sys.stderr))
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds) or len(seeds) < (1 if fuse_kl else 2):
        raise DMXError(f"--seeds needs two or more different seeds (one with --fuse-kl), got "
                       f"{' '.join(map(str, seeds)) or 'none'}")
    if settings.get("seed") is not None:
        raise DMXError("give --seed (one search) or --seeds (several, combined), not both")
    if int(jobs) != jobs or jobs < 1:
        raise DMXError(f"--jobs must be a positive integer, got {jobs!r}")
    if distributed.env_world()[0] > 1:
        raise DMXError("--seeds runs its searches one after another in one process; under "
                       "torchrun run one search per --seed and join them with `dmx combine`")
    if out is None:
        raise DMXError("-o/--out is required: the directory to write the combined model to")
    cfg = make_config(config, recipe, **settings)
    if cfg.rotate != "none" or cfg.rotate_online:  # refused by combine: say it before the work
        raise DMXError("--seeds with --rotate: each seed rotates its own weights, so their "
                       "offsets rank different weights; search with --rotate none")
    _check_paths(model_dir, cfg, out, force, False, None)  # before the first search
    cfg = _resolve_data(cfg, model_dir, say)
    seed_outs = [seed_out_dir(out, s) for s in seeds]
    seed_cfgs = [cfg.replace(seed=s) for s in seeds]
    # every seed's OUT is checked before the first search: a conflict is not found an hour in
    kept = [not force and _kept_seed_out(p, model_dir, c) for p, c in zip(seed_outs, seed_cfgs)]
    for seed, seed_out, done in zip(seeds, seed_outs, kept):
        # a seed's leftover checkpoint without --resume was refused only when that seed's
        # turn came, after the earlier seeds' searches
        ckpt = Path(checkpoint_dir) / f"seed-{seed}" if checkpoint_dir else None
        if not (done or resume or force) and \
                ((ckpt or default_checkpoint_dir(seed_out)) / CHECKPOINT_NAME).is_file():
            raise DMXError(f"an interrupted search of seed {seed} left a checkpoint in "
                           f"{ckpt or default_checkpoint_dir(seed_out)}; add --resume to "
                           f"continue it or --force to start over")
    if fuse_kl:
        if int(kl_samples) != kl_samples or kl_samples < 1:
            raise DMXError(f"--kl-samples must be a positive integer, got {kl_samples!r}")
        kl_outs = [kl_out_dir(out, s) for s in seeds]
        kl_kept = [not force and _kept_kl_out(p, model_dir, c, kl_samples)
                   for p, c in zip(kl_outs, seed_cfgs)]
    seed_outs[0].parent.mkdir(exist_ok=True)
    t0 = time.time()
    tasks = []  # (seed, search() keyword arguments) of the seeds not kept
    for i, (seed, seed_out, seed_cfg) in enumerate(zip(seeds, seed_outs, seed_cfgs)):
        if kept[i]:
            say(f"seed {seed} ({i + 1} of {len(seeds)}): kept {seed_out} (the same search)")
            continue
        # None: search() uses (and removes when done) its default, seed_out's OUT.partial
        ckpt = Path(checkpoint_dir) / f"seed-{seed}" if checkpoint_dir else None
        has_ckpt = ((ckpt or default_checkpoint_dir(seed_out)) / CHECKPOINT_NAME).is_file()
        say(f"seed {seed} ({i + 1} of {len(seeds)}) -> {seed_out}")
        tasks.append((seed, dict(model_dir=model_dir, config=seed_cfg, out=seed_out,
                                 force=force, resume=resume and has_ckpt, device=device,
                                 checkpoint_dir=ckpt, checkpoint_every=checkpoint_every,
                                 gradient_checkpointing=gradient_checkpointing)))
    kl_tasks = []  # (seed, kl_baseline() keyword arguments) of the KL baselines not kept
    for i, seed in enumerate(seeds if fuse_kl else []):
        if kl_kept[i]:
            say(f"KL baseline of seed {seed}: kept {kl_outs[i]} (the same baseline)")
            continue
        kl_tasks.append((seed, dict(model_dir=model_dir, target_bits=cfg.target_bits,
                                    out=kl_outs[i], **_kl_settings(cfg, kl_samples),
                                    seed=seed, device=device, force=True)))
    from dmx.search.baseline import kl_baseline

    def announce_kl(seed: int, kwargs: dict) -> None:
        say(f"KL baseline of seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) -> "
            f"{kwargs['out']}")

    if jobs > 1 and len(tasks) + len(kl_tasks) > 1:
        # the KL baselines share the pool: queued after the searches, they start as soon
        # as a process is free (with one seed, beside its search)
        from dmx.search.seed_pool import run_seed_searches

        n = min(jobs, len(tasks) + len(kl_tasks))
        per_job = threads or max(1, (os.cpu_count() or 1) // n)
        for seed, kwargs in kl_tasks:
            announce_kl(seed, kwargs)
        what = " and ".join(f"{k} {one if k == 1 else many}" for k, one, many in
                            ((len(tasks), "search", "searches"),
                             (len(kl_tasks), "KL baseline", "KL baselines")) if k)
        say(f"{what}, up to {n} at a time (as memory allows), {per_job} CPU thread(s) each")
        run_seed_searches(search, [(s, {**kw, "progress": False}) for s, kw in tasks],
                          jobs, per_job, cfg.steps, progress=progress, report=report, say=say,
                          side_tasks=[(f"KL baseline of seed {s}", kl_baseline,
                                       {**kw, "progress": False}) for s, kw in kl_tasks])
    else:
        for seed, kwargs in tasks:
            result = search(progress=progress, say=say, **kwargs)
            if report:
                report(seed, result)
        for seed, kwargs in kl_tasks:
            announce_kl(seed, kwargs)
            kl_baseline(progress=progress, **kwargs)
    combined = combine_searches(seed_outs, out, fill=None, force=force, device=device,
                                kl=kl_outs if fuse_kl else None)
    return {**combined, "seed_outs": [str(p) for p in seed_outs], "config": cfg,
            "wall_seconds": time.time() - t0,
            **({"kl_outs": [str(p) for p in kl_outs]} if fuse_kl else {})}


def kl_out_dir(out, seed: int) -> Path:
    """Where ``dmx search --seeds --fuse-kl`` keeps the KL baseline of one seed:
    ``OUT.seeds/kl-<s>``, next to the seed's search."""
    return seed_out_dir(out, seed).with_name(f"kl-{int(seed)}")


def _kl_settings(cfg: SearchConfig, samples: int) -> dict:
    """kl_baseline's settings that make it score the search's units on its text."""
    return dict(ladder=cfg.ladder, weighting=cfg.weighting, calib=list(cfg.calib),
                samples=samples, seqlen=cfg.seqlen, weights_only=cfg.weights_only,
                include=cfg.include, exclude=cfg.exclude, export_target=cfg.export_target,
                tie_fused=cfg.tie_fused)


def _kept_kl_out(kl_out: Path, model_dir, cfg: SearchConfig, samples: int) -> bool:
    """True when ``kl_out`` already holds the KL sensitivities --fuse-kl would measure (same
    model, seed and every setting they depend on; its own budget may differ: the fusion
    does not use its assignment); False when there is nothing there yet. Anything else
    there is refused: --force rewrites it."""
    from dmx.outdir import read_manifest
    from dmx.outdir.layout import MANIFEST_NAME

    if not (kl_out / MANIFEST_NAME).is_file():
        return False
    m = read_manifest(kl_out)
    b = m.get("baseline") or {}
    same = (m["method"] == "kl" and m["seed"] == cfg.seed and not m.get("rotation")
            and Path(m["source_model"]).resolve() == Path(model_dir).resolve()
            and m["ladder"] == cfg.ladder  # not the budget: the fusion uses the sensitivities
            and [str(Path(f).resolve()) for f in b.get("calib", [])]
            == [str(Path(f).resolve()) for f in cfg.calib]
            and (b.get("samples_requested", b.get("samples")), b.get("seqlen"),
                 b.get("weights_only"), b.get("export_target"), b.get("tie_fused"),
                 b.get("weighting"))
            == (samples, cfg.seqlen, cfg.weights_only, cfg.export_target, cfg.tie_fused,
                cfg.weighting)
            # the layers: recorded since 2026-12-07 (older baselines: checked by combine)
            and all(b[k] == (None if v is None else list(v)) for k, v in
                    (("include", cfg.include), ("exclude", cfg.exclude)) if k in b))
    if same:
        return True
    raise DMXError(f"{kl_out} holds another KL baseline (other model or settings); pass "
                   f"--force to rerun it, or choose another -o")


def _calib_ppl(model, windows) -> float:
    """Perplexity of the model as it is now on ``windows`` (next-token CE, no grad)."""
    import torch

    from dmx.search.losses import next_token_ce
    from dmx.search.train import forward_logits

    with torch.no_grad():
        ces = [float(next_token_ce(forward_logits(model, w[None]), w[None])) for w in windows]
    return float(math.exp(sum(ces) / len(ces))) if ces else float("nan")


def _log_summary(log: list[dict]) -> dict:
    """Final numbers for the manifest/report."""
    if not log:
        return {"final_loss": None, "final_ce": None}
    last = log[-1]
    return {"final_loss": last["loss"], "final_ce": last["ce"], "final_kl": last["kl"],
            "final_penalty": last["penalty"], "final_soft_bits": last["avg_bits"],
            "final_hard_bits": last["hard_bits"], "steps_run": len(log)}


def _unit_names(layers: dict) -> list[str]:
    """One label per offset Parameter in model order (the fused group for tied layers)."""
    seen, out = set(), []
    for name, layer in layers.items():
        if id(layer.offset) not in seen:
            seen.add(id(layer.offset))
            out.append(layer.fused_group or name)
    return out


def set_mean_offsets(model, log: list, fraction: float, ladder) -> None:
    """--average-last: set every offset Parameter so that its b_hat is its mean over the
    last steps of ``log`` (dmx.search.assign.mean_of_last_steps). The step records list the
    b_hat of each Parameter in model order (dmx.search.train); the mean is >= 0, so the
    same value serves both parameterizations (abs(m) = m, clamp(m) = m)."""
    import torch

    from dmx.nn.layers import dmx_parameters
    from dmx.search.assign import mean_of_last_steps

    params = dmx_parameters(model)   # the order of the step records (dmx.search.train)
    steps = [rec["offsets"] for rec in log if "offsets" in rec]
    if len(steps) != len(log) or any(len(o) != len(params) for o in steps):
        raise DMXError("--average-last: the search's step records do not hold every "
                       "offset; rerun the search without --resume")
    with torch.no_grad():
        for p, mean in zip(params, mean_of_last_steps(steps, fraction, ladder)):
            p.fill_(mean)


def _search_log_lines(cfg, layers, log, trained, raw_formats, formats, raw_bits, achieved,
                      repair, end_ppl, rotation=None, final_offsets=None) -> str:
    """search_log.jsonl: a header (config, unit names), one line per step, a final line
    (``offsets``: what the assignment was made from; with --average-last also
    ``final_offsets``, the last step's)."""
    lines = [{"type": "header", "config": cfg.to_dict(), "units": _unit_names(layers)}]
    lines += [{"type": "step", **rec} for rec in log]
    final = {"type": "final", "offsets": trained, "raw_formats": raw_formats,
             "formats": formats, "raw_bits": raw_bits, "achieved_bits": achieved,
             "budget_repair": repair, "end_ppl": end_ppl, "rotation": rotation}
    if final_offsets is not None:
        final["final_offsets"] = final_offsets
    lines.append(final)
    return "".join(json.dumps(line, allow_nan=False) + "\n" for line in lines)


# ----------------------------------------------------------------------------- CLI
_HELP = {
    "ladder": "formats a layer can take: fp8-fp4 (default), fp6-fp4, fp8-fp6-fp4",
    "weights_only": "quantize weights only (inputs stay full precision)",
    "include": "quantize only linears whose name matches this regex (repeatable; default: "
               "all but lm_head and embeddings)",
    "exclude": "never quantize linears whose name matches this regex (repeatable)",
    "export_target": "before the first step, leave out the layers this target cannot hold "
                     "(any = the layers compressed-tensors and gguf both accept; it does not tie "
                     "q/k/v and gate/up, which vLLM needs: plan a vLLM export with "
                     "compressed-tensors, which ties them, or export with --allow-unfused; "
                     "quark holds no MXFP8 weights, so plan a Quark export with quark; none = "
                     "no check)",
    "tie_fused": "q/k/v and gate/up share one offset, as vLLM serves them (default: off, "
                 "on with --export-target compressed-tensors or quark; tying cost quality "
                 "on SmolLM2-135M, docs/dmx_search_cli.md)",
    "calib": "calibration text file(s) (default: the embedded wiki.valid.raw)",
    "seqlen": "tokens per calibration window (default 2048, capped at the model's positions)",
    "samples": "calibration windows (default: steps x batch size, capped by the text)",
    "steps": "optimization steps (default 400)",
    "batch_size": "windows per step (default 8)",
    "seed": "seed of the calibration windows and batch order (default 0)",
    "distill": "add the KL divergence to the unquantized model's predictions (default "
               "recipe on; paper off)",
    "ce": "the next-token cross-entropy in the loss (default on; --no-ce --distill: the KL "
          "to the unquantized model alone)",
    "attn_distill": "weight of the KL between the unquantized and the quantized model's "
                    "attention probabilities in the loss (default 0: off; an experiment, "
                    "BENCHMARKS.md)",
    "weighting": "average the budget uses: simple (per layer, default) or size (per weight)",
    "budget": "how the budget is held: bound (after each step: over the target, shrink all "
              "offsets by one amount times their share; under the --ramp floor, stretch "
              "the step; default recipe), project (shift all offsets by one amount into "
              "[floor, target]) or hinge (the paper's lam*max(0, avg-target))",
    "ramp": "--budget bound/project: the floor of the soft average rises from the low rung to the "
            "target over this fraction of the steps (default 0.5; 0 = at the target always)",
    "budget_average": "--budget bound: the average held at the target, soft (the anneal map's, "
                      "default) or hard (the rungs the offsets deploy with; the ramp's floor "
                      "stays soft; an experiment, BENCHMARKS.md)",
    "max_stretch": "--budget bound: under the ramp's floor, this step's move is stretched up "
                   "to this factor (default 8), then what is missing is a common shift",
    "lam": "slope of the hinge penalty (--budget hinge; paper 5)",
    "parameterization": "offset map: abs (the reference's |.|; default recipe) or clamp",
    "init": "where the offsets start: low (the low rung; default recipe and the reference) "
            "or target (soft average at the target)",
    "offset_margin": "--budget bound/project keep offsets within the ladder +- this "
                     "(default 0.5)",
    "lr": "SGD learning rate of the offsets (default and paper 1.0 with clipping; "
          "project 0.02 with normalized gradients)",
    "momentum": "SGD momentum (default recipe and paper 0.99)",
    "nesterov": "Nesterov momentum (default on)",
    "grad_norm": "clip (L2 norm at --max-grad-norm; default and paper), normalize (the "
                 "gradient scaled to RMS 1 per offset) or none",
    "max_grad_norm": "L2 norm for --grad-norm clip (default 1.0)",
    "precondition": "slope: before the anneal, divide each offset's gradient by the anneal "
                    "map's slope there (relative to the low rung), so layers that rose early "
                    "do not get a larger gradient for it; tangent: with --budget bound, while the "
                    "soft average sits at the target, remove from the gradient its common "
                    "part along the budget (what the bound's shrink takes back each step), "
                    "so the momentum carries only which layers gain bits against which lose "
                    "them (an experiment, BENCHMARKS.md); none: the plain gradient (paper)",
    "error_signs": "random: every step, each offset's layers apply their quantization errors "
                   "with a random sign (Q(v) or v - (Q(v) - v)), so the cross terms between "
                   "layers' errors average out of the gradient (an experiment, BENCHMARKS.md); "
                   "fixed: always Q(v) (default, paper)",
    "error_signs_until": "--error-signs random: the fraction of the steps that draw random "
                         "signs, the later ones use Q(v) (default 1.0: all)",
    "explore": "the first F of the steps put each offset's layers at a ladder position "
               "drawn at random every step, the gradient reaching the offset straight "
               "through, so it sums each layer's loss change along the ladder instead of "
               "its slope at the bottom (default 0: off, paper; an experiment, BENCHMARKS.md)",
    "delay": "fraction of steps at the starting temperature (default 0.6)",
    "t_start": "starting anneal temperature, code units (default 0.4)",
    "t_end": "final anneal temperature, code units (default 20)",
    "average_last": "take the assignment from each offset's mean over the last fraction "
                    "of the steps instead of its final value (default recipe 0.5; 0: the "
                    "final offsets, paper; BENCHMARKS.md)",
    "fill_budget": "after the hard assignment, promote the layers nearest to the next rung "
                   "while the average stays <= target (default recipe on, paper off; the "
                   "budget is never exceeded either way)",
    "rotate": "rotations folded into the weights (docs/rotations.md): none (default), "
              "hadamard (fixed R1/R2 before the search) or learned (R1/R2 trained with the "
              "offsets by Cayley SGD from the Hadamard ones, then folded; the authors' runs "
              "used learned)",
    "rotate_kind": "the rotation matrix (--rotate hadamard, and learned's start): auto "
                   "(MX-block-diagonal Hadamard where 32 divides the width; default), "
                   "block, kron (full Hadamard) or random",
    "rotation_lr": "Cayley SGD learning rate of --rotate learned (default 1.5, the "
                   "reference's)",
    "rotate_online": "r4: also a Hadamard on down_proj's input (folded into its weight, "
                     "applied at run time): only dmx eval applies it, so such an OUT cannot "
                     "be exported (docs/rotations.md)",
}


def _add_config_flags(p) -> None:
    """One flag per SearchConfig field; None = take it from the recipe."""
    for f in dataclasses.fields(SearchConfig):
        if f.name in ("target_bits", "recipe"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kw = {"default": None, "help": _HELP[f.name], "dest": f.name}
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "calib":
            p.add_argument(flag, nargs="+", metavar="FILE", **kw)
        elif f.name in ("include", "exclude"):
            p.add_argument(flag, action="append", metavar="REGEX", **kw)
        elif f.name == "rotate_online":
            p.add_argument(flag, action="append", metavar="R4", **kw)
        elif f.name == "samples" or isinstance(default, int):
            p.add_argument(flag, type=int, **kw)
        elif isinstance(default, float):
            p.add_argument(flag, type=float, **kw)
        else:
            p.add_argument(flag, **kw)


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search", help="learn a mixed MX format assignment under a bit budget (dMX)",
        description="Learn one MX format per linear layer so that the average element bits "
                    "meet --target-bits, then write the quantized model to OUT. Settings come "
                    "from --recipe (default, paper, project or target-start); any flag "
                    "overrides the recipe. "
                    "Checkpoints go to OUT.partial/; Ctrl-C saves one (resume with --resume).")
    p.add_argument("--model", required=True, help="local Hugging Face causal-LM directory, or a "
                   ".gguf file (converted once to a cached float32 directory)")
    p.add_argument("--target-bits", type=float, required=True,
                   help="average element bits to reach (MXFP4 = 4, MXFP6 = 6, MXFP8 = 8)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                   help="default (the paper's optimizer from MXFP4 with a bounded budget "
                        "and distillation: stable on small and large models), paper (the "
                        "authors' release: hinge lam 5, SGD lr 1 momentum 0.99, abs() "
                        "offsets, untied, clip 1.0, no fill), project or target-start (earlier "
                        "defaults, for comparison); see docs/dmx_search_cli.md")
    _add_config_flags(p)
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="run the search once per seed (kept in OUT.seeds/seed-<s>) and "
                        "write the combination of their offsets to OUT, as `dmx combine` "
                        "(docs/dmx_search.md, 'Combining seeds'); N times the time. A rerun "
                        "keeps the seeds already done")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="with --seeds or --fuse-kl: run N searches (and KL baselines) at "
                        "a time, each in a process of its own with --threads CPU threads "
                        "(default: the cores shared out); each holds its own copy of the "
                        "model")
    p.add_argument("--fuse-kl", action="store_true",
                   help="also one KL baseline per seed (OUT.seeds/kl-<s>) and write to OUT "
                        "the searches fused with them, as `dmx combine --kl` (the best "
                        "measured on SmolLM2-135M; docs/dmx_search.md); without --seeds: "
                        "one search (--seed) and its KL baseline")
    p.add_argument("--kl-samples", type=int, default=None, metavar="N",
                   help=f"with --fuse-kl: calibration windows per KL baseline (default "
                        f"{FUSE_KL_SAMPLES}: as measured; 16 fused no better on SmolLM2-135M "
                        f"for 3x the time)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--device-map", default=None, choices=("auto", "balanced", "sequential"),
                   help="spread the model over the GPUs with accelerate (for models that do "
                        "not fit one GPU; overrides --device; not with torchrun)")
    from dmx.threads import add_threads_arg
    add_threads_arg(p)
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="steps between checkpoints (default 50; 0 = only on Ctrl-C)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints go (default OUT.partial)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search from its checkpoint")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT / discard an old checkpoint")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder block in backward: less activation memory "
                        "for long --seqlen / large --batch-size, same result, ~1.3x time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    return p


def run_search(args) -> int:
    """The `dmx search` command: 0 done, 2 bad input (one line, no traceback), 130 Ctrl-C."""
    from dmx.search import distributed
    from dmx.search.train import SearchInterrupted

    settings = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(SearchConfig)
                if f.name not in ("target_bits", "recipe")}
    run_flags = {"--device": None if args.device == "cpu" else args.device,
                 "--device-map": args.device_map,
                 "--gradient-checkpointing": args.gradient_checkpointing,
                 "--threads": getattr(args, "threads", None)}
    main = distributed.is_main_process()  # under torchrun only rank 0 prints
    own_group = not distributed.ready()  # a process group started here is ended here
    try:
        from dmx.threads import apply_threads
        apply_threads(args)
        cfg = make_config(args.target_bits, args.recipe, **settings)
        jobs = getattr(args, "jobs", None)
        fuse_kl = getattr(args, "fuse_kl", False)
        if jobs is not None and not (getattr(args, "seeds", None) or fuse_kl):
            raise DMXError("--jobs goes with --seeds or --fuse-kl (several searches or "
                           "baselines at a time); one search uses --threads")
        kl_samples = getattr(args, "kl_samples", None)
        if kl_samples is not None and not fuse_kl:
            raise DMXError("--kl-samples sizes the KL baselines of --fuse-kl; add --fuse-kl")
        if fuse_kl and not getattr(args, "seeds", None):
            # one search fused with one KL baseline: the --seeds machinery with one seed
            seed = 0 if settings["seed"] is None else settings["seed"]  # checked by cfg
            args.seeds, settings["seed"] = [seed], None
            if main:
                print(f"dmx search: --fuse-kl: the search of seed {seed} goes to "
                      f"{seed_out_dir(args.out, seed)}, its KL baseline beside it; OUT is "
                      f"their fusion", file=sys.stderr)
        if getattr(args, "seeds", None):
            if args.device_map:
                raise DMXError("--seeds runs on one device; drop --device-map, or run one "
                               "search per --seed and join them with `dmx combine`")
            run_flags["--seeds"] = list(args.seeds)
            run_flags["--jobs"] = jobs
            run_flags["--fuse-kl"] = fuse_kl
            run_flags["--kl-samples"] = kl_samples
            result = search_seeds(args.model, cfg, args.seeds, out=args.out, force=args.force,
                                  resume=args.resume, device=args.device,
                                  progress=not getattr(args, "no_progress", False),
                                  checkpoint_dir=args.checkpoint_dir,
                                  checkpoint_every=args.checkpoint_every,
                                  gradient_checkpointing=args.gradient_checkpointing,
                                  seed=settings["seed"], report=_print_seed,
                                  jobs=1 if jobs is None else jobs,
                                  threads=getattr(args, "threads", None), fuse_kl=fuse_kl,
                                  kl_samples=FUSE_KL_SAMPLES if kl_samples is None
                                  else kl_samples)
            _print_combined(result)
            return 0
        result = search(args.model, cfg, out=args.out, force=args.force, resume=args.resume,
                        progress=not getattr(args, "no_progress", False), device=args.device,
                        device_map=args.device_map, checkpoint_dir=args.checkpoint_dir,
                        checkpoint_every=args.checkpoint_every,
                        gradient_checkpointing=args.gradient_checkpointing)
    except SearchInterrupted as stop:
        ckpt_dir = stop.checkpoint.parent if hasattr(stop.checkpoint, "parent") else ""
        if "--seeds" in run_flags:  # the whole command again: the seeds done are kept
            ckpt_dir = args.checkpoint_dir
        command = _resume_command(cfg, args.model, args.out, ckpt_dir,
                                  bool(args.checkpoint_dir), run_flags)
        world = distributed.env_world()[0]
        if world > 1:  # any number of processes can resume it (the batch is global)
            command = f"torchrun --standalone --nproc-per-node {world} -m " + command
        print(f"dmx search: {stop}. Continue with:\n  {command}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first step or while OUT was being written
        if main:
            print("dmx search: interrupted; OUT was not written (a checkpoint, if any, is in "
                  f"{args.checkpoint_dir or str(args.out) + '.partial'})", file=sys.stderr)
        return 130
    except DMXError as err:  # rank-aware; the rest goes to dmx.cli's frame (mxref.cliframe)
        from mxref.cliframe import one_line

        # once the process group is up every rank fails with the same message
        # (dmx.search.distributed.agree) and rank 0 says it; before that each says its own
        if main or not distributed.ready():
            where = "" if main else f" (rank {distributed.env_rank()})"
            print(f"dmx search: error{where}: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if own_group:
            distributed.teardown()
    if main:
        _print_result(result)
    return 0


def _mix_line(formats: dict) -> str:
    from collections import Counter

    counts = Counter(formats.values())
    mix = ", ".join(f"{n} x {fmt}" for fmt, n in sorted(counts.items()))
    return f"dmx search: {len(formats)} layers -> {mix}"


def repair_moves_line(moves: list, shown: int = 4) -> str:
    """The budget repair's moves in one short line: how many units each step moved and
    where, and the first few of them (a search of SmolLM2 can move a hundred units; the
    manifest's search.budget_repair keeps every move)."""
    from collections import Counter

    kinds = Counter((m["step"], m["from"], m["to"]) for m in moves)
    counts = ", ".join(f"{step} {n} x {a}->{b}" for (step, a, b), n in kinds.items())
    first = ", ".join(f"{m['unit']} {m['from']}->{m['to']}" for m in moves[:shown])
    more = (f", ... ({len(moves) - shown} more in the manifest's search.budget_repair)"
            if len(moves) > shown else "")
    return f"{counts}: {first}{more}"


def _print_result(result: dict) -> None:
    a, raw = result["achieved_bits"], result["raw_bits"]
    print(_mix_line(result["formats"]))
    print(f"dmx search: found by the search (raw hard assignment): {raw['simple']:.3f} bits "
          f"(size-weighted {raw['size_weighted']:.3f}); after the budget repair "
          f"{a['simple']:.3f} (size-weighted {a['size_weighted']:.3f}); target "
          f"{result['target_bits']:g}, ladder {result['ladder']}, recipe "
          f"{result['config'].recipe}")
    repair = result.get("budget_repair")
    if repair and repair["moves"]:
        print(f"dmx search: budget repair ({repair['weighting']} average "
              f"{repair['bits_before']:.3f} -> {repair['bits_after']:.3f}): "
              f"{repair_moves_line(repair['moves'])}")
    rot = result.get("rotation")
    if rot:
        untied = "; lm_head untied from the embeddings" if rot["untied_lm_head"] else ""
        steps = f", {rot['learned_steps']} learned steps" if rot["mode"] == "learned" else ""
        if rot["mode"] != "none":
            print(f"dmx search: rotations folded into the weights: {rot['mode']} (R1 "
                  f"{rot['r1']}, R2 {rot['r2']}{steps}){untied}")
        if rot.get("online"):
            print(f"dmx search: online rotation R4 {rot['r4']} on down_proj's input: OUT "
                  f"needs runtime support (dmx eval applies it; dmx export refuses it)")
    e = result["end_ppl"]
    print(f"dmx search: calibration ppl on {e['windows']} windows: soft model {e['soft']:.3f}, "
          f"hard {e['hard_raw']:.3f}, after repair {e['hard_repaired']:.3f}")
    print(f"dmx search: wrote {result['out']} in {result['wall_seconds']:.1f} s")
    mixed = _mixed_fused_groups(result["formats"])
    if mixed:  # untied search (the default): fine for llama.cpp, not for vLLM's fused layers
        print(f"dmx search: note: {len(mixed)} fused group(s) (q/k/v, gate/up) mix formats, "
              f"e.g. {mixed[0]}: `dmx export --to gguf` takes this OUT; for vLLM "
              f"(compressed-tensors, quark) search with --export-target compressed-tensors")


def _print_seed(seed: int, result: dict) -> None:
    """One line per seed ``--seeds`` searched."""
    raw, a = result["raw_bits"]["simple"], result["achieved_bits"]["simple"]
    from dmx.search.seed_pool import gib
    peak = result.get("peak_rss_bytes")  # --jobs: the worker process's peak memory
    mem = f"; its process peaked at {gib(peak)}" if peak else ""
    print(f"dmx search: seed {seed}: {raw:.3f} bits found, {a:.3f} after the repair; "
          f"{result['out']} in {result['wall_seconds']:.1f} s{mem}")


def _print_combined(result: dict) -> None:
    from dmx.search.combine import summary_line

    print(_mix_line(result["formats"]))
    print(f"dmx search: {summary_line(result)}; target {result['config'].target_bits:g}; "
          f"the seeds' OUTs are in {Path(result['seed_outs'][0]).parent}; "
          f"{result['wall_seconds']:.1f} s")


def _mixed_fused_groups(formats: dict) -> list[str]:
    """The fused groups (the ones vLLM serves as one matmul) whose layers got different formats."""
    from dmx.export.rules import fused_groups

    return [g for g, names in fused_groups(formats).items()
            if len({formats[n] for n in names}) > 1]
