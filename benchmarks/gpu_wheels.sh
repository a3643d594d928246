#!/usr/bin/env bash
# Downloads (here, where pip reaches an index) the wheels that benchmarks/gpu_issue22.sh needs
# on the device machine: its python3 (3.12) has torch but not the rest of this package's
# dependencies, and it cannot download. They go to .whl/ (ignored by git, about 17 MB); pass
# `carry: [".whl"]` to the device run. Versions: what this package's venv runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl \
    torchrl==0.14.1 tensordict==0.14.3 pyvers==0.2.3 hoptorch==0.1.4 orjson==3.13.0 \
    importlib_metadata==10.2.0 lazy-importer==0.1.0 gymnasium==1.4.0 \
    farama-notifications==0.0.6 minigrid==3.2.0 pygame-ce==2.5.8
ls .whl
