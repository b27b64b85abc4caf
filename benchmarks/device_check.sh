#!/usr/bin/env bash
# One call on a GPU machine (see DEVELOPERS.md / the device tool): build the extension against the
# image's packages, run the whole test suite (GPU-marked tests included) and the example on the
# GPUs, and time dispatch_layout with both backends. Logs go to $OUT (or ./device_out).
# Usage (repo root, on the GPU machine):  bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export CPLUS_INCLUDE_PATH=/usr/local/cuda/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m;
  python3 -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'
  git rev-parse HEAD 2>/dev/null; } 2>&1 | tee "$OUT/machine.txt"
python3 -m pip install --no-build-isolation -v -e . > "$OUT/build.log" 2>&1
rc_build=$?; tail -5 "$OUT/build.log"; echo "build rc=$rc_build"
python3 -c 'import jaxep, jaxep._cuda as c; print("cuda available:", c.available(), c.unavailable_reason())'
python3 -m pytest tests -v -rs --timeout=600 2>&1 | tee "$OUT/pytest.log" | tail -40
rc_test=${PIPESTATUS[0]}
python3 examples/train_moe.py --devices 4 --steps 60 2>&1 | tee "$OUT/example.log" | tail -5
rc_ex=${PIPESTATUS[0]}
python3 benchmarks/bench_layout.py --json "$OUT/bench_layout.json" 2>&1 | tee "$OUT/bench.log"
echo "build=$rc_build tests=$rc_test example=$rc_ex"
