#!/usr/bin/env bash
# The test command: sets up (venv, requirements, build) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k hooks -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest tests "$@"
