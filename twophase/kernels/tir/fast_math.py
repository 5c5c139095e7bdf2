"""Vectorizable float32 math for the TIR kernels: LLVM lowers tir exp / sigmoid to a scalar libm call per
lane, which costs more than the memory traffic of a decode step's elementwise work."""

from __future__ import annotations


def fast_exp(x):
    """Cephes expf as a PrimExpr: 2^n * P(r), r = x - n ln2 in [-ln2/2, ln2/2]; about 1 ulp; x <= -87.3 gives 0,
    x >= 88.4 the largest power of two below float32's overflow (no inf, no NaN)."""
    from tvm import tirx

    f32 = lambda c: tirx.const(c, "float32")
    xc = tirx.max(tirx.min(x, f32(88.3762626647949)), f32(-88.3762626647949))
    n = tirx.floor(xc * f32(1.44269504088896341) + f32(0.5))
    r = xc - n * f32(0.693359375) + n * f32(2.12194440e-4)
    p = f32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f32(c)
    e = p * r * r + r + f32(1.0)
    bits = tirx.shift_left(tirx.max(n.astype("int32") + 127, 0), 23)
    return e * tirx.reinterpret("float32", bits)


def silu(x):
    """x * sigmoid(x) = x / (1 + exp(-x)), with fast_exp (finite for every finite x)."""
    from tvm import tirx

    return x / (tirx.const(1.0, "float32") + fast_exp(-x))
