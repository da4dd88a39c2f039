"""Reading documents from local files, directories, or the Hugging Face hub (`nas.data` builds on this).

A .txt file is split on blank lines, one document per paragraph block (so a book of paragraphs, or one
verse or record per block, becomes many documents that can go to different splits); a .jsonl file holds
one JSON object per line with the text in `text_field`; a .parquet file has a `text_field` column; a
directory holds such files, read in sorted order, recursively (other files are skipped). Anything that is
not a local path and does not look like one is a Hugging Face datasets id.

A chat source (`messages_field` set) holds conversations instead of text: each record's field is a list
of `{"role", "content"}` messages (the OpenAI / Hugging Face `messages` format) that the caller's
`render` (the tokenizer's chat template, `nas.data.tokens.chat_renderer`) turns into one document; a
record that is no conversation, or that the template cannot render, is skipped and counted like a
record without text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from nas.errors import DataError
from nas.io import check_kind
from nas.settings import Source

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".parquet")
BLANK_LINES = re.compile(r"\n[ \t\r]*\n")


def is_local(source: Source) -> bool:
    """True for a local path (existing, or written like a path: a known suffix, '/', '.', '~');
    a missing local path is reported as missing instead of being sent to the hub."""
    path = source.path
    return Path(path).expanduser().exists() or path.endswith(SUFFIXES) or path.startswith(("/", ".", "~"))


def local_files(source: Source) -> list[Path]:
    """The readable files of a local source (a file, or a directory's files sorted, recursively)."""
    path = Path(source.path).expanduser()
    check_kind(path, "data", DataError)  # a FIFO or /dev/zero would be read without end
    if not path.exists():
        raise DataError(f"data file or directory {source.path} does not exist; check the path")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"cannot read {path}: the file type must be one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"directory {path} has no {', '.join(SUFFIXES)} files to read")
    return files


def source_fingerprint(source: Source) -> dict[str, Any]:
    """What identifies a source's content: each file's path, size and mtime, or the hub id/config/split."""
    what = {"text_field": source.text_field, "max_documents": source.max_documents}
    if source.messages_field is not None:  # only then: the keys of plain-text caches stay as they were
        what |= {"messages_field": source.messages_field, "chat_template": source.chat_template}
        what |= {"mask_prompt": True} if source.mask_prompt else {}
    if not is_local(source):
        return what | {"hub": source.path, "config": source.config, "split": source.split}
    files = []
    for f in local_files(source):
        stat = f.stat()
        files.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    return what | {"files": files}


def load_documents(source: Source, render: Callable[[list], str] | None = None) -> Iterator[str]:
    """Yield the non-empty texts of `source` (at most `max_documents`). A record of a .jsonl, .parquet or
    hub source without usable text (the field missing, null, not a string, or blank) is skipped and
    counted: a warning gives the count and the first one's location; a DataError when nothing is left,
    or when more than `max_skipped_share` of the records read were skipped. A chat source's records are
    conversations, each rendered to one text by `render` (required for them)."""
    if source.messages_field is not None and render is None:
        raise DataError(f"{source.path} is chat data (messages_field): it needs a tokenizer's chat template")
    records = _local_texts(source) if is_local(source) else _hub_texts(source)
    count, skipped = 0, Skipped()
    for where, value in records:
        text, reason = (value, None) if source.messages_field is None else render_record(value, render)
        if not isinstance(text, str) or not text.strip():
            if where is not None:  # a record (a blank paragraph of a .txt file is no record)
                skipped.add(where, value, reason)
            continue
        yield text
        count += 1
        if source.max_documents is not None and count >= source.max_documents:
            break
    skipped.report(source, count)


def render_record(value: Any, render: Callable[[list], str]) -> tuple[str | None, str | None]:
    """(the rendered text, None), or (None, why not) for a record that is no conversation or that the
    template cannot render."""
    if value is MISSING or value is None:
        return None, "missing"
    messages = isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value)
    if not messages:
        return None, "not a list of {role, content} messages"
    try:
        return render(value), None
    except Exception as e:  # the template's own error (jinja2's TemplateError, raise_exception(...), ...)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None, f"its chat template cannot render it: {why}"


class Skipped:
    """The records a source skipped: how many, and the first one's location and reason."""

    def __init__(self) -> None:
        self.count, self.first = 0, ""

    def add(self, where: str, value: Any, reason: str | None = None) -> None:
        if not self.count:
            reason = reason or (
                "missing" if value is MISSING else "blank" if isinstance(value, str) else type(value).__name__
            )
            self.first = f"{where} ({reason})"
        self.count += 1

    def report(self, source: Source, kept: int) -> None:
        """Warn about the skipped records; DataError when none is kept or too many were skipped."""
        field, total = source.field, kept + self.count
        kind = "text" if source.messages_field is None else "messages"
        usable = "no usable text field" if source.messages_field is None else "no renderable conversation in"
        fix = "--text-field (text_field" if kind == "text" else "--messages-field (messages_field"
        if kept == 0:
            first = f" ({self.count} records skipped, the first at {self.first})" if self.count else ""
            raise DataError(
                f"no text in {source.path}: the {kind} field {field!r} is missing or empty in every record"
                f"{first}; pass the right field with {fix} in the study TOML)"
            )
        if not self.count:
            return
        what = f"{self.count} of {total} records of {source.path} have {usable} {field!r}"
        if self.count > source.max_skipped_share * total:
            raise DataError(
                f"{what} (first at {self.first}): more than max_skipped_share "
                f"({source.max_skipped_share:.0%}); fix the data or {fix.split(' ')[0]}, or raise --max-skipped-share"
            )
        log.warning("%s; skipped them (the first at %s)", what, self.first)


MISSING = object()  # a record without the text field


def _local_texts(source: Source) -> Iterator[tuple[str | None, Any]]:
    """(location, value) of every record of a local source; a .txt paragraph has no location."""
    for path in local_files(source):
        if path.suffix == ".txt" and source.messages_field is not None:
            raise DataError(f"{path} is a .txt file: no conversations in it; chat data is .jsonl or .parquet")
        if path.suffix == ".txt":
            for text in BLANK_LINES.split(read_text(path)):
                yield None, text
        elif path.suffix == ".jsonl":
            yield from _jsonl_texts(path, source.field)
        else:
            yield from _parquet_texts(path, source.field)


def read_text(path: Path) -> str:
    """A text file's contents; DataError when it is not UTF-8 text (binary data, another encoding)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte at offset {e.start}): binary data or another "
            "encoding; convert it to UTF-8 text"
        ) from None
    if "\x00" in text:
        raise DataError(
            f"{path} is not text: it holds NUL bytes at offset {text.index(chr(0))} (binary data?)"
        )
    return text


def _jsonl_texts(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:  # streamed: a .jsonl corpus can be far larger than memory
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(
                    f"{path}:{number} is not UTF-8 text (binary data or another encoding)"
                ) from None
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number} is not valid JSON ({e}); each line must be one JSON object"
                ) from e
            yield f"{path}:{number}", record.get(field, MISSING) if isinstance(record, dict) else record


def _parquet_texts(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read {path} as parquet: {e}") from e
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise DataError(
            f"{path} has no column {field!r} (columns: {', '.join(columns)}); pass --text-field or --messages-field"
        )
    row = 0
    for batch in parquet.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            yield f"{path} row {row}", value
            row += 1


def _hub_texts(source: Source) -> Iterator[tuple[str, Any]]:
    import datasets

    if source.streaming and source.max_documents is None:
        log.warning(
            "streaming %s with no max_documents: every document of the split is tokenized", source.path
        )
    name = (
        f"{source.path}" + (f" (config {source.config})" if source.config else "") + f", split {source.split}"
    )
    try:
        dataset = datasets.load_dataset(
            source.path, source.config, split=source.split, streaming=source.streaming
        )
        rows: Iterable[dict] = iter(dataset)
        first = next(rows, None)
    except Exception as e:  # offline, unknown id, gated, bad config: all end here
        raise DataError(
            f"cannot load hub dataset {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            "Pass a local .txt/.jsonl/.parquet file or directory, or check the dataset id and the network "
            "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE must be unset)"
        ) from e
    if first is None:
        return
    if source.field not in first:
        raise DataError(f"hub dataset {name} has no field {source.field!r} (fields: {', '.join(first)})")
    yield f"{name} row 0", first[source.field]
    for number, row in enumerate(rows, 1):
        yield f"{name} row {number}", row.get(source.field, MISSING)


def document_hash(text: str) -> int:
    """A 64-bit content hash (the first 8 bytes of the SHA-1 of the UTF-8 text)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
