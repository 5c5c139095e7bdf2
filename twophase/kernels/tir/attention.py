"""GroupQueryAttention over a bound KV cache for the TVM backend: rotary, cache append and causal attention.

The TIR form of the com.microsoft.GroupQueryAttention node that BindKVCachePass emits (float32 or int8 cache):

    x_q [B, S, Hq*D], x_k / x_v [B, S, Hkv*D]      this step's projections (S axis right-padded)
    cache_k / cache_v [B, Hkv, C, D]                past AND present: the new positions are written in place
    seqlens_k [B] int32                             tokens in row b's cache after this step, minus one
    query_seqlens [B] int32                         valid new tokens of row b (0 = idle row, cache untouched)
    cos / sin [L, D/2]                              rotary tables, one row per position
    -> out [B, S, Hq*D]                             rows i >= query_seqlens[b] are padding (zeros)

    past = seqlens_k[b] + 1 - query_seqlens[b];  new token i of row b sits at position p = past + i
    cache_k[b, h, p] = rot(k[b, i, h], p);  cache_v[b, h, p] = v[b, i, h]
    out[b, i, hq] = softmax_j(cap(scale * rot(q[b, i, hq], p) . cache_k[b, hq // G, j])) @ cache_v[.., j],  j <= p

With an int8 cache (`kv_dtype="int8"`, BindKVCachePass's per (kv head, channel) scales k_scale / v_scale
[1, Hkv, 1, D], inputs after sin) the cache holds round_half_even(x / scale) saturated to [-128, 127], as ORT's
kernel stores it (k after the rotation); reads use q . (k_scale * codes) = (q * k_scale) . codes (q is scaled once
per task) and p @ (v_scale * codes) = (p @ codes) * v_scale (once per output row).

rot is the half-split (x1*cos - x2*sin, x2*cos + x1*sin) or, with `interleaved`, the pairwise rotation
(ORT's rotary_interleaved); cap(s) = softcap * tanh(s / softcap) when softcap != 0; G = Hq / Hkv.

Loops: a serial one writes this step's rotated K and raw V into the cache (tiny: S * Hkv rows per batch
row); a parallel one over (query block of `_BQ` rows, b, kv head) runs flash-style attention: the block's
rotated, pre-scaled queries of all G heads of the kv head stay in local memory, keys are visited in blocks
of `_BK` up to the block's last causal position (never the rest of the capacity) with an online softmax,
each K and V row loaded once for the G heads. With fewer than `split_tasks` tasks (decode at small batch)
each task's key range is split up to `_MAX_SPLIT` ways and a last serial loop merges the partial softmax
states. About two tasks per thread is best: each thread then streams long contiguous key ranges of a cache
that is cold in a decode step (SmolLM2 at 2 threads: split_tasks 4 instead of 16 gave 1.04-1.05x decode
tok/s end to end; lower_tvm passes twice the compile host's core count). Dot products are 8-lane FMA vectors over D, reduced horizontally; exp is a vectorized Cephes
polynomial (about 1 ulp); softcap's tanh is scalar.
With `prefetch_bytes` (lower_tvm passes the GEMV's, nonzero where its probe measured that prefetches pay), a
decode task requests its first K and V rows of that many bytes at its start, then each K row and V row that far
ahead of the one it reads: SmolLM2 w4a16 decode on an Intel Xeon VM, 2 threads, 13.4 -> 9.8 us per layer at
context 136, 1.04x tok/s end to end, paired (on AMD Zen 4 and an earlier Intel VM K/V prefetches had made decode
slower). Prefill tasks do not: each of their query rows would request the rows again (SmolLM2 prefill 0.92x).
Inconsistent lengths cannot write or read out of bounds: positions are checked against C and L.
"""

from __future__ import annotations

import math

from twophase.kernels.tir.fast_math import fast_exp
from twophase.kernels.tir.script import fast_macros

_VL = 8  # float32 lanes of a ymm register (AVX2)
_BK = 32  # keys per block of the online softmax
_BQ = 8  # query rows per parallel task (prefill); decode has one
SPLIT_TASKS = 16  # default: fewer attention tasks than this get their keys split (decode at small batch)
_MAX_SPLIT = 8
_EVEN, _ODD = list(range(0, 2 * _VL, 2)), list(range(1, 2 * _VL, 2))  # lanes of two concatenated vectors
_NEG = -3.0e38  # "minus infinity" that keeps exp() and max() free of NaN
# slots of a task's integer scratch (a stack array: TVMScript's `x = ...` scalars live in the workspace pool)
_B, _Z, _I0, _N, _PAST, _NR, _KEND, _CHUNK, _KB0, _KB1, _J0, _NK = range(12)
_NIX = 12


@fast_macros
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
    packed: bool = False,
    split_tasks: int = SPLIT_TASKS,
    prefetch_bytes: int = 0,
):
    """TIR GroupQueryAttention (module doc); args x_q, x_k, x_v, cache_k, cache_v, seqlens_k, cos, sin,
    query_seqlens, out, with B, S, C, L symbolic int64. cache_k / cache_v are written in place.
    `packed`: one x_qkv [B, S, (Hq + 2 Hkv) D] (q, then k, then v columns) replaces x_q, x_k, x_v.
    `split_tasks`: fewer (query block, row, kv head) tasks than this get their key ranges split (module doc).
    `prefetch_bytes`: software prefetch distance in a task's K and V rows (0: none; module doc).

    `rotary=False` skips the rotation (GroupQueryAttention with do_rotary=0; cos / sin are then unread).
    `kv_dtype="int8"` (BindKVCachePass's int8 cache): k_scale / v_scale [1, Hkv, 1, D] follow sin (module doc).
    """
    from tvm.script import tirx as T

    if kv_dtype not in ("float32", "int8"):
        raise ValueError(f"GroupQueryAttention: the KV cache is float32 or int8, got {kv_dtype!r}")
    int8 = kv_dtype == "int8"

    Hq, Hkv, D = num_heads, kv_num_heads, head_dim
    if Hq % Hkv:
        raise ValueError(f"num_heads {Hq} is not a multiple of kv_num_heads {Hkv}")
    if D % (2 * _VL):
        raise ValueError(f"head_dim must be a multiple of {2 * _VL}, got {D}")
    if split_tasks < 1:
        raise ValueError(f"split_tasks must be positive, got {split_tasks}")
    if prefetch_bytes < 0:
        raise ValueError(f"prefetch_bytes must be >= 0, got {prefetch_bytes}")
    G, H2, ND = Hq // Hkv, D // 2, D // _VL
    TASKS = int(split_tasks)
    qscale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
    cap = float(softcap)
    use_cap = cap != 0.0
    # the softcap is applied to scale * q.k, so q is pre-scaled only without it
    pre = 1.0 if use_cap else qscale
    inter = bool(interleaved)
    ROW = D * (1 if int8 else 4)  # bytes of a cache row
    LPR = -(-ROW // 64)  # its cache lines
    AH = -(-prefetch_bytes // ROW)  # rows ahead (0: no prefetch)
    EL = 64 // (1 if int8 else 4)  # elements per line

    @T.macro
    def prefetch_rows(CACHE, b, h, j, n):
        # request rows j .. j+n-1 of CACHE[b, h] (a hint: rows past the capacity are harmless)
        for jj in T.serial(n):
            for c in T.unroll(LPR):
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(CACHE[b, h, j + jj, c * EL]),
                                              0, 3, 1))

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

    def lane_sums(acc8, g):
        # float32 x 8: lane j = the sum of the 8 lanes of acc8[g, j] (a tree of shuffles and 7 vector adds)
        level = [acc8[g, j, T.ramp(0, 1, _VL)] for j in range(_VL)]
        while len(level) > 1:
            level = [T.Shuffle([a, b], _EVEN) + T.Shuffle([a, b], _ODD) for a, b in zip(level[::2], level[1::2])]
        return level[0]

    def cached(CACHE, b, h, j, d):
        # a cache element as float32; an int8 cache's scale is applied outside (module doc)
        return T.Cast("float32", CACHE[b, h, j, d]) if int8 else CACHE[b, h, j, d]

    def stored(x, SCALE, h, d):
        # x as the cache holds it: int8 codes round_half_even(x / scale) saturated to [-128, 127] (as ORT's kernel)
        if not int8:
            return x
        return T.Cast("int8", T.max(T.min(T.nearbyint(x / SCALE[0, h, 0, d]), T.float32(127)), T.float32(-128)))

    def k_scaled(x, KS, h, d):  # q . dequant(k) = (q * k_scale) . codes
        return x * KS[0, h, 0, d] if int8 else x

    def v_scaled(x, VS, h, d):  # p @ dequant(v) = (p @ codes) * v_scale
        return x * VS[0, h, 0, d] if int8 else x

    @T.macro
    def task_body(XQ, KC, VC, KS, VS, COS, SIN, OUT, part_o, part_ml, ix, t, h, NS, BQ, R):
        # one task: query rows ix[_I0] .. + ix[_NR] of row ix[_B] against kv head h, key blocks ix[_KB0] .. ix[_KB1]
        qs = T.alloc_buffer((R, D), "float32", scope="global")
        acc_o = T.alloc_buffer((R, D), "float32", scope="global")
        m = T.alloc_buffer((R,), "float32", scope="global")
        l = T.alloc_buffer((R,), "float32", scope="global")
        s = T.alloc_buffer((R, _BK), "float32", scope="global")
        acc = T.alloc_buffer((G, _VL), "float32", scope="global")
        acc8 = T.alloc_buffer((G, _VL, _VL), "float32", scope="global")
        red = T.alloc_buffer((_VL,), "float32", scope="global")
        red_d = T.alloc_buffer((D,), "float32", scope="global")
        sc = T.alloc_buffer((4,), "float32", scope="global")  # 0: dot, 1: max, 2: sum, 3: rescale / 1 / sum
        for r in T.serial(ix[_NR]):
            for g in T.serial(G):
                rotate(XQ, ix[_B], ix[_I0] + r, (h * G + g) * D, ix[_PAST] + ix[_I0] + r, red_d, COS, SIN)
                for d in T.vectorized(D):
                    qs[r * G + g, d] = k_scaled(red_d[d] * T.float32(pre), KS, h, d)
                    acc_o[r * G + g, d] = T.float32(0)
                m[r * G + g] = T.float32(_NEG)
                l[r * G + g] = T.float32(0)
        if AH > 0 and BQ == 1:  # the task's first rows, before the steady prefetches below run AH rows ahead
            prefetch_rows(KC, ix[_B], h, ix[_KB0] * _BK, AH)
            prefetch_rows(VC, ix[_B], h, ix[_KB0] * _BK, AH)
        for kb in T.serial(ix[_KB0], ix[_KB1]):
            ix[_J0] = kb * _BK
            for r in T.serial(ix[_NR]):
                ix[_NK] = T.min(ix[_PAST] + ix[_I0] + r + T.int64(1) - ix[_J0], T.int64(_BK))
                if ix[_NK] > T.int64(0):
                    for x in T.serial(G):
                        for jj in T.vectorized(_BK):
                            s[r * G + x, jj] = T.float32(_NEG)
                    # scores, 8 keys at a time: 8-lane partial dots for the G heads (each K row loaded once), then
                    # one shuffle-add tree per head turns the 8 keys' partial vectors into their 8 scores
                    for j8 in T.serial(ix[_NK] // _VL):
                        if AH > 0 and BQ == 1:
                            prefetch_rows(KC, ix[_B], h, ix[_J0] + j8 * _VL + AH, _VL)
                        for jj in T.unroll(_VL):
                            for g in T.unroll(G):
                                for v in T.vectorized(_VL):
                                    acc8[g, jj, v] = T.float32(0)
                            for d0 in T.unroll(ND):
                                for g in T.unroll(G):
                                    for v in T.vectorized(_VL):
                                        acc8[g, jj, v] = acc8[g, jj, v] + qs[r * G + g, d0 * _VL + v] * cached(
                                            KC, ix[_B], h, ix[_J0] + j8 * _VL + jj, d0 * _VL + v)
                        for g in T.unroll(G):
                            if use_cap:
                                red[T.ramp(0, 1, _VL)] = lane_sums(acc8, g)
                                for v in T.serial(_VL):
                                    s[r * G + g, j8 * _VL + v] = T.float32(cap) * T.tanh(
                                        red[v] * T.float32(qscale / cap))
                            else:
                                s[r * G + g, T.ramp(j8 * _VL, 1, _VL)] = lane_sums(acc8, g)
                    # the last NK % 8 keys one at a time
                    for jj in T.serial(ix[_NK] // _VL * _VL, ix[_NK]):
                        for g in T.unroll(G):
                            for v in T.vectorized(_VL):
                                acc[g, v] = T.float32(0)
                        for d0 in T.unroll(ND):
                            for g in T.unroll(G):
                                for v in T.vectorized(_VL):
                                    acc[g, v] = acc[g, v] + qs[r * G + g, d0 * _VL + v] * cached(
                                        KC, ix[_B], h, ix[_J0] + jj, d0 * _VL + v)
                        for g in T.unroll(G):
                            sc[0] = T.float32(0)
                            for v in T.unroll(_VL):
                                sc[0] = sc[0] + acc[g, v]
                            if use_cap:
                                s[r * G + g, jj] = T.float32(cap) * T.tanh(sc[0] * T.float32(qscale / cap))
                            else:
                                s[r * G + g, jj] = sc[0]
                    for g in T.serial(G):
                        for v in T.vectorized(_VL):
                            red[v] = s[r * G + g, v]
                        for j8 in T.serial(1, _BK // _VL):
                            for v in T.vectorized(_VL):
                                red[v] = T.max(red[v], s[r * G + g, j8 * _VL + v])
                        sc[1] = m[r * G + g]
                        for v in T.unroll(_VL):
                            sc[1] = T.max(sc[1], red[v])
                        sc[3] = fast_exp(m[r * G + g] - sc[1])
                        m[r * G + g] = sc[1]
                        for jj in T.vectorized(_BK):
                            s[r * G + g, jj] = fast_exp(s[r * G + g, jj] - sc[1])
                        for v in T.vectorized(_VL):
                            red[v] = s[r * G + g, v]
                        for j8 in T.serial(1, _BK // _VL):
                            for v in T.vectorized(_VL):
                                red[v] = red[v] + s[r * G + g, j8 * _VL + v]
                        sc[2] = l[r * G + g] * sc[3]
                        for v in T.unroll(_VL):
                            sc[2] = sc[2] + red[v]
                        l[r * G + g] = sc[2]
                        for d in T.vectorized(D):
                            acc_o[r * G + g, d] = acc_o[r * G + g, d] * sc[3]
                    # P @ V: the V row loaded once for the G heads
                    for jj in T.serial(ix[_NK]):
                        if AH > 0 and BQ == 1:
                            prefetch_rows(VC, ix[_B], h, ix[_J0] + jj + AH, 1)
                        for g in T.unroll(G):
                            for d in T.vectorized(D):
                                acc_o[r * G + g, d] = acc_o[r * G + g, d] + s[r * G + g, jj] * cached(
                                    VC, ix[_B], h, ix[_J0] + jj, d)
        if NS == 1:
            for r in T.serial(ix[_NR]):
                for g in T.serial(G):
                    sc[3] = T.float32(1) / l[r * G + g]
                    for d in T.vectorized(D):
                        OUT[ix[_B], ix[_I0] + r, (h * G + g) * D + d] = v_scaled(acc_o[r * G + g, d] * sc[3], VS, h, d)
        else:
            for rg in T.serial(ix[_NR] * G):
                part_ml[t, rg, 0] = m[rg]
                part_ml[t, rg, 1] = l[rg]
                for d in T.vectorized(D):
                    part_o[t, rg, d] = acc_o[rg, d]

    @T.macro
    def attend(XQ, XK, XV, KO, VO, KC, VC, KS, VS, SK, COS, SIN, QL, OUT, B, S, C, L, BQ, R):
        # XK / XV hold this step's K / V from column KO / VO (packed QKV: all three are the same buffer).
        # BQ: query rows per task (1 for decode: every scratch buffer then fits the stack); R = BQ * G.
        # Scalars are T.Bind (immutable, outside the parallel loop) or elements of small stack arrays (ix, sc):
        # a plain `x = ...` would be a one-element "local" buffer, which TVM takes from its workspace pool.
        # 1. append this step's rotated K and raw V (serial: S * Hkv rows per batch row)
        kr = T.alloc_buffer((D,), "float32", scope="global")
        for b in T.serial(B):
            n = T.Bind(T.min(T.Cast("int64", QL[b]), S))
            past = T.Bind(T.Cast("int64", SK[b]) + T.int64(1) - n)
            for i in T.serial(T.max(n, T.int64(0)), S):  # padding rows: zeros, not stale memory (NaN, denormals)
                for c in T.serial(Hq * D // _VL):
                    for v in T.vectorized(_VL):
                        OUT[b, i, c * _VL + v] = T.float32(0)
            for i in T.serial(n):
                p = T.Bind(past + i)
                if p >= T.int64(0) and p < C and p < L:
                    for h in T.serial(Hkv):
                        rotate(XK, b, i, KO + h * D, p, kr, COS, SIN)
                        for d in T.vectorized(D):
                            KC[b, h, p, d] = stored(kr[d], KS, h, d)
                            VC[b, h, p, d] = stored(XV[b, i, VO + h * D + d], VS, h, d)
        # 2. attention; tasks ordered (query block, b, kv head), the query blocks zigzagged so that a
        #    contiguous range of tasks (one thread's share) mixes short and long causal blocks. With
        #    fewer than split_tasks tasks (decode, small batch) each task's keys are split NS ways and the
        #    partial softmax states are merged in step 3.
        nqb = T.Bind((S + BQ - 1) // BQ)
        ntask = T.Bind(nqb * B * Hkv)
        NS = T.Bind(T.if_then_else(ntask >= TASKS, T.int64(1),
                                   T.min((TASKS + ntask - 1) // ntask, T.int64(_MAX_SPLIT))))
        part_o = T.alloc_buffer((TASKS * 2, R, D), "float32")
        part_ml = T.alloc_buffer((TASKS * 2, R, 2), "float32")
        for t in T.parallel(ntask * NS):
            # the task's integers (see the slots above), each computed once
            ix = T.alloc_buffer((_NIX,), "int64", scope="global")
            ix[_B] = t // NS % (B * Hkv) // Hkv
            ix[_Z] = t // NS // (B * Hkv)
            ix[_I0] = T.if_then_else(ix[_Z] % 2 == 0, ix[_Z] // 2, nqb - 1 - ix[_Z] // 2) * BQ
            ix[_N] = T.min(T.Cast("int64", QL[ix[_B]]), S)
            ix[_PAST] = T.Cast("int64", SK[ix[_B]]) + T.int64(1) - ix[_N]
            ix[_NR] = T.min(ix[_N] - ix[_I0], T.int64(BQ))
            ix[_KEND] = ix[_PAST] + ix[_I0] + ix[_NR]
            ix[_CHUNK] = ((ix[_KEND] + NS - 1) // NS + _BK - 1) // _BK * _BK
            ix[_KB0] = t % NS * ix[_CHUNK] // _BK
            ix[_KB1] = T.min(ix[_KB0] + ix[_CHUNK] // _BK, (ix[_KEND] + _BK - 1) // _BK)
            if ix[_NR] > T.int64(0) and ix[_PAST] >= T.int64(0) and ix[_KEND] <= T.min(C, L):
                task_body(XQ, KC, VC, KS, VS, COS, SIN, OUT, part_o, part_ml, ix, t, t // NS % Hkv, NS, BQ, R)
        # 3. merge the NS partial states of each split task: weights exp(m_j - max_j m_j)
        if NS > 1:
            mo = T.alloc_buffer((D,), "float32", scope="global")
            sm = T.alloc_buffer((2,), "float32", scope="global")  # 0: max, 1: sum of weights
            for task in T.serial(ntask):
                b = T.Bind(task % (B * Hkv) // Hkv)
                h = T.Bind(task % Hkv)
                n = T.Bind(T.min(T.Cast("int64", QL[b]), S))
                past = T.Bind(T.Cast("int64", SK[b]) + T.int64(1) - n)
                z = T.Bind(task // (B * Hkv))
                qb = T.Bind(T.if_then_else(z % 2 == 0, z // 2, nqb - 1 - z // 2))
                nr = T.Bind(T.min(n - qb * BQ, T.int64(BQ)))
                if nr > T.int64(0) and past >= T.int64(0) and past + qb * BQ + nr <= T.min(C, L):
                    for rg in T.serial(nr * G):
                        sm[0] = T.float32(_NEG)
                        for j in T.serial(NS):
                            sm[0] = T.max(sm[0], part_ml[task * NS + j, rg, 0])
                        sm[1] = T.float32(0)
                        for d in T.vectorized(D):
                            mo[d] = T.float32(0)
                        for j in T.serial(NS):
                            w = T.Bind(fast_exp(part_ml[task * NS + j, rg, 0] - sm[0]))
                            sm[1] = sm[1] + w * part_ml[task * NS + j, rg, 1]
                            for d in T.vectorized(D):
                                mo[d] = mo[d] + w * part_o[task * NS + j, rg, d]
                        for d in T.vectorized(D):
                            OUT[b, qb * BQ + rg // G, (h * G + rg % G) * D + d] = v_scaled(mo[d] / sm[1], VS, h, d)

    @T.macro
    def attend_any(XQ, XK, XV, KO, VO, KC, VC, KS, VS, SK, COS, SIN, QL, OUT, B, S, C, L):
        if S == 1:  # decode: one query row per task
            attend(XQ, XK, XV, KO, VO, KC, VC, KS, VS, SK, COS, SIN, QL, OUT, B, S, C, L, 1, G)
        else:
            attend(XQ, XK, XV, KO, VO, KC, VC, KS, VS, SK, COS, SIN, QL, OUT, B, S, C, L, _BQ, _BQ * G)

    if packed and int8:

        @T.prim_func
        def gqa(xqkv: T.handle, ck: T.handle, cv: T.handle, sk: T.handle, cs: T.handle, sn: T.handle, kss: T.handle,
                vss: T.handle, ql: T.handle, o: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
            B = T.int64()
            S = T.int64()
            C = T.int64()
            L = T.int64()
            QKV = T.match_buffer(xqkv, (B, S, (Hq + 2 * Hkv) * D), "float32")
            KC = T.match_buffer(ck, (B, Hkv, C, D), "int8")
            VC = T.match_buffer(cv, (B, Hkv, C, D), "int8")
            SK = T.match_buffer(sk, (B,), "int32")
            COS = T.match_buffer(cs, (L, H2), "float32")
            SIN = T.match_buffer(sn, (L, H2), "float32")
            KS = T.match_buffer(kss, (1, Hkv, 1, D), "float32")
            VS = T.match_buffer(vss, (1, Hkv, 1, D), "float32")
            QL = T.match_buffer(ql, (B,), "int32")
            OUT = T.match_buffer(o, (B, S, Hq * D), "float32")
            attend_any(QKV, QKV, QKV, Hq * D, (Hq + Hkv) * D, KC, VC, KS, VS, SK, COS, SIN, QL, OUT, B, S, C, L)

    elif packed:

        @T.prim_func
        def gqa(xqkv: T.handle, ck: T.handle, cv: T.handle, sk: T.handle, cs: T.handle, sn: T.handle, ql: T.handle,
                o: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
            B = T.int64()
            S = T.int64()
            C = T.int64()
            L = T.int64()
            QKV = T.match_buffer(xqkv, (B, S, (Hq + 2 * Hkv) * D), "float32")
            KC = T.match_buffer(ck, (B, Hkv, C, D), "float32")
            VC = T.match_buffer(cv, (B, Hkv, C, D), "float32")
            SK = T.match_buffer(sk, (B,), "int32")
            COS = T.match_buffer(cs, (L, H2), "float32")
            SIN = T.match_buffer(sn, (L, H2), "float32")
            QL = T.match_buffer(ql, (B,), "int32")
            OUT = T.match_buffer(o, (B, S, Hq * D), "float32")
            attend_any(QKV, QKV, QKV, Hq * D, (Hq + Hkv) * D, KC, VC, KC, VC, SK, COS, SIN, QL, OUT, B, S, C, L)

    elif int8:

        @T.prim_func
        def gqa(xq: T.handle, xk: T.handle, xv: T.handle, ck: T.handle, cv: T.handle, sk: T.handle,
                cs: T.handle, sn: T.handle, kss: T.handle, vss: T.handle, ql: T.handle, o: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
            B = T.int64()
            S = T.int64()
            C = T.int64()
            L = T.int64()
            XQ = T.match_buffer(xq, (B, S, Hq * D), "float32")
            XK = T.match_buffer(xk, (B, S, Hkv * D), "float32")
            XV = T.match_buffer(xv, (B, S, Hkv * D), "float32")
            KC = T.match_buffer(ck, (B, Hkv, C, D), "int8")
            VC = T.match_buffer(cv, (B, Hkv, C, D), "int8")
            SK = T.match_buffer(sk, (B,), "int32")
            COS = T.match_buffer(cs, (L, H2), "float32")
            SIN = T.match_buffer(sn, (L, H2), "float32")
            KS = T.match_buffer(kss, (1, Hkv, 1, D), "float32")
            VS = T.match_buffer(vss, (1, Hkv, 1, D), "float32")
            QL = T.match_buffer(ql, (B,), "int32")
            OUT = T.match_buffer(o, (B, S, Hq * D), "float32")
            attend_any(XQ, XK, XV, 0, 0, KC, VC, KS, VS, SK, COS, SIN, QL, OUT, B, S, C, L)

    else:

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
            attend_any(XQ, XK, XV, 0, 0, KC, VC, KC, VC, SK, COS, SIN, QL, OUT, B, S, C, L)

    return gqa
