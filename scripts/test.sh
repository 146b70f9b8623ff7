#!/usr/bin/env bash
# The test command (README "Two commands"; CI runs exactly this): sets up .venv with PyTorch CPU first, then
# tunebench with its test extras; installs Debian's chromium and postgresql when missing (root); starts a
# PostgreSQL server and a local Ray cluster on loopback (scripts/test-services.sh); runs pytest offline.
# Extra arguments go to pytest (bash scripts/test.sh -m 'not slow').
set -euo pipefail
cd "$(dirname "$0")/.."
command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[test]"
. scripts/test-services.sh
export TUNEBENCH_REQUIRE_SERVICES=1  # the PostgreSQL and Ray tests fail instead of skipping
HF_HUB_OFFLINE=1 python -m pytest -q --durations=25 "$@"
