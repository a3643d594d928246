#!/usr/bin/env bash
# Issue 23's scale-out target in one command: benchmarks/classic_pomdp.py's default table
# (masked CartPole and Pendulum; GRU, LSTM and MoP with the recipe's defaults; seeds 0-2: 18
# runs) with one process per core, each stopping at its task's target, timed from the first
# run's start to the table and the figure.
#
#   On the device machine (carry .whl, see device_deps.sh):  bash benchmarks/classic_pomdp_16core.sh
#   Here, end to end in about 2.5 min on 2 cores:
#       JOBS=2 FRAMES=1024 bash benchmarks/classic_pomdp_16core.sh
#
# BUDGET_S (default 540) bounds the benchmark (classic_pomdp.py's --budget_s: runs still going
# then stop and save their curves), so the device's 10-minute command limit leaves the results.
# Under $OUT (at most 8 files come back): run.log (machine, versions, each run's line, the
# table, the wall time), runs.tgz (every run's JSON and log), summary.json, classic_pomdp.png.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$(mktemp -d /tmp/classic_pomdp_16core.XXXXXX)}
mkdir -p "$OUT"
LOG="$OUT/run.log"
JOBS=${JOBS:-$(nproc)}
BUDGET_S=${BUDGET_S:-540}
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

source "$ROOT/benchmarks/device_deps.sh" || exit 3
"$PY" -c "import platform, os, torch, torchrl; print('python', platform.python_version(),
'torch', torch.__version__, 'torchrl', torchrl.__version__, 'cores', os.cpu_count())" 2>&1 | tee -a "$LOG"
grep -m1 "model name" /proc/cpuinfo | tee -a "$LOG"

RUNS="$OUT/runs"
FRAMES_ARGS=()
[ -n "${FRAMES:-}" ] && FRAMES_ARGS=(--cartpole_frames "$FRAMES" --pendulum_frames "$FRAMES")
log "classic_pomdp.py --jobs $JOBS --stop_at_target --budget_s $BUDGET_S ${FRAMES_ARGS[*]}"
start=$SECONDS
"$PY" benchmarks/classic_pomdp.py --out "$RUNS" --jobs "$JOBS" --stop_at_target \
    --budget_s "$BUDGET_S" "${FRAMES_ARGS[@]}" --figure "$OUT/classic_pomdp.png" 2>&1 | tee -a "$LOG"
log "runs, table and figure done: $((SECONDS - start)) s from the first run's start"
cp "$RUNS/summary.json" "$OUT/"
tar czf "$OUT/runs.tgz" -C "$RUNS" . && rm -rf "$RUNS"
ls -la "$OUT" | tee -a "$LOG"
