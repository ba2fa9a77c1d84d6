#!/usr/bin/env bash
# frontier.sh NAME [qlora-bench frontier options]: `qlora-bench frontier --measure` into bench-results/NAME on
# the GPU machine (probe cells under each capacity as a hard cap), its log and the shell's timing beside it,
# packed to $OUT/NAME.tar.gz. Shape-only: needs the staged libraries, not the model.
# PRIOR=<an earlier call's NAME.tar.gz, carried under .device/>: unpacked first, so `--resume` keeps the probes
# that call finished (a machine that went cold between calls kept nothing) and frontier.json holds them all.
# LIMIT_S (default 570): the frontier stops there, its probe cells with it (timeout signals its process group),
# so what finished is packed before the device's 10-minute limit cuts the call and nothing would come back.
source tools/device/env.sh
name=$1; shift
out=bench-results/$name
mkdir -p bench-results
if [ -n "${PRIOR:-}" ]; then tar xzf "$PRIOR" -C bench-results; fi
start=$(date +%s%N)
timeout --kill-after=10 "${LIMIT_S:-570}" python -m qlora_core.cli frontier --measure --device cuda --out "$out" "$@" > "bench-results/$name.log" 2>&1
status=$?
end=$(date +%s%N)
mkdir -p "$out" && mv "bench-results/$name.log" "$out/frontier.log"
echo "wall_seconds $(python3 -c "print(($end - $start) / 1e9)") exit $status" > "$out/shell-wall.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv > "$out/nvidia-smi.csv"
tar czf "$OUT/$name.tar.gz" -C bench-results "$name"
tail -3 "$out/frontier.log"; cat "$out/shell-wall.txt"
