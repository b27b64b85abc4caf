"""``dispatch_grouped`` / ``combine_grouped`` on virtual CPU devices against the NumPy oracle
(``tests/oracle.py``, written from the semantics in the docstrings), their gradients against
the oracle's analytic gradients, autodiff of a plain-jnp MoE layer and autodiff of the raw
pure-JAX backend, and their trace-time errors.

Dispatch-side outputs must match exactly (rows bit for bit); combines within float tolerance.
Compiled functions are cached per (R, EPConfig) so the routing kinds of one configuration share
a compilation.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxep
import oracle
from conftest import ep_call, make_mesh
from jaxep import _xla  # only as the autodiff reference of the custom VJPs
from test_grads import R as GR  # ranks of the gradient tests
from test_grads import close, total
from test_grads import routing as grad_routing
from test_ops import PLACEMENTS, assert_bits_equal, np_bf16, per_rank

# ------------------------------------------------------------------------------------------
# forward against the oracle
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def get_comm(num_ranks, cfg):
    return jaxep.Communicator(make_mesh(num_ranks), cfg, backend="xla")


@functools.lru_cache(maxsize=None)
def grouped_fn(num_ranks, cfg, zero_padding=True):
    comm = get_comm(num_ranks, cfg)

    def fn(x, idx, w, y):
        g = jaxep.dispatch_grouped(comm, x, idx, w, zero_padding=zero_padding)
        res = dict(x=g.x, group_sizes=g.group_sizes, weights=g.weights,
                   num_dropped=g.num_dropped[None], num_invalid=g.num_invalid[None],
                   src_index=g.handle.src_index, dest_row=g.handle.dest_row,
                   same_weights=(g.handle.weights == g.weights).all()[None])
        if y is not None:
            res["out"] = jaxep.combine_grouped(comm, y, g.handle)
            res["out_unweighted"] = jaxep.combine_grouped(comm, y, g.handle, weighted=False)
        return res

    return comm, ep_call(comm, fn)


def rows_of(cfg, num_ranks, tokens):
    el = cfg.num_experts // num_ranks
    if cfg.grouped_capacity is not None:
        return cfg.grouped_capacity
    return num_ranks * tokens * min(cfg.num_topk, el) + el * (cfg.expert_alignment - 1)


def check_grouped(num_ranks, cfg, kind, seed, x_kind="bf16", tokens=None, zero_padding=True):
    R = num_ranks
    T = tokens or cfg.max_tokens_per_rank
    M = rows_of(cfg, R, T)
    comm, f = grouped_fn(R, cfg, zero_padding)
    rng = np.random.default_rng(seed)
    idx, w = oracle.make_routing(kind, rng, R, T, cfg.num_experts, cfg.num_topk,
                                 comm.expert_rank)
    xf = rng.standard_normal((R * T, cfg.hidden)).astype(np.float32)
    if x_kind == "bf16":
        x, y = np_bf16(xf), np_bf16(rng.standard_normal((R * M, cfg.hidden)))
    elif x_kind == "f32":
        x, y = xf, rng.standard_normal((R * M, cfg.hidden)).astype(np.float32)
    else:  # fp8 tuple, f32 or packed ue8m0 scales
        ue8m0 = x_kind == "fp8_ue8m0"
        x = tuple(np.asarray(a) for a in
                  jaxep.quantize_fp8(jnp.asarray(xf), round_scale=ue8m0, ue8m0=ue8m0))
        y = None
    got = f(x, idx, w, y)
    ref = oracle.dispatch_grouped(x, idx, w, comm.expert_rank, comm.expert_slot, R,
                                  cfg.expert_alignment, cfg.grouped_capacity)

    g = {k: per_rank(v, R) for k, v in got.items() if k not in ("x", "out", "out_unweighted")}
    assert g["src_index"].shape == (R, M)
    ids, _ = oracle.sanitize(idx, cfg.num_experts)
    for r in range(R):
        for key in ("group_sizes", "src_index"):
            np.testing.assert_array_equal(g[key][r], ref[r][key], err_msg=f"{key} rank {r}")
            assert g[key].dtype == np.int32, key
        for key in ("num_dropped", "num_invalid"):
            assert int(g[key][r, 0]) == ref[r][key], (key, r, g[key][r, 0], ref[r][key])
        assert g["weights"].dtype == np.float32
        assert_bits_equal(g["weights"][r], ref[r]["weights"])
        assert g["same_weights"][r, 0]
        assert np.all(g["group_sizes"][r] % cfg.expert_alignment == 0)
        assert g["group_sizes"][r].sum() <= M
        # dest_row: each token's first listing of an expert names its row on that rank
        exp_dest = np.full((T, cfg.num_topk), -1, np.int32)
        for t in range(T):
            gl = r * T + t
            for k, e in enumerate(ids[gl]):
                if e >= 0 and ids[gl].index(e) == k:
                    exp_dest[t, k] = ref[comm.expert_rank[e]]["rows"].get((gl, e), -1)
        np.testing.assert_array_equal(g["dest_row"][r], exp_dest, err_msg=f"dest_row {r}")
    parts = got["x"] if isinstance(x, tuple) else (got["x"],)
    for i, part in enumerate(parts):
        gx = per_rank(part, R)
        for r in range(R):
            want = ref[r]["x"][i] if isinstance(x, tuple) else ref[r]["x"]
            assert_bits_equal(gx[r], want)
    if y is not None:
        yr = list(per_rank(y, R))
        src = [r_["src_index"] for r_ in ref]
        wts = [r_["weights"] for r_ in ref]
        for key, weighted in (("out", True), ("out_unweighted", False)):
            out = np.asarray(got[key])
            assert out.dtype == y.dtype and out.shape == (R * T, cfg.hidden)
            exp = oracle.combine_grouped(yr, src, wts, T, weighted)
            tol = 2e-2 if y.dtype != np.float32 else 1e-5
            np.testing.assert_allclose(out.astype(np.float32), exp, rtol=tol, atol=tol)
            # tokens with no admitted pair get exactly 0
            has = np.zeros(R * T, bool)
            for s in src:
                has[s[s >= 0]] = True
            assert np.all(out[~has].astype(np.float32) == 0)
    return ref


CFG8 = dict(num_experts=32, num_topk=4, hidden=128, max_tokens_per_rank=16)


@pytest.mark.parametrize("kind", oracle.GROUPED_ROUTINGS)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_grouped_r8(placement, kind):
    cfg = jaxep.EPConfig(**CFG8, placement=PLACEMENTS[placement])
    ref = check_grouped(8, cfg, kind, seed=zlib.crc32(f"g/{placement}/{kind}".encode()))
    assert all(r["num_dropped"] == 0 for r in ref)   # the default M never drops


def test_grouped_duplicates_sum_weights():
    """A token listing one expert twice gets one row, weighted by the sum of the two."""
    cfg = jaxep.EPConfig(num_experts=8, num_topk=3, hidden=128, max_tokens_per_rank=4)
    comm, f = grouped_fn(2, cfg)
    idx = np.array([[1, 1, 5]] + [[-1, -1, -1]] * 7, np.int32)
    w = np.array([[0.25, 0.5, 1.0]] + [[0, 0, 0]] * 7, np.float32)
    x = np.ones((8, 128), np.float32)
    got = f(x, idx, w, None)
    sizes, wts = per_rank(got["group_sizes"], 2), per_rank(got["weights"], 2)
    np.testing.assert_array_equal(sizes, [[0, 1, 0, 0], [0, 1, 0, 0]])
    assert wts[0, 0] == 0.75 and wts[1, 0] == 1.0 and not wts[:, 1:].any()
    assert per_rank(got["dest_row"], 2)[0, 0].tolist() == [0, -1, 0]


@pytest.mark.parametrize("a", [1, 4, 8])
@pytest.mark.parametrize("capacity", [None, 20])
def test_grouped_alignment(a, capacity):
    cfg = jaxep.EPConfig(num_experts=16, num_topk=3, hidden=128, max_tokens_per_rank=8,
                         expert_alignment=a, grouped_capacity=capacity,
                         placement="round_robin")
    dropped = 0
    for kind in ("random", "zipf", "duplicates", "one_expert"):
        ref = check_grouped(4, cfg, kind, seed=zlib.crc32(f"a/{a}/{capacity}/{kind}".encode()),
                            x_kind="f32")
        dropped += sum(r["num_dropped"] for r in ref)
    assert (dropped > 0) == (capacity is not None)


@pytest.mark.parametrize("kind", ["random", "one_expert", "zipf", "duplicates", "invalid"])
def test_grouped_overflow(kind):
    """grouped_capacity smaller than the pairs a rank receives: a prefix is admitted."""
    cfg = jaxep.EPConfig(**CFG8, grouped_capacity=13, expert_alignment=2,
                         placement="round_robin")
    ref = check_grouped(8, cfg, kind, seed=zlib.crc32(f"o/{kind}".encode()))
    assert sum(r["num_dropped"] for r in ref) > 0


@pytest.mark.parametrize("kind", ["random", "silent_rank"])
def test_grouped_fewer_tokens_than_max(kind):
    """T=4 tokens with max_tokens_per_rank=8: M uses the actual T."""
    cfg = jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=8)
    check_grouped(4, cfg, kind, seed=4, tokens=4)


@pytest.mark.parametrize("x_kind", ["fp8", "fp8_ue8m0"])
def test_grouped_fp8(x_kind):
    cfg = jaxep.EPConfig(num_experts=16, num_topk=3, hidden=640, max_tokens_per_rank=8,
                         expert_alignment=4, grouped_capacity=30)
    check_grouped(4, cfg, "duplicates", seed=7, x_kind=x_kind)


def test_grouped_zero_padding_false_on_xla_writes_zeros():
    cfg = jaxep.EPConfig(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=8,
                         expert_alignment=4)
    check_grouped(4, cfg, "random", seed=8, zero_padding=False)


def test_grouped_rule(monkeypatch):
    comm = get_comm(2, jaxep.EPConfig(num_experts=4, num_topk=2, hidden=128,
                                      max_tokens_per_rank=4))
    for op in ("dispatch_grouped", "combine_grouped"):
        assert comm.implementation(op) == "xla"
        assert set(jaxep._backends.IMPLEMENTATIONS[op]) == {"cuda", "xla"}
    # where the normal-mode kernels run, the grouped ones do, up to their local-expert limit
    fake = object.__new__(jaxep.Communicator)
    fake.__dict__.update(comm.__dict__)
    fake.backend = "cuda"
    fake._intranode = True
    monkeypatch.setattr(jaxep._cuda, "GROUPED_MAX_LOCAL_EXPERTS", 2)
    assert fake.implementation("dispatch") == "cuda"
    assert fake.implementation("dispatch_grouped") == "cuda"
    assert fake.implementation("combine_grouped") == "cuda"
    monkeypatch.setattr(jaxep._cuda, "GROUPED_MAX_LOCAL_EXPERTS", 1)  # E_l = 2 > 1
    assert fake.implementation("dispatch") == "cuda"
    assert fake.implementation("dispatch_grouped") == "xla"
    assert fake.implementation("combine_grouped") == "xla"
    fake._intranode = False
    monkeypatch.setattr(jaxep._cuda, "GROUPED_MAX_LOCAL_EXPERTS", 2)
    assert fake.implementation("dispatch_grouped") == "xla"
    assert {"dispatch_grouped", "combine_grouped"} <= set(jaxep.__all__)


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------


def grad_comm(capacity=None, alignment=1):
    return get_comm(GR, jaxep.EPConfig(num_experts=16, num_topk=3, hidden=128,
                                       max_tokens_per_rank=8, placement="round_robin",
                                       grouped_capacity=capacity, expert_alignment=alignment))


def public_loss(comm, remat=False):
    def loss(x, idx, w, y, px, pw, pout):
        g = jaxep.dispatch_grouped(comm, x, idx, w)
        out = jaxep.combine_grouped(comm, y, g.handle)
        return (jnp.sum(g.x * px) + jnp.sum(g.weights * pw) + jnp.sum(out * pout))
    return jax.checkpoint(loss) if remat else loss


@pytest.mark.parametrize("capacity,alignment", [(None, 1), (11, 4)])
def test_grouped_grads_vs_oracle(capacity, alignment):
    """Grad of x: the unweighted grouped combine of the rows' cotangents; of topk_weights: the
    rows' weight cotangents from ``weights`` and from combine_grouped's weighting; of y: the
    output cotangent dispatched along the handle times the weights."""
    comm = grad_comm(capacity, alignment)
    rng, idx, w = grad_routing(comm, 1)
    T, H = 8, 128
    M = rows_of(comm.cfg, GR, T)
    x = rng.standard_normal((GR * T, H)).astype(np.float32)
    y, px = (rng.standard_normal((GR * M, H)).astype(np.float32) for _ in range(2))
    pw = rng.standard_normal(GR * M).astype(np.float32)
    pout = rng.standard_normal((GR * T, H)).astype(np.float32)
    ref = oracle.dispatch_grouped(x, idx, w, comm.expert_rank, comm.expert_slot, GR,
                                  alignment, capacity)
    src, wts = [r["src_index"] for r in ref], [r["weights"] for r in ref]
    if capacity:
        assert sum(r["num_dropped"] for r in ref) > 0
    exp_gx = oracle.combine_grouped(list(per_rank(px, GR)), src, wts, T, weighted=False)
    exp_gy, gw_comb = oracle.combine_grouped_grads(pout, list(per_rank(y, GR)), src, wts)
    g_rows = [p + c for p, c in zip(per_rank(pw, GR), gw_comb)]
    exp_gw = oracle.grouped_weight_grad(g_rows, idx, comm.expert_rank, [r["rows"] for r in ref])
    args = (x, idx, w, y, px, pw, pout)
    for remat in (False, True):   # the same under jax.checkpoint
        gx, gw, gy = jax.jit(jax.grad(total(comm, public_loss(comm, remat)),
                                      argnums=(0, 2, 3)))(*args)
        close(gx, exp_gx)
        close(gw, exp_gw, tol=1e-4)
        close(gy, np.concatenate(exp_gy))
    # grad inside the shard_map (of the local loss: the sum over ranks by SPMD transposition)
    gx, gw, gy = ep_call(comm, jax.grad(public_loss(comm), argnums=(0, 2, 3)))(*args)
    close(gx, exp_gx)
    close(gw, exp_gw, tol=1e-4)
    close(gy, np.concatenate(exp_gy))


@pytest.mark.parametrize("capacity,alignment", [(None, 4), (13, 2)])
def test_grouped_custom_vjps_match_autodiff_of_raw_backend(capacity, alignment):
    """The custom VJPs == jax.grad through _xla.dispatch_grouped / _xla.combine_grouped."""
    comm = grad_comm(capacity, alignment)
    rng, idx, w = grad_routing(comm, 3)
    T, H = 8, 128
    M = rows_of(comm.cfg, GR, T)
    x = rng.standard_normal((GR * T, H)).astype(np.float32)
    y, px = (rng.standard_normal((GR * M, H)).astype(np.float32) for _ in range(2))
    pw = rng.standard_normal(GR * M).astype(np.float32)
    pout = rng.standard_normal((GR * T, H)).astype(np.float32)

    def raw(x, idx, w, y, px, pw, pout):
        g = _xla.dispatch_grouped(comm, x, idx, w, M)
        out = _xla.combine_grouped(comm, y, g["src_index"], T, g["weights"])
        return jnp.sum(g["x"] * px) + jnp.sum(g["weights"] * pw) + jnp.sum(out * pout)

    args = (x, idx, w, y, px, pw, pout)
    g_pub = jax.jit(jax.grad(total(comm, public_loss(comm)), argnums=(0, 2, 3)))(*args)
    g_raw = jax.jit(jax.grad(total(comm, raw), argnums=(0, 2, 3)))(*args)
    for a, b in zip(g_pub, g_raw):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_grouped_moe_layer_matches_plain_jnp():
    """dispatch_grouped -> ragged_dot -> gelu -> ragged_dot -> combine_grouped equals a dense
    plain-jnp MoE layer (``sum_k w[t,k] * expert_{e_k}(x[t])``), forward and gradients of x,
    the routing weights and the expert weights (taken under jax.checkpoint)."""
    comm = grad_comm(alignment=4)
    rng, idx, w = grad_routing(comm, 5)
    T, H, F, El = 8, 128, 32, comm.num_local_experts
    x = rng.standard_normal((GR * T, H)).astype(np.float32)
    w_in = (rng.standard_normal((GR * El, H, F)) / np.sqrt(H)).astype(np.float32)
    w_out = (rng.standard_normal((GR * El, F, H)) / np.sqrt(F)).astype(np.float32)
    pout = rng.standard_normal((GR * T, H)).astype(np.float32)

    def layer(x, idx, w, w_in, w_out):
        g = jaxep.dispatch_grouped(comm, x, idx, w)
        h = jax.nn.gelu(jax.lax.ragged_dot(g.x, w_in, g.group_sizes))
        return jaxep.combine_grouped(comm, jax.lax.ragged_dot(h, w_out, g.group_sizes),
                                     g.handle)

    def dense(x, idx, w, w_in, w_out):   # global arrays, no communication
        e = jnp.where((idx >= 0) & (idx < comm.cfg.num_experts), idx, -1)
        row = jnp.asarray(comm.expert_rank * El + comm.expert_slot)[jnp.maximum(e, 0)]
        h = jax.nn.gelu(jnp.einsum("th,tkhf->tkf", x, w_in[row]))
        y = jnp.einsum("tkf,tkfh->tkh", h, w_out[row])
        return jnp.sum(jnp.where(e[..., None] >= 0, w[..., None] * y, 0.0), axis=1)

    spec = jax.sharding.PartitionSpec("ep")
    sharded = lambda f: jax.shard_map(f, mesh=comm.mesh, in_specs=spec, out_specs=spec)  # noqa
    args = (x, idx, w, w_in, w_out)
    close(jax.jit(sharded(layer))(*args), np.asarray(dense(*args)), tol=1e-4)
    loss_ref = lambda *a: jnp.sum(dense(*a) * pout)  # noqa: E731
    exp = jax.jit(jax.grad(loss_ref, argnums=(0, 2, 3, 4)))(*args)
    f = sharded(jax.checkpoint(layer))   # remat: the backward recomputes the dispatch
    got = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * pout), argnums=(0, 2, 3, 4)))(*args)
    for a, b in zip(got, exp):
        close(a, np.asarray(b), tol=1e-4)


def test_grouped_fp8_input_gets_zero_grad():
    comm = grad_comm()
    rng, idx, w = grad_routing(comm, 4)
    x = rng.standard_normal((GR * 8, 128)).astype(np.float32)

    def loss(x, idx, w):
        g = jaxep.dispatch_grouped(comm, jaxep.quantize_fp8(x), idx, w)
        return jnp.sum(g.weights) + jnp.sum(jaxep.dequantize_fp8(*g.x))

    gx, gw = jax.jit(jax.grad(total(comm, loss), argnums=(0, 2)))(x, idx, w)
    assert not np.any(np.asarray(gx))
    ref = oracle.dispatch_grouped(x, idx, w, comm.expert_rank, comm.expert_slot, GR)
    ones = [np.ones(len(r["weights"])) for r in ref]
    close(gw, oracle.grouped_weight_grad(ones, idx, comm.expert_rank, [r["rows"] for r in ref]))


# ------------------------------------------------------------------------------------------
# trace-time errors
# ------------------------------------------------------------------------------------------

ECFG = dict(num_experts=8, num_topk=2, hidden=128, max_tokens_per_rank=4)


@pytest.mark.parametrize("field,value,exc,match", [
    ("grouped_capacity", 0, ValueError, "grouped_capacity must be positive"),
    ("grouped_capacity", 2.5, TypeError, "grouped_capacity must be an int"),
    ("expert_alignment", 0, ValueError, "expert_alignment must be positive"),
    ("expert_alignment", True, TypeError, "expert_alignment must be an int"),
    ("expert_alignment", None, TypeError, "expert_alignment must be an int"),
])
def test_config_errors(field, value, exc, match):
    with pytest.raises(exc, match=match):
        jaxep.EPConfig(**ECFG, **{field: value})


def _trace(comm, f, *args):
    return jax.eval_shape(jax.shard_map(f, mesh=comm.mesh, in_specs=jax.sharding.PartitionSpec(
        "ep"), out_specs=jax.sharding.PartitionSpec("ep")), *args)


S = jax.ShapeDtypeStruct
X, IDX, W = S((8, 128), jnp.float32), S((8, 2), jnp.int32), S((8, 2), jnp.float32)


@pytest.mark.parametrize("args,exc,match", [
    ((S((8, 64), jnp.float32), IDX, W), ValueError, r"x.shape\[-1\] \(EPConfig.hidden\)"),
    ((S((8, 128), jnp.int32), IDX, W), TypeError, "x must have dtype"),
    ((S((8,), jnp.float32), IDX, W), ValueError, "x must have rank 2"),
    ((S((16, 128), jnp.float32), S((16, 2), jnp.int32), S((16, 2), jnp.float32)), ValueError,
     "exceed EPConfig.max_tokens_per_rank"),
    ((X, S((8, 3), jnp.int32), W), ValueError, "num_topk"),
    ((X, S((8, 2), jnp.float32), W), TypeError, "topk_idx must be an integer"),
    ((X, IDX, S((8, 3), jnp.float32)), ValueError, "topk_weights shape"),
    ((X, IDX, S((8, 2), jnp.int32)), TypeError, "topk_weights must be floating"),
])
def test_dispatch_grouped_errors(args, exc, match):
    comm = get_comm(2, jaxep.EPConfig(**ECFG))
    with pytest.raises(exc, match=match):
        _trace(comm, lambda x, i, w: jaxep.dispatch_grouped(comm, x, i, w).x, *args)


def test_dispatch_grouped_option_and_context_errors():
    comm = get_comm(2, jaxep.EPConfig(**ECFG))
    with pytest.raises(TypeError, match="zero_padding must be True or False"):
        _trace(comm, lambda x, i, w: jaxep.dispatch_grouped(comm, x, i, w,
                                                            zero_padding=None).x, X, IDX, W)
    with pytest.raises(ValueError, match="must be called inside jax.shard_map"):
        jax.eval_shape(lambda x, i, w: jaxep.dispatch_grouped(comm, x, i, w).x, X, IDX, W)
    with pytest.raises(TypeError, match="first argument must be a jaxep.Communicator"):
        _trace(comm, lambda x, i, w: jaxep.dispatch_grouped(comm.cfg, x, i, w).x, X, IDX, W)


def test_combine_grouped_errors():
    comm = get_comm(2, jaxep.EPConfig(**ECFG))
    other = get_comm(2, jaxep.EPConfig(**dict(ECFG, grouped_capacity=5)))
    M = rows_of(comm.cfg, 2, 4)

    def run(y_shape=(2 * M, 128), y_dtype=jnp.float32, handle_of=None, weighted=True,
            use=lambda g: g.handle):
        def f(x, i, w, y):
            g = jaxep.dispatch_grouped(handle_of or comm, x, i, w)
            return jaxep.combine_grouped(comm, y, use(g), weighted=weighted)
        return _trace(comm, f, X, IDX, W, S(y_shape, y_dtype))

    run()   # fine
    with pytest.raises(ValueError, match=r"y.shape\[0\] \(rows of the grouped dispatch, M\)"):
        run(y_shape=(2 * (M + 1), 128))
    with pytest.raises(ValueError, match=r"y.shape\[-1\]"):
        run(y_shape=(2 * M, 256))
    with pytest.raises(TypeError, match="y must have dtype"):
        run(y_dtype=jnp.int32)
    with pytest.raises(TypeError, match="weighted must be True or False"):
        run(weighted="yes")
    with pytest.raises(TypeError, match="handle must be a GroupedHandle"):
        run(use=lambda g: jaxep.DispatchHandle(g.handle.src_index, g.handle.dest_row))
    with pytest.raises(ValueError, match="does not belong to this Communicator"):
        run(handle_of=other, y_shape=(2 * 5, 128))
