"""ReAttention (arXiv 2407.15176): position-agnostic top-k selection, then ordinary causal
attention over the gathered keys at re-numbered positions. See README.md in this folder.

Modules: ``params`` (hyper-parameters, geometry, tiles; plain Python), ``reference`` (jax.numpy),
``pallas`` (Pallas GPU kernels), ``reference_torch`` (torch), ``triton`` (plain Triton kernels),
``torch_ops`` (the torch-side ``reattention`` with ``implementation=``). Nothing is imported
eagerly so that the torch side never pulls in jax and vice versa.
"""
