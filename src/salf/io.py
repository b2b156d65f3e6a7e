"""Files: every output salf writes appears complete or not at all.

    ensure_out_dir(path, "--out")     a folder to write into, or one clear SalfError
    atomic_write_text(path, text)     write beside, fsync, rename over
    atomic_write_json(path, obj)
    atomic_path(path)                 a temporary name renamed over path (fig.savefig)
    read_json(path, "trace")          parsed JSON, or one clear SalfError
    publish_dir(staging, final)       move a fully written folder into place
    disk_full_is_an_error(path)       a full disk while writing path: one SalfError naming it

A crash, Ctrl-C or a full disk leaves the previous version of a file (or none), never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from .errors import SalfError

# How a write that ran out of space fails: OSError with its errno; safetensors' errors carry
# the OS message but no errno; torch.save's stream writer reports neither, only that the
# stream broke ("basic_ios::clear", "unexpected pos N vs M", "file write failed").
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
_STREAM_BROKE = ("basic_ios::clear", "unexpected pos", "file write failed")


def _no_space(exc: Exception) -> str | None:
    """What to add to "no space left on device" for `exc` ("" when it says so plainly), or
    None if it is not a full disk."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return "" if exc.errno in _NO_SPACE_ERRNOS else None
    text = (str(exc).strip().splitlines() or [""])[-1]
    if any(s in text for s in _NO_SPACE_TEXT):
        return ""
    if isinstance(exc, RuntimeError) and any(s in text for s in _STREAM_BROKE):
        return f" (most likely: torch.save says only {text.strip(' .')!r})"
    return None


@contextlib.contextmanager
def disk_full_is_an_error(path: str | os.PathLike):
    """Run a block that writes `path`; if the disk fills up meanwhile, raise one SalfError
    naming `path` instead of the writer's own exception (any other error passes as it is)."""
    try:
        yield
    except SalfError:
        raise
    except Exception as exc:   # safetensors' and torch's errors have their own types; others re-raised
        note = _no_space(exc)
        if note is None:
            raise
        raise SalfError(f"cannot write {path}: no space left on device{note}; what was written "
                        "before is intact: free some space and run again") from None


def ensure_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create `path` (and its parents) as a folder, or raise one SalfError naming `flag`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SalfError(f"{flag} {path} is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SalfError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SalfError(f"{flag} {path}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK):
        raise SalfError(f"{flag} {path}: the folder is not writable")
    return path


def ensure_parent_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """The folder a file at `path` goes into, created (see ensure_out_dir); returns `path`."""
    path = Path(path)
    if path.is_dir():
        raise SalfError(f"{flag} {path} is a folder; give a file name")
    ensure_out_dir(path.parent if str(path.parent) else Path("."), flag)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` so that the file either appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_full_is_an_error(path), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary name beside `path`; once the block ends without error, it is
    renamed over `path` (for writers that want a file name, e.g. `fig.savefig`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with disk_full_is_an_error(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """`obj` as indented JSON (non-JSON values written with str), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file"):
    """Parse a JSON file; a missing, unreadable or malformed file is one SalfError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SalfError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise SalfError(f"{what} {path} is a folder, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SalfError(f"{what} {path}: cannot read ({exc.__class__.__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SalfError(f"{what} {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file of `folder` and the folder itself to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(os.path.join(root, name))
    _fsync_path(str(folder))


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written folder into place (rename; an old one is replaced)."""
    staging, final = str(staging), str(final)
    fsync_tree(staging)
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_path(os.path.dirname(os.path.abspath(final)))
    if old:
        shutil.rmtree(old, ignore_errors=True)
