"""How close the decode GEMVs stream to the machine's read bandwidth, and which prefetch distance serves them best.

    python benchmarks/tir_gemv_stream.py [--threads 2] [--reps 10] [--prefetch 0,4096]

One token's weight GEMVs of SmolLM2-135M after the TVM fusions (per layer: q|k|v 576x960, o 576x576, gate|up
576x3072, down 1536x576; then the 576x49152 lm_head), int4 block 32 at accuracy level 4 (`qgemv_a8`, the host's
best ISA), one batch row, in decode order, every layer with its own weight copy (84 MB: streamed from DRAM, not
the L3). Per repetition, interleaved: the numpy read bandwidth of `benchmarks/phases.py --roofline`
(`twophase.bench.roofline`), a plain TVM read kernel over as many bytes (64 KiB chunks in parallel, XOR of 64-byte
vectors: what compiled code streams without compute), then the GEMV sequence once per `--prefetch` distance
(`qgemv_a8.prim_func(prefetch_bytes=)`, 0 = none, one compile each; the median of 5 passes, after 3 unmeasured
passes; in alternating order, forward then reversed). Reports GB/s (weight bytes / time) per
repetition, medians, the per-shape GB/s of the first distance and the paired speedup of each distance over
the first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

LAYERS = 30
SHAPES = {"qkv": (576, 960, LAYERS), "o": (576, 576, LAYERS), "gateup": (576, 3072, LAYERS),
          "down": (1536, 576, LAYERS), "lm_head": (576, 49152, 1)}  # name: (K, N, copies)
PASSES = 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--prefetch", default="0,4096",
                    help="comma-separated prefetch distances in bytes (first = base; 0 = no software prefetch)")
    args = ap.parse_args()
    distances = [int(x) for x in args.prefetch.split(",")]
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm
    from tvm.script import tirx as T

    from twophase.bench.roofline import StreamKernel, measure_bandwidth
    from twophase.kernels.tir import qgemv_a8, qmatmul
    from twophase.kernels.tir.qmatmul_int8 import isa_for_target

    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
    isa = isa_for_target(target)
    rng = np.random.default_rng(0)
    kernels: dict[int, dict[str, object]] = {d: {} for d in distances}
    weights, xs, ys, shape_bytes = {}, {}, {}, {}
    for name, (K, N, copies) in SHAPES.items():
        wspec = qmatmul.QMatMulSpec(4, K, N, 32, zero=8)  # symmetric int4 as codes q + 8, as RTN compiles it
        codes = [rng.integers(0, 16, (K, N)).astype(np.uint8) for _ in range(copies)]
        scale = (rng.random((wspec.G, N)) * 0.02 + 1e-3).astype(np.float32)
        weights[name] = [[tvm.runtime.tensor(a) for a in qmatmul.pack(wspec, c, scale)] for c in codes]
        shape_bytes[name] = sum(a.numpy().nbytes for a in weights[name][0])
        for d in distances:
            func = qgemv_a8.prim_func(qgemv_a8.QGemvA8Spec.of(wspec), name="gemv", isa=isa, prefetch_bytes=d)
            kernels[d][name] = tvm.compile(func, target=target).mod["gemv"]
        xs[name] = tvm.runtime.tensor(rng.standard_normal((1, K)).astype(np.float32))
        ys[name] = tvm.runtime.tensor(np.zeros((1, N), np.float32))
    order = [(name, layer) for layer in range(LAYERS) for name in ("qkv", "o", "gateup", "down")] + [("lm_head", 0)]
    total = sum(shape_bytes[n] * SHAPES[n][2] for n in SHAPES)

    chunk = 1 << 16
    nchunks = -(-total // chunk)

    @T.prim_func
    def read(A: T.Buffer((nchunks, chunk // 64, 64), "uint8"), O: T.Buffer((nchunks, 64), "uint8")):
        for c in T.parallel(nchunks):
            acc = T.alloc_buffer((64,), "uint8", scope="local")
            for j in T.vectorized(64):
                acc[j] = T.uint8(0)
            for i in range(chunk // 64):
                for j in T.vectorized(64):
                    acc[j] = acc[j] ^ A[c, i, j]
            for j in T.vectorized(64):
                O[c, j] = acc[j]

    read_fn = tvm.compile(read, target=target)["read"]
    src = tvm.runtime.tensor(rng.integers(0, 256, (nchunks, chunk // 64, 64), dtype=np.uint8))
    dst = tvm.runtime.tensor(np.zeros((nchunks, 64), np.uint8))

    def token(d: int, per_shape: dict[str, int] | None = None) -> float:
        fns = kernels[d]
        t0 = time.perf_counter_ns()
        for name, layer in order:
            t = time.perf_counter_ns()
            fns[name](xs[name], *weights[name][layer], ys[name])
            if per_shape is not None:
                per_shape[name] += time.perf_counter_ns() - t
        return (time.perf_counter_ns() - t0) / 1e9

    def median_of(run) -> float:
        run()
        return statistics.median(run() for _ in range(PASSES))

    def timed_read() -> float:
        t = time.perf_counter()
        read_fn(src, dst)
        return time.perf_counter() - t

    print(f"{total / 1e6:.1f} MB of weights per token, {args.threads} threads, {isa.value}")
    rows: dict[str, list[float]] = {"numpy read": [], "tvm read": []} | {f"gemv pf {d}": [] for d in distances}
    shape_ns = {n: [] for n in SHAPES}
    for rep in range(args.reps):
        rows["numpy read"].append(measure_bandwidth(args.threads, reps=1).kernel(StreamKernel.READ).median_gbs)
        rows["tvm read"].append(nchunks * chunk / median_of(timed_read) / 1e9)
        for _ in range(3):  # the first passes after the reads above run slow, whichever variant they are
            token(distances[0])
        for d in distances if rep % 2 == 0 else distances[::-1]:  # alternating order: position effects cancel
            rows[f"gemv pf {d}"].append(total / median_of(lambda d=d: token(d)) / 1e9)
        acc = dict.fromkeys(SHAPES, 0)
        token(distances[0], acc)
        for n in SHAPES:
            shape_ns[n].append(acc[n] / SHAPES[n][2])
        print(f"rep {rep}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()) + " GB/s", flush=True)
    print("\nmedian GB/s: " + "  ".join(f"{k} {statistics.median(v):.1f}" for k, v in rows.items()))
    print(f"per call with prefetch {distances[0]} (one timed pass per repetition, medians):")
    for n in SHAPES:
        us = statistics.median(shape_ns[n]) / 1e3
        print(f"  {n:8s} {us:8.2f} us  {shape_bytes[n] / 1e3:7.0f} KB  {shape_bytes[n] / us / 1e3:5.1f} GB/s")
    base = rows[f"gemv pf {distances[0]}"]
    for d in distances[1:]:
        ratio = [b / a for a, b in zip(base, rows[f"gemv pf {d}"])]
        print(f"prefetch {d} vs {distances[0]}: paired speedup median {statistics.median(ratio):.3f} "
              f"({sum(r > 1 for r in ratio)} of {len(ratio)} repetitions faster)")


if __name__ == "__main__":
    sys.exit(main())
