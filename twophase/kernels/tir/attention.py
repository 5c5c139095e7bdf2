"""GroupQueryAttention over a bound KV cache for the TVM backend: rotary, cache append and causal attention.

The TIR form of the com.microsoft.GroupQueryAttention node that BindKVCachePass emits (float32 cache):

    x_q [B, S, Hq*D], x_k / x_v [B, S, Hkv*D]      this step's projections (S axis right-padded)
    cache_k / cache_v [B, Hkv, C, D]                past AND present: the new positions are written in place
    seqlens_k [B] int32                             tokens in row b's cache after this step, minus one
    query_seqlens [B] int32                         valid new tokens of row b (0 = idle row, cache untouched)
    cos / sin [L, D/2]                              rotary tables, one row per position
    -> out [B, S, Hq*D]                             rows i >= query_seqlens[b] are padding (left unwritten)

    past = seqlens_k[b] + 1 - query_seqlens[b];  new token i of row b sits at position p = past + i
    cache_k[b, h, p] = rot(k[b, i, h], p);  cache_v[b, h, p] = v[b, i, h]
    out[b, i, hq] = softmax_j(cap(scale * rot(q[b, i, hq], p) . cache_k[b, hq // G, j])) @ cache_v[.., j],  j <= p

rot is the half-split (x1*cos - x2*sin, x2*cos + x1*sin) or, with `interleaved`, the pairwise rotation
(ORT's rotary_interleaved); cap(s) = softcap * tanh(s / softcap) when softcap != 0; G = Hq / Hkv.

Loops: a serial one writes this step's rotated K and raw V into the cache (tiny: S * Hkv rows per batch
row); a parallel one over (query block of `_BQ` rows, b, kv head) runs flash-style attention: the block's
rotated, pre-scaled queries of all G heads of the kv head stay in local memory, keys are visited in blocks
of `_BK` up to the block's last causal position (never the rest of the capacity) with an online softmax,
each K and V row loaded once for the G heads. With fewer than `_TASKS` tasks (decode at small batch) each
task's key range is split up to `_MAX_SPLIT` ways and a last serial loop merges the partial softmax
states. Dot products are 8-lane FMA vectors over D, reduced horizontally; exp is a vectorized Cephes
polynomial (about 1 ulp); softcap's tanh is scalar.
Inconsistent lengths cannot write or read out of bounds: positions are checked against C and L.
"""

from __future__ import annotations

import math

_VL = 8  # float32 lanes of a ymm register (AVX2)
_BK = 32  # keys per block of the online softmax
_BQ = 8  # query rows per parallel task (prefill); decode has one
_TASKS = 16  # fewer attention tasks than this get their keys split (decode at small batch)
_MAX_SPLIT = 8
_NEG = -3.0e38  # "minus infinity" that keeps exp() and max() free of NaN


def _fast_exp(x):
    """Cephes expf as a PrimExpr: 2^n * P(r), r = x - n ln2 in [-ln2/2, ln2/2]; x <= -87.3 gives 0."""
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


def gqa_prim_func(
    num_heads: int,
    kv_num_heads: int,
    head_dim: int,
    *,
    scale: float | None,
    softcap: float,
    interleaved: bool,
    rotary: bool = True,
    kv_dtype: str = "float32",
):
    """TIR GroupQueryAttention (module doc); args x_q, x_k, x_v, cache_k, cache_v, seqlens_k, cos, sin,
    query_seqlens, out, with B, S, C, L symbolic int64. cache_k / cache_v are written in place.

    `rotary=False` skips the rotation (GroupQueryAttention with do_rotary=0; cos / sin are then unread).
    Only a float32 cache: the int8 variant (BindKVCachePass kv_dtype="int8") raises NotImplementedError.
    """
    from tvm.script import tirx as T

    if kv_dtype != "float32":
        raise NotImplementedError(f"GroupQueryAttention over a {kv_dtype} KV cache has no TIR kernel (only float32)")

    Hq, Hkv, D = num_heads, kv_num_heads, head_dim
    if Hq % Hkv:
        raise ValueError(f"num_heads {Hq} is not a multiple of kv_num_heads {Hkv}")
    if D % (2 * _VL):
        raise ValueError(f"head_dim must be a multiple of {2 * _VL}, got {D}")
    G, H2, ND = Hq // Hkv, D // 2, D // _VL
    R = _BQ * G  # query rows (row x head) of one task
    qscale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    cap = float(softcap)
    use_cap = cap != 0.0
    # the softcap is applied to scale * q.k, so q is pre-scaled only without it
    pre = 1.0 if use_cap else qscale
    inter = bool(interleaved)

    @T.macro
    def rotate(X, b, i, col, p, Y, COS, SIN):
        # Y[0:D] = the head vector X[b, i, col : col + D] rotated to position p
        if not rotary:
            for d in T.vectorized(D):
                Y[d] = X[b, i, col + d]
        elif inter:
            for k in T.vectorized(H2):
                Y[2 * k] = X[b, i, col + 2 * k] * COS[p, k] - X[b, i, col + 2 * k + 1] * SIN[p, k]
                Y[2 * k + 1] = X[b, i, col + 2 * k + 1] * COS[p, k] + X[b, i, col + 2 * k] * SIN[p, k]
        else:
            for k in T.vectorized(H2):
                Y[k] = X[b, i, col + k] * COS[p, k] - X[b, i, col + k + H2] * SIN[p, k]
                Y[k + H2] = X[b, i, col + k + H2] * COS[p, k] + X[b, i, col + k] * SIN[p, k]

    @T.prim_func
    def gqa(xq: T.handle, xk: T.handle, xv: T.handle, ck: T.handle, cv: T.handle, sk: T.handle,
            cs: T.handle, sn: T.handle, ql: T.handle, o: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
        B = T.int64()
        S = T.int64()
        C = T.int64()
        L = T.int64()
        XQ = T.match_buffer(xq, (B, S, Hq * D), "float32")
        XK = T.match_buffer(xk, (B, S, Hkv * D), "float32")
        XV = T.match_buffer(xv, (B, S, Hkv * D), "float32")
        KC = T.match_buffer(ck, (B, Hkv, C, D), "float32")
        VC = T.match_buffer(cv, (B, Hkv, C, D), "float32")
        SK = T.match_buffer(sk, (B,), "int32")
        COS = T.match_buffer(cs, (L, H2), "float32")
        SIN = T.match_buffer(sn, (L, H2), "float32")
        QL = T.match_buffer(ql, (B,), "int32")
        OUT = T.match_buffer(o, (B, S, Hq * D), "float32")
        # 1. append this step's rotated K and raw V (serial: S * Hkv rows per batch row)
        kr = T.alloc_local((D,), "float32")
        for b in T.serial(B):
            n = T.min(T.Cast("int64", QL[b]), S)
            past = T.Cast("int64", SK[b]) + T.int64(1) - n
            for i in T.serial(n):
                p = past + i
                if p >= T.int64(0) and p < C and p < L:
                    for h in T.serial(Hkv):
                        rotate(XK, b, i, h * D, p, kr, COS, SIN)
                        for d in T.vectorized(D):
                            KC[b, h, p, d] = kr[d]
                            VC[b, h, p, d] = XV[b, i, h * D + d]
        # 2. attention; tasks ordered (query block, b, kv head), the query blocks zigzagged so that a
        #    contiguous range of tasks (one thread's share) mixes short and long causal blocks. With
        #    fewer than _TASKS tasks (decode, small batch) each task's keys are split NS ways and the
        #    partial softmax states are merged in step 3.
        nqb = (S + _BQ - 1) // _BQ
        ntask = nqb * B * Hkv
        NS = T.if_then_else(ntask >= _TASKS, T.int64(1), T.min((_TASKS + ntask - 1) // ntask, T.int64(_MAX_SPLIT)))
        part_o = T.alloc_buffer((_TASKS * 2, R, D), "float32")
        part_ml = T.alloc_buffer((_TASKS * 2, R, 2), "float32")
        for t in T.parallel(ntask * NS):
            task = t // NS
            z = task // (B * Hkv)
            qb = T.if_then_else(z % 2 == 0, z // 2, nqb - 1 - z // 2)
            b = task % (B * Hkv) // Hkv
            h = task % Hkv
            n = T.min(T.Cast("int64", QL[b]), S)
            past = T.Cast("int64", SK[b]) + T.int64(1) - n
            i0 = qb * _BQ
            nr = T.min(n - i0, T.int64(_BQ))
            kend = past + i0 + nr
            chunk = ((kend + NS - 1) // NS + _BK - 1) // _BK * _BK
            kb0 = t % NS * chunk // _BK
            kb1 = T.min(kb0 + chunk // _BK, (kend + _BK - 1) // _BK)
            if nr > T.int64(0) and past >= T.int64(0) and kend <= T.min(C, L):
                qs = T.alloc_local((R, D), "float32")
                acc_o = T.alloc_local((R, D), "float32")
                m = T.alloc_local((R,), "float32")
                l = T.alloc_local((R,), "float32")
                s = T.alloc_local((R, _BK), "float32")
                acc = T.alloc_local((G, _VL), "float32")
                red = T.alloc_local((_VL,), "float32")
                red_d = T.alloc_local((D,), "float32")
                for r in T.serial(nr):
                    for g in T.serial(G):
                        rotate(XQ, b, i0 + r, (h * G + g) * D, past + i0 + r, red_d, COS, SIN)
                        for d in T.vectorized(D):
                            qs[r * G + g, d] = red_d[d] * T.float32(pre)
                            acc_o[r * G + g, d] = T.float32(0)
                        m[r * G + g] = T.float32(_NEG)
                        l[r * G + g] = T.float32(0)
                for kb in T.serial(kb0, kb1):
                    j0 = kb * _BK
                    for r in T.serial(nr):
                        nk = T.min(past + i0 + r + T.int64(1) - j0, T.int64(_BK))
                        if nk > T.int64(0):
                            for x in T.serial(G):
                                for jj in T.vectorized(_BK):
                                    s[r * G + x, jj] = T.float32(_NEG)
                            # scores: 8-lane partial dots for the G heads, K row loaded once
                            for jj in T.serial(nk):
                                for g in T.unroll(G):
                                    for v in T.vectorized(_VL):
                                        acc[g, v] = T.float32(0)
                                for d0 in T.unroll(ND):
                                    for g in T.unroll(G):
                                        for v in T.vectorized(_VL):
                                            acc[g, v] = acc[g, v] + qs[r * G + g, d0 * _VL + v] * KC[b, h, j0 + jj, d0 * _VL + v]
                                for g in T.unroll(G):
                                    dot: T.float32 = T.float32(0)
                                    for v in T.unroll(_VL):
                                        dot = dot + acc[g, v]
                                    if use_cap:
                                        s[r * G + g, jj] = T.float32(cap) * T.tanh(dot * T.float32(qscale / cap))
                                    else:
                                        s[r * G + g, jj] = dot
                            for g in T.serial(G):
                                rg = r * G + g
                                for v in T.vectorized(_VL):
                                    red[v] = s[rg, v]
                                for j8 in T.serial(1, _BK // _VL):
                                    for v in T.vectorized(_VL):
                                        red[v] = T.max(red[v], s[rg, j8 * _VL + v])
                                mx: T.float32 = m[rg]
                                for v in T.unroll(_VL):
                                    mx = T.max(mx, red[v])
                                alpha: T.float32 = _fast_exp(m[rg] - mx)
                                m[rg] = mx
                                for jj in T.vectorized(_BK):
                                    s[rg, jj] = _fast_exp(s[rg, jj] - mx)
                                for v in T.vectorized(_VL):
                                    red[v] = s[rg, v]
                                for j8 in T.serial(1, _BK // _VL):
                                    for v in T.vectorized(_VL):
                                        red[v] = red[v] + s[rg, j8 * _VL + v]
                                tot: T.float32 = l[rg] * alpha
                                for v in T.unroll(_VL):
                                    tot = tot + red[v]
                                l[rg] = tot
                                for d in T.vectorized(D):
                                    acc_o[rg, d] = acc_o[rg, d] * alpha
                            # P @ V: the V row loaded once for the G heads
                            for jj in T.serial(nk):
                                for g in T.unroll(G):
                                    for d in T.vectorized(D):
                                        acc_o[r * G + g, d] = acc_o[r * G + g, d] + s[r * G + g, jj] * VC[b, h, j0 + jj, d]
                if NS == 1:
                    for r in T.serial(nr):
                        for g in T.serial(G):
                            inv: T.float32 = T.float32(1) / l[r * G + g]
                            for d in T.vectorized(D):
                                OUT[b, i0 + r, (h * G + g) * D + d] = acc_o[r * G + g, d] * inv
                else:
                    for rg in T.serial(nr * G):
                        part_ml[t, rg, 0] = m[rg]
                        part_ml[t, rg, 1] = l[rg]
                        for d in T.vectorized(D):
                            part_o[t, rg, d] = acc_o[rg, d]
        # 3. merge the NS partial states of each split task: weights exp(m_j - max_j m_j)
        if NS > 1:
            mo = T.alloc_local((D,), "float32")
            for task in T.serial(ntask):
                b = task % (B * Hkv) // Hkv
                h = task % Hkv
                n = T.min(T.Cast("int64", QL[b]), S)
                past = T.Cast("int64", SK[b]) + T.int64(1) - n
                z = task // (B * Hkv)
                qb = T.if_then_else(z % 2 == 0, z // 2, nqb - 1 - z // 2)
                nr = T.min(n - qb * _BQ, T.int64(_BQ))
                if nr > T.int64(0) and past >= T.int64(0) and past + qb * _BQ + nr <= T.min(C, L):
                    for rg in T.serial(nr * G):
                        mx: T.float32 = T.float32(_NEG)
                        for j in T.serial(NS):
                            mx = T.max(mx, part_ml[task * NS + j, rg, 0])
                        tot: T.float32 = T.float32(0)
                        for d in T.vectorized(D):
                            mo[d] = T.float32(0)
                        for j in T.serial(NS):
                            w: T.float32 = _fast_exp(part_ml[task * NS + j, rg, 0] - mx)
                            tot = tot + w * part_ml[task * NS + j, rg, 1]
                            for d in T.vectorized(D):
                                mo[d] = mo[d] + w * part_o[task * NS + j, rg, d]
                        for d in T.vectorized(D):
                            OUT[b, qb * _BQ + rg // G, (h * G + rg % G) * D + d] = mo[d] / tot

    return gqa
