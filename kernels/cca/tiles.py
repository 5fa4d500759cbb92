"""Tile configuration shared by the Pallas (pallas*.py) and Triton (triton.py) CCA kernels, which
use the same tiling. Plain Python: importing it pulls in neither jax nor torch."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and launch parameters. Blocks are powers of two, at least 16 (matmul operands)."""

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    # Backward, dQ kernel (query blocks own the programs; and the dK/dV kernels unless set below).
    bwd_block_q: int = 64
    bwd_block_k: int = 64
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2
    # Backward, dK/dV kernels (key blocks own the programs); None: the bwd_* value.
    dkdv_block_q: int | None = None
    dkdv_block_k: int | None = None
    dkdv_num_warps: int | None = None
    dkdv_num_stages: int | None = None
    # GQA, Pallas only (the Triton twin ignores it): the core-token dK/dV kernel splits each kv
    # head's G query heads over this many programs (its gcd with G), with float32 partial sums
    # (pallas_vjp.backward_dkdv). H100, 128K, 32q/8kv (bench/tune_cca.py): 42.1 ms with 4 splits,
    # 45.6 with 2, 47.4 with 1. MHA (G = 1) is unaffected.
    dkdv_core_splits: int = 4
    # Pallas only: which lowering runs the forward kernel. "auto": the warp-specialised Mosaic GPU
    # kernel (pallas_mgpu.py) where it applies (Hopper, 16-bit inputs, head dim 64/128),
    # else the Triton-lowered one; "triton" or "mosaic_gpu" to force one.
    forward_lowering: str = "auto"

    def __post_init__(self):
        if self.forward_lowering not in ("auto", "triton", "mosaic_gpu"):
            raise ValueError("Config.forward_lowering must be 'auto', 'triton' or 'mosaic_gpu'; "
                             f"got {self.forward_lowering!r}")
        for name in ("block_q", "block_k", "bwd_block_q", "bwd_block_k", "dkdv_block_q",
                     "dkdv_block_k"):
            b = getattr(self, name)
            if b is not None and (b < 16 or b & (b - 1)):
                raise ValueError(f"Config.{name} must be a power of two >= 16; got {b}")
        if self.dkdv_core_splits < 1:
            raise ValueError(f"Config.dkdv_core_splits must be >= 1; got {self.dkdv_core_splits}")

    @property
    def dkdv(self) -> tuple[int, int, int, int]:
        """(block_q, block_k, num_warps, num_stages) of the dK/dV kernels."""
        pick = lambda own, fallback: fallback if own is None else own
        return (pick(self.dkdv_block_q, self.bwd_block_q), pick(self.dkdv_block_k, self.bwd_block_k),
                pick(self.dkdv_num_warps, self.bwd_num_warps),
                pick(self.dkdv_num_stages, self.bwd_num_stages))

    @property
    def seq_tile(self) -> int:
        """Every kernel's tiles divide T padded to this (all blocks are powers of two)."""
        return max(self.block_q, self.block_k, self.bwd_block_q, self.bwd_block_k, *self.dkdv[:2])

    @property
    def core_tile(self) -> int:
        """Every kernel's core-token tiles divide the core count padded to this."""
        return max(self.block_k, self.bwd_block_k, self.dkdv[1])


def default_config(head_dim: int, itemsize: int) -> Config:
    """Defaults by head dim and bytes per element (tuned on the H100 at T = 32K, d = 128 with
    bench/tune_cca.py; float32 tiles take twice the shared memory, so they are smaller)."""
    if itemsize >= 4:
        return Config(block_q=32, block_k=32, num_warps=4, num_stages=2, bwd_block_q=32,
                      bwd_block_k=32, bwd_num_warps=4, bwd_num_stages=1)
    if head_dim <= 64:
        return Config(block_q=128, block_k=64, num_warps=4)
    return Config()
