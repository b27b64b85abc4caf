#!/usr/bin/env bash
# Kernel-level device time of dispatch_layout (both backends) with Nsight Compute, on GPU 0:
# every kernel of 3 chained calls, as CSV (gpu__time_duration.sum, ns). Clocks left alone.
# Usage: bash benchmarks/ncu_layout.sh OUTDIR
set -uo pipefail
out=${1:-.}
for b in cuda xla; do
  CUDA_VISIBLE_DEVICES=0 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    python3 - "$b" > "$out/ncu_layout_$b.csv" 2> "$out/ncu_layout_$b.err" <<'PY'
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
sys.path.insert(0, "benchmarks")
import bench_layout as bl, jaxep
mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
cfg = jaxep.EPConfig(num_experts=256, num_topk=8, hidden=128, max_tokens_per_rank=4096)
comm = jaxep.Communicator(mesh, cfg, backend=sys.argv[1])
idx = jnp.asarray(bl.routing(np.random.default_rng(0), 4096, 256, 8))
print(bl.chained(comm, 3)(idx).block_until_ready())
PY
  python3 - "$out/ncu_layout_$b.csv" "$b" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr, rows = rows[0], rows[1:]
ki, vi = hdr.index("Kernel Name"), hdr.index("Metric Value")
tot = sum(float(r[vi].replace(",", "")) for r in rows)
print(f"{sys.argv[2]}: {len(rows)} kernels, {tot/1e3:.1f} us for 3 chained calls")
for r in rows[:12]: print("   ", r[ki][:70], r[vi])
PY
done
