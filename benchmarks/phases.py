"""Prefill and decode throughput of twophase artifacts vs transformers eager fp32, side by side.

    python benchmarks/phases.py [--artifact DIR ...] [--model smollm2-135m-instruct] [--threads 2] [--reps 5]

With several --artifact directories (e.g. one per quantization scheme) every row also gets its ratio
to the first artifact (the fp32 baseline), measured in the same run.

Prompts are real text (CPython's pydoc_data/topics.py) cut to exactly N tokens. Prefill: one forward
over the N-token prompt. Decode: tokens/s over --decode-steps greedy steps after a 128-token prompt
(EOS ignored, so every step runs). Each repetition runs every engine once, interleaved, and the table
reports medians; ratios are against transformers measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def corpus_ids(tokenizer, n: int) -> list[int]:
    import pydoc_data.topics as topics

    text = "\n".join(topics.topics.values())
    ids = tokenizer.encode(text[: n * 12])
    if len(ids) < n:
        raise SystemExit(f"corpus too short for {n} tokens")
    return ids[:n]


class TwophaseRunner:
    def __init__(self, artifact: Path, threads: int) -> None:
        from twophase.runtime.engine import Engine

        self.engine = Engine.load(artifact, threads=threads)
        phases = self.engine.manifest.phases
        self.name = f"twophase {artifact.name} (prefill {phases['prefill'].scheme}, decode {phases['decode'].scheme})"

    def prefill(self, ids: list[int]) -> float:
        x = np.asarray([ids], dtype=np.int64)
        t = time.perf_counter()
        self.engine.prefill(x, np.ones_like(x))
        return time.perf_counter() - t

    def decode(self, ids: list[int], steps: int) -> float:
        x = np.asarray([ids], dtype=np.int64)
        logits = self.engine.prefill(x, np.ones_like(x))
        token = logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            token = self.engine.decode_one_token(token).argmax(-1)
        return time.perf_counter() - t


class TransformersRunner:
    name = "transformers eager fp32"

    def __init__(self, model_name: str, threads: int) -> None:
        import torch

        from twophase.models import zoo
        from twophase.models.hf import load_causal_lm

        torch.set_num_threads(threads)
        gguf = zoo.fetch(model_name)
        self.model, _ = load_causal_lm(gguf.parent, gguf.name)
        self.torch = torch

    def prefill(self, ids: list[int]) -> float:
        x = self.torch.tensor([ids])
        with self.torch.no_grad():
            t = time.perf_counter()
            self.model(x, use_cache=True)
            return time.perf_counter() - t

    def decode(self, ids: list[int], steps: int) -> float:
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=True)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(steps):
                out = self.model(token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--artifact", type=Path, action="append", default=None,
                   help="compiled artifact (repeatable; default: out/MODEL, compiled if absent)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--prefill-lengths", default="128,512")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    artifacts = args.artifact or [Path("out") / args.model]
    if not (artifacts[0] / "manifest.json").is_file():
        from twophase.compiler.driver import compile_model
        from twophase.compiler.options import CompileOptions

        print(f"compiling {args.model} into {artifacts[0]} ...", file=sys.stderr)
        compile_model(args.model, artifacts[0], CompileOptions())

    ours = [TwophaseRunner(a, args.threads) for a in artifacts]
    runners = [*ours, TransformersRunner(args.model, args.threads)]
    lengths = [int(n) for n in args.prefill_lengths.split(",")]
    prompts = {n: corpus_ids(ours[0].engine.tokenizer, n) for n in lengths + [128]}

    # warm-up (session initialization, first-call allocations)
    for r in runners:
        r.prefill(prompts[lengths[0]])
        r.decode(prompts[128], 4)

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for r in runners:
            for n in lengths:
                times.setdefault((r.name, f"prefill {n}"), []).append(n / r.prefill(prompts[n]))
            times.setdefault((r.name, "decode @128"), []).append(args.decode_steps / r.decode(prompts[128], args.decode_steps))

    cols = [f"prefill {n}" for n in lengths] + ["decode @128"]
    base, hf = runners[0].name, runners[-1].name
    print(f"\n{args.model}, {args.threads} threads, median of {args.reps} runs; tokens/s "
          f"(ratio vs the first artifact / vs transformers)\n")
    print("| engine | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in runners:
        cells = []
        for c in cols:
            med = statistics.median(times[(r.name, c)])
            vs_base = med / statistics.median(times[(base, c)])
            vs_hf = med / statistics.median(times[(hf, c)])
            cells.append(f"{med:.1f} ({vs_base:.2f}x / {vs_hf:.2f}x)")
        print(f"| {r.name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
