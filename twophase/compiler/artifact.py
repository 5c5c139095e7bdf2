"""The artifact writer: a directory built in a temporary sibling and renamed into place.

A failed compile leaves nothing behind; a successful one leaves a directory whose manifest.json
records the sha256 of every other file (see manifest.py for the schema).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from twophase.compiler.errors import ArtifactError
from twophase.compiler.manifest import MANIFEST_FILE
from twophase.runtime.artifact import sha256_file


def hash_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` except the manifest, keyed by relative POSIX path."""
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


@contextlib.contextmanager
def staging_dir(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `out_dir` when the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ArtifactError(f"{out_dir} already exists; choose another output directory or pass --force")
    if out_dir.exists() and not (out_dir / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{out_dir} exists and is not a twophase artifact; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the artifact is an ordinary directory
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old / "artifact")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
