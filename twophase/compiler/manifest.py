"""Model facts and the artifact manifest schema (format_version 1).

Pure Python so that the runtime can read what the compiler wrote. The manifest is JSON:

    format_version   int, FORMAT_VERSION
    model            ModelFacts as a dict
    phases           {"prefill"|"decode": PhaseEntry as a dict}
    kv_cache         {"layout": "BHTD", "dtype", "binding": "grow", "max_len"}
    tokenizer        {"file", "chat_template_file" | null} or null
    generation       {"eos_token_ids", "bos_token_id", "pad_token_id"}
    compile_options  CompileOptions.to_dict()
    source           {"kind", "name", "sha256" | null}
    versions         {package: version} of the tools that built it
    files            {relative path: sha256} of every other file in the directory
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from twophase.compiler.errors import ArtifactError, GraphContractError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
FACTS_METADATA_KEY = "twophase.model_facts"


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the runtime and the passes must know about a decoder, checked against the graph."""

    architecture: str  # e.g. "llama"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    num_heads: int | None = None  # not visible in every imported graph
    hidden_size: int | None = None
    rope_theta: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model facts") -> ModelFacts:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in d]
        if missing or unknown:
            raise ArtifactError(
                f"{where}: missing field(s) {missing or '[]'}, unknown field(s) {unknown or '[]'}"
            )
        kwargs = dict(d)
        kwargs["eos_token_ids"] = tuple(int(t) for t in d.get("eos_token_ids", ()))
        for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            if not isinstance(kwargs[name], int) or kwargs[name] <= 0:
                raise ArtifactError(f"{where}: field {name!r} must be a positive integer, got {kwargs[name]!r}")
        return cls(**kwargs)

    def kv_names(self, prefix: str) -> list[str]:
        """Flat K/V tensor names in layer order: `{prefix}.{i}.key`, `{prefix}.{i}.value`."""
        return [f"{prefix}.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def to_metadata(self) -> dict[str, str]:
        return {FACTS_METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ModelFacts:
        if FACTS_METADATA_KEY not in metadata:
            raise GraphContractError(
                f"graph has no {FACTS_METADATA_KEY!r} metadata_props entry; "
                "import it with twophase.models.importer.import_onnx first"
            )
        return cls.from_dict(json.loads(metadata[FACTS_METADATA_KEY]), where=f"metadata {FACTS_METADATA_KEY}")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str | None, ...]  # ints are static, strings are symbolic

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclasses.dataclass(frozen=True)
class PhaseEntry:
    graph: str  # file name inside the artifact
    backend: str
    scheme: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # TVM backend: the weight parameters' index file and the target the library was built for
    params: str | None = None
    target: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {
            "graph": self.graph,
            "backend": self.backend,
            "scheme": self.scheme,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }
        if self.params is not None:
            d["params"] = self.params
        if self.target is not None:
            d["target"] = self.target
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseEntry:
        return cls(
            d["graph"],
            d["backend"],
            d["scheme"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            d.get("params"),
            d.get("target"),
        )


REQUIRED_FIELDS = ("format_version", "model", "phases", "kv_cache", "generation", "files")


@dataclasses.dataclass(frozen=True)
class Manifest:
    model: ModelFacts
    phases: dict[str, PhaseEntry]
    kv_cache: dict[str, Any]
    generation: dict[str, Any]
    files: dict[str, str]
    tokenizer: dict[str, Any] | None = None
    compile_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = {
            "format_version": self.format_version,
            "model": self.model.to_dict(),
            "phases": {k: v.to_dict() for k, v in self.phases.items()},
            "kv_cache": self.kv_cache,
            "tokenizer": self.tokenizer,
            "generation": self.generation,
            "compile_options": self.compile_options,
            "source": self.source,
            "versions": self.versions,
            "files": self.files,
        }
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ArtifactError(f"{where}: expected a JSON object at top level")
        missing = [k for k in REQUIRED_FIELDS if k not in d]
        if missing:
            raise ArtifactError(f"{where}: missing required field(s) {missing}; recompile the artifact")
        if d["format_version"] != FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: format_version {d['format_version']!r} is not supported by this twophase "
                f"(reads version {FORMAT_VERSION}); recompile the artifact"
            )
        for phase in ("prefill", "decode"):
            if phase not in d["phases"]:
                raise ArtifactError(f"{where}: phases.{phase} is missing")
        try:
            phases = {k: PhaseEntry.from_dict(v) for k, v in d["phases"].items()}
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{where}: malformed phases entry ({e!r})") from e
        return cls(
            model=ModelFacts.from_dict(d["model"], where=f"{where}: model"),
            phases=phases,
            kv_cache=d["kv_cache"],
            generation=d["generation"],
            files=d["files"],
            tokenizer=d.get("tokenizer"),
            compile_options=d.get("compile_options", {}),
            source=d.get("source", {}),
            versions=d.get("versions", {}),
            format_version=d["format_version"],
        )
