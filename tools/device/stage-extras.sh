#!/usr/bin/env bash
# Run after ../shared/device/stage.sh, from the project root: stages in .device/extras what pyproject asks for and
# the GPU image lacks beyond stage.sh's site/: pytest-benchmark 5.3.1 (the image has 5.2.3), hqq 0.2.8 with
# einops and termcolor (the [hqq] extra; hqq ships only an sdist, built here as a pure wheel: DISABLE_CUDA=1 skips
# its CUDA kernels), and nvidia-ml-py (NVML, through which each timed step records the GPU's clock, temperature
# and power); and liger-kernel (the [liger] extra: the lean path's fused kernels, issue 14; pure Python, its Triton
# is the image's). A folder of its own: site/ and the GGUF's first half already fill one call's 64 MiB.
set -euo pipefail
site=${1:-.device}/extras
mkdir -p "$site"
wheels=$(mktemp -d)
pip download -q --no-deps -d "$wheels" pytest-benchmark==5.3.1 einops termcolor nvidia-ml-py liger-kernel==0.8.5
DISABLE_CUDA=1 pip wheel -q --no-deps -w "$wheels" hqq==0.2.8
for wheel in "$wheels"/*.whl; do python -m zipfile -e "$wheel" "$site"; done
rm -rf "$wheels"
du -sh "$site"
