"""Decode-step and prefill time of weight-only quantized phase graphs vs fp32, side by side.

    python benchmarks/weight_only.py [--artifact out/smollm2-135m-instruct] [--threads 2] [--rounds 7]

Takes the fp32 artifact's decode.onnx and prefill.onnx, quantizes them here (QuantizeWeightsPass, then
FuseDequantMatMulPass for the ORT target) into --work, and times each variant in ONNX Runtime with the
runtime's session options (ORT_ENABLE_ALL, --threads intra-op threads). Decode: one step for batch 1
after a --past-token cache (random K/V; only the time matters), per round --steps steps after warmup.
Prefill: one forward over --prefill-lengths tokens. Rounds interleave all variants; the tables report
the median (and best) over rounds and the ratio to fp32 from the same run.

Variants: fp32; w8a16 (int8 per channel, RTN) fused into MatMulNBits bits=8 with the per-channel scale
repeated over blocks of 32 / 128 / 256 or one block spanning K; w4a16 RTN block 32 and the GGUF grid
(exact Q4_1 / Q8_0 of the source), each at MatMulNBits accuracy_level 1 (float activations) and 4
(int8 activations), the GGUF grid's Q4_1 offsets as a block-sum correction (default) or as MatMulNBits
float zero points; and the unfused w4a16 QDQ graph, which ORT fuses itself at session creation.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from twophase.compiler.options import WeightAlgorithm
from twophase.passes.fuse_dequant_matmul import FloatZeroPoints, FuseDequantMatMulPass
from twophase.passes.quantize_weights import QuantizeWeightsPass

log = logging.getLogger("benchmarks.weight_only")


def variants() -> dict[str, Callable[[ir.Model], ir.Model]]:
    def make(
        bits: int,
        block: int | None,
        algorithm=WeightAlgorithm.RTN,
        acc: int | None = 4,
        pc_block=128,
        zp=FloatZeroPoints.CORRECTION,
    ):
        def build(model: ir.Model) -> ir.Model:
            model = QuantizeWeightsPass(bits, block, True, algorithm)(model).model
            if acc is not None:
                model = FuseDequantMatMulPass(acc, per_channel_block_size=pc_block, float_zero_points=zp)(model).model
            return model

        return build

    return {
        "fp32": lambda m: m,
        "w8a16 pc-blk32 acc4": make(8, None, pc_block=32),
        "w8a16 pc-blk128 acc4": make(8, None, pc_block=128),
        "w8a16 pc-blk256 acc4": make(8, None, pc_block=256),
        "w8a16 pc-span-K acc4": make(8, None, pc_block=None),
        "w8a16 pc-blk128 acc1": make(8, None, pc_block=128, acc=1),
        "w4a16 rtn b32 acc1": make(4, 32, acc=1),
        "w4a16 rtn b32 acc4": make(4, 32, acc=4),
        "w4a16 gguf acc1": make(4, 32, WeightAlgorithm.GGUF, acc=1),
        "w4a16 gguf acc4": make(4, 32, WeightAlgorithm.GGUF, acc=4),
        "w4a16 gguf acc4 native-zp": make(4, 32, WeightAlgorithm.GGUF, acc=4, zp=FloatZeroPoints.NATIVE),
        "w4a16 rtn b32 QDQ (ORT fuses)": make(4, 32, acc=None),
    }


PREFILL_VARIANTS = [
    "fp32",
    "w8a16 pc-blk128 acc4",
    "w4a16 rtn b32 acc1",
    "w4a16 rtn b32 acc4",
    "w4a16 gguf acc4",
    "w4a16 rtn b32 QDQ (ORT fuses)",
]


def build(artifact: Path, work: Path, phase: str, names: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    table = variants()
    for name in names:
        if name == "fp32":
            out[name] = artifact / f"{phase}.onnx"
            continue
        path = work / name.replace(" ", "_") / f"{phase}.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            model = table[name](ir.load(artifact / f"{phase}.onnx"))
            ir.save(model, path, external_data=path.name + ".data")
            log.info("built %s %s in %.1fs", phase, name, time.perf_counter() - start)
        out[name] = path
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def decode_feeds(sess: ort.InferenceSession, past: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {
        "input_ids": np.array([[42]], np.int64),
        "attention_mask": np.ones((1, past + 1), np.int64),
        "position_ids": np.array([[past]], np.int64),
    }
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            feeds[i.name] = rng.standard_normal((1, heads, past, dim)).astype(np.float32)
    return feeds


def prefill_feeds(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(100, 40000, (1, n)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(n, dtype=np.int64)[None]}


def timed_rounds(
    sessions: dict[str, ort.InferenceSession], feeds: dict[str, dict], rounds: int, reps: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """(median, min) over rounds of the mean seconds per run; variants interleaved within each round."""
    for name, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[name])
    samples: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            for _ in range(reps):
                s.run(None, feeds[name])
            samples[name].append((time.perf_counter() - start) / reps)
    return {n: (statistics.median(v), min(v)) for n, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=Path("out/smollm2-135m-instruct"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/twophase-weight-only"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--prefill-lengths", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--only", nargs="*", help="decode variants to run (default: all)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(0)

    names = args.only or list(variants())
    if "fp32" not in names:
        names = ["fp32", *names]
    paths = build(args.artifact, args.work, "decode", names)
    sessions = {n: session(p, args.threads) for n, p in paths.items()}
    feeds = {n: decode_feeds(s, args.past, rng) for n, s in sessions.items()}
    dec = timed_rounds(sessions, feeds, args.rounds, args.steps, warmup=5)
    del sessions
    print(
        f"\ndecode, batch 1, past {args.past}, {args.threads} threads, median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'variant':34s} {'ms/step':>8s} {'tok/s':>7s} {'x fp32':>7s}   {'best ms':>8s} {'x fp32':>7s}")
    for n, (t, best) in dec.items():
        print(
            f"{n:34s} {t * 1e3:8.2f} {1 / t:7.1f} {dec['fp32'][0] / t:7.2f}   {best * 1e3:8.2f} {dec['fp32'][1] / best:7.2f}"
        )

    if args.prefill_lengths:
        pre_names = [n for n in PREFILL_VARIANTS if n in names]
        paths = build(args.artifact, args.work, "prefill", pre_names)
        sessions = {n: session(p, args.threads) for n, p in paths.items()}
        for length in args.prefill_lengths:
            feeds = {n: prefill_feeds(length, rng) for n in sessions}
            pre = timed_rounds(sessions, feeds, max(3, args.rounds // 2), 1, warmup=1)
            print(f"\nprefill, {length} tokens, {args.threads} threads")
            print(f"{'variant':34s} {'ms':>8s} {'tok/s':>7s} {'x fp32':>7s}   {'best ms':>8s} {'x fp32':>7s}")
            for n, (t, best) in pre.items():
                print(
                    f"{n:34s} {t * 1e3:8.1f} {length / t:7.0f} {pre['fp32'][0] / t:7.2f}   {best * 1e3:8.1f} {pre['fp32'][1] / best:7.2f}"
                )


if __name__ == "__main__":
    main()
