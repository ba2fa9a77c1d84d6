#!/usr/bin/env bash
# pack-tree.sh [COMMIT]: the committed tree at COMMIT (default HEAD; results/ left out) as .device/tree.tar, and
# the commit it is, so a device run measures exactly one commit even while the working tree holds uncommitted
# edits (the device call carries the working tree as it is), or an earlier one whose probes a run resumes.
# Prints the command prefix the device calls start with.
set -euo pipefail
rev=${1:-HEAD}
mkdir -p .device
git archive "$rev" --format=tar -o .device/tree.tar $(git ls-tree --name-only "$rev" | grep -v '^results$')
commit=$(git rev-parse "$rev^{commit}")
echo "export QLORA_BENCH_COMMIT=$commit; cd ~/tree &&"
