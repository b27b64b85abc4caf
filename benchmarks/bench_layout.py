"""Time ``jaxep.dispatch_layout`` with the ``cuda`` and ``xla`` backends on the same GPUs.

Per-call device time is measured as the difference between a jitted function that chains
``--calls + 1`` layouts and one that runs a single layout, divided by ``--calls`` (so host
dispatch and launch of the jitted call cancel), median over ``--repeats``. Each call depends on
the previous one's result, so XLA cannot merge them.

    python benchmarks/bench_layout.py --tokens 4096 --experts 256 --topk 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import jaxep


def routing(rng, n, num_experts, num_topk):
    scores = np.abs(rng.standard_normal((n, num_experts))) + 1
    return np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int32)


def chained(comm, calls):
    def body(idx):
        acc = jnp.zeros((), jnp.int32)
        for _ in range(calls):
            idx = jnp.where(acc < 0, -1, idx)  # never true; keeps the calls in sequence
            lay = jaxep.dispatch_layout(comm, idx)
            acc = acc + lay.tokens_per_rank[0] + lay.tokens_per_expert[0]
        return acc[None]

    spec = P(comm.cfg.axis_name)
    return jax.jit(jax.shard_map(body, mesh=comm.mesh, in_specs=spec, out_specs=spec))


def per_call_us(comm, idx, calls, repeats):
    one, many = chained(comm, 1), chained(comm, calls + 1)
    for f in (one, many):
        f(idx).block_until_ready()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter(); one(idx).block_until_ready(); t1 = time.perf_counter()
        many(idx).block_until_ready(); t2 = time.perf_counter()
        samples.append(((t2 - t1) - (t1 - t0)) / calls * 1e6)
    return statistics.median(samples)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=None, help="GPUs (default: all)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    devices = jax.devices()
    r = a.ranks or len(devices)
    mesh = Mesh(np.array(devices[:r]), ("ep",))
    cfg = jaxep.EPConfig(num_experts=a.experts, num_topk=a.topk, hidden=128,
                         max_tokens_per_rank=a.tokens)
    idx = jnp.asarray(routing(np.random.default_rng(0), r * a.tokens, a.experts, a.topk))
    rows = []
    for backend in ("xla", "cuda"):
        try:
            comm = jaxep.Communicator(mesh, cfg, backend=backend)
        except ValueError as e:
            print(f"{backend}: skipped ({e})")
            continue
        rows.append(dict(backend=backend, us=per_call_us(comm, idx, a.calls, a.repeats)))
    print(f"dispatch_layout, R={r} ({devices[0].device_kind}), T={a.tokens}, E={a.experts}, "
          f"K={a.topk}: median device time per call")
    for row in rows:
        print(f"  {row['backend']:5s} {row['us']:8.1f} us")
    if len(rows) == 2:
        print(f"  xla / cuda = {rows[0]['us'] / rows[1]['us']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(vars(a), ranks=r, device=devices[0].device_kind, results=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
