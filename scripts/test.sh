#!/usr/bin/env bash
# The README's test command: install (or reuse) the venv and the browser, then run the whole suite.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
# The story page is checked in a real headless Chromium (Debian's; playwright drives it).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian's chromium for the browser test..."
        (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null
    else
        echo "warning: no chromium on PATH and no root apt-get; the browser test will fail" >&2
    fi
fi
# The linter and the formatter first (configured in pyproject.toml): CI fails on either.
ruff check .
ruff format --check .
exec python -m pytest "$@"
