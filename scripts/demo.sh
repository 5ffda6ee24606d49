#!/usr/bin/env bash
# The README's main-job command: install (or reuse) the venv, then run the demo on the
# embedded tiny model. Extra arguments go to `seedstory demo` (e.g. --prompt, --out).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec seedstory demo "$@"
