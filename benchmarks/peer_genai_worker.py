"""A persistent onnxruntime-genai worker: greedy generation timed per phase, over JSON lines on stdin/stdout.

Runs under the peer venv's python (never twophase's), started by `benchmarks/peers_genai.py`:

    OMP_WAIT_POLICY=PASSIVE /work/peers/genai-venv/bin/python benchmarks/peer_genai_worker.py MODEL_DIR THREADS

It loads the genai model dir once. The ORT intra-op thread count goes in through `og.Config.overlay`, so the
model's genai_config.json is never edited. Then it answers one JSON line per request line:

    {"prompt_ids": [...], "new_tokens": N, "ignore_eos": true}
    -> {"prefill_s": .., "append_s": .., "decode_s": .., "decode_steps": N-1, "tokens": [N ids]}

Prefill is `append_tokens(prompt)` plus the first `generate_next_token` (genai runs the prompt's forward
inside append_tokens; `append_s` is that part alone). Decode is the remaining N-1 `generate_next_token`
calls, one forward each. With `ignore_eos` (the default) min_length = max_length, so EOS cannot end a
run early and every step is timed. A malformed request gets {"error": "..."} and the worker goes on.
"""

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def load(model_dir: str, threads: int) -> og.Model:
    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def generate(model: og.Model, prompt_ids: list[int], new_tokens: int, ignore_eos: bool = True) -> dict:
    if not prompt_ids or new_tokens < 1:
        raise ValueError("need a non-empty prompt_ids and new_tokens >= 1")
    max_length = len(prompt_ids) + new_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length if ignore_eos else 0)
    gen = og.Generator(model, params)
    ids = np.asarray(prompt_ids, dtype=np.int32)

    t0 = time.perf_counter()
    gen.append_tokens(ids)
    t1 = time.perf_counter()
    gen.generate_next_token()
    t2 = time.perf_counter()
    steps = 0
    while steps < new_tokens - 1 and not gen.is_done():
        gen.generate_next_token()
        steps += 1
    t3 = time.perf_counter()

    tokens = [int(t) for t in gen.get_sequence(0)[len(prompt_ids) :]]
    return {"prefill_s": t2 - t0, "append_s": t1 - t0, "decode_s": t3 - t2, "decode_steps": steps, "tokens": tokens}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} MODEL_DIR THREADS", file=sys.stderr)
        return 2
    model = load(argv[1], int(argv[2]))
    print(json.dumps({"ready": True, "genai": og.__version__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            reply = generate(model, req["prompt_ids"], int(req["new_tokens"]), bool(req.get("ignore_eos", True)))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # a bad request (genai raises RuntimeError)
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
