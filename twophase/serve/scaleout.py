"""`twophase serve-config`: serve an artifact with an existing engine when one machine is not enough.

Target `triton`: a Triton Inference Server model repository in which each phase is its own model on
Triton's ONNX Runtime backend, and a Python-backend model runs the generation loop over them (BLS):

    REPO/
      NAME_prefill/config.pbtxt    backend "onnxruntime", default_model_filename "prefill.onnx"
      NAME_prefill/1/*             symlinks to the artifact's files (graphs share weights.bin)
      NAME_decode/config.pbtxt     backend "onnxruntime", default_model_filename "decode.onnx"
      NAME_decode/1/*
      NAME/config.pbtxt            backend "python": prompt [, max_tokens, temperature, top_p, seed] -> text
      NAME/1/model.py              twophase/serve/triton_model.py
      NAME/1/*                     symlinks (manifest, tokenizer) for the loop

Each config is built as a dict (`triton_configs`, what the tests check) and written as protobuf text
(`to_pbtxt`). Tensor names, dtypes and dims come from the manifest (symbolic dims become -1;
max_batch_size 0, so the batch dimension is explicit). The phases run stateless here, so the artifact
must have the "grow" KV binding (past in, present out): the bound binding's in-place buffers need
twophase's own runtime. The phases scale independently (instance_group count, or a different device
kind per phase), which is the point of splitting them.
"""

from __future__ import annotations

import enum
import shutil
from pathlib import Path
from typing import Any

from twophase.compiler.errors import ArtifactError, TwophaseError
from twophase.compiler.manifest import Manifest, TensorSpec
from twophase.runtime.artifact import load_manifest

TRITON_DTYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                 "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
MODEL_FILE = Path(__file__).with_name("triton_model.py")


class ScaleOutTarget(enum.Enum):
    TRITON = "triton"


class Symbol(str):
    """An enum value in protobuf text format (written without quotes): TYPE_INT64, KIND_CPU."""


def write_serve_config(
    artifact: str | Path,
    output: str | Path,
    target: ScaleOutTarget,
    *,
    model_name: str | None = None,
    instances: int = 1,
    overwrite: bool = False,
) -> list[Path]:
    """Write the target's configuration for `artifact` into `output`; returns the files written."""
    artifact, output = Path(artifact).resolve(), Path(output)
    manifest = load_manifest(artifact, verify=False)
    if target is not ScaleOutTarget.TRITON:
        raise TwophaseError(f"unknown scale-out target {target!r}")
    name = model_name or artifact.name
    configs = triton_configs(manifest, name, instances=instances)  # checks everything before writing
    if output.exists():
        if not overwrite:
            raise TwophaseError(f"{output} exists; pass --force to replace it")
        shutil.rmtree(output)
    written = []
    for model, config in configs.items():
        version = output / model / "1"
        version.mkdir(parents=True)
        for rel in [*manifest.files, "manifest.json"]:
            link = version / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(artifact / rel)
        if config["backend"] == "python":
            shutil.copyfile(MODEL_FILE, version / "model.py")
            written.append(version / "model.py")
        path = output / model / "config.pbtxt"
        path.write_text(to_pbtxt(config), encoding="utf-8")
        written.append(path)
    return written


def triton_configs(manifest: Manifest, name: str, *, instances: int = 1) -> dict[str, dict[str, Any]]:
    """{model name: config dict} of the repository: the two phase models and the generate model."""
    binding = manifest.kv_cache["binding"]
    if binding != "grow":
        raise ArtifactError(
            f"the artifact has the {binding!r} KV binding; Triton's ONNX Runtime backend passes each step's K/V "
            "in and out as tensors, so recompile it with `--kv-cache grow` for Triton"
        )
    if instances < 1:
        raise TwophaseError(f"--instances must be at least 1, got {instances}")
    device = str((manifest.compile_options or {}).get("device", "cpu"))
    kind = Symbol("KIND_GPU" if device == "cuda" else "KIND_CPU")
    models: dict[str, dict[str, Any]] = {}
    phase_models = {}
    for phase in ("prefill", "decode"):
        entry = manifest.phases[phase]
        model = phase_models[phase] = f"{name}_{phase}"
        models[model] = {
            "name": model,
            "backend": "onnxruntime",
            "default_model_filename": entry.graph,
            "max_batch_size": 0,
            "input": [_tensor(t) for t in entry.inputs],
            "output": [_tensor(t) for t in entry.outputs],
            "instance_group": [{"count": instances, "kind": kind}],
        }
    models[name] = {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,
        "input": [
            {"name": "prompt", "data_type": Symbol("TYPE_STRING"), "dims": [1]},
            {"name": "max_tokens", "data_type": Symbol("TYPE_INT32"), "dims": [1], "optional": True},
            {"name": "temperature", "data_type": Symbol("TYPE_FP32"), "dims": [1], "optional": True},
            {"name": "top_p", "data_type": Symbol("TYPE_FP32"), "dims": [1], "optional": True},
            {"name": "seed", "data_type": Symbol("TYPE_INT64"), "dims": [1], "optional": True},
        ],
        "output": [{"name": "text", "data_type": Symbol("TYPE_STRING"), "dims": [1]}],
        "instance_group": [{"count": instances, "kind": Symbol("KIND_CPU")}],
        "parameters": [
            {"key": "prefill_model", "value": {"string_value": phase_models["prefill"]}},
            {"key": "decode_model", "value": {"string_value": phase_models["decode"]}},
        ],
    }
    return models


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    if spec.dtype not in TRITON_DTYPES:
        raise ArtifactError(f"tensor {spec.name!r} has dtype {spec.dtype!r}, which has no Triton type here")
    dims = [d if isinstance(d, int) else -1 for d in spec.shape]
    return {"name": spec.name, "data_type": Symbol(TRITON_DTYPES[spec.dtype]), "dims": dims}


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """A config dict in protobuf text format: nested dicts are messages, lists of dicts repeated messages."""
    pad = " " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 2), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += [f"{pad}{key} {{", to_pbtxt(item, indent + 2), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines) + ("\n" if indent == 0 else "")


def _scalar(value: Any) -> str:
    if isinstance(value, Symbol):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
