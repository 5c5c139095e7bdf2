"""import_onnx: third-party decoder exports (legacy TorchScript exporter, HF names) in, canonical graph out.

Parity runs the imported graph in ONNX Runtime against the torch model; the refusals check that one
error names every problem and that nothing is written anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from models.legacy_export import export_legacy, sample_inputs
from twophase.compiler.errors import GraphContractError, UnknownSourceError, UnsupportedModelError
from twophase.compiler.manifest import FACTS_METADATA_KEY, ModelFacts
from twophase.models.hf import facts_from_config
from twophase.models.importer import MIN_OPSET, import_onnx


@pytest.fixture(scope="module")
def legacy_dir(tiny_hf_dir, tmp_path_factory):
    """Factory: opset -> directory with model.onnx (+ model.onnx_data, config.json) of the tiny gqa Llama."""
    cache: dict[tuple, Path] = {}

    def make(opset: int = 17, **kwargs) -> Path:
        key = (opset, *sorted(kwargs.items()))
        if key not in cache:
            _, model = tiny_hf_dir("gqa")
            d = tmp_path_factory.mktemp(f"legacy-{opset}") / "export"
            export_legacy(model, d / "model.onnx", opset=opset, **kwargs)
            cache[key] = d
        return cache[key]

    return make


def _copy(src: Path, dst: Path, names: tuple[str, ...] = ("model.onnx", "model.onnx_data", "config.json")) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def _torch_reference(model, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(model.config.num_hidden_layers):
        cache.update(feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"], i)
    with torch.no_grad():
        out = model(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"],
                    position_ids=feeds["position_ids"], cache=cache, use_cache=True)
    present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
    return [out.logits.numpy(), *(t.numpy() for t in present)]


def _run_ort(model: ir.Model, tmp: Path, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime as ort

    path = tmp / "imported.onnx"
    ir.save(model, path, external_data="imported.onnx.data")
    onnx.checker.check_model(str(path), full_check=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feeds[n].numpy() for n in names})


# --- accepted exports ----------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [14, 17, 18])
def test_legacy_export_imports_and_matches_torch(legacy_dir, tiny_hf_dir, tmp_path, opset):
    _, model = tiny_hf_dir("gqa")
    src = legacy_dir(opset)
    before = _listing(src)
    imported, facts = import_onnx(src / "model.onnx")

    assert facts == facts_from_config(model.config, model.generation_config)
    assert (facts.num_layers, facts.num_kv_heads, facts.head_dim, facts.vocab_size) == (2, 2, 8, 97)
    assert (facts.num_heads, facts.max_position_embeddings, facts.eos_token_ids) == (6, 128, (2,))
    assert ModelFacts.from_metadata(imported.metadata_props) == facts
    assert imported.opset_imports[""] == max(opset, MIN_OPSET) and imported.ir_version >= 10
    # weights stay referenced in the original external data file, not copied into memory
    external = [v.const_value for v in imported.graph.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor)]
    assert external and all(Path(t.path) == src / "model.onnx_data" for t in external)
    assert _listing(src) == before

    feeds = sample_inputs(model, batch=2, past=3, seq=4, seed=1, pad_row=0)
    got = _run_ort(imported, tmp_path, feeds)
    want = _torch_reference(model, feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert got[0].shape == (2, 4, 97) and got[1].shape == (2, 2, 7, 8)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_canonical_export_keeps_its_facts_and_opset(canonical_onnx):
    """Our own dynamo export (opset 23, facts in metadata, no config.json beside it) imports unchanged."""
    path = canonical_onnx("gqa")
    proto = onnx.load(str(path), load_external_data=False)
    declared = ModelFacts.from_metadata({p.key: p.value for p in proto.metadata_props})
    imported, facts = import_onnx(path)
    assert facts == declared
    assert imported.opset_imports[""] == 23
    assert imported.metadata_props[FACTS_METADATA_KEY] == declared.to_metadata()[FACTS_METADATA_KEY]


def test_config_from_config_dir_or_parent_or_keyword(legacy_dir, tmp_path):
    src = legacy_dir(17)
    hub = _copy(src, tmp_path / "repo" / "onnx", names=("model.onnx", "model.onnx_data"))
    shutil.copy(src / "config.json", tmp_path / "repo" / "config.json")  # Hub layout: onnx/ subfolder
    _, facts = import_onnx(hub / "model.onnx")
    assert facts.architecture == "llama" and facts.num_heads == 6

    bare = _copy(src, tmp_path / "bare" / "m", names=("model.onnx", "model.onnx_data"))
    _, facts2 = import_onnx(bare / "model.onnx", config_dir=src)
    assert facts2 == facts
    with pytest.raises(GraphContractError) as e:
        import_onnx(bare / "model.onnx")
    assert "max_position_embeddings" in str(e.value) and "config.json" in str(e.value)
    assert "1 problem(s)" in str(e.value)
    _, graph_only = import_onnx(bare / "model.onnx", max_position_embeddings=64)
    assert (graph_only.architecture, graph_only.num_heads, graph_only.rope_theta) == ("unknown", None, None)
    assert (graph_only.num_layers, graph_only.num_kv_heads, graph_only.head_dim, graph_only.vocab_size) == (2, 2, 8, 97)
    with pytest.raises(UnknownSourceError, match="config.json"):
        import_onnx(bare / "model.onnx", config_dir=tmp_path / "nowhere")


def test_hub_cache_symlinks_are_followed(legacy_dir, tmp_path):
    """Hugging Face cache: snapshot files are symlinks into blobs/, which onnx_ir would refuse to read."""
    src = legacy_dir(17)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, name in enumerate(("model.onnx", "model.onnx_data", "config.json")):
        shutil.copy(src / name, blobs / f"blob{i}")
        os.symlink(os.path.relpath(blobs / f"blob{i}", snap), snap / name)
    imported, facts = import_onnx(snap / "model.onnx")
    assert facts.num_layers == 2
    emb = imported.graph.initializers["model.model.embed_tokens.weight"].const_value
    assert isinstance(emb, ir.ExternalTensor) and Path(emb.path) == blobs / "blob1"
    ref = onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(src / "model.onnx")).graph.initializer if t.name == emb.name))
    np.testing.assert_array_equal(emb.numpy(), ref)


# --- refusals ------------------------------------------------------------------------------------


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of the export at `dst` with `edit(model)` applied through onnx_ir; config.json beside it."""
    dst.mkdir(parents=True)
    model = ir.load(src / "model.onnx")
    edit(model)
    ir.save(model, dst / "model.onnx", external_data="model.onnx_data")
    shutil.copy(src / "config.json", dst / "config.json")
    return dst / "model.onnx"


def _refused(path: Path, error: type[Exception], **kwargs) -> str:
    root = path.parent
    before = _listing(root)
    with pytest.raises(error) as e:
        import_onnx(path, **kwargs)
    assert _listing(root) == before, "the importer wrote files"
    return str(e.value)


def test_refuses_truncated_random_and_missing_external_data(legacy_dir, tmp_path):
    src = legacy_dir(17, external_data=False)
    data = (src / "model.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    msg = _refused(tmp_path / "trunc.onnx", UnsupportedModelError)
    assert "trunc.onnx" in msg and "not a readable ONNX model" in msg and "DecodeError" in msg

    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "not an ONNX model" in _refused(tmp_path / "empty.onnx", UnsupportedModelError)

    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _refused(tmp_path / "random.onnx", UnsupportedModelError)
    assert "random.onnx" in msg and "not a readable ONNX model" in msg

    nodata = _copy(legacy_dir(17), tmp_path / "nodata", names=("model.onnx", "config.json"))
    msg = _refused(nodata / "model.onnx", UnsupportedModelError)
    assert str(nodata / "model.onnx_data") in msg and "missing" in msg

    short = _copy(legacy_dir(17), tmp_path / "short")
    with open(short / "model.onnx_data", "r+b") as f:
        f.truncate(1000)
    assert "is truncated" in _refused(short / "model.onnx", UnsupportedModelError)

    with pytest.raises(UnknownSourceError, match="no such ONNX file"):
        import_onnx(tmp_path / "absent.onnx")


def test_refuses_export_without_kv_cache(legacy_dir):
    msg = _refused(legacy_dir(17, with_past=False) / "model.onnx", GraphContractError)
    assert "missing all 4 past_key_values.{0..1}.key|value inputs" in msg
    assert "missing all 4 present.{0..1}.key|value outputs" in msg
    assert "2 problem(s)" in msg


def test_refuses_export_without_position_ids(legacy_dir):
    msg = _refused(legacy_dir(17, position_ids=False) / "model.onnx", GraphContractError)
    assert "missing input position_ids" in msg and "re-export" in msg
    assert "1 problem(s)" in msg


def test_refuses_unexpected_inputs(legacy_dir, tmp_path):
    def add_inputs(model: ir.Model) -> None:
        tokens = ir.Shape(["batch_size", "sequence_length"])
        model.graph.inputs.append(ir.val("token_type_ids", ir.DataType.INT64, tokens))
        model.graph.inputs.append(ir.val("use_cache_branch", ir.DataType.BOOL, ir.Shape([1])))

    msg = _refused(_edited(legacy_dir(17), tmp_path / "extra", add_inputs), GraphContractError)
    assert "unexpected input token_type_ids" in msg and "unexpected input use_cache_branch" in msg
    assert "merged decoder" in msg and msg.count("is not supported:") == 2
    assert "2 problem(s)" in msg


def test_refuses_config_mismatch_naming_both_values(legacy_dir, tmp_path):
    bad = _copy(legacy_dir(17), tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(num_key_value_heads=3, vocab_size=100)
    (bad / "config.json").write_text(json.dumps(cfg))
    msg = _refused(bad / "model.onnx", GraphContractError)
    assert "num_key_value_heads = 3 but the graph has 2 (dim 1 of past_key_values.0.key)" in msg
    assert "vocab_size = 100 but the graph has 97 (dim 2 of logits)" in msg
    assert str(bad / "config.json") in msg and "2 problem(s)" in msg


def test_reports_every_contract_problem_together(legacy_dir, tmp_path):
    def break_io(model: ir.Model) -> None:
        values = {v.name: v for v in [*model.graph.inputs, *model.graph.outputs]}
        values["past_key_values.1.value"].name = "past_key_values.1.val"   # key without value + unexpected
        values["present.1.key"].shape = ir.Shape(["batch_size", 4, "total", 8])  # kv heads disagree
        values["position_ids"].dtype = ir.DataType.INT32
        values["logits"].shape = ir.Shape(["batch_size", 97])  # rank 2
        model.graph.outputs.remove(values["present.0.value"])

    msg = _refused(_edited(legacy_dir(17), tmp_path / "broken", break_io), GraphContractError)
    expected = [
        "position_ids: dtype int32, expected int64",
        "unexpected input past_key_values.1.val",
        "logits: rank 2",
        "missing input(s): past_key_values.1.value",
        "missing output(s): present.0.value",
        "K/V tensors disagree on kv_heads (dim 1): 2 in past_key_values.0.key, past_key_values.0.value, "
        "past_key_values.1.key, present.0.key, present.1.value; 4 in present.1.key",
    ]
    for line in expected:
        assert line in msg
    assert f"{len(expected)} problem(s)" in msg


def test_fp16_kv_is_one_problem_not_one_per_tensor(legacy_dir, tmp_path):
    def to_fp16(model: ir.Model) -> None:
        for v in [*model.graph.inputs, *model.graph.outputs]:
            if v.name.startswith(("past_key_values.", "present.")):
                v.dtype = ir.DataType.FLOAT16

    msg = _refused(_edited(legacy_dir(17), tmp_path / "fp16", to_fp16), GraphContractError)
    assert "all 8 K/V tensors: dtype float16, expected float32" in msg and "1 problem(s)" in msg


def test_refuses_ops_from_unknown_domains(legacy_dir, tmp_path):
    def add_custom(model: ir.Model) -> None:
        ids = next(v for v in model.graph.inputs if v.name == "input_ids")
        for domain, op in (("com.example", "Foo"), ("org.other", "Bar"), ("com.microsoft", "Gelu")):
            model.opset_imports[domain] = 1
            model.graph.append(ir.node(op, [ids], domain=domain))

    msg = _refused(_edited(legacy_dir(17), tmp_path / "custom", add_custom), UnsupportedModelError)
    assert "com.example::Foo, org.other::Bar" in msg and "Gelu" not in msg


def test_accepts_com_microsoft_ops_through_opset_conversion(legacy_dir, tiny_hf_dir, tmp_path):
    """An ORT-fused export (contrib ops, old opset) converts; the contrib node survives and still runs."""

    def gelu_logits(model: ir.Model) -> None:  # logits <- com.microsoft::Gelu(logits)
        logits = next(v for v in model.graph.outputs if v.name == "logits")
        logits.name = "logits_pre_gelu"
        gelu = ir.node("Gelu", [logits], domain="com.microsoft", version=1)
        gelu.outputs[0].name, gelu.outputs[0].dtype, gelu.outputs[0].shape = "logits", logits.dtype, logits.shape
        model.opset_imports["com.microsoft"] = 1
        model.graph.append(gelu)
        model.graph.outputs[model.graph.outputs.index(logits)] = gelu.outputs[0]

    imported, _ = import_onnx(_edited(legacy_dir(17), tmp_path / "ms", gelu_logits))
    assert imported.opset_imports[""] == MIN_OPSET
    assert [n.op_type for n in imported.graph if n.domain == "com.microsoft"] == ["Gelu"]
    _, model = tiny_hf_dir("gqa")
    feeds = sample_inputs(model, batch=2, past=3, seq=4)
    want = torch.nn.functional.gelu(torch.from_numpy(_torch_reference(model, feeds)[0])).numpy()
    np.testing.assert_allclose(_run_ort(imported, tmp_path, feeds)[0], want, atol=1e-4, rtol=0)


def test_failed_opset_conversion_is_unsupported(legacy_dir, monkeypatch):
    from onnxscript.version_converter import ConvertVersionPass

    monkeypatch.setattr(ConvertVersionPass, "call", lambda self, model: ir.passes.PassResult(model, False))
    msg = _refused(legacy_dir(17) / "model.onnx", UnsupportedModelError)
    assert "could not convert opset 17 to 21" in msg and "re-export" in msg
