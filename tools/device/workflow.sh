#!/usr/bin/env bash
# workflow.sh MODE...: the classic workflow (finetune -> generate -> merge) per mode into bench-results/workflow,
# packed after each mode (merged weights and checkpoints left out) to $OUT/workflow.tar.gz, so a cut-off keeps
# every finished mode.
source tools/device/env.sh
root=bench-results/workflow
for mode in "$@"; do
  run=$root/$mode; mkdir -p "$run"
  python -m qlora_core.cli finetune --mode "$mode" --gguf "$QLORA_BENCH_GGUF" --out "$run/finetune" \
    > "$run/finetune.log" 2>&1; echo "$mode finetune exit $?"
  python -m qlora_core.cli generate --mode "$mode" --gguf "$QLORA_BENCH_GGUF" --adapter "$run/finetune/adapter" \
    > "$run/generate.log" 2>&1; echo "$mode generate exit $?"
  python -m qlora_core.cli merge --mode "$mode" --gguf "$QLORA_BENCH_GGUF" --adapter "$run/finetune/adapter" \
    --out "$run/merged" > "$run/merge.log" 2>&1; echo "$mode merge exit $?"
  cp "$run/merged/merge-report.json" "$run/" 2>/dev/null
  tar czf "$OUT/workflow.tar.gz" --exclude='*.safetensors' --exclude=merged --exclude='checkpoint-*' \
    -C bench-results workflow
done
