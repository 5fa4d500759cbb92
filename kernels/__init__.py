"""Kernels, one folder per op.

Each op folder (``kernels/cca/``, ``kernels/reattention/``, ``kernels/rms_norm/``) holds its
implementations side by side: ``reference.py`` (plain jax.numpy math), ``pallas.py`` (Pallas GPU
kernels) and ``triton.py`` (plain Triton kernels for PyTorch, each the twin of a Pallas kernel).
Nothing here imports jax, torch or triton eagerly: import the implementation module you need,
e.g. ``from kernels.cca import reference``.
"""
