"""Engine on a compiled tiny Llama (GQA): greedy parity with PyTorch and with a cache-free ORT loop,
left-padded batches, streaming, stops, context checks, stats, and the runtime's import hygiene."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from twophase.compiler.errors import ArtifactError, ContextLengthError, TwophaseError
from twophase.runtime.engine import Engine
from twophase.runtime.sampler import SamplingParamsError

PROMPTS = [[1, 30, 31, 32], [1, 8, 15, 12, 12, 15, 3, 23, 15, 18, 12, 4], [5]]


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("gqa")


@pytest.fixture(scope="module")
def engine(artifact):
    return Engine.load(artifact, threads=1)


def reference_greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    """Greedy tokens with no KV cache: the whole sequence through prefill for every token."""
    seq = list(ids)
    for _ in range(n):
        x = np.asarray([seq], dtype=np.int64)
        out = engine.prefill_phase.run(
            {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(len(seq))[None]}
        )
        seq.append(int(out["logits"][0, -1].argmax()))
    return seq[len(ids) :]


def test_load_exposes_manifest(engine):
    assert engine.facts.num_layers == 2 and engine.facts.num_kv_heads == 2
    assert engine.tokenizer is not None and engine.max_len == engine.manifest.kv_cache["max_len"]
    assert engine.eos_token_ids == (2,)


@pytest.mark.parametrize("penalty", [1.0, 5.0])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_torch(engine, tiny_hf_dir, prompt, penalty):
    """The random tiny model mostly repeats its last token under plain greedy; the repetition penalty
    makes every step depend on the whole logits ranking, so both are compared."""
    torch = pytest.importorskip("torch")
    _, model = tiny_hf_dir("gqa")
    x = torch.tensor([prompt])
    with torch.no_grad():
        ref = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False, repetition_penalty=penalty
        )
    expected = ref[0, len(prompt) :].tolist()
    assert list(engine.generate_ids(prompt, max_new_tokens=16, repetition_penalty=penalty)) == expected
    if penalty > 1:
        assert len(set(expected)) > 8  # the comparison is not a run of one repeated token


def test_logits_match_torch_every_step(engine, tiny_hf_dir):
    """Teacher-forced: prefill + decode_one_token logits equal PyTorch's logits of the full sequence."""
    torch = pytest.importorskip("torch")
    _, model = tiny_hf_dir("gqa")
    seq = PROMPTS[1] + [40, 3, 77, 12, 9, 60]
    n = len(PROMPTS[1])
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0].numpy()  # (S, V)
    ours = [engine.prefill(np.asarray([seq[:n]]))[0]]
    for t in seq[n:-1]:
        ours.append(engine.decode_one_token(np.array([t]))[0])
    np.testing.assert_allclose(np.stack(ours), ref[n - 1 : -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_cache_free_loop(engine, prompt):
    ours = list(engine.generate_ids(prompt, max_new_tokens=16))
    ref = reference_greedy(engine, prompt, 16)
    if engine.eos_token_ids[0] in ref:  # the engine stops after eos
        ref = ref[: ref.index(engine.eos_token_ids[0]) + 1]
    assert ours == ref


def test_left_padded_batch_matches_single_rows(engine):
    a, b = PROMPTS[0], PROMPTS[1]
    s = max(len(a), len(b))
    ids = np.zeros((2, s), dtype=np.int64)
    mask = np.zeros((2, s), dtype=np.int64)
    for row, p in enumerate((a, b)):
        ids[row, s - len(p) :] = p
        mask[row, s - len(p) :] = 1
    logits = engine.prefill(ids, mask)
    batch_logits = [logits]
    tokens = logits.argmax(-1)
    for _ in range(5):
        logits = engine.decode_one_token(tokens)
        batch_logits.append(logits)
        tokens = logits.argmax(-1)
    assert engine.cache.length == s + 5
    for row, p in enumerate((a, b)):
        logits = engine.prefill(np.asarray([p]))
        single = [logits]
        for _ in range(5):
            logits = engine.decode_one_token(logits.argmax(-1))
            single.append(logits)
        for step, (bl, sl) in enumerate(zip(batch_logits, single)):
            np.testing.assert_allclose(bl[row], sl[0], atol=1e-4, rtol=1e-4, err_msg=f"row {row} step {step}")


def test_stream_pieces_concatenate_to_text(engine):
    for kwargs in (dict(), dict(temperature=0.9, top_k=20, top_p=0.9, seed=3), dict(repetition_penalty=1.5)):
        pieces = list(engine.generate("hello world", max_new_tokens=20, **kwargs))
        text = engine.generate("hello world", max_new_tokens=20, stream=False, **kwargs)
        assert isinstance(text, str) and "".join(pieces) == text
        ids = list(engine.generate_ids(engine.tokenizer.encode("hello world"), max_new_tokens=20, **kwargs))
        eos = [i for i in ids if i in engine.eos_token_ids]
        assert text == engine.tokenizer.decode(ids[: len(ids) - len(eos)])


def test_seeded_sampling_reproducible(engine):
    runs = [engine.generate("abc", max_new_tokens=24, temperature=1.5, seed=11, stream=False) for _ in range(2)]
    assert runs[0] == runs[1]
    other = [engine.generate("abc", max_new_tokens=24, temperature=1.5, seed=s, stream=False) for s in range(12, 16)]
    assert any(o != runs[0] for o in other)


def test_stop_string_truncates(engine):
    kwargs = dict(max_new_tokens=24, repetition_penalty=5.0)
    full = engine.generate("Hi, Bob", stream=False, **kwargs)
    k = next(k for k in range(3, len(full) - 2) if full.index(full[k : k + 2]) == k)
    stop = full[k : k + 2]
    cut = full[:k]
    kwargs["stop"] = ["zzzzzz-never", stop]
    assert engine.generate("Hi, Bob", stream=False, **kwargs) == cut
    assert engine.stats.stop_reason == "stop_string"
    assert "".join(engine.generate("Hi, Bob", **kwargs)) == cut


def test_stop_token_ids(engine):
    kwargs = dict(max_new_tokens=16, repetition_penalty=5.0)
    ids = list(engine.generate_ids(PROMPTS[1], **kwargs))
    stop = ids[3]
    got = list(engine.generate_ids(PROMPTS[1], stop_token_ids=[stop], **kwargs))
    assert got == ids[: ids.index(stop) + 1] and len(got) >= 2  # the stop token is the last id
    assert engine.stats.stop_reason == "stop_token"
    text = engine.generate(PROMPTS[1], stop_token_ids=[stop], stream=False, **kwargs)
    assert text == engine.tokenizer.decode(got[:-1])  # ... but not part of the text


def test_eos_from_manifest_stops(engine, monkeypatch):
    kwargs = dict(max_new_tokens=16, repetition_penalty=5.0)
    ids = list(engine.generate_ids(PROMPTS[1], **kwargs))
    monkeypatch.setattr(engine, "eos_token_ids", (ids[4],))
    got = list(engine.generate_ids(PROMPTS[1], **kwargs))
    assert got == ids[: ids.index(ids[4]) + 1] and engine.stats.stop_reason == "eos"


def test_chat_prompt(engine):
    tok = engine.tokenizer
    a = engine.generate("hi there", chat=True, max_new_tokens=8, stream=False)
    b = engine.generate([{"role": "user", "content": "hi there"}], chat=True, max_new_tokens=8, stream=False)
    assert a == b
    expected_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi there"}]), add_special_tokens=False)
    assert engine.stats.prompt_tokens == len(expected_ids)
    assert engine.generate(expected_ids, max_new_tokens=8, stream=False) == a


def test_context_length_checked_before_running(engine):
    calls = (engine.prefill_phase.calls, engine.decode_phase.calls)
    too_long = [5] * (engine.max_len - 3)
    with pytest.raises(ContextLengthError, match=rf"{len(too_long)} tokens.*{engine.max_len}"):
        engine.generate_ids(too_long, max_new_tokens=4)
    with pytest.raises(ContextLengthError, match=str(engine.max_len)):
        engine.generate("a" * (engine.max_len + 10), max_new_tokens=1)
    with pytest.raises(TwophaseError, match="empty prompt"):
        engine.generate("", max_new_tokens=4)
    with pytest.raises(TwophaseError, match="empty prompt"):
        engine.generate_ids([], max_new_tokens=4)
    with pytest.raises(SamplingParamsError, match="top_p"):
        engine.generate("abc", top_p=0.0)
    with pytest.raises(TwophaseError, match="outside the vocabulary"):
        engine.generate_ids([1, 10_000])
    assert (engine.prefill_phase.calls, engine.decode_phase.calls) == calls  # nothing ran
    list(engine.generate_ids([5] * (engine.max_len - 4), max_new_tokens=4))  # exactly fits


def test_stats_populated(engine):
    text = engine.generate("hello", max_new_tokens=10, stream=False)
    s = engine.stats
    assert s.prompt_tokens == len(engine.tokenizer.encode("hello"))
    assert 1 <= s.generated_tokens <= 10 and s.decode_steps == s.generated_tokens - 1
    assert s.ttft_s > 0 and s.prefill_s > 0 and s.ttft_s >= s.prefill_s
    assert s.prefill_tok_s > 0 and (s.decode_s > 0) == (s.decode_steps > 0)
    d = s.to_dict()
    assert {"prompt_tokens", "generated_tokens", "ttft_s", "prefill_s", "decode_s", "prefill_tok_s", "decode_tok_s"} <= set(d)
    assert s.stop_reason in ("max_new_tokens", "eos") and isinstance(text, str)


def test_closing_stream_early(engine):
    gen = engine.generate("hello", max_new_tokens=30)
    next(gen)
    gen.close()
    assert engine.stats.stop_reason == "closed" and engine.stats.generated_tokens < 30


def test_interleaved_generations_refused(engine):
    first = engine.generate_ids(PROMPTS[0], max_new_tokens=8)
    next(first)
    assert len(list(engine.generate_ids(PROMPTS[1], max_new_tokens=4))) >= 1
    with pytest.raises(TwophaseError, match="one KV cache"):
        next(first)


def test_unprepacked_engine_agrees(engine, artifact):
    shared = Engine.load(artifact, verify=False, prepack=False)
    for prompt in PROMPTS:
        assert list(shared.generate_ids(prompt, max_new_tokens=8, repetition_penalty=5.0)) == list(
            engine.generate_ids(prompt, max_new_tokens=8, repetition_penalty=5.0)
        )


def test_decode_before_prefill_and_bad_batches(artifact):
    engine = Engine.load(artifact, verify=False)
    with pytest.raises(TwophaseError, match="batch"):
        engine.decode_one_token(np.array([3]))
    with pytest.raises(TwophaseError, match="left-padded"):
        engine.prefill(np.array([[1, 2, 0]]), np.array([[1, 1, 0]]))


def test_tampered_artifact_refused(artifact, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match=r"weights\.bin.*tampered"):
        Engine.load(copy)


def test_runtime_imports_no_torch_transformers_onnx():
    code = (
        "import sys, twophase.runtime.engine, twophase.runtime;"
        "bad = [m for m in ('torch', 'transformers', 'onnx', 'onnx_ir', 'onnxscript') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
