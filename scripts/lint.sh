#!/usr/bin/env bash
# Maintainer checks, run by CI after the tests: ruff (lint and format) and mypy.
#   bash scripts/lint.sh          (inside the venv scripts/test.sh made)
# The layering, cycle, size and complexity rules are tests (tests/test_architecture.py).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff check"
ruff check .
echo "== ruff format --check"
ruff format --check .
echo "== mypy"
# passes/ and kernels/ install as onnxopt.passes / onnxopt.kernels (package-dir); mypy cannot
# follow setuptools' editable finder, so it checks a tree of links laid out as installed.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/onnxopt"
for entry in onnxopt/*; do ln -s "$PWD/$entry" "$tree/onnxopt/"; done
ln -s "$PWD/passes" "$tree/onnxopt/passes"
ln -s "$PWD/kernels" "$tree/onnxopt/kernels"
(cd "$tree" && mypy --config-file "$OLDPWD/pyproject.toml" -p onnxopt) | sed "s#$tree/##g"
