"""Attention kernels, one folder per op.

Each op folder (``kernels/cca/``, later ``kernels/reattention/``) holds its implementations side
by side: ``reference.py`` (plain jax.numpy math), ``pallas.py`` (Pallas GPU kernels) and
``triton.py`` (plain Triton kernels for PyTorch). Nothing here imports jax, torch or triton
eagerly: import the implementation module you need, e.g. ``from kernels.cca import reference``.
"""
