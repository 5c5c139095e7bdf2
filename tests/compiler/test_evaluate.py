"""evaluate_artifact on a compiled tiny Llama: perplexity equals PyTorch's on the same windows, both
phases agree for an fp32 artifact, agreement / dPPL / KL against itself, the full-logits variant of
the prefill graph, and the argument checks. A slow test pins SmolLM2's figure from DESIGN.md."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from twophase.compiler import corpus
from twophase.compiler.errors import ArtifactError, ContextLengthError, TwophaseError
from twophase.compiler.evaluate import evaluate_artifact, full_logits_model, model_session

KW = {"windows": 4, "length": 64, "decode_windows": 2, "decode_length": 32, "threads": 1}


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact("gqa")


@pytest.fixture(scope="module")
def report(artifact):
    return evaluate_artifact(artifact, artifact, **KW)


def torch_nll(model, windows: np.ndarray) -> np.ndarray:
    """NLL (float64 [W, L-1]) of each window's next tokens under the PyTorch model."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(windows)).logits.double()  # (W, L, V)
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -lp.gather(-1, torch.from_numpy(windows[:, 1:, None])).squeeze(-1).numpy()


def test_ppl_equals_torch(artifact, report, tiny_hf_dir):
    pytest.importorskip("torch")
    _, model = tiny_hf_dir("gqa")
    wins = corpus.eval_windows(corpus.corpus_ids(artifact / "tokenizer.json"), 4, 64)
    nll = torch_nll(model, wins)
    assert report.prefill.predicted_tokens == 4 * 63
    assert report.prefill.ppl == pytest.approx(np.exp(nll.mean()), rel=1e-3)
    # decode windows: linspace(0, 3, 2) -> windows 0 and 3, their first 32 tokens
    dec = torch_nll(model, wins[[0, 3], :32])
    assert report.decode.windows == 2 and report.decode.length == 32 and report.decode.predicted_tokens == 2 * 31
    assert report.decode.ppl == pytest.approx(np.exp(dec.mean()), rel=1e-3)


def test_decode_scheme_equals_prefill_scheme_for_fp32(report):
    assert report.decode.ppl == pytest.approx(report.decode.prefill_scheme_ppl, rel=1e-4)


def test_against_itself(report):
    for phase in (report.prefill, report.decode):
        assert phase.agreement == 1.0
        assert phase.dppl_pct == pytest.approx(0.0, abs=1e-3)
        assert phase.mean_kl == pytest.approx(0.0, abs=1e-6)
        assert phase.reference_ppl == pytest.approx(phase.ppl, rel=1e-4)
        assert phase.scheme == "fp32"


def test_report_serializes_and_formats(report, artifact):
    d = json.loads(json.dumps(report.to_dict()))
    assert d["corpus"]["name"] == corpus.CORPUS_NAME and d["corpus"]["sha256"] == corpus.corpus_sha256()
    assert d["prefill"]["windows"] == 4 and d["decode"]["length"] == 32
    text = report.format()
    assert "prefill" in text and "decode" in text and f"{report.prefill.ppl:.4f}" in text and "100.00%" in text


def test_without_reference_and_custom_ids(artifact):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 97, size=500)
    rep = evaluate_artifact(artifact, ids=ids, windows=3, length=40, decode_windows=0, threads=1)
    assert rep.reference is None and rep.decode is None
    assert rep.prefill.agreement is None and rep.prefill.dppl_pct is None and rep.prefill.ppl > 1
    assert rep.corpus["name"] == "custom" and rep.corpus["tokens"] == 500
    assert "-" in rep.format()


def test_argument_checks(artifact):
    with pytest.raises(ContextLengthError, match="maximum context"):
        evaluate_artifact(artifact, windows=2, length=4096)
    with pytest.raises(TwophaseError, match="subset"):
        evaluate_artifact(artifact, windows=2, length=32, decode_windows=3, decode_length=16)
    with pytest.raises(TwophaseError, match="vocabulary"):
        evaluate_artifact(artifact, ids=np.arange(200) + 50, windows=2, length=32, decode_windows=0)


def test_bound_artifact_against_its_grow_twin(tmp_path, tiny_hf_dir):
    """The bound-KV graphs (GroupQueryAttention, full-logits via the GatherND bypass, the runtime's bound
    decode step) score the same tokens as the grow graphs of the same model."""
    from twophase.compiler.driver import compile_model
    from twophase.compiler.options import CompileOptions, KVBinding

    hf, model = tiny_hf_dir("gqa16")
    bound = compile_model(str(hf), tmp_path / "bound", CompileOptions())
    grow = compile_model(str(hf), tmp_path / "grow", CompileOptions(kv_binding=KVBinding.GROW))
    rep = evaluate_artifact(bound, grow, **KW)
    assert rep.kv_cache == {"binding": "bound", "dtype": "float32"} and "bound binding" in rep.format()
    for phase in (rep.prefill, rep.decode):
        assert phase.agreement == 1.0 and phase.dppl_pct == pytest.approx(0.0, abs=1e-3)
    wins = corpus.eval_windows(corpus.corpus_ids(bound / "tokenizer.json"), 4, 64)
    assert rep.prefill.ppl == pytest.approx(np.exp(torch_nll(model, wins).mean()), rel=1e-3)


# -- the full-logits prefill variant --------------------------------------------------------------


def test_full_logits_variant_of_the_artifact(artifact):
    """One Slice fewer, logits [B, S, V]; its last position equals the artifact's own prefill output."""
    path = artifact / "prefill.onnx"
    orig = ir.load(str(path))
    full = full_logits_model(path)
    slices = [sum(n.op_type == "Slice" for n in m.graph) for m in (orig, full)]
    assert slices[0] - slices[1] == 1
    assert len(orig.graph) - len(full.graph) == 1
    assert [v.name for v in full.graph.outputs] == [v.name for v in orig.graph.outputs]
    logits = next(v for v in full.graph.outputs if v.name == "logits")
    assert logits.shape[1] != 1

    x = np.array([[5, 9, 17, 33, 2, 40, 41]], dtype=np.int64)
    feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(7)[None]}
    (all_pos,) = model_session(full, artifact, threads=1).run(["logits"], feeds)
    (last,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)
    assert all_pos.shape == (1, 7, 97) and last.shape == (1, 1, 97)
    np.testing.assert_allclose(all_pos[:, -1:], last, rtol=1e-5, atol=1e-5)


def _sliced_logits_model(tmp_path, slice_on_output: bool):
    """input_ids -> Gather(E) -> MatMul(W) -> logits, with the last-position Slice before the MatMul
    (SplitPhasesPass's usual place) or on the logits output itself (its fallback)."""
    rng = np.random.default_rng(1)
    E = ir.Value(name="E", const_value=ir.tensor(rng.normal(size=(11, 4)).astype(np.float32)))
    W = ir.Value(name="W", const_value=ir.tensor(rng.normal(size=(4, 11)).astype(np.float32)))
    consts = {
        k: ir.Value(name=k, const_value=ir.tensor(np.array([v], dtype=np.int64)))
        for k, v in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", -2))
    }
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    gather = ir.node("Gather", [E, ids])
    nodes = [gather]
    if slice_on_output:
        mm = ir.node("MatMul", [gather.outputs[0], W])
        sl = ir.node("Slice", [mm.outputs[0], *consts.values()])
        nodes += [mm, sl]
        out = sl.outputs[0]
    else:
        sl = ir.node("Slice", [gather.outputs[0], *consts.values()])
        mm = ir.node("MatMul", [sl.outputs[0], W])
        nodes += [sl, mm]
        out = mm.outputs[0]
    out.name, out.dtype, out.shape = "logits", ir.DataType.FLOAT, ir.Shape(["batch", 1, 11])
    graph = ir.Graph([ids], [out], nodes=nodes, initializers=[E, W, *consts.values()], opset_imports={"": 23})
    path = tmp_path / f"m{int(slice_on_output)}.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    return path, E.const_value.numpy() @ W.const_value.numpy()


@pytest.mark.parametrize("slice_on_output", [False, True])
def test_full_logits_variant_either_slice_place(tmp_path, slice_on_output):
    path, table = _sliced_logits_model(tmp_path, slice_on_output)
    full = full_logits_model(path)
    assert [n.op_type for n in full.graph] == ["Gather", "MatMul"]
    x = np.array([[1, 4, 7]], dtype=np.int64)
    (out,) = model_session(full, tmp_path, threads=1).run(["logits"], {"input_ids": x})
    np.testing.assert_allclose(out[0], table[x[0]], rtol=1e-5)


def test_graph_without_the_slice_is_refused(tmp_path):
    path, _ = _sliced_logits_model(tmp_path, False)
    full = full_logits_model(path)
    ir.save(full, tmp_path / "full.onnx")
    with pytest.raises(ArtifactError, match="no last-position Slice"):
        full_logits_model(tmp_path / "full.onnx")


# -- SmolLM2 (slow) --------------------------------------------------------------------------------

SMOLLM2_CORPUS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"  # CPython 3.11.7


@pytest.mark.slow
def test_smollm2_fp32_ppl_matches_design(tmp_path_factory):
    """DESIGN.md: SmolLM2-135M fp32, 20 x 512 windows of pydoc_data.topics -> PPL 13.8641."""
    from twophase.compiler.driver import compile_model
    from twophase.compiler.options import CompileOptions

    if corpus.corpus_sha256() != SMOLLM2_CORPUS_SHA256:
        pytest.skip("this CPython's pydoc_data.topics differs from the one the figure was measured on")
    out = compile_model("smollm2-135m-instruct", tmp_path_factory.mktemp("smollm2-eval") / "a", CompileOptions())
    rep = evaluate_artifact(out, decode_windows=4, decode_length=64, threads=2)
    assert rep.corpus["tokens"] == 113_108
    assert rep.prefill.ppl == pytest.approx(13.8641, abs=1e-3)
    assert rep.decode.ppl == pytest.approx(rep.decode.prefill_scheme_ppl, rel=1e-4)
