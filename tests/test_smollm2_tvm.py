"""SmolLM2-135M-Instruct through the TVM backend (slow): `compile --backend tvm` (w4a16 on the GGUF grid in
both phases, one weight copy) gives the ORT backend's greedy tokens for the same scheme. Both at accuracy
level 1 (float activations), where the two backends compute the same arithmetic; at the default level 4 each
quantizes activations its own way (ORT in every MatMulNBits, TVM in the decode GEMV only), so their tokens
may part after a few dozen steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("tvm")

MODEL = "smollm2-135m-instruct"
PROMPTS = ["Write a haiku about the sea.", "Explain what a compiler does in two sentences."]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from twophase.compiler.defaults import phase_defaults
    from twophase.compiler.driver import compile_model
    from twophase.compiler.options import Backend, CompileOptions
    from twophase.runtime.engine import Engine

    root = tmp_path_factory.mktemp("smollm2-tvm")
    _, decode = phase_defaults(MODEL)  # w4a16, GGUF grid
    po = dataclasses.replace(decode, accuracy_level=1)
    tvm_dir = compile_model(MODEL, root / "tvm", CompileOptions(backend=Backend.TVM, prefill=po, decode=po))
    ort_dir = compile_model(MODEL, root / "ort", CompileOptions(prefill=po, decode=po))
    return Engine.load(tvm_dir, threads=2), Engine.load(ort_dir, threads=2)


def test_greedy_tokens_equal_ort(engines):
    tvm_engine, ort_engine = engines
    for prompt in PROMPTS:
        ids = tvm_engine._prompt_ids(prompt, chat=True)
        a = list(tvm_engine.generate_ids(ids, max_new_tokens=40))
        b = list(ort_engine.generate_ids(ids, max_new_tokens=40))
        assert a == b, prompt
    text = tvm_engine.generate("What are the three primary colors?", chat=True, max_new_tokens=24, stream=False)
    assert "red" in text.lower() and "blue" in text.lower()


def test_prefill_logits_close_to_ort(engines):
    tvm_engine, ort_engine = engines
    ids = np.array([tvm_engine._prompt_ids(PROMPTS[0], chat=True)])
    a, b = tvm_engine.prefill(ids), ort_engine.prefill(ids)
    assert np.abs(a - b).max() < 1e-3 * np.abs(b).max()
