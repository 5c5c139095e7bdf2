"""onnxruntime-genai as a peer: prefill and decode throughput of its CPU builds, driven from twophase's venv.

    python benchmarks/peers_genai.py [--peers-dir DIR] [--python PY] [--model LABEL=DIR ...]
                                     [--threads 2] [--reps 5] [--prompt-len 128] [--decode-steps 64]

genai lives in its own venv outside the repo (recipe: benchmarks/PEERS.md). Nothing here imports it:
`GenaiPeer` starts `peer_genai_worker.py` under that venv's python and talks JSON lines to it. Defaults:
$TWOPHASE_PEERS_DIR (else /work/peers) holding genai-venv/ and genai/smollm2-{int4,fp32}/.

The prompt is the same as in benchmarks/phases.py: CPython's pydoc_data topics cut to exactly
--prompt-len tokens by twophase's tokenizer (tokenizer.json of the first model). Prefill: tokens/s of
the prompt's forward plus its first token. Decode: tokens/s over --decode-steps greedy steps after it,
EOS ignored. Each repetition runs every model once, interleaved; the table reports medians and the
min-max spread of the decode rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Self

WORKER = Path(__file__).with_name("peer_genai_worker.py")
DEFAULT_PEERS_DIR = Path("/work/peers")
RECIPE = "benchmarks/PEERS.md"


class PeerMissingError(RuntimeError):
    """The peer's venv or model dir is not there; the message says how to build it."""


def peers_dir() -> Path:
    return Path(os.environ.get("TWOPHASE_PEERS_DIR") or DEFAULT_PEERS_DIR)


def default_python() -> Path:
    return peers_dir() / "genai-venv" / "bin" / "python"


def default_models() -> dict[str, Path]:
    return {name: peers_dir() / "genai" / f"smollm2-{name}" for name in ("int4", "fp32")}


def _env(omp_wait_policy: str | None) -> dict[str, str]:
    """The worker's environment: OMP_WAIT_POLICY set (PASSIVE by default), or removed (None: the library's default)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if omp_wait_policy is not None:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


class WorkerPeer:
    """A peer engine in a worker process under its own venv's python, answering JSON-line requests
    {"prompt_ids", "new_tokens", ...} with {"prefill_s", "decode_s", "decode_steps", "tokens"}."""

    def __init__(self, python: str | Path, worker: Path, args: list[str], threads: int,
                 omp_wait_policy: str | None = "PASSIVE") -> None:
        python = Path(python)
        if not python.is_file():
            raise PeerMissingError(f"no python at {python}: create the peer's venv as {RECIPE} says")
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker; close() closes it)
        self._proc = subprocess.Popen(
            [str(python), str(worker), *args, str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=_env(omp_wait_policy),
        )
        self.what = args[0] if args else str(worker)
        self.info = self._read()  # {"ready": true, <engine>: version} once the model is loaded

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:]
            raise RuntimeError(f"peer worker for {self.what} exited ({self._proc.returncode}):\n{tail}")
        return json.loads(line)

    def run(self, prompt_ids: list[int], new_tokens: int, ignore_eos: bool = True) -> dict[str, Any]:
        """Greedy generation: {"prefill_s", "decode_s", "decode_steps", "tokens", ...}."""
        assert self._proc.stdin is not None
        req = {"prompt_ids": [int(i) for i in prompt_ids], "new_tokens": new_tokens, "ignore_eos": ignore_eos}
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"peer worker for {self.what}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # EOF ends the worker's read loop
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GenaiPeer(WorkerPeer):
    """One onnxruntime-genai model loaded in a worker process (the genai venv's python)."""

    def __init__(self, python: str | Path, model_dir: str | Path, threads: int) -> None:
        model_dir = Path(model_dir)
        if not (model_dir / "genai_config.json").is_file():
            raise PeerMissingError(
                f"{model_dir} is not a genai model dir (no genai_config.json): build it with "
                f"onnxruntime_genai.models.builder as {RECIPE} says (steps 2-3)"
            )
        self.model_dir = model_dir
        super().__init__(python, WORKER, [str(model_dir)], threads)


def prompt_ids(tokenizer_json: Path, n: int) -> list[int]:
    """Exactly n tokens of pydoc_data's topics, as benchmarks/phases.py builds its prompts."""
    from pydoc_data import topics

    from twophase.runtime.tokenizer import Tokenizer

    text = "\n".join(topics.topics.values())
    ids = Tokenizer.from_file(tokenizer_json).encode(text[: n * 12])
    if len(ids) < n:
        raise SystemExit(f"corpus too short for {n} tokens")
    return ids[:n]


def parse_model(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {spec!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--peers-dir",
        type=Path,
        default=None,
        help=f"root of the peer installs (default $TWOPHASE_PEERS_DIR, else {DEFAULT_PEERS_DIR})",
    )
    p.add_argument(
        "--python", type=Path, default=None, help="the genai venv's python (default PEERS/genai-venv/bin/python)"
    )
    p.add_argument(
        "--model",
        type=parse_model,
        action="append",
        default=None,
        metavar="LABEL=DIR",
        help="genai model dir (repeatable; default int4 and fp32 under PEERS/genai/)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=64)
    args = p.parse_args(argv)
    if args.peers_dir is not None:
        os.environ["TWOPHASE_PEERS_DIR"] = str(args.peers_dir)
    python = args.python or default_python()
    models = dict(args.model) if args.model else default_models()

    peers: dict[str, GenaiPeer] = {}
    try:
        for label, model_dir in models.items():
            peers[label] = GenaiPeer(python, model_dir, args.threads)
    except PeerMissingError as e:
        for peer in peers.values():
            peer.close()
        print(f"peer missing: {e}", file=sys.stderr)
        return 1

    try:
        ids = prompt_ids(next(iter(models.values())) / "tokenizer.json", args.prompt_len)
        new_tokens = args.decode_steps + 1  # the first token comes from the prefill
        for peer in peers.values():  # warm-up: first-call allocations, weight prepacking
            peer.run(ids, 4)
        prefill: dict[str, list[float]] = {k: [] for k in peers}
        decode: dict[str, list[float]] = {k: [] for k in peers}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.reps):
            for label, peer in peers.items():
                r = peer.run(ids, new_tokens)
                prefill[label].append(len(ids) / r["prefill_s"])
                decode[label].append(r["decode_steps"] / r["decode_s"])
                tokens[label] = r["tokens"]
        version = next(iter(peers.values())).info.get("genai")
    finally:
        for peer in peers.values():
            peer.close()

    print(
        f"onnxruntime-genai {version}, {args.threads} threads, prompt {len(ids)} tokens, "
        f"{args.decode_steps} decode steps, {args.reps} reps (medians)"
    )
    print(
        f"{'model':<8} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode min-max':>15}  greedy prefix shared with first"
    )
    first = next(iter(tokens.values()))
    for label in peers:
        t = tokens[label]
        same = next((i for i, (a, b) in enumerate(zip(t, first)) if a != b), min(len(t), len(first)))
        d = decode[label]
        print(
            f"{label:<8} {statistics.median(prefill[label]):>14.1f} {statistics.median(d):>13.1f} "
            f"{min(d):>7.1f}-{max(d):<7.1f}  {same}/{len(first)} tokens"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
