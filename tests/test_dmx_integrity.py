"""OUT integrity (issue 13): every file of OUT is sealed by the manifest, every command
verifies before use, --force never destroys an input, and the weak spots found by the
fault campaign each give one line and exit 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmx
from dmx import outdir
from dmx.cli import main
from dmx.errors import DMXError
from dmx.outdir.integrity import reseal
from tiny_out import build_out

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return build_out(tmp_path_factory.mktemp("integrity"), "qwen3")


def _copy(out, tmp_path, name="copy"):
    dest = tmp_path / name
    shutil.copytree(out, dest)
    return dest


def _one_line(capsys, argv, match: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _tensor_offset(path: Path, key: str) -> int:
    """File offset of the first data byte of tensor ``key`` in a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0]


def test_manifest_seals_every_file(out):
    m = outdir.read_manifest(out)
    listed = set(m["files"])
    on_disk = {p.name for p in out.iterdir() if p.is_file()} - {outdir.MANIFEST_NAME}
    assert listed == on_disk and "config.json" in listed and "tokenizer.json" in listed
    assert len(m["manifest_sha256"]) == 64


def test_flipped_embedding_byte_refused_everywhere(out, tmp_path, capsys):
    """One flipped bit in model.embed_tokens.weight (not a packed layer): before, load
    succeeded, eval printed ppl inf with exit 0, export wrote a GGUF."""
    bad = _copy(out, tmp_path)
    w = bad / outdir.WEIGHTS_NAME
    _flip_byte(w, _tensor_offset(w, "model.embed_tokens.weight") + 1001)
    with pytest.raises(DMXError, match="model.safetensors: sha256 does not match"):
        dmx.load(bad)
    msg = "model.safetensors: sha256 does not match the manifest"
    _one_line(capsys, ["eval", bad, "--max-windows", "1"], msg)
    _one_line(capsys, ["export", bad, "--to", "gguf", "-o", tmp_path / "g"], msg)
    _one_line(capsys, ["report", bad, "-o", tmp_path / "r"], msg)
    assert not (tmp_path / "g").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda d: _edit_json(d / outdir.MANIFEST_NAME, lambda m: m["layers"][
        "model.layers.0.self_attn.o_proj"].update(format="fp8_e5m2")),
     "dmx_manifest.json: its content does not match its manifest_sha256"),
    (lambda d: _edit_json(d / "config.json", lambda c: c.update(hidden_size=96)),
     "config.json: sha256 does not match the manifest"),
    (lambda d: _edit_json(d / "tokenizer.json", lambda t: t.update(added_tokens=[])),
     "tokenizer.json: sha256 does not match the manifest"),
    (lambda d: (d / "generation_config.json").unlink(),
     "generation_config.json: listed in the manifest but missing"),
    (lambda d: (d / "tokenizer_config.json").write_text("{}"),
     "tokenizer_config.json: sha256 does not match"),
    (lambda d: (d / "extra.safetensors").write_bytes(b"x"),
     "extra.safetensors: not listed in the manifest"),
])
def test_edited_out_refused_naming_the_file(out, tmp_path, edit, match):
    bad = _copy(out, tmp_path)
    if not (bad / "generation_config.json").exists() and "generation" in match:
        pytest.skip("this OUT's source had no generation_config.json")
    edit(bad)
    with pytest.raises(DMXError, match=match):
        dmx.load(bad)


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def test_config_contradicting_the_tensors_refused_before_export(out, tmp_path, capsys):
    """hidden_size edited (and the hashes re-recorded, as a careless hand edit would):
    before, `dmx export --to gguf` exited 0 with metadata contradicting its tensors."""
    bad = _copy(out, tmp_path)
    _edit_json(bad / "config.json", lambda c: c.update(hidden_size=96))
    reseal(bad)
    line = _one_line(capsys, ["export", bad, "--to", "gguf", "-o", tmp_path / "g"],
                     "config.json implies")
    assert "config.json and the weights do not belong together" in line
    assert not (tmp_path / "g").exists()
    with pytest.raises(DMXError, match="config.json implies"):   # not a raw RuntimeError
        dmx.load(bad)


def test_manifest_missing_a_layer_refused(out, tmp_path, capsys):
    bad = _copy(out, tmp_path)
    _edit_json(bad / outdir.MANIFEST_NAME, lambda m: m["layers"].pop(
        "model.layers.1.mlp.down_proj"))
    reseal(bad)
    _one_line(capsys, ["export", bad, "--to", "gguf", "-o", tmp_path / "g"],
              "holds model.layers.1.mlp.down_proj.weight_packed, a quantized layer the "
              "manifest does not list")


def test_force_never_replaces_an_input(out, tmp_path, capsys):
    src = _copy(out, tmp_path, "OUT")
    before = sorted(p.name for p in src.iterdir())
    _one_line(capsys, ["export", src, "--to", "gguf", "-o", src, "--force"],
              "is also an input of this command")
    _one_line(capsys, ["report", src, "-o", src, "--force"], "is also an input")
    _one_line(capsys, ["report", src, "-o", tmp_path, "--force"], "is also an input")
    assert sorted(p.name for p in src.iterdir()) == before
    outdir.read_manifest(src)   # still intact


def test_force_never_replaces_a_foreign_directory(out, tmp_path, capsys):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "notes.txt").write_text("mine")
    _one_line(capsys, ["export", out, "--to", "gguf", "-o", notes, "--force"],
              "is not an output of dmx export")
    _one_line(capsys, ["report", out, "-o", notes, "--force"], "is not an output of dmx report")
    src = json.loads((out / outdir.MANIFEST_NAME).read_text())["source_model"]
    _one_line(capsys, ["baseline", "--model", src, "--method", "uniform", "--format", "fp4",
                       "-o", notes, "--force"], "is not an output of dmx search/baseline")
    assert (notes / "notes.txt").read_text() == "mine" and (notes / "sub").is_dir()
    # ... while an earlier export is replaced
    assert main(["export", str(out), "--to", "gguf", "-o", str(tmp_path / "g")]) == 0
    assert main(["export", str(out), "--to", "gguf", "-o", str(tmp_path / "g"), "--force"]) == 0


def test_out_gets_umask_permissions(out):
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask(), p


def _umask() -> int:
    from mxref.outputs import current_umask
    return current_umask()


def test_gguf_export_says_float32_tensors_become_f16(out, tmp_path):
    from dmx.export import export
    lines = []
    export(out, "gguf", tmp_path / "g", log=lines.append)
    note = [l for l in lines if "stored as F16" in l]
    assert note and "model.embed_tokens.weight" in note[0]


def test_eval_seqlen_beyond_the_positions_is_capped_with_a_note(out, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little dog. " * 200)
    assert main(["eval", str(out), "--data", str(text), "--seqlen", "512",
                 "--max-windows", "1", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "--seqlen 512 is longer than the model's 128 positions; using 128" in cap.err
    assert "x 128" in cap.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_load_on_cuda_without_a_gpu_is_a_dmx_error(out):
    with pytest.raises(DMXError, match="no CUDA device is available"):
        dmx.load(out, device="cuda")


def test_nan_source_weights_refused_before_the_search(out, tmp_path, capsys):
    src = tmp_path / "nan-model"
    shutil.copytree(Path(json.loads((out / outdir.MANIFEST_NAME).read_text())["source_model"]),
                    src)
    from safetensors.torch import load_file, save_file
    t = load_file(src / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    _one_line(capsys, ["search", "--model", src, "--target-bits", "6", "--steps", "2",
                       "--seqlen", "64", "-o", tmp_path / "o"],
              "weight model.layers.0.mlp.up_proj.weight holds 1 NaN/Inf value(s)")


def test_unwritable_out_fails_before_loading(out, tmp_path, capsys, monkeypatch):
    from dmx import data
    monkeypatch.setattr(data, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    parent = Path("/proc") if os.geteuid() == 0 else tmp_path / "ro"
    if parent != Path("/proc"):
        parent.mkdir()
        parent.chmod(0o500)
    src = json.loads((out / outdir.MANIFEST_NAME).read_text())["source_model"]
    _one_line(capsys, ["search", "--model", src, "--target-bits", "6", "-o", parent / "o"],
              "not writable")


def test_killed_writer_temp_dir_removed_by_the_next_run(out, tmp_path, capsys):
    """kill -9 during a write leaves .OUT.tmp-HOST-PID-*; the next run to that OUT (a
    --resume, a --force, a new baseline) removes it."""
    from mxref.outputs import _HOST
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "o"
    stale = tmp_path / f".o.tmp-{_HOST}-{dead.pid}-x"   # as mxref.outputs names them
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    src = json.loads((out / outdir.MANIFEST_NAME).read_text())["source_model"]
    assert main(["baseline", "--model", src, "--method", "uniform", "--format", "fp8_e4m3",
                 "-o", str(target)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


DMX_WRITER = """
import sys, time
from pathlib import Path
from dmx.outdir import write
from dmx.cli import main
src, dest, me, peer = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
bar = dest.parent / "barrier"
copy = write._copy_source_files
def copy_then_wait(source, tmp):   # inside the writer, after every check passed
    copy(source, tmp)
    (bar / me).touch()
    t0 = time.time()
    while not (bar / peer).exists() and time.time() - t0 < 120:
        time.sleep(0.01)
write._copy_source_files = copy_then_wait
sys.exit(main(["baseline", "--model", src, "--method", "uniform", "--format",
               "fp8_e4m3" if me == "a" else "fp4_e2m1", "-o", str(dest)]))
"""


def test_two_baselines_to_the_same_out_one_wins(out, tmp_path):
    """Two real `dmx baseline -o same` processes, both past the existence check before
    either renames: before, both exited 0 and one OUT silently replaced the other."""
    src = json.loads((out / outdir.MANIFEST_NAME).read_text())["source_model"]
    dest = tmp_path / "same"
    (tmp_path / "barrier").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = {me: subprocess.Popen([sys.executable, "-c", DMX_WRITER, src, str(dest), me, peer],
                                  env=env, stderr=subprocess.PIPE, text=True)
             for me, peer in (("a", "b"), ("b", "a"))}
    res = {me: (p.wait(timeout=300), p.stderr.read()) for me, p in procs.items()}
    assert sorted(rc for rc, _ in res.values()) == [0, 2], res
    winner = next(me for me, (rc, _) in res.items() if rc == 0)
    err = next(e for rc, e in res.values() if rc == 2)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "was written by another process" in lines[0], err
    kept = Path(lines[0].split("kept at ")[1].split(" (")[0])
    fmt = {"a": "fp8_e4m3", "b": "fp4_e2m1"}
    assert {e["format"] for e in outdir.read_manifest(dest)["layers"].values()} == {fmt[winner]}
    loser = "b" if winner == "a" else "a"
    assert {e["format"] for e in outdir.read_manifest(kept)["layers"].values()} == {fmt[loser]}


# ----------------------------------------------------------------------------- audit 2026-12
def _eval_text(tmp_path) -> Path:
    from dmx import data
    text = tmp_path / "t.txt"
    text.write_text(data.default_eval_file().read_text()[:4_000])
    return text


def _no_new_entries(tmp_path, before):
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_out_passed_as_model_refused(out, tmp_path, capsys):
    """An OUT holds weight_packed, no weight: transformers loaded it with those linears at
    their random init, so `dmx eval --model OUT` printed a perplexity of random weights and
    `dmx baseline --model OUT` wrote an OUT of them, both exit 0."""
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_line(capsys, ["eval", "--model", out, "--max-windows", "1", "--seqlen", "16"],
                     "is a dmx OUT directory")
    assert f"dmx eval {out}" in line
    src = json.loads((out / outdir.MANIFEST_NAME).read_text())["source_model"]
    assert src in line
    _one_line(capsys, ["baseline", "--model", out, "--method", "uniform", "--format",
                       "fp4_e2m1", "-o", tmp_path / "b"], "is a dmx OUT directory")
    _no_new_entries(tmp_path, before)


def test_quantized_checkpoint_as_model(out, tmp_path, capsys):
    """A compressed-tensors export: `dmx eval --model` scores it (transformers dequantizes
    it), but baseline and --uniform need full-precision linears: before, `dmx baseline`
    died with a traceback ('Linear' object has no attribute 'weight')."""
    dmx.export.export(out, "compressed-tensors", tmp_path / "ct", log=lambda *a: None)
    text = _eval_text(tmp_path)
    assert main(["eval", "--model", str(tmp_path / "ct"), "--data", str(text),
                 "--max-windows", "1", "--seqlen", "16", "--no-progress"]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    _one_line(capsys, ["baseline", "--model", tmp_path / "ct", "--method", "uniform",
                       "--format", "fp4_e2m1", "--export-target", "none", "-o", tmp_path / "b"],
              "already quantized checkpoint (quantization_config, quant_method "
              "compressed-tensors)")
    _one_line(capsys, ["eval", "--model", tmp_path / "ct", "--uniform", "fp8_e4m3",
                       "--data", text, "--max-windows", "1", "--seqlen", "16"],
              "already quantized checkpoint")
    _no_new_entries(tmp_path, before)


def test_export_dir_is_not_an_out(out, tmp_path, capsys):
    """A compressed-tensors/Quark export carries the manifest (provenance); reading it as
    an OUT said "config.json: sha256 does not match ... OUT was modified or corrupted"."""
    dmx.export.export(out, "compressed-tensors", tmp_path / "ct", log=lambda *a: None)
    for argv in (["eval", tmp_path / "ct"], ["report", tmp_path / "ct", "-o", tmp_path / "r"],
                 ["export", tmp_path / "ct", "--to", "gguf", "-o", tmp_path / "g"]):
        line = _one_line(capsys, argv, "a `dmx export` checkpoint")
        assert "corrupted" not in line and "dmx eval --model" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


@pytest.mark.parametrize("content, match", [
    ("[]", "a JSON list, not an object"),
    ('{"latest": "x", "results": {}}', "latest ('x') names no entry of results"),
    ('{"results": {"k": {"ppl": 3}}}', "results['k'].file is missing"),
    ('{"results": {}, "tasks": {"a": {"task": "arc"}}}', "tasks['a'].metrics is missing"),
])
def test_damaged_eval_json_one_line(out, tmp_path, capsys, content, match):
    """eval.json is not sealed: a hand-edited one made `dmx report` (and `dmx eval --save`)
    die with a KeyError/TypeError traceback."""
    o = _copy(out, tmp_path)
    (o / "eval.json").write_text(content)
    line = _one_line(capsys, ["report", o, "-o", tmp_path / "r"], match)
    assert f"delete it and rerun `dmx eval {o} --save`" in line
    _one_line(capsys, ["report", out, "--against", o, "-o", tmp_path / "r"], match)
    # refused before the evaluation runs (nothing printed), and the file is left as it was
    assert main(["eval", str(o), "--save", "--data", str(_eval_text(tmp_path)),
                 "--max-windows", "1", "--seqlen", "16", "--no-progress"]) == 2
    res = capsys.readouterr()
    assert match in res.err and "Traceback" not in res.err and res.out == ""
    assert (o / "eval.json").read_text() == content
    assert not (tmp_path / "r").exists()


def test_unreadable_eval_json_advice_does_not_loop(out, tmp_path, capsys):
    """The advice was "rerun `dmx eval OUT --save`", which failed on the same file."""
    o = _copy(out, tmp_path)
    (o / "eval.json").write_text("{")
    line = _one_line(capsys, ["report", o, "-o", tmp_path / "r"], "unreadable JSON")
    assert "delete it and rerun" in line


def test_output_parent_that_cannot_be_made(out, tmp_path, capsys):
    """export and report create missing parents of -o: a file in the way gave exit 1 and
    "[Errno 17] File exists", and a refused command left the parents it had made."""
    (tmp_path / "f").write_text("x")
    for argv in (["export", out, "--to", "gguf", "-o", tmp_path / "f" / "e"],
                 ["report", out, "-o", tmp_path / "f" / "a" / "r"]):
        _one_line(capsys, argv, f"{tmp_path / 'f'}: not a directory")
    # refused after the parents were made: they are removed again
    _one_line(capsys, ["report", tmp_path / "nope", "-o", tmp_path / "new" / "a" / "r"],
              "no such directory")
    _one_line(capsys, ["report", tmp_path / "f", "-o", tmp_path / "new" / "a" / "r"],
              "a file, not a directory")   # it exists: not "no such directory"
    _one_line(capsys, ["export", out, "--to", "quark", "-o", tmp_path / "new2" / "e"],
              "MXFP8 weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    # a successful one keeps them
    assert main(["report", str(out), "-o", str(tmp_path / "new" / "a" / "r")]) == 0
    assert (tmp_path / "new" / "a" / "r" / "report.md").is_file()


def test_unfused_refusal_names_the_command_that_wrote_out():
    """A KL baseline with q/k/v in different formats was told to rerun `dmx search`."""
    from types import SimpleNamespace

    from dmx.export.rules import check_fused
    layers = {f"model.layers.0.self_attn.{p}": SimpleNamespace(fmt=f, act_format=None)
              for p, f in (("q_proj", "fp4_e2m1"), ("k_proj", "fp4_e2m1"),
                           ("v_proj", "fp8_e4m3"))}
    with pytest.raises(DMXError, match=r"Rerun `dmx baseline --method kl` with "
                                       r"--export-target compressed-tensors"):
        check_fused(layers, "compressed-tensors", False, "kl")
    with pytest.raises(DMXError, match=r"Rerun `dmx search` with --export-target quark"):
        check_fused(layers, "quark", False, "dmx")


def test_report_data_no_run_was_scored_on(out, tmp_path, capsys):
    """`--data` naming a text no run was scored on wrote a report of empty cells, exit 0."""
    o = _copy(out, tmp_path)
    assert main(["eval", str(o), "--save", "--data", str(_eval_text(tmp_path)),
                 "--max-windows", "1", "--seqlen", "16", "--no-progress"]) == 0
    capsys.readouterr()
    _one_line(capsys, ["report", o, "--data", "other.txt", "-o", tmp_path / "r"],
              "none of the runs was scored on a file named other.txt")
    assert not (tmp_path / "r").exists()
    assert main(["report", str(o), "--data", "t.txt", "-o", str(tmp_path / "r")]) == 0


def test_eval_with_nothing_to_evaluate(capsys):
    """Neither OUT nor --model was answered "... (not both)"."""
    line = _one_line(capsys, ["eval"], "either an OUT directory or --model")
    assert "nothing to evaluate" in line and "not both" not in line


@pytest.mark.parametrize("value", ["-5", "nan", "0.5"])
def test_report_reference_ppl_must_be_a_perplexity(out, tmp_path, capsys, value):
    """-5 was drawn as the reference line, nan written into report.json (invalid JSON)."""
    _one_line(capsys, ["report", out, f"--reference-ppl={value}", "-o", tmp_path / "r"],
              "not a perplexity")
    assert not (tmp_path / "r").exists()
