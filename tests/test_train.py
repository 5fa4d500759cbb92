"""jax_cca.train and checkpoints.train_state: the schedule, the loss and its masking, exact
gradient accumulation, freezing, bf16 compute over float32 masters, remat, learning on the
synthetic data, bit-exact resume, keep-N, damaged and half-written checkpoints, and the sharded
step against the single-device one (8 forced CPU devices, in a subprocess)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints import CheckpointError
from checkpoints.train_state import TrainCheckpointer
from jax_cca import CCAConfig, CCALlama
from jax_cca.data import SyntheticRetrieval
from jax_cca.train import (
    TrainConfig,
    Trainer,
    fit,
    learning_rate_schedule,
    make_mesh,
    param_partition_spec,
    trainable_groups,
)

REPO = Path(__file__).resolve().parents[1]
# T = 40 is not a multiple of g = 4 and longer than w + g, so CCA pools core tokens.
SMALL = CCAConfig.tiny(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=4, num_kv_heads=2, attention="cca", group_size=4,
                       local_window=16)
T = 40
# Orbax leaves read coroutines of a damaged checkpoint to fail after the CheckpointError.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def fp32(**changes) -> TrainConfig:
    base = dict(learning_rate=1e-3, warmup_steps=0, total_steps=100, compute_dtype="float32",
                weight_decay=0.1)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def model() -> CCALlama:
    return CCALlama.from_config(SMALL, seed=0)


def random_batch(n: int, seed: int) -> dict:
    """Random tokens; masks with very different counts per row (one row almost empty)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SMALL.vocab_size, (n, T + 1))
    mask = (rng.random((n, T)) < rng.uniform(0.2, 1.0, (n, 1))).astype(np.float32)
    mask[0] = 0.0
    mask[0, 3] = 1.0
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": mask}


def flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


def leaves_by_path(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def model_params(model) -> dict[str, np.ndarray]:
    return leaves_by_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------------ schedule, config
def test_schedule_warms_up_linearly_then_cosine_decays():
    schedule = learning_rate_schedule(TrainConfig(learning_rate=1e-3, warmup_steps=4,
                                                  total_steps=14, min_lr_ratio=0.1))
    got = np.array([float(schedule(s)) for s in range(20)])
    want = [1e-3 * (s + 1) / 4 for s in range(4)]
    want += [1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * min(s - 4, 10) / 10))
             for s in range(4, 20)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] > 0  # the first step already moves
    no_warmup = learning_rate_schedule(TrainConfig(learning_rate=2e-3, warmup_steps=0,
                                                   total_steps=10, min_lr_ratio=0.0))
    np.testing.assert_allclose([float(no_warmup(s)) for s in (0, 5, 10, 11)],
                               [2e-3, 1e-3, 0.0, 0.0], atol=1e-9)


def test_config_validation():
    assert trainable_groups("all") == ("attention", "mlp", "norms", "embeddings", "head")
    assert trainable_groups("attention, norms") == ("attention", "norms")
    for bad in ("", "attn", "attention,everything"):
        with pytest.raises(ValueError, match="trainable"):
            TrainConfig(trainable=bad)
    with pytest.raises(ValueError, match="compute_dtype"):
        TrainConfig(compute_dtype="int8")
    with pytest.raises(ValueError, match="accum_steps"):
        TrainConfig(accum_steps=0)
    with pytest.raises(ValueError, match="clip_norm"):
        TrainConfig(clip_norm=0.0)


# ------------------------------------------------------------------------------ loss, accumulation
def test_loss_is_the_masked_token_mean_and_ignores_masked_targets(model):
    trainer = Trainer(SMALL, fp32(loss_chunk=7))  # chunked: 6 chunks, the last one partial
    state = trainer.init_state(model)
    batch = random_batch(3, seed=1)
    loss_and_grads = jax.jit(trainer.loss_and_grads)
    loss, count, grads = loss_and_grads(state, batch)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
    logits = np.asarray(forward(params, jnp.asarray(batch["inputs"])), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    assert float(count) == batch["mask"].sum()
    np.testing.assert_allclose(float(loss), (ce * batch["mask"]).sum(), rtol=1e-5)
    # Targets under mask 0 (padding, prompts) change nothing.
    other = dict(batch, targets=np.where(batch["mask"] > 0, batch["targets"],
                                         (batch["targets"] + 7) % SMALL.vocab_size))
    loss2, _, grads2 = loss_and_grads(state, other)
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(flat(grads2), flat(grads))
    # The unchunked loss is the same function.
    whole = Trainer(SMALL, fp32(loss_chunk=T))
    loss3, _, grads3 = jax.jit(whole.loss_and_grads)(state, batch)
    np.testing.assert_allclose(float(loss3), float(loss), rtol=1e-6)
    g, g3 = flat(grads), flat(grads3)
    assert np.linalg.norm(g - g3) / np.linalg.norm(g3) < 1e-6


def test_accumulation_equals_one_big_batch(model, rel_err):
    batch = random_batch(8, seed=2)
    big = Trainer(SMALL, fp32(accum_steps=1))
    accumulated = Trainer(SMALL, fp32(accum_steps=4))
    state_big, m_big = big.step(big.init_state(model), batch)
    state_acc, m_acc = accumulated.step(accumulated.init_state(model), batch)
    assert rel_err(m_acc["loss"], m_big["loss"]) < 1e-6
    assert rel_err(m_acc["grad_norm"], m_big["grad_norm"]) < 1e-6
    assert float(m_acc["tokens"]) == float(m_big["tokens"]) == batch["mask"].sum()
    assert rel_err(flat(state_acc["params"]), flat(state_big["params"])) < 1e-6
    assert rel_err(flat(state_acc["opt_state"]), flat(state_big["opt_state"])) < 1e-5
    # The test has teeth: averaging the four micro-batches' mean-loss gradients (what
    # optax.MultiSteps does with per-micro-batch mean losses) is another gradient here, since the
    # micro-batches count very different numbers of tokens.
    init = big.init_state(model)
    loss_and_grads = jax.jit(big.loss_and_grads)
    sums, counts = [], []
    for i in range(4):
        _, count, grads = loss_and_grads(init, {k: v[2 * i:2 * i + 2] for k, v in batch.items()})
        sums.append(flat(grads))
        counts.append(float(count))
    exact = sum(sums) / sum(counts)
    averaged = np.mean([g / c for g, c in zip(sums, counts)], axis=0)
    assert rel_err(averaged, exact) > 0.05


def test_batch_must_split_over_accumulation_and_devices(model):
    trainer = Trainer(SMALL, fp32(accum_steps=3))
    with pytest.raises(ValueError, match="accum_steps=3"):
        trainer.put_batch(random_batch(4, seed=0))


# ------------------------------------------------------------------------------ dtypes, freezing
def test_freezing_and_mixed_precision(model):
    trainer = Trainer(SMALL, TrainConfig(trainable="attention", compute_dtype="bfloat16",
                                         learning_rate=1e-2, warmup_steps=0))
    state = trainer.init_state(model)
    params = leaves_by_path(state["params"])
    assert len(params) == 4 * SMALL.num_layers
    assert all("self_attn" in p for p in params)
    assert all(v.dtype == np.float32 for v in params.values())
    assert all(v.dtype == np.float32 for v in leaves_by_path(state["frozen"]).values())
    # Optimizer moments exist for the trainable parameters only, in float32.
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert len(moments) == 2 * len(params)
    assert all(x.dtype == jnp.float32 for x in moments)
    # The compiled step multiplies in bf16 (q_proj: (B, T, 64) x (64, 64)).
    batch = trainer.put_batch(random_batch(2, seed=3))
    hlo = trainer._step.lower(state, batch).as_text()
    assert re.search(r"dot_general.*tensor<64x64xbf16>", hlo)
    frozen_before = leaves_by_path(state["frozen"])
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for path, value in leaves_by_path(state["frozen"]).items():
        np.testing.assert_array_equal(value, frozen_before[path], err_msg=path)
    trained = model_params(trainer.export_model(state))
    original = model_params(model)
    assert trained.keys() == original.keys()
    for path in original:
        assert trained[path].dtype == original[path].dtype
        if "self_attn" in path:
            assert not np.array_equal(trained[path], original[path]), path
        else:
            np.testing.assert_array_equal(trained[path], original[path], err_msg=path)


def _count_remat(jaxpr) -> int:
    """Rematerialised regions at the top level (the attention reference nests its own)."""
    return sum(eqn.primitive.name in ("remat2", "checkpoint", "remat") for eqn in jaxpr.eqns)


def test_remat_recomputes_each_layer_and_changes_nothing(model, rel_err):
    with_remat = Trainer(SMALL, fp32(remat=True, loss_chunk=T))
    without = Trainer(SMALL, fp32(remat=False, loss_chunk=T))
    state = with_remat.init_state(model)
    batch = {k: jnp.asarray(v) for k, v in random_batch(2, seed=4).items()}

    def loss_jaxpr(trainer):
        return jax.make_jaxpr(trainer._loss_sum)(state["params"], state["frozen"], batch).jaxpr

    assert _count_remat(loss_jaxpr(with_remat)) == SMALL.num_layers
    assert _count_remat(loss_jaxpr(without)) == 0
    results, dots = {}, {}
    for remat, trainer in ((True, with_remat), (False, without)):
        compiled = jax.jit(trainer.loss_and_grads).lower(state, batch).compile()
        dots[remat] = len(re.findall(r" dot\(", compiled.as_text()))
        results[remat] = compiled(state, batch)
    # The compiled gradient really recomputes: at least the 7 projections of every layer again.
    assert dots[True] >= dots[False] + 7 * SMALL.num_layers, dots
    (loss_r, _, grads_r), (loss_n, _, grads_n) = results[True], results[False]
    assert rel_err(loss_r, loss_n) < 1e-6
    assert rel_err(flat(grads_r), flat(grads_n)) < 1e-6


# ------------------------------------------------------------------------------ learning
def test_loss_goes_down_on_synthetic_data(model):
    trainer = Trainer(SMALL, TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=60,
                                         compute_dtype="bfloat16", accum_steps=2))
    data = SyntheticRetrieval(seq_len=T, vocab_size=SMALL.vocab_size, seed=0)
    losses = []
    fit(trainer, trainer.init_state(model), data, batch_size=4, until_step=60,
        on_step=lambda step, m: losses.append(m["loss"]))
    assert len(losses) == 60 and np.isfinite(losses).all()
    first, last = np.mean(losses[:3]), np.mean(losses[-10:])
    assert first > 4.0  # about ln(96) = 4.6: nothing known yet
    assert last < first - 1.5, (first, last)  # the answers are digits, then which digits


# ------------------------------------------------------------------------------ checkpoints
def test_resume_continues_bit_exactly(model, tmp_path):
    trainer = Trainer(SMALL, TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=6,
                                         compute_dtype="bfloat16", accum_steps=2))

    def run(until, checkpointer, state=None, data_state=None):
        data = SyntheticRetrieval(seq_len=T, vocab_size=SMALL.vocab_size, seed=7)
        if data_state is not None:
            data.load_state_dict(data_state)
        losses = {}
        state = fit(trainer, state or trainer.init_state(model), data, batch_size=2,
                    until_step=until, checkpointer=checkpointer, save_every=2,
                    metadata={"note": "test"},
                    on_step=lambda step, m: losses.__setitem__(step, m["loss"]))
        checkpointer.wait()
        return state, losses

    full_state, full = run(6, TrainCheckpointer(tmp_path / "a", keep=2))
    # The interrupted run: steps 1-3, saved at 2 and 3 (the last step of a run is saved).
    _, first = run(3, TrainCheckpointer(tmp_path / "b", keep=5))
    assert first == {s: full[s] for s in (1, 2, 3)}
    for step in (3, 2):  # from the newest checkpoint, and from an older one
        ckpt = TrainCheckpointer(tmp_path / "b", keep=5)
        assert ckpt.steps() == [2, 3]
        state, meta = ckpt.restore(trainer.abstract_state(), step=step)
        assert meta["note"] == "test" and meta["data"]["index"] == 4 * step
        assert int(state["step"]) == step
        resumed_state, resumed = run(6, TrainCheckpointer(tmp_path / f"c{step}"), state,
                                     meta["data"])
        assert resumed == {s: full[s] for s in range(step + 1, 7)}
        for a, b in zip(jax.tree.leaves(resumed_state), jax.tree.leaves(full_state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert TrainCheckpointer(tmp_path / "a").steps() == [4, 6]  # keep=2


@pytest.fixture(scope="module")
def saved_state(model, tmp_path_factory):
    trainer = Trainer(SMALL, fp32(trainable="attention,norms"))
    state = trainer.init_state(model)
    directory = tmp_path_factory.mktemp("states") / "ckpt"
    with TrainCheckpointer(directory, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, state, {"data": {"index": step}})
    return trainer, state, directory


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_restore_round_trip_and_damage(saved_state, tmp_path, model):
    trainer, state, pristine = saved_state
    directory = _copy(pristine, tmp_path / "ckpt")
    ckpt = TrainCheckpointer(directory)
    restored, meta = ckpt.restore(trainer.abstract_state())
    assert meta == {"data": {"index": 2}}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Flip bytes in the largest array file of step 2: a clear error naming the step.
    files = [p for p in (directory / "2" / "state").rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"checkpoint step 2 in {directory}"):
        ckpt.restore(trainer.abstract_state())
    ckpt.restore(trainer.abstract_state(), step=1)  # the older step is intact
    # Corrupt metadata.
    for meta_file in (directory / "1" / "meta").rglob("*"):
        if meta_file.is_file() and meta_file.name != "commit_success.txt":
            meta_file.write_text("{\"format\": \"jax-cca-tr")
    with pytest.raises(CheckpointError, match="step 1 .*corrupt"):
        ckpt.restore(trainer.abstract_state(), step=1)
    with pytest.raises(CheckpointError, match="no checkpoint step 5"):
        ckpt.restore(trainer.abstract_state(), step=5)


def test_restore_into_another_train_state_is_refused(saved_state, model, tmp_path):
    _, _, pristine = saved_state
    other = Trainer(SMALL, fp32(trainable="attention"))
    with pytest.raises(CheckpointError, match="holds a different train state"):
        TrainCheckpointer(pristine).restore(other.abstract_state())
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        TrainCheckpointer(tmp_path / "empty").restore(other.abstract_state())
    with pytest.raises(CheckpointError, match="not found"):
        TrainCheckpointer(tmp_path / "absent", create=False)


CRASH_CHILD = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    import numpy as np
    from checkpoints.train_state import TrainCheckpointer

    directory = sys.argv[1]
    state = {"w": jnp.arange(1000, dtype=jnp.float32) * 0.5, "step": jnp.int32(1)}
    ckpt = TrainCheckpointer(directory, keep=1)
    ckpt.save(1, state, {"data": {"index": 10}})
    ckpt.wait()
    real_rename = os.rename

    def rename(src, dst):  # the process dies as orbax commits step 2: its data is written
        if os.path.basename(str(dst)) == "2":
            os._exit(17)
        return real_rename(src, dst)

    os.rename = rename
    ckpt.save(2, {"w": state["w"] + 1, "step": jnp.int32(2)}, {"data": {"index": 20}})
    ckpt.wait()
    print("the save completed: the crash was not simulated")
""")


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(directory)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stdout + proc.stderr[-3000:]
    leftovers = sorted(p.name for p in directory.iterdir())
    assert "1" in leftovers and "2" not in leftovers
    assert any(name.startswith("2") and "tmp" in name for name in leftovers), leftovers
    ckpt = TrainCheckpointer(directory, keep=1)
    assert ckpt.steps() == [1]
    target = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state, meta = ckpt.restore(target)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000) * 0.5)
    assert meta == {"data": {"index": 10}}
    # Saving goes on where it stopped; keep=1 then drops step 1.
    ckpt.save(2, {"w": state["w"] + 1, "step": jnp.int32(2)}, {"data": {"index": 20}})
    ckpt.wait()
    assert ckpt.steps() == [2]
    assert not [p for p in directory.iterdir() if "tmp" in p.name]


# ------------------------------------------------------------------------------ sharding
def test_partition_rules():
    class FakeMesh:
        def __init__(self, data, fsdp, tensor):
            self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}

    def spec(path, shape, *mesh):
        return tuple(param_partition_spec(path, shape, FakeMesh(*mesh)))

    q = ("layers", 0, "self_attn", "q_proj", "kernel")
    o = ("layers", 0, "self_attn", "o_proj", "kernel")
    emb = ("embed_tokens", "embedding")
    norm = ("layers", 0, "input_layernorm", "weight")
    assert spec(q, (2048, 4096), 1, 4, 1) == (None, "fsdp")        # largest dim
    assert spec(emb, (32000, 2048), 2, 4, 1) == ("fsdp", None)
    assert spec(emb, (32001, 2048), 1, 4, 1) == (None, "fsdp")     # 32001 does not divide
    assert spec(norm, (2048,), 1, 8, 1) == ("fsdp",)
    assert spec(norm, (100,), 1, 8, 1) == (None,)                  # replicated
    assert spec(q, (2048, 4096), 1, 4, 2) == ("fsdp", "tensor")    # column-parallel
    assert spec(o, (4096, 2048), 1, 4, 2) == ("tensor", "fsdp")    # row-parallel
    assert spec(q, (2048, 4096), 1, 1, 1) == (None, None)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(2, 8, 1, devices=jax.devices()[:1] * 4)


def test_sharded_step_equals_single_device_step():
    """bench/fsdp_check.py with 8 forced CPU devices: data=2 x fsdp=4 and data=2 x fsdp=2 x
    tensor=2 against one device, two AdamW steps with accumulation and remat, float32."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "fsdp_check.py"), "--quick",
                           "--mesh", "2,4", "--mesh", "2,2,2"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert len(result["devices"]) == 8
    assert [m["mesh"] for m in result["meshes"]] == [
        {"data": 2, "fsdp": 4, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}]
    for entry in result["meshes"]:
        assert entry["loss_rel_err"] < 1e-5 and entry["params_rel_err"] < 1e-5, entry
        assert entry["split_params"] == entry["num_params"]  # every parameter is split
    assert result["reference_losses"][1] < result["reference_losses"][0]


def test_bench_train_quick(tmp_path):
    from bench import bench_train

    out = tmp_path / "train.json"
    assert bench_train.main(["--quick", "--seq-len", "64", "--steps", "1", "--layers", "1",
                             "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [v["attention"] for v in result["variants"]] == ["cca", "full"]
    for v in result["variants"]:
        assert v["finite"] and v["tokens_per_s"] > 0 and v["model_tflops_per_s"] > 0
    assert result["cca_speedup"] > 0
