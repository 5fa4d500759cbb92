"""RMSNorm with the residual add in front of it: ``s = x + r``, ``y = weight * norm(s)``.

``reference.py``: the model's math in jax.numpy (``jax_cca.model.RMSNorm`` calls it);
``pallas.py``: one Pallas GPU kernel for the decode step, where XLA spends three small kernels on
it (the add, the mean of squares, the scaling); ``triton.py``: its plain Triton twin for torch
tensors (tests/parity/test_parity_decode.py). Import the module you need; nothing is imported
here.
"""
