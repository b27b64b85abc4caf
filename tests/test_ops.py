"""Every public op on virtual CPU devices inside ``jax.shard_map``, against the NumPy oracle.

Dispatch-side outputs (integers, bf16 rows, fp8 payload bytes and scales) must match exactly;
combine / ll_combine within bf16 tolerance. Compiled functions are cached per (R, EPConfig) so
the routing kinds of one configuration share a compilation.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxep
import oracle
from conftest import ep_call, make_mesh

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def random_table(num_ranks, num_experts, seed=0):
    """An explicit placement: a random permutation of all (rank, slot) pairs."""
    el = num_experts // num_ranks
    perm = np.random.default_rng(seed).permutation(num_experts)
    return tuple((int(p // el), int(p % el)) for p in perm)


@functools.lru_cache(maxsize=None)
def get_comm(num_ranks, cfg):
    return jaxep.Communicator(make_mesh(num_ranks), cfg, backend="xla")


def per_rank(a, num_ranks):
    """Global output (per-rank results concatenated on axis 0) -> ``[R, ...]``."""
    a = np.asarray(a)
    return a.reshape((num_ranks, -1) + a.shape[1:])


def scalars(a, num_ranks):
    return per_rank(a, num_ranks).reshape(num_ranks)


def assert_bits_equal(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    view = {1: np.uint8, 2: np.uint16, 4: np.uint32}[actual.dtype.itemsize]
    np.testing.assert_array_equal(actual.view(view), expected.view(view))


def bf16(a):
    return jnp.asarray(a, jnp.bfloat16)


def np_bf16(a):
    return np.array(bf16(a))


# ------------------------------------------------------------------------------------------
# normal mode: dispatch_layout + dispatch + combine in one compiled function
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def normal_fn(num_ranks, cfg):
    comm = get_comm(num_ranks, cfg)

    def fn(x, idx, w, y):
        lay = jaxep.dispatch_layout(comm, idx)
        d = jaxep.dispatch(comm, x, idx, w)
        out = jaxep.combine(comm, y, d.handle) if y is not None else None
        return dict(
            tokens_per_rank=lay.tokens_per_rank, layout_tpe=lay.tokens_per_expert,
            is_token_in_rank=lay.is_token_in_rank, x=d.x, topk_idx=d.topk_idx,
            topk_weights=d.topk_weights, num_tokens=d.num_tokens[None],
            tokens_per_expert=d.tokens_per_expert, num_dropped=d.num_dropped[None],
            num_invalid=d.num_invalid[None], src_index=d.handle.src_index,
            send_slot=d.handle.send_slot, out=out)

    return comm, ep_call(comm, fn)


def check_normal(num_ranks, cfg, kind, seed, x_kind="bf16", tokens=None):
    R = num_ranks
    T = tokens or cfg.max_tokens_per_rank
    comm, f = normal_fn(R, cfg)
    rng = np.random.default_rng(seed)
    idx, w = oracle.make_routing(kind, rng, R, T, cfg.num_experts, cfg.num_topk,
                                 comm.expert_rank)
    xf = rng.standard_normal((R * T, cfg.hidden)).astype(np.float32)
    C = cfg.recv_capacity or R * T
    if x_kind == "bf16":
        x = np_bf16(xf)
        y = np_bf16(rng.standard_normal((R * C, cfg.hidden)))
    elif x_kind == "f32":
        x = xf
        y = rng.standard_normal((R * C, cfg.hidden)).astype(np.float32)
    else:  # fp8 tuple, f32 or packed ue8m0 scales
        ue8m0 = x_kind == "fp8_ue8m0"
        x = tuple(np.asarray(a) for a in
                  jaxep.quantize_fp8(jnp.asarray(xf), round_scale=ue8m0, ue8m0=ue8m0))
        y = None
    got = f(x, idx, w, y)
    ref = oracle.dispatch(x, idx, w, comm.expert_rank, comm.expert_slot, R, cfg.recv_capacity)
    lay = oracle.dispatch_layout(idx, comm.expert_rank, R)

    g = {k: per_rank(v, R) for k, v in got.items() if k not in ("x", "out")}
    for r in range(R):
        np.testing.assert_array_equal(g["tokens_per_rank"][r], lay[r]["tokens_per_rank"])
        np.testing.assert_array_equal(g["layout_tpe"][r], lay[r]["tokens_per_expert"])
        np.testing.assert_array_equal(g["is_token_in_rank"][r], lay[r]["is_token_in_rank"])
        assert g["is_token_in_rank"].dtype == np.bool_
        for key in ("topk_idx", "tokens_per_expert", "src_index", "send_slot"):
            np.testing.assert_array_equal(g[key][r], ref[r][key], err_msg=f"{key} rank {r}")
            assert g[key].dtype == np.int32, key
        for key in ("num_tokens", "num_dropped", "num_invalid"):
            assert int(g[key][r, 0]) == ref[r][key], (key, r, g[key][r, 0], ref[r][key])
        assert_bits_equal(g["topk_weights"][r], ref[r]["topk_weights"])
    if isinstance(x, tuple):
        assert isinstance(got["x"], tuple) and len(got["x"]) == 2
        for i in range(2):
            gx = per_rank(got["x"][i], R)
            for r in range(R):
                assert_bits_equal(gx[r], ref[r]["x"][i])
    else:
        gx = per_rank(got["x"], R)
        for r in range(R):
            assert_bits_equal(gx[r], ref[r]["x"])
    if y is not None:
        out = np.asarray(got["out"])
        assert out.dtype == x.dtype and out.shape == (R * T, cfg.hidden)
        yr = per_rank(y, R)
        exp = np.concatenate(oracle.combine(list(yr), [ref[r]["src_index"] for r in range(R)], T))
        np.testing.assert_allclose(out.astype(np.float32), exp, rtol=1e-2, atol=1e-2)
        # tokens whose copies were all dropped (or that went nowhere) get exactly 0
        slots = np.concatenate([ref[r]["send_slot"] for r in range(R)])
        nowhere = np.all(slots < 0, axis=1)
        assert np.all(out[nowhere].astype(np.float32) == 0)
    return ref


CFG8 = dict(num_experts=32, num_topk=4, hidden=128, max_tokens_per_rank=16)
PLACEMENTS = {"linear": "linear", "round_robin": "round_robin",
              "table": random_table(8, 32, seed=1)}


@pytest.mark.parametrize("kind", oracle.ROUTINGS)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_normal_r8(placement, kind):
    cfg = jaxep.EPConfig(**CFG8, placement=PLACEMENTS[placement])
    check_normal(8, cfg, kind, seed=zlib.crc32(f"{placement}/{kind}".encode()))


@pytest.mark.parametrize("kind", ["random", "invalid", "duplicates", "silent_rank"])
def test_normal_fewer_tokens_than_max(kind):
    """T=8 tokens with max_tokens_per_rank=16: C = R*T uses the actual T."""
    cfg = jaxep.EPConfig(num_experts=16, num_topk=2, hidden=256, max_tokens_per_rank=16)
    check_normal(4, cfg, kind, seed=3, tokens=8)


@pytest.mark.parametrize("kind", ["random", "one_expert", "duplicates", "invalid"])
def test_normal_overflow(kind):
    """recv_capacity smaller than the rows a rank receives: the first C are kept."""
    cfg = jaxep.EPConfig(**CFG8, recv_capacity=12, placement="round_robin")
    ref = check_normal(8, cfg, kind, seed=11)
    assert sum(r["num_dropped"] for r in ref) > 0


def test_normal_overflow_r2():
    cfg = jaxep.EPConfig(num_experts=8, num_topk=3, hidden=128, max_tokens_per_rank=32,
                         recv_capacity=20)
    ref = check_normal(2, cfg, "random", seed=5)
    assert all(r["num_dropped"] > 0 for r in ref)


def test_normal_float32():
    cfg = jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=8)
    check_normal(2, cfg, "duplicates", seed=6, x_kind="f32")


@pytest.mark.parametrize("x_kind", ["fp8", "fp8_ue8m0"])
@pytest.mark.parametrize("kind", ["random", "invalid"])
def test_normal_fp8(x_kind, kind):
    cfg = jaxep.EPConfig(num_experts=16, num_topk=3, hidden=640, max_tokens_per_rank=8,
                         recv_capacity=10)   # H/128 = 5 blocks: a partial packed word
    check_normal(4, cfg, kind, seed=7, x_kind=x_kind)


def test_normal_two_mesh_axes():
    """axis_name may be a tuple of mesh axes; R is the product of their sizes."""
    mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("a", "b"))
    cfg = jaxep.EPConfig(num_experts=16, num_topk=2, hidden=128, max_tokens_per_rank=8,
                         axis_name=("a", "b"))
    comm = jaxep.Communicator(mesh, cfg, backend="xla")
    assert comm.num_ranks == 8
    R, T = 8, 8
    rng = np.random.default_rng(8)
    idx, w = oracle.make_routing("random", rng, R, T, 16, 2, comm.expert_rank)
    x = np_bf16(rng.standard_normal((R * T, 128)))

    def fn(x, idx, w):
        d = jaxep.dispatch(comm, x, idx, w)
        return d.x, d.handle.src_index, jaxep.combine(comm, d.x, d.handle)

    gx, src, out = ep_call(comm, fn)(x, idx, w)
    ref = oracle.dispatch(x, idx, w, comm.expert_rank, comm.expert_slot, R)
    for r in range(R):
        assert_bits_equal(per_rank(gx, R)[r], ref[r]["x"])
        np.testing.assert_array_equal(per_rank(src, R)[r], ref[r]["src_index"])
    # combining the dispatched rows unchanged gives x times the number of ranks it went to
    lay = oracle.dispatch_layout(idx, comm.expert_rank, R)
    n = np.concatenate([lay[r]["is_token_in_rank"].sum(1) for r in range(R)])
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(x, np.float32) * n[:, None],
                               rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------
# placement tables
# ------------------------------------------------------------------------------------------


def test_placement_tables_and_local_expert_ids():
    R, E = 4, 16
    el = E // R
    mesh = make_mesh(R)
    table = random_table(R, E, seed=2)
    for placement, rank_of, slot_of in [
            ("linear", lambda e: e // el, lambda e: e % el),
            ("round_robin", lambda e: e % R, lambda e: e // R),
            (table, lambda e: table[e][0], lambda e: table[e][1])]:
        comm = jaxep.Communicator(mesh, jaxep.EPConfig(
            num_experts=E, num_topk=2, hidden=128, max_tokens_per_rank=4,
            placement=placement), backend="xla")
        np.testing.assert_array_equal(comm.expert_rank, [rank_of(e) for e in range(E)])
        np.testing.assert_array_equal(comm.expert_slot, [slot_of(e) for e in range(E)])
        for r in range(R):
            ids = comm.local_expert_ids(r)
            assert ids.dtype == np.int32 and ids.shape == (el,)
            expect = [next(e for e in range(E) if rank_of(e) == r and slot_of(e) == s)
                      for s in range(el)]
            np.testing.assert_array_equal(ids, expect)
        with pytest.raises(ValueError, match="rank"):
            comm.local_expert_ids(R)


def test_numpy_table_placement():
    table = np.array(random_table(4, 8, seed=4))
    cfg = jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=4,
                         placement=table)
    comm = jaxep.Communicator(make_mesh(4), cfg, backend="xla")
    np.testing.assert_array_equal(comm.expert_rank, table[:, 0])
    np.testing.assert_array_equal(comm.expert_slot, table[:, 1])


def test_auto_backend_on_cpu_is_xla():
    comm = jaxep.Communicator(make_mesh(2), jaxep.EPConfig(
        num_experts=4, num_topk=2, hidden=128, max_tokens_per_rank=4), backend="auto")
    assert comm.backend == "xla"
    for op in ("dispatch_layout", "dispatch", "combine", "ll_dispatch", "ll_combine"):
        assert comm.implementation(op) == "xla"
    with comm as c:
        assert c is comm
    assert comm.closed


# ------------------------------------------------------------------------------------------
# low-latency mode
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def ll_fn(num_ranks, cfg, fp8=False, round_scale=False, ue8m0=False):
    comm = get_comm(num_ranks, cfg)
    kw = dict(fp8=fp8, round_scale=round_scale, ue8m0=ue8m0)

    def fn(x, idx, w, y):
        d = jaxep.ll_dispatch(comm, x, idx, **kw)
        # copy_engine is a CUDA-backend option: the pure-JAX path accepts and ignores it
        d2 = jaxep.ll_dispatch_recv(comm, jaxep.ll_dispatch_send(comm, x, idx, copy_engine=True,
                                                                  **kw))
        res = dict(x=d.x, counts=d.counts, num_invalid=d.num_invalid[None],
                   src_index=d.handle.src_index, src_topk=d.handle.src_topk,
                   hcounts=d.handle.counts,
                   x2=d2.x, counts2=d2.counts, num_invalid2=d2.num_invalid[None],
                   src_index2=d2.handle.src_index, src_topk2=d2.handle.src_topk,
                   hcounts2=d2.handle.counts, recv_rows=d.handle.recv_rows,
                   recv_rows2=d2.handle.recv_rows)
        if not fp8:
            res["out3"] = jaxep.ll_combine(comm, y, idx, w, d.handle, prereduce=True)
            res["out4"] = jaxep.ll_combine_recv(comm, jaxep.ll_combine_send(
                comm, y, idx, w, d.handle, prereduce="float32"))
            res["out"] = jaxep.ll_combine(comm, y, idx, w, d.handle, prereduce=False)
            res["out5"] = jaxep.ll_combine(comm, y, idx, w, d.handle)  # default: "float32"
            res["out2"] = jaxep.ll_combine_recv(
                comm, jaxep.ll_combine_send(comm, y, idx, w, d2.handle))
        return res

    return comm, ep_call(comm, fn)


def check_ll(num_ranks, cfg, kind, seed, tokens=None, dtype=jnp.bfloat16, fp8=False,
             round_scale=False, ue8m0=False):
    R = num_ranks
    T = tokens or cfg.max_tokens_per_rank
    E, H = cfg.num_experts, cfg.hidden
    comm, f = ll_fn(R, cfg, fp8, round_scale, ue8m0)
    el = comm.num_local_experts
    rng = np.random.default_rng(seed)
    idx, w = oracle.make_routing(kind, rng, R, T, E, cfg.num_topk, comm.expert_rank)
    x = np.asarray(jnp.asarray(rng.standard_normal((R * T, H)) * 3, dtype))
    y = np.asarray(jnp.asarray(rng.standard_normal((R * el, R * T, H)), dtype))
    got = f(x, idx, w, y)
    if fp8:
        q = tuple(np.asarray(a) for a in
                  jaxep.quantize_fp8(jnp.asarray(x), round_scale=round_scale, ue8m0=ue8m0))
        ref = oracle.ll_dispatch(q, idx, comm.expert_rank, comm.expert_slot, R)
    else:
        ref = oracle.ll_dispatch(x, idx, comm.expert_rank, comm.expert_slot, R)
    for sfx in ("", "2"):   # one-phase and two-phase
        g = {k: per_rank(got[k + sfx], R)
             for k in ("counts", "num_invalid", "src_index", "src_topk", "hcounts")}
        for r in range(R):
            np.testing.assert_array_equal(g["counts"][r], ref[r]["counts"])
            np.testing.assert_array_equal(g["hcounts"][r], ref[r]["counts"])
            np.testing.assert_array_equal(g["src_index"][r], ref[r]["src_index"])
            np.testing.assert_array_equal(g["src_topk"][r], ref[r]["src_topk"])
            assert int(g["num_invalid"][r, 0]) == ref[r]["num_invalid"]
            check_recv_rows(per_rank(got["recv_rows" + sfx], R)[r], ref[r], cfg.num_topk)
        gx = got["x" + sfx]
        if fp8:
            assert isinstance(gx, tuple) and len(gx) == 2
            for i in range(2):
                a = per_rank(gx[i], R)
                for r in range(R):
                    assert_bits_equal(a[r], ref[r]["x"][i])
        else:
            a = per_rank(gx, R)
            for r in range(R):
                assert_bits_equal(a[r], ref[r]["x"])
    if fp8:
        # dequantised rows are close to the routed source rows
        deq = per_rank(jaxep.dequantize_fp8(*got["x"]), R)
        src = oracle.ll_dispatch(x.astype(np.float32), idx, comm.expert_rank,
                                 comm.expert_slot, R)
        for r in range(R):
            np.testing.assert_allclose(deq[r], src[r]["x"], rtol=0.07, atol=1e-2)
    else:
        slots = [ref[r]["slot"] for r in range(R)]
        exp = oracle.ll_combine(list(per_rank(y, R)), idx, w, comm.expert_rank,
                                comm.expert_slot, slots)
        out = np.asarray(got["out"])
        assert out.dtype == x.dtype and out.shape == (R * T, H)
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(out.astype(np.float32), exp, rtol=tol, atol=tol)
        assert_bits_equal(got["out2"], out)
        # prereduce: one extra rounding to the dtype per rank's partial sum
        out3 = np.asarray(got["out3"])
        assert out3.dtype == x.dtype and out3.shape == (R * T, H)
        np.testing.assert_allclose(out3.astype(np.float32), exp, rtol=tol, atol=2 * tol)
        # prereduce="float32": float32 partials, the same accumulation as the plain combine
        out4 = np.asarray(got["out4"])
        assert out4.dtype == x.dtype and out4.shape == (R * T, H)
        np.testing.assert_allclose(out4.astype(np.float32), exp, rtol=tol, atol=tol)
        assert_bits_equal(got["out5"], out4)
    return ref


def check_recv_rows(recv_rows, ref, num_topk):
    """recv_rows [R*T, K] of one rank is the inverse of its (src_index, src_topk), -1 elsewhere."""
    el, rt = ref["src_index"].shape
    want = np.full((rt, num_topk), -1, np.int32)
    for l in range(el):
        for j in range(rt):
            if ref["src_index"][l, j] >= 0:
                want[ref["src_index"][l, j], ref["src_topk"][l, j]] = l * rt + j
    np.testing.assert_array_equal(recv_rows, want)


LL8 = dict(num_experts=32, num_topk=4, hidden=128, max_tokens_per_rank=8)


@pytest.mark.parametrize("kind", oracle.ROUTINGS)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_ll_r8(placement, kind):
    cfg = jaxep.EPConfig(**LL8, placement=PLACEMENTS[placement])
    check_ll(8, cfg, kind, seed=zlib.crc32(f"ll/{placement}/{kind}".encode()))


@pytest.mark.parametrize("kind", ["random", "duplicates", "invalid"])
def test_ll_fewer_tokens_r4(kind):
    cfg = jaxep.EPConfig(num_experts=16, num_topk=3, hidden=256, max_tokens_per_rank=16)
    check_ll(4, cfg, kind, seed=21, tokens=8)


def test_ll_float32_r2():
    cfg = jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=8,
                         placement="round_robin")
    check_ll(2, cfg, "duplicates", seed=22, dtype=jnp.float32)


@pytest.mark.parametrize("round_scale,ue8m0", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("kind", ["random", "duplicates"])
def test_ll_fp8(round_scale, ue8m0, kind):
    cfg = jaxep.EPConfig(num_experts=16, num_topk=3, hidden=640, max_tokens_per_rank=8,
                         placement="round_robin")
    check_ll(4, cfg, kind, seed=23, fp8=True, round_scale=round_scale, ue8m0=ue8m0)


def test_ll_fp8_tiny_values():
    """amax below the 1e-4 floor: the scale is 1e-4 * fl32(1/448) and rows still match quantize_fp8."""
    cfg = jaxep.EPConfig(num_experts=8, num_topk=2, hidden=256, max_tokens_per_rank=4)
    R, T = 2, 4
    comm, f = ll_fn(R, cfg, True, False, False)
    rng = np.random.default_rng(24)
    idx, w = oracle.make_routing("random", rng, R, T, 8, 2, comm.expert_rank)
    x = np_bf16(rng.standard_normal((R * T, 256)) * 1e-6)
    x[:, :128] = 0
    got = f(x, idx, w, None)
    q = tuple(np.asarray(a) for a in jaxep.quantize_fp8(jnp.asarray(x)))
    np.testing.assert_array_equal(
        q[1][:, 0], np.full(R * T, np.float32(1e-4) * np.float32(1 / 448)))
    ref = oracle.ll_dispatch(q, idx, comm.expert_rank, comm.expert_slot, R)
    for i in range(2):
        a = per_rank(got["x"][i], R)
        for r in range(R):
            assert_bits_equal(a[r], ref[r]["x"][i])


# ------------------------------------------------------------------------------------------
# fp8 helpers on their own
# ------------------------------------------------------------------------------------------


def _fp8_sample():
    rng = np.random.default_rng(30)
    return (rng.standard_normal((6, 640)) * rng.uniform(0.01, 100, (6, 1))).astype(np.float32)


def _documented_scale(x):
    blocks = x.reshape(x.shape[0], -1, 128)
    amax = np.maximum(np.abs(blocks).max(-1), np.float32(1e-4))
    return (amax * np.float32(1 / 448)).astype(np.float32)


def test_quantize_fp8_scale_is_exact():
    """fp8.py documents ``scale = max(amax, 1e-4) * fl32(1/448)``, bit for bit (what the CUDA
    kernels reproduce)."""
    x = _fp8_sample()
    _, s = jaxep.quantize_fp8(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(s), _documented_scale(x))


def test_quantize_fp8_documented_math():
    x = _fp8_sample()
    p, s = jaxep.quantize_fp8(jnp.asarray(x))
    s = np.asarray(s)
    np.testing.assert_array_equal(s, _documented_scale(x))
    blocks = x.reshape(6, 5, 128)
    expect = (blocks / s[..., None]).astype(jnp.float8_e4m3fn).reshape(6, 640)
    assert_bits_equal(np.asarray(p), expect)
    # rounded scales: the next power of two at or above
    p2, s2 = jaxep.quantize_fp8(jnp.asarray(x), round_scale=True)
    pow2 = np.exp2(np.ceil(np.log2(s.astype(np.float64)))).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(s2), pow2)
    expect2 = (blocks / pow2[..., None]).astype(jnp.float8_e4m3fn).reshape(6, 640)
    assert_bits_equal(np.asarray(p2), expect2)
    # packed: 4 exponents per int32, little-endian, the partial word padded with 127
    p3, s3 = jaxep.quantize_fp8(jnp.asarray(x), round_scale=True, ue8m0=True)
    assert_bits_equal(np.asarray(p3), np.asarray(p2))
    s3 = np.asarray(s3)
    assert s3.dtype == np.int32 and s3.shape == (6, 2)
    exps = (pow2.view(np.uint32) >> 23).astype(np.int64)
    for t in range(6):
        words = [0, 0]
        for b in range(8):
            e = exps[t, b] if b < 5 else 127
            words[b // 4] |= int(e) << (8 * (b % 4))
        np.testing.assert_array_equal(s3[t].view(np.uint32), np.array(words, np.uint32))
    d_packed = np.asarray(jaxep.dequantize_fp8(p3, jnp.asarray(s3)))
    d_f32 = np.asarray(jaxep.dequantize_fp8(p2, s2))
    np.testing.assert_array_equal(d_packed, d_f32)
    np.testing.assert_allclose(d_f32, x, rtol=0.07, atol=np.abs(x).max() * 1e-3)
