"""Row writers with deterministic bytes: JSON Lines (sorted keys, UTF-8, optionally gzip
without a name or time in its header) and Parquet (an explicit schema, fixed row groups).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 20_000
HASH_CHUNK = 1 << 20


class Writer:
    """Write rows one at a time; `close()` finishes the file. Rows are buffered in bounded
    batches only (Parquet row groups)."""

    rows: int = 0

    def write(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Close without caring about the file (it is deleted by the caller)."""
        with contextlib.suppress(Exception):  # the file is being thrown away
            self.close()


class JsonlWriter(Writer):
    def __init__(self, path: Path, *, compress: bool) -> None:
        self.rows = 0
        self._raw = path.open("wb")
        self._out: IO[bytes] = (
            gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=6)
            if compress
            else self._raw
        )
        self._buffer: list[str] = []

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(
            json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        )
        self.rows += 1
        if len(self._buffer) >= 1000:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._out.write(("\n".join(self._buffer) + "\n").encode())
            self._buffer = []

    def close(self) -> None:
        if self._raw.closed:
            return
        try:
            self._flush()
            if self._out is not self._raw:
                self._out.close()
        finally:
            self._raw.close()


class ParquetWriter(Writer):
    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.rows = 0
        self._schema = schema
        self._writer = pq.ParquetWriter(
            str(path),
            schema,
            compression="zstd",
            use_dictionary=True,
            write_statistics=True,
        )
        self._batch: list[dict[str, Any]] = []
        self._closed = False

    def write(self, row: dict[str, Any]) -> None:
        self._batch.append(row)
        self.rows += 1
        if len(self._batch) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            table = pa.Table.from_pylist(self._batch, schema=self._schema)
            self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            self._batch = []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._flush()
        finally:
            self._writer.close()


def open_writer(path: Path, file_format: str, schema: pa.Schema) -> Writer:
    if file_format == "parquet":
        return ParquetWriter(path, schema)
    return JsonlWriter(path, compress=file_format == "jsonl.gz")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
