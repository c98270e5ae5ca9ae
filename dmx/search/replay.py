"""Forward passes that skip the decoder blocks a change cannot reach.

KL selection (dmx.search.baseline.kl_sensitivities) runs one forward pass per unit with
that unit alone quantized. Every block before the unit's own computes exactly what the
unquantized reference pass computed, so recomputing them is wasted: on average half of
every pass. Here the reference pass records what each decoder block returned, and a pass
for a unit in block ``b`` replaces blocks ``0 .. b-1`` by stand-ins that return block
``b-1``'s recorded output, whatever they are given. Block ``b`` then receives exactly the
tensor it received in the reference pass; the embedding, the rotary tables and the masks
are computed as before, so the logits are bit for bit those of a full pass (the same
kernels on the same inputs; tests/test_dmx_baseline.py compares the sensitivities' bits).

Only the blocks are found by structure: the ``torch.nn.ModuleList`` that holds every unit's
layers at ``<prefix>.<index>.`` (``model.layers`` in Llama, Qwen3, Mistral...). A unit
outside it, or a model without one, takes the full pass. Memory: one block output per
block for the current batch (SmolLM2-135M, 4 x 128 tokens: 35 MB).

Before it is trusted, :meth:`BlockReplay.check` replays the reference pass itself from the
middle and the last block and requires the same logits bit for bit; a model whose blocks
share state other than the hidden states fails it and gets full passes.

Public API: ``BlockReplay(model, units, enabled=True)`` with ``.block_of``, ``.recording()``,
``.check(run, reference)`` and ``.from_block(b)``.
"""
from __future__ import annotations

import contextlib
import re

import torch

__all__ = ["BlockReplay"]

_INDEX = re.compile(r"\.(\d+)\.")


def _copy(output):
    """A copy of a block's output (a tensor, or a tuple of them): a later block may work in
    place on what it is given, and the record must stay the reference's."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_copy(o) for o in output)
    return output


class _StandIn(torch.nn.Module):
    """A block that ignores its inputs and returns ``output`` (a copy of it if ``fresh``:
    the last stand-in, whose output the first live block receives)."""

    def __init__(self, output, fresh: bool):
        super().__init__()
        self.output, self.fresh = output, fresh

    def forward(self, *args, **kwargs):  # noqa: ARG002 (inputs ignored on purpose)
        return _copy(self.output) if self.fresh else self.output


class BlockReplay:
    """The decoder blocks of ``model`` and, for each unit (a tuple of linear names), the
    index of the first block it touches (0: a full pass)."""

    def __init__(self, model, units, enabled: bool = True):
        self.blocks = None
        self._outputs = None  # what each block returned in the last recorded pass
        self.block_of = {u: 0 for u in units}
        if not enabled:  # full passes (the benchmark's anchor, the tests' reference)
            return
        prefixes = set()
        for u in units:
            for name in u:
                m = _INDEX.search(name)
                prefixes.add(name[:m.start()] if m else None)
        if len(prefixes) != 1 or None in prefixes:
            return  # no single block list holds every unit: full passes
        prefix = prefixes.pop()
        try:
            blocks = model.get_submodule(prefix)
        except AttributeError:
            return
        if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) < 2:
            return
        self.blocks = blocks
        skip = len(prefix) + 1
        self.block_of = {u: min(int(n[skip:].split(".", 1)[0]) for n in u) for u in units}

    @contextlib.contextmanager
    def recording(self):
        """Inside: a forward pass records what every block returns (the reference pass)."""
        if self.blocks is None:
            yield
            return
        outputs = [None] * len(self.blocks)

        def keep(k):
            def hook(module, args, output):
                outputs[k] = _copy(output)
            return hook
        handles = [b.register_forward_hook(keep(k)) for k, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._outputs = outputs

    def check(self, run, reference) -> bool:
        """Whether replayed passes give ``reference`` (the recorded pass's output) exactly:
        ``run()`` is the same pass again, run from the middle and from the last block with
        nothing changed. A model whose blocks share state other than the hidden states
        (exotic architectures) fails it, and replay is then off (full passes)."""
        if self.blocks is None:
            return True
        for b in sorted({len(self.blocks) // 2, len(self.blocks) - 1}):
            with self.from_block(b):
                same = torch.equal(run(), reference)
            if not same:
                self.blocks = None
                self.block_of = {u: 0 for u in self.block_of}
                return False
        return True

    @contextlib.contextmanager
    def from_block(self, b: int):
        """Inside: blocks ``0 .. b-1`` return block ``b-1``'s recorded output."""
        if (self.blocks is None or b <= 0 or self._outputs is None
                or self._outputs[b - 1] is None):  # nothing recorded for it: a full pass
            yield
            return
        saved = [self.blocks[k] for k in range(b)]
        passing = _StandIn(self._outputs[b - 1], fresh=False)  # its output is ignored
        try:
            for k in range(b - 1):
                self.blocks[k] = passing
            self.blocks[b - 1] = _StandIn(self._outputs[b - 1], fresh=True)
            yield
        finally:
            for k, module in enumerate(saved):
                self.blocks[k] = module
