"""Artifact loading and verification on hand-made artifact directories."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from twophase.compiler.errors import ArtifactError
from twophase.compiler.manifest import FORMAT_VERSION, Manifest, ModelFacts, PhaseEntry, TensorSpec
from twophase.runtime.artifact import load_manifest, max_context, sha256_file, tokenizer_paths

FACTS = ModelFacts("llama", num_layers=1, num_kv_heads=1, head_dim=4, vocab_size=10, max_position_embeddings=64)


def phase(graph: str) -> PhaseEntry:
    spec = TensorSpec("input_ids", "int64", ("batch", "seq"))
    return PhaseEntry(graph, "ort", "fp32", (spec,), (TensorSpec("logits", "float32", ("batch", 1, 10)),))


def make_artifact(root: Path, **overrides) -> Path:
    """A directory with a valid manifest over small stand-in files (nothing here is loaded as a graph)."""
    root.mkdir(parents=True, exist_ok=True)
    contents = {
        "prefill.onnx": b"prefill graph",
        "decode.onnx": b"decode graph",
        "weights.bin": bytes(range(256)) * 64,
        "tokenizer.json": b"{}",
        "report.json": b"{}",
    }
    for name, data in contents.items():
        (root / name).write_bytes(data)
    manifest = Manifest(
        model=FACTS,
        phases={"prefill": phase("prefill.onnx"), "decode": phase("decode.onnx")},
        kv_cache={"layout": "BHTD", "dtype": "float32", "binding": "grow", "max_len": 32},
        generation={"eos_token_ids": [2], "bos_token_id": 1, "pad_token_id": 0},
        files={name: hashlib.sha256(data).hexdigest() for name, data in contents.items()},
        tokenizer={"file": "tokenizer.json", "chat_template_file": None, "special_tokens": {}},
    )
    d = json.loads(manifest.to_json())
    d.update(overrides)
    (root / "manifest.json").write_text(json.dumps(d))
    return root


def edit_manifest(root: Path, fn) -> None:
    d = json.loads((root / "manifest.json").read_text())
    fn(d)
    (root / "manifest.json").write_text(json.dumps(d))


def test_valid_artifact_loads(tmp_path):
    root = make_artifact(tmp_path / "a")
    m = load_manifest(root)
    assert m.model == FACTS and m.phases["decode"].graph == "decode.onnx"
    assert max_context(m) == 32
    assert tokenizer_paths(root, m) == (root / "tokenizer.json", None)


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_missing_manifest(tmp_path):
    root = make_artifact(tmp_path / "a")
    (root / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json"):
        load_manifest(root)


def test_manifest_not_json(tmp_path):
    root = make_artifact(tmp_path / "a")
    (root / "manifest.json").write_text("{oops")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(root)


@pytest.mark.parametrize("field", ["files", "model", "phases", "kv_cache", "generation", "format_version"])
def test_missing_field(tmp_path, field):
    root = make_artifact(tmp_path / "a")
    edit_manifest(root, lambda d: d.pop(field))
    with pytest.raises(ArtifactError, match=field):
        load_manifest(root)


@pytest.mark.parametrize(
    "edit, name",
    [
        (lambda d: d["model"].pop("head_dim"), "head_dim"),
        (lambda d: d["phases"].pop("decode"), "decode"),
        (lambda d: d["kv_cache"].pop("binding"), "binding"),
        (lambda d: d["kv_cache"].update(binding="paged"), "paged"),
        (lambda d: d["kv_cache"].update(max_len=-1), "max_len"),
        (lambda d: d["generation"].update(eos_token_ids="2"), "eos_token_ids"),
        (lambda d: d["phases"]["prefill"].pop("inputs"), "phases"),
        (lambda d: d["tokenizer"].pop("file"), "tokenizer.file"),
    ],
)
def test_malformed_fields(tmp_path, edit, name):
    root = make_artifact(tmp_path / "a")
    edit_manifest(root, edit)
    with pytest.raises(ArtifactError, match=name):
        load_manifest(root)


def test_bad_format_version(tmp_path):
    root = make_artifact(tmp_path / "a", format_version=FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match="format_version"):
        load_manifest(root)


def test_tampered_file(tmp_path):
    root = make_artifact(tmp_path / "a")
    data = bytearray((root / "weights.bin").read_bytes())
    data[100] ^= 1
    (root / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.bin.*tampered or corrupt, recompile"):
        load_manifest(root)
    load_manifest(root, verify=False)  # hashing skipped on request


def test_missing_file(tmp_path):
    root = make_artifact(tmp_path / "a")
    (root / "report.json").unlink()
    with pytest.raises(ArtifactError, match="report.json"):
        load_manifest(root)
    with pytest.raises(ArtifactError, match="report.json"):
        load_manifest(root, verify=False)  # existence is always checked


def test_graph_not_listed_in_files(tmp_path):
    root = make_artifact(tmp_path / "a")
    edit_manifest(root, lambda d: d["files"].pop("decode.onnx"))
    with pytest.raises(ArtifactError, match="decode.onnx"):
        load_manifest(root)


def test_tokenizer_not_listed_in_files(tmp_path):
    root = make_artifact(tmp_path / "a")
    edit_manifest(root, lambda d: d["tokenizer"].update(chat_template_file="chat_template.jinja"))
    with pytest.raises(ArtifactError, match="chat_template.jinja"):
        load_manifest(root)


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", ""])
def test_paths_must_stay_inside(tmp_path, bad):
    root = make_artifact(tmp_path / "a")
    edit_manifest(root, lambda d: d["files"].update({bad: "0" * 64}))
    with pytest.raises(ArtifactError, match="plain path inside the artifact"):
        load_manifest(root, verify=False)


def test_sha256_file_chunks(tmp_path):
    p = tmp_path / "big.bin"
    data = bytes(range(256)) * (9 * 4096 + 7)  # spans several 1 MiB chunks, ends mid-chunk
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_null_tokenizer(tmp_path):
    root = make_artifact(tmp_path / "a", tokenizer=None)
    assert tokenizer_paths(root, load_manifest(root)) is None
