#!/usr/bin/env bash
# finetune-variants.sh MODE NAME=OPTIONS...: `qlora-bench finetune` of MODE once per variant, each with its own
# options (e.g. tutorial= "one-micro-batch=--batch-size 8 --grad-accum 1"), into bench-results/finetune-variants/NAME,
# packed after each (checkpoints and weights left out) to $OUT/finetune-variants.tar.gz: the same step measured
# under settings that change only how it runs.
source tools/device/env.sh
mode=$1; shift
root=bench-results/finetune-variants
for variant in "$@"; do
  name=${variant%%=*} options=${variant#*=}
  run=$root/$name; rm -rf "$run"; mkdir -p "$run"
  # shellcheck disable=SC2086  # the options are words
  python -m qlora_core.cli finetune --mode "$mode" --gguf "$QLORA_BENCH_GGUF" --out "$run/finetune" $options \
    > "$run/finetune.log" 2>&1; echo "$name finetune exit $?"
  tar czf "$OUT/finetune-variants.tar.gz" --exclude='*.safetensors' --exclude='checkpoint-*' -C bench-results \
    finetune-variants
done
