"""ReAttention hyper-parameters, the chunk geometry they imply, and the kernel tiles. Plain Python:
importing this pulls in neither jax nor torch (the jnp, torch, Pallas and Triton sides share it).

Shape letters: B batch, S cached keys, T queries, Hq / Hkv query / kv heads, G = Hq // Hkv,
D head dim, C chunk size, NC = ceil(T / C) chunks, R = C * G query rows per (chunk, kv head),
NG = sink + max_selected * span gathered slots, TAIL = longest local window + chunk.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Selection:
    """What each chunk of queries attends to (README.md in this folder; defaults from SPEC.md 2).

    * ``sink_tokens``: keys [0, sink) are always kept.
    * ``local_window`` / ``middle_align``: the local window of a chunk starting at c0 is [L0, c0)
      with L0 = sink + floor((c0 - w - sink) / align) * align when that is past the sink (the
      middle region [sink, L0) is a multiple of ``align`` long, so the window holds between w and
      w + align - 1 keys), else L0 = min(sink, c0) (nothing in the middle).
    * ``top_k``: each (query, query head) of the chunk picks its top_k middle keys by raw q . k.
    * ``max_selected``: the union of the picks of a kv head's queries and heads is cut to the
      max_selected most-voted keys (ties: higher best score, then lower position).
    * ``span``: each kept key brings [i - span // 2, i + span - span // 2 - 1] (clipped to the
      middle region); overlapping spans merge.
    * ``chunk_size``: queries are processed in chunks of C that share one selection.
    * ``key_block``: granularity of the picks. 1 (the authors'): each row picks middle tokens.
      b > 1: the middle is cut into aligned blocks of b keys ([sink + j b, sink + (j + 1) b)),
      each row picks whole blocks by an upper bound of its best q . k in the block (the sum over
      dims of max(q_d max_d, q_d min_d), from the block's per-dim key maxima and minima), and a
      kept block brings exactly its b keys (``key_blocks.py``). Needs ``span == key_block`` (the
      span is the block) and b dividing ``middle_align`` (the middle is whole blocks). Scoring
      then costs about 2 / b of the token-level one.
    """

    sink_tokens: int = 32
    local_window: int = 8192
    top_k: int = 4
    max_selected: int = 256
    span: int = 32
    chunk_size: int = 512
    middle_align: int = 128
    key_block: int = 1

    def __post_init__(self):
        for name in ("sink_tokens", "local_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {value!r}")
        for name in ("top_k", "max_selected", "span", "chunk_size", "middle_align", "key_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.key_block > 1 and (self.span != self.key_block
                                   or self.middle_align % self.key_block):
            raise ValueError(f"key_block={self.key_block} picks whole blocks: span must equal it "
                             f"(got span={self.span}) and it must divide middle_align (got "
                             f"middle_align={self.middle_align})")

    @property
    def span_left(self) -> int:
        return self.span // 2

    @property
    def span_right(self) -> int:
        return self.span - 1 - self.span // 2

    def num_gathered(self) -> int:
        """NG: slots of the gathered list (sink + selected spans), before padding."""
        return self.sink_tokens + self.max_selected * self.span

    def tail_length(self, num_keys: int, chunk: int) -> int:
        """Longest [L0, c1): local window (at most w + align - 1) plus the chunk's own tokens."""
        return max(1, min(num_keys, self.local_window + self.middle_align - 1 + chunk))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(max(a, 1), b) * b


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one call: chunking, row packing, gathered list, position table."""

    batch: int
    num_keys: int  # S
    num_queries: int  # T
    q_heads: int
    kv_heads: int
    head_dim: int
    chunk: int  # C used (min(chunk_size, T))
    sel: Selection

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def num_chunks(self) -> int:
        return cdiv(self.num_queries, self.chunk)

    @property
    def rows(self) -> int:
        return self.chunk * self.groups

    @property
    def picks(self) -> int:
        """Picks per (batch, kv head, chunk): every row's top_k."""
        return self.rows * self.sel.top_k

    @property
    def num_gathered(self) -> int:
        return self.sel.num_gathered()

    @property
    def tail(self) -> int:
        return self.sel.tail_length(self.num_keys, self.chunk)


def geometry(q_shape, k_shape, sel: Selection) -> Geometry:
    b, t, hq, d = q_shape
    return Geometry(batch=b, num_keys=k_shape[1], num_queries=t, q_heads=hq, kv_heads=k_shape[2],
                    head_dim=d, chunk=min(sel.chunk_size, t), sel=sel)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles and launch parameters of the two kernels (powers of two, >= 16 for the matmuls).

    ``score_*``: the scoring + per-row top-k kernel; ``attn_*``: the gathered attention kernel.
    ``score_splits``: key-range splits of the scoring kernel (0: chosen from the grid size so
    that a decode step, with few query rows, still fills the GPU). ``attn_splits``: the same
    for the Triton-lowered attention kernel, whose key tiles (list, then tail) are split across
    programs and the partial softmaxes merged in XLA (flash-decoding); 0: split only a decode
    step (a single query), by :func:`attend_splits`.

    ``tail_keys``: how the attention kernel rotates the contiguous tail (local window + chunk):
    "rotated" reads a copy of the tail window rotated once in XLA at the original positions
    (scores depend on position differences only, and rows and tail share one re-numbering
    offset) with one full-width dot per tile; "in_kernel" rotates every tile in every program at
    the re-numbered positions; "auto": "rotated" unless the call has a single query (a decode
    step, whose one row tile per kv head would not repay the copy) or the window is shorter
    than one key tile (tiny calls; forcing "rotated" there is a ValueError).

    ``full_prefix``: chunks with an empty middle region (the first sink + w + align tokens of a
    call that starts at position 0) drop nothing, so they are plain causal attention: "cudnn" or
    "xla" runs them through ``jax.nn.dot_product_attention`` with that implementation, "off"
    through the kernels; "auto": "cudnn" for 16-bit inputs on a GPU (head dim <= 128), "off"
    otherwise.

    ``score_lowering``: "triton" runs the scoring kernel through Pallas's Triton lowering (the
    ``score_*`` tiles above), "mosaic_gpu" through the warp-specialised Mosaic GPU kernel
    (``pallas_mgpu_score.py``: ``mgpu_consumers`` x 64 rows per program, ``mgpu_block_k`` keys
    per tile, ``mgpu_slots`` shared-memory slots; Hopper, 16-bit, head dim 64 or 128, or 256
    for block picks' signed rows with a ring cut to fit, a key count that is a multiple of 8,
    top_k <= 8); "auto": "mosaic_gpu" where it applies on a Hopper GPU (256-wide rows only with
    4 consumers, the measured case), else "triton".
    H200, 128K, 32 heads, d = 128: 105-114 ms with the defaults, 200 ms through Triton.
    ``mgpu_merge``: how that kernel keeps each row's top_k, "lanes" (per-thread lists, a warp
    vote per 8 rows) or "rows" (a warp per row through shared memory, ``mgpu_row_merge.py``;
    correct on the H200 but slower: 7.97 ms against 5.31 at 32K with 32 heads,
    ``bench/results/ab_reattention_score_rows_h200.json``).

    ``attend_lowering``: the same choice for the gathered attention. "mosaic_gpu" runs the
    warp-specialised kernel of ``pallas_mgpu_attend.py`` (Hopper, 16-bit, head dim 64 or 128, the
    rotated tail, more than one query): each chunk's list is first gathered and rotated into a
    contiguous block by the list-gather kernel (``pallas_gather.py``), ``gather_bytes`` at a time
    (chunks are processed in groups whose gathered keys and values fit in it, one group's lists
    alive at a time), then read with ``mgpu_attend_block_k``-key TMA copies through
    ``mgpu_attend_slots`` slots; "auto": "mosaic_gpu" where it applies on a Hopper GPU.
    ``mgpu_attend_block_k`` 64, 128 (the default) or 192: larger blocks spend the per-block
    work (row maxima and sums, the rescale of O, barriers) on more keys, as FlashAttention-3's
    176 at head dim 128 (which the 128-byte swizzle does not allow here: a ``P V`` wgmma takes
    K in multiples of 64). 192 keys fit 2 slots at head dim 128 (229,376 bytes of shared
    memory); ptxas spills in its masked steps (the list's last block, the tail's first, the
    diagonal), none in the others. Not yet timed (``bench/ab_reattention_attend.py``'s
    ``mgpu_bk192_s2``).
    ``mgpu_attend_overlap``: that kernel's consumers pipeline their steps (each block's softmax
    while the previous block's P V is on the tensor cores; ``kernels/cca/pallas_mgpu.consume``),
    bit for bit the same output. Measured on an H100 with blocks of 32
    (``bench/results/ab_overlap_h100.json``): 0.6-0.9% slower with 8 kv heads, 4.5-4.8% with
    32, so off. It takes a 1 KiB shared-memory scratch, which the 3-slot ring of 128 keys at
    head dim 128 has no room for.

    ``mgpu_rows``: how the Mosaic GPU kernels of a prefill get their query rows and write their
    output. "in_place" reads q (the scoring) and the rotated q (the attention) as they are, and
    the attention writes every group of chunks into one (B, T, Hq, D) output, where
    ``mgpu_tokens.applies`` (G in 1, 2, 4, 8, C * G a multiple of 64 and T a multiple of 8;
    the authors' C = 512 qualifies); "packed" copies the rows into the packed layout
    (``reference.pack_rows``) and the output back, and concatenates the groups' and the
    prefix's outputs.
    ``prefix_keys``: what the cuDNN prefix (``full_prefix``) reads: "whole" the rotated window
    and the cache's values as they are (causal: a query sees no key past its own, so the keys
    past the prefix are masked, and cuDNN skips their blocks), where the window is the whole
    cache and S = T (so that every row read is written); "sliced" copies of their first rows.
    ``mgpu_list_values``: where the Mosaic GPU attention reads the values of a chunk's list.
    "in_place": from the cache, by TMA copies of runs of rows, which needs lists made of such
    runs (block picks, ``pallas_mgpu_attend.values_piece``); the list gather then copies only
    the keys (which it rotates). "gathered": from the gather's copy. "auto": in place where
    the lists allow it and each kv head serves one query head (G = 1), gathered elsewhere.
    Measured on an H100 with blocks of 32 (``bench/results/ab_reattention_attend_kb32*``): in
    place saves 0.5-0.8 ms at 32K and 2.3 ms at 128K with 32 kv heads; with 8 kv heads (G = 4,
    every list read by four times the CTAs, each with four copies per value block) it cost
    0.4-0.7 ms at 32K and saved 1.2 ms at 128K.
    ``block_select``: how a prefill with block picks counts the votes of a chunk's many picks
    and keeps the best blocks. "sort" sorts the P = R x top_k picks twice (as token picks do,
    ``reference.select_from_picks``); "scatter" counts them per block with a scatter-add and
    sorts the NB blocks once (``reference.select_from_block_picks``); "kernel" counts them the
    same way, then finds the kept blocks by thresholds in a Pallas kernel, without a sort
    (``pallas_block_select.py``; past its NB <= 32768, the scatter). All three give the same
    lists. "auto": the kernel where it applies, else the scatter where NB <= P, else the
    sorts. Measured on an H100 with blocks of 32 against the former "auto"
    (``bench/results/ab_block_select_pin_h100.json``, ``ab_block_select_32k_h100.json``):
    the kernel saved 0.98 ms at 128K with 8 kv heads (scatter before), 1.90 ms at 128K with
    32 (sorts before), 0.86 and 0.07 ms at 64K, 0.16 and 0.23 ms at 32K. Before it, the scatter had saved 2.6 ms against the sorts at 128K with 8 kv
    heads and cost 2.9 ms with 32 (``ab_block_scatter_h100.json``).
    ``mgpu_signed_rows``: where block picks' signed rows [q+, q-] are made for the Mosaic GPU
    scoring. "in_kernel": each tile of q's rows in shared memory (``pallas_mgpu_score.score(
    signed=True)``); "xla": a 2D-wide copy of q that the kernel reads (the Triton lowering
    always scores such a copy)."""

    score_block_q: int = 64
    score_block_k: int = 64
    score_warps: int = 4
    score_stages: int = 2
    score_splits: int = 0
    attn_block_q: int = 64
    attn_block_k: int = 64
    attn_warps: int = 4
    attn_stages: int = 2
    attn_splits: int = 0
    tail_keys: str = "auto"
    full_prefix: str = "auto"
    score_lowering: str = "auto"
    mgpu_block_k: int = 64
    mgpu_slots: int = 4
    mgpu_consumers: int = 4
    mgpu_merge: str = "lanes"
    attend_lowering: str = "auto"
    mgpu_attend_block_k: int = 128
    mgpu_attend_slots: int = 2
    mgpu_attend_overlap: bool = False
    gather_bytes: int = 1 << 30
    mgpu_rows: str = "in_place"
    prefix_keys: str = "whole"
    mgpu_list_values: str = "auto"
    block_select: str = "auto"
    mgpu_signed_rows: str = "in_kernel"

    def __post_init__(self):
        for name in ("score_block_q", "score_block_k", "attn_block_q", "attn_block_k"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"Config.{name} must be a power of two >= 16; got {b}")
        for name in ("score_splits", "attn_splits"):
            if getattr(self, name) < 0:
                raise ValueError(f"Config.{name} must be >= 0; got {getattr(self, name)}")
        if self.tail_keys not in ("auto", "rotated", "in_kernel"):
            raise ValueError(f"Config.tail_keys must be 'auto', 'rotated' or 'in_kernel'; got "
                             f"{self.tail_keys!r}")
        if self.full_prefix not in ("auto", "cudnn", "xla", "off"):
            raise ValueError(f"Config.full_prefix must be 'auto', 'cudnn', 'xla' or 'off'; got "
                             f"{self.full_prefix!r}")
        for name in ("score_lowering", "attend_lowering"):
            if getattr(self, name) not in ("auto", "triton", "mosaic_gpu"):
                raise ValueError(f"Config.{name} must be 'auto', 'triton' or 'mosaic_gpu'; got "
                                 f"{getattr(self, name)!r}")
        for name in ("mgpu_slots", "mgpu_attend_slots"):
            if getattr(self, name) < 2:
                raise ValueError(f"Config.{name} must be >= 2; got {getattr(self, name)}")
        if self.gather_bytes < 1:
            raise ValueError(f"Config.gather_bytes must be positive; got {self.gather_bytes}")
        if self.mgpu_merge not in ("lanes", "rows"):
            raise ValueError(f"Config.mgpu_merge must be 'lanes' or 'rows'; got "
                             f"{self.mgpu_merge!r}")
        for name, allowed in (("mgpu_block_k", (64, 128)),
                              ("mgpu_attend_block_k", (64, 128, 192)),
                              ("mgpu_rows", ("in_place", "packed")),
                              ("prefix_keys", ("whole", "sliced")),
                              ("mgpu_list_values", ("auto", "in_place", "gathered")),
                              ("block_select", ("auto", "sort", "scatter", "kernel")),
                              ("mgpu_signed_rows", ("in_kernel", "xla"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Config.{name} must be one of {allowed}; got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.mgpu_attend_overlap, bool):
            raise ValueError(f"Config.mgpu_attend_overlap must be a bool; got "
                             f"{self.mgpu_attend_overlap!r}")
        if self.mgpu_consumers not in (2, 4):
            raise ValueError(f"Config.mgpu_consumers must be 2 or 4; got {self.mgpu_consumers}")


def default_config(head_dim: int, itemsize: int, rows: int | None = None) -> Config:
    """Defaults by head dim and bytes per element (float32 tiles use twice the shared memory).
    ``rows`` (query rows per chunk, C * G) caps the row tiles: a decode step has only G rows."""
    if itemsize >= 4:
        config = Config(score_block_q=32, score_block_k=32, attn_block_q=32, attn_block_k=32)
    elif head_dim <= 64:
        config = Config(score_block_q=128, score_block_k=64, score_warps=4, attn_block_q=128,
                        attn_block_k=64, attn_warps=4, attn_stages=3)
    else:  # bench/tune_reattention.py, H100, 128K: score 199 ms (8 warps 235), op 382 ms (64-key
        # attention tiles with 8 warps 399)
        config = Config(score_block_q=128, score_block_k=64, score_warps=4, attn_block_q=128,
                        attn_block_k=32, attn_warps=4, attn_stages=3)
    if rows is not None:
        fit = max(16, next_power_of_2(rows))
        config = dataclasses.replace(config, score_block_q=min(config.score_block_q, fit),
                                     attn_block_q=min(config.attn_block_q, fit))
        if fit <= 32:  # few rows: a decode step, bandwidth-bound; fewer warps per program,
            # and two Mosaic GPU scoring consumers, whose 64-row wgmma tiles are mostly
            # padding here (bench/results/ab_reattention_decode_h200.json: 128K d = 128 step
            # 191 us against 225 with four, 1M d = 64 469 us against 575)
            config = dataclasses.replace(config, score_warps=4, attn_warps=4, mgpu_consumers=2)
    return config


TARGET_PROGRAMS = 264  # about two waves of 132 SMs (H100): enough scoring programs per launch
# A decode step's Mosaic GPU scoring (one CTA per SM) does best with one wave: 16 key splits at
# 8 kv heads, not 32 (bench/results/ab_reattention_decode_splits_h100.json: 75 against 81 us
# at 32K d = 128, 70 against 78 at 64K d = 64, 136 against 143 at 128K d = 128).
ONE_WAVE_PROGRAMS = 132


def score_splits(config: Config, geo: Geometry, row_tiles: int,
                 target: int = TARGET_PROGRAMS) -> int:
    """Key-range splits of the scoring kernel: 1 when the (row tiles x batch x kv heads) grid
    already has ``target`` programs; more (each split at least 8 key tiles long) when it does
    not. A decode step's count is rounded down to a power of two, so that its candidates
    (splits x top_k) reach the selection kernel without a padding copy (``pallas_select``)."""
    if config.score_splits:
        return config.score_splits
    middle = max(0, geo.num_keys - geo.sel.sink_tokens)
    programs = row_tiles * geo.batch * geo.kv_heads
    most = max(1, cdiv(middle, 8 * config.score_block_k))
    splits = max(1, min(most, cdiv(target, programs)))
    return 1 << (splits.bit_length() - 1) if geo.num_queries == 1 else splits


def attend_splits(config: Config, geo: Geometry, programs: int, key_tiles: int) -> int:
    """Key-range splits of the Triton-lowered attention kernel (``Config.attn_splits``; 0: a
    decode step gets enough splits for about ``TARGET_PROGRAMS`` programs, each at least 4 of
    its ``key_tiles`` key tiles long; a prefill keeps one)."""
    if config.attn_splits:
        return config.attn_splits
    if geo.num_queries > 1:
        return 1
    return max(1, min(key_tiles // 4, cdiv(TARGET_PROGRAMS, programs)))


@dataclasses.dataclass(frozen=True)
class PositionArg:
    """What the checks below need of a position argument (a Python int, a jax array or a torch
    tensor), described by each side: its shape, whether its dtype is an integer type, and its
    values when they are known on the host (None when traced under jit, or on a GPU where reading
    them would wait for the device: then only the shape and dtype are checked)."""

    shape: tuple
    dtype: str
    is_integer: bool
    values: list | None

    @staticmethod
    def on_host(x) -> "PositionArg":
        """A Python int or a host array (anything numpy reads), values included."""
        import numpy as np

        a = np.asarray(x)
        return PositionArg(a.shape, str(a.dtype), bool(np.issubdtype(a.dtype, np.integer)),
                           a.reshape(-1).tolist())


def _check_arg(name: str, arg: PositionArg, batch: int, lo: int, hi: int, what: str) -> None:
    if not arg.is_integer:
        raise ValueError(f"{name} must be integers; got dtype {arg.dtype}")
    if arg.shape not in ((), (batch,)):
        raise ValueError(f"{name} must be a scalar or one value per batch element ({batch},); "
                         f"got shape {arg.shape}")
    if arg.values is not None and any(not lo <= x <= hi for x in arg.values):
        raise ValueError(f"{name} must lie in [{lo}, {hi}] ({what}); got {arg.values}")


def check_positions(batch: int, num_queries: int, num_keys: int,
                    q_start: PositionArg | None = None,
                    q_lengths: PositionArg | None = None) -> None:
    """Raises ValueError naming the problem when ``q_start`` / ``q_lengths`` of a call with T
    queries over S cached keys describe positions ReAttention does not define: the real queries
    (the first q_lengths, default all T) of element b sit at q_start[b] ..., and each needs its
    own key in the cache, so 0 <= q_start and q_start + (q_lengths or T) <= S; 0 <= q_lengths
    <= T (rows past it are right padding, which may run past the cache)."""
    if q_lengths is not None:
        _check_arg("q_lengths", q_lengths, batch, 0, num_queries, "real queries per element")
    if q_start is None:
        return
    _check_arg("q_start", q_start, batch, 0, num_keys, "the first query's position")
    if q_start.values is None:
        return
    starts = q_start.values * (batch if q_start.shape == () else 1)
    if q_lengths is None:
        counts = [num_queries] * batch
    elif q_lengths.values is None:
        return
    else:
        counts = q_lengths.values * (batch if q_lengths.shape == () else 1)
    over = [(s, n) for s, n in zip(starts, counts) if s + n > num_keys]
    if over:
        s, n = over[0]
        raise ValueError(f"a query past the cache: q_start + {'q_lengths' if q_lengths else 'T'}"
                         f" must be <= S = {num_keys} (each query's key is cached); got "
                         f"q_start {s} with {n} real queries"
                         + ("" if q_lengths else " (right padding: pass q_lengths)"))


def check_lengths(batch: int, num_keys: int, lengths: PositionArg) -> None:
    """Raises ValueError unless a decode step's ``lengths`` (keys cached per element, the new
    query's included) are integers in [1, L], one per batch element or a scalar."""
    _check_arg("lengths", lengths, batch, 1, num_keys, "keys cached, the new query's included")
