"""Summaries of a compiled artifact for `twophase inspect`: phases, op histograms, weight bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from twophase.compiler.errors import ArtifactError
from twophase.compiler.manifest import MANIFEST_FILE, Manifest


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _tvm_phase_summary(directory: Path, entry) -> tuple[Counter, dict[str, int]]:
    """(parameter count by kernel kind, weight bytes by dtype) of a TVM phase, from its parameter index."""
    from twophase.bench.model_bytes import read_by_row

    path = directory / (entry.params or "")
    try:
        params = json.loads(path.read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: cannot read the TVM parameter index ({e})") from e
    kinds: Counter = Counter("table read by row" if read_by_row(p) else "matmul/other" for p in params)
    weights: dict[str, int] = {}
    for p in params:
        weights[p["dtype"]] = weights.get(p["dtype"], 0) + int(p["length"])
    return kinds, weights


def inspect_artifact(directory: str | Path) -> dict[str, Any]:
    """A JSON-able summary of the artifact, with a human-readable rendering under "text"."""
    import onnx

    from twophase.compiler.graph_diff import initializer_bytes_by_dtype, op_histogram

    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST_FILE}: not a twophase artifact")
    manifest = Manifest.from_json(manifest_path.read_text(), where=str(manifest_path))
    f = manifest.model
    info: dict[str, Any] = {"model": f.to_dict(), "source": manifest.source, "kv_cache": manifest.kv_cache, "phases": {}}
    lines = [
        f"artifact   {directory}",
        f"source     {manifest.source.get('name')} ({manifest.source.get('kind')})",
        f"model      {f.architecture}: {f.num_layers} layers, heads {f.num_heads}/{f.num_kv_heads} kv, "
        f"head_dim {f.head_dim}, vocab {f.vocab_size}, context {f.max_position_embeddings}",
        f"kv cache   {manifest.kv_cache}",
    ]
    for name, entry in manifest.phases.items():
        path = directory / entry.graph
        if not path.is_file():
            raise ArtifactError(f"{path} (phase {name}) is missing")
        if entry.backend == "tvm":
            ops, weights = _tvm_phase_summary(directory, entry)
        else:
            proto = onnx.load(str(path), load_external_data=False)
            ops = op_histogram(proto)
            weights = initializer_bytes_by_dtype(proto)
        info["phases"][name] = {
            "graph": entry.graph,
            "backend": entry.backend,
            "scheme": entry.scheme,
            "inputs": [t.to_dict() for t in entry.inputs],
            "outputs": [t.to_dict() for t in entry.outputs],
            "ops": dict(ops.most_common()),
            "weight_bytes_by_dtype": weights,
        }
        lines.append(f"\n[{name}] {entry.graph}  backend={entry.backend}  scheme={entry.scheme}")
        io = entry.inputs[:3] + ((entry.inputs[3],) if len(entry.inputs) > 3 else ())
        for t in io:
            lines.append(f"  in   {t.name:28s} {t.dtype:8s} {_fmt_shape(t.shape)}")
        if len(entry.inputs) > 4:
            lines.append(f"  in   ... {len(entry.inputs) - 4} more past_key_values")
        for t in entry.outputs[:2]:
            lines.append(f"  out  {t.name:28s} {t.dtype:8s} {_fmt_shape(t.shape)}")
        if len(entry.outputs) > 2:
            lines.append(f"  out  ... {len(entry.outputs) - 2} more present")
        if entry.backend == "tvm":
            target = (entry.target or {}).get("tvm_target", {})
            lines.append(f"  TVM library for {target.get('kind')} {target.get('mcpu', '')}; weight parameters: "
                         + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
            if "prefetch_bytes" in (entry.target or {}):
                distance, speedup = entry.target["prefetch_bytes"], entry.target.get("prefetch_speedup")
                how = f"the probe measured {speedup:.2f}x" if speedup is not None else "set by TWOPHASE_TVM_PREFETCH"
                lines.append(f"  software prefetch: {f'{distance} B ahead' if distance else 'none'} ({how})")
        else:
            lines.append(f"  nodes {sum(ops.values())}: " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
        lines.append("  weights: " + ", ".join(f"{dt} {b / 1e6:.1f} MB" for dt, b in sorted(weights.items())))
    report = directory / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        info["report"] = {"compile_seconds": r.get("compile_seconds"), "weights": r.get("weights")}
        w = r.get("weights", {})
        lines.append(
            f"\nweights.bin: {w.get('bytes_written', 0) / 1e6:.1f} MB written once, "
            f"{w.get('bytes_shared', 0) / 1e6:.1f} MB of references shared between phases; "
            f"compiled in {r.get('compile_seconds')} s"
        )
    info["text"] = "\n".join(lines)
    return info
