"""benchmarks/make_self_text.py: calibration text sampled from the model itself, on the
embedded model: the asked number of sequences, reproducible from its seed, and a text
`dmx search --calib` reads."""
from __future__ import annotations

import pytest
from script_helpers import load_script

st = load_script("benchmarks/make_self_text.py")


@pytest.mark.usefixtures("single_threaded")
def test_sequences_are_sampled_reproducibly_and_written_whole(tmp_path):
    from dmx import data

    model, tok = data.load_model_and_tokenizer(str(data.embedded_model_dir()))
    a = st.sample_texts(model, tok, 3, 12, seed=0, batch=2)   # two batches, the last short
    assert len(a) == 3 and all(t.strip() for t in a)
    assert st.sample_texts(model, tok, 3, 12, seed=0, batch=2) == a
    assert st.sample_texts(model, tok, 3, 12, seed=1, batch=2) != a
    for text in a:   # 12 sampled tokens each (re-tokenizing may merge or split a few)
        assert 6 <= len(tok(text, add_special_tokens=False)["input_ids"]) <= 24
    out = tmp_path / "self.txt"
    assert st.main(["--model", str(data.embedded_model_dir()), "--sequences", "3",
                    "--tokens", "12", "-o", str(out)]) == 0
    # the sample depends on the batching too: main samples in batches of 32
    assert out.read_text() == "\n\n".join(st.sample_texts(model, tok, 3, 12, seed=0)) + "\n"
    assert not out.with_suffix(".tmp").exists()
