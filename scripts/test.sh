#!/usr/bin/env bash
# The README's test command (same as .ci/run); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install "torch==2.13.0" -e ".[test]" && python -m pytest -q "$@"
