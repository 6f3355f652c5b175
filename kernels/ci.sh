#!/usr/bin/env bash
# CI compile check of the CUDA kernels (no GPU needed): installs NVRTC, the CUDA headers and
# ptxas from PyPI into .venv-cuda/ (versions pinned, so that docs/kernels.md is reproducible),
# then runs kernels/check.py, which fails on any compile error, warning or register spill and
# rewrites docs/kernels.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-cuda/bin/python ]; then
  python3 -m venv .venv-cuda
fi
.venv-cuda/bin/python -m pip install -q --disable-pip-version-check \
  nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-nvcc-cu12==12.9.86
.venv-cuda/bin/python kernels/check.py
