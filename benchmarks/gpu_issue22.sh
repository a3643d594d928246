#!/usr/bin/env bash
# Issue 22's GPU measurements in one command: correctness of the packed path on the GPU, then
# step (eager, CUDA graphs, compiled, compiled + graphs; batch 1..4096), recurrent fwd+bwd,
# collector frames/s (GPU actor, CPU envs) and the TF32 variant, each as JSON under $OUT.
#
#   On the device machine (carry .whl, see below):  bash benchmarks/gpu_issue22.sh
#   Here, to check the script end to end on CPU:     bash benchmarks/gpu_issue22.sh --device cpu --quick
#
# Within BUDGET_S seconds (default 470, under 8 minutes): stages run in order of importance,
# each under `timeout` for what is left, and a stage that would start with under 20 s left is
# skipped (logged), so whatever finished is in $OUT. STAGES=step,sequence (say) runs only those. Results (at most 8 files, as the device
# tool returns): run.log (versions, nvidia-smi, test output, tables), step.json,
# step_compiled.json, sequence.json, collector.json, step_tf32.json, collector_compiled.json.
#
# The device machine has python3 with torch (2.11) but not this package's other dependencies
# and no network: they travel as wheels in .whl/ (ignored by git; `carry: [".whl"]` in the run
# call), made here with benchmarks/gpu_wheels.sh. The package itself is not installed (its
# metadata pins a newer torch): it runs from the repo root on PYTHONPATH.
set -uo pipefail

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "usage: $0 [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$(mktemp -d /tmp/gpu_issue22.XXXXXX)}
mkdir -p "$OUT"
LOG="$OUT/run.log"
BUDGET_S=${BUDGET_S:-470}
STAGES=${STAGES:-tests,step,step_compiled,sequence,collector,step_tf32,collector_compiled}
log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND under the smaller of MAX_SECONDS and what is
# left of the budget, its output appended to run.log; skipped with under 20 s left.
stage() {
    local name=$1 max=$2
    shift 2
    case ",$STAGES," in *",$name,"*) ;; *) return ;; esac
    local left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 20 ]; then
        log "SKIPPED $name: ${left}s of the budget left"
        return
    fi
    local limit=$((max < left ? max : left))
    log "START $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    log "END $name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')"
}

source "$ROOT/benchmarks/device_deps.sh" || exit 3
log "gpu_issue22: device=$DEVICE quick=$QUICK out=$OUT python=$PY"

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch, torchrl, tensordict, mop_torchrl
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "torchrl", torchrl.__version__, "tensordict", tensordict.__version__,
      "mop_torchrl", mop_torchrl.__version__, "cores", __import__("os").cpu_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          "cudnn", torch.backends.cudnn.version())
EOF
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 | tee -a "$LOG"
fi

BENCH=("$PY" -m mop_torchrl.cli bench --device "$DEVICE")
# On CPU one thread (this project's 2-core machine is shared: two threads spin against the
# env and other jobs, measured 10-30x slower collector steps); the GPU host keeps torch's own.
[ "$DEVICE" = cpu ] && BENCH+=(--threads 1)
if [ "$QUICK" = 1 ]; then
    # Seconds, not minutes: tiny cores, two batch sizes, one collector env pair in process.
    STEP=(--mop_preset paper --batches 1,16 --repeats 2)
    SEQ=(--mop_preset paper --batch 4 --steps 8 --repeats 2)
    COLL=(--mop_preset paper --task_id GoToRedBall --num_envs 2 --serial --frames 32 --repeats 1)
    TESTS=(-m "not slow")
    COMPILED=packed
else
    STEP=(--batches 1,16,64,256,1024,4096 --repeats 5)
    SEQ=(--batch 256 --steps 32 --repeats 5)
    COLL=(--task_id GoToLocal --num_envs 16 --frames 2048 --repeats 3)
    TESTS=(-m "not slow" -k cuda)
    COMPILED=fused,packed
fi

# 1. The packed path equals the reference on this device (float32, TF32 off), and its step
#    survives CUDA-graph capture and torch.compile.
stage tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_packed.py "${TESTS[@]}"
# 2. Step mode, eager and CUDA graphs, all implementations (the targets' denominators too).
stage step 120 "${BENCH[@]}" step "${STEP[@]}" --out "$OUT/step.json"
# 3. Step mode compiled (inductor, fullgraph) and compiled + CUDA graph: fused and packed.
stage step_compiled 200 "${BENCH[@]}" step "${STEP[@]}" --implementations "$COMPILED" \
    --compile --out "$OUT/step_compiled.json"
# 4. Recurrent mode forward+backward with resets (which path "auto" should take on CUDA).
stage sequence 90 "${BENCH[@]}" sequence "${SEQ[@]}" --out "$OUT/sequence.json"
# 5. Collector frames/s: envs on CPU, actor on the device, eager and as TorchRL's
#    cudagraph_policy (GRUModule's step has a host sync: its graph capture is expected to fail
#    and is reported, not fatal; last, so that a failed capture cannot disturb the others).
stage collector 150 "${BENCH[@]}" collector "${COLL[@]}" \
    --policies random,gru,mop,mop_fused_graph,mop_packed,mop_packed_graph,gru_graph \
    --out "$OUT/collector.json"
# 6. TF32 matmuls (cuDNN's GRU already uses TF32 by default): eager and graphs.
stage step_tf32 60 "${BENCH[@]}" step "${STEP[@]}" --implementations fused,packed --tf32 \
    --out "$OUT/step_tf32.json"
# 7. The actor compiled by the collector (compile_policy), then also graph-captured.
stage collector_compiled 150 "${BENCH[@]}" collector "${COLL[@]}" \
    --policies mop_packed_compiled,mop_packed_compiled_graph --out "$OUT/collector_compiled.json"

log "done in ${SECONDS}s; results in $OUT:"
ls -la "$OUT" | tee -a "$LOG"
