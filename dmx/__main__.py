"""``python -m dmx ...`` is the ``dmx`` command."""
import sys

from dmx.cli import main

sys.exit(main())
