"""GroupQueryAttention time: the TIR kernel (twophase/kernels/tir/attention.py) vs ORT's CPU kernel, side by side.

    TVM_NUM_THREADS=2 python benchmarks/tir_attention.py [--threads 2] [--reps 50] [--rounds 5]

One attention call of one layer with SmolLM2-135M's shapes (Hq 9, Hkv 3, head_dim 64; --heads to change)
over a bound cache of --capacity positions: decode steps (S = 1) for batch 1 and 16 at contexts 128 and
2048, and prefills (batch 1, S tokens, no past). ORT runs a one-node com.microsoft.GroupQueryAttention
graph with its cache bound in place through I/O binding (as the runtime does), intra-op --threads; TVM
runs the compiled PrimFunc (set TVM_NUM_THREADS to the same count). Both are timed per call from
Python (wall clock, call overhead included); rounds interleave the two (with a pause between them, so that
one's spinning thread pool does not steal the cores of the other) and the table reports medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from twophase.kernels.tir.attention import gqa_prim_func

CASES = (  # (name, batch, new tokens, context after the step)
    ("decode B=1 ctx=128", 1, 1, 128),
    ("decode B=1 ctx=2048", 1, 1, 2048),
    ("decode B=4 ctx=512", 4, 1, 512),
    ("decode B=16 ctx=128", 16, 1, 128),
    ("decode B=16 ctx=2048", 16, 1, 2048),
    ("prefill B=1 S=128", 1, 128, 128),
    ("prefill B=1 S=512", 1, 512, 512),
)


def ort_session(Hq: int, Hkv: int, D: int, threads: int) -> ort.InferenceSession:
    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    vi = helper.make_tensor_value_info
    inputs = [vi("x_q", f32, ["B", "S", Hq * D]), vi("x_k", f32, ["B", "S", Hkv * D]), vi("x_v", f32, ["B", "S", Hkv * D]),
              vi("past_k", f32, ["B", Hkv, "C", D]), vi("past_v", f32, ["B", Hkv, "C", D]), vi("seqlens_k", i32, ["B"]),
              vi("total", i32, []), vi("cos", f32, ["L", D // 2]), vi("sin", f32, ["L", D // 2]),
              vi("query_seqlens", i32, ["B"])]
    names = [v.name for v in inputs[:9]] + [""] * 7 + ["query_seqlens"]
    node = helper.make_node("GroupQueryAttention", names, ["y", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=Hq, kv_num_heads=Hkv, do_rotary=1, rotary_interleaved=0)
    outputs = [vi("y", f32, ["B", "S", Hq * D]), vi("present_k", f32, ["B", Hkv, "C", D]),
               vi("present_v", f32, ["B", Hkv, "C", D])]
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def feeds(Hq: int, Hkv: int, D: int, B: int, S: int, ctx: int, capacity: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    angles = np.arange(capacity)[:, None] * 10000.0 ** (-np.arange(D // 2) / (D // 2))
    return {
        "x_q": rand(B, S, Hq * D), "x_k": rand(B, S, Hkv * D), "x_v": rand(B, S, Hkv * D),
        "past_k": rand(B, Hkv, capacity, D), "past_v": rand(B, Hkv, capacity, D),
        "seqlens_k": np.full((B,), ctx - 1, np.int32), "total": np.array(ctx, np.int32),
        "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
        "query_seqlens": np.full((B,), S, np.int32),
    }


def timer(fn, reps: int) -> float:
    time.sleep(0.05)  # let the other library's spinning pool threads go to sleep (2 cores are easily taken)
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (set TVM_NUM_THREADS to match)")
    ap.add_argument("--heads", type=int, nargs=3, default=(9, 3, 64), metavar=("HQ", "HKV", "D"))
    ap.add_argument("--capacity", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=50, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import tvm

    Hq, Hkv, D = args.heads
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
    kernel = tvm.compile(gqa_prim_func(Hq, Hkv, D, scale=None, softcap=0.0, interleaved=False), target=target)["main"]
    session = ort_session(Hq, Hkv, D, args.threads)
    print(f"Hq={Hq} Hkv={Hkv} D={D} capacity={args.capacity} ORT threads={args.threads} "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}")
    print(f"{'case':24s} {'TVM us':>10s} {'ORT us':>10s} {'TVM/ORT':>8s}")
    for name, B, S, ctx in CASES:
        x = feeds(Hq, Hkv, D, B, S, ctx, args.capacity)
        io = session.io_binding()
        values = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in x.items()}
        for k, v in values.items():
            io.bind_ortvalue_input(k, v)
        y = ort.OrtValue.ortvalue_from_numpy(np.zeros((B, S, Hq * D), np.float32))
        io.bind_ortvalue_output("y", y)
        io.bind_ortvalue_output("present_k", values["past_k"])
        io.bind_ortvalue_output("present_v", values["past_v"])
        order = ("x_q", "x_k", "x_v", "past_k", "past_v", "seqlens_k", "cos", "sin", "query_seqlens")
        tvm_args = [tvm.runtime.tensor(x[k]) for k in order] + [tvm.runtime.tensor(np.zeros((B, S, Hq * D), np.float32))]
        t_tvm, t_ort = [], []
        for _ in range(args.rounds):
            t_tvm.append(timer(lambda a=tvm_args: kernel(*a), args.reps))
            t_ort.append(timer(lambda io=io: session.run_with_iobinding(io), args.reps))
        a, b = statistics.median(t_tvm) * 1e6, statistics.median(t_ort) * 1e6
        print(f"{name:24s} {a:10.1f} {b:10.1f} {a / b:8.2f}")


if __name__ == "__main__":
    main()
