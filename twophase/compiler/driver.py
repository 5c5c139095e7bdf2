"""compile_model: source -> canonical graph -> per-phase pipelines -> lowered artifact directory."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from twophase.compiler.artifact import hash_files, staging_dir, write_json
from twophase.compiler.errors import UnsupportedModelError
from twophase.compiler.manifest import MANIFEST_FILE, Manifest, PhaseEntry
from twophase.compiler.options import Backend, CompileOptions, KVBinding, KVDtype, Phase

log = logging.getLogger(__name__)

TOOL_PACKAGES = ("twophase", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "torch", "transformers", "gguf",
                 "apache-tvm", "apache-tvm-ffi")

# progress(step_name) is called as each step starts; the CLI turns it into a progress bar.
Progress = Callable[[str], None]


def tool_versions() -> dict[str, str]:
    versions = {}
    for pkg in TOOL_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def compile_model(
    source,
    out_dir: str | Path,
    options: CompileOptions,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Compile `source` (zoo name, HF dir, .gguf, .onnx, or a CanonicalModel) into `out_dir`."""
    from twophase.compiler.lower_ort import write_phase_graphs
    from twophase.compiler.pipeline import Calibration, run_phase_pipeline, target_name
    from twophase.models.sources import CanonicalModel, load_canonical

    step = progress or (lambda name: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        # fail before the (possibly minutes-long) export, not after
        from twophase.compiler.errors import ArtifactError

        raise ArtifactError(f"{out_dir} already exists; choose another output directory or pass --force")
    target = None
    if options.backend is Backend.TVM:
        from twophase.compiler.lower_tvm import host_target, prefetch_entry

        target = host_target(options.device.value)  # fails early when TVM is missing
        target |= prefetch_entry(target["tvm_target"])

    t0 = time.perf_counter()
    step("load / export canonical graph")
    canonical = source if isinstance(source, CanonicalModel) else load_canonical(str(source))
    facts = canonical.facts
    max_len = options.max_len or facts.max_position_embeddings
    if max_len > facts.max_position_embeddings:
        raise UnsupportedModelError(
            f"max_len {max_len} exceeds the model's max_position_embeddings {facts.max_position_embeddings}"
        )

    options = dataclasses.replace(options, max_len=max_len, kv_binding=resolve_kv_binding(canonical.model, options))
    phase_models = {}
    records = []
    calibration = Calibration(canonical.model, canonical.tokenizer_json, options)
    for phase in Phase:
        step(f"{phase.value} pipeline ({target_name(options)})")
        model, recs = run_phase_pipeline(canonical.model, phase, options, calibration)
        phase_models[phase.value] = model
        records += recs

    with staging_dir(out_dir, overwrite=overwrite) as tmp:
        step("write graphs and weights")
        if target is not None:
            from twophase.compiler.lower_tvm import lower_phases

            lowered, wstats = lower_phases(phase_models, tmp, target)
        else:
            lowered, wstats = write_phase_graphs(phase_models, tmp)
        tokenizer_entry = None
        if canonical.tokenizer_json is not None:
            shutil.copyfile(canonical.tokenizer_json, tmp / "tokenizer.json")
            tokenizer_entry = {"file": "tokenizer.json", "chat_template_file": None, "special_tokens": canonical.special_tokens}
            if canonical.chat_template:
                (tmp / "chat_template.jinja").write_text(canonical.chat_template)
                tokenizer_entry["chat_template_file"] = "chat_template.jinja"
        generation = {
            "bos_token_id": facts.bos_token_id,
            "eos_token_ids": list(facts.eos_token_ids),
            "pad_token_id": facts.pad_token_id,
        }
        write_json(tmp / "generation_config.json", generation)
        write_json(
            tmp / "report.json",
            {
                "target": target_name(options),
                "passes": [r.to_dict() for r in records],
                "weights": dataclasses.asdict(wstats),
                "calibration_seconds": round(calibration.seconds, 2),
                "compile_seconds": round(time.perf_counter() - t0, 2),
                **({"tvm_build_seconds": {n: lp.compile_seconds for n, lp in lowered.items()}} if target else {}),
            },
        )
        phases = {
            name: PhaseEntry(
                graph=lp.library if target else lp.graph_file,
                backend=options.backend.value,
                scheme=options.phase(Phase(name)).scheme.value,
                inputs=lp.inputs,
                outputs=lp.outputs,
                params=lp.params if target else None,
                target=target,
            )
            for name, lp in lowered.items()
        }
        manifest = Manifest(
            model=facts,
            phases=phases,
            kv_cache=kv_cache_entry(options, facts.dtype),
            tokenizer=tokenizer_entry,
            generation=generation,
            compile_options=options.to_dict(),
            source=canonical.source,
            versions=tool_versions(),
            files=hash_files(tmp),
        )
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    log.info("compiled %s into %s in %.1fs", canonical.source.get("name"), out_dir, time.perf_counter() - t0)
    return out_dir


def resolve_kv_binding(canonical, options: CompileOptions) -> KVBinding:
    """AUTO -> BOUND when BindKVCachePass matches every layer of the canonical graph, else GROW (logged).

    An explicit BOUND that cannot be honored, or an int8 cache without a bound binding, is an error.
    """
    from twophase.passes.bind_kv_cache import BindKVCacheError, match_layers

    if options.kv_binding is KVBinding.GROW:
        if options.kv_dtype is not KVDtype.FLOAT32:
            raise UnsupportedModelError("an int8 KV cache needs the bound binding (--kv-cache bound)")
        return KVBinding.GROW
    try:
        match_layers(canonical.graph)
    except BindKVCacheError as e:
        if options.kv_binding is KVBinding.BOUND or options.kv_dtype is not KVDtype.FLOAT32:
            raise UnsupportedModelError(f"cannot bind the KV cache of this model: {e}") from e
        log.warning("KV cache: using the 'grow' binding (%s)", e)
        return KVBinding.GROW
    return KVBinding.BOUND


def kv_cache_entry(options: CompileOptions, dtype: str) -> dict:
    """The manifest's kv_cache section."""
    entry = {"layout": "BHTD", "binding": options.kv_binding.value, "max_len": options.max_len}
    if options.kv_binding is KVBinding.BOUND:
        entry["dtype"] = options.kv_dtype.value
        entry["prefill_chunk"] = options.prefill_chunk
    else:
        entry["dtype"] = dtype
    return entry
