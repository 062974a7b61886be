#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler (nvcc) from PyPI into a virtual environment outside
# the source tree, so that build.rs can compile kernels/*.cu without a system CUDA toolkit.
#
# Idempotent: a second run finds the venv with the right pins and only prints the nvcc path.
# The venv lives in $RLHF_KERNELS_NVCC_VENV (default ~/.cache/rlhf-kernels/nvcc-venv);
# build.rs looks there too, so after this script `cargo build` compiles the kernels.
#
# All five wheels are pinned on purpose: nvidia-nvvm and nvidia-cuda-crt are unpinned
# dependencies of the nvcc wheel, and their newest releases emit PTX that the 13.0 ptxas
# rejects ("Unsupported .version").
set -euo pipefail

venv="${RLHF_KERNELS_NVCC_VENV:-${HOME}/.cache/rlhf-kernels/nvcc-venv}"
python="${PYTHON:-python3}"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
)
stamp="$venv/.rlhf-kernels-pins"
nvcc="$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ] && compgen -G "$nvcc" >/dev/null; then
  echo "nvcc already installed (pins match)" >&2
else
  mkdir -p "$(dirname "$venv")"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${pins[@]}"
  echo "${pins[*]}" >"$stamp"
fi

path=$(compgen -G "$nvcc" | head -n 1)
"$path" --version | tail -n 2 >&2
echo "$path"
