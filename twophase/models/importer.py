"""Import a decoder ONNX graph exported by another tool (Hugging Face / Optimum naming).

`import_onnx(path)` turns a third-party export into the canonical graph of DESIGN.md:

    input_ids[B,S] i64, attention_mask[B,P+S] i64, position_ids[B,S] i64,
    past_key_values.{i}.key|value[B,Hkv,P,D] f32  ->  logits[B,S,V] f32, present.{i}.key|value[B,Hkv,P+S,D] f32

Steps: load with onnx_ir (external data stays memory-mapped where it lies; nothing is copied),
check that every external data file is there, inline model-local functions, check the graph's I/O
against the contract, infer ModelFacts from the graph's own shapes and from config.json /
generation_config.json beside it (each checked against the other), upgrade a default-domain opset
older than 21, and record the facts in metadata_props (`twophase.model_facts`).

Every contract violation is collected first and reported in ONE GraphContractError; ops from
domains other than the default one and com.microsoft are reported together in one
UnsupportedModelError. The importer writes no files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common
from google.protobuf.message import DecodeError

from twophase.compiler.errors import ArtifactError, GraphContractError, UnknownSourceError, UnsupportedModelError
from twophase.compiler.manifest import FACTS_METADATA_KEY, ModelFacts

log = logging.getLogger(__name__)

MIN_OPSET = 21
MIN_IR_VERSION = 10  # opset 21 (and int4 types) need IR version 10
ALLOWED_DOMAINS = ("", "ai.onnx", "com.microsoft")
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

_PAST_RE = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_PRESENT_RE = re.compile(r"present\.(\d+)\.(key|value)")
_CORE_INPUTS = {  # name: (dtype, dimension names)
    "input_ids": (ir.DataType.INT64, ("batch", "seq")),
    "attention_mask": (ir.DataType.INT64, ("batch", "past+seq")),
    "position_ids": (ir.DataType.INT64, ("batch", "seq")),
}
_LOGITS = (ir.DataType.FLOAT, ("batch", "seq", "vocab"))
_PAST_DIMS = ("batch", "kv_heads", "past", "head_dim")
_PRESENT_DIMS = ("batch", "kv_heads", "past+seq", "head_dim")
_INPUT_HINTS = {
    "use_cache_branch": "it marks Optimum's merged decoder (decoder_model_merged.onnx); use the decoder "
    "with past (decoder_with_past_model.onnx) or re-export with a current Optimum",
    "token_type_ids": "decoder-only graphs take no token_type_ids; re-export without it",
    "cache_position": "re-export without cache_position (positions come from position_ids)",
}


@dataclasses.dataclass(frozen=True)
class _Declared:
    """Model facts declared outside the graph (config.json or existing metadata), all optional."""

    source: str  # file or metadata key, for messages
    architecture: str | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None


@dataclasses.dataclass
class _GraphFacts:
    """What the graph's own I/O says; None where a dimension is symbolic or absent."""

    num_layers: int = 0
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    kv_evidence: str = ""  # a tensor name, for messages


def import_onnx(
    path: str | Path,
    *,
    config_dir: Path | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[ir.Model, ModelFacts]:
    """Load a third-party decoder export, check it against the canonical contract and infer its facts.

    `config_dir` holds config.json (and optionally generation_config.json); by default they are looked
    for beside the .onnx file, then one directory up (the `onnx/` subfolder layout of Hub repos).
    `max_position_embeddings` is needed only when no config.json (or earlier import) declares it.
    Returns the model, upgraded to opset >= 21, with the facts in its metadata_props.
    """
    path = Path(path).absolute()  # absolute, not resolved: external data resolves beside the link
    model = _load(path)
    _check_external_data(model, path)
    if model.functions:
        log.info("%s: inlining %d model-local function(s)", path.name, len(model.functions))
        ir.passes.common.InlinePass()(model)

    declared = _declared_sources(model, path, config_dir)
    problems, graph = _check_contract(model, declared[0] if declared else None)
    facts, fact_problems = _build_facts(graph, declared, max_position_embeddings, path)
    problems += fact_problems
    unsupported = _unsupported_ops(model)
    if problems:
        if unsupported:
            problems.append(f"ops from unsupported domains: {', '.join(unsupported)}")
        lines = "\n".join(f"  - {p}" for p in problems)
        raise GraphContractError(
            f"{path}: the graph does not fit twophase's decoder contract ({len(problems)} problem(s)):\n{lines}\n"
            "Expected inputs input_ids, attention_mask, position_ids (int64), past_key_values.{i}.key|value "
            "(float32 [batch, kv_heads, past, head_dim]) and outputs logits, present.{i}.key|value."
        )
    if unsupported:
        raise UnsupportedModelError(
            f"{path}: ops from domains other than the ONNX default and com.microsoft are not supported: "
            f"{', '.join(unsupported)}; re-export the model with standard ONNX ops"
        )
    assert facts is not None
    io_before = _io_names(model)
    _upgrade_opset(model, path)
    if _io_names(model) != io_before:
        raise UnsupportedModelError(
            f"{path}: opset conversion changed the graph's inputs/outputs; re-export at opset >= {MIN_OPSET}"
        )
    model.metadata_props.update(facts.to_metadata())
    log.info(
        "imported %s: %s, %d layers, %d kv heads, head_dim %d, vocab %d, opset %d",
        path.name, facts.architecture, facts.num_layers, facts.num_kv_heads, facts.head_dim,
        facts.vocab_size, model.opset_imports[""],
    )
    return model, facts


# --- loading -------------------------------------------------------------------------------------


def _load(path: Path) -> ir.Model:
    if not path.is_file():
        raise UnknownSourceError(f"{path}: no such ONNX file")
    try:
        model = ir.load(path, format="protobuf")
    except (DecodeError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise UnsupportedModelError(
            f"{path}: not a readable ONNX model (truncated, corrupt or not protobuf): {type(e).__name__}: {e}"
        ) from e
    if len(model.graph) == 0 or not model.graph.outputs:
        raise UnsupportedModelError(f"{path}: not an ONNX model (no nodes or no outputs in its graph)")
    return model


def _external_tensors(model: ir.Model) -> Iterator[tuple[ir.ExternalTensor, Callable[[ir.TensorProtocol], None]]]:
    """(tensor, a setter that replaces it) for every external tensor, attributes and subgraphs included."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value, lambda t, v=value: setattr(v, "const_value", t)
        for node in graph:
            for name, attr in node.attributes.items():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    yield attr.value, lambda t, n=node, k=name: n.attributes.__setitem__(k, ir.AttrTensor(k, t))


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Every external data file exists and is long enough; symlinks (Hub cache layout) are followed.

    onnx_ir refuses at read time a file whose real path leaves the model's directory: a location
    that itself stays inside it but is a symlink elsewhere (the Hugging Face cache's snapshot -> blob
    links) is rebound to the real file, still lazily.
    """
    by_location: dict[str, list[tuple[ir.ExternalTensor, Callable[[ir.TensorProtocol], None]]]] = defaultdict(list)
    for tensor, setter in _external_tensors(model):
        by_location[os.fspath(tensor.location)].append((tensor, setter))
    problems = []
    base = path.parent
    for location, tensors in sorted(by_location.items()):
        file = base / location
        if Path(location).is_absolute() or ".." in Path(location).parts:
            problems.append(f"external data location {location!r} points outside {base}")
            continue
        if not file.is_file():
            problems.append(f"external data file {file} (referenced by {len(tensors)} tensor(s)) is missing")
            continue
        size = file.stat().st_size
        short = [t.name for t, _ in tensors if (t.offset or 0) + (t.nbytes if t.length is None else t.length) > size]
        if short:
            problems.append(f"external data file {file} ({size} bytes) is truncated: {len(short)} tensor(s) "
                            f"end past its end, e.g. {short[0]!r}")
            continue
        real = file.resolve()
        if real.stat().st_nlink > 1:
            problems.append(f"external data file {file} has {real.stat().st_nlink} hard links; onnx_ir refuses "
                            "to read such files, copy it to a file of its own")
        elif not real.is_relative_to(base.resolve()):
            log.info("%s: external data %s is a link to %s; reading it there", path.name, location, real)
            for t, setter in tensors:
                setter(ir.ExternalTensor(
                    real.name, t.offset, t.length, t.dtype, shape=t.shape, name=t.name, base_dir=str(real.parent)
                ))
    if problems:
        raise UnsupportedModelError(f"{path}: external data is unusable:\n" + "\n".join(f"  - {p}" for p in problems))


# --- declared facts ------------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"{file}: cannot read it as JSON ({e})") from e
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"{file}: expected a JSON object")
    return data


def _ints(x: Any) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(t) for t in x) if isinstance(x, (list, tuple)) else (int(x),)


def _declared_from_config(config_file: Path) -> _Declared:
    cfg = _read_json(config_file)
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    gen_file = config_file.parent / GENERATION_CONFIG_FILE
    gen = _read_json(gen_file) if gen_file.is_file() else {}
    num_heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (hidden // num_heads if hidden and num_heads else None)
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta")) if isinstance(rope, dict) else cfg.get("rope_theta")
    bos = gen.get("bos_token_id") if gen.get("bos_token_id") is not None else cfg.get("bos_token_id")
    pad = gen.get("pad_token_id") if gen.get("pad_token_id") is not None else cfg.get("pad_token_id")
    return _Declared(
        source=str(config_file),
        architecture=cfg.get("model_type"),
        num_layers=cfg.get("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=cfg.get("vocab_size"),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        rope_theta=float(rope_theta) if rope_theta is not None else None,
        bos_token_id=int(bos) if isinstance(bos, int) else None,
        eos_token_ids=_ints(gen.get("eos_token_id")) or _ints(cfg.get("eos_token_id")),
        pad_token_id=int(pad) if isinstance(pad, int) else None,
    )


def _declared_sources(model: ir.Model, path: Path, config_dir: Path | None) -> list[_Declared]:
    """config.json first (if found), then facts an earlier import or export left in metadata_props."""
    sources = []
    if config_dir is not None:
        config_file = Path(config_dir) / CONFIG_FILE
        if not config_file.is_file():
            raise UnknownSourceError(f"{config_file}: no such file (config_dir was given explicitly)")
        sources.append(_declared_from_config(config_file))
    else:
        for d in (path.parent, path.parent.parent):
            if (d / CONFIG_FILE).is_file():
                sources.append(_declared_from_config(d / CONFIG_FILE))
                break
    if FACTS_METADATA_KEY in model.metadata_props:
        try:
            mf = ModelFacts.from_metadata(model.metadata_props)
        except (ArtifactError, ValueError) as e:
            raise GraphContractError(f"{path}: malformed {FACTS_METADATA_KEY} metadata ({e})") from e
        sources.append(_Declared(source=f"metadata {FACTS_METADATA_KEY}", **{
            f.name: getattr(mf, f.name) for f in dataclasses.fields(_Declared) if f.name != "source"
        }))
    return sources


# --- the contract --------------------------------------------------------------------------------


def _dtype_name(dtype: ir.DataType | None) -> str:
    if dtype is None:
        return "unknown"
    try:
        return dtype.numpy().name  # float32, int64, bool
    except TypeError:
        return dtype.name.lower()


def _describe(value: ir.Value) -> str:
    """`float32[batch_size, 2, past, 8]`, for messages."""
    dtype = _dtype_name(value.dtype)
    if value.shape is None:
        return f"{dtype}[?]"
    return f"{dtype}[{', '.join(str(d if isinstance(d, int) else d.value or '?') for d in value.shape)}]"


def _check_value(value: ir.Value, dtype: ir.DataType, dims: tuple[str, ...], problems: list[str]) -> bool:
    """Dtype and rank of one contract tensor; True when its shape can be read further."""
    ok = True
    if value.dtype != dtype:
        problems.append(f"{value.name}: dtype {_dtype_name(value.dtype)}, expected {_dtype_name(dtype)}")
    if value.shape is None:
        problems.append(f"{value.name}: rank unknown (no shape), expected {len(dims)}: [{', '.join(dims)}]")
        return False
    if len(value.shape) != len(dims):
        problems.append(f"{value.name}: rank {len(value.shape)} {_describe(value)}, "
                        f"expected {len(dims)}: [{', '.join(dims)}]")
        ok = False
    return ok


def _static(value: ir.Value, axis: int) -> int | None:
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _io_names(model: ir.Model) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(v.name for v in model.graph.inputs), tuple(v.name for v in model.graph.outputs)


def _kv_layers(names: list[str], pattern: re.Pattern[str]) -> dict[int, set[str]]:
    layers: dict[int, set[str]] = defaultdict(set)
    for name in names:
        m = pattern.fullmatch(name)
        assert m is not None
        layers[int(m.group(1))].add(m.group(2))
    return layers


def _missing_kv(prefix: str, layers: dict[int, set[str]], num_layers: int, kind: str) -> list[str]:
    if num_layers == 0:
        return [f"no {prefix}.{{i}}.key|value {kind}s: the graph has no KV cache; re-export it with past "
                "(Optimum task text-generation-with-past)"]
    if not layers:
        return [f"missing all {2 * num_layers} {prefix}.{{0..{num_layers - 1}}}.key|value {kind}s; "
                "re-export with past (Optimum task text-generation-with-past)"]
    missing = [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")
               if kv not in layers.get(i, ())]
    return [f"missing {kind}(s): {', '.join(missing)}"] if missing else []


def _check_contract(model: ir.Model, declared: _Declared | None) -> tuple[list[str], _GraphFacts]:
    """Every way the graph's I/O misses the contract, and the facts its shapes give."""
    problems: list[str] = []
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs if v.name not in graph.initializers}  # IR<4 lists initializers
    outputs = {v.name: v for v in graph.outputs}

    for name, (dtype, dims) in _CORE_INPUTS.items():
        if name not in inputs:
            if name == "position_ids":
                problems.append("missing input position_ids: twophase requires explicit positions (left-padded "
                                "batches); re-export the model with a position_ids input")
            else:
                problems.append(f"missing input {name}")
        elif _check_value(inputs[name], dtype, dims, problems) and name == "input_ids":
            seq = _static(inputs[name], 1)
            if seq is not None:
                problems.append(f"input_ids: sequence dimension is fixed at {seq}; prefill and decode need it dynamic")
    past_names = [n for n in inputs if _PAST_RE.fullmatch(n)]
    present_names = [n for n in outputs if _PRESENT_RE.fullmatch(n)]
    extra_in = [n for n in inputs if n not in _CORE_INPUTS and n not in past_names]
    extra_out = [n for n in outputs if n != "logits" and n not in present_names]
    for name in extra_in:
        hint = _INPUT_HINTS.get(name, "twophase does not know what to feed it; re-export without it")
        problems.append(f"unexpected input {name} ({_describe(inputs[name])}) is not supported: {hint}")
    if extra_out:
        problems.append(f"unexpected output(s) {', '.join(extra_out)}: the contract has only logits and present.*")

    facts = _GraphFacts()
    if "logits" not in outputs:
        problems.append("missing output logits")
    elif _check_value(outputs["logits"], *_LOGITS, problems):
        facts.vocab_size = _static(outputs["logits"], 2)

    past_layers = _kv_layers(past_names, _PAST_RE)
    present_layers = _kv_layers(present_names, _PRESENT_RE)
    graph_layers = max([*past_layers, *present_layers], default=-1) + 1
    facts.num_layers = graph_layers
    num_layers = graph_layers or (declared.num_layers if declared and declared.num_layers else 0)
    problems += _missing_kv("past_key_values", past_layers, num_layers, "input")
    problems += _missing_kv("present", present_layers, num_layers, "output")

    def layer_order(name: str) -> tuple[int, str]:
        _, i, kv = name.rsplit(".", 2)
        return int(i), kv

    kv_values = [inputs[n] for n in sorted(past_names, key=layer_order)]
    kv_values += [outputs[n] for n in sorted(present_names, key=layer_order)]
    heads: dict[int, list[str]] = defaultdict(list)
    head_dims: dict[int, list[str]] = defaultdict(list)
    bad_dtypes: dict[str, list[str]] = defaultdict(list)  # one line per wrong dtype, not one per tensor
    for value in kv_values:
        if value.dtype != ir.DataType.FLOAT:
            bad_dtypes[_dtype_name(value.dtype)].append(value.name)
        dims = _PAST_DIMS if value.name in inputs else _PRESENT_DIMS
        if not _check_value(value, value.dtype, dims, problems):
            continue
        if value.name in inputs and (p := _static(value, 2)) is not None:
            problems.append(f"{value.name}: past length dimension is fixed at {p}; the KV cache must grow")
        if (h := _static(value, 1)) is not None:
            heads[h].append(value.name)
        if (d := _static(value, 3)) is not None:
            head_dims[d].append(value.name)
    for dtype, names in sorted(bad_dtypes.items()):
        which = f"all {len(names)} K/V tensors" if len(names) == len(kv_values) else ", ".join(names)
        problems.append(f"{which}: dtype {dtype}, expected float32 (export in fp32; twophase chooses each "
                        "phase's precision itself)")
    for what, groups in (("kv_heads (dim 1)", heads), ("head_dim (dim 3)", head_dims)):
        if len(groups) > 1:
            detail = "; ".join(f"{k} in {', '.join(v)}" for k, v in sorted(groups.items()))
            problems.append(f"K/V tensors disagree on {what}: {detail}")
    if len(heads) == 1:
        facts.num_kv_heads = next(iter(heads))
    if len(head_dims) == 1:
        facts.head_dim = next(iter(head_dims))
    facts.kv_evidence = kv_values[0].name if kv_values else ""
    return problems, facts


def _build_facts(
    graph: _GraphFacts, declared: list[_Declared], max_pos: int | None, path: Path
) -> tuple[ModelFacts | None, list[str]]:
    """Graph facts checked against every declared source, completed from the first one."""
    problems = []
    checks = (  # field, declared key for messages, graph value, where the graph says it
        ("num_layers", "num_hidden_layers", graph.num_layers or None, "the number of past_key_values layers"),
        ("num_kv_heads", "num_key_value_heads", graph.num_kv_heads, f"dim 1 of {graph.kv_evidence}"),
        ("head_dim", "head_dim", graph.head_dim, f"dim 3 of {graph.kv_evidence}"),
        ("vocab_size", "vocab_size", graph.vocab_size, "dim 2 of logits"),
    )
    first = declared[0] if declared else _Declared(source="")
    values: dict[str, Any] = {}
    for field, key, graph_value, where in checks:
        for d in declared:
            value = getattr(d, field)
            if graph_value is not None and value is not None and value != graph_value:
                problems.append(f"{d.source} says {key} = {value} but the graph has {graph_value} ({where})")
        values[field] = graph_value if graph_value is not None else getattr(first, field)
        if values[field] is None and graph.num_layers:
            problems.append(f"cannot determine {field}: {where} is symbolic and no config.json declares {key}")
    if max_pos is None:
        max_pos = next((d.max_position_embeddings for d in declared if d.max_position_embeddings), None)
    if max_pos is None:
        problems.append(f"max_position_embeddings is unknown: put the model's {CONFIG_FILE} beside {path.name} "
                        "(or pass config_dir= / max_position_embeddings=)")
    if problems:
        return None, problems
    if not declared:
        log.warning("%s: no %s found; facts come from the graph alone (no heads, rope or special tokens)",
                    path.name, CONFIG_FILE)
    return ModelFacts(
        architecture=first.architecture or "unknown",
        max_position_embeddings=int(max_pos),
        num_heads=first.num_heads,
        hidden_size=first.hidden_size,
        rope_theta=first.rope_theta,
        bos_token_id=first.bos_token_id,
        eos_token_ids=first.eos_token_ids,
        pad_token_id=first.pad_token_id,
        **values,
    ), []


def _unsupported_ops(model: ir.Model) -> list[str]:
    """Sorted `domain::op` of every node (subgraphs included) outside the allowed domains."""
    found = set()
    for graph in model.graphs():
        for node in graph:
            if node.domain not in ALLOWED_DOMAINS:
                found.add(f"{node.domain}::{node.op_type}")
    return sorted(found)


# --- opset ---------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _captured(logger_name: str) -> Iterator[_Records]:
    handler = _Records()
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _upgrade_opset(model: ir.Model, path: Path) -> None:
    """Convert a default-domain opset older than MIN_OPSET in place (weights stay where they are).

    onnxscript converts 18..20 itself on the IR; older opsets go through onnx's C++ converter with the
    large initializers held aside, so external data is neither read nor copied.
    """
    from onnxscript.version_converter import ConvertVersionPass

    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        raise UnsupportedModelError(f"{path}: the model imports no default-domain ONNX opset")
    if opset < MIN_OPSET:
        log.info("%s: converting opset %d to %d", path.name, opset, MIN_OPSET)
        reason = ""
        with _captured("onnxscript.version_converter") as records:
            try:
                ConvertVersionPass(target_version=MIN_OPSET, fallback=True)(model)
            except Exception as e:  # noqa: BLE001 — any converter failure becomes one clear error
                reason = f"{type(e).__name__}: {e}"
        reason = reason or next((str(r.exc_info[1]) for r in records.records if r.exc_info), "")
        if model.opset_imports.get("") != MIN_OPSET:
            raise UnsupportedModelError(
                f"{path}: could not convert opset {opset} to {MIN_OPSET}"
                f"{': ' + reason.strip() if reason else ''}; re-export the model at opset {MIN_OPSET} or newer"
            )
    model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)
