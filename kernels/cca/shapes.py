"""Named shape sets shared by the tests and bench/. Plain data: no jax/torch imports."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class CCAShape:
    batch: int
    length: int
    q_heads: int
    kv_heads: int
    head_dim: int
    group_size: int
    local_window: int

    @property
    def id(self) -> str:
        return (f"B{self.batch}-T{self.length}-H{self.q_heads}x{self.kv_heads}-D{self.head_dim}"
                f"-g{self.group_size}-w{self.local_window}")


# Small enough for the CPU interpreters; awkward on purpose: T not a multiple of g or of any
# block, every GQA ratio of SPEC.md (1, 2, 4, 5, 8), windows of g, 4g and >= T.
CPU_SHAPES = [
    CCAShape(2, 63, 4, 4, 64, 8, 16),
    CCAShape(2, 111, 4, 2, 64, 4, 16),
    CCAShape(1, 200, 8, 1, 128, 16, 16),
    CCAShape(2, 97, 5, 1, 64, 8, 32),
    CCAShape(1, 130, 8, 2, 128, 16, 64),
    CCAShape(2, 75, 4, 4, 64, 64, 64),
    CCAShape(1, 5, 2, 1, 64, 8, 8),
    CCAShape(1, 300, 8, 8, 64, 8, 1024),
]

# The paper's setting at LLaMA-2-7B attention shapes and the GQA variant (bench/, GPU tests).
def gpu_shapes(length: int, group_size: int = 16, local_window: int = 1024) -> list[CCAShape]:
    return [CCAShape(1, length, 32, 32, 128, group_size, local_window),
            CCAShape(1, length, 32, 8, 128, group_size, local_window)]
