"""Time low-latency ``jaxep.ll_dispatch`` (FP8, optionally BF16) and ``jaxep.ll_combine`` (BF16),
their send / recv phases, and a matmul overlapped between send and recv; cuda vs xla.

Method (shared with ``bench_normal.py``, whose helpers this imports): time per call = (host wall
time of one jitted function chaining N+1 dependent calls - that of one chaining 1 call) / N,
median over ``--repeats``; the chain is 1 + N % unroll unrolled calls, then a ``fori_loop`` of
N // unroll iterations of ``--unroll`` unrolled calls. Combine runs on a fixed
``y, handle = ll_dispatch(x)`` (BF16) and is weighted by ``topk_weights``.

On the CUDA backend the phases are also timed *isolated*: the send alone, waited for on the
host, then its recv (``isolated_runner``), so the recv finds every peer's rows already there. The
recv inside the full op minus the isolated recv is the time it waited for the slower peer.

Send / recv on the xla backend: ``*_send`` is timed alone (chained like the full op). ``*_recv``
is timed directly, chained on one fixed pending (the output of one send), and also reported as
full - send.

On the CUDA backend ``ll_dispatch`` and ``ll_combine`` are one kernel each (send, then receive
in the same blocks): the span is that kernel's duration, and there is no send / recv split.
The ops named "... 2p" time the same op as ``*_recv(*_send(...))``, two kernels, for the split
and the overlap.

Overlap (at T = 128, else the largest T), for the two-phase ops: (a) send+recv alone, i.e. the
full op ``recv(send(...))``; (b) a BF16 ``[M, H] @ [H, H]`` matmul
alone (``--matmul-m``), independent of the transfer; (c) send -> matmul -> recv in one call.
Gain = (a) + (b) - (c), bounded by min((a), (b)). XLA schedules by data dependencies only, so
program order is imposed with them: the recv takes the pending, the matmul's result is returned
with the recv's output (consumed after the recv), and in the "pinned" variant
``jax.lax.optimization_barrier`` groups (pending, matmul operand) right after the send, so the
matmul cannot be hoisted above the send, and (pending, matmul result) before the recv, so the
recv cannot be hoisted above the matmul nor the send sunk below it (XLA turns the barriers into
control dependencies, so the compiled HLO no longer shows them). This is the order of
DeepEP's two-phase hook; it overlaps only if the send returns while its transfer is still in
flight (a CUDA send kernel). In the xla path the pending is the result of ``lax.all_to_all``,
so the barrier waits for the transfer: pinned gain ~0 by construction. The "free" variant drops
both barriers and lets XLA's scheduler overlap (e.g. an async all-to-all) if it can.

On the CUDA backend, "dispatch fp8 nopad ce" is the nopad dispatch with copy-engine sends
(``ll_dispatch_send(copy_engine=True)``); its "send" is the pack kernel, and the trace's copies
are reported as "bundle copy" / "flag copy" (``trace_ll_overlap.py`` shows one call's timeline).
Copy-engine sends exist in one process only: with one process per GPU (``--distributed`` or
``--coordinator/--num-processes/--process-id``, as in ``bench_normal.py``: process 0 prints and
writes the JSON) that op is left out.

Bandwidth follows DeepEP's LL figures: logical = bytes of all (token, expert) rows a rank
receives, its own included, per-rank average (NVL: rows from other ranks only), / full time.
Row bytes: FP8 H + 4H/128, BF16 2H; combine sends the BF16 rows (2H per copy) back. The same
logical bytes are counted for ``ll_combine(prereduce=True)`` ("combine bf16 prereduce") and
``prereduce="float32"`` ("... prereduce f32"), which send one row per (token, expert rank)
instead, so their GB/s are effective figures.

    python benchmarks/bench_ll.py --json ll.json --plot ll.png
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_normal import (add_distributed_args, add_timing_args, backend_usable,  # noqa: E402
                          compile_all, csv, is_main, make_routing, measure, put, start_run)

import jaxep  # noqa: E402

# DESIGN.md §4, 4xH200, T=128, H=7168, K=8, E=256 (us): DeepEP V1 total, send, recv; XLA dense.
REFERENCE = {"dispatch fp8": (32.7, 24.7, 8.0, 43.0), "combine bf16": (56.8, 44.5, 9.6, 62.0)}


# Kernels that run a whole op (send, then receive, in one launch) on the CUDA backend.
ONE_KERNEL = ("LLDispatchKernel", "LLCombineKernel", "LLCombineReducedKernel")


def two_phase(send, recv, pinned):
    """fn(comm, a, b, *op_args): send -> a @ b -> recv; see the module docstring."""
    def fn(comm, a, b, *args):
        pending = send(comm, *args)
        if pinned:  # the matmul's operand only exists after the send
            pending, a = jax.lax.optimization_barrier((pending, a))
        z = a @ b
        if pinned:  # the recv's input only exists after the matmul
            pending, z = jax.lax.optimization_barrier((pending, z))
        return recv(comm, pending), z
    return fn


def kernel_times(run, repeats=3):
    """Median device time (us) per kernel name over ``repeats`` calls of ``run()`` (which blocks)
    and over GPUs, read from a ``jax.profiler`` trace (XLA's own kernels are skipped: names
    starting with ``LL`` only). Also ``"span"``: per GPU, from the start of each send kernel to
    the end of the recv kernel that follows it, the op's device time (DESIGN.md §4), without
    the benchmark's own ops between calls."""
    import glob
    import tempfile

    run()
    copies = []
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(repeats):
                run()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        durations, spans = {}, []
        for path in files:
            data = jax.profiler.ProfileData.from_file(path)
            for plane in data.planes:
                if not plane.name.startswith("/device:GPU"):
                    continue
                ll = sorted((ev.start_ns, ev.end_ns, "Send" in ev.name) for line in plane.lines
                            for ev in line.events
                            if ("LLDispatch" in ev.name or "LLCombine" in ev.name)
                            and not any(k in ev.name for k in ONE_KERNEL))
                for (s0, _, is_send), (_, e1, nxt_send) in zip(ll, ll[1:]):
                    if is_send and not nxt_send:
                        spans.append((e1 - s0) / 1e3)
                spans += [ev.duration_ns / 1e3 for line in plane.lines for ev in line.events
                          if any(k in ev.name for k in ONE_KERNEL)]  # the op itself
                for line in plane.lines:
                    for ev in line.events:
                        name = ev.name
                        if name.startswith("MemcpyP2P"):  # copy-engine sends' copies
                            copies.append(ev.duration_ns / 1e3)
                        for short in (*ONE_KERNEL, "LLDispatchSendKernel",
                                      "LLDispatchRecvKernel",
                                      "LLCombineSendKernel", "LLCombineSendReducedKernel",
                                      "LLCombineRecvKernel"):
                            if short in name:
                                durations.setdefault(short, []).append(ev.duration_ns / 1e3)
    out = {k: float(np.median(v)) for k, v in sorted(durations.items())}
    if spans:
        out["span"] = float(np.median(spans))
    if copies:  # as many flag copies (8 bytes) as bundle copies: split at the median
        copies.sort()
        half = len(copies) // 2
        out["flag copy"] = float(np.median(copies[:half] or copies))
        out["bundle copy"] = float(np.median(copies[half:]))
    return out


def isolated_runner(per_rank, comm, send, recv, args):
    """``run()`` for ``kernel_times``: the send alone, waited for on the host, then its recv.
    Every peer's rows have then landed before any recv starts, and every acknowledgement before
    the next send: the kernels' own work, without waiting for a slower peer."""
    send_fn = per_rank(lambda *v: jax.tree.map(lambda u: u[None], send(comm, *v)))
    recv_fn = per_rank(lambda p: [u[None] for u in jax.tree.leaves(
        recv(comm, jax.tree.map(lambda u: u[0], p)))])

    def run():
        pending = jax.block_until_ready(send_fn(*args))
        jax.block_until_ready(recv_fn(pending))
    return run


def ll_rows(expert_rank, idx, r, t):
    """Per destination rank: (received (token, expert) rows, those from other ranks), ``[R]``."""
    dest = expert_rank[idx]  # [R*T, K]; routing has distinct experts per token
    remote = dest != (np.arange(idx.shape[0]) // t)[:, None]
    return np.bincount(dest.ravel(), minlength=r), np.bincount(dest[remote], minlength=r)


def run_case(mesh, backend, t, a, with_overlap, log):
    r, spec = mesh.size, P("ep")
    cfg = jaxep.EPConfig(num_experts=a.experts, num_topk=a.topk, hidden=a.hidden,
                         max_tokens_per_rank=t, low_latency=backend == "cuda" or None,
                         num_sms=a.num_sms,
                         ll_copy_engine=backend == "cuda" and jax.process_count() == 1)
    comm = jaxep.Communicator(mesh, cfg, backend=backend)
    out = NamedSharding(mesh, spec)
    per_rank = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))  # noqa: E731
    idx_np, w_np = make_routing(np.random.default_rng(a.seed), r * t, a.experts, a.topk,
                                "random", 0.0)
    idx, w = put(mesh, idx_np), put(mesh, w_np)
    normal = lambda k, *shape: jax.jit(  # noqa: E731
        lambda k: jax.random.normal(k, shape, jnp.bfloat16), out_shardings=out)(k)
    keys = jax.random.split(jax.random.key(a.seed), 3)
    x = normal(keys[0], r * t, a.hidden)
    y, handle = per_rank(lambda x, i: (lambda d: (d.x, d.handle))(jaxep.ll_dispatch(comm, x, i)))(
        x, idx)
    ops = {}  # name: (full, send, recv, args, row bytes)
    for fp8 in (True, False) if a.also_bf16 else (True,):
        ops[f"dispatch {'fp8' if fp8 else 'bf16'}"] = (
            functools.partial(jaxep.ll_dispatch, fp8=fp8),
            functools.partial(jaxep.ll_dispatch_send, fp8=fp8), jaxep.ll_dispatch_recv,
            (x, idx), a.hidden + a.hidden // 128 * 4 if fp8 else 2 * a.hidden)
    if comm.implementation("ll_dispatch") == "cuda":  # padding left unspecified (CUDA only)
        ops["dispatch fp8 nopad"] = (
            functools.partial(jaxep.ll_dispatch, fp8=True, zero_padding=False),
            functools.partial(jaxep.ll_dispatch_send, fp8=True),
            functools.partial(jaxep.ll_dispatch_recv, zero_padding=False),
            (x, idx), a.hidden + a.hidden // 128 * 4)
        # the same with copy-engine sends: the kernel packs locally, copy engines move the rows
        # (one process only)
        ce_send = functools.partial(jaxep.ll_dispatch_send, fp8=True, copy_engine=True)
        ce_recv = functools.partial(jaxep.ll_dispatch_recv, zero_padding=False)
        # the same in two kernels (ll_dispatch is one): the send / recv split
        ops["dispatch fp8 nopad 2p"] = (
            lambda c, *v: jaxep.ll_dispatch_recv(
                c, jaxep.ll_dispatch_send(c, *v, fp8=True), zero_padding=False),
            functools.partial(jaxep.ll_dispatch_send, fp8=True),
            functools.partial(jaxep.ll_dispatch_recv, zero_padding=False),
            (x, idx), a.hidden + a.hidden // 128 * 4)
        if cfg.ll_copy_engine:
            ops["dispatch fp8 nopad ce"] = (
                lambda c, *v: ce_recv(c, ce_send(c, *v)), ce_send, ce_recv,
                (x, idx), a.hidden + a.hidden // 128 * 4)
    ops["combine bf16"] = (functools.partial(jaxep.ll_combine, prereduce=False),
                           jaxep.ll_combine_send, jaxep.ll_combine_recv,
                           (y, idx, w, handle), 2 * a.hidden)
    if not a.no_prereduce:  # one row per (token, expert rank) travels instead of per entry
        ops["combine bf16 prereduce"] = (
            functools.partial(jaxep.ll_combine, prereduce=True),
            functools.partial(jaxep.ll_combine_send, prereduce=True), jaxep.ll_combine_recv,
            (y, idx, w, handle), 2 * a.hidden)
        # float32 partials (ll_combine's default): float32 accumulation as "combine bf16",
        # fewer bytes
        ops["combine bf16 prereduce f32"] = (
            functools.partial(jaxep.ll_combine, prereduce="float32"),
            functools.partial(jaxep.ll_combine_send, prereduce="float32"),
            jaxep.ll_combine_recv, (y, idx, w, handle), 2 * a.hidden)
    if comm.implementation("ll_combine") == "cuda":  # the same in two kernels: the split
        for name in [n for n in ops if n.startswith("combine")]:
            _, send, recv, args, b = ops[name]
            ops[name + " 2p"] = (lambda c, *v, s=send, r=recv: r(c, s(c, *v)), send, recv,
                                 args, b)
    if with_overlap:
        mats = (normal(keys[1], r * a.matmul_m, a.hidden), normal(keys[2], r * a.hidden, a.hidden))
    jobs = {}
    # ops whose full form is one kernel on CUDA: no send -> matmul -> recv against it (the
    # overlap is measured on their two-phase form, "... 2p")
    one_kernel = {n for n in ops if not n.endswith((" 2p", " ce"))} if (
        comm.implementation("ll_dispatch") == "cuda") else set()
    # The CUDA LL kernels need every send followed by its recv (their buffer protocol), so
    # their phases are timed from the profiler's kernel durations inside the full op instead.
    on_cuda = comm.implementation("ll_dispatch") == "cuda"
    for name, (full, send, recv, args, _) in ops.items():
        jobs[name] = (full, args)
        if not on_cuda:
            # one fixed pending per rank, with a leading axis of 1 so it leaves shard_map as
            # [R, ...]
            pending = per_rank(
                lambda *v, s=send: jax.tree.map(lambda u: u[None], s(comm, *v)))(*args)
            jobs[name + " send"] = (send, args)
            jobs[name + " recv"] = (lambda c, p, rv=recv: rv(c, jax.tree.map(lambda u: u[0], p)),
                                    (pending,))
        if with_overlap and name not in one_kernel:
            jobs[name + " pinned"] = (two_phase(send, recv, True), (*mats, *args))
            jobs[name + " free"] = (two_phase(send, recv, False), (*mats, *args))
    if with_overlap:
        jobs["matmul"] = (lambda c, m, k: m @ k, mats)
    t0 = time.perf_counter()
    compiled = compile_all(comm, jobs, a.calls, a.unroll)
    log(f"  compiled {2 * len(jobs)} chains in {time.perf_counter() - t0:.1f} s")
    us = {}
    for job, (_, args) in jobs.items():
        us[job] = measure(compiled[job, 1], compiled[job, a.calls + 1], args, a.calls, a.repeats)
        if hasattr(comm, "check"):
            comm.check()  # a CUDA kernel that timed out waiting for a peer raises here
    kernels, isolated = {}, {}
    if on_cuda:
        from jaxep import _cuda
        if cfg.ll_copy_engine:
            log(f"  copy-engine sends enqueued per GPU: {_cuda.ll_copy_engine_sends(comm)}")
        for name in ops:
            _, send, recv, op_args, _ = ops[name]
            chain = compiled[name, a.calls + 1]
            kernels[name] = kernel_times(lambda: chain(*op_args).block_until_ready())
            log(f"  {name}: kernel device time (median over calls and GPUs, us): "
                + ", ".join(f"{k} {v:.1f}" for k, v in kernels[name].items()))
            if a.no_isolated:
                continue
            isolated[name] = kernel_times(
                isolated_runner(per_rank, comm, send, recv, op_args), 20)
            log(f"  {name}: isolated (send, host wait, recv) kernel time (us): "
                + ", ".join(f"{k} {v:.1f}" for k, v in isolated[name].items()))
    recv, remote = ll_rows(comm.expert_rank, idx_np, r, t)
    rows, overlap = [], []
    for name, (*_, b) in ops.items():
        impl = comm.implementation("ll_" + name.split()[0])
        full = us[name]["us"]
        if on_cuda:
            kt = kernels[name]
            send = next((v for k, v in kt.items() if "Send" in k), float("nan"))  # ce: the pack
            rcv = next((v for k, v in kt.items() if "Recv" in k), float("nan"))
            span = kt.get("span", float("nan"))
        else:
            send, rcv = us[name + " send"]["us"], us[name + " recv"]["us"]
            span = float("nan")
        row = dict(op=name, tokens=t, backend=backend, impl=impl, us=full, send_us=send,
                   recv_us=rcv, span_us=span, full_minus_send_us=full - send, row_bytes=b,
                   phase_method="kernel device time (profiler)" if on_cuda else "host chains",
                   kernels_us=kernels.get(name, {}), isolated_us=isolated.get(name, {}),
                   recv_rows=recv.tolist(), remote_rows=remote.tolist(),
                   bytes_avg=float(recv.mean() * b), nvlink_bytes_avg=float(remote.mean() * b),
                   samples_us={k: us[k]["samples_us"] for k in us if k.startswith(name)})
        row["gbps"] = row["bytes_avg"] / full / 1e3
        row["nvlink_gbps"] = row["nvlink_bytes_avg"] / full / 1e3
        log(f"  {name:13s} {backend:4s} (impl {impl:4s}): {full:9.1f} us = send {send:.1f} + "
            f"recv {rcv:.1f}, device span {span:.1f}, {row['gbps']:6.1f} GB/s")
        rows.append(row)
        if with_overlap and name not in one_kernel:
            mm, pin, free = us["matmul"]["us"], us[name + " pinned"]["us"], us[name + " free"]["us"]
            overlap.append(dict(op=name, tokens=t, backend=backend, impl=impl, alone_us=full,
                                matmul_us=mm, pinned_us=pin, free_us=free,
                                gain_pinned_us=full + mm - pin, gain_free_us=full + mm - free,
                                matmul_shape=[a.matmul_m, a.hidden, a.hidden]))
            log(f"  {name:13s} overlap: alone {full:.1f} + matmul {mm:.1f}; pinned {pin:.1f} "
                f"(gain {full + mm - pin:.1f}), free {free:.1f} (gain {full + mm - free:.1f})")
    comm.close()
    return rows, overlap


def table(rows, overlap, a, big):
    fmt = "{:18s} {:>5} {:7s} {:4s} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>8}"
    print("\n" + fmt.format("op", "T", "backend", "impl", "us", "send", "recv", "span",
                            "full-send", "GB/s", "NVL GB/s"))
    for r in sorted(rows, key=lambda r: (r["op"][0] == "c", r["op"], r["tokens"], r["backend"])):
        print(fmt.format(r["op"], r["tokens"], r["backend"], r["impl"], *(
            f"{r[k]:.1f}" for k in ("us", "send_us", "recv_us", "span_us", "full_minus_send_us",
                                    "gbps", "nvlink_gbps"))))
    print("\nreference, DESIGN.md §4 (4xH200, T=128, H=7168, K=8, E=256), us:")
    for op, (tot, send, recv, xla) in REFERENCE.items():
        print(f"  {op:13s} DeepEP V1 {tot} = send {send} + recv {recv}; XLA dense {xla}")
    if overlap:
        print(f"\noverlap at T={big}: bf16 [{a.matmul_m}, {a.hidden}] @ [{a.hidden}, {a.hidden}] "
              f"between send and recv; gain = (a) + (b) - (c)")
        fmt = "{:18s} {:7s} {:4s} {:>10} {:>10} {:>10} {:>7} {:>10} {:>7}"
        print(fmt.format("op", "backend", "impl", "(a) alone", "(b) matmul", "(c) pinned",
                         "gain", "(c) free", "gain"))
        for o in overlap:
            print(fmt.format(o["op"], o["backend"], o["impl"], *(f"{o[k]:.1f}" for k in (
                "alone_us", "matmul_us", "pinned_us", "gain_pinned_us", "free_us",
                "gain_free_us"))))


def plot(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for backend in sorted({r["backend"] for r in rows}):
            sel = sorted((r for r in rows if r["op"] == op and r["backend"] == backend),
                         key=lambda r: r["tokens"])
            for key, style in (("us", "o-"), ("send_us", "s--"), ("recv_us", "^:")):
                ax.plot([r["tokens"] for r in sel], [r[key] for r in sel], style,
                        label=f"{backend} {key[:-3] if key != 'us' else 'full'}")
        ax.set_xscale("log", base=2)
        ax.set(title=op, xlabel="tokens per rank", ylabel="us per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("jaxep low-latency mode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=None, help="devices (default: all visible)")
    p.add_argument("--tokens", type=csv(int), default=[32, 64, 128], help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--backends", type=csv(str), default=["cuda", "xla"],
                   help="comma-separated; 'cuda' alone where several processes share one GPU "
                        "(XLA collectives fail there)")
    p.add_argument("--also-bf16", action="store_true", help="also time BF16 ll_dispatch")
    p.add_argument("--matmul-m", type=int, default=256, help="rows M of the overlapped matmul")
    p.add_argument("--no-overlap", action="store_true", help="skip the overlap measurement")
    p.add_argument("--no-isolated", action="store_true",
                   help="CUDA: skip the isolated (send, host wait, recv) kernel times")
    p.add_argument("--no-prereduce", action="store_true",
                   help="skip the pre-reduced ll_combine (prereduce=True and 'float32')")
    p.add_argument("--num-sms", type=int, default=None,
                   help="EPConfig.num_sms: blocks per LL kernel (default: every SM)")
    add_timing_args(p)
    add_distributed_args(p)
    a = p.parse_args()
    mesh, env, log = start_run(a, f"H={a.hidden}, K={a.topk}, E={a.experts}")
    r = mesh.size
    big = 128 if 128 in a.tokens else max(a.tokens)
    rows, overlap, t_start = [], [], time.perf_counter()
    for backend in a.backends:
        if not backend_usable(mesh, backend, log):
            continue
        for t in a.tokens:
            log(f"[{backend}] T={t} ({time.perf_counter() - t_start:.0f} s)")
            got = run_case(mesh, backend, t, a, t == big and not a.no_overlap, log)
            rows += got[0]
            overlap += got[1]
    print(f"\nR={r} {env['device']}, H={a.hidden}, K={a.topk}, E={a.experts}; median time per "
          f"call (us); GB/s = per-rank average received (token, expert) bytes / full time; "
          f"impl = what ran; cuda send/recv = median kernel device time from the profiler; "
          f"span = send start to recv end on one GPU (device time of the op, profiler)")
    table(rows, overlap, a, big)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)
    if a.json and is_main():
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), environment=env, bytes="per-rank average",
                           reference_us=REFERENCE, results=rows, overlap=overlap), f, indent=1)
    if a.plot and is_main():
        plot(a.plot, rows)


if __name__ == "__main__":
    main()
