"""One compile per kernel body in jax's Mosaic GPU interpreter (test speed only).

The interpreter runs each CTA of a grid by handing the kernel body's jaxpr to one thread per
warpgroup (``jax._src.pallas.mosaic.interpret.thread_map._run_jaxpr``), which traces, lowers and
compiles it anew every time: with the same jaxpr and the same argument types for every CTA and
thread, the compiles were most of the time of the interpreted Mosaic GPU tests (a 10-CTA,
3-thread kernel: 30 compiles of one program, about 23 s; ``docs/perf-notes.md``, seventeenth
session). :func:`install` keeps each compiled program, keyed on the jaxpr object itself (held,
so its id cannot be reused) and the arguments' abstract values, and runs the kept one, which is
what ``jax.jit``'s own cache would do; the program's inputs (grid coordinates, thread id,
consts) stay runtime arguments, and the global settings that change a lowering (x64, default
matmul precision, debug_nans) are part of the key. The TPU interpreter's cores run through the
same function and are cached alike. Where this jax has no such function, or one of another
signature, it changes nothing.
"""

from __future__ import annotations

import collections
import inspect
import threading

KEPT = 32  # compiled kernel bodies kept (least recently used dropped)
COUNTS = collections.Counter()  # "compiled" and "reused" runs, for the test of this module


def install() -> bool:
    """Patch the interpreter's per-thread runner; True where it was patched."""
    try:
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:
        return False
    run = getattr(thread_map, "_run_jaxpr", None)
    if run is None or getattr(run, "_kept_compiles", False):
        return run is not None
    params = list(inspect.signature(run).parameters.values())
    if [p.name for p in params] != ["jaxpr", "consts", "args"]:
        return False

    import jax
    from jax import core

    kept: collections.OrderedDict = collections.OrderedDict()
    lock = threading.Lock()

    def body(jaxpr, consts, *args):
        core.eval_jaxpr(jaxpr, consts, *args)

    def run_kept(jaxpr, consts, *args):
        leaves = jax.tree.leaves((consts, args))
        settings = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
                    jax.config.jax_debug_nans)  # global settings that change a lowering
        key = (jaxpr, jax.tree.structure((consts, args)), tuple(map(jax.typeof, leaves)),
               settings)
        with lock:
            compiled = kept.get(key)
            if compiled is not None:
                kept.move_to_end(key)
            COUNTS["reused" if compiled is not None else "compiled"] += 1
        if compiled is None:
            compiled = jax.jit(body, static_argnums=(0,)).trace(jaxpr, consts, *args).lower() \
                .compile()
            with lock:
                kept[key] = compiled
                while len(kept) > KEPT:
                    kept.popitem(last=False)
        compiled(consts, *args)

    run_kept._kept_compiles = True
    thread_map._run_jaxpr = run_kept
    return True
