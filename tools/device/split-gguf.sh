#!/usr/bin/env bash
# split-gguf.sh: the staged GGUF (../shared/device/stage.sh's .device/smol.aa + smol.ab) again in four parts,
# .device/gguf.00 to gguf.03 (~25 MB each). Every device call carries the working tree (results/ included, 19 MB
# on 2026-12-03) within 64 MiB, so a half of the GGUF (49 MB) no longer travels beside it; a quarter does.
set -euo pipefail
cat .device/smol.aa .device/smol.ab > .device/gguf.whole
split -n 4 -d .device/gguf.whole .device/gguf. && rm .device/gguf.whole
ls -l .device/gguf.0?
