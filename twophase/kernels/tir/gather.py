"""Quantized embedding lookup for the TVM backend: rows of a 4- or 8-bit table, dequantized on the fly.

    out[i, d] = codes[ids[i], d] * scale[ids[i], d // bs] + offset[ids[i], d // bs]     (offset optional)

4-bit codes are unsigned (0..15), two per byte, low nibble first: table [V, ceil(D / 2)] uint8;
8-bit codes are signed: table [V, D] int8. One block spanning D (bs = D) is a per-row scale.
Indices outside [0, V) are clamped (memory safety; the runtime rejects them before a call).
"""

from __future__ import annotations

import numpy as np


def pack_table(
    bits: int, codes_VD: np.ndarray, scale_VG: np.ndarray, offset_VG: np.ndarray | None = None
) -> list[np.ndarray]:
    """[table, scale[, offset]] in the kernel's layout (see module doc)."""
    V, D = codes_VD.shape
    if bits == 4:
        c = np.asarray(codes_VD, np.uint8)
        if c.max(initial=0) > 15:
            raise ValueError("4-bit codes must be in 0..15")
        if D % 2:
            c = np.concatenate([c, np.zeros((V, 1), np.uint8)], axis=1)
        table = (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
    elif bits == 8:
        table = np.asarray(codes_VD, np.int8)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    out = [np.ascontiguousarray(table), np.ascontiguousarray(scale_VG, np.float32)]
    if offset_VG is not None:
        out.append(np.ascontiguousarray(offset_VG, np.float32))
    return out


def reference(bits: int, ids: np.ndarray, codes_VD: np.ndarray, scale_VG: np.ndarray, offset_VG=None) -> np.ndarray:
    D = codes_VD.shape[1]
    bs = -(-D // scale_VG.shape[1])
    W = codes_VD.astype(np.float64) * np.repeat(scale_VG, bs, axis=1)[:, :D]
    if offset_VG is not None:
        W += np.repeat(offset_VG, bs, axis=1)[:, :D]
    return W[np.asarray(ids).reshape(-1)].astype(np.float32)


def gather_prim_func(bits: int, V: int, D: int, G: int, has_offset: bool):
    """args: table, ids [n] int64 (n symbolic), scale [V, G][, offset [V, G]], out [n, D] float32."""
    from tvm import te, tirx

    bs = -(-D // G)
    n = tirx.Var("n", "int64")
    ids = te.placeholder((n,), "int64", name="ids")
    if bits == 4:
        table = te.placeholder((V, (D + 1) // 2), "uint8", name="table")
    else:
        table = te.placeholder((V, D), "int8", name="table")
    scale = te.placeholder((V, G), "float32", name="scale")
    offset = te.placeholder((V, G), "float32", name="offset") if has_offset else None

    def row(i):
        return tirx.max(tirx.min(ids[i], tirx.const(V - 1, "int64")), tirx.const(0, "int64"))

    def code(r, d):
        if bits == 4:
            byte = table[r, d // 2].astype("int32")
            return ((byte >> ((d % 2) * 4).astype("int32")) & 15).astype("float32")
        return table[r, d].astype("float32")

    def value(i, d):
        r = row(i)
        w = code(r, d) * scale[r, d // bs]
        return w + offset[r, d // bs] if has_offset else w

    out = te.compute((n, D), value, name="embedding")
    args = [table, ids, scale] + ([offset] if has_offset else []) + [out]
    return te.create_prim_func(args).with_attr("tir.noalias", True)
