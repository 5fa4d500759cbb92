"""Query rows read, and output rows written, in place in (B, T, Hq, D) arrays by ReAttention's
Mosaic GPU kernels, instead of through packed copies (``reference.pack_rows`` / ``unpack_rows``).

A kernel's 64-row tile of a chunk holds n = 64 / G queries x the G query heads of one kv head.
Packed, row r of a tile is query r // G, head r % G, and the packed array is one copy of q (and
the output one more, then unpacked). In place, a tile is G TMA copies, one per head: a box of n
queries x D of head ``hk * G + g`` (rows strided by Hq * D). Its rows then come head-major: row r
is query r % n, head r // n (:func:`tile_query`). The scoring's picks go back to the packed order
with :func:`to_packed` (a small array); the attention's rows only need their queries for the
causal mask, and its output tiles go back to their heads the same way, G copies per tile.

Applies (:func:`applies`) where n is a whole number of 8-row shared-memory tiles, G in 1, 2, 4,
8, C * G is a multiple of 64, so that no tile holds rows of two chunks, and the arrays' query
counts are multiples of 8 (their TMA descriptors tile that dimension by 8). Copies that reach
past the array's end (the last chunk's padding) are filled with zeros (reads) or dropped
(writes) by the TMA unit on the GPU; the interpreter raises instead, so there the callers pad.

:func:`launch` runs a kernel into a fresh output or, through ``pl.run_state``, into an existing
array in place (the custom call aliases it), so that several launches fill one output.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.cca.pallas_mgpu import interpret_params

ROWS = 64  # rows of a consumer warpgroup's tile (one wgmma M tile)
GROUPS = (1, 2, 4, 8)  # query heads per kv head whose tiles split into whole 8-row boxes


def applies(groups: int, chunk: int, num_queries: int) -> bool:
    """Whether the kernels can read and write a chunk's rows in place (module docstring), in
    arrays of ``num_queries`` queries: a multiple of 8, as the TMA descriptor of an array copied
    into 8-row tiles tiles that dimension by 8 (Mosaic GPU refuses other lengths)."""
    return groups in GROUPS and (chunk * groups) % ROWS == 0 and num_queries % 8 == 0


def check(hq: int, hkv: int, groups: int, chunk: int, rows: int, **queries: int) -> None:
    """Raises ValueError unless Hq = Hkv * G and :func:`applies` holds for every array's query
    count (``queries``: name -> count), and ``rows`` per chunk cover C * G."""
    if hq != hkv * groups or not all(applies(groups, chunk, n) for n in queries.values()):
        counts = ", ".join(f"{n} {name}" for name, n in queries.items())
        raise ValueError(f"rows in place need Hq = Hkv * G with G in {GROUPS}, C * G a multiple "
                         f"of {ROWS} and query counts that are multiples of 8; got Hq {hq}, Hkv "
                         f"{hkv}, G {groups}, C {chunk}, queries {counts}")
    if rows < chunk * groups:
        raise ValueError(f"the rows per chunk ({rows}) must cover C * G = {chunk * groups}")


def pad_for_interpreter(x, chunks: int, chunk: int, rows: int, groups: int):
    """x (B, T', Hq, D) zero-padded along T' as far as the tiles of ``chunks`` chunks of ``rows``
    rows read: the GPU reads zeros past an array's end, the interpreter raises."""
    reach = chunks * chunk + rows // groups
    return jnp.pad(x, [(0, 0), (0, reach - x.shape[1]), (0, 0), (0, 0)])


def tile_query(rows, groups: int):
    """Query (within the tile) of each head-major row index of a 64-row tile."""
    return lax.rem(rows, ROWS // groups)


def load(src, b, token, head0, groups: int, smem, barrier) -> None:
    """The tile of queries ``token .. token + 64 / G - 1`` of heads ``head0 .. head0 + G - 1`` of
    batch element b of ``src`` (B, T, Hq, D), head-major into ``smem`` (64, D): G copies that
    arrive on ``barrier`` (which must expect G arrivals)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    n = ROWS // groups
    token = pl.multiple_of(token, n)  # a whole number of 8-row tiles (jax 0.11 checks)
    for g in range(groups):
        plgpu.copy_gmem_to_smem(src.at[b, pl.ds(token, n), head0 + g], smem.at[pl.ds(g * n, n)],
                                barrier)


def store(smem, dst, b, token, head0, groups: int) -> None:
    """The inverse of :func:`load`: ``smem`` (64, D), head-major, into ``dst`` (B, T, Hq, D)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    n = ROWS // groups
    token = pl.multiple_of(token, n)
    for g in range(groups):
        plgpu.copy_smem_to_gmem(smem.at[pl.ds(g * n, n)], dst.at[b, pl.ds(token, n), head0 + g])


def to_packed(x: jax.Array, groups: int) -> jax.Array:
    """The last axis (rows, a multiple of 64) from head-major tiles to the packed row order."""
    if groups == 1:
        return x
    n = ROWS // groups
    shape = x.shape
    x = x.reshape(*shape[:-1], shape[-1] // ROWS, groups, n)
    return jnp.swapaxes(x, -1, -2).reshape(shape)


def in_place_supported(interpret: bool) -> bool:
    """Whether :func:`launch` can write into an existing array: compiled, always; jax 0.10's
    Mosaic GPU interpreter has no buffers for aliased operands (0.11's has)."""
    major_minor = tuple(int(re.match(r"\d+", x).group()) for x in jax.__version__.split(".")[:2])
    return not interpret or major_minor >= (0, 11)


def launch(entry, inputs, out, *, out_type, interpret: bool, compiler_params=None, **mesh):
    """``entry(*input_refs, o_ref)`` as a Mosaic GPU kernel over ``mesh`` (grid, grid_names,
    num_threads, thread_name): into a fresh ``out_type`` array where ``out`` is None, else into
    ``out`` in place (it must not be used afterwards; see :func:`in_place_supported`)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    params = dict(compiler_params=compiler_params,
                  interpret=interpret_params() if interpret else None)
    if out is None:
        return plgpu.kernel(entry, out_type=out_type, **mesh, **params)(*inputs)
    if not in_place_supported(interpret):
        raise ValueError("jax 0.10's Mosaic GPU interpreter cannot write into an existing array")
    if (out.shape, out.dtype) != (out_type.shape, out_type.dtype):
        raise ValueError(f"the output to write into is {out.dtype}{list(out.shape)}, the kernel's "
                         f"{out_type.dtype}{list(out_type.shape)}")

    def stateful(o_ref):
        pl.kernel(entry, out_type=(), mesh=plgpu.Mesh(**mesh), **params)(*inputs, o_ref)

    return pl.run_state(stateful)(out)
