"""Time the MoE layer's non-GEMM path (dispatch, grouping, ungrouping, combine) three ways, alone
and with the two ``jax.lax.ragged_dot`` expert GEMMs, in one run on the same devices (issue 18).

Variants (all bf16, the same routing and inputs):

- ``sort``: the user code ``examples/train_moe.py`` had before the grouped ops, over
  ``jaxep.dispatch`` / ``jaxep.combine`` on the communicator's default implementation: argsort
  of the ``[C*K]`` local slots, a gather of ``C*K`` rows into expert order, after the experts
  the weight multiply, the scatter back to (row, k) order and the sum over k, then combine.
- ``grouped``: ``jaxep.dispatch_grouped`` + ``jaxep.combine_grouped`` (weighted), default
  implementation.
- ``xla``: ``grouped`` on a Communicator with ``backend="xla"`` (the pure-JAX reference).

Without GEMMs the "expert" is the identity; with them it is ``ragged_dot(gelu(ragged_dot(rows,
w_in [E_l,H,F])), w_out [E_l,F,H])`` on the grouped rows. Reference rows: ``copy`` (a ``jnp``
elementwise copy, ``-buf``, reading and writing ``bytes_min / 2`` each) and ``gemm`` (the two
GEMMs alone on fixed grouped rows).

Grouped against plain (issue 22, target grouped within 10% of plain), same inputs, default
implementation: ``dispatch`` (``jaxep.dispatch`` alone) against ``dispatch_grouped``
(``jaxep.dispatch_grouped`` alone, with this run's ``zero_padding`` and ``grouped_capacity``),
and ``plain`` (``dispatch`` -> ``combine`` of the received rows, no grouping) against
``grouped`` (no GEMM); ratios ``dispatch_grouped_over_dispatch`` and ``grouped_over_plain``.

Timing is ``bench_normal.py``'s (imported): per call, (host wall time of one jitted function
chaining N+1 dependent calls - that of one chaining 1 call) / N, median over ``--repeats``:
device time plus any per-call launch gaps. Before timing, each variant's layer output is checked
once: ``sort``, ``grouped`` and ``xla`` must agree within bf16 tolerance (``--tol``, relative to
the largest |output|), and the identity layer must equal the NumPy ``x * sum of the admitted
routing weights`` (tokens with a pair dropped by ``grouped_capacity`` are left out of the
sort-vs-grouped comparison; the dropped-pair count is checked against NumPy).

Byte model (per rank, averaged over ranks; row = 2H bytes bf16; Rr = received rows (token,
rank), P = received (token, local expert) pairs, T = tokens, C = R*T, M = grouped rows):

- ``bytes_min`` = 2H (Rr + 2P + T): the least any implementation moves: dispatch reads each
  received row once and writes one row per pair, combine reads each pair's row and writes each
  token's output. At R=1, T=4096, H=7168, K=8: 1.057 GB. ``copy`` moves these bytes.
- ``grouped`` / ``xla``: ``bytes_min`` + 2H (M - P) when ``--zero-padding`` (pad rows written).
- ``sort`` (as written, XLA's fusion ignored: an estimate): dispatch Rr read + C written;
  gather C*K read + C*K written; weight and scatter back C*K bf16 read + 2 x C*K f32 written
  (zeros, then the scatter); sum over k C*K f32 read + C written; combine C read + T written.

    python benchmarks/bench_moe_layer.py --ranks 1 --machine 1xh200      # the issue's target
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_moe_layer.py \\
        --tokens 64 --hidden 256 --experts 8 --ranks 4 --iters 2 --out /tmp/x.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_normal import compile_all, make_routing, measure, received_rows, start_run  # noqa: E402

import jaxep  # noqa: E402

VARIANTS = ("sort", "grouped", "xla")
TARGETS = {"grouped_over_copy_max": 1.4, "sort_over_grouped_min": 7.0}
GROUPED_OVER_PLAIN_MAX = 1.10   # issue 22: grouped dispatch within 10% of plain dispatch


def sort_layer(comm, x, idx, w, expert):
    """The pre-grouped-API user code (examples/train_moe.py before df0b460) around ``expert``."""
    d = jaxep.dispatch(comm, x, idx, w)
    c, k = d.topk_idx.shape
    el = comm.num_local_experts
    slot = d.topk_idx.reshape(-1)                       # [C*K] local expert of each (row, k)
    group = jnp.where(slot >= 0, slot, el)              # unused pairs sort last, in no group
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=el + 1)[:el].astype(jnp.int32)
    out = expert(d.x[order // k], sizes)
    out = out * d.topk_weights.reshape(-1)[order][:, None]
    out = jnp.zeros_like(out).at[order].set(out)        # back to (row, k) order
    return jaxep.combine(comm, out.reshape(c, k, -1).sum(axis=1).astype(x.dtype), d.handle)


def grouped_layer(comm, x, idx, w, expert, zero_padding):
    g = jaxep.dispatch_grouped(comm, x, idx, w, zero_padding=zero_padding)
    return jaxep.combine_grouped(comm, expert(g.x, g.group_sizes).astype(x.dtype), g.handle)


def identity(rows, sizes):
    return rows


def gemms(w_in, w_out):
    def expert(rows, sizes):
        hid = jax.nn.gelu(jax.lax.ragged_dot(rows, w_in, sizes))
        return jax.lax.ragged_dot(hid, w_out, sizes)
    return expert


def layer_fn(variant, comm, zero_padding, gemm):
    """fn(_, x, idx, w[, w_in, w_out]) -> [T, H] (``chained``'s calling convention)."""
    def fn(_, x, idx, w, *ws):
        expert = gemms(*ws) if gemm else identity
        if variant == "sort":
            return sort_layer(comm, x, idx, w, expert)
        return grouped_layer(comm, x, idx, w, expert, zero_padding)
    return fn


def admitted_pairs(comm, idx, w, tokens, capacity):
    """NumPy: per source token the sum of its admitted pairs' weights, whether any of its pairs
    was dropped, and the dropped count (admission in (src rank, src token, slot) order, DESIGN
    §2; expert_alignment 1). ``idx`` holds distinct valid experts per token."""
    n, k = idx.shape
    tok, e = np.repeat(np.arange(n), k), idx.reshape(-1)
    dest, slot = comm.expert_rank[e], comm.expert_slot[e]
    order = np.lexsort((slot, tok, dest))
    dest_sorted = dest[order]
    first = np.searchsorted(dest_sorted, dest_sorted)          # start of each rank's run
    ok = np.empty(n * k, bool)
    ok[order] = (np.arange(n * k) - first) < capacity
    wsum = np.zeros(n, np.float64)
    np.add.at(wsum, tok[ok], w.reshape(-1)[ok])
    dropped_tok = np.zeros(n, bool)
    dropped_tok[tok[~ok]] = True
    return wsum, dropped_tok, int((~ok).sum())


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def check(name, a, b, tol, log):
    err = rel_err(a, b)
    log(f"  check {name}: max|diff| / max|ref| = {err:.2e} (tol {tol:g})")
    assert err <= tol, (f"bench_moe_layer: {name} disagree: max|diff| / max|ref| = {err:.3e} > "
                        f"--tol {tol:g}; a benchmark of wrong code is worthless")
    return err


def byte_model(a, r, el, recv, pairs, m):
    """Per-rank average bytes (see the module docstring)."""
    row, t, c, k = 2 * a.hidden, a.tokens, r * a.tokens, a.topk
    rr, p = float(recv.mean()), float(pairs.mean())
    bmin = row * (rr + 2 * p + t)
    grouped = bmin + (row * (m - p) if a.zero_padding else 0.0)
    sort = (row * (rr + c)                      # dispatch
            + 2 * row * c * k                   # gather into expert order
            + row * c * k + 2 * 2 * row * c * k  # weight, scatter back (f32 zeros + scatter)
            + 2 * row * c * k + row * c         # sum over k (f32 read, bf16 written)
            + row * (c + t))                    # combine
    return dict(min=bmin, sort=sort, grouped=grouped, xla=grouped)


def kernel_name(name):
    """``void jaxep::(anonymous namespace)::GroupedCombineKernel<__nv_bfloat16>(...)`` ->
    ``GroupedCombineKernel<__nv_bfloat16>``; XLA's fusion names unchanged."""
    name = name.replace("(anonymous namespace)", "").removeprefix("void ")
    return name.split("(")[0].split("::")[-1][:48]


def kernel_breakdown(fn, args, repeats=5):
    """Device time per kernel of one call of ``fn(*args)`` (jitted, blocking), median over
    ``repeats`` calls, from a ``jax.profiler`` trace of the first GPU: ``{kernel: us}`` in
    launch order, and ``"total"``: from the first kernel's start to the last one's end."""
    import glob
    import tempfile

    jax.block_until_ready(fn(*args))
    per_call = {}
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(repeats):
                jax.block_until_ready(fn(*args))
        path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[0]
        data = jax.profiler.ProfileData.from_file(path)
        plane = next((p for p in data.planes if p.name.startswith("/device:GPU")), None)
        if plane is None:  # not a GPU: no kernel timeline
            return {}
        events = sorted((ev.start_ns, ev.end_ns, ev.name) for line in plane.lines
                        for ev in line.events if ev.duration_ns > 0
                        and not line.name.lower().startswith(("xla ops", "xla modules",
                                                              "steps", "source")))
    calls = [[]]
    for ev in events:  # a call ends where the gap to the next kernel exceeds 50 us
        if calls[-1] and ev[0] - calls[-1][-1][1] > 50_000:
            calls.append([])
        calls[-1].append(ev)
    calls = [c for c in calls if c][-repeats:]
    for c in calls:
        for s0, e0, name in c:
            short = kernel_name(name)
            per_call.setdefault(short, []).append((e0 - s0) / 1e3)
        per_call.setdefault("total", []).append((c[-1][1] - c[0][0]) / 1e3)
    n = len(calls)
    return {k: float(np.sum(v)) / n if k != "total" else float(np.median(v))
            for k, v in per_call.items()}


def machine_name(env):
    kind = env["device"].lower().replace("nvidia", "").strip().split()
    return f"{env['ranks']}x{kind[-1] if kind else env['platform']}"


def plot(path, rows, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    us = {(x["variant"], x["gemm"]): x["us"] for x in rows}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = np.arange(len(VARIANTS))
    for off, gemm, label in ((-0.2, False, "dispatch+group+combine"), (0.2, True, "with GEMMs")):
        vals = [us.get((v, gemm), np.nan) for v in VARIANTS]
        bars = ax.bar(xs + off, vals, 0.4, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    refs = [(name, us[(name, False)]) for name in ("copy", "gemm") if (name, False) in us]
    for i, (name, val) in enumerate(refs):
        bar = ax.bar([len(VARIANTS) + i], [val], 0.4, color="grey")
        ax.bar_label(bar, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(xs) + [len(VARIANTS) + i for i in range(len(refs))],
                  list(VARIANTS) + [f"{n} (ref)" for n, _ in refs])
    ax.set_yscale("log")
    ax.set(ylabel="us per call (median, log)", title=title)
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=None, help="devices (default: all visible)")
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=None, help="E (default: 32 at R=1, else 256)")
    p.add_argument("--ffn", type=int, default=2048, help="F, expert intermediate size")
    p.add_argument("--routing", choices=["uniform", "zipf"], default="uniform",
                   help="uniform: DeepEP's top-k of |N(0,1)|+1 scores; zipf: skewed")
    p.add_argument("--zipf-alpha", type=float, default=1.2)
    p.add_argument("--grouped-capacity-factor", type=float, default=None,
                   help="EPConfig.grouped_capacity = ceil(factor x mean received pairs per "
                        "rank) (default: None, the never-dropping worst case)")
    p.add_argument("--zero-padding", action=argparse.BooleanOptionalAction, default=True,
                   help="dispatch_grouped's zero_padding")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda"],
                   help="the default communicator of sort / grouped")
    p.add_argument("--iters", "--calls", dest="calls", type=int, default=50,
                   help="N, timed chained calls per repeat")
    p.add_argument("--unroll", type=int, default=10,
                   help="calls per loop iteration (0: all N+1 calls unrolled)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=2e-2, help="bf16 agreement (relative to max)")
    p.add_argument("--kernels", action="store_true",
                   help="also profile one grouped call and one copy: device time per kernel")
    p.add_argument("--machine", default=None, help="name in the default --out (e.g. 1xh200)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/moe_layer_<machine>.json); the "
                        "PNG goes beside it")
    a = p.parse_args()
    mesh, env, log = start_run(a, f"T={a.tokens}, H={a.hidden}, K={a.topk}, F={a.ffn}")
    r, t, h, k = mesh.size, a.tokens, a.hidden, a.topk
    e = a.experts or (32 if r == 1 else 256)
    spec = P("ep")
    shard = lambda v: jax.device_put(v, NamedSharding(mesh, spec))  # noqa: E731

    # Routing first: the capacity depends on it.
    base = jaxep.Communicator(mesh, jaxep.EPConfig(e, k, h, t), backend="xla")
    el = base.num_local_experts
    idx_np, w_np = make_routing(np.random.default_rng(a.seed), r * t, e, k,
                                "random" if a.routing == "uniform" else "zipf", a.zipf_alpha)
    recv, _ = received_rows(base.expert_rank, idx_np, r, t)
    pairs = np.bincount(base.expert_rank[idx_np].reshape(-1), minlength=r)
    cap = (None if a.grouped_capacity_factor is None
           else max(1, math.ceil(a.grouped_capacity_factor * pairs.mean())))
    cfg = jaxep.EPConfig(num_experts=e, num_topk=k, hidden=h, max_tokens_per_rank=t,
                         grouped_capacity=cap)
    comms = {"default": jaxep.Communicator(mesh, cfg, backend=a.backend),
             "xla": jaxep.Communicator(mesh, cfg, backend="xla")}
    m = cap or r * t * min(k, el)
    log(f"R={r} E={e} (E_l={el}) routing={a.routing}: received pairs per rank mean "
        f"{pairs.mean():.0f} max {pairs.max()}, rows per rank mean {recv.mean():.0f}; "
        f"grouped rows M={m}"
        + ("" if cap is None else f" (grouped_capacity = ceil({a.grouped_capacity_factor} x "
                                  f"{pairs.mean():.0f}))") + f", zero_padding={a.zero_padding}")
    impl = {name: {op: c.implementation(op) for op in ("dispatch", "combine", "dispatch_grouped",
                                                        "combine_grouped")}
            for name, c in comms.items()}
    log(f"implementations: {impl}")

    x = jax.jit(lambda key: jax.random.normal(key, (r * t, h), jnp.bfloat16),
                out_shardings=NamedSharding(mesh, spec))(jax.random.key(a.seed))
    kw = jax.random.split(jax.random.key(a.seed + 1))
    w_in = shard((jax.random.normal(kw[0], (e, h, a.ffn)) / math.sqrt(h)).astype(jnp.bfloat16))
    w_out = shard((jax.random.normal(kw[1], (e, a.ffn, h)) / math.sqrt(a.ffn))
                  .astype(jnp.bfloat16))
    idx, w = shard(idx_np), shard(w_np)

    def per_rank(f):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))

    comm_of = {"sort": comms["default"], "grouped": comms["default"], "xla": comms["xla"]}
    jobs = {}
    for v in VARIANTS:
        for gemm in (False, True):
            args = (x, idx, w, w_in, w_out) if gemm else (x, idx, w)
            jobs[v, gemm] = (layer_fn(v, comm_of[v], a.zero_padding, gemm), args)

    # Correctness, once per variant, before any timing.
    log("checking the variants agree")
    outs = {key: np.asarray(per_rank(lambda *v, f=f: f(None, *v))(*args), np.float32)
            for key, (f, args) in jobs.items()}
    num_dropped = int(per_rank(lambda *v: jaxep.dispatch_grouped(
        comms["default"], *v, zero_padding=a.zero_padding).num_dropped[None])(x, idx, w).sum())
    wsum, dropped_tok, want_dropped = admitted_pairs(comm_of["sort"], idx_np, w_np, t, m)
    assert num_dropped == want_dropped, (f"bench_moe_layer: dispatch_grouped dropped "
                                         f"{num_dropped} pairs, NumPy says {want_dropped}")
    keep = ~dropped_tok
    x_np = np.asarray(x, np.float32)
    errors = {"sort vs numpy": check("sort (no GEMM) vs NumPy x*sum(w)", outs["sort", False],
                                     x_np * w_np.sum(1, keepdims=True), a.tol, log)}
    for v in ("grouped", "xla"):
        errors[f"{v} vs numpy"] = check(f"{v} (no GEMM) vs NumPy x*sum(admitted w)",
                                        outs[v, False], x_np * wsum[:, None], a.tol, log)
        for gemm in (False, True):
            name = f"{v} vs sort{' +gemm' if gemm else ''}"
            errors[name] = check(name + ("" if keep.all() else f" ({keep.sum()} tokens without "
                                         "dropped pairs)"), outs[v, gemm][keep],
                                 outs["sort", gemm][keep], a.tol, log)
    del outs

    # References: a plain copy of bytes_min, and the two GEMMs alone on grouped rows.
    nbytes = byte_model(a, r, el, recv, pairs, m)
    n_copy = max(1, int(round(nbytes["min"] / 4)))  # bf16 elements read (and written) per rank
    buf = jax.jit(lambda: jnp.ones((r * n_copy,), jnp.bfloat16),
                  out_shardings=NamedSharding(mesh, spec))()
    g_rows, g_sizes = per_rank(lambda *v: (lambda g: (g.x, g.group_sizes))(
        jaxep.dispatch_grouped(comms["default"], *v)))(x, idx, w)
    jobs["copy", False] = (lambda _, b: -b, (buf,))
    # grouped against plain, the ops alone and dispatch -> combine without grouping
    plain_comm = comms["default"]
    jobs["dispatch", False] = (lambda _, *v: jaxep.dispatch(plain_comm, *v), (x, idx, w))
    jobs["dispatch_grouped", False] = (
        lambda _, *v: jaxep.dispatch_grouped(plain_comm, *v, zero_padding=a.zero_padding),
        (x, idx, w))
    jobs["plain", False] = (
        lambda _, *v: (lambda d: jaxep.combine(plain_comm, d.x, d.handle))(
            jaxep.dispatch(plain_comm, *v)), (x, idx, w))
    jobs["gemm", False] = (lambda _, rows, sizes, wi, wo: gemms(wi, wo)(rows, sizes),
                           (g_rows, g_sizes, w_in, w_out))

    t0 = time.perf_counter()
    compiled = compile_all(comms["default"], jobs, a.calls, a.unroll)
    log(f"compiled {len(compiled)} chains in {time.perf_counter() - t0:.1f} s")
    gemm_flops = 4.0 * float(pairs.mean()) * h * a.ffn
    rows = []
    for (v, gemm), (_, args) in jobs.items():
        meas = measure(compiled[(v, gemm), 1], compiled[(v, gemm), a.calls + 1], args, a.calls,
                       a.repeats)
        for c in comms.values():
            if hasattr(c, "check"):
                c.check()  # a CUDA kernel that timed out waiting for a peer raises here
        row = dict(variant=v, gemm=gemm, **meas)
        if v in VARIANTS or v in ("dispatch", "dispatch_grouped", "plain"):
            row["impl"] = impl["xla" if v == "xla" else "default"]
        if v == "copy" or (v in VARIANTS and not gemm):
            row["bytes"] = nbytes["min" if v == "copy" else v]
            row["gbps"] = row["bytes"] / row["us"] / 1e3
            row["gbps_min"] = nbytes["min"] / row["us"] / 1e3
        if gemm or v == "gemm":
            row["gemm_tflops"] = gemm_flops / row["us"] / 1e6
        rows.append(row)

    breakdown = {}
    if a.kernels:  # where the grouped layer's time goes, per kernel (one call, device time)
        one = {key: per_rank(lambda *v, f=jobs[key][0]: f(None, *v)) for key in
               (("grouped", False), ("copy", False))}
        for (v, _), f in one.items():
            breakdown[v] = kernel_breakdown(f, jobs[v, False][1])
            log(f"kernels of one {v} call (device us, first GPU): " + ", ".join(
                f"{k} {val:.1f}" for k, val in breakdown[v].items()))

    us = {(x_["variant"], x_["gemm"]): x_["us"] for x_ in rows}
    ratios = {"sort_over_grouped": us["sort", False] / us["grouped", False],
              "xla_over_grouped": us["xla", False] / us["grouped", False],
              "grouped_over_copy": us["grouped", False] / us["copy", False],
              "layer_sort_over_grouped": us["sort", True] / us["grouped", True],
              "layer_xla_over_grouped": us["xla", True] / us["grouped", True],
              "dispatch_grouped_over_dispatch": us["dispatch_grouped", False]
              / us["dispatch", False],
              "grouped_over_plain": us["grouped", False] / us["plain", False],
              **{f"comm_share_{v}": us[v, False] / us[v, True] for v in VARIANTS}}
    met = {"grouped_over_copy_max": ratios["grouped_over_copy"]
           <= TARGETS["grouped_over_copy_max"],
           "sort_over_grouped_min": ratios["sort_over_grouped"]
           >= TARGETS["sort_over_grouped_min"]}

    print(f"\nR={r} x {env['device']}, T={t} H={h} K={k} E={e} F={a.ffn} bf16, {a.routing} "
          f"routing; M={m}" + ("" if cap is None else
                               f" (grouped_capacity {a.grouped_capacity_factor} x mean pairs)")
          + f", zero_padding={a.zero_padding}; median time per call over {a.calls} chained "
          f"calls; bytes per rank (byte model in the docstring); bytes_min = "
          f"{nbytes['min'] / 1e6:.1f} MB")
    fmt = "{:8s} {:6s} {:>10} {:>9} {:>8} {:>9} {:>8}"
    print(fmt.format("variant", "GEMMs", "us", "MB", "GB/s", "GBmin/s", "TFLOP/s"))
    for x_ in rows:
        print(fmt.format(x_["variant"], "yes" if x_["gemm"] or x_["variant"] == "gemm" else "no",
                         f"{x_['us']:.1f}", f"{x_['bytes'] / 1e6:.1f}" if "bytes" in x_ else "",
                         f"{x_['gbps']:.0f}" if "gbps" in x_ else "",
                         f"{x_['gbps_min']:.0f}" if "gbps_min" in x_ else "",
                         f"{x_['gemm_tflops']:.1f}" if "gemm_tflops" in x_ else ""))
    print("ratios: " + ", ".join(f"{name} {val:.2f}" for name, val in ratios.items()))
    target_shape = (r, t, h, k, e) == (1, 4096, 7168, 8, 32)
    verdict = {key: "met" if ok else "MISSED" for key, ok in met.items()}
    print(f"targets (issue 18, at R=1 T=4096 H=7168 K=8 E=32"
          f"{'' if target_shape else '; not the shape of this run'}): grouped/copy <= "
          f"{TARGETS['grouped_over_copy_max']}: {verdict['grouped_over_copy_max']}; "
          f"sort/grouped >= {TARGETS['sort_over_grouped_min']}: "
          f"{verdict['sort_over_grouped_min']}")
    met22 = ratios["dispatch_grouped_over_dispatch"] <= GROUPED_OVER_PLAIN_MAX
    print(f"target (issue 22): dispatch_grouped / dispatch <= {GROUPED_OVER_PLAIN_MAX}: "
          f"{'met' if met22 else 'MISSED'} ({ratios['dispatch_grouped_over_dispatch']:.3f}; "
          f"grouped / plain layer without GEMMs {ratios['grouped_over_plain']:.3f})")

    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"moe_layer_{a.machine or machine_name(env)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    shape = dict(ranks=r, tokens=t, hidden=h, topk=k, experts=e, local_experts=el, ffn=a.ffn,
                 dtype="bfloat16", grouped_rows=m, grouped_capacity=cap,
                 grouped_capacity_factor=a.grouped_capacity_factor,
                 mean_received_pairs=float(pairs.mean()), max_received_pairs=int(pairs.max()),
                 mean_received_rows=float(recv.mean()), num_dropped=num_dropped,
                 zero_padding=a.zero_padding, routing=a.routing)
    with open(out, "w") as f:
        json.dump(dict(args=vars(a), environment=env, shape=shape, bytes=nbytes,
                       byte_model=__doc__.split("Byte model")[1].split("\n\n    python")[0],
                       timing="bench_normal.py chained calls: device time + launch gaps",
                       correctness=errors, results=rows, kernels=breakdown, ratios=ratios,
                       targets=TARGETS,
                       targets_met=met, target_shape=target_shape,
                       grouped_over_plain_max=GROUPED_OVER_PLAIN_MAX,
                       grouped_over_plain_met=bool(met22)), f, indent=1)
    png = os.path.splitext(out)[0] + ".png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png = "no plot (matplotlib is not installed)"
    else:
        plot(png, rows, f"MoE layer, R={r} {env['device']}, T={t} H={h} K={k} E={e} "
                        f"F={a.ffn}, {a.routing}")
    log(f"wrote {out} and {png}")
    for c in comms.values():
        c.close()
    base.close()


if __name__ == "__main__":
    main()
