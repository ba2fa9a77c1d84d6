#!/usr/bin/env bash
# workflow.sh MODE...: the classic workflow (finetune -> generate -> merge) per mode into bench-results/workflow,
# packed after each mode (merged weights and checkpoints left out) to $OUT/workflow.tar.gz, so a cut-off keeps
# every finished mode. A mode's folder is made afresh (finetune refuses to overwrite checkpoints). Extra finetune
# options in $FINETUNE_OPTIONS, e.g. FINETUNE_OPTIONS="--profile-steps 3" to profile each mode's last 3 steps.
source tools/device/env.sh
root=bench-results/workflow
for mode in "$@"; do
  run=$root/$mode; rm -rf "$run"; mkdir -p "$run"
  # shellcheck disable=SC2086  # the options are words
  python -m qlora_core.cli finetune --mode "$mode" --gguf "$QLORA_BENCH_GGUF" --out "$run/finetune" \
    $FINETUNE_OPTIONS > "$run/finetune.log" 2>&1; echo "$mode finetune exit $?"
  python -m qlora_core.cli generate --mode "$mode" --gguf "$QLORA_BENCH_GGUF" --adapter "$run/finetune/adapter" \
    > "$run/generate.log" 2>&1; echo "$mode generate exit $?"
  python -m qlora_core.cli merge --mode "$mode" --gguf "$QLORA_BENCH_GGUF" --adapter "$run/finetune/adapter" \
    --out "$run/merged" > "$run/merge.log" 2>&1; echo "$mode merge exit $?"
  cp "$run/merged/merge-report.json" "$run/" 2>/dev/null
  tar czf "$OUT/workflow.tar.gz" --exclude='*.safetensors' --exclude=merged --exclude='checkpoint-*' \
    -C bench-results workflow
done
