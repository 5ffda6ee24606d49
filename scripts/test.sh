#!/usr/bin/env bash
# The README's test command: install (or reuse) the venv, then run the whole suite.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
