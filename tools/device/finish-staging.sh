#!/usr/bin/env bash
# Last staging call on the GPU machine (tools/device/README.md; the ones before copied the GGUF's halves to
# ~/dcache): whatever of site/, data/, extras/ and smol.ab this call carried copied to ~/dcache too, the GGUF
# joined, the model converted once, then the GPU tests into $OUT/gpu-tests.log.
for part in site data extras smol.ab; do
  if [ -e ".device/$part" ]; then cp -r ".device/$part" ~/dcache/; fi
done
source tools/device/env.sh
cat ~/dcache/smol.aa ~/dcache/smol.ab > "$QLORA_BENCH_GGUF"
python -c "from qlora_core.default_model import ensure_default_model; ensure_default_model('$QLORA_BENCH_GGUF')" \
  > "$OUT/convert.log" 2>&1 || { echo "conversion failed: $OUT/convert.log"; exit 1; }
python -m pytest tests -m "gpu or hqq" -q -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?"; tail -3 "$OUT/gpu-tests.log"
