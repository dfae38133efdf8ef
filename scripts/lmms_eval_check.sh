#!/usr/bin/env bash
# lmms-eval as a client, end to end: install it beside the project's torch (no dependencies of
# its own; lmms-requirements.txt pins what it imports), then run the test that compares
# `lmms-eval --model lsg` with eval.py on the exported shapes split, per question.
#   bash scripts/lmms_eval_check.sh        (in the project's venv; about 4 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps -r lmms-requirements.txt
pip install -q --no-deps -e .          # refresh the lmms_eval.models entry point
python -m pytest -q tests/test_lmms_eval.py
