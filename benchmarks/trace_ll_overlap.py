"""Timeline of one low-latency dispatch on GPU 0, read from a ``jax.profiler`` trace: when each
kernel and copy starts and ends, and on which stream, plus the host-side events of the same
window. ``--mode pinned`` traces ``send -> matmul -> recv`` (``bench_ll.two_phase``), ``alone``
send -> recv; ``--copy-engine`` uses copy-engine sends.

    python benchmarks/trace_ll_overlap.py --mode pinned --copy-engine
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ll import two_phase  # noqa: E402

import jaxep  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["pinned", "free", "alone"], default="pinned")
    p.add_argument("--copy-engine", action="store_true")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--matmul-m", type=int, default=256)
    p.add_argument("--calls", type=int, default=3, help="traced calls (the last is printed)")
    a = p.parse_args()
    mesh = Mesh(np.array(jax.devices()), ("ep",))
    r, t, h = mesh.size, a.tokens, a.hidden
    cfg = jaxep.EPConfig(num_experts=256, num_topk=8, hidden=h, max_tokens_per_rank=t,
                         low_latency=True, ll_copy_engine=True)
    comm = jaxep.Communicator(mesh, cfg, backend="cuda")
    sh = NamedSharding(mesh, P("ep"))
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(256, 8, replace=False) for _ in range(r * t)]).astype(np.int32)
    idx = jax.device_put(idx, sh)
    x = jax.device_put(jnp.asarray(rng.standard_normal((r * t, h)), jnp.bfloat16), sh)
    mats = [jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.bfloat16), sh)
            for s in ((r * a.matmul_m, h), (r * h, h))]
    spmd = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))  # noqa: E731
    send = functools.partial(jaxep.ll_dispatch_send, fp8=True, copy_engine=a.copy_engine)
    recv = functools.partial(jaxep.ll_dispatch_recv, zero_padding=False)
    if a.mode == "alone":
        f = spmd(lambda x, i: recv(comm, send(comm, x, i)).x[0])
        args = (x, idx)
    else:
        fn = two_phase(send, recv, a.mode == "pinned")
        f = spmd(lambda *v: (lambda o: (o[0].x[0], o[1]))(fn(comm, *v)))
        args = (*mats, x, idx)
    for _ in range(3):
        jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(a.calls):
                jax.block_until_ready(f(*args))
        gpu, host = [], []
        for path in glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True):
            for plane in jax.profiler.ProfileData.from_file(path).planes:
                dest = gpu if plane.name == "/device:GPU:0" else host if "host" in plane.name else None
                if dest is None:
                    continue
                for line in plane.lines:
                    for ev in line.events:
                        dest.append((ev.start_ns, ev.duration_ns, line.name, ev.name))
    gpu.sort()
    first = max(i for i, e in enumerate(gpu) if "SendKernel" in e[3])
    t0 = gpu[first][0]
    end = max(s + dur for s, dur, *_ in gpu[first:])
    print(f"{a.mode}, copy_engine={a.copy_engine}, R={r}, T={t}, H={h}: GPU 0, last call (us)")
    print(f"{'start':>8} {'end':>8} {'dur':>7}  stream / event")
    for s, dur, line, name in gpu[first:]:
        short = name.split("(")[0].replace("void jaxep::(anonymous namespace)::", "")[:60]
        print(f"{(s - t0) / 1e3:8.1f} {(s + dur - t0) / 1e3:8.1f} {dur / 1e3:7.1f}  "
              f"{line[:22]:22s} {short}")
    print(f"span of the call on GPU 0: {(end - t0) / 1e3:.1f} us")
    print("host events in [start - 150 us, end] (us, relative to the send kernel's start):")
    for s, dur, line, name in sorted(host):
        if t0 - 150_000 <= s <= end and dur < 1_000_000:
            print(f"{(s - t0) / 1e3:8.1f} {(s + dur - t0) / 1e3:8.1f} {dur / 1e3:7.1f}  "
                  f"{line[:22]:22s} {name[:70]}")
    comm.close()


if __name__ == "__main__":
    main()
