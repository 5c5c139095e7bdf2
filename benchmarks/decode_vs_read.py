"""Decode rate against the read bandwidth of the same moment: short reads interleaved with short decode runs.

    TVM_NUM_THREADS=2 python benchmarks/decode_vs_read.py [--artifact out/backends/w4a16-tvm] [--threads 2]
                                                          [--rounds 300] [--steps 8] [--prompt 128]

`benchmarks/phases.py --roofline` brackets each 64-step decode run with reads taken a fraction of a second before
and after it. On a shared VM, the 2-thread read jumps between levels within a second, so that is still coarse. This
script samples finer. Each round (~30 ms) runs:
- a read with numpy's sum (`ReadProbe`, the STREAM-style read of phases.py) of 64 MiB, or of twice the last-level
  cache where that is more (a read from DRAM, like the decode's);
- the same size read by compiled code on TVM's pool (`TvmRead`, where Apache TVM is installed);
- then `--steps` greedy decode steps of one row (`Engine.decode_one_token`, as phases.py times them) after a
  `--prompt`-token prompt (128; the prompt is prefilled again, outside the timing, once the context passes it by
  WINDOW = 64, phases.py's decode run).

Each round's decode rate is turned into GB/s: bytes per token (the decode weights and the K/V at the round's
context, counted as phases.py counts them) times tokens/s. The report gives:
- the correlation of that rate with each read;
- the rounds in sextiles of the numpy read: the median of each read, of the decode GB/s, and of the fraction
  (decode GB/s / numpy read).

So it shows whether the decode follows the read when the read moves, or stops at a level of its own. AMD EPYC VM
(Zen 4, 2 vCPUs), 2 threads, SmolLM2 w4a16 on TVM, 300 rounds: over the four lower sextiles (numpy read 29-36 GB/s,
compiled read 37-44) the decode streamed 28-32 GB/s, 87-97% of the numpy read; over the two upper ones (numpy read
49-53, compiled read 62-66) it streamed 33-35 GB/s, 66-69%.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

WINDOW = 64  # decode positions after the prompt before it is prefilled again (phases.py's decode run)
READ_MIB = 64  # at least; twice the last-level cache where that is more


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="out/backends/w4a16-tvm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before the decode steps")
    args = ap.parse_args()
    if args.rounds < 6 or args.steps < 1 or args.prompt < 1:
        sys.exit("--rounds must be at least 6 (sextiles), --steps and --prompt at least 1")
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from phases import corpus_ids, decode_graph_bytes, open_runner

    from twophase.bench.roofline import MIB, ReadProbe, TvmRead, decode_bytes_per_token, last_level_cache_bytes

    max_context = args.prompt + WINDOW
    runner = open_runner(args.artifact, args.threads, max_context + args.steps)
    engine = runner.engine
    weights, kv_per_position = decode_graph_bytes(runner)
    read_mib = max(READ_MIB, -(-2 * (last_level_cache_bytes() or 0) // MIB))
    numpy_read = ReadProbe(threads=args.threads, size_mb=read_mib)
    try:
        compiled_read = TvmRead(threads=args.threads, size_mb=read_mib, cache_ok=True)
    except (RuntimeError, ImportError) as e:
        print(f"no compiled read: {e}", file=sys.stderr)
        compiled_read = None
    ids = corpus_ids(engine.tokenizer, args.prompt)
    x = np.asarray([ids], dtype=np.int64)

    def restart() -> np.ndarray:
        return engine.prefill(x, np.ones_like(x), reserve=WINDOW + args.steps).argmax(-1)

    token = restart()
    for _ in range(args.steps):  # warm-up, untimed: the first step loads the kernels and records the step replay
        token = engine.decode_one_token(token).argmax(-1)
    rows = []  # (numpy read, compiled read, decode GB/s)
    for _ in range(args.rounds):
        if engine.cache.length + args.steps > max_context:
            token = restart()
        read = numpy_read.gbs(1)
        compiled = max(k.median_gbs for k in compiled_read.measure(1).kernels) if compiled_read else float("nan")
        context = engine.cache.length + (args.steps + 1) / 2  # the mean context the round's steps read
        t0 = time.perf_counter()
        for _ in range(args.steps):
            token = engine.decode_one_token(token).argmax(-1)
        seconds = time.perf_counter() - t0
        token_bytes = decode_bytes_per_token(weights, kv_per_position, context)
        rows.append((read, compiled, token_bytes * args.steps / seconds / 1e9))
    table = np.array(rows)
    print(f"{runner.name}, {args.threads} threads: {args.rounds} rounds of a {read_mib} MiB numpy read, a "
          f"{read_mib} MiB compiled read and {args.steps} decode steps (context {args.prompt}-{max_context}); "
          f"{weights / 1e6:.1f} MB of weights + {kv_per_position / 1e3:.1f} KB of K/V per position per token\n")
    corr = np.corrcoef(table.T)
    print(f"correlation with the decode rate: numpy read {corr[0, 2]:.2f}, compiled read {corr[1, 2]:.2f} "
          f"(the two reads with each other: {corr[0, 1]:.2f})\n")
    print("| numpy read sextile | numpy read GB/s | compiled read GB/s | decode GB/s | decode / numpy read |")
    print("|---|---|---|---|---|")
    for i, part in enumerate(np.array_split(np.argsort(table[:, 0]), 6)):
        read, compiled, decode = (statistics.median(table[part, c]) for c in range(3))
        fraction = statistics.median(table[part, 2] / table[part, 0])
        print(f"| {i + 1} | {read:.1f} | {compiled:.1f} | {decode:.1f} | {fraction:.0%} |")


if __name__ == "__main__":
    main()
