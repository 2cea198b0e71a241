"""An evaluation's journal: every generated chunk of responses, kept beside the report folder while the
evaluation runs, so that an interrupted `tropd evaluate` continues where it stopped.

The journal is the hidden folder `.OUT.partial` next to `--out`: `progress.json` holds the protocol it was
made under (models, benchmarks and their problem fingerprints, sampling, seed, dtype, backend) and
`samples.jsonl` one line per finished chunk (model, benchmark, pass, chunk index, its texts, finished flags and
response tokens), appended and flushed to disk as each chunk ends. Chunks are seeded by their index, so a chunk
generated again equals the one that was lost, and a continued evaluation equals an uninterrupted one. The
journal is made with the first finished chunk and goes when the report is written; one made under another
protocol is replaced, with a line that says so.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tropd_cli.files import atomic_write_json, writing

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


class Journal:
    """The chunks already generated under `protocol`, and where new ones are appended."""

    def __init__(self, out: Path, protocol: dict, console: Console) -> None:
        self.folder = journal_folder(out)
        self.chunks: dict[ChunkKey, Chunk] = {}
        progress = self.folder / "progress.json"
        if progress.is_file():
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
                console.print(f"an interrupted evaluation with other settings was in {self.folder}; starting over",
                              highlight=False, soft_wrap=True)
                shutil.rmtree(self.folder, ignore_errors=True)
        self.protocol = protocol

    def get(self, key: ChunkKey) -> Chunk | None:
        return self.chunks.get(key)

    def add(self, key: ChunkKey, chunk: Chunk) -> None:
        """Append one chunk, on disk before this returns."""
        line = json.dumps({"model": key[0], "benchmark": key[1], "pass": key[2], "chunk": key[3],
                           "texts": chunk.texts, "finished": chunk.finished, "tokens": chunk.tokens})
        with writing(f"the evaluation's journal in {self.folder}"):
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
    """The chunks of a journal file; a last line cut short by the interruption is dropped."""
    chunks: dict[ChunkKey, Chunk] = {}
    if not path.is_file():
        return chunks
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            chunks[(row["model"], row["benchmark"], row["pass"], row["chunk"])] = Chunk(
                row["texts"], row["finished"], row["tokens"])
        except (ValueError, KeyError, TypeError):
            continue
    return chunks
