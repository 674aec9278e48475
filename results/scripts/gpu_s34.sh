#!/usr/bin/env bash
# Issue 34 on a lent GPU, in one call: does a longer stage 1 find starpilot's action at `small`? On the CPU no run
# of 3,000 steps does. Collects `small` starpilot data from the committed expert (results/s34/expert), then
# runs, all at once on the one GPU (fp32, one CPU thread each), stage 1 at `small` for seeds 0-7 and the supervised
# IDM (the ceiling) for each budget in STEPS (default 12,000 and 3,000 steps); every run is cut at a deadline
# (DEADLINE_S after the start, for the 15-minute lease), then `stage1_share.py report` and `archive` on each budget.
# Results in $OUT/s34gpu.tgz (the device tool brings back only a few files). On an H200 (2026-12-04) the 18 runs
# together made about 480 samples/s each (about 8,900 in all): in the 457 s left to them the 3,000-step runs
# finished and the 12,000-step ones reached step 3,400, so a lease holds about 60,000 steps of `small` in all.
#
#   run(command="bash results/scripts/gpu_s34.sh", carry=[".whl", ".gl"], timeout_s=590)
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu_s34}
. "$(dirname "$0")/gpu_env.sh"
D=/tmp/s34/data R=/tmp/s34/runs
mkdir -p "$R" "$OUT/s34gpu/logs"
echo "== collect (from $(( $(date +%s) - T0 )) s)"
timeout 120 python3 lapo.py collect --preset small --env starpilot --policy results/s34/expert/expert.pt --out $D \
  --device cuda 2>&1 | tail -4 | tee "$OUT/s34gpu/collect.log"
cp $D/starpilot/collect_summary.json "$OUT/s34gpu/" 2>/dev/null
left=$(( T0 + ${DEADLINE_S:-480} - $(date +%s) )); [ "$left" -ge 60 ] || left=60  # (timeout 0: no limit)
echo "== stage 1, 9 runs per budget at once, $left s left for them"
export OMP_NUM_THREADS=1
for steps in ${STEPS:-12000 3000}; do
  share=(python3 results/scripts/stage1_share.py run $D/starpilot $R/s$steps
         --flags "--device cuda --stage1-steps $steps")
  timeout $left "${share[@]}" --seeds 0 --amp "" > "$OUT/s34gpu/logs/sup-$steps.log" 2>&1 &
  for s in 0 1 2 3 4 5 6 7; do
    timeout $left "${share[@]}" --seeds $s --amp off --no-sup > "$OUT/s34gpu/logs/off-s$s-$steps.log" 2>&1 &
  done
done
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv | tee "$OUT/s34gpu/nvidia-smi.txt"
wait
unset OMP_NUM_THREADS
echo "== report (from $(( $(date +%s) - T0 )) s)"
for steps in ${STEPS:-12000 3000}; do
  timeout 60 python3 results/scripts/stage1_share.py report $D/starpilot $R/s$steps > "$OUT/s34gpu/s$steps.report.md" \
    2>&1 &
done
wait
for steps in ${STEPS:-12000 3000}; do
  tail -4 "$OUT/s34gpu/s$steps.report.md"
  python3 results/scripts/stage1_share.py archive $D/starpilot $R/s$steps --archive "$OUT/s34gpu/s$steps" > /dev/null
  for run in $R/s$steps/*; do  # unfinished runs too: their probe so far
    kept="$OUT/s34gpu/s$steps/$(basename $run)"; mkdir -p "$kept"
    [ -f "$kept/metrics.jsonl" ] || cp $run/metrics.jsonl "$kept/"
  done
done
(cd "$OUT" && tar czf s34gpu.tgz s34gpu && rm -rf s34gpu)
echo "== done at $(( $(date +%s) - T0 )) s"
