"""Per-phase schemes through the whole compiler on a tiny model: passes, manifest, weights, numerics."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from twophase.compiler.driver import compile_model
from twophase.compiler.graph_diff import op_histogram
from twophase.compiler.options import ActivationMode, CompileOptions, PhaseOptions, QuantScheme, WeightAlgorithm
from twophase.runtime.engine import Engine

FP32 = PhaseOptions(QuantScheme.FP32)
PROMPT = [1, 5, 9, 33, 12, 40, 41, 42, 7, 19]


def compiled(tmp_path, tiny_hf_dir, name: str, options: CompileOptions):
    hf, _ = tiny_hf_dir("gqa")
    return compile_model(str(hf), tmp_path / name, options)


def ops(art, phase):
    return op_histogram(onnx.load(str(art / f"{phase}.onnx"), load_external_data=False))


def logits(art, ids=PROMPT):
    engine = Engine.load(art)
    x = np.asarray([ids], np.int64)
    first = engine.prefill(x, np.ones_like(x))
    second = engine.decode_one_token(np.asarray([ids[-1]]))
    return first[0], second[0]


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def fp32_art(tmp_path_factory, tiny_hf_dir):
    hf, _ = tiny_hf_dir("gqa")
    return compile_model(str(hf), tmp_path_factory.mktemp("fp32") / "art", CompileOptions())


@pytest.mark.parametrize(
    "decode, fused_op, max_err",
    [
        (PhaseOptions(QuantScheme.W8A16), "com.microsoft::MatMulNBits", 0.05),
        (PhaseOptions(QuantScheme.W4A16), "com.microsoft::MatMulNBits", 0.3),
        (PhaseOptions(QuantScheme.W4A16, symmetric=False, block_size=16), "com.microsoft::MatMulNBits", 0.3),
        (PhaseOptions(QuantScheme.W4A16, algorithm=WeightAlgorithm.GPTQ), "com.microsoft::MatMulNBits", 0.3),
    ],
    ids=["w8a16", "w4a16", "w4a16-asym-b16", "w4a16-gptq"],
)
def test_weight_only_decode(tmp_path, tiny_hf_dir, fp32_art, decode, fused_op, max_err):
    art = compiled(tmp_path, tiny_hf_dir, "q", CompileOptions(prefill=FP32, decode=decode))
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["phases"]["decode"]["scheme"] == decode.scheme.value
    assert manifest["compile_options"]["decode"]["algorithm"] == decode.algorithm.value
    decode_ops, prefill_ops = ops(art, "decode"), ops(art, "prefill")
    assert decode_ops[fused_op] == 2 * 4 + 1  # every projection (q/k/v and gate/up packed) and the lm_head
    assert decode_ops["MatMul"] == 0
    assert prefill_ops[fused_op] == 0 and prefill_ops["MatMul"] >= 2 * 4 + 1  # prefill stays fp32 (packed)
    _, ref_decode = logits(fp32_art)
    prefill_logits, decode_logits = logits(art)
    assert relative_error(prefill_logits, logits(fp32_art)[0]) < 1e-5
    assert relative_error(decode_logits, ref_decode) < max_err
    assert list(Engine.load(art).generate_ids(PROMPT, max_new_tokens=8))  # runs end to end


@pytest.mark.parametrize(
    "prefill",
    [
        PhaseOptions(QuantScheme.W8A8),
        PhaseOptions(QuantScheme.W8A8, smoothquant_alpha=0.5),
        PhaseOptions(QuantScheme.W8A8, activations=ActivationMode.STATIC, smoothquant_alpha=0.5),
    ],
    ids=["dynamic", "dynamic-sq", "static-sq"],
)
def test_w8a8_prefill_with_w4a16_decode(tmp_path, tiny_hf_dir, fp32_art, prefill):
    options = CompileOptions(prefill=prefill, decode=PhaseOptions(QuantScheme.W4A16), calibration_windows=2)
    art = compiled(tmp_path, tiny_hf_dir, "q", options)
    prefill_ops = ops(art, "prefill")
    assert prefill_ops["com.microsoft::MatMulIntegerToFloat"] == 2 * 7
    # the lm_head (one position in prefill) takes decode's weight-only format ...
    assert prefill_ops["com.microsoft::MatMulNBits"] == 1
    assert prefill_ops["MatMul"] == 0
    report = json.loads((art / "report.json").read_text())
    names = [r["name"] for r in report["passes"] if r["phase"] == "prefill"]
    assert names[:4] == ["SplitPhasesPass", "CleanupPass", "QuantizeActivationsPass", "FuseInt8MatMulPass"]
    # ... so both phases read the lm_head and the embedding from the same bytes of weights.bin
    assert report["weights"]["tensors_shared"] >= 2
    ref_prefill, _ = logits(fp32_art)
    assert relative_error(logits(art)[0], ref_prefill) < 0.3


def test_calibrated_schemes_need_a_tokenizer(tmp_path, canonical_onnx):
    import onnx_ir as ir

    from twophase.compiler.errors import UnsupportedModelError
    from twophase.compiler.manifest import ModelFacts
    from twophase.models.sources import CanonicalModel

    model = ir.load(canonical_onnx("gqa"))
    canonical = CanonicalModel(model, ModelFacts.from_metadata(model.metadata_props), {"kind": "onnx", "name": "x"})
    options = CompileOptions(prefill=PhaseOptions(QuantScheme.W8A8, activations=ActivationMode.STATIC))
    with pytest.raises(UnsupportedModelError, match="tokenizer"):
        compile_model(canonical, tmp_path / "art", options)
    assert not (tmp_path / "art").exists()


def test_fp32_prefill_stays_fp32_when_decode_is_quantized(tmp_path, tiny_hf_dir):
    art = compiled(tmp_path, tiny_hf_dir, "q", CompileOptions(prefill=FP32, decode=PhaseOptions(QuantScheme.W4A16)))
    proto = onnx.load(str(art / "prefill.onnx"), load_external_data=False)
    assert {init.data_type for init in proto.graph.initializer if len(init.dims) == 2} == {onnx.TensorProto.FLOAT}
