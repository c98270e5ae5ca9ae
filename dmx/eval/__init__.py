"""Evaluating and comparing results: `dmx eval` (perplexity, zero-shot tasks, GGUF through
llama.cpp) and `dmx report`. Layer 6 of dmx (docs/ARCHITECTURE.md)."""
