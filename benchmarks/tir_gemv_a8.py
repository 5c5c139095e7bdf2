"""Decode GEMV with int8 activations (qgemv_a8.py, "level 4") vs qmatmul.py's float GEMV vs ORT MatMulNBits
accuracy_level 4, side by side in one run.

    python benchmarks/tir_gemv_a8.py [--threads 2] [--reps 7] [--mcpu native] [--variants "q4 bs32" "q8 chan"]

M = 1, each SmolLM2-135M weight shape with 30 weight copies (tir_kernels.py's harness: weights stream from
memory); both TVM kernels read the same packed arrays, built for the same target (the host CPU by default),
the int8 kernel with the target's best ISA variant. "token" rows: 30 x 7 layer matmuls + lm_head.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tir_kernels import DECODE_SHAPES, LAYERS, VARIANTS, _copies, _median_ms, _ort_runner


def _runner(fn, packed, M: int, K: int, N: int):
    import tvm

    X = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((M, K)).astype(np.float32))
    Y = tvm.runtime.tensor(np.zeros((M, N), np.float32))

    def run() -> None:
        for p in packed:
            fn(X, *p, Y)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--mcpu", default="native", help="LLVM -mcpu for both TVM kernels ('native': this CPU)")
    ap.add_argument("--variants", nargs="*", default=["q4 bs32", "q8 chan"], choices=[v for v in VARIANTS if v != "f32"])
    ap.add_argument("--m", type=int, default=1)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import tvm

    from twophase.kernels.tir import qgemv_a8, qmatmul
    from twophase.kernels.tir.qmatmul_int8 import isa_for_target

    mcpu = str(tvm.target.codegen.llvm_get_system_cpu()) if args.mcpu == "native" else args.mcpu
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    isa = isa_for_target(target)
    rng = np.random.default_rng(0)
    M = args.m
    print(f"threads={args.threads}, mcpu={mcpu}, int8 isa={isa.value}, M={M}, median of {args.reps} rounds")
    print(f"{'variant':8} {'K':>5} {'N':>6} {'a8 ms':>8} {'float ms':>8} {'ORT ms':>8} {'float/a8':>8} {'ORT/a8':>7}")
    for name in args.variants:
        bits, bs, ort_q = VARIANTS[name]
        tot = np.zeros(3)
        for K, N, per_layer in DECODE_SHAPES:
            wspec = qmatmul.QMatMulSpec(bits, K, N, bs)
            gspec = qgemv_a8.QGemvA8Spec.of(wspec)
            copies = _copies(wspec, LAYERS if per_layer else 1, rng)
            packed = [[tvm.runtime.tensor(a) for a in qmatmul.pack(wspec, *c)] for c in copies]
            fa = qgemv_a8.prim_func(gspec, isa=isa)
            ff = qmatmul.prim_func(wspec)
            a8 = tvm.compile(fa, target=target).mod[fa.attrs["global_symbol"]]
            fl = tvm.compile(ff, target=target).mod[ff.attrs["global_symbol"]]
            fns = [_runner(a8, packed, M, K, N), _runner(fl, packed, M, K, N),
                   _ort_runner(wspec, ort_q, copies, M, args.threads)]
            ms = np.array(_median_ms(fns, len(copies), max(args.reps, 3)))
            tot += (per_layer * LAYERS if per_layer else 1) * ms
            print(f"{name:8} {K:5} {N:6} {ms[0]:8.4f} {ms[1]:8.4f} {ms[2]:8.4f} {ms[1] / ms[0]:8.2f} {ms[2] / ms[0]:7.2f}")
        print(f"{name:8} {'token':>12} {tot[0]:8.3f} {tot[1]:8.3f} {tot[2]:8.3f} {tot[1] / tot[0]:8.2f} {tot[2] / tot[0]:7.2f}")


if __name__ == "__main__":
    main()
