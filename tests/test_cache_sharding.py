"""A decode cache sharded over devices (batch and kv heads) gives the single-device results:
prefill + cached decode steps of a tiny model, in a subprocess with 8 forced CPU devices (XLA
reads the device count once, at start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from jax_cca import CCAConfig, CCALlama
from jax_cca.cache import cache_shardings, shard_cache

attention = sys.argv[1]
config = CCAConfig.tiny().replace(attention=attention, group_size=4, local_window=8,
                                  dtype="float32", num_layers=2)
model = CCALlama.from_config(config, seed=3)
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "heads"))
ids = jax.random.randint(jax.random.PRNGKey(0), (4, 21), 1, config.vocab_size)
lengths = jnp.array([21, 17, 9, 14], jnp.int32)

def run(shard):
    cache = model.init_cache(batch=4, max_len=40)
    if shard:
        cache = shard_cache(cache, mesh, "data", "heads")
    logits, cache = model.prefill(ids, lengths, cache)
    steps = [np.asarray(logits)]
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    for _ in range(6):
        logits, cache = model.decode_step(token, cache)
        steps.append(np.asarray(logits))
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    wanted = jax.tree.leaves(cache_shardings(cache, mesh, "data", "heads"))
    kept = all(leaf.sharding.is_equivalent_to(w, leaf.ndim)
               for leaf, w in zip(jax.tree.leaves(cache), wanted))
    return np.stack(steps), kept

want, _ = run(False)
got, kept = run(True)
err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
bad = None
try:
    cache_shardings(model.init_cache(batch=3, max_len=40), mesh, "data")
except ValueError as e:
    bad = str(e)
print(json.dumps({"devices": len(jax.devices()), "rel_err": err, "kept": kept, "bad": bad}))
"""


@pytest.mark.parametrize("attention", ["cca", "full"])
def test_sharded_cache_decodes_like_one_device(attention):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", CHILD, attention], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    assert out["rel_err"] < 1e-5, out
    # The cache stayed split over both axes through prefill and the decode steps.
    assert out["kept"]
    assert "cannot split batch = 3" in out["bad"]
