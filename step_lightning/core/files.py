"""Small shared helpers: atomic file writes, telling a full disk from other errors, JSON-friendly conversion."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

# What atomic_write's mkstemp names look like: .<name>.<8 random characters>.tmp
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file in the same folder, fsync, then rename over ``path``, so a
    crash never leaves half a file. The file gets the permissions a plain ``open`` would give it (an existing
    one keeps its own). A full disk is raised as OSError(ENOSPC) naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp creates 0600: others sharing the results could not read them
            os.fchmod(fd, file_mode(path))
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, Exception) and disk_full(error):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise
    return path


def file_mode(path: Path) -> int:
    """``path``'s permission bits if it exists, else those ``open`` gives a new file (0666 less the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        pass
    try:  # Linux: the umask without changing it
        status = Path("/proc/self/status").read_text()
        umask = int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        umask = os.umask(0)  # elsewhere: read by setting it, then restore it at once
        os.umask(umask)
    return 0o666 & ~umask


def disk_full(error: BaseException) -> OSError | None:
    """The no-space-left error behind ``error``: itself, or the one it was raised from or while handling
    (torch's zip writer turns a failed write into ``RuntimeError: [enforce fail at inline_container.cc]``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        if "no space left on device" in str(error).lower():
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        error = error.__cause__ or error.__context__
    return None


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-way (SIGKILL, power loss) left under ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.rglob(".*.tmp") if p.is_file() and TEMPORARY.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def to_jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None  # NaN is not valid JSON
    return value


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, allow_nan=False))
