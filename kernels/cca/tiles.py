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
    # Backward: key blocks own the programs of the dK/dV kernels, query blocks of the dQ kernel.
    bwd_block_q: int = 64
    bwd_block_k: int = 64
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "bwd_block_q", "bwd_block_k"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"Config.{name} must be a power of two >= 16; got {b}")


def default_config(head_dim: int, itemsize: int) -> Config:
    """Defaults by head dim and bytes per element (tuned on the H100 at T = 32K, d = 128 with
    bench/tune_cca.py; float32 tiles take twice the shared memory, so they are smaller)."""
    if itemsize >= 4:
        return Config(block_q=32, block_k=32, num_warps=4, num_stages=2, bwd_block_q=32,
                      bwd_block_k=32, bwd_num_warps=4, bwd_num_stages=1)
    if head_dim <= 64:
        return Config(block_q=128, block_k=64, num_warps=4)
    return Config()
