"""Byte model of internode expert-parallel dispatch/combine (issue 21, item 5).

For a routing sampled with NumPy and a topology of N nodes x G GPUs (rank r on node r // G,
local index, its "rail", r % G; experts placed linearly, expert e on rank e // (E/R)), it counts
the bytes every rank sends and receives per link class -- NVLink (same node), RDMA (other node),
local (to itself: no link) -- for:

  xla_a2a      jaxep's pure-JAX normal mode (jaxep/_xla.py): `lax.all_to_all` of worst-case
               [R, T, ...] buffers, every rank sends T rows to every rank whatever the routing:
               x, top-k ids (int32) and weights (f32) [T, K], and the handle's mask (bool) and
               positions (int32) [T]; combine sends [R, T, H] bf16 back.
  xla_ll_a2a   jaxep's pure-JAX low-latency mode: [R, E_l, T, ...] cells, E_l*T rows to every
               rank: FP8 payload, its f32 scales and `copy_topk` (int32, counted once: both
               all_to_alls carry the same array); combine [R, E_l, T, H] bf16.
  ll_flat_v1   flat low latency as DeepEP V1 does it: one put per (token, selected expert),
               16-byte header + FP8 row; combine one bf16 row per (token, expert) back.
  ll_flat      flat low latency, one put per (token, destination rank) (jaxep's LL kernels:
               the receiver fans the row out to its experts); combine one pre-reduced bf16 row
               per (token, rank).
  ll_layered   layered low latency (DeepEP PR #500): one RDMA put per (token, destination
               node) to the GPU of that node on the sender's rail, which forwards it over NVLink
               to the destination ranks of its node (one row per (token, rank)); destinations
               in the sender's node get it over NVLink directly. Combine: the reverse, the
               forwarder reduces its node's rows of a token (f32) and sends one bf16 partial.
  normal_rank  normal mode, one copy per (token, destination rank), no forwarding.
  normal_hier  hierarchical normal mode (DeepEP internode): as ll_layered, with normal rows.

Row bytes: bf16 2H; FP8 H + 4*H/128 (one f32 scale per 128 channels). Normal-mode dispatch rows
carry top-k ids and weights (8K bytes), LL rows DeepEP's 16-byte header. Formats: LL dispatches
FP8 and combines bf16 (DeepEP's LL); normal mode is bf16 both ways here (--normal-dispatch
fp8 to change it). The comparison with DeepEP's normal-mode figures uses FP8 dispatch, as their
README says it was measured. Combine traffic is the transpose of the dispatch traffic with
combine rows (XLA's is symmetric anyway).

Time = max over ranks and link classes of max(bytes sent, bytes received) / rate, plus a fixed
per-op latency (--latency-us, added to every op). This assumes perfect overlap: both link classes
busy at once, full duplex, no congestion or incast, forwarding pipelined with the RDMA arrivals,
every byte at the link's rate. Rates per direction: NVLink H200 450 GB/s, H800 160 GB/s (flags);
one 400 Gb/s NIC per GPU = 50 GB/s. The default latency, 15 us, is jaxep's measured one-kernel
LL dispatch on 2xH200 (17.0 us, of which ~1 us moves bytes): a kernel's fixed cost, not fitted
to DeepEP.

Where the model and DeepEP's published figures (V1 on H800, README) disagree, and why
(numbers from the default run; the JSON holds them):
  * Normal mode: DeepEP's "RDMA bandwidth" is not NIC throughput. tests/test_internode.py
    divides (token, destination node) pairs -- the sender's own node INCLUDED -- x row bytes
    by the time. Own-node copies never touch the NIC, so the metric can exceed the NIC's 50 GB/s:
    with top-4 node groups a quarter of the pairs are own-node at EP32, hence 58 GB/s. The model
    computes the same metric from the same count (their routing: `grouped`, top-min(N, 4)
    nodes). DeepEP reaches 0.78x (EP16) to 0.92x (EP64) of the modelled (perfect-overlap)
    figure; in NIC terms ~44-46 GB/s at EP32/64, 86-91% of line rate. At EP16 the model is
    NVLink-bound at 160 GB/s (forwarding moves each token to ~3.3 ranks of each node), and the
    NIC carries only ~22 GB/s: half of the metric's bytes are own-node.
  * Low latency at 128 tokens is still byte-bound: ~1000 remote (token, expert) rows a rank,
    7.4 MB FP8 dispatch / 14.7 MB bf16 combine at EP256, 150 / 290 us at 50 GB/s; the slowest
    receiver (most rows: 1076 against a mean of 992) sets the time. Published times are
    1.07-1.23x the model's (1.33x at EP8, NVLink only); as NIC throughput that is 39-46 GB/s.
    The gap: IB packet headers and the 16-byte message headers, fabric congestion in an
    all-to-all (the model has none), the receiver waiting for its latest sender (skew in start
    times), and the kernels' own work (FP8 cast, unpacking) -- lumped here in one fixed
    latency. Message *rate* is not the limit at H=7168: ~1000 puts per rank per op is ~6 M
    msg/s, far below a CX7's; it would be with small rows or many more puts.
  * DeepEP's LL "RDMA bandwidth" counts every (token, expert) selection, NVLink and local ones
    included (EP8 is one node and reports 98 GB/s "RDMA"); the model's bytes are per link.
  * The published LL table is the one after DeepEP's 2025-06 change to use NVLink for peers in
    the same node (#173), which the model assumes; E=256 (their test now defaults to 288) and
    no -1 slots (their test masks 10 of 1024). One routing sample: LL times move by up to
    ~10 us (3%) between seeds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

LOCAL, NVL, RDMA = 0, 1, 2
CLASSES = ("local", "nvl", "rdma")
RESULTS = Path(__file__).resolve().parent / "results"

# name -> (traffic structure, dispatch format, description)
ALGOS = {
    "xla_a2a": ("xla", "normal", "XLA all_to_all, normal mode [R,T,H] (jaxep xla backend)"),
    "xla_ll_a2a": ("xla_ll", "fp8", "XLA all_to_all, low latency [R,E_l,T,H] (xla backend)"),
    "ll_flat_v1": ("flat_expert", "fp8", "flat LL, one put per (token, expert): DeepEP V1"),
    "ll_flat": ("flat_rank", "fp8", "flat LL, one put per (token, rank): jaxep"),
    "ll_layered": ("forward", "fp8", "layered LL, one RDMA put per (token, node) (PR #500)"),
    "normal_rank": ("flat_rank", "normal", "normal, one copy per (token, rank), no forwarding"),
    "normal_hier": ("forward", "normal", "normal, hierarchical: one RDMA copy per (token, node)"),
}
LL_HEADER = 16  # DeepEP LL message header (int4)

# DeepEP README, V1 on H800 with CX7 400 Gb/s (normal: after #130; LL: after #173).
DEEPEP_NORMAL = {16: (43, 43), 32: (58, 57), 64: (51, 50)}  # EP: (dispatch, combine) GB/s "RDMA"
DEEPEP_LL = {8: (77, 98, 114, 127), 16: (118, 63, 195, 74), 32: (155, 48, 273, 53),
             64: (173, 43, 314, 46), 128: (192, 39, 369, 39), 256: (194, 39, 360, 40)}
# EP: (dispatch us, dispatch GB/s, combine us, combine GB/s)


# ------------------------------------------------------------------------------------- routing

def uniform_topk(rng, n, k, num_experts):
    """[n, k] uniformly random sets of k distinct experts: the law of top-k of iid scores
    (DeepEP's top-k of |N(0,1)|+1). Rows of iid draws with a repeat are drawn again (given
    that its k draws are distinct, a row is a uniform k-subset)."""
    out = rng.integers(0, num_experts, (n, k))
    while True:
        s = np.sort(out, axis=1)
        bad = np.nonzero((s[:, 1:] == s[:, :-1]).any(1))[0]
        if not bad.size:
            return out
        out[bad] = rng.integers(0, num_experts, (bad.size, k))


def successive_topk(rng, n, k, probs):
    """[n, k] distinct experts drawn one after another, each with probability proportional
    to ``probs`` among those not yet drawn: the law of Gumbel top-k over log(probs). Draws
    are iid from ``probs``, a repeat is skipped (never a redraw of the row: that would bias)."""
    out = np.empty((n, k), np.int64)
    rows, kept, c = np.arange(n), np.full((n, k), -1), np.zeros(n, np.int64)
    while rows.size:
        for x in rng.choice(probs.size, size=(k, rows.size), p=probs):
            ok = (c < k) & ~(kept == x[:, None]).any(1)
            kept[ok, c[ok]] = x[ok]
            c += ok
        done = c == k
        out[rows[done]] = kept[done]
        rows, kept, c = rows[~done], kept[~done], c[~done]
    return out


def grouped_topk(rng, n, k, num_experts, nodes, groups):
    """[n, k]: DeepEP's internode test routing -- iid scores, the ``groups`` nodes whose
    experts' max score is highest, then top-k of the experts of those nodes -- simulated with
    the scores of the chosen nodes only: every node's max is drawn first (U^(1/s) for s
    experts per node), a chosen node's other experts score iid below its max."""
    if groups >= nodes:
        return uniform_topk(rng, n, k, num_experts)
    s = num_experts // nodes
    u = rng.random((n, nodes), np.float32)  # a node's max is u^(1/s): same order as u
    chosen = np.argpartition(-u, groups - 1, axis=1)[:, :groups]  # [n, g]
    top = np.take_along_axis(u, chosen, 1) ** np.float32(1.0 / s)
    scores = rng.random((n, groups, s), np.float32) * top[:, :, None]
    slot = rng.integers(0, s, (n, groups))
    np.put_along_axis(scores, slot[:, :, None], top[:, :, None], 2)
    best = np.argpartition(-scores.reshape(n, -1), k - 1, axis=1)[:, :k]
    return chosen[np.arange(n)[:, None], best // s] * s + best % s


def make_routing(kind, ranks, tokens, a, seed, nodes=None):
    """[ranks * tokens, K] global expert ids, rank-major (rows of rank s: s*T .. s*T+T-1)."""
    rng = np.random.default_rng(seed)
    n, e, k = ranks * tokens, a.experts, a.topk
    if kind == "standard":
        return uniform_topk(rng, n, k, e)
    if kind == "zipf":  # same construction as bench_normal.py: Zipf over shuffled experts
        p = 1.0 / np.arange(1, e + 1) ** a.zipf_alpha
        p = p[rng.permutation(e)]
        return successive_topk(rng, n, k, p / p.sum())
    if kind == "grouped":  # DeepEP test_internode.py: top-min(N, 4) nodes, then top-k
        return grouped_topk(rng, n, k, e, nodes, a.topk_groups)
    raise ValueError(f"unknown routing {kind!r}")


def route_counts(idx, tokens, num_experts, ranks, gpus_per_node):
    """Counts per (source rank, destination) from ``idx [R*T, K]`` (-1 = no expert):
    ``exp [R, R]`` (token, expert) copies, ``rank [R, R]`` distinct (token, rank) pairs,
    ``node [R, N]`` distinct (token, node) pairs."""
    el, n_nodes = num_experts // ranks, ranks // gpus_per_node
    valid = idx >= 0
    dr = np.sort(np.where(valid, idx // el, -1), axis=1)
    src = np.repeat(np.arange(ranks), tokens)[:, None]
    new_r = dr >= 0
    new_r[:, 1:] &= dr[:, 1:] != dr[:, :-1]
    dn = np.where(dr >= 0, dr // gpus_per_node, -1)  # sorted too
    new_n = dn >= 0
    new_n[:, 1:] &= dn[:, 1:] != dn[:, :-1]
    pair = src * ranks + dr
    count = lambda key, m, size: np.bincount(key[m], minlength=size)  # noqa: E731
    return dict(exp=count(pair, dr >= 0, ranks * ranks).reshape(ranks, ranks),
                rank=count(pair, new_r, ranks * ranks).reshape(ranks, ranks),
                node=count(src * n_nodes + dn, new_n, ranks * n_nodes).reshape(ranks, n_nodes))


# ------------------------------------------------------------------------------------- traffic

def link_class(ranks, gpus_per_node):
    node = np.arange(ranks) // gpus_per_node
    c = np.where(node[:, None] == node[None, :], NVL, RDMA)
    np.fill_diagonal(c, LOCAL)
    return c


def traffic(counts, structure, row, ranks, gpus_per_node, tokens, num_experts):
    """``B [3, R, R]``: bytes rank s sends to rank d over each link class (dispatch)."""
    g = gpus_per_node
    cls = link_class(ranks, g)
    rows = {"xla": np.full((ranks, ranks), tokens),
            "xla_ll": np.full((ranks, ranks), num_experts // ranks * tokens),
            "flat_expert": counts["exp"], "flat_rank": counts["rank"]}
    node, lane = np.arange(ranks) // g, np.arange(ranks) % g
    same = node[:, None] == node[None, :]
    amount = rows.get(structure, np.where(same, counts["rank"], 0)) * float(row)
    b = np.stack([np.where(cls == c, amount, 0.0) for c in range(3)])
    if structure != "forward":
        return b
    s, n = np.nonzero(node[:, None] != np.arange(ranks // g)[None, :])
    b[RDMA, s, n * g + lane[s]] += counts["node"][s, n] * row  # to the same-rail GPU
    s, d = np.nonzero(~same)
    f = node[d] * g + lane[s]  # forwarder of (s, d)
    np.add.at(b, (np.where(f == d, LOCAL, NVL), f, d), counts["rank"][s, d] * float(row))
    return b


def row_bytes(fmt, a):
    """Dispatch row bytes of a format: ``normal`` is --normal-dispatch."""
    payload = {"bf16": 2 * a.hidden, "fp8": a.hidden + 4 * math.ceil(a.hidden / 128)}
    return payload[a.normal_dispatch if fmt == "normal" else fmt]


def dispatch_row(algo, a, fmt=None):
    structure, f, _ = ALGOS[algo]
    p = row_bytes(fmt or f, a)
    meta = {"xla": 8 * a.topk + 5, "xla_ll": 4}.get(structure, 8 * a.topk if f == "normal"
                                                      else LL_HEADER)
    return p + meta


def summarize(b, nvl_rate, nic_rate, latency_s):
    send, recv = b.sum(2), b.sum(1)  # [3, R]
    out = {c: dict(send_mean=float(send[i].mean()), send_max=float(send[i].max()),
                   recv_mean=float(recv[i].mean()), recv_max=float(recv[i].max()))
           for i, c in enumerate(CLASSES)}
    t_nvl = max(send[NVL].max(), recv[NVL].max()) / nvl_rate
    t_rdma = max(send[RDMA].max(), recv[RDMA].max()) / nic_rate
    out["time_us"] = 1e6 * (max(t_nvl, t_rdma) + latency_s)
    out["bound"] = "rdma" if t_rdma >= t_nvl else "nvl"
    return out


def model(counts, algo, ranks, tokens, a, gpu, fmt=None):
    """{dispatch, combine} summaries of one algorithm at the rates of ``gpu``."""
    structure = ALGOS[algo][0]
    g, e = a.gpus_per_node, a.experts
    rate = {"h200": a.nvl_h200, "h800": a.nvl_h800}[gpu] * 1e9
    disp = traffic(counts, structure, dispatch_row(algo, a, fmt), ranks, g, tokens, e)
    comb = traffic(counts, structure, 2 * a.hidden, ranks, g, tokens, e).transpose(0, 2, 1)
    return {op: summarize(b, rate, a.nic * 1e9, a.latency_us * 1e-6)
            for op, b in (("dispatch", disp), ("combine", comb))}


# ---------------------------------------------------------------------------------- experiment

def routing(cache, kind, ranks, tokens, a, nodes):
    """``make_routing`` through ``cache``. Standard and Zipf routings do not depend on the
    topology (every rank's tokens are iid), so one draw for the most ranks any case needs
    serves every smaller one as a prefix: the sweep and the comparison see the same tokens."""
    if kind == "grouped":
        key = (kind, ranks, tokens)
        if key not in cache:
            cache[key] = make_routing(kind, ranks, tokens, a, a.seed, nodes=nodes)
        return cache[key]
    key = (kind, tokens)
    if key not in cache:
        most = max(max(a.nodes) * a.gpus_per_node, max(DEEPEP_LL))
        cache[key] = make_routing(kind, most, tokens, a, a.seed)
    return cache[key][: ranks * tokens]


def sweep(a, cache):
    rows = []
    cases = [("standard", a.tokens), ("zipf", a.tokens), ("grouped", a.tokens),
             ("decode", a.decode_tokens)]
    for kind, t in cases:
        for n in a.nodes:
            r = n * a.gpus_per_node
            idx = routing(cache, "standard" if kind == "decode" else kind, r, t, a, n)
            c = route_counts(idx, t, a.experts, r, a.gpus_per_node)
            stats = dict(ranks_per_token=float(c["rank"].sum() / (r * t)),
                         nodes_per_token=float(c["node"].sum() / (r * t)))
            for algo in ALGOS:
                res = {gpu: model(c, algo, r, t, a, gpu) for gpu in ("h200", "h800")}
                rows.append(dict(routing=kind, tokens=t, nodes=n, ranks=r, algorithm=algo,
                                 **stats, dispatch=res["h200"]["dispatch"],
                                 combine=res["h200"]["combine"],
                                 time_us_h800={op: res["h800"][op]["time_us"]
                                               for op in ("dispatch", "combine")}))
    return rows


def compare(a, cache):
    """Model beside DeepEP V1's published internode figures (H800 rates)."""
    out = []
    g, lat = a.gpus_per_node, a.latency_us
    for ep, (pub_d, pub_c) in DEEPEP_NORMAL.items():
        n, t = ep // g, a.tokens
        idx = routing(cache, "grouped", ep, t, a, n)
        c = route_counts(idx, t, a.experts, ep, g)
        res = {"dispatch": model(c, "normal_hier", ep, t, a, "h800", fmt="fp8")["dispatch"],
               "combine": model(c, "normal_hier", ep, t, a, "h800")["combine"]}
        node_copies = c["node"].sum() / ep  # per rank, own node included (DeepEP's count)
        for op, pub, payload in (("dispatch", pub_d, row_bytes("fp8", a)),
                                 ("combine", pub_c, 2 * a.hidden)):
            m = res[op]
            metric = node_copies * payload
            bw = metric / (m["time_us"] * 1e-6) / 1e9
            rdma = max(m["rdma"]["send_max"], m["rdma"]["recv_max"])
            out.append(dict(mode="normal", ep=ep, op=op, published_gbs=pub, model_gbs=bw,
                            ratio=pub / bw, model_us=m["time_us"], bound=m["bound"],
                            published_us=metric / (pub * 1e9) * 1e6,
                            implied_nic_gbs=rdma / (metric / (pub * 1e9)) / 1e9,
                            own_node_share=float(np.trace(c["node"].reshape(n, g, n).sum(1))
                                                 / c["node"].sum())))
    for ep, (pd, pdb, pc, pcb) in DEEPEP_LL.items():
        t = a.decode_tokens
        idx = routing(cache, "standard", ep, t, a, ep // g)
        c = route_counts(idx, t, a.experts, ep, g)
        res = model(c, "ll_flat_v1", ep, t, a, "h800")
        sel = c["exp"].sum() / ep
        for op, pub, pub_bw, row in (("dispatch", pd, pdb, row_bytes("fp8", a) + LL_HEADER),
                                     ("combine", pc, pcb, 2 * a.hidden)):
            m = res[op]
            rdma = max(m["rdma"]["send_max"], m["rdma"]["recv_max"])
            out.append(dict(mode="ll", ep=ep, op=op, published_us=pub, model_us=m["time_us"],
                            ratio=pub / m["time_us"], bound=m["bound"], published_gbs=pub_bw,
                            model_gbs=sel * row / (m["time_us"] * 1e-6) / 1e9,
                            implied_nic_gbs=(rdma / ((pub - lat) * 1e-6) / 1e9) if rdma else None))
    return out


# ------------------------------------------------------------------------------------- output

def total_us(r, gpu):
    """Predicted dispatch + combine time of a sweep row at the rates of ``gpu``."""
    if gpu == "h800":
        return sum(r["time_us_h800"].values())
    return r["dispatch"]["time_us"] + r["combine"]["time_us"]


def print_sweep(rows, a):
    gpu = a.gpu
    print(f"Predicted per-rank traffic and time ({gpu.upper()} NVLink "
          f"{getattr(a, 'nvl_' + gpu):g} GB/s, NIC {a.nic:g} GB/s, latency {a.latency_us:g} us,"
          f" perfect overlap). Cell: RDMA MB sent per rank by dispatch (max over ranks) / "
          f"dispatch + combine us. LL: FP8 dispatch, bf16 combine; normal: "
          f"{a.normal_dispatch} dispatch, bf16 combine.")
    for kind in dict.fromkeys(r["routing"] for r in rows):
        sub = [r for r in rows if r["routing"] == kind]
        t = sub[0]["tokens"]
        print(f"\n[{kind}, T={t}] distinct ranks / nodes per token: " + ", ".join(
            f"N={r['nodes']}: {r['ranks_per_token']:.2f}/{r['nodes_per_token']:.2f}"
            for r in sub if r["algorithm"] == "ll_flat"))
        heads = [f"N={n} (EP{n * a.gpus_per_node})" for n in a.nodes]
        print(f"{'algorithm':<13}" + "".join(f"{h:>22}" for h in heads))
        for algo in ALGOS:
            cells = []
            for n in a.nodes:
                r = next(x for x in sub if x["nodes"] == n and x["algorithm"] == algo)
                us = total_us(r, gpu)
                cells.append(f"{r['dispatch']['rdma']['send_max'] / 1e6:.1f} / {us:,.0f}")
            print(f"{algo:<13}" + "".join(f"{c:>22}" for c in cells))


def print_compare(cmp):
    print("\nModel vs DeepEP V1 published internode figures (H800, NVLink 160 GB/s, NIC 50 GB/s):")
    print("normal mode, T=4096, top-4 node groups, FP8 dispatch / bf16 combine; GB/s in "
          "DeepEP's 'RDMA' metric ((token, node) pairs incl. own node x row / time)")
    print(f"{'EP':>4} {'op':<9}{'published':>10}{'model':>8}{'pub/model':>10}{'model us':>10}"
          f"{'bound':>6}{'own-node share':>15}{'implied NIC GB/s':>17}")
    for c in (x for x in cmp if x["mode"] == "normal"):
        print(f"{c['ep']:>4} {c['op']:<9}{c['published_gbs']:>10.0f}{c['model_gbs']:>8.1f}"
              f"{c['ratio']:>10.2f}{c['model_us']:>10.0f}{c['bound']:>6}"
              f"{c['own_node_share']:>15.2f}{c['implied_nic_gbs']:>17.1f}")
    print("low latency, T=128, flat V1 (one put per (token, expert)), FP8 dispatch / bf16 "
          "combine; us; GB/s in DeepEP's metric (all selections x row / time)")
    print(f"{'EP':>4} {'op':<9}{'published':>10}{'model':>8}{'pub/model':>10}{'pub GB/s':>9}"
          f"{'model GB/s':>11}{'bound':>6}{'implied NIC GB/s':>17}")
    for c in (x for x in cmp if x["mode"] == "ll"):
        nic = "-" if c["implied_nic_gbs"] is None else f"{c['implied_nic_gbs']:.1f}"
        print(f"{c['ep']:>4} {c['op']:<9}{c['published_us']:>10.0f}{c['model_us']:>8.1f}"
              f"{c['ratio']:>10.2f}{c['published_gbs']:>9.0f}{c['model_gbs']:>11.1f}"
              f"{c['bound']:>6}{nic:>17}")


def plot(rows, a, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5))
    colors = dict(zip(ALGOS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for kind, style in (("standard", "-"), ("decode", "--")):
        for algo in ALGOS:
            sub = sorted((r for r in rows if r["routing"] == kind and r["algorithm"] == algo),
                         key=lambda r: r["nodes"])
            if not sub:
                continue
            n = [r["nodes"] for r in sub]
            kw = dict(color=colors[algo], ls=style, marker="o", ms=3,
                      label=algo if style == "-" else None)
            ax0.plot(n, [max(r["dispatch"]["rdma"]["send_max"], 1.0) for r in sub], **kw)
            ax1.plot(n, [total_us(r, a.gpu) for r in sub], **kw)
    for ax, title in ((ax0, "RDMA bytes sent per rank, dispatch (max over ranks)"),
                      (ax1, f"predicted dispatch + combine time, {a.gpu.upper()} rates (us)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(a.nodes, [str(n) for n in a.nodes])
        ax.set_xlabel(f"nodes (x {a.gpus_per_node} GPUs)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7, ncol=2)
    t = {k: next(r["tokens"] for r in rows if r["routing"] == k) for k in ("standard", "decode")}
    fig.suptitle(f"Internode byte model, E={a.experts}, K={a.topk}, H={a.hidden}: solid "
                 f"T={t['standard']} standard routing, dashed T={t['decode']} decode; LL FP8 "
                 f"dispatch, normal {a.normal_dispatch}; perfect overlap", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--tokens", type=int, default=4096, help="T of the normal-mode routings")
    p.add_argument("--decode-tokens", type=int, default=128, help="T of the decode routing")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=ints, default=[2, 4, 8, 16, 32])
    p.add_argument("--zipf-alpha", type=float, default=1.2)
    p.add_argument("--topk-groups", type=int, default=4, help="nodes per token, grouped routing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normal-dispatch", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--nvl-h200", type=float, default=450.0, help="GB/s per direction")
    p.add_argument("--nvl-h800", type=float, default=160.0, help="GB/s per direction")
    p.add_argument("--nic", type=float, default=50.0, help="GB/s per GPU per direction")
    p.add_argument("--latency-us", type=float, default=15.0, help="fixed time added per op")
    p.add_argument("--gpu", choices=("h200", "h800"), default="h200", help="rates of the table")
    p.add_argument("--no-compare", action="store_true", help="skip the DeepEP comparison")
    p.add_argument("--out", type=Path, default=RESULTS / "model_internode.json")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    cache = {}
    rows = sweep(a, cache)
    print_sweep(rows, a)
    cmp = [] if a.no_compare else compare(a, cache)
    if cmp:
        print_compare(cmp)
    cfg = {k: (v.name if isinstance(v, Path) else v) for k, v in vars(a).items()}
    doc = dict(model=__doc__, config=cfg, algorithms={k: v[2] for k, v in ALGOS.items()},
               sweep=rows, deepep_comparison=cmp)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {a.out}")
    if not a.no_plot:
        path = a.plot or a.out.with_suffix(".png")
        plot(rows, a, path)
        print(f"wrote {path}")
    return doc


if __name__ == "__main__":
    main()
