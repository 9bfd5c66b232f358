#!/usr/bin/env bash
# Set up (with test tools) and run the whole check: lint, types, test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check src tests bench scripts
.venv/bin/lint-imports  # the one-way layers and no import cycle (.importlinter)
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
