#!/usr/bin/env bash
# Issue 22 on a machine with several GPUs, one stage per call (each call bounded by DEADLINE s,
# under the device tool's 10 minutes): build against the image's packages, then
#   tests-sp       the single-process GPU tests on every GPU of the machine
#   tests-mp       the multi-process GPU tests (tests/test_multiprocess_gpu.py: process i on GPU i
#                  for N <= GPUs, all on GPU 0 beyond)
#   tests          both of the above
#   bench-normal   bench_normal.py single-process on all GPUs, then the same shapes one process
#                  per GPU (launch_local.py), then process/single per op (compare_process_models.py):
#                  dispatch bf16 / fp8, combine bf16 at T=4096 H=7168 K=8 E=256, cuda and xla
#   bench-ll       the same for bench_ll.py at T=128 (ll dispatch fp8, ll combine bf16, ...)
#   bench-grouped  bench_moe_layer.py on all GPUs (one process) with --no-zero-padding and
#                  grouped_capacity = 1.25 x mean received pairs: dispatch_grouped vs dispatch
#                  (and the layer); MOE_DEFAULT=1 adds a run with the default (never-dropping,
#                  zero-padded) grouped rows
#   all            everything in order (fits one call only with SMOKE=1)
# Usage (repo root):  bash benchmarks/device_multi_gpu.sh [STAGE]
#   on 2 or 4 GPUs, one call each: tests-sp, tests-mp, bench-normal, bench-ll, bench-grouped
#   (OUT=... per call keeps their logs apart); on one GPU: SMOKE=1 bash ... all
# SMOKE=1: for one GPU (~2-3 minutes with `all`, build included): tiny shapes, few calls, the
#   process-per-GPU runs as 2 processes sharing GPU 0 with --backends cuda (XLA collectives fail
#   between processes on one GPU), a few tests; the ratios then compare R=1 with R=2 (plumbing only).
# Env: OUT (logs and JSON; default device_out), DEADLINE (s for the whole call, default 570),
#   CLEAN (1: rm -rf build/ first; default 1 for tests and tests-sp, 0 otherwise and with SMOKE),
#   NPROC (processes of the process-per-GPU runs; default the GPU count, 2 on one GPU),
#   MP_BACKENDS (default cuda,xla with a GPU per process, cuda when they share one),
#   NORMAL_ARGS, LL_ARGS, MOE_ARGS (replace the benchmarks' shape/timing words),
#   SP_FILES, SP_ARGS, MP_ARGS (pytest words), MP_K (a -k expression), SP_BUDGET, MP_BUDGET (s).
# nvshmem4py is not in the image: carry its wheel in .whl/ (as device_multiprocess.sh).
set -uo pipefail
T0=$(date +%s)
OUT=${OUT:-device_out}; mkdir -p "$OUT"
STAGE=${1:-all}
SMOKE=${SMOKE:-0}
DEADLINE=${DEADLINE:-570}
case "$STAGE" in tests|tests-sp|tests-mp|bench-normal|bench-ll|bench-grouped|all) ;;
  *) echo "unknown stage '$STAGE' (tests tests-sp tests-mp bench-normal bench-ll bench-grouped all)"
     exit 2 ;; esac
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0
export CPLUS_INCLUDE_PATH=/usr/local/cuda/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# seconds left of this call; budget N: min(N, what is left less a margin for the steps after it)
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
budget() { local b=$1 l; l=$(( $(left) - ${2:-15} )); [ "$l" -lt "$b" ] && b=$l; echo "$b"; }
declare -A RC
# step NAME SECONDS CMD...: run CMD bounded (skipped if under 20 s are left), log in $OUT/NAME.log
step() {
  local name=$1 b; b=$(budget "$2"); shift 2
  if [ "$b" -lt 20 ]; then echo "== $name: SKIPPED, ${b} s left of DEADLINE=$DEADLINE"; RC[$name]=skipped; return; fi
  echo "== $name (at $(( $(date +%s) - T0 )) s, budget $b s): $*"
  timeout --kill-after=20 "$b" "$@" 2>&1 | tee "$OUT/$name.log" | tail -${TAIL:-45}
  RC[$name]=${PIPESTATUS[0]}
  echo "== $name: rc=${RC[$name]} ($(( $(date +%s) - T0 )) s)"
}

NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .); fi
if [ "$NGPU" -ge 2 ]; then NPROC=${NPROC:-$NGPU}; else NPROC=${NPROC:-2}; fi
if [ "$NGPU" -ge "$NPROC" ]; then GPUMODE=each; MP_BACKENDS=${MP_BACKENDS:-cuda,xla}
else GPUMODE=shared; MP_BACKENDS=${MP_BACKENDS:-cuda}; fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m
  python3 -c 'import jax, sys; print(sys.version); print("jax", jax.__version__, jax.devices())'
  python3 -c 'import nvshmem.core as n; print("nvshmem4py", n.get_version())'
  git rev-parse HEAD 2>/dev/null; date -u
  echo "stage=$STAGE SMOKE=$SMOKE GPUs=$NGPU process-per-GPU runs: $NPROC processes ($GPUMODE)," \
       "backends $MP_BACKENDS"; } 2>&1 | tee "$OUT/machine.txt"

case "$STAGE" in tests|tests-sp) CLEAN_DEFAULT=1 ;; *) CLEAN_DEFAULT=0 ;; esac
[ "$SMOKE" = 1 ] && CLEAN_DEFAULT=0
if [ "${CLEAN:-$CLEAN_DEFAULT}" = 1 ]; then echo "clean build: rm -rf build/"; rm -rf build; fi
tb=$(date +%s)
python3 -m pip install --no-build-isolation -v -e . > "$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc in $(( $(date +%s) - tb )) s"
[ $rc -eq 0 ] || { grep -iE "error" "$OUT/build.log" | head -40; exit 1; }
python3 -c 'import jaxep._cuda as c; print("cuda available:", c.available(), c.unavailable_reason())' \
  2>&1 | tee -a "$OUT/machine.txt"

if [ "$SMOKE" = 1 ]; then
  SP_FILES=${SP_FILES:-tests/test_gpu.py}
  MP_K=${MP_K:-ops_match_oracle and 2}
  export MP_GPU_SIZE=${MP_GPU_SIZE:-small}
  NORMAL_ARGS=${NORMAL_ARGS:---tokens 256 --hidden 1024 --experts 32 --topk 8 --routing random --num-sms none --calls 5 --repeats 3 --unroll 0}
  LL_ARGS=${LL_ARGS:---tokens 16 --hidden 1024 --experts 32 --topk 8 --no-overlap --no-isolated --no-prereduce --calls 5 --repeats 3 --unroll 0}
  MOE_ARGS=${MOE_ARGS:---tokens 256 --hidden 1024 --experts 32 --ffn 256 --iters 5 --repeats 3 --unroll 0}
  SP_B=${SP_BUDGET:-90}; MP_B=${MP_BUDGET:-150}; BENCH_B=90
else
  SP_FILES=${SP_FILES:-tests/test_gpu.py tests/test_gpu_normal.py tests/test_gpu_grouped.py tests/test_gpu_ll.py tests/test_gpu_timeout.py}
  NORMAL_ARGS=${NORMAL_ARGS:---tokens 4096 --hidden 7168 --experts 256 --topk 8 --routing random --num-sms none --calls 50 --repeats 10}
  LL_ARGS=${LL_ARGS:---tokens 128 --hidden 7168 --experts 256 --topk 8 --no-overlap --no-isolated --calls 50 --repeats 10}
  MOE_ARGS=${MOE_ARGS:-}
  SP_B=${SP_BUDGET:-540}; MP_B=${MP_BUDGET:-540}; BENCH_B=240
fi

# single-process, then one process per GPU, same shapes; then process/single per op
compare_models() {  # NAME SCRIPT ARGS
  local name=$1 script=$2 args=$3 b
  step "${name}_single" $BENCH_B python3 "benchmarks/$script" $args --backends cuda,xla \
    --json "$OUT/${name}_single.json"
  b=$(budget $BENCH_B 25)
  step "${name}_multi" $(( b + 20 )) python3 benchmarks/launch_local.py -n "$NPROC" --gpus "$GPUMODE" \
    --timeout "$b" --log-dir "$OUT/${name}_multi_logs" -- \
    python3 "benchmarks/$script" $args --backends "$MP_BACKENDS" --json "$OUT/${name}_multi.json"
  if [ -f "$OUT/${name}_single.json" ] && [ -f "$OUT/${name}_multi.json" ]; then
    TAIL=30 step "${name}_compare" 60 python3 benchmarks/compare_process_models.py \
      "$OUT/${name}_single.json" "$OUT/${name}_multi.json" --json "$OUT/${name}_compare.json"
  else
    echo "== ${name}_compare: SKIPPED (a JSON is missing)"; RC[${name}_compare]=skipped
  fi
}

if [ "$STAGE" = tests ] || [ "$STAGE" = tests-sp ] || [ "$STAGE" = all ]; then
  TAIL=25 step tests_sp "$SP_B" python3 -m pytest $SP_FILES -q -rs --timeout=300 ${SP_ARGS:-}
fi
if [ "$STAGE" = tests ] || [ "$STAGE" = tests-mp ] || [ "$STAGE" = all ]; then
  TAIL=40 step tests_mp "$MP_B" python3 -m pytest tests/test_multiprocess_gpu.py -m gpu -v -rs \
    --timeout=500 ${MP_ARGS:-} ${MP_K:+-k "$MP_K"}
fi
if [ "$STAGE" = bench-normal ] || [ "$STAGE" = all ]; then
  compare_models normal bench_normal.py "$NORMAL_ARGS"
fi
if [ "$STAGE" = bench-ll ] || [ "$STAGE" = all ]; then
  compare_models ll bench_ll.py "$LL_ARGS"
fi
if [ "$STAGE" = bench-grouped ] || [ "$STAGE" = all ]; then
  TAIL=30 step moe_grouped 400 python3 benchmarks/bench_moe_layer.py $MOE_ARGS \
    --grouped-capacity-factor 1.25 --no-zero-padding --out "$OUT/moe_layer_grouped.json"
  if [ "${MOE_DEFAULT:-0}" = 1 ]; then
    TAIL=30 step moe_default 400 python3 benchmarks/bench_moe_layer.py $MOE_ARGS \
      --out "$OUT/moe_layer_default.json"
  fi
fi
echo "== summary ($(( $(date +%s) - T0 )) s, stage $STAGE, SMOKE=$SMOKE):"
status=0
for k in $(printf '%s\n' "${!RC[@]}" | sort); do
  echo "  $k rc=${RC[$k]}"
  case "${RC[$k]}" in 0) ;; *) status=1 ;; esac
done
exit $status
