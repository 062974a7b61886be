#!/usr/bin/env bash
# Installs (once) the Python environment the Python package is built and tested in: maturin,
# pytest and PyTorch from PyPI (the CUDA wheels; the tests run on the CPU without a GPU).
# Prints the environment's python on stdout; idempotent (a complete environment is reused).
# RLHF_KERNELS_PY_VENV overrides where it lives.
set -euo pipefail
venv=${RLHF_KERNELS_PY_VENV:-$HOME/.cache/rlhf-kernels/py-venv}
pins=(
  "torch==2.15.0"
  "maturin==1.16.0"
  "pytest==9.2.0"
  "numpy==2.4.6"
)
stamp="$venv/.complete-$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${pins[@]}" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
