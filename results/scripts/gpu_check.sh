#!/usr/bin/env bash
# The checks for a lent GPU, in one call (the lease is 15 minutes, its start included): bench at `paper`, a real
# `paper` stage-1 run for its throughput and its own estimate of 50,000 steps, and the test suite with CUDA visible.
# Each part has its own time limit; everything goes to $OUT. gpu_env.sh installs Procgen and gym (see there for
# what to carry). SUITE=0 skips the suite. E.g. through the device tool:
#
#   run(command="bash results/scripts/gpu_check.sh", carry=[".whl", ".gl"], timeout_s=570)
set -u
OUT=${OUT:-/tmp/gpu_check}
. "$(dirname "$0")/gpu_env.sh"

echo "== bench --preset paper --device cuda"
timeout 150 python3 tools/bench.py --preset paper --device cuda --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"

echo "== stage 1 at paper on random-play starpilot: the loop's own rate and time left for 50,000 steps"
D=/tmp/gpu_data; rm -rf $D
timeout 40 python3 lapo.py collect --preset paper --env starpilot --frames 65536 --test-frames 8192 --out $D \
  2>&1 | tail -3 | tee "$OUT/collect.log"
timeout 100 python3 lapo.py stage1 --preset paper --data $D/starpilot --out /tmp/gpu_run --device cuda \
  --log-every 100 2>&1 | tee "$OUT/stage1.log"

[ "${SUITE:-1}" = 0 ] && exit 0
echo "== the suite with CUDA visible (av is not on the image: its tests skip)"
timeout 170 python3 -m pytest -q -n 12 -p no:cacheprovider --tb=line -rfE test_lapo.py > "$OUT/pytest.log" 2>&1
tail -40 "$OUT/pytest.log"
