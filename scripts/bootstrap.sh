#!/usr/bin/env bash
# Creates .venv with improto and its test extras; safe to run again (it only fills gaps).
# Sourced by scripts/test and scripts/serve.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "improto needs Python >= 3.11 as '$PY' (set PYTHON=...)" >&2
    exit 1
fi
if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' 2>/dev/null; then
    # Debian's python3 ships venv/ensurepip separately.
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.improto-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip 'setuptools>=70' wheel
    .venv/bin/python -m pip install -q -e '.[production,test]'
    touch "$stamp"
fi
