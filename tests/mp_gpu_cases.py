"""The op checks of the multi-process GPU worker (``tests/mp_gpu_worker.py``): comparisons
with the NumPy oracle, routings, sizes, and the normal-mode and low-latency cases run by its
``ops`` scenario. Imported by the worker once ``jax.distributed`` is initialised."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxep
import oracle  # tests/ is sys.path[0] when the worker runs as a script

if TYPE_CHECKING:
    from mp_gpu_worker import W

SIZE = os.environ.get("MP_GPU_SIZE", "full")
# EPConfig.ranks_per_node of the internode scenario (None: one node); the "empty_node" routing
# sends nothing to the last node's experts.
RANKS_PER_NODE = int(os.environ.get("MP_GPU_RANKS_PER_NODE", "0")) or None
F32, F64 = np.float32, np.float64


def log(msg: str) -> None:
    """Replaced by the worker's (which prefixes its process index)."""
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------
# comparisons (never raise: record and go on, so every process issues the same calls)
# ------------------------------------------------------------------------------------------


def _bits(a):
    a = np.asarray(a)
    if a.dtype == np.bool_ or a.dtype.kind in "iu":
        return a
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


class Case:
    """One checked case: collects its comparisons, prints one line."""

    def __init__(self, w: W, name: str):
        self.w, self.name, self.bad, self.notes, self.n = w, name, [], [], 0

    def _shape(self, what, got, want) -> bool:
        if got.dtype != want.dtype or got.shape != want.shape:
            self.bad.append(f"{what}: got {got.dtype}{list(got.shape)}, "
                            f"want {want.dtype}{list(want.shape)}")
            return False
        return True

    def bits(self, what, got, want, mask=None):
        """Bit-exact (floats as their bits); ``mask`` (broadcast over trailing dims) limits
        the comparison to the rows the semantics define."""
        self.n += 1
        got, want = np.asarray(got), np.asarray(want)
        if not self._shape(what, got, want):
            return
        g, w = _bits(got), _bits(want)
        if mask is not None:
            g, w, got, want = g[mask], w[mask], got[mask], want[mask]
        diff = g != w
        if np.any(diff):
            i = tuple(int(v) for v in np.argwhere(diff)[0])
            self.bad.append(f"{what}: {int(diff.sum())} of {diff.size} elements differ, first "
                            f"at {i}: got {got[i].item()!r}, want {want[i].item()!r}")

    def scalar(self, what, got, want):
        self.n += 1
        got = np.asarray(got).reshape(-1)
        if got.shape != (1,) or int(got[0]) != int(want):
            self.bad.append(f"{what}: got {got.tolist()}, want {int(want)}")

    def close(self, what, got, want, tol):
        """``|got - want| <= tol`` elementwise (``tol`` an array or a number); ``want``
        float64 from the oracle."""
        self.n += 1
        got = np.asarray(got)
        g = got.astype(F64)
        want = np.asarray(want, F64)
        if g.shape != want.shape:
            self.bad.append(f"{what}: got shape {g.shape}, want {want.shape}")
            return
        if not np.all(np.isfinite(g)):
            self.bad.append(f"{what}: {int((~np.isfinite(g)).sum())} non-finite values")
            return
        tol = np.broadcast_to(np.asarray(tol, F64), g.shape)
        err = np.abs(g - want)
        ratio = err / np.maximum(tol, 1e-300)
        worst = float(ratio.max(initial=0.0))
        if np.any(err > tol):
            i = np.unravel_index(np.argmax(ratio), ratio.shape)
            self.bad.append(f"{what}: {int((err > tol).sum())} of {err.size} out of tolerance, "
                            f"worst at {tuple(int(v) for v in i)}: got {g[i].item()!r}, "
                            f"want {want[i].item()!r}, |diff| {err[i]:.3g} > tol {tol[i]:.3g}")
        else:
            self.notes.append(f"{what} {worst:.2f}")

    def zero(self, what, got, mask):
        """Rows ``mask`` of ``got`` are exactly 0 (tokens sent nowhere / all copies dropped)."""
        self.n += 1
        sel = np.asarray(got).astype(F64)[mask]
        if np.any(sel != 0):
            self.bad.append(f"{what}: {int(np.any(sel != 0, axis=-1).sum())} rows that must be "
                            f"exactly 0 are not")

    def done(self):
        self.w.cases += 1
        if self.bad:
            msg = f"FAIL {self.name}: " + " | ".join(self.bad)
            self.w.failures.append(msg)
            log(msg)
        else:
            extra = f" (worst err/tol: {', '.join(self.notes)})" if self.notes else ""
            log(f"ok   {self.name}: {self.n} checks{extra}")


def bf16(a):
    return np.asarray(a, F32).astype(jnp.bfloat16)


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# ------------------------------------------------------------------------------------------
# routings (tests/test_gpu_normal.py's kinds: oracle.make_routing's plus a few)
# ------------------------------------------------------------------------------------------

KINDS = ("random", "minus_one", "invalid", "zipf", "one_expert", "one_rank", "empty_rank",
         "silent_rank", "duplicates", "nowhere", "mixed")


def make_routing(kind, rng, R, T, E, K, expert_rank):
    """Global ``(topk_idx [R*T, K] int32, topk_weights [R*T, K] float32)``: oracle kinds
    (random top-k, -1 slots, invalid ids, one expert for all, an empty receiving rank, a silent
    sending rank, duplicates) plus zipf (skewed popularity), one_rank (every expert of every
    token on the last rank), nowhere (all -1), mixed (-1, invalid ids incl. INT32_MIN/MAX and
    duplicates together)."""
    Ntok = R * T
    expert_rank = np.asarray(expert_rank)
    if kind in oracle.ROUTINGS:
        return oracle.make_routing(kind, rng, R, T, E, K, expert_rank)
    w = rng.uniform(0.1, 1.0, (Ntok, K)).astype(F32)
    if kind == "zipf":
        p = 1.0 / np.arange(1, E + 1) ** 1.2
        g = np.log(p)[None, :] + rng.gumbel(size=(Ntok, E))
        idx = np.argsort(-g, axis=1)[:, :K]
    elif kind == "one_rank":
        experts = np.flatnonzero(expert_rank == R - 1)
        assert len(experts) >= K
        idx = experts[np.argsort(rng.random((Ntok, len(experts))), axis=1)[:, :K]]
    elif kind == "nowhere":
        idx = np.full((Ntok, K), -1)
    elif kind == "empty_node":
        per = RANKS_PER_NODE or R
        experts = np.flatnonzero(expert_rank // per != (R - 1) // per)
        if len(experts) < K:  # one node: the empty rank's routing
            return oracle.make_routing("empty_rank", rng, R, T, E, K, expert_rank)
        idx = experts[np.argsort(rng.random((Ntok, len(experts))), axis=1)[:, :K]]
    elif kind == "mixed":
        idx, w = oracle.make_routing("random", rng, R, T, E, K, expert_rank)
        idx = idx.astype(np.int64)
        idx[rng.random((Ntok, K)) < 0.15] = -1
        bad = rng.random((Ntok, K)) < 0.1
        idx[bad] = rng.choice(np.array([E, 999, -5, -(2 ** 31), 2 ** 31 - 1], np.int64),
                              size=int(bad.sum()))
        dup = rng.random(Ntok) < 0.3
        idx[dup, K - 1] = idx[dup, 0]
    else:
        raise ValueError(kind)
    return idx.astype(np.int32), w


# ------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------

if SIZE == "small":   # the CPU smoke test: every code path, small shapes, few routings
    NORMAL = dict(E=16, K=4, H=128, T=8, T_FEW=5)
    FP8 = dict(E=16, K=4, H=384, T=8)          # H/128 = 3: a partial packed UE8M0 word
    LL = dict(E=16, K=4, H=128, T=8, T_FEW=5)
    NORMAL_KINDS = KINDS
    TRIALS = dict(rr=3, ovf=2, few=1, fp8=1, grad=1, ll=4, ll_few=1, ll_fp8=1, ll_two=2,
                  ll_two_fp8=1, ll_rr=1, ll_grad=1)
else:
    NORMAL = dict(E=32, K=4, H=256, T=64, T_FEW=40)
    FP8 = dict(E=32, K=4, H=640, T=128)        # H/128 = 5: a partial packed UE8M0 word
    LL = dict(E=32, K=4, H=256, T=32, T_FEW=13)
    NORMAL_KINDS = KINDS + ("random", "zipf")
    TRIALS = dict(rr=len(KINDS), ovf=4, few=3, fp8=3, grad=3, ll=7, ll_few=4, ll_fp8=3,
                  ll_two=4, ll_two_fp8=2, ll_rr=3, ll_grad=2)

OVF_KINDS = ("random", "one_expert", "zipf", "mixed")
FEW_KINDS = ("random", "minus_one", "duplicates")
LL_KINDS = ("random", "minus_one", "invalid", "one_expert", "empty_rank", "zipf", "duplicates",
            "mixed", "silent_rank", "one_rank")
GRAD_KINDS = ("mixed", "random", "one_rank")


def kinds(seq, n):
    return [seq[i % len(seq)] for i in range(n)]


# tolerances, elementwise: bf16 outputs are float32 sums rounded once (half an ulp, 2^-8
# relative), plus float32 reassociation (bounded by the sum of magnitudes, ``mag``)
def tol_bf16(want, mag):
    return 2.0 ** -7 * np.abs(want) + 2.0 ** -18 * mag + 1e-30


def tol_f32(want, mag):
    return 2.0 ** -21 * np.abs(want) + 2.0 ** -18 * mag + 1e-30


def tol_grad(want, dtype, mag=0.0):
    """Gradients: relative to the largest magnitude (bf16 rounds intermediate rows), and to
    ``mag``, the sum of the magnitudes of the terms where a gradient is a long sum."""
    rel = 1e-5 if dtype == np.float32 else 2e-2
    want = np.asarray(want, F64)
    return (rel * np.abs(want) + rel * max(1.0, float(np.abs(want).max(initial=0.0)))
            + rel * np.asarray(mag, F64))


# ------------------------------------------------------------------------------------------
# normal mode
# ------------------------------------------------------------------------------------------

DISPATCH_FIELDS = ("topk_idx", "topk_weights", "tokens_per_expert", "src_index", "send_slot")


def normal_body(comm, fp8):
    def body(x, idx, w, y):
        lay = jaxep.dispatch_layout(comm, idx)
        d = jaxep.dispatch(comm, x, idx, w)
        res = dict(x=d.x, topk_idx=d.topk_idx, topk_weights=d.topk_weights,
                   num_tokens=d.num_tokens[None], tokens_per_expert=d.tokens_per_expert,
                   num_dropped=d.num_dropped[None], num_invalid=d.num_invalid[None],
                   src_index=d.handle.src_index, send_slot=d.handle.send_slot,
                   tokens_per_rank=lay.tokens_per_rank,
                   layout_tpe=lay.tokens_per_expert, is_token_in_rank=lay.is_token_in_rank)
        if not fp8:
            res["out"] = jaxep.combine(comm, y, d.handle)      # random y: padding ignored
            res["rt"] = jaxep.combine(comm, d.x, d.handle)     # x * kept copies
        return res
    return body


def quantize(w: W, x, round_scale=False, ue8m0=False):
    """``jaxep.quantize_fp8`` of a global NumPy array, on this process's device."""
    f = w.fn(("quantize", round_scale, ue8m0), lambda: jax.jit(
        lambda a: jaxep.quantize_fp8(a, round_scale=round_scale, ue8m0=ue8m0)))
    return tuple(np.asarray(a) for a in f(w.local_device_array(x)))


def normal_case(w: W, comm, T, kind, seed, tag, fp8=None):
    R, cfg = w.R, comm.cfg
    E, K, H = cfg.num_experts, cfg.num_topk, cfg.hidden
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    x = bf16(rng.standard_normal((R * T, H)))
    C = cfg.recv_capacity or R * T
    y = bf16(rng.standard_normal((R * C, H)) * 2)
    if fp8:
        x = quantize(w, x, round_scale=fp8 == "ue8m0", ue8m0=fp8 == "ue8m0")
    f = w.fn(("normal", id(comm), T, fp8), lambda: w.ep_call(normal_body(comm, fp8)))
    got = w.call(f, x, idx, wts, y)

    ref = oracle.dispatch(x, idx, wts, comm.expert_rank, comm.expert_slot, R,
                          cfg.recv_capacity)
    lay = oracle.dispatch_layout(idx, comm.expert_rank, R)[w.rank]
    me = ref[w.rank]
    case = Case(w, f"dispatch {tag} T={T} C={C} {kind}" + (f" fp8={fp8}" if fp8 else ""))
    if fp8:
        if not (isinstance(got["x"], tuple) and len(got["x"]) == 2):
            case.bad.append(f"x: an FP8 dispatch must return a (payload, scales) tuple, got "
                            f"{type(got['x']).__name__}")
        else:
            case.bits("x payload", got["x"][0], me["x"][0])
            case.bits("x scales", got["x"][1], me["x"][1])
    else:
        case.bits("x", got["x"], me["x"])
    for name in DISPATCH_FIELDS:
        case.bits(name, got[name], me[name])
    for name in ("num_tokens", "num_dropped", "num_invalid"):
        case.scalar(name, got[name], me[name])
    case.bits("layout tokens_per_rank", got["tokens_per_rank"], lay["tokens_per_rank"])
    case.bits("layout tokens_per_expert", got["layout_tpe"], lay["tokens_per_expert"])
    case.bits("layout is_token_in_rank", got["is_token_in_rank"], lay["is_token_in_rank"])
    if not fp8:
        srcs = [r["src_index"] for r in ref]
        ys = [w.rows(y, d) for d in range(R)]
        want = oracle.combine(ys, srcs, T)[w.rank]
        mag = oracle.combine([np.abs(a.astype(F64)) for a in ys], srcs, T)[w.rank]
        case.close("combine", got["out"], want, tol_bf16(want, mag))
        want_rt = oracle.combine([r["x"] for r in ref], srcs, T)[w.rank]
        case.close("combine(d.x)", got["rt"], want_rt, tol_bf16(want_rt, np.abs(want_rt)))
        nowhere = np.all(me["send_slot"] < 0, axis=1)   # sent nowhere, or every copy dropped
        case.zero("combine of unsent tokens", got["out"], nowhere)
        case.zero("combine(d.x) of unsent tokens", got["rt"], nowhere)
        if got["out"].dtype != x.dtype:
            case.bad.append(f"combine dtype {got['out'].dtype}, want {x.dtype}")
    case.done()
    return ref


GRAD_C0 = 0.5


def normal_grad_body(comm):
    def body(x, idx, wts, pout):
        def local_loss(x, wts):
            d = jaxep.dispatch(comm, x, idx, wts)
            s = GRAD_C0 + jnp.sum(d.topk_weights, axis=1, keepdims=True)
            y = (d.x.astype(jnp.float32) * s).astype(x.dtype)
            out = jaxep.combine(comm, y, d.handle)
            return jnp.sum(out.astype(jnp.float32) * pout)

        loss, (gx, gw) = jax.value_and_grad(local_loss, argnums=(0, 1))(x, wts)
        return loss[None], gx, gw
    return body


def normal_grad_case(w: W, comm, T, kind, seed, dtype, tag):
    """jax.grad (inside the shard_map, of each rank's loss) of
    ``sum(combine((d.x * (c + sum_k d.topk_weights))) * pout)`` w.r.t. x and topk_weights,
    against the oracle's analytic gradients."""
    R, cfg = w.R, comm.cfg
    E, K, H = cfg.num_experts, cfg.num_topk, cfg.hidden
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    idx[3] = -1                                     # a token sent nowhere
    xf = rng.standard_normal((R * T, H))
    x = bf16(xf) if dtype == "bfloat16" else xf.astype(F32)
    pout = rng.standard_normal((R * T, H)).astype(F32)
    f = w.fn(("ngrad", id(comm), T, dtype), lambda: w.ep_call(normal_grad_body(comm)))
    loss, gx, gw = w.call(f, x, idx, wts, pout)

    cap = cfg.recv_capacity
    ref = oracle.dispatch(x, idx, wts, comm.expert_rank, comm.expert_slot, R, cap)
    srcs = [r["src_index"] for r in ref]
    dx = [r["x"].astype(F64) for r in ref]
    s = [GRAD_C0 + r["topk_weights"].astype(F64).sum(1, keepdims=True) for r in ref]
    out = np.concatenate(oracle.combine([dx[d] * s[d] for d in range(R)], srcs, T))
    want_loss = float(np.sum(w.rows(out) * w.rows(pout)))
    g_y = oracle.dispatch_rows(pout, srcs)
    want_gx = np.concatenate(oracle.combine([g_y[d] * s[d] for d in range(R)], srcs, T))
    g_s = [np.sum(g_y[d] * dx[d], axis=1) for d in range(R)]
    want_gw = oracle.dispatch_weight_grad([np.repeat(g[:, None], K, axis=1) for g in g_s], idx,
                                          comm.expert_rank, R, [r["send_slot"] for r in ref])
    np_dtype = F32 if dtype == "float32" else None
    case = Case(w, f"grad dispatch->combine {tag} {dtype} T={T} C={cap or R * T} {kind}")
    mag_loss = float(np.sum(np.abs(w.rows(out) * w.rows(pout))))
    case.close("loss", loss, np.array([want_loss]),
               (1e-5 if np_dtype else 2e-2) * mag_loss + 1e-6)
    case.close("grad x", gx, w.rows(want_gx), tol_grad(w.rows(want_gx), np_dtype))
    case.close("grad topk_weights", gw, w.rows(want_gw), tol_grad(w.rows(want_gw), np_dtype))
    if gx.dtype != np.asarray(x).dtype or gw.dtype != F32:
        case.bad.append(f"grad dtypes x {gx.dtype} (want {np.asarray(x).dtype}), w {gw.dtype}")
    unsent = np.all(ref[w.rank]["send_slot"] < 0, axis=1)
    case.zero("grad x of unsent tokens", gx, unsent)
    case.zero("grad w of unsent tokens", gw, unsent)
    case.done()


def normal_section(w: W, **extra):
    """The normal-mode cases; ``extra``: more EPConfig fields (the internode scenario's
    ranks_per_node)."""
    S = NORMAL
    R = w.R
    E, K, H, T = S["E"], S["K"], S["H"], S["T"]
    ops = ("dispatch", "combine")
    Cfg = jaxep.EPConfig
    lin = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T, **extra), ops)
    rr = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                    placement="round_robin", **extra), ops)
    ovf = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                     recv_capacity=R * T * 3 // 8, placement="round_robin", **extra), ops)
    F = FP8
    fp8c = w.comm(Cfg(num_experts=F["E"], num_topk=F["K"], hidden=F["H"],
                      max_tokens_per_rank=F["T"], recv_capacity=R * F["T"] * 3 // 4, **extra),
                  ops)
    dropped = 0
    for trial, kind in enumerate(NORMAL_KINDS):
        normal_case(w, lin, T, kind, seed_of("lin", R, trial), "linear")
    for trial, kind in enumerate(kinds(KINDS, TRIALS["rr"])):
        normal_case(w, rr, T, kind, seed_of("rr", R, trial), "round_robin")
    for trial, kind in enumerate(kinds(OVF_KINDS, TRIALS["ovf"])):
        ref = normal_case(w, ovf, T, kind, seed_of("ovf", R, trial), "round_robin overflow")
        dropped += sum(r["num_dropped"] for r in ref)
    if not dropped:
        w.failures.append("test setup: the overflow cases dropped nothing")
    for trial, kind in enumerate(kinds(FEW_KINDS, TRIALS["few"])):
        normal_case(w, lin, S["T_FEW"], kind, seed_of("few", R, trial), "linear fewer tokens")
    for fp8 in ("f32", "ue8m0"):
        for trial, kind in enumerate(kinds(("random", "invalid", "duplicates"), TRIALS["fp8"])):
            normal_case(w, fp8c, F["T"], kind, seed_of("fp8", fp8, R, trial), "linear", fp8=fp8)
    for dtype, comm, tag in (("float32", lin, "linear"), ("bfloat16", ovf, "round_robin ovf")):
        for trial, kind in enumerate(kinds(GRAD_KINDS, TRIALS["grad"])):
            normal_grad_case(w, comm, T, kind, seed_of("grad", dtype, R, trial), dtype, tag)


# ------------------------------------------------------------------------------------------
# low-latency mode
# ------------------------------------------------------------------------------------------

LL_FIELDS = ("counts", "hcounts", "src_index", "src_topk", "recv_rows")


def ll_body(comm, fp8, round_scale, ue8m0, zero_padding, two_phase):
    """tests/test_gpu_ll.py's ``ll_fn``: the dispatch (one kernel or send/recv), and for bf16
    the four combines (prereduce False / True / "float32" / default), chained through
    optimization barriers in the two-phase form (at most two sends outstanding)."""
    kw = dict(fp8=fp8, round_scale=round_scale, ue8m0=ue8m0)

    def body(x, idx, wts, y):
        if two_phase:
            d = jaxep.ll_dispatch_recv(comm, jaxep.ll_dispatch_send(comm, x, idx, **kw),
                                       zero_padding=zero_padding)
        else:
            d = jaxep.ll_dispatch(comm, x, idx, zero_padding=zero_padding, **kw)
        out = dict(x=d.x, counts=d.counts, num_invalid=d.num_invalid[None],
                   src_index=d.handle.src_index, src_topk=d.handle.src_topk,
                   hcounts=d.handle.counts, recv_rows=d.handle.recv_rows)
        if not fp8:
            if two_phase:
                done = []

                def combine(**kw):
                    yy = lax.optimization_barrier((y, done[-1]))[0] if done else y
                    done.append(jaxep.ll_combine_recv(
                        comm, jaxep.ll_combine_send(comm, yy, idx, wts, d.handle, **kw)))
                    return done[-1]
            else:
                def combine(**kw):
                    return jaxep.ll_combine(comm, y, idx, wts, d.handle, **kw)
            out["out"] = combine(prereduce=False)
            out["out_pre"] = combine(prereduce=True)
            out["out_pre32"] = combine(prereduce="float32")
            out["out_default"] = combine()  # ll_combine: "float32"; ll_combine_send: False
        return out
    return body


def expected_recv_rows(src_index, src_topk, K):
    el, rt = src_index.shape
    want = np.full((rt, K), -1, np.int32)
    for l in range(el):
        for j in range(rt):
            if src_index[l, j] >= 0:
                want[src_index[l, j], src_topk[l, j]] = l * rt + j
    return want


def ll_case(w: W, comm, T, kind, seed, tag, dtype="bfloat16", fp8=False, round_scale=False,
            ue8m0=False, zero_padding=True, two_phase=False):
    R, cfg = w.R, comm.cfg
    E, K, H, El = cfg.num_experts, cfg.num_topk, cfg.hidden, comm.num_local_experts
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    cast = bf16 if dtype == "bfloat16" else (lambda a: np.asarray(a, F32))
    x = cast(rng.standard_normal((R * T, H)) * 3)
    y = cast(rng.standard_normal((R * El, R * T, H)))
    key = ("ll", id(comm), T, dtype, fp8, round_scale, ue8m0, zero_padding, two_phase)
    f = w.fn(key, lambda: w.ep_call(ll_body(comm, fp8, round_scale, ue8m0, zero_padding,
                                            two_phase)))
    got = w.call(f, x, idx, wts, y)

    src = quantize(w, x, round_scale, ue8m0) if fp8 else x
    ref = oracle.ll_dispatch(src, idx, comm.expert_rank, comm.expert_slot, R)
    me = ref[w.rank]
    name = (f"{'ll_dispatch_send/recv' if two_phase else 'll_dispatch'} {tag} {dtype} T={T} "
            f"{kind}" + (f" fp8 round_scale={round_scale} ue8m0={ue8m0}" if fp8 else "")
            + ("" if zero_padding else " zero_padding=False"))
    case = Case(w, name)
    case.bits("counts", got["counts"], me["counts"])
    case.bits("handle.counts", got["hcounts"], me["counts"])
    case.bits("src_index", got["src_index"], me["src_index"])
    case.bits("src_topk", got["src_topk"], me["src_topk"])
    case.bits("recv_rows", got["recv_rows"],
              expected_recv_rows(me["src_index"], me["src_topk"], K))
    case.scalar("num_invalid", got["num_invalid"], me["num_invalid"])
    valid = np.arange(R * T)[None, :] < me["counts"][:, None]     # [E_l, R*T]
    mask = None if zero_padding else valid   # padding unspecified without zero padding
    if fp8:
        if not (isinstance(got["x"], tuple) and len(got["x"]) == 2):
            case.bad.append(f"x: fp8 must give a (payload, scales) tuple, got "
                            f"{type(got['x']).__name__}")
        else:
            case.bits("x payload", got["x"][0], me["x"][0], mask)
            case.bits("x scales", got["x"][1], me["x"][1], mask)
    else:
        case.bits("x", got["x"], me["x"], mask)
        slots = [r["slot"] for r in ref]
        ys = [w.rows(y, d) for d in range(R)]
        args = (idx, wts, comm.expert_rank, comm.expert_slot, slots)
        want = w.rows(oracle.ll_combine(ys, *args))
        mag = w.rows(oracle.ll_combine([np.abs(a.astype(F64)) for a in ys], idx,
                                       np.abs(wts.astype(F64)), *args[2:]))
        tol = tol_bf16 if dtype == "bfloat16" else tol_f32
        case.close("ll_combine prereduce=False", got["out"], want, tol(want, mag))
        case.close("ll_combine prereduce='float32'", got["out_pre32"], want, tol(want, mag))
        # True: each rank's partial of two or more rows rounded to the dtype first
        pre_tol = (2.0 ** -7 * (np.abs(want) + mag) + 1e-30 if dtype == "bfloat16"
                   else tol_f32(want, mag))
        case.close("ll_combine prereduce=True", got["out_pre"], want, pre_tol)
        case.bits("ll_combine default (== " + ("False" if two_phase else "'float32'") + ")",
                  got["out_default"], got["out" if two_phase else "out_pre32"])
        nowhere = np.all(me["slot"] < 0, axis=1)
        case.zero("ll_combine of tokens sent nowhere", got["out"], nowhere)
        if got["out"].dtype != np.asarray(x).dtype:
            case.bad.append(f"ll_combine dtype {got['out'].dtype}, want {np.asarray(x).dtype}")
    case.done()


def ll_grad_body(comm, prereduce):
    def body(x, idx, wts, ysc, pout):
        def local_loss(x, wts, ysc):
            d = jaxep.ll_dispatch(comm, x, idx)
            out = jaxep.ll_combine(comm, d.x * ysc, idx, wts, d.handle, prereduce=prereduce)
            return jnp.sum(out.astype(jnp.float32) * pout)

        loss, grads = jax.value_and_grad(local_loss, argnums=(0, 1, 2))(x, wts, ysc)
        return (loss[None],) + grads
    return body


def ll_grad_case(w: W, comm, T, kind, seed, dtype, prereduce):
    """jax.grad (inside the shard_map, of each rank's loss) of
    ``sum(ll_combine(ll_dispatch(x).x * ysc[expert]) * pout)`` w.r.t. x, topk_weights and the
    per-expert scales, against the oracle's analytic gradients."""
    R, cfg = w.R, comm.cfg
    E, K, H, El = cfg.num_experts, cfg.num_topk, cfg.hidden, comm.num_local_experts
    rng = np.random.default_rng(seed)
    idx, wts = make_routing(kind, rng, R, T, E, K, comm.expert_rank)
    cast = bf16 if dtype == "bfloat16" else (lambda a: np.asarray(a, F32))
    x = cast(rng.standard_normal((R * T, H)))
    ysc = cast(rng.standard_normal((R * El, 1, 1)))
    pout = rng.standard_normal((R * T, H)).astype(F32)
    f = w.fn(("llgrad", id(comm), T, dtype, prereduce),
             lambda: w.ep_call(ll_grad_body(comm, prereduce)))
    loss, gx, gw, gs = w.call(f, x, idx, wts, ysc, pout)

    ref = oracle.ll_dispatch(x, idx, comm.expert_rank, comm.expert_slot, R)
    slots = [r["slot"] for r in ref]
    dx = [r["x"].astype(F64) for r in ref]
    sc = [w.rows(ysc, d).astype(F64) for d in range(R)]
    ys = [dx[d] * sc[d] for d in range(R)]
    out = oracle.ll_combine(ys, idx, wts, comm.expert_rank, comm.expert_slot, slots)
    want_loss = float(np.sum(w.rows(out) * w.rows(pout)))
    mag_loss = float(np.sum(np.abs(w.rows(out) * w.rows(pout))))
    g_y, want_gw = oracle.ll_combine_grads(pout, ys, idx, wts, comm.expert_rank,
                                           comm.expert_slot, slots)
    want_gx = oracle.ll_dispatch_grad([g_y[d] * sc[d] for d in range(R)],
                                      [r["src_index"] for r in ref], R * T)
    want_gs = np.sum(g_y[w.rank] * dx[w.rank], axis=(1, 2), keepdims=True)
    mag_gs = np.sum(np.abs(g_y[w.rank] * dx[w.rank]), axis=(1, 2), keepdims=True)
    np_dtype = F32 if dtype == "float32" else None
    case = Case(w, f"grad ll_dispatch->ll_combine {dtype} prereduce={prereduce!r} T={T} {kind}")
    case.close("loss", loss, np.array([want_loss]),
               (1e-5 if np_dtype else 2e-2) * mag_loss + 1e-6)
    case.close("grad x", gx, w.rows(want_gx), tol_grad(w.rows(want_gx), np_dtype))
    case.close("grad topk_weights", gw, w.rows(want_gw), tol_grad(w.rows(want_gw), np_dtype))
    case.close("grad expert scale", gs, want_gs, tol_grad(want_gs, np_dtype, mag_gs))
    case.done()


def ll_section(w: W, **extra):
    """The low-latency cases; ``extra``: more EPConfig fields (the internode scenario's
    ranks_per_node)."""
    S = LL
    R = w.R
    E, K, H, T = S["E"], S["K"], S["H"], S["T"]
    ops = ("ll_dispatch", "ll_combine")
    Cfg = jaxep.EPConfig
    ll = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                    low_latency=True, **extra), ops)
    ll_rr = w.comm(Cfg(num_experts=E, num_topk=K, hidden=H, max_tokens_per_rank=T,
                       low_latency=True, placement="round_robin", **extra), ops)
    for trial, kind in enumerate(kinds(LL_KINDS, TRIALS["ll"])):
        ll_case(w, ll, T, kind, seed_of("ll", R, trial), "linear")
    for trial, kind in enumerate(kinds(LL_KINDS[::-1], TRIALS["ll_few"])):
        ll_case(w, ll, S["T_FEW"], kind, seed_of("llfew", R, trial), "linear fewer tokens")
    for trial, kind in enumerate(kinds(LL_KINDS, TRIALS["ll_fp8"])):
        ll_case(w, ll, T, kind, seed_of("llfp8", R, trial), "linear", fp8=True)
    for trial, kind in enumerate(kinds(LL_KINDS[2:], TRIALS["ll_two"])):
        ll_case(w, ll, T, kind, seed_of("lltwo", R, trial), "linear", two_phase=True)
    for trial, kind in enumerate(kinds(("random", "duplicates"), TRIALS["ll_two_fp8"])):
        ll_case(w, ll, T, kind, seed_of("lltwo8", R, trial), "linear", fp8=True,
                round_scale=True, ue8m0=True, zero_padding=False, two_phase=True)
    for trial, kind in enumerate(kinds(("duplicates", "random", "invalid"), TRIALS["ll_rr"])):
        ll_case(w, ll_rr, T, kind, seed_of("llrr", R, trial), "round_robin", dtype="float32")
    for dtype, prereduce in (("float32", False), ("float32", True), ("float32", "float32"),
                             ("bfloat16", False)):
        for trial, kind in enumerate(kinds(("random", "duplicates", "invalid"),
                                           TRIALS["ll_grad"])):
            ll_grad_case(w, ll, T, kind, seed_of("llgrad", dtype, prereduce, R, trial), dtype,
                         prereduce)
