"""Shared pytest setup: Hypothesis settings profiles and the fixtures several modules use.

``default`` keeps the whole suite inside its time budget; ``thorough`` is for a
longer local or nightly run: ``HYPOTHESIS_PROFILE=thorough pytest tests``.
No deadlines anywhere: timing must never decide whether a test passes (the first
call of a Numba kernel compiles it, which can take seconds).
"""
import os
from pathlib import Path

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])

settings.register_profile("default", max_examples=150, **_COMMON)
settings.register_profile("thorough", max_examples=3000, **_COMMON)
settings.register_profile("ci", max_examples=150, derandomize=True, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))



# ---------------------------------------------------------------------------- shared fixtures
# Test modules never import fixtures from each other; the shared ones live here, helpers
# in tests/*_helpers.py. Modules that want a fixture for every test say so with
# ``pytestmark = pytest.mark.usefixtures("single_threaded")``.
import pytest  # noqa: E402

_WIKI = Path(__file__).resolve().parents[1] / "dmx" / "data" / "wikitext-2-raw" / "wiki.valid.raw"


@pytest.fixture(scope="module")
def single_threaded():
    """One torch and one Numba thread for a module of tiny tensors / tiny models: intra-op
    threads only add overhead and oversubscribe a busy 2-core machine (20x slower runs).
    Results are bit-identical for any thread count."""
    import numba
    import numpy as np
    import torch

    import mxref
    # mxref's first Numba call starts the OpenMP pool, which resets torch's thread count
    mxref.quantize(np.zeros(mxref.DEFAULT_BLOCK_SIZE, np.float32), "fp4_e2m1")
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """A calibration text: the first 20,000 characters of the embedded wiki.valid."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(_WIKI.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path
