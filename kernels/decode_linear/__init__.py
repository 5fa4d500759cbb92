"""The projections of a one-token decode step (batch 1) with their neighbours fused in: a
matrix-vector product ``y = prologue(x) @ W`` with an optional residual added to ``y``.

Prologues: ``"rmsnorm"`` (LLaMA's RMSNorm with its weight, before the QKV and gate-up
matrices), ``"swiglu"`` (``silu(gate) * up`` of the gate-up output, before the down matrix) or
none. Modules: ``reference`` (jax.numpy, the model's own ops), ``pallas`` (Pallas GPU kernel,
Triton lowering). Nothing is imported eagerly.
"""
