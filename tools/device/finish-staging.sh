#!/usr/bin/env bash
# Second staging call on the GPU machine (../shared/device/README.md; the first copies .device/site and
# .device/smol.aa to ~/dcache): the GGUF's second half, the evaluation text and the extras carried with it, the
# model converted once, then the GPU tests into $OUT/gpu-tests.log.
cp -r .device/data .device/extras .device/smol.ab ~/dcache/
source tools/device/env.sh
cat ~/dcache/smol.aa ~/dcache/smol.ab > "$QLORA_BENCH_GGUF"
python -c "from qlora_core.default_model import ensure_default_model; ensure_default_model('$QLORA_BENCH_GGUF')" \
  > "$OUT/convert.log" 2>&1 || { echo "conversion failed: $OUT/convert.log"; exit 1; }
python -m pytest tests -m "gpu or hqq" -q -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?"; tail -3 "$OUT/gpu-tests.log"
