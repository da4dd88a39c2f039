"""Leaf helpers for files: atomic writes (temp file + rename), directory replacement, the checks that an
output path is writable and not an input, a full disk as one error, and the recorded settings (identity) of
a resumable output. The ownership lock of an output is `nas.lock`."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nas.errors import ConfigError, NasError, OutputError
from nas.lock import LOCK_NAME

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` to write to; renamed onto `path` only if the block succeeds, so
    readers never see a partial file. The result gets ordinary permissions (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        with disk_errors(path):
            yield tmp
            publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temp file ordinary permissions (mkstemp's are 0600) and rename it onto `path`."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_model_atomic(model: Any, dst: Path, state_dict: dict | None = None) -> Path:
    """`save_pretrained` (safetensors) into a temp directory next to `dst`, then rename it to `dst`.
    `state_dict`: the weights to write instead of the model's own (the gathered ones of a sharded model)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(dst) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        replace_dir(tmp, dst)
    return dst


@contextmanager
def temp_dir(dst: Path) -> Iterator[Path]:
    """A temp directory beside `dst` for a directory being written; removed when the block fails (a full
    disk leaves no partial directory behind), and a full disk becomes one `OutputError`."""
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".tmp-{dst.name}-"))
    try:
        with disk_errors(dst):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename the finished temp directory `tmp` to `dst`, replacing an existing `dst` (renamed aside first:
    os.replace needs an empty target). `tmp` gets ordinary permissions first (mkdtemp's are 0700), so
    workers of another user on shared storage can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if (dst / LOCK_NAME).is_file():  # the owner's lock moves along (same inode: the flock stays held)
        os.replace(dst / LOCK_NAME, tmp / LOCK_NAME)
    if dst.exists():
        trash = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".old-{dst.name}-"))
        os.replace(dst, trash / dst.name)
        os.replace(tmp, dst)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, dst)


def write_atomic(path: Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Each installed distribution's version ("not installed" for an optional one that is absent), for the
    records a study or an evaluation keeps of its environment."""
    import importlib.metadata

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ---- the kind of a path, and reads bounded by what nas writes ------------------------------------------

SPECIAL_KINDS = (
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISSOCK, "socket"),
)
# the JSON files nas writes are kB (measured on a 4-step run: run.json 1.1 kB, rng.json 15 kB, a checkpoint's
# state.json 0.8 kB + ~90 B an evaluation of its curve): 64 MiB holds ~700k evaluations and reads in a blink
JSON_LIMIT = 64 << 20
# a metrics.jsonl line is 130-150 bytes (measured, same run): 1 GiB holds 7 million logged steps
LOG_LIMIT = 1 << 30


def special_kind(path: str | os.PathLike) -> str | None:
    """What `path` is when it is a special file (character or block device, FIFO, socket; links
    followed): reading one never ends (/dev/zero), blocks (a FIFO), or fails; None for a regular file, a
    directory or nothing at all."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((kind for test, kind in SPECIAL_KINDS if test(mode)), None)


def check_kind(path: str | os.PathLike, what: str, error: type[NasError] = ConfigError) -> None:
    """`error` naming `what` (e.g. "output", "--importance") when `path` is a special file: the check
    before any read or write of a path nas is given."""
    kind = special_kind(path)
    if kind:
        raise error(f"{what} {path} is a {kind}, not a regular file or directory; give the path of one")


def read_bounded(path: str | os.PathLike, limit: int = JSON_LIMIT, error: type[NasError] = OutputError) -> bytes:
    """The bytes of a file nas wrote, read only when it is a regular file of at most `limit` bytes (else
    `error` naming it): a special file or a huge file put in its place is never read. Opened without
    blocking (a FIFO would wait for a writer) and checked on the open descriptor (no race with a rename)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        kind = next((kind for test, kind in SPECIAL_KINDS if test(info.st_mode)), None)
        if kind or stat.S_ISDIR(info.st_mode):
            raise error(f"{path} is a {kind or 'directory'}, not a file nas wrote; delete it or choose another output")
        if info.st_size > limit:
            raise error(
                f"{path} is {info.st_size:,} bytes, more than nas writes there ({limit:,}): not nas's file; "
                "delete it or choose another output"
            )
        return f.read(limit + 1)[:limit]


def read_json(path: str | os.PathLike, limit: int = JSON_LIMIT, error: type[NasError] = OutputError) -> Any:
    """The JSON value of a file nas wrote (`read_bounded`); ValueError when it is not JSON."""
    return json.loads(read_bounded(path, limit, error))


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of an append-only JSON-lines log (one object a line). A torn last line, which a writer
    killed mid-line leaves, is dropped with a warning (the resume redoes that step); an unreadable line
    before the last is an `OutputError` naming it (the file was changed by something else)."""
    path = Path(path)
    lines = read_bounded(path, LOG_LIMIT).split(b"\n")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif any(rest.strip() for rest in lines[number:]):
            raise OutputError(
                f"{path}:{number} is not a JSON object (not a torn last line: the log was changed by "
                "something else); repair or delete that line to resume, or pass --restart to start over"
            )
        else:
            log.warning("%s:%d: dropped a torn last line (a run killed while writing it)", path, number)
    return records


def append_log(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record to a JSON-lines log with a single write (after a torn line, a newline first, so a
    record never joins the partial one)."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "ab+") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


# ---- a full disk ------------------------------------------------------------------------------------

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save and safetensors report a full disk in their own words, not as an OSError
FULL_DISK_TEXTS = ("No space left", "StorageFull", "file write failed", "disk is full", "Disk quota")


def is_full_disk(e: BaseException) -> bool:
    """True when `e` (or an exception it was raised from) says the disk or quota is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in FULL_DISK_ERRNOS:
            return True
        if any(text in str(e) for text in FULL_DISK_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk (or a read-only file system) while writing `path` into one `OutputError`."""
    try:
        yield
    except OutputError:
        raise
    except Exception as e:
        if is_full_disk(e):
            raise OutputError(f"no space left on the device holding {path}; free some space and rerun") from e
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            raise OutputError(f"cannot write {path}: the file system is read-only") from e
        raise


# ---- outputs: writable, not an input, owned by one command --------------------------------------------


def check_output(path: str | os.PathLike, *, is_dir: bool = True) -> Path:
    """`OutputError` unless `path` can be written: a directory output must not be an existing file, a file
    output not an existing directory, no path a special file (a device, FIFO or socket), and the path (or
    its nearest existing parent) must be writable."""
    path = Path(path).expanduser()
    check_kind(path, "output", OutputError)  # before anything reads it (/dev/zero, a FIFO never end)
    if is_dir and path.exists() and not path.is_dir():
        raise OutputError(f"output {path} is an existing file; give a directory (a new or an existing one)")
    if not is_dir and path.is_dir():
        raise OutputError(f"output {path} is a directory; give a file name")
    existing = path if is_dir and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output {path}: {existing} is a file, not a directory")
    if not _writable(existing):
        raise OutputError(f"cannot write output {path}: {existing} is read-only")
    return path


def _writable(directory: Path) -> bool:
    """Whether a file can be created in `directory` (root passes os.access on a read-only mount, so ask
    statvfs too)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    return not os.statvfs(directory).f_flag & os.ST_RDONLY


def check_not_input(
    out: str | os.PathLike,
    inputs: Sequence[str | os.PathLike | None],
    allow: Sequence[str | os.PathLike] = (),
) -> None:
    """`OutputError` when the output path is, contains, or lies inside a local input path (a hub id is no
    path and is skipped). `allow`: output paths that may lie inside an input (e.g. MODEL/eval.json)."""
    target = Path(out).expanduser().resolve()
    if any(target == Path(a).expanduser().resolve() for a in allow):
        return
    for given in inputs:
        if not given or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().resolve()
        if target == source or source in target.parents or target in source.parents:
            relation = "is" if target == source else "is inside" if source in target.parents else "contains"
            raise OutputError(f"output {out} {relation} the input {given}; write the output somewhere else")


GENERATOR = "nas"  # the mark of the files nas writes: a JSON "generator" key, an HTML generator meta tag
HTML_MARK = f'<meta name="generator" content="{GENERATOR}">'
NOT_OURS_HINT = "pass --overwrite to replace it, or choose another --out"


def check_ours(path: str | os.PathLike, overwrite: bool = False) -> None:
    """The one rule of every file output: `OutputError` when `path` is an existing file that nas did not
    write (see `written_by_nas`), unless `overwrite`."""
    path = Path(path).expanduser()
    if path.is_file() and not overwrite and not written_by_nas(path):
        raise OutputError(f"output {path} is an existing file that nas did not write; {NOT_OURS_HINT}")


def written_by_nas(path: Path) -> bool:
    """Whether the file at `path` is one nas wrote, by its content: a safetensors file with nas's
    metadata (an importance file), a JSON object with nas's `generator` key (or the keys of an eval
    record written before the key existed), an HTML document with nas's generator tag."""
    if special_kind(path) or not path.is_file():  # a device or FIFO is read by nothing here
        return False
    if path.suffix == ".safetensors":
        return _safetensors_metadata(path).keys() >= {"identity", "teacher_arch"}
    try:
        if path.suffix == ".html":
            with open(path, "rb") as f:
                return HTML_MARK.encode() in f.read(1 << 16)
        record = json.loads(read_bounded(path))  # larger than the JSON nas writes: not ours
    except (ValueError, OSError, NasError):
        return False
    if not isinstance(record, dict):
        return False
    return (
        record.get("generator") == GENERATOR
        or {"model", "params"} <= record.keys()
        and ("perplexity" in record or "tasks" in record)
    )


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file's header (its first 8 bytes give the header's length);
    read by hand so that this leaf module needs no safetensors import."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= path.stat().st_size - 8 else {}
    except (ValueError, OSError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


# ---- identity: the settings that decide a resumable output's result ------------------------------------


def check_identity(record: str | os.PathLike, settings: dict[str, Any], what: str, ways_out: str) -> None:
    """Compare `settings` with the ones recorded in the JSON file `record` (written by `record_identity`):
    `ConfigError` listing the differing settings and `ways_out` when they differ; nothing when they
    match or nothing is recorded yet."""
    record = Path(record)
    if not record.is_file():
        return
    try:
        recorded = read_json(record, error=ConfigError)["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{record} is corrupt ({type(e).__name__}); {ways_out}") from e
    require_same(recorded, settings, what, ways_out)


def require_same(recorded: dict[str, Any], settings: dict[str, Any], what: str, ways_out: str) -> None:
    """`ConfigError` listing the settings that differ between `recorded` and `settings`, and `ways_out`."""
    differing = identity_diff(recorded, settings)
    if differing:
        raise ConfigError(f"{what} was made with other settings ({differing}); {ways_out}")


def identity_diff(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    """'key: old -> new; ...' for every (dotted) setting that differs; '' when none does."""
    old, new = _flatten(_plain(recorded)), _flatten(_plain(settings))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys)


def record_identity(record: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Write `settings` (JSON-able) as the identity of an output, atomically."""
    write_text_atomic(record, json.dumps({"settings": _plain(settings)}, indent=1, sort_keys=True) + "\n")


def _plain(obj: Any) -> Any:
    """JSON round trip, so tuples and lists (and other JSON-equal values) compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): json.dumps(obj)}
