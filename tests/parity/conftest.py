"""Setup of the cross-framework parity suite (tests/parity).

Two modes, chosen once per process in ``pytest_configure`` (before the test modules import):

* default: small sizes on any machine: the Triton kernels run under the Triton interpreter
  (torch CPU tensors), the Pallas kernels with ``interpret=True`` (compiled if jax sees a GPU);
* ``--gpu`` (needs a CUDA GPU visible to torch and jax): compiled Triton and Pallas kernels on
  the GPU, at real sizes too (T = 32K bf16, fp32 T = 4001). Run it alone:
  ``PYTHONPATH=. python -m pytest tests/parity --gpu``.

Triton decides interpreted-or-compiled when a kernel module is imported, so in the default mode
``TRITON_INTERPRET=1`` is set only while ``kernels.cca.triton`` is imported here and removed
right after: it cannot leak into the other suites or into subprocesses they start. (In a full
run triton itself is already imported, compiled-mode, through torch._dynamo by the model suites;
``kernels/cca/triton_interpret.py`` then gives the interpreter interpreted twins of triton's
own helpers.)
"""

from __future__ import annotations

import os

import pytest

from tests.parity import harness


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", default=False,
                     help="parity suite: compiled kernels on the CUDA GPU at real sizes "
                          "(default: small sizes through the Triton and Pallas interpreters)")


def _import_triton_kernels(interpret: bool):
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return None  # no triton (not Linux): the tests that need it skip
    if not interpret:
        return importlib.import_module("kernels.cca.triton")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module("kernels.cca.triton")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    if not module.INTERPRET:
        raise pytest.UsageError("kernels.cca.triton was imported before tests/parity/conftest.py "
                                "could switch on the Triton interpreter")
    return module


def pytest_configure(config):
    gpu = bool(config.getoption("--gpu", default=False))
    if gpu:
        # jax and torch share the GPU: jax must not grab 75% of it up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax
        import torch

        if not torch.cuda.is_available() or jax.default_backend() != "gpu":
            gpu = False  # GPU-only tests skip with a reason; the rest runs interpreted
    harness.configure(gpu=gpu, triton_module=_import_triton_kernels(interpret=not gpu))
