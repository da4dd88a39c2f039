"""The fault tables' shared machinery: every bad input and real fault of a sub-command is one line on
stderr and exit code 2, with no existing file changed (the whole tree is hashed before and after).
`tests/cli/test_faults_<command>.py` holds each command's table (`CASES`, run by `check_fault`) and its
longer fault tests; this module holds what they share: the inputs (`base`), one case's `Workspace` that
builds the faulty inputs, and the checks. `tests/cli/conftest.py` makes the fixtures visible there.

The faults are real: truncated and garbage weights, tokenizers and SQLite files, tensors removed from or
added to a weights file, binary data, a second process holding the output's lock, a closed PostgreSQL
port on 127.0.0.1, a read-only and a full file system (small tmpfs mounts; skipped where mount is not
permitted). The cases that need finished runs or kill processes are marked slow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import safetensors.torch
import tomli_w
import torch

from nas.cli.main import main
from nas.testing import tiny_study_config, write_kjv_corpus, write_tiny_teacher

SEQ = ["--seq-len", "32"]
D = "distill"
# special files as outputs: (name, path builder, what the one line says)
SPECIAL = [
    ("dev-full", lambda w: "/dev/full", "output /dev/full is a character device"),
    ("dev-zero", lambda w: "/dev/zero", "output /dev/zero is a character device"),
    ("fifo", lambda w: w.fifo(), "is a FIFO (named pipe)"),
]


# one build per test process for every fault module (it was one per module when the table was one file):
# the cases only read it, and the check that they change nothing hashes it too
@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """Inputs the cases share (never changed by them): a tiny teacher, real text, a warm data cache, an
    importance file, and a valid SQLite study to corrupt copies of."""
    root = tmp_path_factory.mktemp("base")
    write_tiny_teacher(root / "teacher")
    write_kjv_corpus(root / "corpus.jsonl", limit=1500)
    imp = ["--num-samples", "8", "--val-sequences", "2"]
    data = ["--data", str(root / "corpus.jsonl"), *SEQ, "--cache-dir", str(root / "cache")]
    assert (
        main(["importance", str(root / "teacher"), *data, *imp, "--out", str(root / "imp.safetensors")]) == 0
    )
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{root / 'study.db'}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return root


class Workspace:
    """One case's directory plus the shared `base`; helpers build the faulty inputs."""

    def __init__(self, root: Path, base: Path) -> None:
        self.root, self.base = root, base
        self.teacher = str(base / "teacher")

    def data(self, path: str | Path | None = None) -> list[str]:
        return [
            "--data",
            str(path or self.base / "corpus.jsonl"),
            *SEQ,
            "--cache-dir",
            str(self.base / "cache"),
        ]

    def model(self, fault: str) -> str:
        """A copy of the teacher with `fault`: truncated | garbage | missing | extra | tokenizer."""
        out = self.root / f"model-{fault}"
        shutil.copytree(self.base / "teacher", out)
        weights = out / "model.safetensors"
        if fault == "truncated":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif fault == "garbage":
            weights.write_bytes(os.urandom(weights.stat().st_size))
        elif fault in ("missing", "extra"):
            tensors = safetensors.torch.load_file(str(weights))
            if fault == "missing":
                del tensors["model.layers.1.mlp.up_proj.weight"]
            else:
                tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
            safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt"})
        elif fault == "tokenizer":
            tok = out / "tokenizer.json"
            tok.write_bytes(tok.read_bytes()[:1000])
        elif fault == "config":
            (out / "config.json").write_bytes(os.urandom(200))
        elif fault == "shape":  # one tensor two rows longer than the config gives it
            tensors = safetensors.torch.load_file(str(weights))
            name = "model.layers.1.mlp.up_proj.weight"
            tensors[name] = torch.zeros(tensors[name].shape[0] + 2, tensors[name].shape[1])
            safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt"})
        elif fault == "fifo-config":  # config.json a named pipe: read, it would wait for a writer forever
            (out / "config.json").unlink()
            os.mkfifo(out / "config.json")
        return str(out)

    def fifo(self, name: str = "fifo") -> str:
        """A named pipe (FIFO) with no writer: opening it to read waits forever, reading it never ends."""
        path = self.root / name
        os.mkfifo(path)
        return str(path)

    def previous_format_run(self) -> list[str]:
        """The argv of a finished 2-step distillation whose checkpoint is rewritten as nas wrote it before
        issue 33 (RNG states pickled in rng.pt): re-running it resumes from that checkpoint."""
        argv = [D, self.teacher, self.teacher, str(self.root / "old-run"), *self.data(), "--steps", "2"]
        argv += ["--batch-size", "2", "--eval-sequences", "2", "--checkpoint-every", "2"]
        assert main(argv) == 0
        (checkpoint,) = (self.root / "old-run" / "checkpoints").iterdir()
        rng = safetensors.torch.load_file(str(checkpoint / "rng.safetensors"))
        (name, keys, pos, has_gauss, cached), python = json.loads((checkpoint / "rng.json").read_text()).values()
        numpy_state = (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        state = {"torch": rng["torch"], "numpy": numpy_state, "python": (python[0], tuple(python[1]), python[2])}
        torch.save(state, checkpoint / "rng.pt")
        (checkpoint / "rng.safetensors").unlink()
        (checkpoint / "rng.json").unlink()
        return argv

    def binary(self, suffix: str = ".txt") -> str:
        path = self.root / f"binary{suffix}"
        path.write_bytes(os.urandom(4096) + b"\x00" * 64)
        return str(path)

    def file(self, name: str = "a-file") -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not a directory\n")
        return str(path)

    def busy_dir(self, name: str = "busy", is_dir: bool = True) -> str:
        """A path whose lock a second, real process holds (an flock on its lock file, the pid written in
        it, as `nas.lock.own_output` does) for the rest of the case."""
        from nas.lock import lock_file_of

        path = self.root / name
        lock = lock_file_of(path, is_dir)
        lock.parent.mkdir(parents=True, exist_ok=True)
        code = (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid())\n"
            "print('held', flush=True); time.sleep(120)"
        )
        proc = subprocess.Popen([sys.executable, "-S", "-c", code], stdout=subprocess.PIPE, text=True)
        self.holder = proc
        assert proc.stdout.readline().strip() == "held"
        self.expected_pid = proc.pid
        return str(path)

    def sqlite(self, fault: str) -> str:
        """sqlite:/// URL of a copy of the base study.db: truncated | garbage."""
        path = self.root / f"{fault}.db"
        raw = (self.base / "study.db").read_bytes()
        path.write_bytes(raw[: len(raw) // 3] if fault == "truncated" else os.urandom(len(raw)))
        return f"sqlite:///{path}"

    def closed_postgres(self) -> str:
        """A PostgreSQL URL on a port of 127.0.0.1 where nothing listens."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return f"postgresql+psycopg://nas:pw@127.0.0.1:{port}/nas"

    def mount(self, name: str, options: str) -> Path:
        """A small tmpfs (`ro` for read-only, `size=...` to fill it up); skips where mount is not permitted."""
        path = self.root / name
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        self.mounts.append(path)
        return path

    def readonly(self) -> Path:
        return self.mount("ro", "ro,size=1m")

    def full(self) -> Path:
        """A tmpfs with no byte left."""
        path = self.mount("full", "size=256k")
        with contextlib.suppress(OSError), open(path / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        return path

    def study(self, **overrides) -> str:
        """A study TOML over the base teacher and text, its out_dir in this case's directory."""
        config = tiny_study_config(self.base, name="fault", **overrides)
        config.setdefault("out_dir", str(self.root / "studies" / "fault"))
        if "out_dir" not in overrides:
            config["out_dir"] = str(self.root / "studies" / "fault")
        path = self.root / "fault.toml"
        path.write_text(tomli_w.dumps(config))
        return str(path)

    def nas_study(self, importance: bool) -> str:
        """sqlite URL of a study that looks created by nas (a config attribute), its importance file there
        or not."""
        url = f"sqlite:///{self.root / 'nas.db'}"
        study = optuna.create_study(study_name="fault", storage=url)
        config = tiny_study_config(self.base, name="fault", out_dir=str(self.root / "out"))
        study.set_user_attr("config", config)
        path = self.root / "out" / "importance.safetensors"
        if importance:
            path.parent.mkdir()
            shutil.copy(self.base / "imp.safetensors", path)
        study.set_user_attr("importance_path", str(path))
        return url

    # -- the faults of issue 25: a broken teacher, mismatched parts, files that are not nas's, lost data

    def broken(self, fault: str, name: str = "") -> str:
        """A copy of the teacher with `fault` in tensor or field `name`: nan | inf (one value of the
        tensor) | huge (every value 3e38, finite) | dtype (the tensor cast to `name`'s dtype, e.g. "model.norm.weight:int16") | no-field
        (config.json without the field) | big-tokenizer (5 more tokens than vocab_size)."""
        out = self.root / f"broken-{fault}"
        shutil.copytree(self.base / "teacher", out)
        weights, config = out / "model.safetensors", out / "config.json"
        if fault in ("nan", "inf", "dtype", "huge"):
            tensors = safetensors.torch.load_file(str(weights))
            tensor, _, dtype = name.partition(":")
            if fault == "dtype":
                tensors[tensor] = tensors[tensor].to(getattr(torch, dtype))
            elif fault == "huge":  # finite weights whose activations overflow float32
                tensors[tensor] = torch.full_like(tensors[tensor], 3e38)
            else:
                tensors[tensor].view(-1)[7] = float(fault)
            safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt"})
        elif fault == "no-field":
            raw = json.loads(config.read_text())
            del raw[name]
            config.write_text(json.dumps(raw))
        elif fault == "big-tokenizer":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(out))
            tok.add_tokens(
                [f"<extra{i}>" for i in range(len(tok), json.loads(config.read_text())["vocab_size"] + 5)]
            )
            tok.save_pretrained(str(out))
        return str(out)

    def foreign_db(self) -> str:
        """sqlite URL of a user's SQLite database of other tables (no Optuna study)."""
        import sqlite3

        path = self.root / "notes.db"
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
            db.executemany("INSERT INTO notes (body) VALUES (?)", [("keep me",), ("and me",)])
        return f"sqlite:///{path}"

    def old_optuna_db(self) -> str:
        """sqlite URL of a copy of the base study whose schema is an older Optuna's (alembic revision)."""
        import sqlite3

        import optuna.storages._rdb as rdb
        from alembic.script import ScriptDirectory

        revisions = [
            r.revision for r in ScriptDirectory(str(Path(rdb.__file__).parent / "alembic")).walk_revisions()
        ]
        path = self.root / "old.db"
        shutil.copy(self.base / "study.db", path)
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE alembic_version SET version_num = ?", (revisions[1],))
        return f"sqlite:///{path}"

    def users_file(self, name: str, text: str = "the user's own file\n") -> str:
        path = self.root / name
        path.write_text(text)
        return str(path)

    def lossy_jsonl(self, bad, every: int = 3, suffix: str = ".jsonl") -> str:
        """The base corpus's records (125 documents of 12 verses) with every `every`-th broken by `bad(record)` (a record of
        other fields, or a non-string text); .parquet: the same rows as a table."""
        lines = (self.base / "corpus.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        records = [bad(r) if i % every == 1 % every else r for i, r in enumerate(records)]
        path = self.root / f"lossy{suffix}"
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"text": [r.get("text") for r in records]}), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)


def tree_digest(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file under `roots` (mounts' contents included)."""
    digest = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def sqlite_schemas(*roots: Path) -> dict[str, list]:
    """path -> the schema (sqlite_master rows) of every SQLite file under `roots`, read-only."""
    import sqlite3

    schemas = {}
    for root in roots:
        for path in sorted(root.rglob("*.db")):
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                try:
                    schemas[str(path)] = db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
                except sqlite3.DatabaseError:  # the corrupt ones of the cases: their hash is compared
                    schemas[str(path)] = None
    return schemas


@pytest.fixture
def workspace(base, tmp_path):
    w = Workspace(tmp_path, base)
    w.mounts, w.holder = [], None
    w.copy_imp = lambda: shutil.copy(base / "imp.safetensors", tmp_path / "imp.safetensors")
    yield w
    if w.holder is not None:
        w.holder.kill()
        w.holder.wait()
    for path in reversed(w.mounts):
        subprocess.run(["umount", str(path)], check=False)


def fault_table(cases: list[tuple]):
    """Parametrize a test over one command's table; each case's id is its name."""
    return pytest.mark.parametrize("case", cases, ids=[c[0] for c in cases])


def check_fault(case: tuple, workspace: Workspace, capsys, monkeypatch) -> None:
    """Run one case (id, sub-command, argv builder, what the one line must say): exit code 2, one line
    naming the fix (and the pid holding a busy output), and no file or SQLite schema changed."""
    _, _, build, expected = case
    monkeypatch.chdir(workspace.root)
    argv = build(workspace)
    before = tree_digest(workspace.root, workspace.base)
    schemas = sqlite_schemas(workspace.root, workspace.base)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("nas: error: "), err
    assert expected in lines[0], lines[0]
    if workspace.holder is not None:  # the one line names the process that holds the output
        assert f"(pid {workspace.holder.pid})" in lines[0], lines[0]
    after = tree_digest(workspace.root, workspace.base)
    changed = sorted(k for k in before if before[k] != after.get(k))
    added = sorted(set(after) - set(before))
    assert not changed and not added, (changed, added)
    assert sqlite_schemas(workspace.root, workspace.base) == schemas


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]
