"""`dmx search`: learn a per-layer MX format assignment for a causal LM under a bit budget.

    dmx search --model DIR --target-bits 6.0 -o OUT

Loads the model (weights frozen), wraps every linear except lm_head/embeddings in a
DMXLinear (q/k/v and gate/up share one offset), learns the float32 offsets with SGD
(momentum 0.99, Nesterov) on next-token cross-entropy + the target-aware hinge penalty
while the anneal temperature rises (dmx.train), puts every layer on a rung (the hard
assignment) and writes OUT through dmx.io.write_out. Checkpoints go to OUT.partial/;
Ctrl-C saves one and prints the ``--resume`` command.

Programmatic use: :func:`search` (same options as keyword arguments) returns a result dict.

Scale-out: under ``torchrun`` the search is data parallel (dmx.distributed: ``--batch-size``
is the global batch, split over the processes; rank 0 writes checkpoints and OUT);
``--device-map auto`` spreads one model over the GPUs of one process (accelerate).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

from dmx.errors import DMXError

__all__ = ["add_search_parser", "run_search", "search", "SEARCH_LOG_NAME"]

SEARCH_LOG_NAME = "search_log.json"
DEFAULTS = dict(ladder="fp8-fp4", weights_only=False, calib=None, seqlen=2048, samples=None,
                steps=400, batch_size=8, lr=1.0, device="cpu", seed=0, force=False,
                distill=False, weighting="simple", checkpoint_every=50, resume=False,
                init="low", fill_budget=True,
                delay=0.6, t_start=0.4, t_end=20.0, lam=5.0, checkpoint_dir=None, include=None,
                device_map=None, gradient_checkpointing=False)
WEIGHTINGS = ("simple", "size")  # the averages the paper trains against (macs is report-only)
INITS = ("low", "target")  # where the offsets start (dmx.assign.offset_for_bits for target)


# ----------------------------------------------------------------------------- validation
def _check_args(target_bits, ladder, steps, batch_size, lr, seqlen, samples, checkpoint_every,
                weighting, delay, t_start, t_end, lam, device):
    """Cheap checks first, so bad flags fail before a model is loaded."""
    from dmx.ladders import get_ladder

    lad = get_ladder(ladder)
    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--seqlen", seqlen)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise DMXError(f"{flag} must be a positive integer, got {value!r}")
    if seqlen < 2:
        raise DMXError(f"--seqlen must be at least 2 (next-token loss), got {seqlen}")
    if samples is not None and (int(samples) != samples or samples < 1):
        raise DMXError(f"--samples must be a positive integer, got {samples!r}")
    if int(checkpoint_every) != checkpoint_every or checkpoint_every < 0:
        raise DMXError(f"--checkpoint-every must be >= 0 (0 = only on Ctrl-C), got "
                       f"{checkpoint_every!r}")
    if weighting not in WEIGHTINGS:
        raise DMXError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    from dmx.baseline import check_target_bits  # one rule for search and the KL baseline
    check_target_bits(target_bits, lad)
    for flag, value in (("--lr", lr), ("--t-start", t_start), ("--t-end", t_end)):
        if not (math.isfinite(value) and value > 0):
            raise DMXError(f"{flag} must be a positive number, got {value!r}")
    if not (math.isfinite(lam) and lam >= 0):
        raise DMXError(f"--lam must be >= 0, got {lam!r}")
    if not 0.0 <= delay <= 1.0:
        raise DMXError(f"--delay must be a fraction in [0, 1], got {delay!r}")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise DMXError(f"--device must be cpu or cuda, got {device!r}")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DMXError("--device cuda: no CUDA device is available; use --device cpu")
    return lad


def _check_paths(model_dir, calib, out, force, resume, ckpt_dir):
    if not Path(model_dir).is_dir():
        raise DMXError(f"--model {model_dir}: no such directory; pass a local Hugging Face "
                       f"model directory or a .gguf file")
    for f in calib or ():
        if not Path(f).is_file():
            raise DMXError(f"--calib {f}: no such file")
    from dmx.io import check_new_out

    check_new_out(out, force)
    has_ckpt = (Path(ckpt_dir) / "checkpoint.pt").is_file()
    if has_ckpt and not resume and not force:
        raise DMXError(f"an interrupted search left a checkpoint in {ckpt_dir}; add --resume "
                       f"to continue it or --force to start over")


# ----------------------------------------------------------------------------- search
def _resume_command(config: dict, out, ckpt_dir, explicit_ckpt_dir: bool) -> str:
    """The command line that continues this search (printed on Ctrl-C)."""
    flags = ["dmx", "search", "--model", config["model"], "--target-bits",
             repr(config["target_bits"]), "--ladder", config["ladder"]]
    for f in config["calib"]:
        flags += ["--calib", f]
    for key in ("seqlen", "samples", "steps", "batch_size", "lr", "seed", "weighting", "delay",
                "t_start", "t_end", "lam", "init"):
        if config.get(key, DEFAULTS[key]) != DEFAULTS[key]:
            flags += ["--" + key.replace("_", "-"), str(config[key])]
    if not config.get("fill_budget", True):
        flags.append("--no-fill-budget")
    for pattern in config.get("include") or ():
        flags += ["--include", pattern]
    for key in ("weights_only", "distill"):
        if config[key]:
            flags.append("--" + key.replace("_", "-"))
    if explicit_ckpt_dir:
        flags += ["--checkpoint-dir", str(ckpt_dir)]
    flags += ["--resume", "-o", str(out)]
    return shlex.join(flags)


def search(model_dir, target_bits, ladder="fp8-fp4", weights_only=False, calib=None,
           seqlen=2048, samples=None, steps=400, batch_size=8, lr=1.0, device="cpu", seed=0,
           out=None, force=False, distill=False, weighting="simple", checkpoint_every=50,
           init="low", fill_budget=True,
           resume=False, delay=0.6, t_start=0.4, t_end=20.0, lam=5.0, checkpoint_dir=None,
           include=None, progress=True, callback=None, device_map=None,
           gradient_checkpointing=False) -> dict:
    """Run a dMX search and write OUT; returns a summary dict (formats, achieved bits, ...).

    ``calib``: text files (default: the embedded wiki.valid.raw). ``samples``: calibration
    windows of ``seqlen`` tokens (default steps x batch size, one epoch as in the reference,
    capped by the text). ``callback(step, record)`` runs after every step. Raises
    DMXError on bad input and :class:`dmx.train.SearchInterrupted` on Ctrl-C (after saving
    a checkpoint). ``init``: offsets start at the low rung (the reference) or, "target",
    where the soft average equals ``target_bits``. ``fill_budget``: after the hard
    assignment, promote the units nearest to the next rung while the average stays <=
    target (dmx.assign; units over the target are always demoted). ``device_map``
    ("auto", ...): place the model with accelerate over the GPUs instead of on ``device``.
    ``gradient_checkpointing``: recompute each decoder block in backward (less activation
    memory, same gradients; dmx.train.checkpoint_blocks).
    Under torchrun (``WORLD_SIZE`` > 1) every process runs its share of each step's
    ``batch_size`` windows and only rank 0 writes (dmx.distributed).
    """
    t0 = time.time()
    if init not in INITS:
        raise DMXError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    lad = _check_args(target_bits, ladder, steps, batch_size, lr, seqlen, samples,
                      checkpoint_every, weighting, delay, t_start, t_end, lam, device)
    from dmx import distributed

    dctx = distributed.setup(device, batch_size=int(batch_size), device_map=device_map)
    device = dctx.device  # cuda:LOCAL_RANK under torchrun
    from dmx.checkpoint import (check_same_config, default_checkpoint_dir, load_checkpoint,
                                save_checkpoint)

    if out is None:
        raise DMXError("-o/--out is required: the directory to write the searched model to")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    distributed.agree(dctx, _check_paths, model_dir, calib, out, force, resume, ckpt_dir)
    if dctx.is_main and force and not resume and (ckpt_dir / "checkpoint.pt").is_file():
        (ckpt_dir / "checkpoint.pt").unlink()  # --force without --resume: start over

    import torch

    from dmx import data
    from dmx.layers import hard_assignment, wrap_model
    from dmx.penalty import average_bits
    from dmx.train import TrainConfig, train_offsets

    if not calib and not data.default_calibration_file().is_file():
        raise DMXError(f"the embedded calibration text {data.default_calibration_file()} is "
                       f"missing; pass --calib FILE")
    calib_files = [str(Path(f).resolve()) for f in calib] if calib else [
        str(data.default_calibration_file())]
    if samples is None:
        samples = steps * batch_size
    config = {"model": str(Path(model_dir).resolve()), "target_bits": float(target_bits),
              "ladder": lad.name, "weights_only": bool(weights_only), "calib": calib_files,
              "seqlen": int(seqlen), "samples": int(samples), "steps": int(steps),
              "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
              "distill": bool(distill), "weighting": weighting, "delay": float(delay),
              "t_start": float(t_start), "t_end": float(t_end), "lam": float(lam),
              "include": list(include) if include else None, "init": init}
    resume_state = None
    if resume:
        resume_state = distributed.on_main(dctx, load_checkpoint, ckpt_dir, broadcast=True)
        check_same_config(resume_state["config"], config, ckpt_dir / "checkpoint.pt")

    model, tokenizer = distributed.agree(dctx, data.load_model_and_tokenizer, model_dir,
                                         device=device, device_map=device_map)
    windows = distributed.agree(dctx, data.calibration_windows, tokenizer, calib_files, seqlen,
                                samples, seed)  # the same windows on every rank
    windows = windows.to(model.device)
    for p in model.parameters():
        p.requires_grad_(False)  # only the offsets learn
    model.eval()  # no dropout; wrap_model's DMXLinears are switched to train mode by the loop
    start = "low"
    if init == "target":  # where the soft average equals the target at the first temperature
        from dmx.assign import offset_for_bits
        start = offset_for_bits(lad, float(target_bits), float(t_start))
    layers = distributed.agree(dctx, wrap_model, model, lad, include=include,
                               quantize_activations=not weights_only, init=start)
    distributed.pin_layer_devices(layers)  # Triton launches on the current GPU
    if gradient_checkpointing:
        from dmx.train import checkpoint_blocks
        checkpoint_blocks(model)

    cfg = TrainConfig(target_bits=float(target_bits), steps=int(steps),
                      batch_size=int(batch_size), lr=float(lr), lam=float(lam),
                      weighting=weighting, distill=bool(distill), delay=float(delay),
                      t_start=float(t_start), t_end=float(t_end), seed=int(seed),
                      checkpoint_every=int(checkpoint_every))
    elapsed_before = float(resume_state.get("elapsed_s", 0.0)) if resume_state else 0.0
    run_start = time.time()

    def save(state):
        elapsed = elapsed_before + time.time() - run_start
        return save_checkpoint(ckpt_dir, {**state, "config": config, "elapsed_s": elapsed})

    log = train_offsets(model, layers, windows, cfg, resume_state=resume_state,
                        save=save if dctx.is_main else None, callback=callback,
                        progress=progress and dctx.is_main, dist=dctx)
    train_s = elapsed_before + time.time() - run_start
    # the learned offsets (search_log.json), before anything below moves a unit to a rung
    trained = {n: float(layer.offset.detach()) for n, layer in layers.items()}

    for layer in layers.values():
        layer.hard = True  # deploy: every layer on its rung, bit-exact fake quantization
        layer.eval()
    from dmx.assign import repair_layers

    # the anneal can freeze the choice under (or a step over) the budget: fit it, then fill
    repair = repair_layers(layers, lad, float(target_bits), weighting, fill=bool(fill_budget))
    formats = hard_assignment(model)
    act_formats = {n: (formats[n] if layers[n].quantize_input else None) for n in formats}
    with torch.no_grad():
        achieved = {"simple": float(average_bits(layers, "simple")),
                    "size_weighted": float(average_bits(layers, "size"))}
    summary = _log_summary(log)
    meta = {"method": "dmx", "ladder": lad.name, "target_bits": float(target_bits),
            "seed": int(seed), "wall_time_s": round(elapsed_before + time.time() - t0, 3),
            "search": {**{k: v for k, v in config.items() if k != "model"},
                                          "train_seconds": round(train_s, 3),
                                          "achieved_bits": achieved,
                                          "budget_repair": repair, **summary}}
    search_log = {"config": config, "achieved_bits": achieved, "formats": formats,
                  "budget_repair": repair,
                  "steps": log}
    search_log["offsets"] = trained
    from dmx import io

    distributed.on_main(dctx, io.write_out, out, model, formats, act_formats, model_dir, meta,
                        force, extra_files={SEARCH_LOG_NAME: json.dumps(search_log, indent=1)})
    if not dctx.is_main:
        pass  # rank 0 wrote OUT and removes the checkpoint
    elif checkpoint_dir is None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the search is done: OUT replaces it
    else:
        (ckpt_dir / "checkpoint.pt").unlink(missing_ok=True)
    return {"out": str(out), "formats": formats, "act_formats": act_formats,
            "achieved_bits": achieved, "target_bits": float(target_bits), "ladder": lad.name,
            "log": log, "train_seconds": train_s, "wall_seconds": time.time() - t0,
            "model": model, "budget_repair": repair, **summary}


def _log_summary(log: list[dict]) -> dict:
    """Final numbers and a compact bits curve for the manifest/report."""
    if not log:
        return {"final_loss": None, "final_ce": None}
    last = log[-1]
    return {"final_loss": last["loss"], "final_ce": last["ce"], "final_kl": last["kl"],
            "final_penalty": last["penalty"], "final_soft_bits": last["avg_bits"],
            "steps_run": len(log)}


# ----------------------------------------------------------------------------- CLI
def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search", help="learn a mixed MX format assignment under a bit budget (dMX)",
        description="Learn one MX format per linear layer (q/k/v and gate/up tied) so that the "
                    "average element bits meet --target-bits, then write the quantized model "
                    "to OUT. Checkpoints go to OUT.partial/; Ctrl-C saves one (resume with "
                    "--resume).")
    p.add_argument("--model", required=True, help="local Hugging Face causal-LM directory, or a "
                   ".gguf file (converted once to a cached float32 directory)")
    p.add_argument("--target-bits", type=float, required=True,
                   help="average element bits to reach (MXFP4 = 4, MXFP6 = 6, MXFP8 = 8)")
    p.add_argument("--ladder", default=DEFAULTS["ladder"],
                   help="formats a layer can take: fp8-fp4 (default), fp6-fp4, fp8-fp6-fp4")
    p.add_argument("--weights-only", action="store_true",
                   help="quantize weights only (inputs stay full precision)")
    p.add_argument("--include", action="append", metavar="REGEX",
                   help="quantize only linears whose name matches (repeatable; default: all "
                        "but lm_head and embeddings)")
    p.add_argument("--calib", nargs="+", metavar="FILE",
                   help="calibration text file(s) (default: the embedded wiki.valid.raw)")
    p.add_argument("--seqlen", type=int, default=DEFAULTS["seqlen"],
                   help="tokens per calibration window (default 2048)")
    p.add_argument("--samples", type=int, default=None,
                   help="calibration windows (default: steps x batch size, capped by the text)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help="optimization steps (default 400)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="windows per step (default 8)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help="SGD learning rate of the offsets (default 1.0)")
    p.add_argument("--device", default=DEFAULTS["device"], help="cpu (default) or cuda")
    p.add_argument("--device-map", default=None, choices=("auto", "balanced", "sequential"),
                   help="spread the model over the GPUs with accelerate (for models that do "
                        "not fit one GPU; overrides --device; not with torchrun)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                   help="seed of the calibration windows and batch order (default 0)")
    p.add_argument("--distill", action="store_true",
                   help="add the KL divergence to the unquantized model's predictions")
    p.add_argument("--weighting", choices=WEIGHTINGS, default=DEFAULTS["weighting"],
                   help="average the penalty uses: simple (per layer, default) or size "
                        "(per weight)")
    p.add_argument("--lam", type=float, default=DEFAULTS["lam"],
                   help="slope of the budget penalty (default 5)")
    p.add_argument("--delay", type=float, default=DEFAULTS["delay"],
                   help="fraction of steps at the starting temperature (default 0.6)")
    p.add_argument("--t-start", type=float, default=DEFAULTS["t_start"],
                   help="starting anneal temperature, code units (default 0.4)")
    p.add_argument("--t-end", type=float, default=DEFAULTS["t_end"],
                   help="final anneal temperature, code units (default 20)")
    p.add_argument("--init", choices=INITS, default=DEFAULTS["init"],
                   help="where the offsets start: low (the low rung, as the reference; "
                        "default) or target (the soft average at the target from step 0)")
    p.add_argument("--fill-budget", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS["fill_budget"],
                   help="after the hard assignment, promote the layers nearest to the next "
                        "rung while the average stays <= target (default on; the budget is "
                        "never exceeded either way)")
    p.add_argument("--checkpoint-every", type=int, default=DEFAULTS["checkpoint_every"],
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
    from dmx import distributed
    from dmx.train import SearchInterrupted

    kwargs = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    main = distributed.is_main_process()  # under torchrun only rank 0 prints
    own_group = not distributed.ready()  # a process group started here is ended here
    try:
        result = search(args.model, args.target_bits, out=args.out,
                        progress=not getattr(args, "no_progress", False), **kwargs)
    except SearchInterrupted as stop:
        cfg = _config_from_args(args)
        ckpt_dir = stop.checkpoint.parent if hasattr(stop.checkpoint, "parent") else ""
        command = _resume_command(cfg, args.out, ckpt_dir, bool(args.checkpoint_dir))
        if getattr(args, "gradient_checkpointing", False):
            command += " --gradient-checkpointing"
        for flag in ("device", "device_map"):  # where it ran: not settings, but needed
            if getattr(args, flag, None) not in (None, DEFAULTS["device"]):
                command += f" --{flag.replace('_', '-')} {shlex.quote(getattr(args, flag))}"
        world = distributed.env_world()[0]
        if world > 1:  # any number of processes can resume it (the batch is global)
            command = f"torchrun --standalone --nproc-per-node {world} -m " + command
        print(f"dmx search: interrupted after step {stop.step}; checkpoint saved to "
              f"{stop.checkpoint}. Continue with:\n  {command}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first step or while OUT was being written
        if main:
            print("dmx search: interrupted; OUT was not written (a checkpoint, if any, is in "
                  f"{args.checkpoint_dir or str(args.out) + '.partial'})", file=sys.stderr)
        return 130
    except DMXError as err:
        # once the process group is up every rank fails with the same message
        # (dmx.distributed.agree) and rank 0 says it; before that each says its own
        if main or not distributed.ready():
            where = "" if main else f" (rank {distributed.env_rank()})"
            print(f"dmx search: error{where}: {err}", file=sys.stderr)
        return 2
    finally:
        if own_group:
            distributed.teardown()
    if main:
        _print_result(result)
    return 0


def _config_from_args(args) -> dict:
    cfg = {k: getattr(args, k, DEFAULTS.get(k)) for k in DEFAULTS}
    cfg["model"] = args.model
    cfg["target_bits"] = args.target_bits
    cfg["calib"] = list(args.calib or [])
    return cfg


def _print_result(result: dict) -> None:
    from collections import Counter

    counts = Counter(result["formats"].values())
    mix = ", ".join(f"{n} x {fmt}" for fmt, n in sorted(counts.items()))
    a = result["achieved_bits"]
    print(f"dmx search: {len(result['formats'])} layers -> {mix}")
    print(f"dmx search: average bits {a['simple']:.3f} (size-weighted {a['size_weighted']:.3f})"
          f", target {result['target_bits']:g}, ladder {result['ladder']}")
    repair = result.get("budget_repair")
    if repair and repair["moves"]:
        moved = ", ".join(f"{m['unit']} {m['from']}->{m['to']}" for m in repair["moves"])
        print(f"dmx search: budget repair ({repair['weighting']} average "
              f"{repair['bits_before']:.3f} -> {repair['bits_after']:.3f}): {moved}")
    print(f"dmx search: wrote {result['out']} in {result['wall_seconds']:.1f} s")
