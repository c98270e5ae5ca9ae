"""``python -m verification`` = the ``mxverify`` CLI."""
import sys

from verification.cli import main

sys.exit(main())
