"""The suite's guard against running out of memory mappings holds (``tests/conftest.py``).

conftest clears jax's caches after each test module because every compiled CPU program keeps
memory mappings of its own, and a worker that kept them all went past ``vm.max_map_count``. This
checks the two facts that rests on, on this jax: compiling many programs adds mappings, and
``jax.clear_caches()`` gives them back once nothing else holds the programs.
"""

from __future__ import annotations

import gc
import sys

import jax
import jax.numpy as jnp
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="counts mappings in /proc/self/maps (Linux only)")

PROGRAMS = 60


def _mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_clearing_the_caches_gives_the_mappings_back():
    jax.clear_caches()
    gc.collect()
    before = _mappings()
    functions = []
    for i in range(PROGRAMS):  # distinct programs: the constant i is baked into each
        fn = jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i).sum(0) * jnp.exp(x).mean())
        fn(jnp.ones((8, 16), jnp.float32)).block_until_ready()
        functions.append(fn)  # the functions live on: only their caches are cleared
    grown = _mappings() - before
    assert grown >= 2 * PROGRAMS, f"{PROGRAMS} compiled programs added only {grown} mappings"
    jax.clear_caches()
    gc.collect()
    left = _mappings() - before
    assert left <= grown // 4, f"clear_caches left {left} of {grown} new mappings"
