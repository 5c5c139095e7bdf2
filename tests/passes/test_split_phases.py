"""Graph-diff tests of SplitPhasesPass on the tiny canonical decoders: signature and op changes,
ONNX checker, numerics vs the canonical graph (ORT) and parity with PyTorch, left-padded batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import ALL_TINY
from onnx import TensorProto, helper, numpy_helper

from passes.ort_helpers import checked_session
from twophase.compiler.errors import PassError
from twophase.compiler.graph_diff import diff_models, op_histogram
from twophase.compiler.manifest import FACTS_METADATA_KEY, ModelFacts
from twophase.compiler.options import Phase
from twophase.passes.split_phases import PHASE_METADATA_KEY, SplitPhasesPass, find_lm_head

BATCH, PROMPT = 2, 6


# -- helpers ----------------------------------------------------------------------------------


def _past_names(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.inputs if v.name.startswith("past_key_values.")]


def _prompt(vocab: int) -> dict[str, np.ndarray]:
    """Batch of 2, row 1 left-padded by 2 tokens."""
    rng = np.random.default_rng(0)
    mask = np.ones((BATCH, PROMPT), np.int64)
    mask[1, :2] = 0
    return {
        "input_ids": rng.integers(3, vocab, (BATCH, PROMPT)).astype(np.int64),
        "attention_mask": mask,
        "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64),
    }


def _next_token(prompt: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.array([[5], [7]], np.int64),
        "attention_mask": np.concatenate([prompt["attention_mask"], np.ones((BATCH, 1), np.int64)], axis=1),
        "position_ids": prompt["position_ids"][:, -1:] + 1,
    }


def _facts(model: ir.Model) -> ModelFacts:
    return ModelFacts.from_metadata(dict(model.metadata_props))


def _empty_past(model: ir.Model) -> dict[str, np.ndarray]:
    facts = _facts(model)
    return {n: np.zeros((BATCH, facts.num_kv_heads, 0, facts.head_dim), np.float32) for n in _past_names(model)}


@pytest.fixture(scope="module")
def phases(canonical_onnx, tmp_path_factory):
    """name -> (canonical model, prefill model, decode model, their ORT sessions)."""
    cache: dict[str, tuple] = {}

    def make(name: str):
        if name not in cache:
            canonical = ir.load(canonical_onnx(name))
            prefill = SplitPhasesPass(Phase.PREFILL)(canonical).model
            decode = SplitPhasesPass(Phase.DECODE)(canonical).model
            d = tmp_path_factory.mktemp(f"phases-{name}")
            sessions = tuple(
                checked_session(m, d / f"{tag}.onnx")
                for m, tag in ((canonical, "canonical"), (prefill, "prefill"), (decode, "decode"))
            )
            cache[name] = (canonical, prefill, decode, *sessions)
        return cache[name]

    return make


# -- graph diff -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TINY)
def test_prefill_graph_diff(phases, name: str):
    canonical, prefill, *_ = phases(name)
    facts = _facts(canonical)
    d = diff_models(canonical, prefill)

    assert {t.name for t in d.inputs_removed} == set(facts.kv_names("past_key_values"))
    assert not d.inputs_added
    assert [(c.name, c.after.shape) for c in d.inputs_changed] == [("attention_mask", ("batch", "seq"))]
    outputs = {c.name: c.after for c in d.outputs_changed}
    assert outputs["logits"].shape == ("batch", 1, facts.vocab_size)
    for n in facts.kv_names("present"):
        assert outputs[n].shape == ("batch", facts.num_kv_heads, "seq", facts.head_dim)
    assert not d.outputs_added and not d.outputs_removed

    # One Slice added; the 2L past/new Concats are gone; the model's compute ops are untouched.
    assert d.op_delta["Slice"] == 1
    assert d.op_delta["Concat"] <= -2 * facts.num_layers
    for op in ("MatMul", "Attention", "RotaryEmbedding", "RMSNormalization", "Gather"):
        assert op not in d.op_delta
    assert all(delta < 0 for op, delta in d.op_delta.items() if op != "Slice")
    assert not d.initializers_removed and not d.initializers_changed

    # The Slice sits on the hidden states feeding the lm_head MatMul.
    lm_head = find_lm_head(prefill.graph)
    assert lm_head is not None and lm_head.outputs[0].name == "logits"
    assert lm_head.inputs[0].producer().op_type == "Slice"


@pytest.mark.parametrize("name", ALL_TINY)
def test_decode_graph_diff(phases, name: str):
    canonical, _, decode, *_ = phases(name)
    facts = _facts(canonical)
    d = diff_models(canonical, decode)

    assert not d.inputs_added and not d.inputs_removed
    assert {c.name: c.after.shape for c in d.inputs_changed} == {
        "input_ids": ("batch", 1),
        "position_ids": ("batch", 1),
    }
    outputs = {c.name: c.after.shape for c in d.outputs_changed}
    assert outputs["logits"] == ("batch", 1, facts.vocab_size)
    for n in facts.kv_names("present"):
        assert outputs[n] == ("batch", facts.num_kv_heads, "past + 1", facts.head_dim)
    # Only folding: seq = 1 turns Shape(input_ids)[1] -> Squeeze -> Range(0, seq) into a constant,
    # and CSE keeps one Cos/Sin of the positions; the compute ops and the K/V Concats stay.
    hist = op_histogram(canonical)
    assert d.op_delta == {
        "Cos": 1 - hist["Cos"],
        "Sin": 1 - hist["Sin"],
        "Range": -1,
        "Shape": -1,
        "Squeeze": -1,
    }


@pytest.mark.parametrize("phase", list(Phase))
def test_metadata_and_input_untouched(canonical_onnx, phase: Phase):
    canonical = ir.load(canonical_onnx("gqa"))
    before = ir.to_proto(canonical).SerializeToString(deterministic=True)
    result = SplitPhasesPass(phase)(canonical)
    assert result.modified and result.model is not canonical
    assert ir.to_proto(canonical).SerializeToString(deterministic=True) == before

    meta = result.model.metadata_props
    assert meta[PHASE_METADATA_KEY] == phase.value
    assert json.loads(meta[FACTS_METADATA_KEY]) == json.loads(canonical.metadata_props[FACTS_METADATA_KEY])
    # Weights are shared with the input model, not copied (external data stays unloaded).
    for name, value in result.model.graph.initializers.items():
        if name in canonical.graph.initializers:
            assert value.const_value is canonical.graph.initializers[name].const_value


# -- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TINY)
def test_prefill_matches_canonical_last_position(phases, name: str):
    canonical, _, _, s_can, s_pre, _ = phases(name)
    prompt = _prompt(_facts(canonical).vocab_size)
    ref = s_can.run(None, {**prompt, **_empty_past(canonical)})
    out = s_pre.run(None, prompt)
    assert out[0].shape == (BATCH, 1, _facts(canonical).vocab_size)
    np.testing.assert_allclose(out[0], ref[0][:, -1:], rtol=0, atol=1e-4)
    for a, b in zip(out[1:], ref[1:]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ALL_TINY)
def test_decode_matches_canonical_one_token(phases, name: str):
    canonical, _, _, s_can, s_pre, s_dec = phases(name)
    prompt = _prompt(_facts(canonical).vocab_size)
    present = s_pre.run(None, prompt)[1:]
    past = dict(zip(_past_names(canonical), present))
    step = _next_token(prompt)
    ref = s_can.run(None, {**step, **past})
    out = s_dec.run(None, {**step, **past})
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    assert out[1].shape[2] == PROMPT + 1


@pytest.mark.parametrize("name", ALL_TINY)
def test_prefill_decode_parity_with_torch(phases, tiny_hf_dir, name: str):
    canonical, _, _, _, s_pre, s_dec = phases(name)
    _, torch_model = tiny_hf_dir(name)
    prompt = _prompt(_facts(canonical).vocab_size)
    step = _next_token(prompt)

    pre = s_pre.run(None, prompt)
    dec = s_dec.run(None, {**step, **dict(zip(_past_names(canonical), pre[1:]))})

    with torch.no_grad():
        full = torch_model(
            input_ids=torch.from_numpy(np.concatenate([prompt["input_ids"], step["input_ids"]], axis=1)),
            attention_mask=torch.from_numpy(step["attention_mask"]),
            position_ids=torch.from_numpy(np.concatenate([prompt["position_ids"], step["position_ids"]], axis=1)),
            use_cache=False,
        ).logits.numpy()
    np.testing.assert_allclose(pre[0], full[:, PROMPT - 1 : PROMPT], rtol=0, atol=1e-3)
    np.testing.assert_allclose(dec[0], full[:, PROMPT:], rtol=0, atol=1e-3)
    assert (pre[0].argmax(-1) == full[:, PROMPT - 1 : PROMPT].argmax(-1)).all()


# -- the last-position slice when no lm_head MatMul is found ----------------------------------


def test_prefill_slices_logits_when_lm_head_is_hidden(canonical_onnx, tmp_path: Path, caplog):
    """logits = Reshape(MatMul(h, W), Shape(...)): not per-position-transparent, so the Slice goes
    on the logits output and a warning is logged; the numbers are the same."""
    canonical = ir.load(canonical_onnx("gqa"))
    graph = canonical.graph
    logits = next(v for v in graph.outputs if v.name == "logits")
    matmul = logits.producer()
    logits.name = "logits_raw"
    shape = ir.Node("", "Shape", [logits])
    reshape = ir.Node("", "Reshape", [logits, shape.outputs[0]])
    graph.insert_after(matmul, [shape, reshape])
    new_logits = reshape.outputs[0]
    new_logits.name, new_logits.dtype, new_logits.shape = "logits", logits.dtype, logits.shape
    graph.outputs[graph.outputs.index(logits)] = new_logits
    assert find_lm_head(graph) is None

    with caplog.at_level(logging.WARNING, logger="twophase.passes.split_phases"):
        prefill = SplitPhasesPass(Phase.PREFILL)(canonical).model
    assert "slicing the logits instead" in caplog.text
    assert diff_models(canonical, prefill).op_delta["Slice"] == 1

    prompt = _prompt(97)
    ref = checked_session(canonical, tmp_path / "c.onnx").run(["logits"], {**prompt, **_empty_past(canonical)})[0]
    out = checked_session(prefill, tmp_path / "p.onnx").run(["logits"], prompt)[0]
    np.testing.assert_allclose(out, ref[:, -1:], rtol=0, atol=1e-4)


def test_prefill_slice_goes_below_a_logit_softcap(canonical_onnx):
    """logits = Mul(Tanh(Div(MatMul(h, W), c)), c): the Slice still lands before the MatMul."""
    canonical = ir.load(canonical_onnx("gqa"))
    graph = canonical.graph
    logits = next(v for v in graph.outputs if v.name == "logits")
    matmul = logits.producer()
    logits.name = "logits_raw"
    cap = ir.Value(name="cap", const_value=ir.tensor(np.array(30.0, np.float32), name="cap"))
    graph.register_initializer(cap)
    div = ir.Node("", "Div", [logits, cap])
    tanh = ir.Node("", "Tanh", [div.outputs[0]])
    mul = ir.Node("", "Mul", [tanh.outputs[0], cap])
    graph.insert_after(matmul, [div, tanh, mul])
    out = mul.outputs[0]
    out.name, out.dtype, out.shape = "logits", logits.dtype, logits.shape
    graph.outputs[graph.outputs.index(logits)] = out

    prefill = SplitPhasesPass(Phase.PREFILL)(canonical).model
    head = find_lm_head(prefill.graph)
    assert head is not None and head.inputs[0].producer().op_type == "Slice"


# -- preconditions ----------------------------------------------------------------------------


def _no_past_model() -> ir.Model:
    emb = numpy_helper.from_array(np.ones((11, 4), np.float32), "emb")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["logits"])],
        "no_past",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 4])],
        initializer=[emb],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.mark.parametrize("phase", list(Phase))
def test_graph_without_past_inputs_raises(phase: Phase):
    with pytest.raises(PassError, match="past_key_values"):
        SplitPhasesPass(phase)(_no_past_model())


def test_graph_without_logits_raises(canonical_onnx):
    canonical = ir.load(canonical_onnx("gqa"))
    next(v for v in canonical.graph.outputs if v.name == "logits").name = "scores"
    with pytest.raises(PassError, match="no graph output 'logits'"):
        SplitPhasesPass(Phase.DECODE)(canonical)


def test_prefill_materializes_an_empty_past_for_other_consumers(canonical_onnx, tmp_path: Path):
    """past -> Identity -> Concat: the past is replaced by ConstantOfShape([B, H, 0, D]), which the
    cleanup then folds out of the Concat like a direct operand."""
    canonical = ir.load(canonical_onnx("gqa"))
    graph = canonical.graph
    past = next(v for v in graph.inputs if v.name == "past_key_values.0.key")
    concat = next(n for n, _ in past.uses() if n.op_type == "Concat")
    ident = ir.Node("", "Identity", [past])
    ident.outputs[0].dtype, ident.outputs[0].shape = past.dtype, past.shape
    graph.insert_before(concat, ident)
    concat.replace_input_with(0, ident.outputs[0])

    raw = SplitPhasesPass(Phase.PREFILL, cleanup=False)(canonical).model
    assert op_histogram(raw)["ConstantOfShape"] == 1
    prefill = SplitPhasesPass(Phase.PREFILL)(canonical).model
    hist = op_histogram(prefill)
    assert hist["ConstantOfShape"] == 0 and hist["Identity"] == 0

    prompt = _prompt(97)
    ref = checked_session(canonical, tmp_path / "c.onnx").run(None, {**prompt, **_empty_past(canonical)})
    out = checked_session(prefill, tmp_path / "p.onnx").run(None, prompt)
    np.testing.assert_allclose(out[0], ref[0][:, -1:], rtol=0, atol=1e-4)
    for a, b in zip(out[1:], ref[1:]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
