"""``python -m dmx.export OUT --to ... -o DIR`` (same as ``dmx export``)."""
import sys

from dmx.export import main

sys.exit(main())
