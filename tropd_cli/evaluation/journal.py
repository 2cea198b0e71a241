"""An evaluation's journal: every generated chunk of responses, kept beside the report folder while the
evaluation runs, so that an interrupted `tropd evaluate` continues where it stopped.

The journal is the hidden folder `.OUT.partial` next to `--out`: `progress.json` holds the protocol it was
made under (models, benchmarks and their problem fingerprints, sampling, seed, dtype, backend) and
`samples.jsonl` one line per finished chunk (model, benchmark, pass, chunk index, its texts, finished flags and
response tokens), appended and flushed to disk as each chunk ends. Chunks are seeded by their index, so a chunk
generated again equals the one that was lost, and a continued evaluation gives the answers and metrics of an
uninterrupted one (on a CPU; a GPU's kernels need not repeat bit for bit). The protocol names each model by its
files (names, sizes and modification times), so a model folder retrained in place is not mistaken for the old one.
The journal is made with the first finished chunk and goes when the report is written; one made under another
protocol is replaced when the first new chunk is done, with a line that says so (`--overwrite` concerns the report
folder, not the journal: the same command, run again, continues). The journal folder is locked for the evaluation's
life (`journal_lock`), so a second evaluation writing the same `--out` meanwhile stops at once, naming the first,
instead of appending its chunks to the same file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tropd_cli.files import FolderLock, atomic_write_json, writing

ChunkKey = tuple[str, str, str, int]  # model label, benchmark, pass, chunk index


@dataclass
class Chunk:
    """One generate call's decoded responses, prompt-major."""

    texts: list[str]
    finished: list[bool]
    tokens: int


def journal_folder(out: Path) -> Path:
    """Where the evaluation writing `out` keeps its journal."""
    return out.parent / f".{out.name}.partial"


@contextmanager
def journal_lock(out: Path) -> Iterator[None]:
    """Hold the journal folder of the evaluation writing `out` for this process (another evaluation of the same
    `--out` stops at once, naming this one); a folder left with no chunk in it is removed on the way out."""
    folder = journal_folder(out)
    with writing(f"the evaluation's journal in {folder}"):
        folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder, "evaluate").acquire()
    try:
        yield
    finally:
        lock.release()
        if folder.is_dir() and not (folder / "samples.jsonl").is_file():
            shutil.rmtree(folder, ignore_errors=True)


class Journal:
    """The chunks already generated under `protocol`, and where new ones are appended."""

    def __init__(self, out: Path, protocol: dict, console: Console) -> None:
        self.folder = journal_folder(out)
        self.protocol = protocol
        self.chunks: dict[ChunkKey, Chunk] = {}
        self.stale = False  # a journal of other settings: replaced when the first new chunk is done
        progress = self.folder / "progress.json"
        if not progress.is_file():
            return
        try:
            same = json.loads(progress.read_text()) == protocol
        except (OSError, ValueError):
            same = False
        if same:
            self.chunks = _read_chunks(self.folder / "samples.jsonl")
            if self.chunks:
                console.print(f"continuing an interrupted evaluation: {len(self.chunks)} chunks of responses "
                              f"already generated (kept in {self.folder})", highlight=False, soft_wrap=True)
        else:
            self.stale = True
            console.print(f"an interrupted evaluation with other settings was in {self.folder}; starting over (it "
                          "is replaced when the first new responses are done)", highlight=False, soft_wrap=True)

    def get(self, key: ChunkKey) -> Chunk | None:
        return self.chunks.get(key)

    def add(self, key: ChunkKey, chunk: Chunk) -> None:
        """Append one chunk, on disk before this returns."""
        line = json.dumps({"model": key[0], "benchmark": key[1], "pass": key[2], "chunk": key[3],
                           "texts": chunk.texts, "finished": chunk.finished, "tokens": chunk.tokens})
        with writing(f"the evaluation's journal in {self.folder}"):
            if self.stale:  # the old journal goes only once something replaces it (its lock stays held)
                for name in ("samples.jsonl", "progress.json"):
                    (self.folder / name).unlink(missing_ok=True)
                self.stale = False
            if not (self.folder / "progress.json").is_file():  # made with the first chunk: nothing before it
                self.folder.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.folder / "progress.json", self.protocol)
            with open(self.folder / "samples.jsonl", "a") as out:
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
        self.chunks[key] = chunk

    def remove(self) -> None:
        """The report is written: the journal is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_chunks(path: Path) -> dict[ChunkKey, Chunk]:
    """The chunks of a journal file; a last line cut short by the interruption is dropped, from the file too, so
    that the next chunk starts a line of its own."""
    chunks: dict[ChunkKey, Chunk] = {}
    if not path.is_file():
        return chunks
    text = path.read_text()
    if text and not text.endswith("\n"):
        with writing(f"the evaluation's journal {path}"), open(path, "r+") as journal:
            journal.truncate(text.rfind("\n") + 1)
        text = text[:text.rfind("\n") + 1]
    for line in text.splitlines():
        try:
            row = json.loads(line)
            chunks[(row["model"], row["benchmark"], row["pass"], row["chunk"])] = Chunk(
                row["texts"], row["finished"], row["tokens"])
        except (ValueError, KeyError, TypeError):
            continue
    return chunks
