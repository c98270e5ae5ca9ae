"""``python -m dmx.export OUT --to ... -o DIR`` is ``dmx export`` (dmx.cli's error frame)."""
import sys

from dmx.cli import main

sys.exit(main(["export", *sys.argv[1:]]))
