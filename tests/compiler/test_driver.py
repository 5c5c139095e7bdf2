"""compile_model end to end on tiny models: artifact layout, manifest, report, atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from twophase.compiler.driver import compile_model
from twophase.compiler.errors import ArtifactError, UnknownSourceError
from twophase.compiler.manifest import MANIFEST_FILE, Manifest
from twophase.compiler.options import CompileOptions


def test_artifact_layout_and_manifest(tiny_artifact):
    art = tiny_artifact("gqa")
    names = {p.name for p in art.iterdir()}
    assert {"manifest.json", "prefill.onnx", "decode.onnx", "weights.bin", "tokenizer.json",
            "chat_template.jinja", "generation_config.json", "report.json"} <= names
    m = Manifest.from_json((art / MANIFEST_FILE).read_text())
    assert set(m.files) == names - {MANIFEST_FILE}
    assert m.model.num_layers == 2 and m.model.num_kv_heads == 2
    assert m.phases["prefill"].scheme == "fp32" and m.phases["decode"].backend == "ort"
    prefill_inputs = [t.name for t in m.phases["prefill"].inputs]
    assert prefill_inputs == ["input_ids", "attention_mask", "position_ids"]
    decode_inputs = [t.name for t in m.phases["decode"].inputs]
    assert decode_inputs[3:] == m.model.kv_names("past_key_values")
    assert m.phases["decode"].inputs[0].shape[1] == 1
    assert m.kv_cache["max_len"] == m.model.max_position_embeddings
    assert m.versions["onnxruntime"]


def test_both_phases_share_one_weights_file(tiny_artifact):
    art = tiny_artifact("gqa")
    locations = {}
    for phase in ("prefill", "decode"):
        proto = onnx.load(str(art / f"{phase}.onnx"), load_external_data=False)
        ext = {}
        for init in proto.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                kv = {e.key: e.value for e in init.external_data}
                assert kv["location"] == "weights.bin"
                ext[(kv["offset"], kv["length"])] = init.name
        locations[phase] = ext
    shared = set(locations["prefill"]) & set(locations["decode"])
    # every MatMul weight of the tiny model is read by both phases from the same bytes: per layer the
    # packed q/k/v, o, packed gate/up and down projections (PackProjectionsPass)
    assert len(shared) >= 4 * 2
    report = json.loads((art / "report.json").read_text())
    assert report["weights"]["tensors_shared"] >= len(shared)
    weights_size = (art / "weights.bin").stat().st_size
    assert weights_size < 1.1 * report["weights"]["bytes_written"] + 4096 * report["weights"]["tensors_written"]


def test_report_records_every_pass_with_a_diff(tiny_artifact):
    report = json.loads((tiny_artifact("gqa") / "report.json").read_text())
    phases = {r["phase"] for r in report["passes"]}
    assert phases == {"prefill", "decode"}
    split = [r for r in report["passes"] if r["name"] == "SplitPhasesPass"]
    assert len(split) == 2 and all(r["modified"] for r in split)
    assert all("op_delta" in r["diff"] and r["seconds"] >= 0 for r in report["passes"])


def test_existing_output_is_refused_before_any_work(tmp_path, tiny_hf_dir):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    hf, _ = tiny_hf_dir("gqa")
    with pytest.raises(ArtifactError, match="already exists"):
        compile_model(str(hf), out, CompileOptions())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ArtifactError, match="not a twophase artifact"):
        compile_model(str(hf), out, CompileOptions(), overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_compile_leaves_nothing(tmp_path, monkeypatch, tiny_hf_dir):
    import twophase.compiler.lower_ort as lower_ort

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lower_ort, "write_phase_graphs", boom)
    hf, _ = tiny_hf_dir("gqa")
    with pytest.raises(RuntimeError, match="disk full"):
        compile_model(str(hf), tmp_path / "art", CompileOptions())
    assert list(tmp_path.iterdir()) == []


def test_unknown_source(tmp_path):
    with pytest.raises(UnknownSourceError):
        compile_model("not-a-model", tmp_path / "art", CompileOptions())
    assert list(tmp_path.iterdir()) == []


def test_max_len_recorded_and_checked(tmp_path, tiny_hf_dir):
    hf, _ = tiny_hf_dir("gqa")
    out = compile_model(str(hf), tmp_path / "art", CompileOptions(max_len=64))
    assert Manifest.from_json((out / MANIFEST_FILE).read_text()).kv_cache["max_len"] == 64
    from twophase.compiler.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="max_position_embeddings"):
        compile_model(str(hf), tmp_path / "art2", CompileOptions(max_len=10_000))
    assert not (tmp_path / "art2").exists()


def test_kv_binding_auto_falls_back_to_grow_with_the_reason(tmp_path, tiny_hf_dir, caplog):
    import logging

    from twophase.compiler.errors import UnsupportedModelError
    from twophase.compiler.options import KVBinding, KVDtype

    hf, _ = tiny_hf_dir("gqa")  # head_dim 8: GroupQueryAttention needs a multiple of 16
    with caplog.at_level(logging.WARNING):
        art = compile_model(str(hf), tmp_path / "auto", CompileOptions())
    assert json.loads((art / "manifest.json").read_text())["kv_cache"]["binding"] == "grow"
    assert "head_dim 8 is not a multiple of 16" in caplog.text
    for options in (CompileOptions(kv_binding=KVBinding.BOUND), CompileOptions(kv_dtype=KVDtype.INT8)):
        with pytest.raises(UnsupportedModelError, match="cannot bind the KV cache"):
            compile_model(str(hf), tmp_path / "x", options)
    with pytest.raises(UnsupportedModelError, match="int8 KV cache needs the bound binding"):
        compile_model(str(hf), tmp_path / "x", CompileOptions(kv_binding=KVBinding.GROW, kv_dtype=KVDtype.INT8))
    assert not (tmp_path / "x").exists()


def test_bound_int8_kv_artifact(tmp_path, tiny_hf_dir):
    from twophase.compiler.options import KVDtype
    from twophase.runtime.engine import Engine

    hf, _ = tiny_hf_dir("gqa16")
    art = compile_model(str(hf), tmp_path / "kv8", CompileOptions(kv_dtype=KVDtype.INT8, calibration_windows=1,
                                                                 calibration_tokens=64))
    kv = json.loads((art / "manifest.json").read_text())["kv_cache"]
    assert kv["binding"] == "bound" and kv["dtype"] == "int8" and kv["prefill_chunk"] == 512
    engine = Engine.load(art)
    tokens = list(engine.generate_ids([1, 5, 9, 12, 40], max_new_tokens=6))
    assert len(tokens) == 6 and engine.cache._buffers[0].dtype == np.int8
