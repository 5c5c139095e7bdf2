"""Accuracy of every quantization scheme on SmolLM2, per phase, with `twophase eval` against fp32.

    python benchmarks/accuracy.py [--out out/acc] [--windows 20] [--threads 2]

Compiles one artifact per row (skipped when it already exists), evaluates it against the fp32
artifact, and prints a Markdown table: PPL and dPPL % of the phase whose scheme the row measures,
greedy agreement and KL vs fp32. Prefill rows score full 512-token windows with the prefill graph;
decode rows score teacher-forced decode steps with the decode graph (see `twophase eval --help`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twophase.compiler.driver import compile_model
from twophase.compiler.evaluate import evaluate_artifact
from twophase.compiler.options import ActivationMode, CompileOptions, PhaseOptions, QuantScheme, WeightAlgorithm

FP32 = PhaseOptions(QuantScheme.FP32)
W8A16 = PhaseOptions(QuantScheme.W8A16)

# name -> (options, phase the row measures, label)
ROWS = {
    "w8a16": (CompileOptions(prefill=W8A16, decode=W8A16), "decode", "w8a16 (int8 per channel, MatMulNBits level 4)"),
    "w8a8-dyn": (
        CompileOptions(prefill=PhaseOptions(QuantScheme.W8A8), decode=FP32),
        "prefill", "w8a8 dynamic per-token, no SmoothQuant",
    ),
    "w8a8-dyn-sq": (
        CompileOptions(prefill=PhaseOptions(QuantScheme.W8A8, smoothquant_alpha=0.4), decode=FP32),
        "prefill", "w8a8 dynamic per-token, SmoothQuant 0.4",
    ),
    "w8a8-static-sq": (
        CompileOptions(
            prefill=PhaseOptions(QuantScheme.W8A8, activations=ActivationMode.STATIC, smoothquant_alpha=0.8),
            decode=FP32,
        ),
        "prefill", "w8a8 static per-tensor (SmoothQuant 0.8; down_proj per-token, SmoothQuant 0.4)",
    ),
    "w4a16-rtn": (
        CompileOptions(prefill=FP32, decode=PhaseOptions(QuantScheme.W4A16)),
        "decode", "w4a16 RTN, block 32, symmetric",
    ),
    "w4a16-gptq": (
        CompileOptions(prefill=FP32, decode=PhaseOptions(QuantScheme.W4A16, algorithm=WeightAlgorithm.GPTQ)),
        "decode", "w4a16 GPTQ, block 32, symmetric",
    ),
    "w4a16-gguf": (
        CompileOptions(prefill=FP32, decode=PhaseOptions(QuantScheme.W4A16, algorithm=WeightAlgorithm.GGUF)),
        "decode", "w4a16 GGUF grid (Q4_1 kept, Q8_0 lm_head/embedding)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", type=Path, default=Path("out/acc"))
    p.add_argument("--reference", type=Path, default=None, help="fp32 artifact (compiled if absent)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--decode-windows", type=int, default=8)
    p.add_argument("--decode-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    reference = args.reference or args.out / "fp32"
    if not (reference / "manifest.json").is_file():
        compile_model(args.model, reference, CompileOptions())
    lines = [
        "| scheme | phase | PPL | fp32 PPL | dPPL | greedy agreement | KL (nats) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.rows.split(","):
        options, phase, label = ROWS[name]
        art = args.out / name
        if not (art / "manifest.json").is_file():
            print(f"compiling {name} ...", file=sys.stderr, flush=True)
            compile_model(args.model, art, options)
        report = evaluate_artifact(
            art, reference, windows=args.windows, decode_windows=args.decode_windows,
            decode_length=args.decode_length, threads=args.threads,
        )
        r = report.to_dict()[phase]
        lines.append(
            f"| {label} | {phase} | {r['ppl']:.4f} | {r['reference_ppl']:.4f} | {r['dppl_pct']:+.2f}% | "
            f"{100 * r['agreement']:.2f}% | {r['mean_kl']:.4f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
