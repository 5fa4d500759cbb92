"""A one-token decode step of the separate parameter layout keeps its q, k and v projections
out of the kernel that concatenates them for the RoPE + cache-write kernel.

XLA on the GPU had fused the batch-1 k projection (a matrix-vector product rewritten as a
multiply and a reduce) into that concatenation, where it ran about 200 times slower than in a
kernel of its own: +52% on a 1B model's 1M-token decode step with full attention
(``docs/perf-notes.md``, seventeenth session). ``CCALlama``'s attention now passes the three
through an optimization barrier. On the CPU: the step's program holds the barrier, right
before the concatenation. On a GPU: no fusion of the compiled step whose root is a concatenate
reduces anything.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jax_cca import CCALlama, CCAConfig
from jax_cca.cache import init_cache

needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu",
                               reason="needs a CUDA GPU (XLA's GPU fusions; runs on the device "
                                      "machine)")


def _step(config: CCAConfig, max_len: int):
    """The jitted one-token decode step and its arguments (a cache holding max_len // 2)."""
    model = CCALlama.from_config(config, seed=0)
    graphdef, state = nnx.split(model)
    cache = tuple(c.replace(lengths=jnp.full((1,), max_len // 2, jnp.int32))
                  for c in init_cache(config, 1, max_len))

    def run(state, tokens, cache):
        return nnx.merge(graphdef, state).cached_forward(
            tokens[:, None], jnp.ones((1,), jnp.int32), cache, prefill=False)

    return jax.jit(run), (state, jnp.zeros((1,), jnp.int32), cache)


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs in its equations' parameters (jit, scan...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("attention", ["full", "cca"])
def test_projections_reach_the_concatenation_through_a_barrier(attention):
    config = CCAConfig.tiny(attention=attention, hidden_size=128, num_heads=4, num_kv_heads=2,
                            intermediate_size=96, num_layers=1, group_size=4, local_window=8,
                            implementation="pallas", dtype="bfloat16")
    step, args = _step(config, 64)
    eqns = list(_equations(jax.make_jaxpr(step)(*args).jaxpr))
    barriers = [e for e in eqns if e.primitive.name == "optimization_barrier"]
    assert barriers, "the decode step lost the projections' barrier"
    # The concatenation of the step's q, k, v heads takes exactly the barrier's three outputs.
    takes = [e for e in eqns if e.primitive.name == "concatenate"
             and any(list(e.invars) == list(b.outvars) for b in barriers)]
    assert len(takes) == 1, [str(e) for e in eqns if e.primitive.name == "concatenate"]
    assert [v.aval.shape for v in takes[0].invars] == [(1, 1, 4, 32), (1, 1, 2, 32),
                                                       (1, 1, 2, 32)]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["full", "cca"])
def test_no_concatenate_fusion_reduces_on_the_gpu(attention):
    """1B-class shapes (hidden 2048, 32 / 8 heads of 64), one layer, bf16, separate layout."""
    config = CCAConfig.tiny(attention=attention, hidden_size=2048, num_heads=32, num_kv_heads=8,
                            intermediate_size=8192, num_layers=1, vocab_size=1024,
                            group_size=16, local_window=1024, dtype="bfloat16",
                            max_position_embeddings=16384)
    step, args = _step(config, 16384)
    text = step.lower(*args).compile().as_text()
    computations = re.split(r"\n(?=\S)", text)  # one block per computation
    bad = [c.splitlines()[0] for c in computations
           if re.search(r"ROOT \S+ = \S+ concatenate\(", c) and re.search(r" reduce\(", c)]
    assert not bad, bad
