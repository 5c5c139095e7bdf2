"""Real-model tests on SmolLM2-135M-Instruct from the model zoo (slow: export ~2 min, cached)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
]


@pytest.fixture(scope="module")
def smollm2_artifact(tmp_path_factory):
    from twophase.compiler.driver import compile_model
    from twophase.compiler.options import CompileOptions

    out = tmp_path_factory.mktemp("smollm2") / "artifact"
    return compile_model("smollm2-135m-instruct", out, CompileOptions())


@pytest.fixture(scope="module")
def smollm2_torch():
    from twophase.models import zoo
    from twophase.models.hf import load_causal_lm

    gguf = zoo.fetch("smollm2-135m-instruct")
    return load_causal_lm(gguf.parent, gguf.name)


def test_greedy_tokens_equal_transformers(smollm2_artifact, smollm2_torch):
    import torch

    from twophase.runtime.engine import Engine

    model, tokenizer = smollm2_torch
    engine = Engine.load(smollm2_artifact, threads=2)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert engine.tokenizer.encode(prompt) == ids[0].tolist()
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(ids))
        ref_new = ref[0, ids.shape[1]:].tolist()
        ours = list(engine.generate_ids(ids[0].tolist(), max_new_tokens=32))
        assert ours == ref_new, prompt


def test_prefill_logits_match_torch(smollm2_artifact, smollm2_torch):
    import torch

    from twophase.runtime.engine import Engine

    model, tokenizer = smollm2_torch
    engine = Engine.load(smollm2_artifact, threads=2)
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits[0, -1].numpy()
    ours = engine.prefill(ids.numpy(), np.ones_like(ids.numpy()))[0]
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_chat_answer_is_coherent(smollm2_artifact):
    from twophase.runtime.engine import Engine

    engine = Engine.load(smollm2_artifact, threads=2)
    text = engine.generate("What is the capital of France?", chat=True, max_new_tokens=24, stream=False)
    assert "Paris" in text
    assert engine.stats.generated_tokens > 0 and engine.stats.decode_tok_s > 0


def test_cli_run_streams_a_chat_answer(smollm2_artifact):
    proc = subprocess.run(
        [sys.executable, "-m", "twophase.cli", "run", str(smollm2_artifact), "--chat",
         "--prompt", "Name a primary color.", "--max-new-tokens", "16", "--stats", "--threads", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) >= 2
    assert "decode" in proc.stderr and "tok/s" in proc.stderr


def test_cli_inspect(smollm2_artifact):
    proc = subprocess.run(
        [sys.executable, "-m", "twophase.cli", "inspect", str(smollm2_artifact)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "30 layers" in proc.stdout and "[prefill]" in proc.stdout and "[decode]" in proc.stdout
