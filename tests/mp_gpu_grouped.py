"""The grouped ops across processes (one GPU each, or several processes sharing GPU 0), checked
per process against the NumPy oracle (``oracle.dispatch_grouped`` / ``combine_grouped``): every
field of ``Grouped`` and its handle bit-exact, combine within bf16 tolerance, gradients of x and
the routing weights against analytic ones. Run by ``mp_gpu_worker.py``'s ``ops`` scenario.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxep
import oracle
from mp_gpu_cases import (F32, F64, SIZE, Case, bf16, kinds, make_routing, quantize, seed_of,
                          tol_bf16, tol_grad)

if SIZE == "small":
    GROUPED = dict(E=16, K=4, H=128, T=8)
    GROUPED_TRIALS = dict(plain=4, aligned=2, fp8=1, grad=1)
else:
    GROUPED = dict(E=32, K=4, H=256, T=48)
    GROUPED_TRIALS = dict(plain=8, aligned=4, fp8=2, grad=2)
GROUPED_KINDS = ("random", "minus_one", "invalid", "zipf", "one_expert", "empty_rank",
                 "duplicates", "nowhere", "mixed", "one_rank")
GRAD_C0 = 0.5


def grouped_body(comm, fp8, zero_padding):
    def body(x, idx, w, y):
        g = jaxep.dispatch_grouped(comm, x, idx, w, zero_padding=zero_padding)
        res = dict(x=g.x, group_sizes=g.group_sizes, weights=g.weights,
                   num_dropped=g.num_dropped[None], num_invalid=g.num_invalid[None],
                   src_index=g.handle.src_index, dest_row=g.handle.dest_row,
                   dest_rank=g.handle.dest_rank)
        if not fp8:  # NaN on padding rows: they must be ignored, not multiplied by 0
            ym = jnp.where(g.handle.src_index[:, None] >= 0, y, jnp.nan).astype(y.dtype)
            res["out"] = jaxep.combine_grouped(comm, ym, g.handle)
            res["out_unweighted"] = jaxep.combine_grouped(comm, ym, g.handle, weighted=False)
        return res
    return body


def dest_tables(ref, idx, expert_rank, rank, T):
    """The oracle's ``dest_row`` / ``dest_rank [T, K]`` of rank ``rank``'s tokens."""
    E = len(expert_rank)
    K = idx.shape[1]
    rows = np.full((T, K), -1, np.int32)
    ranks = np.full((T, K), -1, np.int32)
    for t in range(T):
        g = rank * T + t
        seen = set()
        for k in range(K):
            e = int(idx[g, k])
            if not 0 <= e < E or e in seen:
                continue
            seen.add(e)
            d = int(expert_rank[e])
            i = ref[d]["rows"].get((g, e))
            if i is not None:
                rows[t, k], ranks[t, k] = i, d
    return rows, ranks


def grouped_case(w, comm, T, kind, seed, tag, fp8=None, zero_padding=True):
    R, cfg = w.R, comm.cfg
    E, K, H = cfg.num_experts, cfg.num_topk, cfg.hidden
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    x = bf16(rng.standard_normal((R * T, H)))
    if fp8:
        x = quantize(w, x, round_scale=fp8 == "ue8m0", ue8m0=fp8 == "ue8m0")
    ref = oracle.dispatch_grouped(x, idx, wts, comm.expert_rank, comm.expert_slot, R,
                                  cfg.expert_alignment, cfg.grouped_capacity)
    M = len(ref[0]["src_index"])
    y = bf16(rng.standard_normal((R * M, H)) * 2)
    f = w.fn(("grouped", id(comm), T, fp8, zero_padding),
             lambda: w.ep_call(grouped_body(comm, fp8, zero_padding)))
    got = w.call(f, x, idx, wts, y)
    me = ref[w.rank]
    case = Case(w, f"dispatch_grouped {tag} T={T} M={M} {kind}" + (f" fp8={fp8}" if fp8 else "")
                + ("" if zero_padding else " zero_padding=False"))
    used = np.arange(M) < int(np.sum(me["group_sizes"]))
    mask = None if zero_padding else used
    if fp8:
        case.bits("x payload", got["x"][0], me["x"][0], mask)
        case.bits("x scales", got["x"][1], me["x"][1], mask)
    else:
        case.bits("x", got["x"], me["x"], mask)
    for name in ("group_sizes", "weights", "src_index"):
        case.bits(name, got[name], me[name])
    for name in ("num_dropped", "num_invalid"):
        case.scalar(name, got[name], me[name])
    rows, ranks = dest_tables(ref, idx, comm.expert_rank, w.rank, T)
    case.bits("dest_row", got["dest_row"], rows)
    case.bits("dest_rank", got["dest_rank"], ranks)
    if not fp8:
        srcs = [r["src_index"] for r in ref]
        ws = [r["weights"] for r in ref]
        ys = [w.rows(y, d) for d in range(R)]
        for name, weighted in (("out", True), ("out_unweighted", False)):
            want = w.rows(oracle.combine_grouped(ys, srcs, ws, T, weighted))
            mag = w.rows(oracle.combine_grouped([np.abs(a.astype(F64)) for a in ys], srcs,
                                                [np.abs(v) for v in ws], T, weighted))
            case.close(f"combine_grouped {name}", got[name], want, tol_bf16(want, mag))
    case.done()
    return ref


def grouped_grad_body(comm):
    def body(x, idx, wts, pout):
        def local_loss(x, wts):
            g = jaxep.dispatch_grouped(comm, x, idx, wts)
            y = (g.x.astype(jnp.float32) * (GRAD_C0 + g.weights[:, None])).astype(x.dtype)
            out = jaxep.combine_grouped(comm, y, g.handle)
            return jnp.sum(out.astype(jnp.float32) * pout)

        loss, (gx, gw) = jax.value_and_grad(local_loss, argnums=(0, 1))(x, wts)
        return loss[None], gx, gw
    return body


def grouped_grad_case(w, comm, T, kind, seed, dtype):
    """Gradients of ``sum(combine_grouped(g.x * (c + g.weights)) * pout)`` w.r.t. x and
    topk_weights: analytic, d/dx[t] = sum over t's rows of w (c + w) pout[t]; a row's weight
    cotangent is <pout[t], x[t]> (c + 2 w), sent to every top-k entry listing its expert."""
    R, cfg = w.R, comm.cfg
    E, K, H = cfg.num_experts, cfg.num_topk, cfg.hidden
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    xf = rng.standard_normal((R * T, H))
    x = bf16(xf) if dtype == "bfloat16" else xf.astype(F32)
    pout = rng.standard_normal((R * T, H)).astype(F32)
    f = w.fn(("ggrad", id(comm), T, dtype), lambda: w.ep_call(grouped_grad_body(comm)))
    loss, gx, gw = w.call(f, x, idx, wts, pout)

    ref = oracle.dispatch_grouped(x, idx, wts, comm.expert_rank, comm.expert_slot, R,
                                  cfg.expert_alignment, cfg.grouped_capacity)
    xd, pd = np.asarray(x, F32).astype(F64), pout.astype(F64)
    want_gx = np.zeros_like(xd)
    g_rows, loss_terms = [], np.zeros(R * T)
    for r in ref:
        gr = np.zeros(len(r["src_index"]))
        for i, g in enumerate(r["src_index"].tolist()):
            if g >= 0:
                wi = float(r["weights"][i])
                dot = float(np.dot(pd[g], xd[g]))
                want_gx[g] += wi * (GRAD_C0 + wi) * pd[g]
                gr[i] = dot * (GRAD_C0 + 2 * wi)
                loss_terms[g] += wi * (GRAD_C0 + wi) * dot
        g_rows.append(gr)
    want_gw = oracle.grouped_weight_grad(g_rows, idx, comm.expert_rank, [r["rows"] for r in ref])
    np_dtype = F32 if dtype == "float32" else None
    case = Case(w, f"grad dispatch_grouped->combine_grouped {dtype} T={T} {kind}")
    want_loss = float(np.sum(w.rows(loss_terms)))
    case.close("loss", loss, np.array([want_loss]),
               (1e-5 if np_dtype else 2e-2) * float(np.sum(np.abs(w.rows(loss_terms)))) + 1e-6)
    case.close("grad x", gx, w.rows(want_gx), tol_grad(w.rows(want_gx), np_dtype))
    case.close("grad topk_weights", gw, w.rows(want_gw), tol_grad(w.rows(want_gw), np_dtype))
    case.done()


def grouped_section(w):
    S, N = GROUPED, GROUPED_TRIALS
    R, E, K, H, T = w.R, S["E"], S["K"], S["H"], S["T"]
    ops = ("dispatch_grouped", "combine_grouped")
    Cfg = jaxep.EPConfig
    plain = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T), ops)
    # alignment 4 and a capacity below the mean received pairs: pad rows and drops
    aligned = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                         placement="round_robin", expert_alignment=4,
                         grouped_capacity=T * K * 3 // 4), ops)
    fp8c = w.comm(Cfg(num_experts=E, num_topk=K, hidden=384, max_tokens_per_rank=T), ops)
    dropped = 0
    for trial, kind in enumerate(kinds(GROUPED_KINDS, N["plain"])):
        grouped_case(w, plain, T, kind, seed_of("g", R, trial), "linear")
    grouped_case(w, plain, T - 3, "random", seed_of("gfew", R), "linear fewer tokens")
    for trial, kind in enumerate(kinds(("random", "zipf", "one_expert", "mixed"), N["aligned"])):
        ref = grouped_case(w, aligned, T, kind, seed_of("ga", R, trial), "rr a=4 capacity",
                           zero_padding=trial % 2 == 0)
        dropped += sum(r["num_dropped"] for r in ref)
    if not dropped:
        w.failures.append("test setup: the grouped capacity cases dropped nothing")
    for fp8 in ("f32", "ue8m0"):
        for trial in range(N["fp8"]):
            grouped_case(w, fp8c, T, ("random", "duplicates")[trial % 2],
                         seed_of("gfp8", fp8, R, trial), "linear", fp8=fp8)
    for dtype, comm in (("float32", plain), ("bfloat16", aligned)):
        for trial, kind in enumerate(kinds(("mixed", "random", "one_rank"), N["grad"])):
            grouped_grad_case(w, comm, T, kind, seed_of("ggrad", dtype, R, trial), dtype)
