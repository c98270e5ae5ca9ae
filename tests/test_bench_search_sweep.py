"""The sweep's KL pair matches the search it is compared with: same bits under the same
average (--weighting), same quantized inputs (--weights-only), same layers
(--export-target) and units (--tie-fused)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_search_sweep",
                                               ROOT / "benchmarks" / "bench_search_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _manifest(weighting=None, weights_only=None, **more):
    config = {"target_bits": 5.0, **more}
    if weighting is not None:
        config["weighting"] = weighting
    if weights_only is not None:
        config["weights_only"] = weights_only
    return {"avg_bits": {"simple": 4.99, "size_weighted": 5.13}, "search": {"config": config}}


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_kl_pair_uses_the_searchs_average_and_inputs(tmp_path):
    args = sweep._parse(["--model", str(tmp_path)])
    for manifest, bits, weighting, weights_only in (
            (_manifest(), 4.99, "simple", False),  # a config written before the fields
            (_manifest("simple", False), 4.99, "simple", False),
            (_manifest("size", True), 5.13, "size", True)):
        argv = sweep._kl_argv(args, 0, tmp_path / "kl", *sweep._search_budget(manifest))
        assert float(_flag(argv, "--target-bits")) == bits
        assert _flag(argv, "--weighting") == weighting
        assert ("--weights-only" in argv) == weights_only


def test_kl_pair_uses_the_searchs_layers_and_units(tmp_path):
    args = sweep._parse(["--model", str(tmp_path)])
    for manifest, target, tied in (
            (_manifest(), "any", False),  # a config written before the fields: the defaults
            (_manifest(export_target="none", tie_fused=False), "none", False),
            (_manifest(export_target="compressed-tensors", tie_fused=True),
             "compressed-tensors", True)):
        argv = sweep._kl_argv(args, 0, tmp_path / "kl", *sweep._search_budget(manifest))
        assert _flag(argv, "--export-target") == target
        assert ("--tie-fused" in argv) == tied and ("--no-tie-fused" in argv) != tied


def test_kl_pair_shares_the_searchs_rotation(tmp_path):
    search = tmp_path / "dmx-default-5-s0"
    for rotate, want in (("none", []), ("hadamard", ["--rotate", "hadamard"]),
                         ("learned", ["--rotate-from", str(search)])):
        args = sweep._parse(["--model", str(tmp_path), "--rotate", rotate])
        argv = sweep._kl_argv(args, 0, tmp_path / "kl", *sweep._search_budget(_manifest()),
                              search_out=search)
        got = [a for a in argv if a.startswith("--rotate")]
        assert got == want[::2], (rotate, argv)
        if want:
            assert _flag(argv, want[0]) == want[1]
        # the uniform anchors: a learned rotation is each search's own, so they stay unrotated
        uniform = sweep._uniform_argv(args, "fp4_e2m1", tmp_path / "u")
        assert ("--rotate-from" in uniform) is False
        assert ("--rotate" in uniform) == (rotate == "hadamard")
