#!/usr/bin/env bash
# Create .venv (if missing) and install twophase with the given extras, e.g. `scripts/setup.sh dev`.
# torch is pinned to 2.13.0 (the CPU build) by pyproject.toml's [export] extra, so pip never
# resolves an unpinned (multi-GB CUDA) torch.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-export}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
