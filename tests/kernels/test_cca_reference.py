"""The plain reference math itself: the chunked reference against the dense naive formulation and
against an independent float64 per-query loop; the visibility rules at every boundary row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.cca import reference as R
from kernels.cca.shapes import CPU_SHAPES, CCAShape
from tests.kernels.conftest import forward_and_vjp, make_qkv, rel_err

HP = jax.lax.Precision.HIGHEST


def python_start(t: int, g: int, w: int) -> int:
    return max(0, ((t - w + 1) // g) * g)  # Python's // floors, like the spec


def numpy_cca(q, k, v, g, w):
    """Per-query float64 loop written from SPEC.md section 1 with plain Python sets."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    grp = hq // hkv
    n = t // g
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hkv):
            kc, vc = [], []
            for j in range(n):
                qp = q[bi, (j + 1) * g - 1, h * grp:(h + 1) * grp].mean(0)
                kj, vj = k[bi, j * g:(j + 1) * g, h], v[bi, j * g:(j + 1) * g, h]
                s = kj @ qp / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                kc.append(p @ kj)
                vc.append(p @ vj)
            for i in range(t):
                start = python_start(i, g, w)
                cores = [j for j in range(n) if (j + 1) * g <= start]
                keys = [kc[j] for j in cores] + [k[bi, s, h] for s in range(start, i + 1)]
                vals = [vc[j] for j in cores] + [v[bi, s, h] for s in range(start, i + 1)]
                keys, vals = np.stack(keys), np.stack(vals)
                for hh in range(h * grp, (h + 1) * grp):
                    s = keys @ q[bi, i, hh] / np.sqrt(d)
                    p = np.exp(s - s.max())
                    out[bi, i, hh] = (p / p.sum()) @ vals
    return out


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: s.id)
def test_chunked_matches_naive_forward(shape):
    q, k, v = make_qkv(shape, seed=shape.length)
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    naive = jax.jit(lambda *a: R.cca_attention_naive(*a, **kw))(q, k, v)
    for chunk in (None, shape.group_size, 3 * shape.group_size):
        out = jax.jit(lambda *a, c=chunk: R.cca_attention(*a, chunk_size=c, **kw))(q, k, v)
        assert rel_err(out, naive) < 1e-5


@pytest.mark.parametrize("shape", [CCAShape(2, 37, 4, 2, 64, 4, 8), CCAShape(1, 41, 5, 1, 64, 8, 16)],
                         ids=lambda s: s.id)
def test_reference_matches_float64_loop(shape):
    q, k, v = make_qkv(shape, seed=7)
    out = R.cca_attention(q, k, v, group_size=shape.group_size, local_window=shape.local_window)
    ref = numpy_cca(q, k, v, shape.group_size, shape.local_window)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("shape", CPU_SHAPES[:5], ids=lambda s: s.id)
def test_chunked_matches_naive_gradients(shape):
    q, k, v = make_qkv(shape, seed=shape.length + 1)
    kw = dict(group_size=shape.group_size, local_window=shape.local_window)
    cot = jax.random.normal(jax.random.PRNGKey(3), q.shape)
    got = forward_and_vjp(lambda *a: R.cca_attention(*a, chunk_size=2 * shape.group_size, **kw),
                          q, k, v, cot)
    want = forward_and_vjp(lambda *a: R.cca_attention_naive(*a, **kw), q, k, v, cot)
    for name, x, y in zip("out dq dk dv".split(), got, want):
        assert rel_err(x, y) < 1e-5, name


def test_pooling_gradient_reaches_last_token_query():
    """dq of a group's last token includes the path through the pooling weights."""
    shape = CCAShape(1, 48, 2, 1, 64, 8, 8)
    q, k, v = make_qkv(shape, seed=11)
    f = lambda q_: R.cca_attention(q_, k, v, group_size=8, local_window=8)[0, 40:].sum()
    dq = jax.jit(jax.grad(f))(q)
    # Rows 40..47 see core tokens of groups 0..3, whose weights depend on q[7], q[15], q[23], q[31].
    for t in (7, 15, 23, 31):
        assert float(jnp.abs(dq[0, t]).max()) > 0
    assert float(jnp.abs(dq[0, 8:15]).max()) == 0  # non-last tokens of group 1: no path


@pytest.mark.parametrize("g,w", [(1, 1), (4, 8), (8, 16), (16, 64), (16, 1024), (64, 64)])
def test_visibility_partitions_the_prefix(g, w):
    """Every earlier token is reachable exactly once: raw, or through its group's core token;
    rows w..w+g-2 (where a truncating division goes wrong) included."""
    t = np.arange(3 * w + 2 * g + 5)
    start = np.asarray(R.local_window_start(jnp.asarray(t), g, w))
    assert (start == [python_start(int(i), g, w) for i in t]).all()
    for i in list(range(w - 1, w + g + 1)) + [0, len(t) - 1]:
        raw = set(range(start[i], i + 1))
        cores = [j for j in range(i // g + 1)
                 if bool(R.core_visible(jnp.int32(i), jnp.int32(j), g, w))]
        via_core = {s for j in cores for s in range(j * g, (j + 1) * g)}
        assert not raw & via_core, f"row {i}: counted twice"
        assert raw | via_core == set(range(i + 1)), f"row {i}: something unreachable"
        assert w <= len(raw) <= w + g - 1 or start[i] == 0


def test_window_covering_everything_equals_full_attention():
    shape = CCAShape(2, 61, 8, 2, 64, 16, 48)  # T < w + g, so start(t) = 0 for every row
    q, k, v = make_qkv(shape, seed=5)
    out = R.cca_attention(q, k, v, group_size=16, local_window=48)
    assert rel_err(out, R.full_attention_naive(q, k, v)) < 1e-5


@pytest.mark.parametrize("shape", CPU_SHAPES[:3], ids=lambda s: s.id)
def test_full_attention_chunked_matches_naive(shape):
    q, k, v = make_qkv(shape, seed=2)
    chunked = jax.jit(lambda *a: R.full_attention(*a, chunk_size=16))(q, k, v)
    assert rel_err(chunked, jax.jit(R.full_attention_naive)(q, k, v)) < 1e-5
    q32 = q.astype(jnp.float32)
    ref = jax.nn.dot_product_attention(q32, k, v, is_causal=True, implementation="xla")
    assert rel_err(jax.jit(R.full_attention)(q, k, v), ref) < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_ablation_poolings(pooling):
    shape = CCAShape(2, 70, 4, 2, 64, 8, 16)
    q, k, v = make_qkv(shape, seed=9)
    kc, vc = R.pool_core_tokens(q, k, v, group_size=8, pooling=pooling)
    reduce = np.mean if pooling == "mean" else np.max
    want = reduce(np.asarray(k)[:, :64].reshape(2, 8, 8, 2, 64), axis=2)
    assert rel_err(kc, want) < 1e-6
    kw = dict(group_size=8, local_window=16, pooling=pooling)
    got = jax.jit(lambda *a: R.cca_attention(*a, **kw))(q, k, v)
    assert rel_err(got, jax.jit(lambda *a: R.cca_attention_naive(*a, **kw))(q, k, v)) < 1e-5


def test_gqa_pools_with_the_mean_query_of_the_sharing_heads():
    shape = CCAShape(1, 32, 4, 1, 64, 8, 8)
    q, k, v = make_qkv(shape, seed=4)
    kc, _ = R.pool_core_tokens(q, k, v, group_size=8)
    q_mean = jnp.broadcast_to(q.mean(axis=2, keepdims=True), q.shape[:2] + (1, 64))
    kc_mha, _ = R.pool_core_tokens(q_mean, k, v, group_size=8)
    assert rel_err(kc, kc_mha) < 1e-6


def test_bf16_close_to_float32():
    shape = CCAShape(2, 111, 4, 2, 64, 8, 32)
    q, k, v = make_qkv(shape, seed=13)
    kw = dict(group_size=8, local_window=32)
    out = R.cca_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), **kw)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, R.cca_attention(q, k, v, **kw)) < 2e-2


def _temp_bytes(fn, t):
    q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
    return jax.jit(fn).lower(q, k, k).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True])
def test_memory_grows_linearly(grad):
    kw = dict(group_size=16, local_window=64)
    fwd = lambda q, k, v: R.cca_attention(q, k, v, **kw)
    fn = jax.grad(lambda *a: fwd(*a).sum(), argnums=(0, 1, 2)) if grad else fwd
    small, large = _temp_bytes(fn, 1024), _temp_bytes(fn, 4096)
    assert large <= 4.5 * small, (small, large)
    naive = lambda q, k, v: R.cca_attention_naive(q, k, v, **kw)
    assert _temp_bytes(naive, 4096) > 10 * _temp_bytes(naive, 1024)  # the measure can fail


def test_visible_key_counts():
    core, raw = R.visible_key_counts(100, 8, 16)
    t = np.arange(100)
    start = np.maximum(0, ((t - 16 + 1) // 8) * 8)
    assert core == int((start // 8).sum()) and raw == int((t - start + 1).sum())
