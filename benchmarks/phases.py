"""Prefill and decode throughput of twophase artifacts, side by side with peers, plus the decode roofline.

    python benchmarks/phases.py [--artifact DIR ...] [--genai LABEL=DIR ...] [--no-transformers]
                                [--roofline] [--batches 1,4,16] [--threads 2] [--reps 5]
    python benchmarks/phases.py --backend tvm,ort [--schemes w8a16,w4a16] [--no-transformers]

Every engine runs in the same process run, interleaved repetition by repetition, in alternating order (forward,
then reversed: on this machine the engine that runs second in a repetition measured up to 0.78x, whichever it
was); the table reports medians, with ratios to the first artifact (the baseline, e.g. fp32) measured in that
same run: the median of the per-repetition ratios, which holds where the machine's bandwidth swings between
repetitions (a ratio of medians taken from different repetitions does not).

Engines: each --artifact (twophase; e.g. one per scheme, or "before/after" builds such as
`--kv-cache grow --no-fusions` vs the default), transformers eager fp32 (unless --no-transformers),
onnxruntime-genai builds given with --genai LABEL=DIR and llama.cpp on a GGUF with --llamacpp (each in its own
venv, driven through a worker process; recipe in benchmarks/PEERS.md). All get the same token ids.

Prompts are real text (CPython's pydoc_data/topics.py) cut to exactly N tokens. Prefill: one forward
over the N-token prompt. Decode: tokens/s over --decode-steps greedy steps after a 128-token prompt
(EOS ignored, so every step runs).

--backend tvm,ort compiles (once, into out/backends/SCHEME-BACKEND; both phases in SCHEME, ORT at its
default MatMulNBits accuracy_level 4) and runs one artifact per scheme and backend, and adds a table of
the TVM / ORT ratios per scheme (time per decode token and prefill throughput) and the TVM build times.

--roofline measures a STREAM-style read bandwidth with the same thread count (numpy's sum;
twophase.bench.roofline) just before and just after each decode run (`ReadProbe`, the median of 3 passes each,
after a pause of SETTLE_S = 0.2 s in which the engines' thread pools stop polling for work),
and reports, per engine with an ONNX decode graph, the bytes a decode step reads (weights once + the K/V of the
mean context) and the fraction of bandwidth / bytes-per-token that the measured decode rate reaches: the median
over the runs of each run's decode rate against the mean of its two bracketing reads, and the range of those
fractions. A shared VM's read moves between levels within a second (AMD EPYC VM, back-to-back 256 MiB reads at
2 threads: 54, 50, 52, then 30-35 GB/s), so a read taken seconds before a run says little about the bandwidth
the run had; the bracketing reads are taken a fraction of a second from it. The fraction against the read of
the whole repetition (`measure_bandwidth`, before all of its runs; the previous definition) is reported next
to it. With more than one thread it also reads with one thread in each repetition and reports the fractions per
level (`print_levels`): runs whose two bracketing N-thread reads both scaled past the 1-thread read (>= (1 + N)
/ 2 times it), runs where neither did, and how many changed level during the run. Where Apache TVM is
installed it also reads with compiled code (`TvmRead`: with and without software prefetches) and reports the
fraction against the best of the repetition's reads: numpy's sum leaves the streaming to the hardware
prefetcher, and where compiled code reads faster (Intel Xeon VM: ~1.2x), the numpy read is no ceiling. And
against a compiled read of each engine's own bytes per token, cycled (the same-size read): where the last-level
cache holds part of a working set that size from one token to the next (Intel Xeon VM with a 480 MiB host L3:
96 MiB cycled read ~1.6x as fast as 960 MiB), that is the ceiling the decode has.
--batches measures decode throughput (tokens/s summed over the rows) of each twophase
artifact at those batch sizes (rows are different 128-token prompts).
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
        self.backend = phases["decode"].backend
        self.scheme = phases["decode"].scheme
        self.name = (f"twophase {artifact.name} [{self.backend}] (prefill {phases['prefill'].scheme}, "
                     f"decode {phases['decode'].scheme})")

    def prefill(self, ids: list[int]) -> float:
        x = np.asarray([ids], dtype=np.int64)
        t = time.perf_counter()
        self.engine.prefill(x, np.ones_like(x))
        return time.perf_counter() - t

    def decode(self, ids: list[int], steps: int) -> float:
        x = np.asarray([ids], dtype=np.int64)
        logits = self.engine.prefill(x, np.ones_like(x), reserve=steps + 1)
        token = logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            token = self.engine.decode_one_token(token).argmax(-1)
        return time.perf_counter() - t


def open_runner(artifact: str, threads: int, positions: int) -> TwophaseRunner:
    """A TwophaseRunner for the scripts beside this one, whose runs hold `positions` cache positions (the prompt and
    the decode steps): exits with a message where the artifact does not load or its max_len is shorter."""
    from twophase.compiler.errors import TwophaseError

    try:
        runner = TwophaseRunner(Path(artifact), threads)
    except TwophaseError as e:
        sys.exit(f"error: {e}")
    if positions > runner.engine.cache.max_len:
        sys.exit(f"error: a run holds {positions} positions (prompt and decode steps), more than the artifact's "
                 f"max_len {runner.engine.cache.max_len}")
    return runner


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


class GenaiRunner:
    """An onnxruntime-genai build in its own venv (benchmarks/peers_genai.py's worker)."""

    def __init__(self, label: str, model_dir: Path, threads: int) -> None:
        from peers_genai import GenaiPeer, default_python

        self.peer = GenaiPeer(default_python(), model_dir, threads)
        self.model_dir = model_dir
        self.name = f"onnxruntime-genai {label} ({self.peer.info.get('genai', '?')})"

    def prefill(self, ids: list[int]) -> float:
        return self.peer.run(ids, 1)["prefill_s"]

    def decode(self, ids: list[int], steps: int) -> float:
        reply = self.peer.run(ids, steps + 1)
        return reply["decode_s"] * steps / reply["decode_steps"]


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python in its own venv (benchmarks/peer_llamacpp_worker.py)."""

    def __init__(self, gguf: Path, threads: int, omp_wait_policy: str | None = "PASSIVE") -> None:
        from peers_genai import WorkerPeer, peers_dir

        python = peers_dir() / "llamacpp-venv" / "bin" / "python"
        self.peer = WorkerPeer(python, Path(__file__).with_name("peer_llamacpp_worker.py"), [str(gguf)], threads,
                               omp_wait_policy)
        policy = omp_wait_policy or "default"
        self.name = (f"llama.cpp {gguf.name} (llama-cpp-python {self.peer.info.get('llama_cpp', '?')}, "
                     f"OMP_WAIT_POLICY {policy})")

    def prefill(self, ids: list[int]) -> float:
        return self.peer.run(ids, 1)["prefill_s"]

    def decode(self, ids: list[int], steps: int) -> float:
        reply = self.peer.run(ids, steps + 1)
        return reply["decode_s"] * steps / reply["decode_steps"]


def decode_graph_bytes(runner) -> tuple[int, int] | None:
    """(weight bytes a decode step streams, K/V bytes per cached position) of a runner, if it has a decode graph
    (ONNX) or a TVM parameter index."""
    from twophase.bench.model_bytes import graph_bytes, kv_bytes_per_position, phase_bytes

    if isinstance(runner, TwophaseRunner):
        e = runner.engine
        f = e.facts
        itemsize = np.dtype(e.manifest.kv_cache["dtype"]).itemsize
        kv = kv_bytes_per_position(f.num_layers, f.num_kv_heads, f.head_dim, itemsize)
        return phase_bytes(e.root, e.manifest.phases["decode"]).streamed, kv  # ONNX graph or TVM parameter index
    if isinstance(runner, GenaiRunner):
        import json

        cfg = json.loads((runner.model_dir / "genai_config.json").read_text())["model"]["decoder"]
        return graph_bytes(runner.model_dir / cfg["filename"]).streamed, kv_bytes_per_position(
            cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_size"], 4)
    return None


BRACKET_PASSES = 3  # reads of the probe just before and just after each decode run (median)
# pause before each of those reads, so that the engines' thread pools have stopped waiting for work: ORT's spinning
# threads and TVM's sched_yield() polling after a parallel call share the cores with the read otherwise (AMD EPYC VM:
# 2-thread reads right after an ORT decode run measured ~27 GB/s, ~30 after a 50 ms pause)
SETTLE_S = 0.2


def bracket_read(probe) -> float:
    time.sleep(SETTLE_S)
    return probe.gbs(BRACKET_PASSES)


def backend_artifacts(model: str, backends: list[str], schemes: list[str]) -> list[Path]:
    """out/backends/SCHEME-BACKEND for each scheme and backend, compiled where missing."""
    from twophase.compiler.driver import compile_model
    from twophase.compiler.options import Backend, CompileOptions, PhaseOptions, QuantScheme, WeightAlgorithm

    out = []
    for scheme in schemes:
        for backend in backends:
            path = Path("out") / "backends" / f"{scheme}-{backend}"
            if not (path / "manifest.json").is_file():
                po = PhaseOptions(QuantScheme(scheme), algorithm=WeightAlgorithm.RTN)
                print(f"compiling {model} ({scheme}, {backend}) into {path} ...", file=sys.stderr)
                compile_model(model, path, CompileOptions(backend=Backend(backend), prefill=po, decode=po), overwrite=True)
            out.append(path)
    return out


def tvm_build_seconds(root: Path) -> str:
    import json

    report = json.loads((root / "report.json").read_text())
    build = report.get("tvm_build_seconds", {})
    return f"{build.get('prefill', '?')}, {build.get('decode', '?')} (whole compile {report.get('compile_seconds')})"


def batch_decode(runner: TwophaseRunner, prompts: list[list[int]], steps: int) -> float:
    """Seconds for `steps` decode steps over len(prompts) rows."""
    e = runner.engine
    x = np.asarray(prompts, dtype=np.int64)
    token = e.prefill(x, np.ones_like(x), reserve=steps + 1).argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        token = e.decode_one_token(token).argmax(-1)
    return time.perf_counter() - t


def compiled_read(threads: int):
    """twophase.bench.roofline.TvmRead at `threads` threads, or None without Apache TVM (or with another pool size)."""
    try:
        from twophase.bench.roofline import TvmRead

        return TvmRead(threads)
    except RuntimeError as e:
        print(f"(no compiled read: {e})", file=sys.stderr)
        return None


def print_levels(solos: list[float], by_level: list[tuple[str, list[float], list[tuple[float, float]]]],
                 threads: int) -> None:
    """The roofline fractions split by whether the N-thread read around a decode run scaled past one thread's.

    On a shared VM the N-thread read can sit at about one thread's rate (the threads share one path to memory)
    or at about N times it (each has its own), switching within a second; one thread's read barely moves. The
    decode rate does not follow the N-thread level one for one (each thread must then stream near its solo rate
    while also computing), so a fraction depends on which level its run caught: it is reported per level. A run
    counts as scaled when both of its bracketing N-thread reads are at least (1 + N) / 2 times its repetition's
    one-thread read (`solos`, one per repetition), as shared when both are below, and as mixed otherwise (the level
    changed during the run: left out of both).
    """
    cut = (1 + threads) / 2

    def level(pair: tuple[float, float], solo: float) -> str:
        up = [g >= cut * solo for g in pair]
        return "scaled" if all(up) else "shared" if not any(up) else "mixed"

    levels = {name: [level(pair, solos[i]) for i, pair in enumerate(pairs)] for name, _, pairs in by_level}
    ratios = [g / solos[i] for _, _, pairs in by_level for i, pair in enumerate(pairs) for g in pair]
    counts = {x: sum(ls.count(x) for ls in levels.values()) for x in ("scaled", "shared", "mixed")}
    print(f"\nBy bandwidth level: the 1-thread read measured {statistics.median(solos):.1f} GB/s "
          f"({min(solos):.1f}-{max(solos):.1f}); the {threads}-thread reads around the decode runs were "
          f"{min(ratios):.2f}-{max(ratios):.2f}x of it. Scaled: runs whose two reads were both >= {cut:.1f}x "
          f"({counts['scaled']}), shared: both below ({counts['shared']}), mixed: left out ({counts['mixed']}); the "
          "fraction is the median over that level's runs\n")
    print("| engine | fraction, scaled | fraction, shared |")
    print("|---|---|---|")
    for name, fractions, _ in by_level:
        cells = []
        for want in ("scaled", "shared"):
            xs = [f for f, x in zip(fractions, levels[name]) if x == want]
            cells.append(f"{statistics.median(xs):.0%} ({min(xs):.0%}-{max(xs):.0%}, n={len(xs)})" if xs else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--artifact", type=Path, action="append", default=None,
                   help="compiled artifact (repeatable; default: out/MODEL, compiled if absent)")
    p.add_argument("--genai", action="append", default=[], metavar="LABEL=DIR",
                   help="an onnxruntime-genai model dir to run beside (repeatable)")
    p.add_argument("--llamacpp", type=Path, default=None, metavar="GGUF",
                   help="run llama.cpp (llama-cpp-python in $TWOPHASE_PEERS_DIR/llamacpp-venv) on this GGUF")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers eager fp32")
    p.add_argument("--roofline", action="store_true", help="measure bandwidth and report the decode roofline")
    p.add_argument("--batches", default="", help="decode batch sizes for the twophase artifacts, e.g. 1,4,16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--prefill-lengths", default="128,512")
    p.add_argument("--backend", default="", help="compare lowering backends, e.g. tvm,ort (see above)")
    p.add_argument("--schemes", default="w8a16,w4a16", help="with --backend: schemes compiled for each backend")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # TVM sizes its pool once, at its first parallel call
    sys.path.insert(0, str(Path(__file__).parent))

    backends = [b for b in args.backend.split(",") if b]
    if backends:
        artifacts = (args.artifact or []) + backend_artifacts(args.model, backends, args.schemes.split(","))
    else:
        artifacts = args.artifact or [Path("out") / args.model]
    if not (artifacts[0] / "manifest.json").is_file():
        from twophase.compiler.driver import compile_model
        from twophase.compiler.options import CompileOptions

        print(f"compiling {args.model} into {artifacts[0]} ...", file=sys.stderr)
        compile_model(args.model, artifacts[0], CompileOptions())

    ours = [TwophaseRunner(a, args.threads) for a in artifacts]
    runners: list = list(ours)
    for spec in args.genai:
        label, _, path = spec.partition("=")
        runners.append(GenaiRunner(label, Path(path), args.threads))
    if args.llamacpp is not None:
        # OpenMP peers get OMP_WAIT_POLICY=PASSIVE (spin-waiting collapses on a busy 2-core machine); on a quiet
        # machine passive waits cost llama.cpp's many small per-token ops dearly, so both are measured.
        runners.append(LlamaCppRunner(args.llamacpp, args.threads, "PASSIVE"))
        runners.append(LlamaCppRunner(args.llamacpp, args.threads, None))
    hf = None
    if not args.no_transformers:
        hf = TransformersRunner(args.model, args.threads)
        runners.append(hf)
    lengths = [int(n) for n in args.prefill_lengths.split(",") if n]
    prompts = {n: corpus_ids(ours[0].engine.tokenizer, n) for n in lengths + [128]}

    # warm-up (session initialization, first-call allocations)
    for r in runners:
        if lengths:
            r.prefill(prompts[lengths[0]])
        r.decode(prompts[128], 4)

    times: dict[tuple[str, str], list[float]] = {}
    bandwidths = []  # --roofline: read bandwidth measured in each repetition, just before its runs
    # --roofline: the same read, quick, just before and just after each decode run: (before, after) per run
    probe = None
    if args.roofline:
        from twophase.bench.roofline import ReadProbe

        probe = ReadProbe(args.threads)
    brackets: dict[str, list[tuple[float, float]]] = {}
    compiled = compiled_read(args.threads) if args.roofline else None
    best_reads = []  # --roofline: the best of the numpy and compiled reads, per repetition
    context = 128 + args.decode_steps // 2  # the mean context of a decode run
    # --roofline with TVM: a compiled read of each engine's own bytes per token, cycled (footprint MiB -> reader)
    footprint_mib: dict[str, int] = {}
    footprint_reads: dict[int, list[float]] = {}
    readers: dict[int, object] = {}
    if compiled is not None:
        from twophase.bench.roofline import MIB, TvmRead, decode_bytes_per_token

        for r in runners:
            if (sizes := decode_graph_bytes(r)) is not None:
                footprint_mib[r.name] = -(-int(decode_bytes_per_token(sizes[0], sizes[1], context)) // MIB)
        readers = {mib: TvmRead(args.threads, mib, cache_ok=True) for mib in set(footprint_mib.values())}
    for rep in range(args.reps):
        if args.roofline:
            from twophase.bench.roofline import StreamKernel, measure_bandwidth

            bw = measure_bandwidth(args.threads)
            solo = measure_bandwidth(1).kernel(StreamKernel.READ).median_gbs if args.threads > 1 else None
            bandwidths.append((bw.kernel(StreamKernel.READ).median_gbs, bw.cpu_share, bw.array_mib, solo))
            best = bandwidths[-1][0]
            if compiled is not None:
                best = max(best, *(k.median_gbs for k in compiled.measure(3).kernels))
            best_reads.append(best)
            for mib, reader in readers.items():
                footprint_reads.setdefault(mib, []).append(max(k.median_gbs for k in reader.measure(3).kernels))
        for r in runners if rep % 2 == 0 else runners[::-1]:  # alternating order: position effects cancel
            for n in lengths:
                times.setdefault((r.name, f"prefill {n}"), []).append(n / r.prefill(prompts[n]))
            before = bracket_read(probe) if probe is not None else 0.0
            times.setdefault((r.name, "decode @128"), []).append(args.decode_steps / r.decode(prompts[128], args.decode_steps))
            if probe is not None:
                brackets.setdefault(r.name, []).append((before, bracket_read(probe)))

    def paired(a: list[float], b: list[float]) -> float:  # median of the per-repetition ratios
        return statistics.median(x / y for x, y in zip(a, b))

    cols = [f"prefill {n}" for n in lengths] + ["decode @128"]
    base = runners[0].name
    print(f"\n{args.model}, {args.threads} threads, median of {args.reps} runs; tokens/s "
          f"(ratio vs the first artifact{' / vs transformers' if hf else ''}: median of the per-repetition ratios)\n")
    print("| engine | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in runners:
        cells = []
        for c in cols:
            med = statistics.median(times[(r.name, c)])
            cell = f"{med:.1f} ({paired(times[(r.name, c)], times[(base, c)]):.2f}x"
            if hf is not None:
                cell += f" / {paired(times[(r.name, c)], times[(hf.name, c)]):.2f}x"
            cells.append(cell + ")")
        print(f"| {r.name} | " + " | ".join(cells) + " |")

    if args.roofline:
        from twophase.bench.roofline import decode_bytes_per_token, roofline_tokens_per_s

        reads = [b[0] for b in bandwidths]
        read = statistics.median(reads)
        around = [(a + b) / 2 for runs in brackets.values() for a, b in runs]
        print(f"\nDecode roofline: STREAM-style read bandwidth (numpy's sum, {args.threads} threads, "
              f"{bandwidths[0][2]} MiB arrays) measured just before and just after each decode run (the median of "
              f"{BRACKET_PASSES} passes each, after a pause of {SETTLE_S} s): {statistics.median(around):.1f} GB/s ({min(around):.1f}-{max(around):.1f}"
              f"; mean of the two per run); once per repetition, before all its runs: {read:.1f} GB/s "
              f"({min(reads):.1f}-{max(reads):.1f}, cpu share {statistics.median(b[1] for b in bandwidths):.2f}). "
              f"Bytes per token = decode weights + K/V of {context} positions. fraction = median over the runs "
              "of measured / roofline at the mean of the run's two bracketing reads; then the same against the "
              "repetition's read\n")
        by_level: list[tuple[str, list[float]]] = []
        if compiled is not None:
            print(f"Best read: the best of that read and a compiled one ({compiled.threads} TVM threads, 1 MiB chunks "
                  f"of 4 streams, with and without software prefetches; twophase.bench.roofline.TvmRead), per "
                  f"repetition: {statistics.median(best_reads):.1f} GB/s ({min(best_reads):.1f}-{max(best_reads):.1f}); numpy's "
                  "sum leaves streaming to the hardware prefetcher, which some cores (Intel's) outrun.\n"
                  "Same-size read: the compiled read (the better of its two kernels) over the engine's own bytes per "
                  "token, cycled, per repetition: the ceiling for a working set that size, which the caches may "
                  "partly hold from one token to the next (they do on a VM with a large host L3); " +
                  ", ".join(f"{mib} MiB {statistics.median(v):.1f} GB/s ({min(v):.1f}-{max(v):.1f})"
                            for mib, v in sorted(footprint_reads.items())) + "\n")
        print("| engine | weights MB | KV MB/token | roofline tok/s | measured tok/s | fraction (per run) | "
              "fraction of the repetition's read | fraction of the best read | fraction of a same-size read |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in runners:
            sizes = decode_graph_bytes(r)
            if sizes is None:
                continue
            per_token = decode_bytes_per_token(sizes[0], sizes[1], context)
            runs = times[(r.name, "decode @128")]
            bracketed = [t / roofline_tokens_per_s(per_token, (a + b) / 2) for t, (a, b) in zip(runs, brackets[r.name])]
            fractions = [t / roofline_tokens_per_s(per_token, g) for t, g in zip(runs, reads)]
            best = [t / roofline_tokens_per_s(per_token, g) for t, g in zip(runs, best_reads)]
            cells = ["-", "-"]
            if compiled is not None:
                same = [t / roofline_tokens_per_s(per_token, g)
                        for t, g in zip(runs, footprint_reads[footprint_mib[r.name]])]
                cells = [f"{statistics.median(x):.0%} ({min(x):.0%}-{max(x):.0%})" for x in (best, same)]
            print(f"| {r.name} | {sizes[0] / 1e6:.1f} | {sizes[1] * context / 1e6:.2f} | "
                  f"{roofline_tokens_per_s(per_token, statistics.median(around)):.0f} | {statistics.median(runs):.1f} | "
                  f"**{statistics.median(bracketed):.0%}** ({min(bracketed):.0%}-{max(bracketed):.0%}) | "
                  f"{statistics.median(fractions):.0%} ({min(fractions):.0%}-{max(fractions):.0%}) | "
                  + " | ".join(cells) + " |")
            by_level.append((r.name, bracketed, brackets[r.name]))
        if args.threads > 1:
            print_levels([b[3] for b in bandwidths], by_level, args.threads)

    if backends:
        print("\nBackends side by side (same run): TVM / ORT per scheme; decode = time per token at context 128 "
              "(ORT / TVM tokens/s ratio inverted: < 1.25 meets the issue's target)\n")
        print("| scheme | " + " | ".join(f"{c} tok/s {' / '.join(backends)}" for c in cols) + " | TVM time per decode "
              "token / ORT's | TVM build s (prefill, decode) |")
        print("|---" * (len(cols) + 3) + "|")
        by = {(r.scheme, r.backend): r for r in ours}
        for scheme in dict.fromkeys(r.scheme for r in ours):
            if (scheme, "tvm") not in by or (scheme, "ort") not in by:
                continue
            cells = []
            for c in cols:
                cells.append(" / ".join(f"{statistics.median(times[(by[(scheme, b)].name, c)]):.1f}" for b in backends))
            tvm_r, ort_r = by.get((scheme, "tvm")), by.get((scheme, "ort"))
            ratio = statistics.median(times[(ort_r.name, "decode @128")]) / statistics.median(times[(tvm_r.name, "decode @128")])
            build = tvm_build_seconds(tvm_r.engine.root)
            print(f"| {scheme} | " + " | ".join(cells) + f" | {ratio:.2f} | {build} |")
        print("\nBoth at the artifacts' accuracy level: at 4 (default) ORT's MatMulNBits quantizes activations to "
              "int8 per block in every call, TVM in its decode GEMV (<= 16 rows; its GEMMs dequantize to float).")

    batches = [int(b) for b in args.batches.split(",") if b]
    if batches:
        ids = corpus_ids(ours[0].engine.tokenizer, 128 * max(batches))
        rows = {b: [ids[i * 128 : (i + 1) * 128] for i in range(b)] for b in batches}
        for r in ours:  # warm-up at each batch size
            for b in batches:
                batch_decode(r, rows[b], 2)
        bt: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.reps):
            for r in ours:
                for b in batches:
                    bt.setdefault((r.name, b), []).append(b * args.decode_steps / batch_decode(r, rows[b], args.decode_steps))
        print(f"\nBatched decode after 128-token prompts: tokens/s summed over the rows (median of {args.reps}; "
              "ratio vs batch 1)\n")
        print("| engine | " + " | ".join(f"batch {b}" for b in batches) + " |")
        print("|---" * (len(batches) + 1) + "|")
        for r in ours:
            one = statistics.median(bt[(r.name, batches[0])])
            cells = [f"{statistics.median(bt[(r.name, b)]):.1f} ({statistics.median(bt[(r.name, b)]) / one:.2f}x)"
                     for b in batches]
            print(f"| {r.name} | " + " | ".join(cells) + " |")
    for r in runners:
        if isinstance(r, (GenaiRunner, LlamaCppRunner)):
            r.peer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
