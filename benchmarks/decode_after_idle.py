"""Decode rate after a pause against after activity: does the machine's recent past change the decode?

    TVM_NUM_THREADS=2 python benchmarks/decode_after_idle.py [--artifact out/backends/w4a16-tvm] [--threads 2]
                                                             [--reps 12] [--steps 64] [--before 0.5] [--prompt 128]

Each repetition times one decode run (a `--prompt`-token prompt prefilled, then `--steps` greedy steps, timed as
benchmarks/phases.py times them) after each of four preludes of `--before` seconds, in alternating order:
- idle: a sleep;
- read: back-to-back numpy reads on `--threads` threads (`ReadProbe` at its default size, past the last-level cache);
- spin: the calling thread spinning, no memory traffic;
- decode: decode runs like the timed one.

Reports each prelude's median tokens/s and quartiles.

phases.py pauses 0.2 s before each decode run (so that the thread pools of the previous engine stop polling), so
its runs start from the "idle" row. AMD EPYC VM (Zen 4, 2 vCPUs), SmolLM2 w4a16 on TVM, 64 steps, the same day:

| prelude | 2 threads, slow period (tok/s) | 2 threads, fast period (tok/s) | 1 thread (tok/s) |
|---|---|---|---|
| idle | 299 / 309 | 382.0 / 378.7 | 273.2 |
| read | 345 / 325 | 389.3 / 374.7 | 272.9 |
| spin | 329 / 334 | 383.5 / 373.3 | 276.9 |
| decode | 357 / 334 | 385.8 / 394.2 | 275.8 |

- Slow period: two runs of this procedure in an ad hoc harness, 10-12 repetitions each.
- Fast period, 20-30 minutes later: two runs of this script, 12 repetitions each.
- 1 thread: this script, 10 repetitions.

While the machine was slow, the pause cost the 2-thread decode 8-16%; the gap lasted at least 128 steps (3.45
against 3.2 ms per step), so a few warm-up steps would not close it. In the fast period it cost 0-4%. The 1-thread
decode never lost anything, and a 256 MiB read measured the same after the pause (32.4 GB/s either way). So what the
pause costs is the second thread, not the memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="out/backends/w4a16-tvm")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--before", type=float, default=0.5, help="seconds of each prelude")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before the decode steps")
    args = ap.parse_args()
    if args.reps < 1 or args.steps < 1 or args.prompt < 1 or args.before <= 0:
        sys.exit("--reps, --steps and --prompt must be at least 1, --before positive")
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from phases import corpus_ids, open_runner

    from twophase.bench.roofline import ReadProbe

    runner = open_runner(args.artifact, args.threads, args.prompt + args.steps + 1)
    ids = corpus_ids(runner.engine.tokenizer, args.prompt)
    probe = ReadProbe(threads=args.threads)

    def decode() -> float:
        return args.steps / runner.decode(ids, args.steps)

    def until(work) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.before:
            work()

    preludes = {"idle": lambda: time.sleep(args.before), "read": lambda: until(lambda: probe.gbs(1)),
                "spin": lambda: until(lambda: None), "decode": lambda: until(decode)}
    decode()  # warm-up (the first run loads the kernels and records the step replay)
    rates: dict[str, list[float]] = {k: [] for k in preludes}
    for rep in range(args.reps):
        for name, prelude in (preludes.items() if rep % 2 == 0 else reversed(preludes.items())):
            prelude()
            rates[name].append(decode())
    print(f"{runner.name}, {args.threads} threads: decode tokens/s over {args.steps} steps after a {args.prompt}-token "
          f"prompt, after {args.before} s of each prelude ({args.reps} repetitions)\n")
    print("| prelude | tok/s (median) | quartiles |")
    print("|---|---|---|")
    for name, r in rates.items():
        q1, q3 = np.percentile(r, [25, 75])
        print(f"| {name} | {statistics.median(r):.1f} | {q1:.1f}-{q3:.1f} |")


if __name__ == "__main__":
    main()
