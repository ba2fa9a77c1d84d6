#!/usr/bin/env bash
# Last staging call on the GPU machine (tools/device/README.md; the ones before copied the GGUF's parts,
# split-gguf.sh's gguf.00 to gguf.03, to ~/dcache): whatever of site/, data/ and extras/ this call carried copied
# to ~/dcache too, the GGUF joined, the model converted once, then the GPU tests into $OUT/gpu-tests.log.
for part in site data extras; do
  if [ -e ".device/$part" ]; then cp -r ".device/$part" ~/dcache/; fi
done
source tools/device/env.sh
cat ~/dcache/gguf.0? > "$QLORA_BENCH_GGUF"
python -c "from qlora_core.default_model import ensure_default_model; ensure_default_model('$QLORA_BENCH_GGUF')" \
  > "$OUT/convert.log" 2>&1 || { echo "conversion failed: $OUT/convert.log"; exit 1; }
python -m pytest tests -m "gpu or hqq" -q -p no:cacheprovider > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?"; tail -3 "$OUT/gpu-tests.log"
