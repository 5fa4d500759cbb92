"""Named ReAttention cases (shape + selection parameters) shared by the tests and bench/.
Plain data: no jax/torch imports."""

from __future__ import annotations

import dataclasses

from kernels.reattention.params import Selection


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    length: int  # S = T for a prefill
    q_heads: int
    kv_heads: int
    head_dim: int
    sel: Selection = Selection()

    @property
    def id(self) -> str:
        s = self.sel
        return (f"B{self.batch}-T{self.length}-H{self.q_heads}x{self.kv_heads}-D{self.head_dim}"
                f"-s{s.sink_tokens}-w{s.local_window}-k{s.top_k}-m{s.max_selected}-sp{s.span}"
                f"-c{s.chunk_size}-a{s.middle_align}" + (f"-kb{s.key_block}" if s.key_block > 1
                                                          else ""))


def small(sink, window, top_k, max_selected, span, chunk, align) -> Selection:
    return Selection(sink_tokens=sink, local_window=window, top_k=top_k,
                     max_selected=max_selected, span=span, chunk_size=chunk, middle_align=align)


# Small enough for the CPU interpreters; awkward on purpose: lengths that are multiples of no
# tile or chunk, chunks of 7 and 9, GQA ratios 1, 2, 4, 5, batch 2, head dims 64 and 128, caps
# that cut the picks, spans that overlap, clip at L0 and merge, aligned and unaligned middles.
CPU_CASES = [
    Case(2, 63, 4, 4, 64, small(4, 16, 2, 5, 4, 16, 8)),
    Case(2, 111, 4, 2, 64, small(3, 8, 3, 4, 5, 7, 1)),
    Case(1, 97, 8, 2, 128, small(2, 10, 1, 3, 3, 9, 4)),
    Case(1, 130, 5, 1, 64, small(5, 12, 4, 6, 6, 32, 16)),
]

# Block picks (``Selection.key_block``): blocks of 4 and 8 from an unaligned sink, chunks of 7 and
# 16, GQA 2 and 4, caps that cut the blocks (3 of up to 25) and caps that do not.
BLOCK_CASES = [
    Case(2, 111, 4, 2, 64, Selection(3, 8, 2, 3, 4, 7, 8, key_block=4)),
    Case(1, 130, 8, 2, 128, Selection(5, 12, 3, 9, 8, 16, 16, key_block=8)),
]


def gpu_cases(length: int) -> list[Case]:
    """The authors' defaults at LLaMA-7B / LLaMA-3-8B attention shapes (bench/, GPU tests)."""
    return [Case(1, length, 32, 32, 128), Case(1, length, 32, 8, 128)]
