"""The internode byte model (benchmarks/model_internode.py) against brute-force counts over the
routing, its invariants, its samplers, and a run of the script. CPU only, NumPy only."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "model_internode.py"
_spec = importlib.util.spec_from_file_location("model_internode", _PATH)
mi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mi)

STRUCTURES = ("xla", "xla_ll", "flat_expert", "flat_rank", "forward")


def brute_force(idx, structure, row, ranks, g, tokens, experts):
    """``[3, R, R]`` bytes per class, one token at a time, from the rules in words."""
    el = experts // ranks
    b = np.zeros((3, ranks, ranks))

    def cls(s, d):
        return mi.LOCAL if s == d else (mi.NVL if s // g == d // g else mi.RDMA)

    for flat, ids in enumerate(idx):
        s = flat // tokens
        ids = [int(e) for e in ids if e >= 0]
        dests = sorted({e // el for e in ids})
        if structure in ("xla", "xla_ll"):
            for d in range(ranks):
                b[cls(s, d), s, d] += row * (1 if structure == "xla" else el)
        elif structure == "flat_expert":
            for e in ids:
                b[cls(s, e // el), s, e // el] += row
        elif structure == "flat_rank":
            for d in dests:
                b[cls(s, d), s, d] += row
        else:  # forward
            for d in dests:
                if d // g == s // g:
                    b[cls(s, d), s, d] += row
            for n in sorted({d // g for d in dests} - {s // g}):
                f = n * g + s % g
                b[mi.RDMA, s, f] += row
                for d in dests:
                    if d // g == n:
                        b[cls(f, d), f, d] += row
    return b


def small_routing(rng, ranks, tokens, experts, k):
    """Random top-k with repeated ids and -1 slots (the model must count them as the rules say)."""
    idx = rng.integers(0, experts, (ranks * tokens, k))
    idx[rng.random(idx.shape) < 0.1] = -1
    idx[::7, 1] = idx[::7, 0]  # a token listing an expert twice
    return idx


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("nodes,g", [(3, 4), (2, 1), (1, 4)])
def test_traffic_matches_brute_force(structure, nodes, g):
    rng = np.random.default_rng(nodes * 10 + g)
    ranks, tokens, experts, k = nodes * g, 23, 24, 4
    idx = small_routing(rng, ranks, tokens, experts, k)
    counts = mi.route_counts(idx, tokens, experts, ranks, g)
    got = mi.traffic(counts, structure, 7, ranks, g, tokens, experts)
    want = brute_force(idx, structure, 7, ranks, g, tokens, experts)
    np.testing.assert_array_equal(got, want)


def test_counts_match_brute_force():
    rng = np.random.default_rng(1)
    ranks, g, tokens, experts = 8, 4, 31, 32
    idx = small_routing(rng, ranks, tokens, experts, 5)
    c = mi.route_counts(idx, tokens, experts, ranks, g)
    el = experts // ranks
    exp, rank, node = np.zeros((ranks, ranks)), np.zeros((ranks, ranks)), np.zeros((ranks, 2))
    for flat, ids in enumerate(idx):
        s = flat // tokens
        for e in ids[ids >= 0]:
            exp[s, e // el] += 1
        for d in {e // el for e in ids[ids >= 0]}:
            rank[s, d] += 1
        for n in {e // el // g for e in ids[ids >= 0]}:
            node[s, n] += 1
    np.testing.assert_array_equal(c["exp"], exp)
    np.testing.assert_array_equal(c["rank"], rank)
    np.testing.assert_array_equal(c["node"], node)


def _model(idx, tokens, ranks, g, algo, experts=256):
    a = mi.parse(["--experts", str(experts), "--gpus-per-node", str(g)])
    c = mi.route_counts(idx, tokens, experts, ranks, g)
    return mi.model(c, algo, ranks, tokens, a, "h200"), a


def test_one_rank_per_node_layered_equals_flat():
    """Every token's experts on one rank of one other node: forwarding saves nothing on RDMA
    (one copy per node == one copy per rank), and V1 sends K copies."""
    rng = np.random.default_rng(2)
    nodes, g, tokens, k, experts = 4, 8, 64, 8, 256
    ranks, el = nodes * g, experts // (nodes * g)
    src = np.repeat(np.arange(ranks), tokens)
    dest = (src + g * rng.integers(1, nodes, src.size)) % ranks  # a rank of another node
    idx = dest[:, None] * el + rng.permuted(np.tile(np.arange(el), (src.size, 1)), axis=1)[:, :k]
    flat, _ = _model(idx, tokens, ranks, g, "ll_flat")
    layered, _ = _model(idx, tokens, ranks, g, "ll_layered")
    v1, _ = _model(idx, tokens, ranks, g, "ll_flat_v1")
    for op in ("dispatch", "combine"):
        assert layered[op]["rdma"] == flat[op]["rdma"]
    assert v1["dispatch"]["rdma"]["send_mean"] == pytest.approx(
        k * flat["dispatch"]["rdma"]["send_mean"], rel=1e-12)


@pytest.mark.parametrize("nodes", [2, 4, 8])
def test_hierarchical_rdma_is_distinct_nodes_times_row(nodes):
    g, tokens = 8, 200
    ranks = nodes * g
    a = mi.parse(["--tokens", str(tokens), "--nodes", str(nodes)])
    idx = mi.make_routing("standard", ranks, tokens, a, seed=nodes)
    c = mi.route_counts(idx, tokens, a.experts, ranks, g)
    hier = mi.model(c, "normal_hier", ranks, tokens, a, "h200")
    flat = mi.model(c, "normal_rank", ranks, tokens, a, "h200")
    row = mi.dispatch_row("normal_hier", a)
    pairs = sum(len({e // (a.experts // ranks) // g for e in ids} - {flat_i // tokens // g})
                for flat_i, ids in enumerate(idx))  # (token, other node) pairs, by hand
    assert hier["dispatch"]["rdma"]["send_mean"] * ranks == pytest.approx(pairs * row)
    assert hier["combine"]["rdma"]["recv_mean"] * ranks == pytest.approx(pairs * 2 * a.hidden)
    for op in ("dispatch", "combine"):
        for stat in ("send_max", "recv_max", "send_mean"):
            assert hier[op]["rdma"][stat] <= flat[op]["rdma"][stat]
        assert hier[op]["time_us"] <= flat[op]["time_us"] + 1e-9


@pytest.mark.parametrize("algo", list(mi.ALGOS))
def test_conservation_and_link_classes(algo):
    rng = np.random.default_rng(3)
    nodes, g, tokens, experts = 3, 4, 40, 48
    ranks = nodes * g
    idx = small_routing(rng, ranks, tokens, experts, 6)
    c = mi.route_counts(idx, tokens, experts, ranks, g)
    a = mi.parse(["--experts", str(experts), "--gpus-per-node", str(g)])
    structure = mi.ALGOS[algo][0]
    b = mi.traffic(c, structure, mi.dispatch_row(algo, a), ranks, g, tokens, experts)
    cls = mi.link_class(ranks, g)
    for k in range(3):
        assert np.all(b[k][cls != k] == 0), f"{mi.CLASSES[k]} bytes between ranks of another class"
    res = mi.model(c, algo, ranks, tokens, a, "h200")
    for op in ("dispatch", "combine"):
        for name in mi.CLASSES:
            s = res[op][name]
            assert s["send_mean"] == pytest.approx(s["recv_mean"])  # sum sent == sum received
    # every (token, rank) row is delivered once; forwarding adds the RDMA hop on top
    delivered = c["rank"].sum() * mi.dispatch_row(algo, a) / ranks
    total = sum(res["dispatch"][n]["send_mean"] for n in mi.CLASSES)
    if structure == "flat_rank":
        assert total == pytest.approx(delivered)
    if structure == "forward":
        hop = c["node"].sum() * mi.dispatch_row(algo, a) / ranks  # every (token, node) pair
        own = sum(c["node"][s, s // g] for s in range(ranks)) * mi.dispatch_row(algo, a) / ranks
        assert total == pytest.approx(delivered + hop - own)


def test_time_is_slowest_link_plus_latency():
    """2 nodes x 1 GPU, rank 0 sends 10 tokens to rank 1: time = bytes / NIC + latency."""
    a = mi.parse(["--experts", "2", "--gpus-per-node", "1", "--latency-us", "5"])
    idx = np.full((20, 1), -1)
    idx[:10, 0] = 1
    c = mi.route_counts(idx, 10, 2, 2, 1)
    res = mi.model(c, "normal_rank", 2, 10, a, "h200")
    row = mi.dispatch_row("normal_rank", a)
    assert res["dispatch"]["rdma"]["send_max"] == 10 * row
    assert res["dispatch"]["time_us"] == pytest.approx(1e6 * 10 * row / 50e9 + 5)
    assert res["dispatch"]["bound"] == "rdma"
    assert res["combine"]["rdma"]["recv_max"] == 10 * 2 * a.hidden


def test_samplers():
    rng = np.random.default_rng(4)
    u = mi.uniform_topk(rng, 5000, 8, 256)
    assert all(len(set(r)) == 8 for r in u)
    p = 1.0 / np.arange(1, 65) ** 1.2
    p /= p.sum()
    z = mi.successive_topk(rng, 40000, 4, p)
    assert all(len(set(r)) == 4 for r in z[:2000])
    # Gumbel top-k over log p: the law successive sampling must reproduce
    gum = np.argsort(-(np.log(p) + rng.gumbel(size=(40000, 64))), axis=1)[:, :4]
    np.testing.assert_allclose(np.bincount(z.ravel(), minlength=64) / z.size,
                               np.bincount(gum.ravel(), minlength=64) / gum.size, atol=4e-3)


def test_grouped_matches_deepep_procedure():
    """grouped_topk against DeepEP's test_internode.py procedure run on full scores."""
    rng = np.random.default_rng(5)
    n, e, nodes, groups, k = 30000, 64, 8, 3, 6
    s = e // nodes
    got = mi.grouped_topk(rng, n, k, e, nodes, groups)
    assert all(len(set(r)) == k and len(set(r // s)) <= groups for r in got[:3000])
    scores = np.abs(rng.standard_normal((n, e))) + 1
    top_groups = np.argsort(-scores.reshape(n, nodes, s).max(2), axis=1)[:, :groups]
    mask = np.zeros((n, nodes), bool)
    mask[np.arange(n)[:, None], top_groups] = True
    want = np.argsort(-np.where(np.repeat(mask, s, axis=1), scores, 0), axis=1)[:, :k]
    hist = lambda x: np.bincount([len(set(r // s)) for r in x], minlength=groups + 1) / n  # noqa
    np.testing.assert_allclose(hist(got), hist(want), atol=0.01)
    per_group = lambda x: np.sort(np.stack([np.sum(x // s == j, 1) for j in range(nodes)], 1),
                                  axis=1).mean(0)  # noqa: E731 (sorted per-node counts)
    np.testing.assert_allclose(per_group(got), per_group(want), atol=0.03)


def test_script_writes_json_and_png(tmp_path):
    out = tmp_path / "m.json"
    args = ["--tokens", "64", "--decode-tokens", "16", "--nodes", "2,4", "--out", str(out)]
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
        args.append("--no-plot")
    mi.main(args)
    doc = json.loads(out.read_text())
    assert {r["routing"] for r in doc["sweep"]} == {"standard", "zipf", "grouped", "decode"}
    assert {r["algorithm"] for r in doc["sweep"]} == set(mi.ALGOS)
    assert len(doc["sweep"]) == 4 * 2 * len(mi.ALGOS)
    eps = {(c["mode"], c["ep"]) for c in doc["deepep_comparison"]}
    assert eps == {("normal", 16), ("normal", 32), ("normal", 64)} | {
        ("ll", ep) for ep in (8, 16, 32, 64, 128, 256)}
    for c in doc["deepep_comparison"]:
        assert c["ratio"] > 0 and np.isfinite(c["ratio"])
    if has_mpl:
        png = out.with_suffix(".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
