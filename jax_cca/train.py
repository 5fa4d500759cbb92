"""Fine-tuning CCALlama: the optimizer, the loss, the compiled train step and its sharding.

    trainer = Trainer(model.config, TrainConfig(learning_rate=1e-4, total_steps=1000))
    state = trainer.init_state(model)            # float32 master weights + AdamW state, sharded
    state, metrics = trainer.step(state, batch)  # batch: numpy inputs/targets/mask (B, T)
    model = trainer.export_model(state)          # a CCALlama holding the trained weights

What one step does (``Trainer.step``, one jit-compiled function):

* The batch (``accum_steps * micro_batch`` sequences) is split into ``accum_steps`` micro-batches
  that run one after the other (``lax.scan``). Each adds the gradient of its *summed* masked
  token loss to a float32 accumulator; the sum is divided once by the number of counted tokens
  of the whole batch. So accumulation gives the gradient of one big batch, also when the
  micro-batches hold different numbers of unmasked tokens (averaging per-micro-batch means, as
  ``optax.MultiSteps`` does, would not).
* Trainable parameters are kept in float32 (master copy; AdamW moments are float32 too). The
  forward runs in ``compute_dtype`` (bfloat16 by default): the weights are cast inside the
  differentiated function, so gradients arrive in float32. Frozen parameters keep the model's
  dtype (so they come back bit for bit), are not differentiated and have no optimizer state.
* ``remat=True`` recomputes each decoder layer in the backward pass (``CCALlama.hidden_states``),
  and the LM head + cross entropy run in chunks of ``loss_chunk`` positions, each recomputed in
  the backward, so the (B, T, vocab) logits never exist at once.
* AdamW (optax) with linear warmup then cosine decay to ``min_lr_ratio * learning_rate``;
  gradients clipped to a global norm; weight decay on matrices only (not norms or biases).

Sharding: a ``jax.sharding.Mesh`` with axes ("data", "fsdp", "tensor") (``make_mesh``). Every
parameter and its optimizer moments are sharded over "fsdp" along their largest divisible
dimension (and, with a tensor axis, Megatron-style over "tensor"); the batch is split over
("data", "fsdp"). XLA's SPMD partitioner inserts the all-gathers and reduce-scatters; the result
is the single-device step's (tested with 8 forced CPU devices, ``bench/fsdp_check.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from jax_cca.config import DTYPES, CCAConfig
from jax_cca.model import CCALlama

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallelism too
# Parameter groups for ``TrainConfig.trainable``: a parameter belongs to the first group whose
# module name appears in its path.
PARAM_GROUPS = {
    "attention": ("self_attn",),
    "mlp": ("mlp",),
    "norms": ("input_layernorm", "post_attention_layernorm", "norm"),
    "embeddings": ("embed_tokens",),
    "head": ("lm_head",),
}
# With a tensor axis: projections split along their output (column-parallel) or input
# (row-parallel) features, as in Megatron-LM; embeddings and the head along the vocabulary.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj",
                   "gate_up_proj", "lm_head")
ROW_PARALLEL = ("o_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of fine-tuning. ``trainable``: "all", or parameter groups joined by
    commas, e.g. "attention" or "attention,norms" (groups: attention, mlp, norms, embeddings,
    head). ``accum_steps`` micro-batches make one optimizer step."""

    learning_rate: float = 2e-5
    warmup_steps: int = 20
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    accum_steps: int = 1
    compute_dtype: str = "bfloat16"
    remat: bool = True
    trainable: str = "all"
    loss_chunk: int = 4096

    def __post_init__(self):
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}; "
                             f"got {self.compute_dtype!r}")
        for name in ("total_steps", "accum_steps", "loss_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None; got {self.clip_norm}")
        trainable_groups(self.trainable)  # validates the names

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def trainable_groups(spec: str) -> tuple[str, ...]:
    """The parameter groups named by ``TrainConfig.trainable``."""
    if spec == "all":
        return tuple(PARAM_GROUPS)
    names = tuple(part.strip() for part in spec.replace("+", ",").split(",") if part.strip())
    unknown = [n for n in names if n not in PARAM_GROUPS]
    if not names or unknown:
        raise ValueError(f"trainable must be 'all' or a comma-separated subset of "
                         f"{list(PARAM_GROUPS)}; got {spec!r}")
    return names


def param_group(path: tuple) -> str:
    """The group ("attention", "mlp", ...) of the parameter at ``path`` (nnx state path)."""
    names = {str(p) for p in path}
    for group, modules in PARAM_GROUPS.items():
        if names.intersection(modules):
            return group
    raise ValueError(f"parameter {'/'.join(map(str, path))} belongs to no group of "
                     f"{list(PARAM_GROUPS)}")


def _trainable_filter(groups: tuple[str, ...]) -> Callable:
    def is_trainable(path, value) -> bool:
        return isinstance(value, nnx.Param) and param_group(path) in groups

    return is_trainable


# ------------------------------------------------------------------------------ schedule, loss
def learning_rate_schedule(config: TrainConfig) -> Callable[[Any], Any]:
    """Step s (0-based) -> learning rate: linear warmup ``lr * (s + 1) / warmup`` for the first
    ``warmup_steps`` steps (the first step already moves), then cosine decay from ``lr`` to
    ``min_lr_ratio * lr`` at ``total_steps``, constant after."""
    peak, floor = config.learning_rate, config.learning_rate * config.min_lr_ratio
    warmup, decay = config.warmup_steps, max(1, config.total_steps - config.warmup_steps)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = peak * (s + 1.0) / max(warmup, 1)
        progress = jnp.clip((s - warmup) / decay, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(s < warmup, warm, cosine)

    return schedule


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (weight decay on matrices only)."""
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                        eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask)
    if config.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)


def _cross_entropy_sum(logits, targets, mask) -> Float[Array, ""]:
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * mask)


def masked_loss_sum(
    model: CCALlama,
    h: Float[Array, "B T E"],
    targets: Int[Array, "B T"],
    mask: Float[Array, "B T"],
    chunk: int,
) -> Float[Array, ""]:
    """Sum over positions of ``mask * cross_entropy(model.logits(h), targets)``, in float32.

    Longer than ``chunk`` positions: the LM head and the loss run chunk by chunk (``lax.scan``),
    each chunk recomputed in the backward pass, so at most (B, chunk, vocab) logits are live."""
    b, t, e = h.shape
    if t <= chunk:
        return _cross_entropy_sum(model.logits(h), targets, mask)
    n = -(-t // chunk)
    pad = n * chunk - t
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, e).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    mask = jnp.pad(mask, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(hc, tc, mc):
        return _cross_entropy_sum(model.logits(hc), tc, mc)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, mask))
    return total


# ------------------------------------------------------------------------------ mesh, sharding
def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Multi-host: joins this process to the others (``jax.distributed.initialize``). Call it
    before anything touches the devices. With no arguments the cluster is detected from the
    environment (SLURM, Open MPI, Kubernetes, Cloud TPU)."""
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                    num_processes=num_processes,
                                    process_id=process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)


def make_mesh(data: int = 1, fsdp: int | None = None, tensor: int = 1,
              devices: list | None = None) -> Mesh:
    """A device mesh with axes ("data", "fsdp", "tensor"). ``fsdp=None`` takes every device
    left over by ``data * tensor``. Uses the first ``data * fsdp * tensor`` devices (all
    processes' devices in multi-host runs, process by process, so an fsdp group of at most
    ``jax.local_device_count()`` devices stays inside one host)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, value in (("data", data), ("tensor", tensor)):
        if value < 1:
            raise ValueError(f"mesh axis {name} must be >= 1; got {value}")
    if fsdp is None:
        if len(devices) % (data * tensor):
            raise ValueError(f"{len(devices)} devices do not split into data={data} x "
                             f"tensor={tensor}")
        fsdp = len(devices) // (data * tensor)
    if fsdp < 1 or data * fsdp * tensor > len(devices):
        raise ValueError(f"a mesh of data={data} x fsdp={fsdp} x tensor={tensor} needs "
                         f"{data * fsdp * tensor} devices; {len(devices)} available")
    grid = np.asarray(devices[: data * fsdp * tensor], dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES)


def param_partition_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Where a parameter (or an optimizer moment of it) lives on ``mesh``.

    With a tensor axis, matrices split Megatron-style (column-parallel projections along their
    output features, row-parallel ones along their input features, embeddings along the
    vocabulary) when that dimension divides. Then the largest remaining dimension divisible by
    the fsdp axis is split over "fsdp" (FSDP / ZeRO-3). Anything else is replicated."""
    spec: list = [None] * len(shape)
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    names = {str(p) for p in path}
    if tensor > 1 and len(shape) == 2:
        dim = None
        if names.intersection(COLUMN_PARALLEL):
            dim = 1
        elif names.intersection(ROW_PARALLEL):
            dim = 0
        elif "embed_tokens" in names:
            dim = 0
        if dim is not None and shape[dim] % tensor == 0:
            spec[dim] = "tensor"
    if fsdp > 1:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], -d))] = "fsdp"
    return P(*spec)


def _tree_shardings(tree, mesh: Mesh):
    def one(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        return NamedSharding(mesh, param_partition_spec(keys, tuple(leaf.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same host value on every process) as a global array with ``sharding``."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _to_host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """Compiles and runs train steps for one model architecture on one mesh.

    The train state is a dict pytree: ``step`` (int32), ``params`` (trainable parameters,
    float32, nested dict as ``nnx.to_pure_dict``), ``frozen`` (the other parameters, in the
    model's dtype), ``opt_state`` (optax state of the trainable parameters).
    ``abstract_state()`` gives its shapes, dtypes and shardings (the restore target of
    ``checkpoints.train_state``).
    """

    def __init__(self, model_config: CCAConfig, config: TrainConfig, mesh: Mesh | None = None,
                 *, donate: bool | None = None):
        self.model_config = model_config
        self.config = config
        self.mesh = mesh if mesh is not None else make_mesh(1, 1, 1, jax.devices()[:1])
        self.compute_dtype = DTYPES[config.compute_dtype]
        self._filter = _trainable_filter(trainable_groups(config.trainable))
        abstract = CCALlama.abstract(model_config)
        _, trainable, frozen = nnx.split(abstract, self._filter, ...)
        if not jax.tree.leaves(trainable):
            raise ValueError(f"trainable={config.trainable!r} selects no parameter")
        compute_model = CCALlama.abstract(model_config.replace(dtype=config.compute_dtype))
        self._graphdef = nnx.split(compute_model, self._filter, ...)[0]
        self.optimizer = make_optimizer(config)
        self.schedule = learning_rate_schedule(config)

        def shape(x, dtype):
            return jax.ShapeDtypeStruct(x.shape, dtype)

        params = jax.tree.map(lambda x: shape(x, jnp.float32), nnx.to_pure_dict(trainable))
        frozen = jax.tree.map(lambda x: shape(x, x.dtype), nnx.to_pure_dict(frozen))
        opt_state = jax.eval_shape(self.optimizer.init, params)
        replicated = NamedSharding(self.mesh, P())
        param_shardings = _tree_shardings(params, self.mesh)
        self.shardings = {
            "step": replicated,
            "params": param_shardings,
            "frozen": _tree_shardings(frozen, self.mesh),
            "opt_state": optax.tree_map_params(
                self.optimizer, lambda _, sharding: sharding, opt_state, param_shardings,
                transform_non_params=lambda _: replicated),
        }
        self._shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                        "frozen": frozen, "opt_state": opt_state}
        self.batch_sharding = NamedSharding(self.mesh, P(None, BATCH_AXES))
        # Donating the state lets XLA update it in place (half the memory). Not on CPU: there
        # orbax's host copy of an array being saved in the background can be the device buffer.
        if donate is None:
            donate = jax.default_backend() != "cpu"
        self._step = jax.jit(self._train_step, in_shardings=(self.shardings, self.batch_sharding),
                             out_shardings=(self.shardings, replicated),
                             donate_argnums=(0,) if donate else ())

    # -------------------------------------------------------------- state
    def abstract_state(self) -> dict:
        """ShapeDtypeStructs (with their shardings) of the train state."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self._shapes, self.shardings)

    def init_state(self, model: CCALlama) -> dict:
        """Step 0: ``model``'s weights (trainable ones as float32 masters), fresh AdamW state,
        all placed on the mesh."""
        if model.config != self.model_config:
            raise ValueError("the model's config differs from the trainer's model_config")
        _, trainable, frozen = nnx.split(model, self._filter, ...)

        def place_one(x, sharding, dtype):
            x = put_global(x, sharding)
            # Always a new buffer: the step may donate the state, and the model keeps its own.
            return x.astype(dtype) if x.dtype != dtype else jnp.copy(x)

        def place(tree, shardings, dtype):
            return jax.tree.map(lambda x, s: place_one(x, s, dtype), tree, shardings)

        params = place(nnx.to_pure_dict(trainable), self.shardings["params"], jnp.float32)
        frozen = place(nnx.to_pure_dict(frozen), self.shardings["frozen"],
                       self.model_config.jnp_dtype)
        opt_state = jax.jit(self.optimizer.init,
                            out_shardings=self.shardings["opt_state"])(params)
        step = put_global(np.zeros((), np.int32), self.shardings["step"])
        return {"step": step, "params": params, "frozen": frozen, "opt_state": opt_state}

    def export_model(self, state: dict, dtype: str | None = None) -> CCALlama:
        """A CCALlama (host-gathered weights in ``dtype``, default the model config's) holding
        the state's parameters."""
        config = self.model_config.replace(dtype=dtype or self.model_config.dtype)
        graphdef = nnx.split(CCALlama.abstract(config), self._filter, ...)[0]

        def convert(tree):
            return jax.tree.map(lambda x: jnp.asarray(_to_host(x).astype(config.jnp_dtype)), tree)

        return nnx.merge(graphdef, convert(state["params"]), convert(state["frozen"]))

    # -------------------------------------------------------------- step
    def put_batch(self, batch: dict) -> dict:
        """Numpy ``inputs``, ``targets`` (int) and ``mask`` (float) of shape
        (accum_steps * micro_batch, T) -> global arrays (accum_steps, micro_batch, T) split over
        the batch axes."""
        accum = self.config.accum_steps
        n, t = batch["inputs"].shape
        split = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if n % accum or (n // accum) % split:
            raise ValueError(f"a batch of {n} sequences does not split into accum_steps="
                             f"{accum} micro-batches divisible by data x fsdp = {split}")
        dtypes = {"inputs": np.int32, "targets": np.int32, "mask": np.float32}
        return {name: put_global(np.asarray(batch[name], dtype).reshape(accum, n // accum, t),
                                 self.batch_sharding) for name, dtype in dtypes.items()}

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step on a numpy batch (see ``put_batch``) or an already placed one.
        Returns (new state, metrics): loss (mean over counted tokens), grad_norm (before
        clipping), learning_rate (of this step), tokens (counted tokens)."""
        if isinstance(batch["inputs"], np.ndarray):
            batch = self.put_batch(batch)
        return self._step(state, batch)

    def loss_and_grads(self, state: dict, batch: dict):
        """(summed loss, counted tokens, summed gradients) of one micro-batch (B, T) without an
        update: for tests and diagnostics."""
        (loss, count), grads = jax.value_and_grad(self._loss_sum, has_aux=True)(
            state["params"], state["frozen"],
            {k: jnp.asarray(v) for k, v in batch.items()})
        return loss, count, grads

    def _loss_sum(self, params, frozen, batch):
        def cast(tree):
            return jax.tree.map(lambda x: x.astype(self.compute_dtype), tree)

        model = nnx.merge(self._graphdef, cast(params), cast(frozen))
        h = model.hidden_states(batch["inputs"], remat=self.config.remat)
        mask = batch["mask"].astype(jnp.float32)
        loss = masked_loss_sum(model, h, batch["targets"], mask, self.config.loss_chunk)
        return loss, jnp.sum(mask)

    def _train_step(self, state, batch):
        params, frozen = state["params"], state["frozen"]
        grad_fn = jax.value_and_grad(self._loss_sum, has_aux=True)
        if self.config.accum_steps == 1:
            (loss, count), grads = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch))
        else:
            def micro_step(carry, micro_batch):
                grads_sum, loss_sum, count_sum = carry
                (loss, count), grads = grad_fn(params, frozen, micro_batch)
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                return (grads_sum, loss_sum + loss, count_sum + count), None

            zero = jnp.zeros((), jnp.float32)
            init = (jax.tree.map(jnp.zeros_like, params), zero, zero)
            (grads, loss, count), _ = jax.lax.scan(micro_step, init, batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "frozen": frozen, "opt_state": opt_state}
        metrics = {"loss": loss / denom, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state["step"]), "tokens": count}
        return new_state, metrics


# ------------------------------------------------------------------------------ loop
def fit(trainer: Trainer, state: dict, dataset, *, batch_size: int, until_step: int,
        checkpointer=None, save_every: int | None = None, metadata: dict | None = None,
        on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Runs steps until ``state["step"] == until_step``; returns the state.

    Each step takes ``batch_size * accum_steps`` sequences from ``dataset`` (``next_batch``).
    ``on_step(step, metrics)`` gets host floats after every step (step counts from 1). With a
    ``checkpointer`` (``checkpoints.train_state.TrainCheckpointer``), the state is saved every
    ``save_every`` steps and at ``until_step``, with ``{"data": dataset.state_dict(),
    **metadata}`` as metadata; an interrupt (Ctrl-C) saves the last finished step first.
    """
    step = int(np.asarray(state["step"].addressable_data(0)))
    saved, data_state = step, dataset.state_dict()

    def save(at: int) -> None:
        checkpointer.save(at, state, {"data": data_state, **(metadata or {})})

    try:
        while step < until_step:
            batch = dataset.next_batch(batch_size * trainer.config.accum_steps)
            new_state, metrics = trainer.step(state, batch)
            # The data position always matches the state (also if interrupted in between).
            state, step, data_state = new_state, step + 1, dataset.state_dict()
            if on_step is not None:
                on_step(step, {k: float(v) for k, v in metrics.items()})
            if checkpointer is not None and (
                    step == until_step or (save_every and step % save_every == 0)):
                save(step)
                saved = step
    except KeyboardInterrupt:
        if checkpointer is not None and step > saved:
            save(step)
            checkpointer.wait()
        raise
    return state
