"""Core Context Aware attention (CCA). See README.md in this folder for the math.

Modules: ``reference`` (jax.numpy), ``shapes`` (named shape sets for tests and benchmarks).
Nothing is imported eagerly so that the torch side never pulls in jax and vice versa.
"""
