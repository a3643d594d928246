# Sourced by the device-machine scripts (benchmarks/gpu_issue22.sh, classic_pomdp_16core.sh):
# sets PY (the repo's .venv where there is one, else python3), puts the repo on PYTHONPATH (the
# package is not installed there: its metadata pins a newer torch than the machine's) and, where
# torchrl/tensordict/minigrid do not import (the device machine has torch and no network),
# installs the wheels carried in .whl/ (made here by benchmarks/gpu_wheels.sh) into /tmp/site.
# Needs ROOT (the repo root) and a `log` function; returns 3 when the wheels are needed and absent.
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
if ! "$PY" -c "import torchrl, tensordict, minigrid" 2>/dev/null; then
    if ! ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        log "torchrl/tensordict/minigrid missing and no .whl/ carried: run benchmarks/gpu_wheels.sh here and carry .whl"
        return 3
    fi
    log "installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$ROOT"/.whl/*.whl 2>&1 | tail -3
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
