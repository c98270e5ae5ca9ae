"""Shared by the export and runtime tests (a module, not a fixture, so both test folders
can import it)."""


def demo_search(root, **settings):
    """The short dMX search on the embedded tiny-qwen3 at 6 bits that export and runtime
    tests start from (a mixed MXFP4 + MXFP8 assignment in seconds); ``settings`` go to
    dmx.search.search (e.g. weights_only=True). Returns OUT."""
    from pathlib import Path

    from dmx import data
    from dmx.search import search

    root = Path(root)
    calib = root / "calib.txt"
    calib.write_text(data.default_calibration_file().read_text(encoding="utf-8")[:40000],
                     encoding="utf-8")
    out = root / "dmx-6"
    # the tests export to vLLM's compressed-tensors too, which serves q/k/v and gate/up fused
    settings.setdefault("export_target", "compressed-tensors")
    search(str(data.embedded_model_dir()), 6.0, calib=[calib], steps=4, batch_size=2,
           seqlen=64, samples=8, out=out, progress=False, **settings)
    return out
