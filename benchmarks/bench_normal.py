"""Time normal-mode ``jaxep.dispatch`` (BF16, FP8) and ``jaxep.combine`` (BF16), cuda vs xla.

Method: time per call = (host wall time of one jitted function chaining N+1 dependent calls -
that of one chaining 1 call) / N, median over ``--repeats``. Host dispatch of the jitted call
cancels in the difference; what remains is the device time of the calls plus any per-call
launch gaps (DESIGN.md §4 prefers events or the profiler; this is the chained-call variant it
describes). Call i+1 depends
on call i through a never-true select written into one element of each input (an in-place
update, so no input is copied per call); each call's whole output goes through an optimization
barrier and a few of its elements are summed into a carried scalar, so nothing is merged or
dropped and no output outlives its call. Combine is timed on a fixed ``y = dispatch(...).x`` and
its handle. Compiling 51 unrolled pure-JAX dispatches takes ~20 s per chain (CPU), and XLA may
share one constant buffer (e.g. the zeros of the xla combine's scatter) between unrolled calls,
which then holds one copy per call; so by default the chain is 1 + N % 10 calls followed by a
``fori_loop`` of N // 10 iterations of 10 unrolled calls (``--unroll``; 0 = all unrolled). The
loop control (~10 us per iteration on GPU, DESIGN §4) adds ~1 us per call to both backends. The
JSON has the compiled temp memory of the 1-call and the chained function.

One process per GPU: the same programs on the same global mesh, one process per device, with
``--distributed`` (SLURM / OpenMPI) or ``--coordinator/--num-processes/--process-id`` (a plain
launcher: ``benchmarks/launch_local.py``); every process times the chains, process 0 prints and
writes the JSON (the others' stdout is silenced after their first line). Host inputs are placed
with ``jax.make_array_from_callback`` (no collective: that also works between processes sharing
one GPU, where only ``--backends cuda`` runs).

Bandwidth follows DeepEP: logical = bytes of all rows a rank receives (its own included),
NVLink = bytes of the rows that come from another rank, both the per-rank AVERAGE (the JSON also
has the maximum), counted in NumPy from the routing, divided by the time. Row bytes: BF16 2H,
FP8 H + 4H/128; combine moves the dispatched BF16 rows back.

    python benchmarks/bench_normal.py --json normal.json --plot normal.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxep

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
from distributed_args import (add_distributed_args, init_distributed,  # noqa: E402
                              wants_distributed)

OPS = ("dispatch bf16", "dispatch fp8", "combine bf16")


def make_routing(rng, n, num_experts, num_topk, kind, zipf_alpha):
    """[n, K] distinct expert ids and float32 weights."""
    if kind == "random":  # DeepEP: top-k of |N(0,1)| + 1
        scores = np.abs(rng.standard_normal((n, num_experts))) + 1
    elif kind == "zipf":  # Zipf popularity over shuffled experts, K draws without replacement
        p = 1.0 / np.arange(1, num_experts + 1) ** zipf_alpha
        scores = np.log(p[rng.permutation(num_experts)]) + rng.gumbel(size=(n, num_experts))
    else:
        raise ValueError(f"unknown routing {kind!r}")
    idx = np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int32)
    return idx, rng.random((n, num_topk), dtype=np.float32)


def received_rows(expert_rank, idx, num_ranks, tokens):
    """Per destination rank: (all received rows, rows from other ranks), each ``[R]``."""
    n = idx.shape[0]
    to = np.zeros((n, num_ranks), bool)
    to[np.arange(n)[:, None], expert_rank[idx]] = True
    remote = to & ((np.arange(n) // tokens)[:, None] != np.arange(num_ranks)[None])
    return to.sum(0), remote.sum(0)


def touch(tree, acc):
    """Make every array of ``tree`` depend on ``acc`` (never changes a value)."""
    def one(a):
        i = (0,) * a.ndim
        return a.at[i].set(jnp.where(acc < 0, jnp.zeros((), a.dtype), a[i]))
    return jax.tree.map(one, tree)


def probe(tree):
    """A scalar that depends on every array of ``tree`` (first and last element of each)."""
    leaves = [a.reshape(-1) for a in jax.tree.leaves(tree)]
    return sum(a[0].astype(jnp.float32) + a[-1].astype(jnp.float32) for a in leaves)


def chained(comm, fn, calls, unroll):
    """``calls`` dependent calls of ``fn``; with ``unroll``, all but ``1 + calls % unroll`` of
    them run as a loop of ``unroll`` unrolled calls per iteration."""
    def steps(n, args, acc):
        for _ in range(n):
            args = touch(args, acc)
            acc = acc + probe(jax.lax.optimization_barrier(fn(comm, *args)))
        return args, acc

    def body(*args):
        loops = (calls - 1) // unroll if unroll else 0
        args, acc = steps(calls - loops * unroll, args, jnp.zeros((), jnp.float32))
        if loops:
            args, acc = jax.lax.fori_loop(0, loops, lambda _, c: steps(unroll, *c), (args, acc))
        return acc[None]

    spec = P(comm.cfg.axis_name)
    return jax.jit(jax.shard_map(body, mesh=comm.mesh, in_specs=spec, out_specs=spec))


def compile_all(comm, jobs, calls, unroll):
    """Compile the 1-call and the (calls+1)-call chain of every job, in parallel threads."""
    keys = [(op, n) for op in jobs for n in (1, calls + 1)]

    def build(key):
        fn, args = jobs[key[0]]
        return chained(comm, fn, key[1], unroll).lower(*args).compile()

    with ThreadPoolExecutor(len(keys)) as pool:
        return dict(zip(keys, pool.map(build, keys)))


def measure(one, many, args, calls, repeats):
    temp = []
    for f in (one, many):
        f(*args).block_until_ready()  # warm-up
        mem = f.memory_analysis()
        temp.append(getattr(mem, "temp_size_in_bytes", None) if mem is not None else None)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter(); one(*args).block_until_ready(); t1 = time.perf_counter()
        many(*args).block_until_ready(); t2 = time.perf_counter()
        samples.append(((t2 - t1) - (t1 - t0)) / calls * 1e6)
    return dict(us=statistics.median(samples), samples_us=samples, temp_bytes_1=temp[0],
                temp_bytes_chain=temp[1])


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def sms_value(s):
    return None if s.lower() == "none" else int(s)


def sms_name(sms):
    return "none" if sms is None else str(sms)


def groups(a):
    """(T, E, num_sms, routings): the token sweep at the first E/routing/num_sms, then the
    variants at T* (4096, else the largest T). Routings of a group share compiled chains."""
    e0, s0 = a.experts[0], a.num_sms[0]
    big = 4096 if 4096 in a.tokens else max(a.tokens)
    out = [(t, e0, s0, a.routing if t == big else a.routing[:1]) for t in a.tokens]
    out += [(big, e, s0, a.routing[:1]) for e in a.experts[1:]]
    out += [(big, e0, s, a.routing[:1]) for s in a.num_sms[1:]]
    return out, big


def run_group(mesh, backend, t, e, sms, routings, a, log):
    r, spec = mesh.size, P("ep")
    cfg = jaxep.EPConfig(num_experts=e, num_topk=a.topk, hidden=a.hidden, max_tokens_per_rank=t,
                         num_sms=sms)
    comm = jaxep.Communicator(mesh, cfg, backend=backend)
    impl = {op: comm.implementation(op.split()[0]) for op in OPS}
    ops = [op for op in OPS if sms == a.num_sms[0] or impl[op] == "cuda"]
    if not ops:
        log("  skipped: num_sms only matters to the CUDA kernels")
        return []
    shard = lambda v: put(mesh, v)  # noqa: E731

    def per_rank(f):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))

    x = jax.jit(lambda k: jax.random.normal(k, (r * t, a.hidden), jnp.bfloat16),
                out_shardings=NamedSharding(mesh, spec))(jax.random.key(a.seed))
    x8 = per_rank(jaxep.quantize_fp8)(x)
    dispatched = per_rank(lambda *v: (lambda d: (d.x, d.handle))(jaxep.dispatch(comm, *v)))
    row_bytes = {"dispatch bf16": 2 * a.hidden, "dispatch fp8": a.hidden + a.hidden // 128 * 4,
                 "combine bf16": 2 * a.hidden}
    rows, compiled = [], None
    for kind in routings:
        idx_np, w_np = make_routing(np.random.default_rng(a.seed), r * t, e, a.topk, kind,
                                    a.zipf_alpha)
        recv, remote = received_rows(comm.expert_rank, idx_np, r, t)
        idx, w = shard(idx_np), shard(w_np)
        y, handle = dispatched(x, idx, w)
        jobs = {"dispatch bf16": (jaxep.dispatch, (x, idx, w)),
                "dispatch fp8": (jaxep.dispatch, (x8, idx, w)),
                "combine bf16": (jaxep.combine, (y, handle))}
        if compiled is None:  # same shapes for every routing
            t0 = time.perf_counter()
            compiled = compile_all(comm, {op: jobs[op] for op in ops}, a.calls, a.unroll)
            log(f"  compiled {2 * len(ops)} chains in {time.perf_counter() - t0:.1f} s")
        for op in ops:
            m = measure(compiled[op, 1], compiled[op, a.calls + 1], jobs[op][1], a.calls,
                        a.repeats)
            if hasattr(comm, "check"):
                comm.check()  # a CUDA kernel that timed out waiting for a peer raises here
            b = row_bytes[op]
            row = dict(op=op, tokens=t, experts=e, routing=kind, num_sms=sms, backend=backend,
                       impl=impl[op], sms="xla" if impl[op] == "xla" else str(sms or "default"),
                       row_bytes=b, recv_rows=recv.tolist(), remote_rows=remote.tolist(),
                       bytes_avg=float(recv.mean() * b), bytes_max=int(recv.max() * b),
                       nvlink_bytes_avg=float(remote.mean() * b),
                       nvlink_bytes_max=int(remote.max() * b),
                       workspace_bytes=getattr(comm, "workspace_bytes", 0), **m)
            row["gbps"] = row["bytes_avg"] / row["us"] / 1e3
            row["nvlink_gbps"] = row["nvlink_bytes_avg"] / row["us"] / 1e3
            t1, tn = m["temp_bytes_1"], m["temp_bytes_chain"]
            if t1 is not None and tn is not None and tn > 2 * t1 + (64 << 20):
                log(f"  note: {op}: the chain needs {tn / 2**20:.0f} MiB of temp memory, one "
                    f"call {t1 / 2**20:.0f} MiB (buffers live across the unrolled calls)")
            log(f"  {op:13s} {backend:4s} (impl {impl[op]:4s}) {kind:6s}: {row['us']:9.1f} us "
                f"{row['gbps']:6.1f} GB/s")
            rows.append(row)
    comm.close()
    return rows


def add_ratios(rows):
    """xla time / cuda time for the same op, T, E and routing (xla ignores num_sms)."""
    xla = {(r["op"], r["tokens"], r["experts"], r["routing"]): r["us"]
           for r in rows if r["backend"] == "xla"}
    for r in rows:
        key = (r["op"], r["tokens"], r["experts"], r["routing"])
        r["xla_over_cuda"] = (xla[key] / r["us"]) if r["backend"] == "cuda" and key in xla else None


def table(title, rows):
    rows = sorted(rows, key=lambda r: (OPS.index(r["op"]), r["tokens"], -r["experts"], r["routing"],
                                       r["backend"] != "xla", sms_name(r["num_sms"])))
    head = ("op", "T", "E", "routing", "SMs", "backend", "impl", "us", "GB/s", "NVL GB/s",
            "xla/cuda")
    fmt = "{:13s} {:>5} {:>4} {:7s} {:>7} {:7s} {:4s} {:>9} {:>6} {:>8} {:>8}"
    print(f"\n{title}\n" + fmt.format(*head))
    for r in rows:
        ratio = "" if r["xla_over_cuda"] is None else f"{r['xla_over_cuda']:.2f}x"
        print(fmt.format(r["op"], r["tokens"], r["experts"], r["routing"], r["sms"], r["backend"],
                         r["impl"], f"{r['us']:.1f}", f"{r['gbps']:.1f}",
                         f"{r['nvlink_gbps']:.1f}", ratio))


def plot(path, rows, base):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OPS), figsize=(5 * len(OPS), 4), squeeze=False)
    for ax, op in zip(axes[0], OPS):
        for backend in sorted({r["backend"] for r in rows}):
            pts = sorted((r["tokens"], r["us"]) for r in rows if r["op"] == op
                         and r["backend"] == backend and (r["experts"], r["routing"],
                                                          r["num_sms"]) == base)
            if pts:
                ax.plot(*zip(*pts), "o-", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(title=op, xlabel="tokens per rank", ylabel="us per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"jaxep normal mode, E={base[0]}, {base[1]} routing, num_sms={sms_name(base[2])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def put(mesh, v):
    """Host array ``v`` (the same in every process) split along its leading dim over ``mesh``'s
    "ep" axis, without a collective (``jax.device_put`` onto devices of several processes checks
    the value is the same everywhere with one, which fails between processes sharing a GPU)."""
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, NamedSharding(mesh, P("ep")), lambda i: v[i])


def is_main() -> bool:
    """Process 0 (or the only one): the one that prints and writes files."""
    return jax.process_index() == 0


def environment(devices, r):
    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(device=devices[0].device_kind, platform=devices[0].platform, ranks=r,
                processes=jax.process_count(),
                jax=jax.__version__, jaxep=jaxep.__version__, commit=git("rev-parse", "HEAD"),
                dirty=None if status is None else bool(status))


def add_timing_args(p: argparse.ArgumentParser) -> None:
    """The options of the timing method (shared with bench_ll.py) and its outputs."""
    p.add_argument("--calls", type=int, default=50, help="N, timed calls per repeat")
    p.add_argument("--unroll", type=int, default=10,
                   help="calls per loop iteration (0: all N+1 calls unrolled)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument("--plot", default=None, help="write a PNG of time vs tokens here")


def start_run(a, sizes: str):
    """Joins the multi-process job if ``a`` asks to (``add_distributed_args``); mesh over the
    first ``a.ranks`` devices (all by default, every process's), the environment record and a
    flushing log, after logging the run's header line (shared with bench_ll.py and
    bench_moe_layer.py). In a multi-process job only process 0 keeps its stdout."""
    if wants_distributed(a):
        init_distributed(a)
    devices = jax.devices()
    r = a.ranks or len(devices)
    if jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: local devices "
              f"{jax.local_devices()}, {len(devices)} in all"
              + ("" if is_main() else "; stdout silenced from here (process 0 reports)"),
              flush=True)
        if r != len(devices):
            raise SystemExit(f"--ranks {r}: with several processes the mesh takes every device "
                             f"({len(devices)})")
        if not is_main():
            sys.stdout = open(os.devnull, "w")
    mesh = Mesh(np.array(devices[:r]), ("ep",))
    env = environment(devices, r)
    log = lambda s: print(s, flush=True)  # noqa: E731
    dirty = " (dirty)" if env["dirty"] else ""
    procs = f" in {env['processes']} processes" if env["processes"] > 1 else ""
    log(f"R={r} x {env['device']}{procs}, jax {env['jax']}, commit {env['commit']}{dirty}, "
        f"{sizes}, N={a.calls} chained calls (unroll {a.unroll or 'all'}), {a.repeats} repeats")
    return mesh, env, log


def backend_usable(mesh, backend, log) -> bool:
    """Whether a Communicator of ``backend`` can be built on ``mesh`` (else logs why not)."""
    try:
        jaxep.Communicator(mesh, jaxep.EPConfig(mesh.size, 1, 128, 1), backend=backend).close()
    except (ValueError, RuntimeError) as err:
        log(f"{backend}: skipped ({err})")
        return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=None, help="devices (default: all visible)")
    p.add_argument("--tokens", type=csv(int), default=[512, 1024, 2048, 4096],
                   help="tokens per rank, swept at the first E/routing/num_sms")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=csv(int), default=[256, 128, 64])
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--routing", type=csv(str), default=["random", "zipf"])
    p.add_argument("--zipf-alpha", type=float, default=1.2)
    p.add_argument("--num-sms", type=csv(sms_value), default=[None, 24],
                   help="'none' = EPConfig default")
    p.add_argument("--backends", type=csv(str), default=["cuda", "xla"],
                   help="comma-separated; 'cuda' alone where several processes share one GPU "
                        "(XLA collectives fail there)")
    add_timing_args(p)
    add_distributed_args(p)
    a = p.parse_args()
    mesh, env, log = start_run(a, f"H={a.hidden}, K={a.topk}")
    r = mesh.size
    configs, big = groups(a)
    rows, t_start = [], time.perf_counter()
    for backend in a.backends:
        if not backend_usable(mesh, backend, log):
            continue
        for i, (t, e, sms, routings) in enumerate(configs):
            log(f"[{backend} {i + 1}/{len(configs)}] T={t} E={e} num_sms={sms_name(sms)} "
                f"routing={','.join(routings)} ({time.perf_counter() - t_start:.0f} s)")
            rows += run_group(mesh, backend, t, e, sms, routings, a, log)
    add_ratios(rows)
    base = (a.experts[0], a.routing[0], a.num_sms[0])
    print(f"\nR={r} {env['device']}, H={a.hidden}, K={a.topk}; median device time per call; "
          f"GB/s = per-rank average received bytes (own rows included) / time; NVL GB/s = "
          f"the same for rows from other ranks; xla/cuda = xla time / cuda time, same run")
    table(f"T={big} (standard case and variants)", [x for x in rows if x["tokens"] == big])
    table(f"token sweep (E={base[0]}, {base[1]}, num_sms={sms_name(base[2])})",
          [x for x in rows if (x["experts"], x["routing"], x["num_sms"]) == base])
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)
    if a.json and is_main():
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), environment=env, bytes="per-rank average (max too)",
                           results=rows), f, indent=1)
    if a.plot and is_main():
        plot(a.plot, rows, base)


if __name__ == "__main__":
    main()
