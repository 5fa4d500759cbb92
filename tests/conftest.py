"""Fixtures shared by the model, bridge and checkpoint suites.

* ``rel_err(out, ref)``: ||out - ref|| / ||ref|| in float64 (SPEC.md section 4); fails on NaN/Inf
  and on shape mismatches, so a NaN can never pass a ``< tol`` comparison.
* ``make_hf_llama(**llama_config_kwargs)``: a tiny, seeded, fully random transformers
  ``LlamaForCausalLM`` in eval mode (every parameter redrawn, RMSNorm weights included, so a norm
  bug cannot hide behind HF's all-ones init), saved with ``save_pretrained`` under a fresh tmp dir.
* ``random_ids(batch, length, vocab, seed)``: fresh random token ids (never all zeros).

Matmuls run at the highest precision so float32 parity against torch means float32 arithmetic.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path


def _cpu_only() -> bool:
    """No CUDA plugin of jax installed: this process (and every one it starts) runs on CPU."""
    return all(importlib.util.find_spec(f"jax_cuda{v}_plugin") is None for v in (12, 13))


# The suite compiles hundreds of small programs. On CPU, XLA's LLVM optimisation of each costs more
# than it saves at these sizes: test_cache.py 145 s -> 101 s without it, the whole suite (where the
# interpreters and subprocesses dominate) 20:39 -> 19:25 min on a 2-core machine. Set before jax
# starts a backend, and inherited by the subprocesses tests start. GPU machines keep the default
# (their kernels are what the GPU tests check).
#
# And no YNNPACK fusions: on a CPU with bfloat16 dot instructions (AMX, AVX512-BF16) they compute
# a bf16 dot's float32 sums in an order that depends on the dot's surroundings, so two programs
# that run the same operations in the same order (the bit-for-bit tests of the kernels' schedule
# options in the Mosaic GPU interpreter) can differ by a bf16 ulp on such a host and agree on
# another (seen 2026-12-06: one element of 32,768 in the ReAttention attention's pipelined step,
# the same bits without these fusions). Both flags exist in jaxlib 0.10.2 and 0.11.2.
_CPU_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_experimental_ynn_fusion_type": ""}
if _cpu_only():
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", "")]
        + [f"--{name}={value}" for name, value in _CPU_FLAGS.items()
           if name not in os.environ.get("XLA_FLAGS", "")]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests import interpreter_cache  # noqa: E402

interpreter_cache.install()  # the Mosaic GPU interpreter compiles each kernel body once

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The tiny LLaMA every suite starts from; tests override single fields.
TINY_LLAMA = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module.

    Every executable XLA's CPU backend compiles holds its code in memory mappings of its own
    (about 7 for a small function), and jax's caches keep every executable a worker compiled
    alive. A worker of ``pytest -n 2`` went past Linux's limit of 65,530 mappings per process
    (``vm.max_map_count``) about 95% of the way through the suite: LLVM's ``Unable to allocate
    section memory!`` ("Cannot allocate memory" with 6 GB resident of 24) aborted the worker in
    whichever test compiled next (seen 2026-12-06 in CI and three times on this machine;
    ``tests/test_compiled_programs_released.py`` checks that clearing the caches gives the
    mappings back). With this, the most a worker held over the whole suite was 14,769 (against
    58,031 in the run before the abort), and the suite ran in 740 s instead of 771-800. Tests
    inside one module still share their compiles.
    """
    yield
    jax.clear_caches()
    gc.collect()


def _rel_err(out, ref) -> float:
    out = np.asarray(np.asarray(out, dtype=np.float32), dtype=np.float64)
    ref = np.asarray(np.asarray(ref, dtype=np.float32), dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference shape {ref.shape}"
    assert np.isfinite(ref).all(), "reference has NaN or Inf"
    assert np.isfinite(out).all(), "output has NaN or Inf"
    denom = np.linalg.norm(ref)
    assert denom > 0, "reference is all zeros: the comparison would be meaningless"
    return float(np.linalg.norm(out - ref) / denom)


@pytest.fixture
def rel_err():
    return _rel_err


def _random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
    assert len(np.unique(ids)) > 1
    return ids


@pytest.fixture
def random_ids():
    return _random_ids


def randomize_llama_(model, seed: int) -> None:
    """Redraw every parameter of a LlamaForCausalLM in place (torch, seeded).

    Linear weights ~ N(0, 1/fan_in) so attention scores are O(1) and the softmax is far from
    uniform; RMSNorm weights ~ U(0.5, 1.5); biases ~ N(0, 0.1^2); embeddings ~ N(0, 1).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("norm.weight"):
                new = 0.5 + torch.rand(shape, generator=gen)
            elif name.endswith(".bias"):
                new = 0.1 * torch.randn(shape, generator=gen)
            elif "embed_tokens" in name:
                new = torch.randn(shape, generator=gen)
            else:  # (out, in) Linear weight
                new = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            p.copy_(new.to(p.dtype))


@pytest.fixture
def make_hf_llama(tmp_path_factory):
    """Factory: ``make_hf_llama(seed=0, save=True, torch_dtype=torch.float32, **kwargs)`` ->
    ``(hf_model, directory or None)``. kwargs override TINY_LLAMA (LlamaConfig kwargs)."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    def make(seed: int = 0, save: bool = True, torch_dtype=None, **kwargs):
        config = transformers.LlamaConfig(**{**TINY_LLAMA, **kwargs})
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
        randomize_llama_(model, seed)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        model.eval()
        directory = None
        if save:
            directory = Path(tmp_path_factory.mktemp("hf_llama"))
            model.save_pretrained(directory)
        return model, directory

    return make


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    """Logits of a transformers model as float32 numpy."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), use_cache=False).logits
    return out.float().numpy()


@pytest.fixture
def torch_logits():
    return hf_logits
