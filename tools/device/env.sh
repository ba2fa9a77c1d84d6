# Sourced by the scripts here, on the GPU machine, from the project root: the staged libraries before the
# repository (from ~/dcache once staged there, else as carried in .device), the converted model's cache.
staged=~/dcache; [ -d "$staged/site" ] || staged=$PWD/.device
export PYTHONPATH=$staged/extras:$staged/site:$PWD QLORA_BENCH_CACHE=~/qcache HF_HUB_OFFLINE=1
export QLORA_BENCH_GGUF=~/dcache/SmolLM2-135M-Instruct.Q4_1.gguf
export QLORA_BENCH_COMMIT=${QLORA_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}  # the device copy has no .git: pass it
