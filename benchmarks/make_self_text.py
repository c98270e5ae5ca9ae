"""Calibration text a model writes itself: sequences sampled from its own distribution,
starting at its BOS token (as LLM-QAT's data-free distillation does), joined by blank
lines, for `dmx search --calib`. Used by benchmarks/results/recipes-selfcalib/.

    python benchmarks/make_self_text.py [--model DIR] [--sequences 160] [--tokens 128] \\
        [--seed 0] [-o benchmarks/data/selfgen/smollm2-135m.txt]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_smollm2 import DEFAULT_OUT  # noqa: E402  (where the benchmarks' model is built)

ROOT = Path(__file__).resolve().parents[1]


def sample_texts(model, tok, sequences: int, tokens: int, seed: int, batch: int = 32) -> list:
    """``sequences`` texts of exactly ``tokens`` sampled tokens each (temperature 1, the
    whole distribution), from the BOS token (the EOS token where there is none), ``batch``
    at a time. The sample depends on the seed and on the batching."""
    import torch
    from tqdm import tqdm

    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    texts = []
    with tqdm(total=sequences, desc="sampling", unit="seq") as bar:
        while len(texts) < sequences:
            n = min(batch, sequences - len(texts))
            ids = torch.full((n, 1), start, dtype=torch.long)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=tokens, min_new_tokens=tokens,
                                 pad_token_id=tok.eos_token_id)
            texts += [tok.decode(o[1:], skip_special_tokens=True).strip() for o in out]
            bar.update(n)
    return texts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_OUT.expanduser()),
                   help="a Hugging Face causal LM dir (default: build_smollm2.py's output)")
    p.add_argument("--sequences", type=int, default=160)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", type=Path,
                   default=ROOT / "benchmarks" / "data" / "selfgen" / "smollm2-135m.txt")
    args = p.parse_args(argv)
    from dmx import data
    from dmx.outdir import atomic_write_text
    model, tok = data.load_model_and_tokenizer(args.model)
    texts = sample_texts(model, tok, args.sequences, args.tokens, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n\n".join(texts) + "\n")
    print(f"{args.out}: {len(texts)} sequences of {args.tokens} tokens, "
          f"{args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
