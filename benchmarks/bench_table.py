"""Reproduce the experiment table: weight-only vs w8a8 vs fp32, per phase, over batch, context and model size.

    python benchmarks/bench_table.py [--out out/bench] [--threads 2] [--reps 3] [--quick]

Compiles what is missing, then runs `twophase bench` twice:
  1. SmolLM2-135M-Instruct (the zoo's GGUF): fp32; fp32 prefill with w8a16 / w4a16 RTN decode (also with an
     int8 KV cache); w8a8 dynamic prefill (SmoothQuant 0.4) with w4a16 RTN decode -- batches 1,4,16 x
     contexts 128,512,2048, with the roofline.
  2. the size trend: SmolLM2-135M, random-llama-0.5b, random-llama-1b (random weights: speed does not
     depend on trained values), fp32 vs w8a8 prefill / w4a16 RTN decode -- batches 1,4,16 at context 128,
     and batch 1 at contexts 128, 512.
Artifacts go to out/table/<model>-<scheme>; results (CSV, Markdown, PNG plots) to --out/{smollm2,sizes}.
`--quick` runs one repetition on a smaller grid (a smoke test, not a measurement).
Disk: about 25 GB (the 1B model's export, fp32 artifact and random-weight checkpoint are ~4.3 GB each); time:
about 25 minutes on 2 cores with --reps 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWOPHASE = [sys.executable, "-m", "twophase.cli"]

# name: compile flags (every artifact gets --max-len so the 2048-token contexts fit)
SCHEMES = {
    "fp32": ["--prefill", "fp32", "--decode", "fp32"],
    "w8a16": ["--prefill", "fp32", "--decode", "w8a16"],
    "w4a16": ["--prefill", "fp32", "--decode", "w4a16", "--algorithm", "rtn"],
    "w8a8+w4a16": ["--prefill", "w8a8", "--decode", "w4a16", "--algorithm", "rtn"],
    "w4a16-kv8": ["--prefill", "fp32", "--decode", "w4a16", "--algorithm", "rtn", "--kv-dtype", "int8"],
}
SIZE_MODELS = ["smollm2-135m-instruct", "random-llama-0.5b", "random-llama-1b"]


def artifact(model: str, scheme: str, max_len: int) -> Path:
    out = ROOT / "out" / "table" / f"{model}-{scheme.replace('+', '-')}"
    if not (out / "manifest.json").is_file():
        print(f"compiling {model} {scheme} -> {out}", file=sys.stderr, flush=True)
        subprocess.run([*TWOPHASE, "compile", model, "-o", str(out), "--max-len", str(max_len), "--force",
                        *SCHEMES[scheme]], check=True)
    return out


def bench(artifacts: list[Path], out: Path, args, batches: str, contexts: str, roofline: bool) -> None:
    cmd = [*TWOPHASE, "bench", *map(str, artifacts), "-o", str(out), "--threads", str(args.threads),
           "--reps", str(args.reps), "--batches", batches, "--contexts", contexts]
    if roofline:
        cmd.append("--roofline")
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one repetition, small grid: a smoke test")
    p.add_argument("--skip-sizes", action="store_true", help="only the SmolLM2 table")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = 1
    grid = ("1,4", "128,512") if args.quick else ("1,4,16", "128,512,2048")

    smol = [artifact("smollm2-135m-instruct", s, 2304) for s in SCHEMES]
    bench(smol, args.out / "smollm2", args, *grid, roofline=True)
    if not args.skip_sizes:
        sized = [artifact(m, s, 640) for m in SIZE_MODELS for s in ("fp32", "w8a8+w4a16")]
        bench(sized, args.out / "sizes", args, "1,4,16" if not args.quick else "1", "128", roofline=False)
        bench(sized, args.out / "sizes-context", args, "1", "128,512", roofline=False)
    print(f"tables and plots in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
