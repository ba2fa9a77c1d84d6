#!/usr/bin/env bash
# bench-run.sh NAME [pytest options]: one `pytest bench/` run into bench-results/NAME on the GPU machine, with
# the shell's timing (shell-wall.txt) and the GPU (nvidia-smi.csv) beside its results, packed to $OUT/NAME.tar.gz.
source tools/device/env.sh
name=$1; shift
out=bench-results/$name
mkdir -p "$out"
start=$(date +%s%N)
python -m pytest bench/ --benchmark-only --bench-eval-text ~/dcache/data/wiki.test.raw --bench-out "$out" \
  --benchmark-json="$out/pytest-benchmark.json" "$@" > "$out/pytest.log" 2>&1
status=$?
end=$(date +%s%N)
echo "wall_seconds $(python3 -c "print(($end - $start) / 1e9)") exit $status" > "$out/shell-wall.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > "$out/nvidia-smi.csv"
tar czf "$OUT/$name.tar.gz" -C bench-results "$name"
tail -1 "$out/pytest.log"; cat "$out/shell-wall.txt"
