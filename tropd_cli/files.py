"""Writing files safely: atomic writes, folders tropd owns, and one writer per folder.

Every folder tropd writes carries a marker (`.tropd.json`: tool, version, command, creation time). Only a
marked folder is ever replaced (`--overwrite`), never the working directory, one of its parents, the home
folder or the filesystem root, and only once the new content is complete: it is built under a temporary
name beside the target, swapped in, and only then is the old one removed. A writer holds an exclusive OS
lock (`.tropd.lock`, the `filelock` library) for its whole life and records who it is in `.tropd.lock.json`;
the kernel drops the lock when the process dies, so a killed writer never blocks the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tropd_cli import __version__
from tropd_cli.errors import TropdError, WriteError, first_line

MARKER = ".tropd.json"
LOCK = ".tropd.lock"
LOCK_INFO = ".tropd.lock.json"
OWN_FILES = (MARKER, LOCK, LOCK_INFO)


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
        _swap_in(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    """Put folder `new` at `target`: the old target is renamed aside first and removed only afterwards."""
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(retired, target)
            raise
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(new, target)


def sha256_of(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn any failure to write `what` into one WriteError line: OSError (full disk, EFBIG under a file-size
    limit, permissions), and the RuntimeError / SafetensorError that torch.save and safetensors raise instead."""
    from safetensors import SafetensorError

    try:
        yield
    except WriteError as error:  # the outer, more meaningful name wins
        raise WriteError(what, error.reason) from None
    except OSError as error:
        raise WriteError(what, error.strerror or first_line(error)) from None
    except (RuntimeError, SafetensorError) as error:
        raise WriteError(what, f"{_write_reason(error)} (is the disk full or a file-size limit set?)") from None


def _write_reason(error: BaseException) -> str:
    text = first_line(error)
    return text.split("] ", 1)[-1].strip(" .") if text.startswith("[enforce fail") else text


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


# ---- folders tropd owns ---------------------------------------------------------------------------------------


def write_marker(folder: Path, command: str) -> None:
    """Mark `folder` as written by tropd (`command` is e.g. "distill" or "export")."""
    atomic_write_json(folder / MARKER, {"tool": "tropd", "version": __version__, "command": command,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def is_tropd_folder(folder: Path) -> bool:
    """Whether `folder` carries tropd's marker."""
    try:
        return json.loads((folder / MARKER).read_text()).get("tool") == "tropd"
    except (OSError, ValueError, AttributeError):
        return False


def protected_reason(path: Path) -> str | None:
    """Why `path` may never be an output folder (the working directory, a parent of it, home, root), or None."""
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor):
        return "the filesystem root"
    if target == Path.home().resolve():
        return "your home folder"
    if target == cwd:
        return "the working directory"
    if target in cwd.parents:
        return "a parent of the working directory"
    return None


def check_output_path(path: Path) -> None:
    """An output path must not be a file, nor the working directory or a folder above it."""
    if path.exists() and not path.is_dir():
        raise TropdError(f"output folder {path} exists and is not a folder")
    reason = protected_reason(path)
    if reason is not None:
        raise TropdError(f"refusing to write into {path}: it is {reason}; choose a new folder for --out")


def has_content(path: Path) -> bool:
    """Whether a folder holds anything besides an unused lock of ours."""
    return path.is_dir() and any(entry.name not in (LOCK, LOCK_INFO) for entry in path.iterdir())


def check_output_dir(path: Path, overwrite: bool) -> None:
    """An output folder must be empty, or with `overwrite` a folder tropd wrote; else one line says why."""
    check_output_path(path)
    if not has_content(path):
        return
    if not overwrite:
        raise TropdError(f"output folder {path} is not empty; choose another --out or pass --overwrite")
    if not is_tropd_folder(path):
        raise TropdError(f"--overwrite replaces only a folder tropd wrote (with {MARKER}); {path} is not one and "
                         f"was left untouched; choose another --out")


class FolderLock:
    """An exclusive lock on one folder for one writer; a second writer fails at once naming the holder."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder = folder
        self.command = command
        self.lock = FileLock(str(folder / LOCK), timeout=0)

    def acquire(self) -> FolderLock:
        try:
            self.lock.acquire()
        except Timeout:
            raise TropdError(f"{self.folder} is in use by another tropd process ({holder(self.folder)}); wait for "
                             f"it to end or stop it") from None
        except OSError as error:
            raise TropdError(f"cannot write to {self.folder}: {error.strerror or first_line(error)}") from None
        atomic_write_json(self.folder / LOCK_INFO, {"pid": os.getpid(), "host": socket.gethostname(),
                                                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "command": self.command})
        return self

    def release(self) -> None:
        if self.lock.is_locked:
            info = _read_info(self.folder)
            if info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
                (self.folder / LOCK_INFO).unlink(missing_ok=True)
            self.lock.release()


def holder(folder: Path) -> str:
    """Who holds `folder`'s lock, from its info file: pid, host, command and start time."""
    info = _read_info(folder)
    if not info:
        return "it has not recorded its pid yet"
    text = f"pid {info.get('pid')} on {info.get('host')}, `tropd {info.get('command')}` since {info.get('started')}"
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
        return f"the info file names pid {info['pid']}, which is no longer running: {text}"
    return text


def _read_info(folder: Path) -> dict:
    try:
        info = json.loads((folder / LOCK_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnedFolder:
    """One command's output folder: checked, locked for the command's life, marked, and replaced only whole.

    `claim` checks the target (and locks it when it is a tropd folder being overwritten), then either
    `create_in_place` (an empty or new folder, written where it is) or `begin_replacement` /
    `commit_replacement` (a temporary sibling, swapped in once complete) or `replace(fill)` (both at once).
    """

    def __init__(self, target: Path, command: str) -> None:
        self.target = Path(target)
        self.command = command
        self.locks: list[FolderLock] = []
        self.replacement: Path | None = None

    def __enter__(self) -> OwnedFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()

    @property
    def needs_replacement(self) -> bool:
        """Whether the target holds content that a new result must replace (whole, at the end)."""
        return has_content(self.target)

    def claim(self, overwrite: bool) -> None:
        """Check the target; lock an existing tropd folder so no other writer uses it meanwhile."""
        check_output_dir(self.target, overwrite)
        if self.needs_replacement:
            self._lock(self.target)
        else:
            _check_writable(self.target)

    def lock_in_place(self) -> None:
        """Lock an existing folder (a run to resume, prepared prompts to extend) and mark it as ours."""
        self._lock(self.target)
        if not is_tropd_folder(self.target):
            with writing(str(self.target / MARKER)):
                write_marker(self.target, self.command)

    def create_in_place(self) -> None:
        """Create (or take the empty) target, lock and mark it; the result is written where it is."""
        try:
            self.target.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TropdError(f"cannot write to output folder {self.target}: {error.strerror or error}") from None
        self._lock(self.target)
        if has_content(self.target):  # another writer filled it between the check and the lock
            raise TropdError(f"output folder {self.target} is not empty; choose another --out or pass --overwrite")
        with writing(f"output folder {self.target}"):
            write_marker(self.target, self.command)

    def begin_replacement(self) -> Path:
        """A new, marked and locked temporary folder beside the target, for the new result."""
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.replacement = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.new-", dir=parent))
        except OSError as error:
            raise TropdError(f"cannot write to output folder {self.target}: {error.strerror or error}") from None
        self._lock(self.replacement)
        with writing(f"output folder {self.replacement}"):
            write_marker(self.replacement, self.command)
        return self.replacement

    def commit_replacement(self) -> None:
        """Swap the complete replacement in; the old target is removed only after the swap."""
        assert self.replacement is not None
        _permissions_as_umask_allows(self.replacement)
        target_locked = any(lock.folder == self.target for lock in self.locks)
        if not target_locked and has_content(self.target):
            raise TropdError(f"{self.target} was filled by another process meanwhile; the new result is in "
                             f"{self.replacement}")
        with writing(f"output folder {self.target}"):
            _swap_in(self.replacement, self.target)
        for lock in self.locks:  # its lock file moved with it and stays held
            if lock.folder == self.replacement:
                lock.folder = self.target
        self.replacement = None

    def abandon_replacement(self) -> None:
        if self.replacement is not None:
            shutil.rmtree(self.replacement, ignore_errors=True)
            self.replacement = None

    def replace(self, fill: Callable[[Path], None]) -> None:
        """Write the whole result with `fill(folder)` into a temporary folder, then swap it in."""
        folder = self.begin_replacement()
        try:
            fill(folder)
            self.commit_replacement()
        except BaseException:
            self.abandon_replacement()
            raise

    def _lock(self, folder: Path) -> None:
        self.locks.append(FolderLock(folder, self.command).acquire())


def _check_writable(path: Path) -> None:
    """A folder that does not exist yet must be creatable: its nearest existing ancestor a writable folder."""
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TropdError(f"cannot write to output folder {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TropdError(f"cannot write to output folder {path}: Permission denied")
