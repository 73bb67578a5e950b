#!/usr/bin/env bash
# The test command: sets up (venv, requirements, build) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k hooks -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report test renders the HTML page in Debian's chromium; install it when we can (root with
# apt, about 30 s), else that one test skips.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing Debian's chromium for the report rendering test"
  { timeout 300 apt-get install -y -q chromium || { timeout 300 apt-get update -q && timeout 300 apt-get install -y -q chromium; }; } \
    >/tmp/calibfast-chromium.log 2>&1 || echo "[test] could not install chromium (see /tmp/calibfast-chromium.log); its test will skip"
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest tests "$@"
