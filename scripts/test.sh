#!/usr/bin/env bash
# Install everything the suite needs (torch pinned to the CPU build), then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[test]"
python -m pytest -q "$@"
