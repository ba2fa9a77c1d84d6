#!/usr/bin/env bash
# pack-tree.sh: the committed tree at HEAD (results/ left out) as .device/tree.tar, and the commit it is, so a
# device run measures exactly one commit even while the working tree holds uncommitted edits (the device call
# carries the working tree as it is). Prints the command prefix the device calls start with.
set -euo pipefail
mkdir -p .device
git archive HEAD --format=tar -o .device/tree.tar $(git ls-tree --name-only HEAD | grep -v '^results$')
commit=$(git rev-parse HEAD)
echo "export QLORA_BENCH_COMMIT=$commit; cd ~/tree &&"
