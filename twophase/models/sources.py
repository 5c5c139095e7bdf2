"""Model sources and their canonical ONNX form.

A source is what the user names on the command line: a zoo name, a Hugging Face model directory,
a `.gguf` file or an `.onnx` file. `load_canonical` turns any of them into a `CanonicalModel`: the
canonical decoder graph (DESIGN.md), its ModelFacts and its tokenizer files. Exports of HF / GGUF
checkpoints take minutes, so they are cached under the user cache dir, keyed by the content hash of
the checkpoint and the versions of the exporting tools.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twophase.compiler.errors import UnknownSourceError
from twophase.compiler.manifest import ModelFacts
from twophase.models import zoo
from twophase.runtime.artifact import sha256_file

log = logging.getLogger(__name__)

# Bump when export.py changes what it writes, so cached exports are not reused.
EXPORT_VERSION = 1
GGUF_MAGIC = b"GGUF"


class SourceKind(enum.Enum):
    ZOO = "zoo"
    HF_DIR = "hf"
    GGUF = "gguf"
    ONNX = "onnx"


@dataclasses.dataclass(frozen=True)
class Source:
    kind: SourceKind
    spec: str  # as the user wrote it
    path: Path | None  # the file or directory it resolved to (None for a zoo entry not yet fetched)


@dataclasses.dataclass
class CanonicalModel:
    """The canonical graph of a source, ready for the pass pipeline."""

    model: Any  # onnx_ir.Model, initializers lazily backed by the files in `directory`
    facts: ModelFacts
    source: dict[str, Any]  # {"kind", "name", "sha256"} for the manifest
    tokenizer_json: Path | None = None  # None: the artifact takes token ids only
    chat_template: str | None = None
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    export_dir: Path | None = None  # the cached export (model.onnx + tokenizer files), for exported sources


def resolve_source(spec: str) -> Source:
    """Classify `spec`; raises UnknownSourceError for anything that is not loadable."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UnknownSourceError(f"{path} is a directory without config.json: not a Hugging Face model directory")
            return Source(SourceKind.HF_DIR, spec, path)
        if path.suffix == ".gguf":
            with open(path, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise UnknownSourceError(f"{path} does not start with the GGUF magic bytes: not a GGUF file")
            return Source(SourceKind.GGUF, spec, path)
        if path.suffix == ".onnx":
            return Source(SourceKind.ONNX, spec, path)
        raise UnknownSourceError(f"{path}: unknown kind of model file (expected a directory, .gguf or .onnx)")
    if spec in zoo.ZOO:
        return Source(SourceKind.ZOO, spec, None)
    from twophase.models import synthetic

    if synthetic.is_synthetic(spec):  # a random-weight model of a real shape (speed measurements only)
        return Source(SourceKind.HF_DIR, spec, synthetic.materialize(spec))
    if spec.endswith((".gguf", ".onnx")) or os.sep in spec:
        raise UnknownSourceError(f"{spec}: no such file or directory")
    zoo.lookup(spec)  # raises with the list of known names
    raise AssertionError("unreachable")


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _export_key(kind: SourceKind, content_sha: str) -> str:
    import torch
    import transformers

    from twophase.models.export import CANONICAL_OPSET

    h = hashlib.sha256(
        json.dumps(
            [kind.value, content_sha, EXPORT_VERSION, CANONICAL_OPSET, torch.__version__, transformers.__version__]
        ).encode()
    )
    return h.hexdigest()[:24]


def load_canonical(source: Source | str, *, use_cache: bool = True) -> CanonicalModel:
    """The canonical graph of `source`, exporting (or importing) it as needed."""
    if isinstance(source, str):
        source = resolve_source(source)
    if source.kind is SourceKind.ONNX:
        return _load_onnx(source)
    if source.kind is SourceKind.ZOO:
        gguf = zoo.fetch(source.spec)
        checkpoint, gguf_file, content_sha = gguf.parent, gguf.name, zoo.lookup(source.spec).sha256
    elif source.kind is SourceKind.GGUF:
        checkpoint, gguf_file = source.path.parent, source.path.name
        content_sha = sha256_file(source.path)
    else:
        checkpoint, gguf_file = source.path, None
        content_sha = _hash_files([p for p in source.path.iterdir() if p.is_file()])
    src_entry = {"kind": source.kind.value, "name": source.spec, "sha256": content_sha}

    export_dir = zoo.cache_dir() / "exports" / _export_key(source.kind, content_sha)
    if not (use_cache and (export_dir / "bundle.json").is_file()):
        _export_to(export_dir, checkpoint, gguf_file)
    else:
        log.info("reusing cached export %s", export_dir)
    return _load_bundle(export_dir, src_entry)


def _export_to(export_dir: Path, checkpoint: Path, gguf_file: str | None) -> None:
    """Export a checkpoint into `export_dir` atomically (temp dir + rename)."""
    from twophase.models.export import export_canonical
    from twophase.models.hf import (
        facts_from_config,
        load_causal_lm,
        save_tokenizer_files,
    )

    model, tokenizer = load_causal_lm(checkpoint, gguf_file)
    facts = facts_from_config(model.config, getattr(model, "generation_config", None))
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=export_dir.parent, prefix=export_dir.name + ".tmp-"))
    try:
        export_canonical(model, facts, tmp / "model.onnx")
        tok_entry = save_tokenizer_files(tokenizer, tmp) if tokenizer is not None else None
        (tmp / "bundle.json").write_text(json.dumps({"facts": facts.to_dict(), "tokenizer": tok_entry}, indent=2))
        if export_dir.exists():
            shutil.rmtree(export_dir)
        os.replace(tmp, export_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_bundle(export_dir: Path, src_entry: dict[str, Any]) -> CanonicalModel:
    import onnx_ir as ir

    bundle = json.loads((export_dir / "bundle.json").read_text())
    tok = bundle["tokenizer"] or {}  # None: a checkpoint without a tokenizer (token ids only)
    template = tok.get("chat_template_file")
    return CanonicalModel(
        model=ir.load(export_dir / "model.onnx"),
        facts=ModelFacts.from_dict(bundle["facts"]),
        source=src_entry,
        tokenizer_json=export_dir / tok["file"] if tok else None,
        chat_template=(export_dir / template).read_text() if template else None,
        special_tokens=tok.get("special_tokens", {}),
        export_dir=export_dir,
    )


def _load_onnx(source: Source) -> CanonicalModel:
    from twophase.models.importer import import_onnx

    model, facts = import_onnx(source.path)
    canonical = CanonicalModel(
        model=model,
        facts=facts,
        source={"kind": source.kind.value, "name": source.spec, "sha256": None},
    )
    _read_tokenizer_beside(source.path.parent, canonical)
    if canonical.tokenizer_json is None:
        log.warning("no tokenizer.json beside %s: the artifact will take token ids only", source.path)
    return canonical


def _read_tokenizer_beside(directory: Path, canonical: CanonicalModel) -> None:
    """Fill the tokenizer fields from a directory laid out like an HF / Optimum export."""
    if not (directory / "tokenizer.json").is_file():
        return
    canonical.tokenizer_json = directory / "tokenizer.json"
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            canonical.special_tokens[key] = value
    if (directory / "chat_template.jinja").is_file():
        canonical.chat_template = (directory / "chat_template.jinja").read_text()
    elif isinstance(config.get("chat_template"), str):
        canonical.chat_template = config["chat_template"]
