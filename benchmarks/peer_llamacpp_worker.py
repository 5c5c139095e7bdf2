"""A persistent llama.cpp (llama-cpp-python) worker: greedy generation timed per phase, JSON lines on stdin/stdout.

Runs under the llama.cpp peer venv's python (never twophase's), started by `benchmarks/peers.py`:

    OMP_WAIT_POLICY=PASSIVE /work/peers/llamacpp-venv/bin/python benchmarks/peer_llamacpp_worker.py GGUF THREADS

Same protocol as peer_genai_worker.py:

    {"prompt_ids": [...], "new_tokens": N}
    -> {"prefill_s": .., "decode_s": .., "decode_steps": N-1, "tokens": [N ids]}

Prefill is `eval(prompt)` (one batch) plus the greedy pick of the first token; decode is N-1 single-token
`eval` calls, each followed by the greedy pick (argmax of the last logits), EOS ignored. The KV cache is
reset per request.
"""

import json
import sys
import time

import llama_cpp
import numpy as np


def load(gguf: str, threads: int, n_ctx: int = 4096) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                           n_batch=512, logits_all=False, verbose=False)


def generate(llm: llama_cpp.Llama, prompt_ids: list[int], new_tokens: int) -> dict:
    if not prompt_ids or new_tokens < 1:
        raise ValueError("need a non-empty prompt_ids and new_tokens >= 1")
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_steps": new_tokens - 1, "tokens": tokens}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} GGUF THREADS", file=sys.stderr)
        return 2
    llm = load(argv[1], int(argv[2]))
    print(json.dumps({"ready": True, "llama_cpp": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            reply = generate(llm, req["prompt_ids"], int(req["new_tokens"]))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
