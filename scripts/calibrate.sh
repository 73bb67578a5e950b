#!/usr/bin/env bash
# The main job: sets up (venv, requirements, build), then calibrates the embedded default
# (all-MiniLM-L6-v2 over Python's own documentation). Extra arguments go to `calibfast`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec calibfast "$@"
