"""float32 arithmetic for the compiled kernels (numba): bit casts, and a logarithm that LLVM vectorises.

`log32` is Cephes' single-precision logarithm (the exponent from the float's bits, then a degree-9 polynomial in
the mantissa; relative error ≤ 3e-7, the accuracy of a float32), written without a branch so that a loop calling it
vectorises. It needs a normal float32 > 0: callers take it of max(x, TINY).
"""

from __future__ import annotations

import numpy as np

try:
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the package importable without it
    HAVE_NUMBA = False

# ln is taken of max(x, TINY), the smallest normal float32 (log32 reads the exponent bits: no subnormals): x ln x is
# exactly 0 at x = 0, and below 1.1e-36 in size for any x below TINY
TINY = float(np.finfo(np.float32).tiny)

# Only the flags that reorder arithmetic: a sum may be vectorised, and no NaN or infinity is assumed away.
FAST = {"contract", "reassoc", "nsz", "arcp"}

if HAVE_NUMBA:

    @intrinsic
    def float_bits(typingctx, x):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """A float32's bits as an int32 (a bitcast: one register move, vectorisable)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.bitcast(args[0], ir.IntType(32))

        return types.int32(types.float32), codegen

    @intrinsic
    def bits_float(typingctx, i):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """An int32's bits as a float32."""
        if i != types.int32:
            return None

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen

    @njit(inline="always", fastmath=FAST)
    def log32(x):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        """ln x for a normal float32 x > 0: x = m · 2^e with m in [√½, √2), ln x = e ln 2 + ln(1 + f), f = m − 1."""
        bits = float_bits(x)
        e = ((bits >> 23) & 0xFF) - 126
        m = bits_float(np.int32((bits & 0x007FFFFF) | 0x3F000000))  # [0.5, 1)
        small = m < np.float32(0.70710678)
        e = e - small
        f = (m + m if small else m) - np.float32(1.0)
        z = f * f
        y = np.float32(7.0376836292e-2)
        y = y * f + np.float32(-1.1514610310e-1)
        y = y * f + np.float32(1.1676998740e-1)
        y = y * f + np.float32(-1.2420140846e-1)
        y = y * f + np.float32(1.4249322787e-1)
        y = y * f + np.float32(-1.6668057665e-1)
        y = y * f + np.float32(2.0000714765e-1)
        y = y * f + np.float32(-2.4999993993e-1)
        y = y * f + np.float32(3.3333331174e-1)
        y = y * f * z
        exponent = np.float32(e)
        y = y + np.float32(-2.12194440e-4) * exponent - np.float32(0.5) * z
        return f + y + np.float32(0.693359375) * exponent  # ln 2 = 0.693359375 − 2.12194440e-4, in two parts
