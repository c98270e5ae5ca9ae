import sys

from mxref.cli import main

sys.exit(main())
