"""Checks of the dmx command line shared by its test modules."""
from dmx.cli import main


def fails(capsys, argv, match: str, parent=None):
    """main(argv) exits 2 with one stderr line containing ``match`` and leaves nothing
    new in ``parent`` (no OUT, no temp dirs)."""
    before = sorted(p.name for p in parent.iterdir()) if parent else None
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("dmx: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    if parent:
        assert sorted(p.name for p in parent.iterdir()) == before
