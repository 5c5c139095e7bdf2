#!/usr/bin/env bash
# Quick start 2: set up and run the whole test suite (unit, graph-diff, parity, and the slow
# real-model tests on SmolLM2-135M). Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
