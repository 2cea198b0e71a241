"""Raw records from where prompts live: local .jsonl/.json/.csv/.parquet files or folders, or a hub dataset.

Every record keeps where it came from (`file:line` for text files, `file row N` for Parquet, the hub
dataset's row), so that `normalise` can name the exact place of a bad value. Each source also gets a
fingerprint of its raw content (file bytes, or the hub rows), which the prepared folder's manifest keeps.
Reading is all in memory and writes nothing: a malformed line stops `prepare` before any output exists.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tropd_cli.errors import TropdError, first_line

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class RawRecord:
    """One record as read: its fields, the file (or dataset) it belongs to and where exactly."""

    values: dict[str, Any]
    source: str  # a file's name relative to --data (its own name for a single file) or the hub dataset id
    where: str  # how error messages locate it: `path:line`, `path row N`, `hub ID split S row N`
    row: int  # 1-based line (JSONL, CSV) or row (JSON list, Parquet, hub)


@dataclass
class SourceData:
    """The records of a source and what identifies it."""

    kind: str  # file, folder or hub
    label: str  # how messages name the source
    records: list[RawRecord]
    fingerprint: str  # sha256 of the raw content
    files: list[str] = field(default_factory=list)  # relative names of the files read (local sources)


def looks_local(data: str) -> bool:
    """True when `data` names a local path rather than a hub dataset id (`owner/name` is a hub id)."""
    return Path(data).exists() or data.startswith(("/", "./", "../", "~")) or data.endswith(SUFFIXES)


def read_source(data: str, split: str | None = None, subset: str | None = None) -> SourceData:
    """Records of a local file or folder, or of a hub dataset (split default: train)."""
    if not looks_local(data):
        return read_hub(data, split or "train", subset)
    path = Path(data).expanduser()
    if not path.exists():
        raise TropdError(f"data file or folder {data} does not exist")
    if split is not None or subset is not None:
        raise TropdError(f"--split and --subset choose part of a hub dataset; {data} is a local "
                         f"{'folder' if path.is_dir() else 'file'}")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise TropdError(f"folder {data} holds no {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]} files")
        names = [p.relative_to(path).as_posix() for p in files]
        kind = "folder"
    else:
        if path.suffix not in SUFFIXES:
            raise TropdError(f"{data}: unsupported file type '{path.suffix}'; use "
                             f"{', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]}")
        files, names, kind = [path], [path.name], "file"
    records: list[RawRecord] = []
    digest = hashlib.sha256()
    for file, name in zip(files, names):
        raw = file.read_bytes()
        digest.update(f"{name}\n{hashlib.sha256(raw).hexdigest()}\n".encode())
        display = str(path / name) if kind == "folder" else data
        records += [RawRecord(values, name, where, row) for values, where, row in read_file(file, raw, display)]
    return SourceData(kind, data, records, digest.hexdigest(), names)


def read_file(path: Path, raw: bytes, display: str) -> list[tuple[dict[str, Any], str, int]]:
    """(fields, where, row) for every record of one file; `display` is how messages name the file."""
    if path.suffix == ".parquet":
        return _read_parquet(raw, display)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TropdError(f"{display}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".csv":
        return _read_csv(text, display)
    if path.suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":
                raise TropdError(f"{display}:{error.lineno}: not valid JSON ({error.msg})") from None
            return _read_jsonl(text, display)  # JSON Lines saved with a .json name
        if not isinstance(document, list):
            raise TropdError(f"{display}: expected a JSON list of records, got {_kind(document)}")
        return [(_record(item, f"{display} record {row}"), f"{display} record {row}", row)
                for row, item in enumerate(document, start=1)]
    return _read_jsonl(text, display)


def _read_jsonl(text: str, display: str) -> list[tuple[dict[str, Any], str, int]]:
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # JSON Lines end at \n only
        if not line.strip():
            continue
        where = f"{display}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise TropdError(f"{where}: not valid JSON ({error.msg})") from None
        records.append((_record(item, where), where, number))
    return records


def _read_csv(text: str, display: str) -> list[tuple[dict[str, Any], str, int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for row in reader:
            where = f"{display}:{reader.line_num}"
            if None in row:
                raise TropdError(f"{where}: more values than the {len(reader.fieldnames or [])} columns of "
                                 f"the header")
            records.append((dict(row), where, reader.line_num))
    except csv.Error as error:
        raise TropdError(f"{display}:{reader.line_num}: not valid CSV ({error})") from None
    return records


def _read_parquet(raw: bytes, display: str) -> list[tuple[dict[str, Any], str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(pa.BufferReader(raw)).to_pylist()
    except (pa.ArrowException, OSError) as error:
        first = first_line(error)
        raise TropdError(f"{display}: not a readable Parquet file ({first})") from None
    return [(row, f"{display} row {number}", number) for number, row in enumerate(rows, start=1)]


def _record(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise TropdError(f"{where}: expected a JSON object, got {_kind(item)}")
    return item


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def read_hub(name: str, split: str, subset: str | None) -> SourceData:
    """Records of a hub dataset through `datasets.load_dataset`; its fingerprint hashes every row."""
    label = f"hub {name}" + (f" ({subset})" if subset else "") + f" split {split}"
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, subset, split=split)
    except Exception as error:  # datasets raises many types for offline, gated or missing data
        first = first_line(error)
        raise TropdError(f"cannot load {label}: {first}; pass a local file or folder with --data") from None
    digest = hashlib.sha256(f"{label}\n".encode())
    records = []
    for row, values in enumerate(dataset, start=1):
        values = dict(values)
        digest.update(json.dumps(values, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
        records.append(RawRecord(values, name, f"{label} row {row}", row))
    return SourceData("hub", label, records, digest.hexdigest())
