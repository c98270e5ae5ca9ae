"""The dMX search (`dmx search`) and the baselines it is compared with: the recipe
(SearchConfig), the training loop, the bit-budget penalty, losses, budget assignment and
repair, data-parallel scale-out and checkpoints. Layer 5 of dmx (docs/ARCHITECTURE.md)."""
from dmx.outdir.layout import SEARCH_LOG_NAME
from dmx.outdir.read import read_search_log
from dmx.search.command import add_search_parser, run_search, search, search_seeds

__all__ = ["search", "search_seeds", "run_search", "add_search_parser", "read_search_log", "SEARCH_LOG_NAME"]
