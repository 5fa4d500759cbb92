"""The gathered lists of the Mosaic GPU attention as one Pallas kernel (Triton lowering).

Same function as ``pallas_mgpu_attend.gather_list`` (its XLA twin and reference): for every
(batch, kv head, chunk) the keys and values of the chunk's list slots, the keys rotated at
``slot + L0 - n_g`` in two steps (by the slot's angles, then by the chunk's offset), float32
math, so that they meet query rows rotated at their original positions.

Why a kernel: XLA's gathers of these rows ran at 0.5-2.2 TB/s on an H200 (profile of the 32K
op, ``docs/perf-notes.md``), well below the copy rate, and they are most of the op's time that
is neither a kernel nor cuDNN. Here a program copies ``BLOCK`` slots of one chunk: it loads
their cache rows by index (vector loads of whole rows), rotates the keys in registers and
writes both blocks contiguously, so every byte is read once and written once; programs past
the chunk's list length (rounded up to the attention's key block) return at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from kernels.cca.pallas_common import call, cdiv, pad_to
from kernels.reattention.pallas_mgpu_attend import list_rotation_tables

BLOCK = 64  # list slots per program


def _kernel(used_ref, glist_ref, k_ref, *refs, half: int, values: bool):
    if values:
        v_ref, cos_ref, sin_ref, cos_off_ref, sin_off_ref, kg_ref, vg_ref = refs
    else:
        cos_ref, sin_ref, cos_off_ref, sin_off_ref, kg_ref = refs

    @pl.when(pl.program_id(1) * BLOCK < used_ref[0])  # blocks the attention reads
    def _():
        rows = glist_ref[...]
        f32 = lambda x: x.astype(jnp.float32)
        x1, x2 = f32(k_ref[rows, pl.ds(0, half)]), f32(k_ref[rows, pl.ds(half, half)])
        for cos, sin in ((cos_ref[...], sin_ref[...]), (cos_off_ref[...][None, :],
                                                       sin_off_ref[...][None, :])):
            x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        kg_ref[:, pl.ds(0, half)] = x1.astype(kg_ref.dtype)
        kg_ref[:, pl.ds(half, half)] = x2.astype(kg_ref.dtype)
        if values:
            vg_ref[...] = v_ref[rows, :]


def padded_lists(glist: Int[Array, "B Hkv NC NG"], block_k: int) -> Int[Array, "B Hkv NC NGp"]:
    """The lists with NG padded (slots of key 0) to the gathered blocks' NGp."""
    return pad_to(pad_to(glist, 3, block_k), 3, BLOCK)


@functools.partial(jax.jit, static_argnames=("block_k", "values", "interpret"))
def gather_list(k: Float[Array, "B S Hkv D"], v: Float[Array, "B S Hkv D"],
                glist: Int[Array, "B Hkv NC NG"], l0: Int[Array, "B Hkv NC"],
                n_g: Int[Array, "B Hkv NC"], inv_freq, block_k: int, values: bool = True,
                interpret: bool = False):
    """(kg, vg) (B, Hkv, NC, NGp, D), NG padded to a multiple of ``block_k`` (and of
    ``BLOCK``, :func:`padded_lists`): as ``pallas_mgpu_attend.gather_list`` in slots below
    round_up(n_g, block_k), the ones the attention reads (``pallas_mgpu_attend``: list blocks
    below cdiv(n_g, block_k)); padding slots among them hold key 0. Slots from there on are not
    written: with overlapping spans n_g is often well below NG (a 16K prefill's middles are
    about 4K keys), and copying them was most of the gather there. ``values`` False: the keys
    only, (kg, None) (the attention reads the values in place, ``Config.mgpu_list_values``)."""
    b, s_len, hkv, d = k.shape
    if (d % 32 or d & (d - 1) or k.shape != v.shape or k.dtype != v.dtype or glist.ndim != 4
            or glist.shape[:2] != (b, hkv)):
        raise ValueError(f"the list gather needs k and v of one shape (B, S, Hkv, D) and dtype, "
                         f"D a power of two >= 32, and lists (B, Hkv, NC, NG); got k {k.shape} "
                         f"{k.dtype}, v {v.shape} {v.dtype}, lists {glist.shape}")
    nc = glist.shape[2]
    if l0.shape != glist.shape[:3] or n_g.shape != glist.shape[:3]:
        raise ValueError(f"l0 and n_g must be (B, Hkv, NC) = {glist.shape[:3]}; got {l0.shape}, "
                         f"{n_g.shape}")
    glist = padded_lists(glist, block_k)
    ngp = glist.shape[3]
    half = d // 2
    tables = list_rotation_tables(ngp, l0, n_g, inv_freq)  # (NGp, D/2) x 2, (B, Hkv, NC, D/2) x 2
    used = (cdiv(n_g.astype(jnp.int32), block_k) * block_k)[..., None]  # (B, Hkv, NC, 1)
    per_slot = lambda c, j, bi, h: (bi, h, c, j)
    out_spec = pl.BlockSpec((None, None, None, BLOCK, d), lambda c, j, bi, h: (bi, h, c, j, 0))
    cache_spec = pl.BlockSpec((None, s_len, None, d), lambda c, j, bi, h: (bi, 0, h, 0))
    slot_spec = pl.BlockSpec((BLOCK, half), lambda c, j, bi, h: (j, 0))
    chunk_spec = pl.BlockSpec((None, None, None, half), lambda c, j, bi, h: (bi, h, c, 0))
    out = jax.ShapeDtypeStruct((b, hkv, nc, ngp, d), k.dtype)
    n_out = 2 if values else 1
    outs = call(
        functools.partial(_kernel, half=half, values=values),
        grid=(nc, ngp // BLOCK, b, hkv),
        in_specs=[pl.BlockSpec((None, None, None, 1), lambda c, j, bi, h: (bi, h, c, 0)),
                  pl.BlockSpec((None, None, None, BLOCK), per_slot),
                  *[cache_spec] * n_out, slot_spec, slot_spec, chunk_spec, chunk_spec],
        out_specs=[out_spec] * n_out,
        out_shape=[out] * n_out,
        inputs=[used, glist, k, *([v] if values else []), *tables],
        num_warps=4,
        num_stages=1,
        interpret=interpret,
        name="reattention_gather",
    )
    return tuple(outs) if values else (outs[0], None)
