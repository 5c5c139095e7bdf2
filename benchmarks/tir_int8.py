"""Micro-benchmark of the W8A8 TIR GEMM (kernels/tir/qmatmul_int8.py) vs the float kernels and ORT, one run.

    python benchmarks/tir_int8.py [--threads 2] [--reps 9] [--gemm-m 128 512] [--mcpu native]
                                  [--isa avx512_vnni avx2 ...] [--no-ort]

Prefill shapes of SmolLM2-135M (K, N), M = --gemm-m rows, one weight copy (compute bound).
GOP/s = 2 M K N / time (multiply-adds of the integer GEMM counted as for the float GEMM).
Rows, side by side per shape (times are medians over --reps interleaved rounds):
    a8 <isa>   ours: QMatMulA8 (dynamic per-row activation quantization inside) for each --isa
    f32        qmatmul.py bits=32 (the float GEMM)
    q8 chan    qmatmul.py bits=8 per channel (dequantize the panel, float GEMM)
    ORT i8     the ORT target's W8A8 graph: FuseInt8MatMulPass's QuantizeLinear(u8) + MatMulIntegerToFloat
               + Mul, ORT_ENABLE_ALL
    ORT dqmm   com.microsoft.DynamicQuantizeMatMul (per-tensor activation scale, s8 weights)
    ORT f32    MatMul
ORT sessions run with intra-op spinning off (with it on, its pool keeps spinning into our next timing).
--mcpu native: this machine's CPU (what the TVM backend builds for); the avx2 and generic variants are built
for --avx2-mcpu (default znver3, the AVX2-only CI machines), f32 / q8 chan for --mcpu. TVM_NUM_THREADS = --threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


def _tvm_fn(func, target):
    import tvm

    return tvm.compile(func, target=target).mod[func.attrs["global_symbol"]]


def _ours_a8(K: int, N: int, M: int, isa, target, W, ws, X) -> Callable[[], None]:
    import tvm

    from twophase.kernels.tir.qmatmul_int8 import QMatMulA8Spec, pack, prim_func

    spec = QMatMulA8Spec(K, N)
    fn = _tvm_fn(prim_func(spec, isa=isa), target)
    args = [tvm.runtime.tensor(X), *(tvm.runtime.tensor(a) for a in pack(spec, W, ws)),
            tvm.runtime.tensor(np.zeros((M, N), np.float32))]
    return lambda: fn(*args)


def _ours_float(K: int, N: int, M: int, bits: int, target, W, ws, X) -> Callable[[], None]:
    import tvm

    from twophase.kernels.tir.qmatmul import QMatMulSpec, pack, prim_func

    spec = QMatMulSpec(bits, K, N, None)
    packed = pack(spec, W.astype(np.float32) * ws) if bits == 32 else pack(spec, W, ws[None, :])
    fn = _tvm_fn(prim_func(spec), target)
    args = [tvm.runtime.tensor(X), *(tvm.runtime.tensor(a) for a in packed),
            tvm.runtime.tensor(np.zeros((M, N), np.float32))]
    return lambda: fn(*args)


def _ort(kind: str, K: int, N: int, M: int, threads: int, W, ws, X) -> Callable[[], None]:
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from twophase.compiler.options import ActivationMode
    from twophase.passes.fuse_int8_matmul import FuseInt8MatMulPass
    from twophase.passes.quantize_activations import QuantizeActivationsPass

    Wf = W.astype(np.float32) * ws
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])
    if kind == "dqmm":
        inits = [numpy_helper.from_array(W, "Wq"), numpy_helper.from_array(ws, "Ws")]
        node = helper.make_node("DynamicQuantizeMatMul", ["X", "Wq", "Ws"], ["Y"], domain="com.microsoft")
    else:
        inits = [numpy_helper.from_array(Wf, "W")]
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
    opset = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(helper.make_graph([node], "g", [x], [y], initializer=inits), opset_imports=opset)
    if kind == "i8":  # the ORT target's W8A8 form (its weights are requantized from Wf: 7-bit codes)
        model = ir.from_proto(proto)
        QuantizeActivationsPass(ActivationMode.DYNAMIC)(model)
        FuseInt8MatMulPass()(model)
        proto = ir.to_proto(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # no spinning: ORT's spinning pool would otherwise steal the 2 cores from the next (TVM) measurement
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(X))
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(np.zeros((M, N), np.float32)))
    return lambda: sess.run_with_iobinding(binding)


def _median_ms(fns: list[Callable[[], None]], reps: int, budget_ms: float = 20.0) -> list[float]:
    """Median ms per call of each fn over interleaved rounds; a round times a burst of about `budget_ms`
    of back-to-back calls after a short pause and a warm call (so the other runtime's spinning thread
    pool has gone to sleep, and ours is awake)."""
    calls = []
    for f in fns:
        f()
        t0 = time.perf_counter()
        f()
        calls.append(max(1, int(budget_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            time.sleep(0.02)
            f()
            t0 = time.perf_counter()
            for _ in range(calls[i]):
                f()
            times[i].append((time.perf_counter() - t0) * 1e3 / calls[i])
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--gemm-m", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--mcpu", default="native", help="LLVM -mcpu for the TVM kernels ('native': this CPU)")
    ap.add_argument("--isa", nargs="*", default=None, help="QMatMulA8 variants (default: the target's best)")
    ap.add_argument("--avx2-mcpu", default="znver3", help="-mcpu for the avx2 / generic variants (AVX2-only CPUs)")
    ap.add_argument("--no-ort", action="store_true")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm

    from twophase.kernels.tir.qmatmul_int8 import Isa, isa_for_target

    mcpu = str(tvm.target.codegen.llvm_get_system_cpu()) if args.mcpu == "native" else args.mcpu
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    avx2_target = tvm.target.Target({"kind": "llvm", "mcpu": args.avx2_mcpu})
    isas = [Isa(i) for i in args.isa] if args.isa else [isa_for_target(target)]
    rng = np.random.default_rng(0)
    print(f"threads={args.threads}, mcpu={mcpu} (avx2/generic variants: {args.avx2_mcpu}), median of {args.reps} "
          "rounds; GOP/s = 2MKN / time")
    names = [f"a8 {i.value}" for i in isas] + ["f32", "q8 chan"] + ([] if args.no_ort else ["ORT i8", "ORT dqmm", "ORT f32"])
    print(f"{'M':>5} {'K':>5} {'N':>5} " + " ".join(f"{n:>15}" for n in names) + "   (GOP/s)")
    for M in args.gemm_m:
        for K, N in SHAPES:
            W = rng.integers(-63, 64, (K, N)).astype(np.int8)
            ws = (rng.random(N) * 0.01 + 0.001).astype(np.float32)
            X = rng.standard_normal((M, K)).astype(np.float32)
            fns = [_ours_a8(K, N, M, i, avx2_target if i in (Isa.AVX2, Isa.GENERIC) else target, W, ws, X) for i in isas]
            fns += [_ours_float(K, N, M, 32, target, W, ws, X), _ours_float(K, N, M, 8, target, W, ws, X)]
            if not args.no_ort:
                fns += [_ort(k, K, N, M, args.threads, W, ws, X) for k in ("i8", "dqmm", "f32")]
            ms = _median_ms(fns, args.reps)
            gops = [2 * M * K * N / t / 1e6 for t in ms]
            print(f"{M:5} {K:5} {N:5} " + " ".join(f"{g:15.1f}" for g in gops))


if __name__ == "__main__":
    main()
