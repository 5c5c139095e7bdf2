"""Load and verify a compiled artifact directory's manifest.

`load_manifest(path)` checks, before anything is run:
  - the directory and its manifest.json exist, and the manifest parses (format_version, required fields);
  - the runtime-facing sections are well formed (kv_cache, generation, tokenizer);
  - every file a phase or the tokenizer references is listed in `files`;
  - every listed file exists inside the directory and (unless verify=False) its sha256 matches.
Every failure is an ArtifactError that names the file or field at fault and says what to do.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path, PurePosixPath
from typing import Any

from twophase.compiler.errors import ArtifactError
from twophase.compiler.manifest import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20  # bytes per read: hashing then runs at sha256 speed (~350 MB/s on this CPU), not I/O-call bound

KV_LAYOUTS = ("BHTD",)
KV_BINDINGS = ("grow", "bound")
KV_DTYPES = ("float32", "float16", "int8")


def sha256_file(path: str | Path, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file, read in `chunk`-byte pieces into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def load_manifest(path: str | Path, *, verify: bool = True) -> Manifest:
    """Read `path/manifest.json` and check the directory against it (hashes only when `verify`)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {str(root)!r} does not exist (or is not a directory)")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{str(manifest_path)!r} is missing: {str(root)!r} is not a compiled artifact "
            "(compile one with `twophase compile`)"
        )
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{str(manifest_path)!r} cannot be read ({e}); recompile the artifact") from e
    where = str(manifest_path)
    try:
        manifest = Manifest.from_json(text, where=where)
    except (TypeError, AttributeError, ValueError) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(f"{where}: malformed manifest ({e!r}); recompile the artifact") from e
    check_sections(manifest, where)
    check_files(root, manifest, verify=verify, where=where)
    return manifest


def check_sections(manifest: Manifest, where: str = MANIFEST_FILE) -> None:
    """The runtime-facing sections (files, kv_cache, generation, tokenizer, phase graphs) are well formed."""
    if not isinstance(manifest.files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in manifest.files.items()
    ):
        raise ArtifactError(f"{where}: field 'files' must map relative paths to sha256 hex strings")

    kv = manifest.kv_cache
    if not isinstance(kv, dict):
        raise ArtifactError(f"{where}: field 'kv_cache' must be an object")
    for key, allowed in (("layout", KV_LAYOUTS), ("binding", KV_BINDINGS), ("dtype", KV_DTYPES)):
        if key not in kv:
            raise ArtifactError(f"{where}: field 'kv_cache.{key}' is missing; recompile the artifact")
        if kv[key] not in allowed:
            raise ArtifactError(
                f"{where}: kv_cache.{key} {kv[key]!r} is not supported by this runtime (supports {list(allowed)}); "
                "recompile the artifact or upgrade twophase"
            )
    for key in ("max_len", "prefill_chunk"):
        value = kv.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ArtifactError(f"{where}: field 'kv_cache.{key}' must be a positive integer, got {value!r}")
    if kv["binding"] == "bound" and not kv.get("max_len"):
        raise ArtifactError(f"{where}: a bound kv_cache needs 'kv_cache.max_len'; recompile the artifact")

    gen = manifest.generation
    if not isinstance(gen, dict):
        raise ArtifactError(f"{where}: field 'generation' must be an object")
    eos = gen.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(isinstance(t, int) for t in eos):
        raise ArtifactError(f"{where}: field 'generation.eos_token_ids' must be a list of integers, got {eos!r}")

    for name, entry in manifest.phases.items():
        if entry.graph not in manifest.files:
            raise ArtifactError(
                f"{where}: phases.{name}.graph {entry.graph!r} is not listed in 'files' "
                "(so it cannot be verified); recompile the artifact"
            )

    tok = manifest.tokenizer
    if tok is not None:
        if not isinstance(tok, dict) or not isinstance(tok.get("file"), str):
            raise ArtifactError(f"{where}: field 'tokenizer.file' is missing (tokenizer must be an object or null)")
        for key in ("file", "chat_template_file"):
            name = tok.get(key)
            if name is not None and name not in manifest.files:
                raise ArtifactError(
                    f"{where}: tokenizer.{key} {name!r} is not listed in 'files'; recompile the artifact"
                )


def check_files(root: Path, manifest: Manifest, *, verify: bool = True, where: str = MANIFEST_FILE) -> None:
    """Every file listed in the manifest exists under `root`; with `verify`, its sha256 matches."""
    missing = []
    for rel in manifest.files:
        p = resolve(root, rel, where)
        if not p.is_file():
            missing.append(rel)
    if missing:
        raise ArtifactError(
            f"{str(root)!r}: file(s) {missing} listed in the manifest are missing; the artifact is incomplete, recompile"
        )
    if not verify:
        return
    t0 = time.perf_counter()
    nbytes = 0
    for rel, expected in manifest.files.items():
        p = resolve(root, rel, where)
        nbytes += p.stat().st_size
        actual = sha256_file(p)
        if actual != expected.lower():
            raise ArtifactError(
                f"{str(p)!r}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}…: "
                "tampered or corrupt, recompile"
            )
    log.debug("verified %d files (%.1f MB) in %.2f s", len(manifest.files), nbytes / 1e6, time.perf_counter() - t0)


def resolve(root: Path, rel: str, where: str = MANIFEST_FILE) -> Path:
    """`root / rel`, refusing paths that would leave the artifact directory."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.strip() == "" or "\\" in rel:
        raise ArtifactError(f"{where}: file entry {rel!r} is not a plain path inside the artifact; recompile")
    return root.joinpath(*pure.parts)


def tokenizer_paths(root: str | Path, manifest: Manifest) -> tuple[Path, Path | None] | None:
    """(tokenizer.json, chat template or None) of an artifact, or None when it ships no tokenizer."""
    tok: dict[str, Any] | None = manifest.tokenizer
    if tok is None:
        return None
    root = Path(root)
    template = tok.get("chat_template_file")
    return resolve(root, tok["file"]), (resolve(root, template) if template else None)


def max_context(manifest: Manifest) -> int:
    """Longest sequence (prompt + generated) the artifact accepts."""
    limit = manifest.model.max_position_embeddings
    max_len = manifest.kv_cache.get("max_len")
    return min(limit, max_len) if max_len else limit
