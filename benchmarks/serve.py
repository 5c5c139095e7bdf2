"""`twophase serve` under concurrent load: total tokens/s and per-token latency at 1, 4 and 16 clients.

    python benchmarks/serve.py [--artifact DIR] [--clients 1,4,16] [--requests 3] [--max-tokens 64]
                               [--max-batch 16] [--threads 2] [--time-limit 300] [--no-baseline] [--json]

Starts `twophase serve` as a subprocess on a free port of 127.0.0.1 (loopback only), then for each
client count runs that many client threads at once, each sending --requests streamed, greedy
/v1/completions requests one after another (prompts: token ids of real text from CPython's
pydoc_data/topics.py, 32 to 160 tokens, different per request). Every run is bounded: a fixed number of requests, and no new
request after --time-limit seconds in all.

Reported per client count, all measured in this one run against the same server:
  tok/s      completion tokens (the server's usage counts) / wall time of the round
  ratio      tok/s over the 1-client round's
  tpot       time per output token a client sees, per request: (last chunk - first chunk) / (tokens - 1),
             p50 / p95 over the requests (as vLLM's benchmark_serving defines TPOT)
  ttft       time to first token, p50 / p95
  mean batch rows per decode step on the server (from /health's counters)
The issue's bar: 16 clients reach at least 3x the 1-client total throughput on the same server. A decode
step runs the cache's rows up to the last running one, so a lone client should decode as fast on a
--max-batch 16 server as on a one-slot one; to check, first of all (unless --no-baseline) 1 client runs
against a --max-batch 1 server, and every row's ratio against it is printed too.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

DEFAULT_ARTIFACT = Path("out/smollm2-135m-instruct")


def prompts(artifact: Path, n: int, max_tokens: int) -> list[list[int]]:
    """n different prompts of real text as token ids, 32..160 tokens each (less where the context is short)."""
    import pydoc_data.topics as topics

    from twophase.runtime.artifact import load_manifest, max_context
    from twophase.runtime.tokenizer import Tokenizer

    manifest = load_manifest(artifact, verify=False)
    tokenizer = Tokenizer.from_artifact(artifact, manifest)
    longest = min(160, max_context(manifest) - max_tokens)
    if tokenizer is None or longest < 8:
        raise SystemExit(f"{artifact}: needs a tokenizer and a context above max_tokens + 8")
    texts = [t for t in topics.topics.values() if len(t) > 2000]
    out = []
    for i in range(n):
        ids = tokenizer.encode(texts[(7 * i) % len(texts)])
        out.append(ids[: min(longest, 32 + (i * 37) % 129)])
    return out


class Server:
    """`twophase serve` in a subprocess on a free loopback port."""

    def __init__(self, artifact: Path, max_batch: int, threads: int, extra: list[str] | None = None) -> None:
        cmd = [sys.executable, "-m", "twophase.cli", "serve", str(artifact), "--host", "127.0.0.1", "--port", "0",
               "--max-batch", str(max_batch), "--threads", str(threads), "--model-name", "bench", *(extra or [])]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        m = re.search(r"at (http://\S+)/v1", line)
        if not m:
            self.proc.kill()
            raise SystemExit(f"twophase serve did not start: {line}{self.proc.stderr.read()}")
        self.url = m.group(1)
        self.banner = line.strip()
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
        deadline = time.monotonic() + 60
        while httpx.get(self.url + "/health").status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("twophase serve is not healthy after 60 s")
            time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_request(http: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    tpot = (stamps[-1] - stamps[0]) / (tokens - 1) if len(stamps) > 1 and tokens > 1 else None
    return {"tokens": tokens, "ttft": stamps[0] - t0 if stamps else None, "tpot": tpot}


def run_round(url: str, clients: int, requests: int, max_tokens: int, texts: list[list[int]], deadline: float) -> dict:
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        with httpx.Client(timeout=300) as http:
            start.wait()
            for j in range(requests):
                if time.monotonic() > deadline:
                    return
                try:
                    res = one_request(http, url, texts[(k * requests + j) % len(texts)], max_tokens)
                except httpx.HTTPError as e:
                    errors.append(e)
                    return
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    before = httpx.get(url + "/health").json()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/health").json()
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed with {clients} clients, e.g. {errors[0]!r}")
    tpots = sorted(r["tpot"] for r in results if r["tpot"] is not None)
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    steps = after["decode_steps"] - before["decode_steps"]
    return {
        "clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results), "wall_s": wall,
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "tpot_p50_ms": 1e3 * pct(tpots, 50), "tpot_p95_ms": 1e3 * pct(tpots, 95),
        "ttft_p50_ms": 1e3 * pct(ttfts, 50), "ttft_p95_ms": 1e3 * pct(ttfts, 95),
        "mean_batch": (after["decode_rows"] - before["decode_rows"]) / steps if steps else 0.0,
        "prefill_s": after["prefill_s"] - before["prefill_s"], "decode_s": after["decode_s"] - before["decode_s"],
        "busy_s": after["busy_s"] - before["busy_s"],
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=None, help=f"artifact directory (default {DEFAULT_ARTIFACT})")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another (default 3)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request (default 64)")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch (default 16)")
    ap.add_argument("--prefill-graph-from-batch", type=int, default=None,
                    help="pass --prefill-graph-from-batch N to the batching server")
    ap.add_argument("--threads", type=int, default=2, help="the server's ORT intra-op threads (default 2)")
    ap.add_argument("--time-limit", type=float, default=300, help="no new request after this many seconds")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the 1-client round on a max-batch-1 server (run first, for reference)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()
    artifact = args.artifact or DEFAULT_ARTIFACT
    if not (artifact / "manifest.json").is_file():
        raise SystemExit(f"{artifact}: no artifact there; compile one or pass --artifact DIR")
    counts = [int(c) for c in args.clients.split(",")]
    texts = prompts(artifact, max(counts) * args.requests, args.max_tokens)

    deadline = time.monotonic() + args.time_limit
    rows = []
    if not args.no_baseline:  # 1 client on a server with one slot: single-stream speed without idle rows
        server = Server(artifact, 1, args.threads)
        try:
            one_request(httpx.Client(timeout=300), server.url, texts[0], 8)  # warm-up
            rows.append({**run_round(server.url, 1, args.requests, args.max_tokens, texts, deadline), "server": 1})
        finally:
            server.close()
    extra = [] if args.prefill_graph_from_batch is None else ["--prefill-graph-from-batch", str(args.prefill_graph_from_batch)]
    server = Server(artifact, args.max_batch, args.threads, extra)
    try:
        print(server.banner)
        one_request(httpx.Client(timeout=300), server.url, texts[0], 8)
        rows += [{**run_round(server.url, c, args.requests, args.max_tokens, texts, deadline), "server": args.max_batch}
                 for c in counts]
    finally:
        server.close()

    same = next(r for r in rows if r["server"] == args.max_batch)  # the first count on the batching server
    print(f"\n{artifact} | max_tokens {args.max_tokens}, {args.requests} requests per client, {args.threads} threads, "
          f"greedy, streamed; ratios vs {same['clients']} client(s) on the same server"
          + ("" if args.no_baseline else " / vs 1 client on a max-batch-1 server") + "\n")
    print("| server max batch | clients | requests | tokens | tok/s | ratio | tpot p50 / p95 (ms) | "
          "ttft p50 / p95 (ms) | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    base1 = rows[0]["tok_s"] if not args.no_baseline else None
    for r in rows:
        ratio = f"{r['tok_s'] / same['tok_s']:.2f}x" + (f" / {r['tok_s'] / base1:.2f}x" if base1 else "")
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | {ratio} | "
              f"{r['tpot_p50_ms']:.1f} / {r['tpot_p95_ms']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} | "
              f"{r['mean_batch']:.1f} |")
    if args.json:
        print(json.dumps(rows, indent=2))
    sixteen = [r for r in rows if r["clients"] == 16 and r["server"] == args.max_batch]
    if sixteen and same["clients"] == 1:
        ratio = sixteen[0]["tok_s"] / same["tok_s"]
        print(f"\n16 clients vs 1 on the same server: {ratio:.2f}x total throughput "
              f"({'meets' if ratio >= 3 else 'misses'} the 3x bar)"
              + (f"; vs 1 client on a max-batch-1 server: {sixteen[0]['tok_s'] / base1:.2f}x" if base1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
