#!/usr/bin/env bash
# Issues 34 and 36: every run still to do, in priority order, one at a time (a `small` stage-1 run takes 14-30 minutes
# on 2 cores; 28-30 on the AMX Xeon on 2026-12-03). Each job skips what is finished and resumes what was interrupted,
# so rerun the same command after a session ends. After each stage-1 job the report rows go to results/s34/<video>/
# (commit them: run folders outside the repository did not survive between sessions).
#
#   bash results/scripts/next_runs.sh ROOT        # ROOT: data and run folders, e.g. /work/exp
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${1:?usage: next_runs.sh ROOT}
D=$ROOT/s34/data
share() { python results/scripts/stage1_share.py "$@"; }
keep() {  # report (caches each new run's row) and archive the rows into the repository; $2: the ceiling, where the
  # folder holds no sup-s<seed> run (sprite's was measured elsewhere; starpilot's sup-s0 runs first)
  share report "$D/$1" "$ROOT/s34/$1" ${2:+--ceiling "$2"} > "$ROOT/s34/$1.report.md"
  tail -8 "$ROOT/s34/$1.report.md"
  share archive "$D/$1" "$ROOT/s34/$1" --archive "results/s34/$1" > /dev/null
}
bf16=$(python -c "import torch, lapo; print(int(lapo.bf16_fast(torch.device('cpu'))))")
spread=(--script results/scripts/vq_knobs.py --flags "--log-spread 1")  # plain stage 1, bit-identical, spread logged
decode() {  # issue 36: stages 2 and 3 (offline) on a finished stage-1 run $2 of video $1, at the labels $3, with the
  # run's seed (the fork's labeled windows are lapo.labeled_centres(train, N, seed): stage 3 at that seed reads them)
  local dir=$ROOT/s34/$1/$2 seed=${2##*-s}
  if [ ! -f "$dir/stage1.pt" ] && [ ! -f "$dir/stage3_offline_summary.json" ]; then  # restored from the archive
    echo "skip decoding $dir: its stage1.pt was not kept (delete $dir to train it again)"; return 0; fi
  [ -f "$dir/stage3_offline_summary.json" ] || rm -f "$dir"/decoded_*.pt "$dir"/bc_*.pt  # stage 3 does not resume
  [ -f "$dir/stage2_summary.json" ] || python lapo.py stage2 --preset small --data "$D/$1" --out "$dir" \
    --seed "$seed" $([ -f "$dir/stage2.pt" ] && echo --resume)
  [ -f "$dir/stage3_offline_summary.json" ] || python lapo.py stage3 --mode offline --preset small --data "$D/$1" \
    --out "$dir" --seed "$seed" --labels "$3" --eval-episodes 64
  share archive "$D/$1" "$ROOT/s34/$1" --archive "results/s34/$1" > /dev/null
}

# finished runs come back from the repository's archive (their rows, summaries and metrics; not their checkpoints), so
# a new checkout skips them
for v in sprite starpilot bossfight; do
  if [ -d "results/s34/$v" ]; then  # (|| true: cp -n exits 1 on a skipped file in coreutils 9.2+)
    mkdir -p "$ROOT/s34/$v"; cp -rn "results/s34/$v/." "$ROOT/s34/$v/" || true; fi
done

# issue 34, sprite: bf16 belongs on hosts with bf16 units (AVX-512 BF16, AMX); fp32 anywhere (all 16 runs are done)
[ -d "$D/sprite" ] || share sprite "$D"
if [ "$bf16" = 1 ]; then for s in 0 1 2 3 4 5 6 7; do
  share run "$D/sprite" "$ROOT/s34/sprite" --seeds $s --amp on --no-sup "${spread[@]}"; keep sprite 0.908; done; fi
for s in 5 6 7 0 1 2 3 4; do share run "$D/sprite" "$ROOT/s34/sprite" --seeds $s --amp off --no-sup "${spread[@]}"
  keep sprite 0.908; done

# issue 34 and 36, starpilot: the expert and its data. The expert is only the data's source, so it trains in bf16 where
# the host has bf16 units: 330 against 168 frames/s in fp32 on an Intel Xeon with AMX (model 167), 24 min on model 17
expert_data() {  # a `small` expert on game $1 in $ROOT/s34/$2 (restored from, and kept in, results/s34/$2; resumed
  # when interrupted), then its data in $D/$1
  local x=$ROOT/s34/$2
  mkdir -p "$ROOT/s34"; [ -d "$x" ] || [ ! -d "results/s34/$2" ] || cp -r "results/s34/$2" "$x"
  [ -f "$x/expert_summary.json" ] || python lapo.py expert --preset small --env "$1" --out "$x" \
    $([ -f "$x/expert_state.pt" ] && echo --resume) $([ "$bf16" = 1 ] && echo --amp on)
  mkdir -p "results/s34/$2"; cp "$x"/{expert.pt,expert_summary.json,metrics.jsonl} "results/s34/$2/"
  [ -f "$D/$1/collect_summary.json" ] || python lapo.py collect --preset small --env "$1" --policy "$x/expert.pt" \
    --out "$D"
}
expert_data starpilot expert
share run "$D/starpilot" "$ROOT/s34/starpilot" --seeds 0 --amp ""  # the ceiling alone (it takes no --log-spread)
if [ "$bf16" = 1 ]; then  # bf16 seed 0 (run on the AMX host, 2026-12-03; seeds 1-7 come after issue 36's runs)
  share run "$D/starpilot" "$ROOT/s34/starpilot" --seeds 0 --amp on --no-sup "${spread[@]}"; keep starpilot; fi

# issues 36 and 34: plain stage 1 in fp32 (issue 34's distribution, issue 36's baseline) and the fork at 256 stage-1
# labels, seed by seed, each with stages 2 and 3 at equal labels; then the fork at 1,024 and 64 labels
fork() {  # on video $1, the fork at $3 stage-1 labels, seed $2, then its stages 2 and 3 at those labels
  share run "$D/$1" "$ROOT/s34/$1" --seeds "$2" --amp off --no-sup --script examples/few_labels.py \
    --flags "--stage1-labels $3" --name "fork$3"; keep "$1"; decode "$1" "fork${3}_off-s$2" "$3"
}
plain_then_fork() {  # on video $1, seed $2: plain stage 1 in fp32, decoded at the labels $3, then the fork at 256
  share run "$D/$1" "$ROOT/s34/$1" --seeds "$2" --amp off --no-sup "${spread[@]}"; keep "$1"
  decode "$1" "off-s$2" "$3"; fork "$1" "$2" 256
}
for s in 0 1 2; do plain_then_fork starpilot $s 64,256,1024; done
for n in 1024 64; do for s in 0 1 2; do fork starpilot $s $n; done; done
python results/scripts/few_labels_report.py "$ROOT/s34/starpilot" | tee "$ROOT/s34/few_labels.report.md"

# issue 36 on a game used for nothing else: bossfight, expert data as on starpilot, the fork at 256 labels. Random play
# showed too little of the action at `small`: the supervised IDM read 0.147 against a majority of 0.063 on chaser and
# nothing above majority (0.079) on bossfight, so both stopped at their ceiling, before any plain or fork run
# (results/s34/chaser, results/s34/bossfight-random). The expert trains in bf16 where the host has bf16 units, and is
# kept in results/s34/expert-bossfight. The block is skipped when the ceiling is less than 0.10 above majority (it was
# 0.15 until the ceiling read 0.137 above majority on 2026-12-03; the guard is there to skip a game that shows nothing
# of the action, as chaser's 0.084 and random bossfight's 0.000 did, and 0.137 is a readable action).
expert_data bossfight expert-bossfight
share run "$D/bossfight" "$ROOT/s34/bossfight" --seeds 0 --amp ""
if python -c "import json, sys; s = json.load(open(sys.argv[1])); m = s['probe_acc'] - s['probe_majority']
sys.exit(f'bossfight: the ceiling is {m:.3f} above majority: skipped' if m < 0.10 else 0)" \
  "$ROOT/s34/bossfight/sup-s0/stage1_summary.json"; then
  for s in 0 1 2; do plain_then_fork bossfight $s 256; done
  python results/scripts/few_labels_report.py "$ROOT/s34/bossfight" --labels 256 | tee "$ROOT/s34/bossfight.report.md"
fi

# issue 34: bf16 seeds 1-7 first where the host has bf16 units (a host without them cannot run these), fp32 seeds 3-7
if [ "$bf16" = 1 ]; then for s in 1 2 3 4 5 6 7; do
  share run "$D/starpilot" "$ROOT/s34/starpilot" --seeds $s --amp on --no-sup "${spread[@]}"; keep starpilot
done; fi
for s in 3 4 5 6 7; do share run "$D/starpilot" "$ROOT/s34/starpilot" --seeds $s --amp off --no-sup "${spread[@]}"
  keep starpilot; done

# issue 34: the knob the trunk screens point to, the paper's lr, as a screen only: plain fp32 finds sprite's action on 7
# of 8 seeds, so no knob can pass the rule there (>= 3 more of 8 on both videos). Starpilot seeds 0-2 pair with plain
# (does the lr move starpilot's probe at all), sprite seed 6 is plain's one collapse, seeds 3 and 7 its slowest finds
for r in "starpilot 0" "starpilot 1" "starpilot 2" "sprite 6" "sprite 3" "sprite 7"; do read -r v s <<< "$r"
  share run "$D/$v" "$ROOT/s34/$v" --seeds "$s" --amp off --no-sup --script results/scripts/vq_knobs.py \
    --flags "--log-spread 1 --lr 3e-4" --name lr3e-4; keep "$v" $([ "$v" = sprite ] && echo 0.908)
done

# every run so far, one figure (issue 34): results/s34/share.png
python results/scripts/share_plot.py results/s34/share.png
