"""Atomic writes: nothing half-written is ever left where a user would read it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tropd_cli.errors import TropdError


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's file is owner-only; a finished one is not
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with `fill(temporary)` next to `target`, then swap it in place of `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(temporary)
        _permissions_as_umask_allows(temporary)
        if target.exists():
            retired = target.with_name(f".{target.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
            os.replace(temporary, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _permissions_as_umask_allows(folder: Path) -> None:
    """The permissions a plain mkdir/open would give: temporary folders and some writers' files (safetensors
    via a temporary file) are owner-only, and a finished run or export is read by other users too."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(path: Path, overwrite: bool) -> None:
    """An output folder must be a folder, and empty unless `overwrite`; else one line says why."""
    if path.exists() and not path.is_dir():
        raise TropdError(f"output folder {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise TropdError(f"output folder {path} is not empty; choose another --out or pass --overwrite")


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Create a writable, empty run folder or explain in one line why it cannot be used."""
    check_output_dir(path, overwrite)
    if path.is_dir() and any(path.iterdir()):
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TropdError(f"cannot write to output folder {path}: {error.strerror or error}") from None
