"""Fixes to the Triton 3.6 interpreter (``TRITON_INTERPRET=1``) that the CCA kernels need on CPU.

``kernels/triton_common.py`` (imported by every Triton kernel module) calls
:func:`patch_interpreter` when it is imported in interpreter mode (never for compiled GPU kernels). Each fix is registered through the interpreter's own per-launch
patch scope, so it is active only while an interpreted kernel runs.
"""

from __future__ import annotations

import numpy as np
import triton.language as tl


def patch_interpreter() -> None:
    """Three fixes to Triton 3.6's interpreter (idempotent).

    * Scalar loop bounds are turned into ints with ``int(array of shape (1,))``, which numpy >= 2.4
      refuses (triton-lang/triton#9171, fixed after 3.6): use ``.item()``.
    * float32 -> bfloat16 casts truncate, where the GPU (and torch, and XLA) round to nearest
      even: round to nearest even, so interpreted bf16 results carry the GPU's rounding error.
    * If triton itself was imported before TRITON_INTERPRET=1 was set (``torch._dynamo`` imports
      it, e.g. through transformers' LLaMA), the language's own ``@jit`` helpers (``tl.sum``,
      ``tl.max``, ``tl.zeros``...) are compiled-mode functions the interpreter refuses to call.
      Each launch gets interpreted twins of them instead.

    All go through the interpreter's per-launch patch scope, so they are undone after a launch.
    """
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    if getattr(interpreter._patch_lang, "cca_fix", False):
        return
    patch_lang_tensor = interpreter._patch_lang_tensor
    patch_lang = interpreter._patch_lang
    twins: dict = {}

    def patch_lang_tensor_fixed(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    builder_cls = type(interpreter.interpreter_builder)
    fp_trunc = builder_cls.create_fp_trunc

    def fp_trunc_rtne(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return fp_trunc(self, src, dst_type)
        # Round to nearest even on the bits (a carry may run into the exponent, as it must).
        data = np.asarray(src.data, dtype=np.float32)
        bits = data.view(np.uint32).astype(np.uint64)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        out[np.isnan(data)] = 0x7FC0
        return interpreter.TensorHandle(out, dst_type.scalar)

    def patch_lang_fixed(fn):
        scope = patch_lang(fn)
        if builder_cls.create_fp_trunc is fp_trunc:
            scope.set_attr(builder_cls, "create_fp_trunc", fp_trunc_rtne)
        for module in (tl, tl.core, tl.standard, tl.math):
            for name, value in list(vars(module).items()):
                if type(value) is JITFunction:  # compiled-mode helper: swap in its twin
                    if id(value) not in twins:  # (hashing a JITFunction compiles its key)
                        twins[id(value)] = (value, interpreter.InterpretedFunction(value.fn))
                    scope.set_attr(module, name, twins[id(value)][1])
        return scope

    patch_lang_fixed.cca_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor_fixed
    interpreter._patch_lang = patch_lang_fixed
    try:  # Triton imports gluon lazily at the first launch and checks the mode then: do it now.
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
