"""Micro-benchmark of twophase's TIR QMatMul kernels vs ONNX Runtime, side by side in one run.

    python benchmarks/tir_kernels.py [--threads 2] [--reps 7] [--gemm-m 128 512] [--mcpu znver3]

Decode (M = 1): each SmolLM2-135M weight shape with 30 distinct weight copies (as many as the model
has layers; lm_head one), timed as a pass over the copies so weights stream from memory, not cache.
Ours: the TVM kernel (TVM_NUM_THREADS = --threads, set here before tvm is imported), one call per copy.
ORT: one session (--threads intra-op threads) whose graph has one node per copy, run through IO
binding (so its per-node overhead is that of a real graph): com.microsoft.MatMulNBits
(accuracy_level 4) for 4-bit block 32 and 8-bit, MatMul for float32. GB/s = bytes of the packed
weight arrays (codes + scales) / our time. "token" rows: the model's per-token sum (30 x 7 layer
matmuls + lm_head), from the per-shape medians.

Prefill (M = --gemm-m): GFLOP/s = 2 M K N / time, one weight copy (compute bound).
Times are medians over --reps rounds; ours and ORT are interleaved per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

LAYERS = 30
DECODE_SHAPES = [(576, 576, 2), (576, 192, 2), (576, 1536, 2), (1536, 576, 1), (576, 49152, 0)]  # (K, N, per layer)
GEMM_SHAPES = [(576, 576), (576, 1536), (1536, 576)]
VARIANTS = {  # name: (bits, block_size, ORT MatMulNBits bits/block or None for MatMul)
    "q4 bs32": (4, 32, (4, 32)),
    "q8 chan": (8, None, (8, 32)),
    "q8 bs32": (8, 32, (8, 32)),
    "f32": (32, None, None),
}


def _tvm_runner(spec, copies, M: int, target) -> tuple[Callable[[], None], int]:
    import tvm

    from twophase.kernels.tir.qmatmul import pack, prim_func

    func = prim_func(spec)
    fn = tvm.compile(func, target=target).mod[func.attrs["global_symbol"]]
    rng = np.random.default_rng(1)
    X = tvm.runtime.tensor(rng.standard_normal((M, spec.K)).astype(np.float32))
    Y = tvm.runtime.tensor(np.zeros((M, spec.N), np.float32))
    params = [[tvm.runtime.tensor(a) for a in pack(spec, *c)] for c in copies]
    nbytes = sum(a.nbytes for a in pack(spec, *copies[0]))

    def run() -> None:
        for p in params:
            fn(X, *p, Y)

    return run, nbytes


def _ort_runner(spec, ort_q, copies, M: int, threads: int) -> Callable[[], None]:
    """One ORT session whose graph holds one node per weight copy (all reading X), run through IO binding."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from twophase.kernels.quant import pack_matmulnbits

    K, N = spec.K, spec.N
    nodes, inits, outputs = [], [], []
    for i, (codes, scale, _) in enumerate(copies):
        y = f"Y{i}"
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [M, N]))
        if ort_q is None:
            inits.append(numpy_helper.from_array(codes.astype(np.float32), f"W{i}"))
            nodes.append(helper.make_node("MatMul", ["X", f"W{i}"], [y]))
            continue
        bits, bs = ort_q
        G = -(-K // bs)
        if scale.shape[0] == 1 and G > 1:  # per channel: the same scale in each of ORT's blocks
            scale = np.repeat(scale, G, axis=0)
        u = codes.astype(np.int16) + (128 if bits == 8 else 0)  # MatMulNBits takes unsigned codes
        inits.append(numpy_helper.from_array(pack_matmulnbits(u.astype(np.uint8), bits, bs), f"B{i}"))
        inits.append(numpy_helper.from_array(np.ascontiguousarray(scale.T).reshape(-1).astype(np.float32), f"S{i}"))
        ins = ["X", f"B{i}", f"S{i}"]
        if bits == 4:  # unsigned codes 0..15: zero point 0 (the op's default is 8)
            inits.append(numpy_helper.from_array(np.zeros((N, (G + 1) // 2), np.uint8), f"Z{i}"))
            ins.append(f"Z{i}")
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ins,
                [y],
                domain="com.microsoft",
                K=K,
                N=N,
                bits=bits,
                block_size=bs,
                accuracy_level=4,
            )
        )
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K])], outputs, initializer=inits
    )
    opset = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opset)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_ortvalue_input(
        "X", ort.OrtValue.ortvalue_from_numpy(np.random.default_rng(1).standard_normal((M, K)).astype(np.float32))
    )
    for i in range(len(copies)):
        binding.bind_ortvalue_output(f"Y{i}", ort.OrtValue.ortvalue_from_numpy(np.zeros((M, N), np.float32)))

    def run() -> None:
        sess.run_with_iobinding(binding)

    return run


def _copies(spec, n: int, rng) -> list[tuple]:
    out = []
    for _ in range(n):
        if spec.bits == 32:
            out.append((rng.standard_normal((spec.K, spec.N)).astype(np.float32), None, None))
            continue
        lo, hi, dt = (0, 16, np.uint8) if spec.bits == 4 else (-127, 128, np.int8)
        codes = rng.integers(lo, hi, (spec.K, spec.N)).astype(dt)
        out.append((codes, (rng.random((spec.G, spec.N)) * 0.01).astype(np.float32), None))
    return out


def _median_ms(fns: list[Callable[[], None]], calls: int, reps: int) -> list[float]:
    """Median per-call ms of each fn (interleaved rounds); each fn makes `calls` kernel calls.

    Each timed pass follows a pause and an untimed pass, so the other runtime's thread pool, which
    spins for a while after its last call, has gone to sleep and does not steal the cores.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            time.sleep(0.05)
            f()
            t0 = time.perf_counter()
            f()
            times[i].append((time.perf_counter() - t0) * 1e3 / calls)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--gemm-m", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--mcpu", default="znver3", help="LLVM -mcpu for the TVM kernels (AVX2 + FMA)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--no-ort", action="store_true")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm

    from twophase.kernels.tir.qmatmul import QMatMulSpec

    target = tvm.target.Target({"kind": "llvm", "mcpu": args.mcpu})
    rng = np.random.default_rng(0)
    print(
        f"TVM_NUM_THREADS={args.threads}, ORT intra-op threads={args.threads}, target mcpu={args.mcpu}, "
        f"median of {args.reps} rounds"
    )

    print("\nDecode, M = 1 (ms per call; token = 30 layers x 7 matmuls + lm_head)")
    print(f"{'variant':8} {'K':>5} {'N':>6} {'ours ms':>9} {'ORT ms':>9} {'ORT/ours':>8} {'GB/s':>7}")
    for name in args.variants:
        bits, bs, ort_q = VARIANTS[name]
        tot_ours = tot_ort = 0.0
        for K, N, per_layer in DECODE_SHAPES:
            spec = QMatMulSpec(bits, K, N, bs)
            copies = _copies(spec, LAYERS if per_layer else 1, rng)
            ours, nbytes = _tvm_runner(spec, copies, 1, target)
            fns = [ours] if args.no_ort else [ours, _ort_runner(spec, ort_q, copies, 1, args.threads)]
            ms = _median_ms(fns, len(copies), max(args.reps, 3))
            ort_ms = ms[1] if len(ms) > 1 else float("nan")
            count = per_layer * LAYERS if per_layer else 1
            tot_ours, tot_ort = tot_ours + count * ms[0], tot_ort + count * ort_ms
            print(f"{name:8} {K:5} {N:6} {ms[0]:9.4f} {ort_ms:9.4f} {ort_ms / ms[0]:8.2f} {nbytes / ms[0] / 1e6:7.1f}")
        print(f"{name:8} {'token':>12} {tot_ours:9.3f} {tot_ort:9.3f} {tot_ort / tot_ours:8.2f}")

    if not args.gemm_m:
        return
    print("\nPrefill GEMM (GFLOP/s; ORT: MatMul for f32, MatMulNBits accuracy_level 4 for q4/q8)")
    print(f"{'variant':8} {'M':>5} {'K':>5} {'N':>6} {'ours ms':>9} {'ORT ms':>9} {'ours GF/s':>9} {'ORT GF/s':>9}")
    for name in args.variants:
        bits, bs, ort_q = VARIANTS[name]
        for M in args.gemm_m:
            for K, N in GEMM_SHAPES:
                spec = QMatMulSpec(bits, K, N, bs)
                copies = _copies(spec, 1, rng)
                ours, _ = _tvm_runner(spec, copies, M, target)
                fns = [ours] if args.no_ort else [ours, _ort_runner(spec, ort_q, copies, M, args.threads)]
                ms = _median_ms(fns, 1, args.reps)
                ort_ms = ms[1] if len(ms) > 1 else float("nan")
                flop = 2 * M * K * N
                print(
                    f"{name:8} {M:5} {K:5} {N:6} {ms[0]:9.3f} {ort_ms:9.3f} "
                    f"{flop / ms[0] / 1e6:9.1f} {flop / ort_ms / 1e6:9.1f}"
                )


if __name__ == "__main__":
    main()
