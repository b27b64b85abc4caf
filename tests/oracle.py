"""Independent NumPy oracle for jaxep's documented semantics (docs/design.md, "Semantics contract").

Written from the docstrings only, with plain Python loops over ranks and tokens: it shares no
code with the implementation. Every function takes *global* arrays (all ranks' data stacked:
rank r owns rows ``r*T .. (r+1)*T - 1``) plus the placement tables ``expert_rank [E]`` /
``expert_slot [E]`` (numpy, as on ``Communicator``) and returns per-rank expected outputs as a
list indexed by rank.

Conventions:
  * ``src_index`` entries are ``src_rank * T + src_token`` (the global row), -1 for padding.
  * sums (combine / ll_combine and the analytic gradients) are accumulated in float64.
"""

from __future__ import annotations

import numpy as np


def sanitize(topk_idx, num_experts):
    """Ids outside ``[-1, E)`` become -1. Returns (ids as a list of lists, invalid counts
    per global row)."""
    ids, bad = [], []
    for row in np.asarray(topk_idx).tolist():
        out, n = [], 0
        for e in row:
            if -1 <= e < num_experts:
                out.append(int(e))
            else:
                out.append(-1)
                n += 1
        ids.append(out)
        bad.append(n)
    return ids, bad


def _distinct_valid(row):
    """Valid ids of one token in first-occurrence order, each once."""
    seen = []
    for e in row:
        if e >= 0 and e not in seen:
            seen.append(e)
    return seen


# ------------------------------------------------------------------------------------------
# normal mode
# ------------------------------------------------------------------------------------------


def dispatch_layout(topk_idx, expert_rank, num_ranks):
    """Per rank: dict(tokens_per_rank [R], tokens_per_expert [E], is_token_in_rank [T, R])."""
    E = len(expert_rank)
    R = num_ranks
    ids, _ = sanitize(topk_idx, E)
    T = len(ids) // R
    out = []
    for r in range(R):
        tpr = np.zeros(R, np.int32)
        tpe = np.zeros(E, np.int32)
        itr = np.zeros((T, R), bool)
        for t in range(T):
            row = ids[r * T + t]
            for e in _distinct_valid(row):
                tpe[e] += 1
                itr[t, expert_rank[e]] = True
            for d in range(R):
                if itr[t, d]:
                    tpr[d] += 1
        out.append(dict(tokens_per_rank=tpr, tokens_per_expert=tpe, is_token_in_rank=itr))
    return out


def dispatch(xs, topk_idx, topk_weights, expert_rank, expert_slot, num_ranks, capacity=None):
    """Normal-mode dispatch.

    Args:
      xs: a global array ``[R*T, ...]`` or a tuple of them (e.g. fp8 payload and scales),
        moved row by row as they are.
      topk_idx, topk_weights: global ``[R*T, K]``.
      capacity: C (None = R*T).

    Returns per rank: dict(x (array or tuple) [C, ...], topk_idx [C, K] local slots,
    topk_weights [C, K], num_tokens, tokens_per_expert [E_l], num_dropped, num_invalid,
    src_index [C], send_slot [T, R]).
    """
    R = num_ranks
    E = len(expert_rank)
    El = E // R
    is_tuple = isinstance(xs, tuple)
    arrays = tuple(np.asarray(a) for a in (xs if is_tuple else (xs,)))
    w = np.asarray(topk_weights)
    ids, bad = sanitize(topk_idx, E)
    N = len(ids)
    T = N // R
    K = len(ids[0])
    C = capacity if capacity is not None else R * T

    # rows destined to each rank, in (source rank, source token) order
    dest_rows = [[] for _ in range(R)]
    for src in range(R):
        for t in range(T):
            g = src * T + t
            ranks = {int(expert_rank[e]) for e in ids[g] if e >= 0}
            for d in range(R):
                if d in ranks:
                    dest_rows[d].append(g)

    send_slot = np.full((R, T, R), -1, np.int32)   # [src rank, t, dst]
    out = []
    for d in range(R):
        kept = dest_rows[d][:C]
        rows = tuple(np.zeros((C,) + a.shape[1:], a.dtype) for a in arrays)
        lidx = np.full((C, K), -1, np.int32)
        lw = np.zeros((C, K), w.dtype)
        src_index = np.full(C, -1, np.int32)
        tpe = np.zeros(El, np.int32)
        for i, g in enumerate(kept):
            for a, r in zip(arrays, rows):
                r[i] = a[g]
            src_index[i] = g
            send_slot[g // T, g % T, d] = i
            for k in range(K):
                e = ids[g][k]
                if e >= 0 and expert_rank[e] == d:
                    lidx[i, k] = expert_slot[e]
                    lw[i, k] = w[g, k]
            for e in _distinct_valid(ids[g]):
                if expert_rank[e] == d:
                    tpe[expert_slot[e]] += 1
        out.append(dict(
            x=rows if is_tuple else rows[0], topk_idx=lidx, topk_weights=lw,
            num_tokens=len(kept), tokens_per_expert=tpe,
            num_dropped=len(dest_rows[d]) - len(kept),
            num_invalid=sum(bad[d * T:(d + 1) * T]), src_index=src_index))
    for r in range(R):
        out[r]["send_slot"] = send_slot[r]
    return out


def combine(ys, src_indices, num_tokens):
    """Normal-mode combine: ``ys[d] [C, H]`` per rank, ``src_indices[d] [C]`` from the dispatch.
    Returns per rank ``[T, H]`` float64: per token the sum of its valid rows."""
    R = len(ys)
    T = num_tokens
    H = np.asarray(ys[0]).shape[1]
    out = np.zeros((R * T, H), np.float64)
    for d in range(R):
        y = np.asarray(ys[d]).astype(np.float64)
        for i, g in enumerate(np.asarray(src_indices[d]).tolist()):
            if g >= 0:
                out[g] += y[i]
    return [out[r * T:(r + 1) * T] for r in range(R)]


def dispatch_rows(g_out, src_indices):
    """Rows of ``g_out [R*T, ...]`` placed at the received rows (``src_indices[d] [C]``);
    zeros for padding. This is combine's gradient w.r.t. ``y``."""
    g_out = np.asarray(g_out)
    res = []
    for d in range(len(src_indices)):
        si = np.asarray(src_indices[d]).tolist()
        r = np.zeros((len(si),) + g_out.shape[1:], np.float64)
        for i, g in enumerate(si):
            if g >= 0:
                r[i] = g_out[g]
        res.append(r)
    return res


def dispatch_weight_grad(g_w_rows, topk_idx, expert_rank, num_ranks, send_slots):
    """Analytic gradient of dispatch w.r.t. ``topk_weights``: ``g_w_rows[d] [C, K]`` cotangent
    of the received weights on rank d; returns global ``[R*T, K]``."""
    R = num_ranks
    E = len(expert_rank)
    ids, _ = sanitize(topk_idx, E)
    T = len(ids) // R
    K = len(ids[0])
    out = np.zeros((R * T, K), np.float64)
    for g in range(R * T):
        for k in range(K):
            e = ids[g][k]
            if e < 0:
                continue
            d = int(expert_rank[e])
            row = send_slots[g // T][g % T, d]
            if row >= 0:
                out[g, k] = g_w_rows[d][row, k]
    return out


# ------------------------------------------------------------------------------------------
# grouped normal mode
# ------------------------------------------------------------------------------------------


def dispatch_grouped(xs, topk_idx, topk_weights, expert_rank, expert_slot, num_ranks,
                     alignment=1, capacity=None):
    """Grouped dispatch: one row per received (token, local expert) pair.

    Args as :func:`dispatch`; ``alignment`` a, ``capacity`` M (None = R*T*min(K, E_l) +
    E_l*(a-1)).

    Returns per rank: dict(x (array or tuple) [M, ...], group_sizes [E_l], weights [M] float32,
    num_dropped, num_invalid, src_index [M], rows: {(global row, global expert): row} of the
    admitted pairs (the oracle's own bookkeeping for combine and the gradients)).
    """
    R = num_ranks
    E = len(expert_rank)
    El = E // R
    a = alignment
    is_tuple = isinstance(xs, tuple)
    arrays = tuple(np.asarray(a_) for a_ in (xs if is_tuple else (xs,)))
    w = np.asarray(topk_weights)
    ids, bad = sanitize(topk_idx, E)
    N = len(ids)
    T = N // R
    K = len(ids[0])
    M = capacity if capacity is not None else R * T * min(K, El) + El * (a - 1)

    out = []
    for d in range(R):
        # the pairs destined to d in (source rank, source token, local slot) order
        pairs = []
        for g in range(N):
            mine = sorted((int(expert_slot[e]), e) for e in _distinct_valid(ids[g])
                          if expert_rank[e] == d)
            for s, e in mine:
                weight = np.float32(0)
                for k in range(K):
                    if ids[g][k] == e:
                        weight = np.float32(weight + np.float32(w[g, k]))
                pairs.append((g, s, e, weight))
        # admit while the rows used (groups rounded up to a multiple of a) fit in M
        members = [[] for _ in range(El)]
        dropped = 0
        for i, (g, s, e, weight) in enumerate(pairs):
            members[s].append((g, e, weight))
            used = sum(-(-len(m) // a) * a for m in members)
            if used > M:
                members[s].pop()
                dropped = len(pairs) - i
                break
        sizes = np.array([-(-len(m) // a) * a for m in members], np.int32)
        rows = tuple(np.zeros((M,) + a_.shape[1:], a_.dtype) for a_ in arrays)
        weights = np.zeros(M, np.float32)
        src_index = np.full(M, -1, np.int32)
        where = {}
        start = 0
        for s in range(El):
            for j, (g, e, weight) in enumerate(members[s]):
                i = start + j
                for a_, r in zip(arrays, rows):
                    r[i] = a_[g]
                weights[i] = weight
                src_index[i] = g
                where[(g, e)] = i
            start += sizes[s]
        out.append(dict(x=rows if is_tuple else rows[0], group_sizes=sizes, weights=weights,
                        num_dropped=dropped, num_invalid=sum(bad[d * T:(d + 1) * T]),
                        src_index=src_index, rows=where))
    return out


def combine_grouped(ys, src_indices, weights, num_tokens, weighted=True):
    """Grouped combine: ``ys[d] [M, H]``; per token the sum over its rows of
    ``weights[d][row] * ys[d][row]`` (float64; unweighted with ``weighted=False``). Returns
    global ``[R*T, H]``."""
    R = len(ys)
    H = np.asarray(ys[0]).shape[1]
    out = np.zeros((R * num_tokens, H), np.float64)
    for d in range(R):
        y = np.asarray(ys[d]).astype(np.float64)
        for i, g in enumerate(np.asarray(src_indices[d]).tolist()):
            if g >= 0:
                out[g] += (float(weights[d][i]) if weighted else 1.0) * y[i]
    return out


def grouped_weight_grad(g_rows, topk_idx, expert_rank, rows):
    """Analytic gradient w.r.t. ``topk_weights`` of the grouped rows' weights: ``g_rows[d] [M]``
    is the cotangent of rank d's row weights; each top-k entry gets its pair's row cotangent
    (every listing of a repeated expert: the row's weight is their sum). Global ``[R*T, K]``."""
    E = len(expert_rank)
    ids, _ = sanitize(topk_idx, E)
    out = np.zeros((len(ids), len(ids[0])), np.float64)
    for g, row in enumerate(ids):
        for k, e in enumerate(row):
            if e < 0:
                continue
            d = int(expert_rank[e])
            i = rows[d].get((g, e))
            if i is not None:
                out[g, k] = g_rows[d][i]
    return out


def combine_grouped_grads(g_out, ys, src_indices, weights, weighted=True):
    """Analytic gradients of combine_grouped: (per rank ``g_y[d] [M, H]``, per rank
    ``g_w[d] [M]`` of the row weights)."""
    g_out = np.asarray(g_out).astype(np.float64)
    g_y, g_w = [], []
    for d in range(len(ys)):
        y = np.asarray(ys[d]).astype(np.float64)
        gy = np.zeros_like(y)
        gw = np.zeros(y.shape[0], np.float64)
        for i, g in enumerate(np.asarray(src_indices[d]).tolist()):
            if g >= 0:
                gy[i] = (float(weights[d][i]) if weighted else 1.0) * g_out[g]
                gw[i] = float(np.dot(g_out[g], y[i])) if weighted else 0.0
        g_y.append(gy)
        g_w.append(gw)
    return g_y, g_w


# ------------------------------------------------------------------------------------------
# low-latency mode
# ------------------------------------------------------------------------------------------


def ll_dispatch(xs, topk_idx, expert_rank, expert_slot, num_ranks):
    """Low-latency dispatch: one row per (token, distinct selected expert).

    Returns per rank: dict(x (array or tuple) [E_l, R*T, ...], counts [E_l],
    src_index [E_l, R*T], src_topk [E_l, R*T] (the source's first top-k entry listing the
    expert), slot [T, K] (sender side: row of each entry in its expert's output; the oracle's
    own bookkeeping for ll_combine), num_invalid).
    """
    R = num_ranks
    E = len(expert_rank)
    El = E // R
    is_tuple = isinstance(xs, tuple)
    arrays = tuple(np.asarray(a) for a in (xs if is_tuple else (xs,)))
    ids, bad = sanitize(topk_idx, E)
    N = len(ids)
    T = N // R
    K = len(ids[0])
    # the global rows each expert receives, in (source rank, source token) order
    per_expert = {e: [] for e in range(E)}
    for g in range(N):
        for e in _distinct_valid(ids[g]):
            per_expert[e].append(g)
    out = []
    for d in range(R):
        rows = tuple(np.zeros((El, R * T) + a.shape[1:], a.dtype) for a in arrays)
        counts = np.zeros(El, np.int32)
        src_index = np.full((El, R * T), -1, np.int32)
        src_topk = np.full((El, R * T), -1, np.int32)
        for e in range(E):
            if expert_rank[e] != d:
                continue
            s = int(expert_slot[e])
            counts[s] = len(per_expert[e])
            for i, g in enumerate(per_expert[e]):
                src_index[s, i] = g
                src_topk[s, i] = list(ids[g]).index(e)
                for a, r in zip(arrays, rows):
                    r[s, i] = a[g]
        slot = np.full((T, K), -1, np.int32)
        for t in range(T):
            g = d * T + t
            for k in range(K):
                e = ids[g][k]
                if e >= 0:
                    slot[t, k] = per_expert[e].index(g)
        out.append(dict(x=rows if is_tuple else rows[0], counts=counts, src_index=src_index,
                        src_topk=src_topk, slot=slot, num_invalid=sum(bad[d * T:(d + 1) * T])))
    return out


def ll_combine(ys, topk_idx, topk_weights, expert_rank, expert_slot, slots):
    """``out[t] = sum_k w[t,k] * y[rank(e_k)][slot(e_k), slot(t,k)]`` (float64), global
    ``[R*T, H]``. ``ys[d] [E_l, R*T, H]``; ``slots[r] [T, K]`` from the dispatch."""
    R = len(ys)
    E = len(expert_rank)
    ids, _ = sanitize(topk_idx, E)
    w = np.asarray(topk_weights).astype(np.float64)
    T = len(ids) // R
    K = len(ids[0])
    ys = [np.asarray(y).astype(np.float64) for y in ys]
    out = np.zeros((R * T,) + ys[0].shape[2:], np.float64)
    for g in range(R * T):
        for k in range(K):
            e = ids[g][k]
            if e < 0:
                continue
            row = slots[g // T][g % T, k]
            out[g] += w[g, k] * ys[expert_rank[e]][expert_slot[e], row]
    return out


def ll_combine_grads(g_out, ys, topk_idx, topk_weights, expert_rank, expert_slot, slots):
    """Analytic gradients of ll_combine: (per-rank ``g_y[d] [E_l, R*T, H]``, global
    ``g_w [R*T, K]``)."""
    R = len(ys)
    E = len(expert_rank)
    ids, _ = sanitize(topk_idx, E)
    w = np.asarray(topk_weights).astype(np.float64)
    g_out = np.asarray(g_out).astype(np.float64)
    ys = [np.asarray(y).astype(np.float64) for y in ys]
    T = len(ids) // R
    K = len(ids[0])
    g_y = [np.zeros_like(y) for y in ys]
    g_w = np.zeros((R * T, K), np.float64)
    for g in range(R * T):
        for k in range(K):
            e = ids[g][k]
            if e < 0:
                continue
            d, s = int(expert_rank[e]), int(expert_slot[e])
            row = slots[g // T][g % T, k]
            g_y[d][s, row] += w[g, k] * g_out[g]
            g_w[g, k] = float(np.dot(g_out[g], ys[d][s, row]))
    return g_y, g_w


def ll_dispatch_grad(g_rows, src_indices, num_rows):
    """Analytic gradient of ll_dispatch w.r.t. ``x``: every valid received row's cotangent
    added back to its source token (once per distinct expert). ``g_rows[d] [E_l, R*T, H]``."""
    H = np.asarray(g_rows[0]).shape[-1]
    out = np.zeros((num_rows, H), np.float64)
    for d in range(len(g_rows)):
        gr = np.asarray(g_rows[d]).astype(np.float64)
        si = np.asarray(src_indices[d])
        for s in range(si.shape[0]):
            for i in range(si.shape[1]):
                if si[s, i] >= 0:
                    out[si[s, i]] += gr[s, i]
    return out


# ------------------------------------------------------------------------------------------
# routings
# ------------------------------------------------------------------------------------------

ROUTINGS = ("random", "minus_one", "invalid", "one_expert", "empty_rank", "silent_rank",
            "duplicates")
GROUPED_ROUTINGS = ROUTINGS + ("zipf",)


def make_routing(kind, rng, num_ranks, num_tokens, num_experts, num_topk, expert_rank):
    """Global ``(topk_idx [R*T, K] int32, topk_weights [R*T, K] float32)`` of a routing kind.

    random: top-k of ``|N(0,1)| + 1`` scores; minus_one: some slots -1; invalid: some ids
    E, 999, -5; one_expert: every token picks the same expert (others -1); empty_rank: no token
    selects an expert of rank 1; silent_rank: rank 0 sends nothing (all -1); duplicates: some
    tokens list an expert twice; zipf: experts drawn with Zipf-skewed popularity (expert i
    about ``1 / (i+1)**1.2``), distinct per token.
    """
    R, T, E, K = num_ranks, num_tokens, num_experts, num_topk
    N = R * T
    scores = np.abs(rng.standard_normal((N, E))) + 1.0
    if kind == "empty_rank":
        scores[:, np.asarray(expert_rank) == 1 % R] = -np.inf
    elif kind == "zipf":   # Gumbel top-k: sampling K distinct experts by Zipf popularity
        pop = 1.0 / np.arange(1, E + 1) ** 1.2
        scores = np.log(pop)[rng.permutation(E)][None, :] + rng.gumbel(size=(N, E))
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :K].astype(np.int32)
    w = rng.uniform(0.1, 1.0, (N, K)).astype(np.float32)
    if kind == "minus_one":
        idx[rng.random((N, K)) < 0.3] = -1
        idx[0] = -1                                    # a token with no expert at all
    elif kind == "invalid":
        m = rng.random((N, K)) < 0.25
        idx[m] = rng.choice(np.array([E, 999, -5, -1], np.int32), size=int(m.sum()))
    elif kind == "one_expert":
        idx[:] = -1
        idx[:, 0] = int(rng.integers(E))
    elif kind == "silent_rank":
        idx[:T] = -1
    elif kind == "duplicates":
        for g in range(N):
            if rng.random() < 0.5:
                a, b = rng.choice(K, 2, replace=False)
                idx[g, b] = idx[g, a]
    elif kind not in ("random", "empty_rank", "zipf"):
        raise ValueError(kind)
    return idx, w
