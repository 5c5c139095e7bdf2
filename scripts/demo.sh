#!/usr/bin/env bash
# Quick start 1: set up, compile the default model (SmolLM2-135M-Instruct) and chat with it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh export
out="out/smollm2-135m-instruct"
if [ ! -f "$out/manifest.json" ]; then
  .venv/bin/twophase compile smollm2-135m-instruct -o "$out"
fi
.venv/bin/twophase inspect "$out"
prompt="${1:-What are the three primary colors? Answer in two sentences.}"
echo; echo ">>> $prompt"
.venv/bin/twophase run "$out" --chat --prompt "$prompt" --max-new-tokens 96 --stats
