"""TIR int8-activation decode GEMV (qgemv_a8) vs its NumPy reference: 4-bit with / without offset and zero,
blocks of 16 / 32 / 128 with K not a multiple of the block (nor of 4), 8-bit per channel and blocked, N tails,
M = 1..4 (and M = 6, which runs qmatmul's float GEMM on the same packed arrays), every ISA variant this machine
can run."""

from __future__ import annotations

import functools
import os
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from twophase.kernels.tir import qmatmul
from twophase.kernels.tir.qgemv_a8 import (
    MAX_M,
    PREFETCH_BYTES,
    QGemvA8Spec,
    pack,
    prim_func,
    quantize_rows,
    reference,
)
from twophase.kernels.tir.qmatmul_int8 import Isa, isa_for_target

AVX2 = {"kind": "llvm", "mcpu": "znver3"}  # the CI machines' ISA
SPECS = [
    QGemvA8Spec(4, 96, 70, 32, zero=8),  # symmetric int4 as codes q + 8; N tail of 6
    QGemvA8Spec(4, 100, 45, 32, has_offset=True),  # K % bs = 4 (a one-quad last block)
    QGemvA8Spec(4, 302, 33, 128, has_offset=True, zero=8),  # last block 46 rows: 11 quads + 2 tail rows
    QGemvA8Spec(4, 6, 5, 16),  # one block shorter than bs: 1 quad + 2 tail rows, N < one vector
    QGemvA8Spec(8, 77, 40, None, zero=-128),  # per channel (activation blocks of 32), K % 4 = 1
    QGemvA8Spec(8, 64, 100, 16, has_offset=True),
]


def _variants() -> list[tuple[Isa, dict]]:
    """(isa, target) for every variant up to this machine's best; AVX2 / generic built for znver3."""
    from twophase.compiler.lower_tvm import host_target

    host = host_target()["tvm_target"]
    best = isa_for_target(host)
    order = [Isa.GENERIC, Isa.AVX2, Isa.AVX512, Isa.AVX512_VNNI]
    host, avx2 = tuple(host.items()), tuple(AVX2.items())  # hashable
    out = [(Isa.GENERIC, avx2)]
    if best is not Isa.GENERIC:
        out += [(isa, avx2 if isa is Isa.AVX2 else host) for isa in order[1 : order.index(best) + 1]]
    return out


VARIANTS = _variants()
# the host's best and the CI machines' variant: every spec
FULL = {VARIANTS[-1], (Isa.AVX2, tuple(AVX2.items()))} & set(VARIANTS)
# the others (other dot products) on the 8-bit per-channel spec and one 4-bit spec: test time < 60 s
OTHERS = [v for v in VARIANTS if v not in FULL]
CASES = [(s, v) for s in SPECS for v in VARIANTS if v in FULL] + [(s, v) for s in (SPECS[2], SPECS[4]) for v in OTHERS]


@functools.cache
def _kernel(spec: QGemvA8Spec, isa: Isa, target: tuple, prefetch_bytes: int = 0):
    func = prim_func(spec, name="qgemv", isa=isa, prefetch_bytes=prefetch_bytes)
    return tvm.compile(func, target=tvm.target.Target(dict(target))).mod


def _weights(spec: QGemvA8Spec, rng: np.random.Generator):
    G = spec.weights.G
    if spec.bits == 4:
        codes = rng.integers(0, 16, (spec.K, spec.N)).astype(np.uint8)
    else:
        codes = rng.integers(-128, 128, (spec.K, spec.N)).astype(np.int8)  # -128 included
    scale = (rng.random((G, spec.N)) * 0.02 + 1e-3).astype(np.float32)
    offset = (rng.standard_normal((G, spec.N)) * 0.01).astype(np.float32) if spec.has_offset else None
    return codes, scale, offset


def _id(case) -> str:
    s, (isa, _) = case
    return f"b{s.bits}_k{s.K}_n{s.N}_bs{s.block_size}_o{int(s.has_offset)}_z{s.zero}-{isa.value}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case):
    spec, (isa, target) = case
    rng = np.random.default_rng(spec.K * 7 + spec.N)
    codes, scale, offset = _weights(spec, rng)
    mod = _kernel(spec, isa, target)
    fn = mod["qgemv"]
    packed = [tvm.runtime.tensor(a) for a in pack(spec, codes, scale, offset)]
    for M in (*range(1, MAX_M + 1), MAX_M + 2):
        X = rng.standard_normal((M, spec.K)).astype(np.float32)
        X[0, : min(spec.K, spec.XB)] = 0  # an all-zero activation block (scale 0)
        Y = tvm.runtime.tensor(np.full((M, spec.N), np.nan, np.float32))
        fn(tvm.runtime.tensor(X), *packed, Y)
        if M <= MAX_M:
            ref = reference(spec, X, codes, scale, offset)
            tol = 1e-5
        else:  # the float GEMM (qmatmul's) on the same arrays
            ref = qmatmul.reference(spec.weights, X, codes, scale, offset)
            tol = 1e-4
        np.testing.assert_allclose(Y.numpy(), ref, rtol=0, atol=tol * max(1.0, np.abs(ref).max()), err_msg=f"M={M}")


_POOL_SCRIPT = """
import sys
import numpy as np
import tvm
from twophase.kernels.tir.qgemv_a8 import QGemvA8Spec, pack, prim_func
from twophase.kernels.tir.qmatmul_int8 import Isa
isa, target, out = Isa(sys.argv[1]), sys.argv[2], sys.argv[3]
arrays = {}
for n in (20, 40, 300):  # 1 tile, 2, 10 (the last with a tail)
    spec = QGemvA8Spec(4, 96, n, 32, zero=8)
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 16, (spec.K, n)).astype(np.uint8)
    scale = (rng.random((spec.weights.G, n)) * 0.02 + 1e-3).astype(np.float32)
    packed = [tvm.runtime.tensor(a) for a in pack(spec, codes, scale)]
    fn = tvm.compile(prim_func(spec, name="qgemv", isa=isa), target=tvm.target.Target(target))["qgemv"]
    for M in (2, 7, 16):
        X = rng.standard_normal((M, spec.K)).astype(np.float32)
        Y = tvm.runtime.tensor(np.full((M, n), np.nan, np.float32))
        fn(tvm.runtime.tensor(X), *packed, Y)
        arrays[f"n{n}_m{M}"], arrays[f"x{n}_m{M}"], arrays[f"c{n}"], arrays[f"s{n}"] = Y.numpy(), X, codes, scale
np.savez(out, **arrays)
"""


def test_any_pool_size_computes_every_tile_once(tmp_path):
    """The parallel loop's first item holds LEAD_TILES + 1 tiles: with pools of 1, 2 and 3 threads (so ranges
    of items that start and end anywhere) and 1, 2 or 10 tiles, Y is the reference, bit for bit the same.
    M = 2, 7 and 16: rows in groups of ROW_GROUP per tile (and a remainder). TVM sizes its pool once, from
    TVM_NUM_THREADS (config_threadpool cannot grow it), so each pool size runs in a process of its own."""
    import json
    import subprocess
    import sys

    isa, target = VARIANTS[-1]
    outs = []
    for threads in (1, 2, 3):
        out = tmp_path / f"pool{threads}.npz"
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, "-c", _POOL_SCRIPT, isa.value, json.dumps(dict(target)),
                               str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(dict(np.load(out)))
    for n in (20, 40, 300):
        spec = QGemvA8Spec(4, 96, n, 32, zero=8)
        for M in (2, 7, MAX_M):
            key = f"n{n}_m{M}"
            ref = reference(spec, outs[0][f"x{n}_m{M}"], outs[0][f"c{n}"], outs[0][f"s{n}"])
            np.testing.assert_allclose(outs[0][key], ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=key)
            for other in outs[1:]:
                np.testing.assert_array_equal(other[key], outs[0][key], err_msg=key)


def test_each_row_as_alone():
    """Up to MAX_M rows, a row's output is bit for bit what the row gives alone (M = 1): rows are quantized
    and accumulated independently, whichever row group and position they take (a batched decode step
    gives each sequence the logits it gets alone)."""
    isa, target = VARIANTS[-1]
    spec = QGemvA8Spec(4, 200, 70, 32, has_offset=True, zero=8)
    rng = np.random.default_rng(5)
    codes, scale, offset = _weights(spec, rng)
    packed = [tvm.runtime.tensor(a) for a in pack(spec, codes, scale, offset)]
    fn = _kernel(spec, isa, target)["qgemv"]
    X = rng.standard_normal((MAX_M, spec.K)).astype(np.float32)
    alone = []
    for m in range(MAX_M):
        Y = tvm.runtime.tensor(np.full((1, spec.N), np.nan, np.float32))
        fn(tvm.runtime.tensor(X[m : m + 1]), *packed, Y)
        alone.append(Y.numpy()[0])
    for M in (2, 5, 6, 11, MAX_M):
        Y = tvm.runtime.tensor(np.full((M, spec.N), np.nan, np.float32))
        fn(tvm.runtime.tensor(X[:M]), *packed, Y)
        np.testing.assert_array_equal(Y.numpy(), np.stack(alone[:M]), err_msg=f"M={M}")


def test_max_rows_out_of_range():
    spec = QGemvA8Spec(4, 96, 40, 32, zero=8)
    for rows in (0, MAX_M + 1):
        with pytest.raises(ValueError, match=rf"max_rows must be in 1\.\.{MAX_M}, got {rows}"):
            prim_func(spec, max_rows=rows)


@pytest.mark.parametrize("spec", [SPECS[1], SPECS[4], SPECS[5]], ids=["b4_off", "b8_chan", "b8_off"])
def test_prefetch_changes_no_bit(spec: QGemvA8Spec):
    """Software prefetches of W, its scales and offsets (PREFETCH_BYTES ahead, and a distance past the end of
    every array) are hints: Y is bit for bit the kernel's without them, for one row and a row group + rest.
    The kernel does emit them (prefetcht0 beyond the activation prefetches the kernel without them has)."""
    isa, target = VARIANTS[-1]
    rng = np.random.default_rng(11)
    codes, scale, offset = _weights(spec, rng)
    packed = [tvm.runtime.tensor(a) for a in pack(spec, codes, scale, offset)]
    for M in (1, 7):
        X = tvm.runtime.tensor(rng.standard_normal((M, spec.K)).astype(np.float32))
        outs = []
        for distance in (0, PREFETCH_BYTES, 1 << 20):
            Y = tvm.runtime.tensor(np.full((M, spec.N), np.nan, np.float32))
            _kernel(spec, isa, target, distance)["qgemv"](X, *packed, Y)
            outs.append(Y.numpy())
        for out in outs[1:]:
            np.testing.assert_array_equal(out, outs[0], err_msg=f"M={M}")
    count = [len(re.findall(r"\bprefetcht0\b", _kernel(spec, isa, target, d).inspect_source("asm")))
             for d in (0, PREFETCH_BYTES)]
    assert count[1] > count[0], count


def test_probe_prefetch_measures_and_decides(monkeypatch):
    """probe_prefetch times both builds in paired passes and turns prefetching on exactly from PROBE_MIN_SPEEDUP:
    with the threshold below any speedup it picks PREFETCH_BYTES, above any it picks none."""
    from twophase.kernels.tir import qgemv_a8

    isa, target = VARIANTS[-1]
    monkeypatch.setattr(qgemv_a8, "PROBE_MIB", 2)
    monkeypatch.setattr(qgemv_a8, "PROBE_ROUNDS", 3)
    monkeypatch.setattr(qgemv_a8, "PROBE_MIN_SPEEDUP", 0.0)
    on = qgemv_a8.probe_prefetch(dict(target), isa)
    assert on.prefetch_bytes == PREFETCH_BYTES and on.rounds == 3 and on.speedup > 0
    monkeypatch.setattr(qgemv_a8, "PROBE_MIN_SPEEDUP", 1e9)
    assert qgemv_a8.probe_prefetch(dict(target), isa).prefetch_bytes == 0


def test_prefetch_bytes_out_of_range():
    with pytest.raises(ValueError, match=r"prefetch_bytes must be >= 0, got -64"):
        prim_func(QGemvA8Spec(4, 96, 40, 32, zero=8), prefetch_bytes=-64)


def test_reference_is_dequantized_product():
    """The reference equals the float64 product of the dequantized int8 activations and dequantized weights."""
    spec = QGemvA8Spec(4, 100, 20, 32, has_offset=True, zero=8)
    rng = np.random.default_rng(3)
    codes, scale, offset = _weights(spec, rng)
    X = rng.standard_normal((2, spec.K)).astype(np.float32)
    q, sx, _ = quantize_rows(spec, X)
    xd = q * np.repeat(sx.astype(np.float64), spec.XB, axis=1)[:, : spec.K]
    rows = np.arange(spec.K) // 32
    W = (codes.astype(np.float64) - 8) * scale.astype(np.float64)[rows] + offset.astype(np.float64)[rows]
    np.testing.assert_allclose(reference(spec, X, codes, scale, offset), xd @ W, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[4]], ids=["b4", "b8"])
def test_asm_uses_integer_dot_products(spec: QGemvA8Spec):
    """The host's best variant emits vpdpbusd (AVX512-VNNI); the AVX2 variant vpmaddwd. The quad-interleaved
    codes go into them as loaded: no byte permute (vpermb / vpermt2b / vpermi2b) anywhere in the GEMV."""
    for isa, target in FULL:
        if isa not in (Isa.AVX2, Isa.AVX512_VNNI):
            continue
        asm = _kernel(spec, isa, target).inspect_source("asm")
        want = "vpdpbusd" if isa is Isa.AVX512_VNNI else "vpmaddwd"
        assert len(re.findall(rf"\b{want}\b", asm)) > 0, isa
        if isa is Isa.AVX512_VNNI:
            gemv = asm.split("vpdpbusd", 1)[1].rsplit("vpdpbusd", 1)[0]  # from the first dot product to the last
            assert not re.findall(r"\bvperm[it]?2?b\b", gemv), isa
