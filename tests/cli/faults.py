"""Fault injection: bad inputs and real faults across every sub-command, each one line on stderr and exit
code 2, with no existing file changed (the whole tree is hashed before and after).

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
import time
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


@pytest.fixture(scope="module")
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


def study_file(w, **kw) -> str:
    return w.study(**kw)


D = "distill"
# special files as outputs: (name, path builder, what the one line says)
SPECIAL = [
    ("dev-full", lambda w: "/dev/full", "output /dev/full is a character device"),
    ("dev-zero", lambda w: "/dev/zero", "output /dev/zero is a character device"),
    ("fifo", lambda w: w.fifo(), "is a FIFO (named pipe)"),
]
# (case id, sub-command, argv builder, what the one line must say)
CASES = [
    # -- importance
    ("importance-missing-teacher", "importance", lambda w: ["importance", str(w.root / "nope"), *w.data(), "--out", str(w.root / "i.st")], "does not exist"),
    ("importance-truncated-weights", "importance", lambda w: ["importance", w.model("truncated"), *w.data(), "--out", str(w.root / "i.st")], "truncated"),
    ("importance-garbage-weights", "importance", lambda w: ["importance", w.model("garbage"), *w.data(), "--out", str(w.root / "i.st")], "unreadable"),
    ("importance-missing-tensor", "importance", lambda w: ["importance", w.model("missing"), *w.data(), "--out", str(w.root / "i.st")], "lacks 1 tensor"),
    ("importance-extra-tensor", "importance", lambda w: ["importance", w.model("extra"), *w.data(), "--out", str(w.root / "i.st")], "does not have"),
    ("importance-corrupt-tokenizer", "importance", lambda w: ["importance", w.model("tokenizer"), *w.data(), "--out", str(w.root / "i.st")], "tokenizer"),
    ("importance-binary-txt", "importance", lambda w: ["importance", w.teacher, *w.data(w.binary()), "--out", str(w.root / "i.st")], "not UTF-8 text"),
    ("importance-binary-jsonl", "importance", lambda w: ["importance", w.teacher, *w.data(w.binary(".jsonl")), "--out", str(w.root / "i.st")], "not UTF-8 text"),
    ("importance-seq-len", "importance", lambda w: ["importance", w.teacher, *w.data(), "--seq-len", "4096", "--out", str(w.root / "i.st")], "max_position_embeddings"),
    ("importance-out-is-dir", "importance", lambda w: ["importance", w.teacher, *w.data(), "--out", str(w.root)], "is a directory"),
    ("importance-out-inside-teacher", "importance", lambda w: ["importance", w.teacher, *w.data(), "--out", w.teacher + "/i.st"], "inside the input"),
    ("importance-out-is-data", "importance", lambda w: ["importance", w.teacher, *w.data(), "--out", str(w.base / "corpus.jsonl")], "is the input"),
    ("importance-bad-device", "importance", lambda w: ["importance", w.teacher, *w.data(), "--device", "cuda:7", "--out", str(w.root / "i.st")], "--device cuda:7"),
    ("importance-no-val", "importance", lambda w: ["importance", w.teacher, *w.data(), "--num-samples", "8", "--val-sequences", "0", "--restart", "--out", str(w.root / "i.st")], "--val-sequences"),
    ("importance-busy", "importance", lambda w: ["importance", w.teacher, *w.data(), "--out", w.busy_dir("i.st", False)], "in use by another nas command (pid"),
    ("importance-other-settings", "importance", lambda w: ["importance", w.teacher, *w.data(), "--num-samples", "4", "--out", str(w.copy_imp())], "num_samples: 8 -> 4"),
    ("importance-readonly", "importance", lambda w: ["importance", w.teacher, *w.data(), "--out", str(w.readonly() / "i.st")], "read-only"),
    ("importance-full-disk", "importance", lambda w: ["importance", w.teacher, *w.data(), "--num-samples", "4", "--val-sequences", "2", "--out", str(w.full() / "i.st")], "no space left"),
    # -- prune
    ("prune-out-is-teacher", "prune", lambda w: ["prune", w.teacher, w.teacher, "--importance", str(w.base / "imp.safetensors")], "is the input"),
    ("prune-out-inside-teacher", "prune", lambda w: ["prune", w.teacher, w.teacher + "/sub", "--importance", str(w.base / "imp.safetensors")], "inside the input"),
    ("prune-out-contains-teacher", "prune", lambda w: ["prune", w.teacher, str(w.base), "--importance", str(w.base / "imp.safetensors")], "contains the input"),
    ("prune-out-is-file", "prune", lambda w: ["prune", w.teacher, w.file(), "--importance", str(w.base / "imp.safetensors")], "existing file"),
    ("prune-out-has-other-files", "prune", lambda w: ["prune", w.teacher, str(Path(w.file("x/notes.txt")).parent), "--importance", str(w.base / "imp.safetensors")], "other files"),
    ("prune-truncated-weights", "prune", lambda w: ["prune", w.model("truncated"), str(w.root / "p"), "--importance", str(w.base / "imp.safetensors")], "truncated"),
    ("prune-missing-tensor", "prune", lambda w: ["prune", w.model("missing"), str(w.root / "p"), "--importance", str(w.base / "imp.safetensors")], "lacks 1 tensor"),
    ("prune-garbage-importance", "prune", lambda w: ["prune", w.teacher, str(w.root / "p"), "--importance", w.binary(".safetensors")], "importance file"),
    ("prune-importance-is-model", "prune", lambda w: ["prune", w.teacher, str(w.root / "p"), "--importance", w.teacher + "/model.safetensors"], "not a nas importance file"),
    ("prune-bad-device", "prune", lambda w: ["prune", w.teacher, str(w.root / "p"), "--importance", str(w.base / "imp.safetensors"), "--device", "cuda:3"], "--device cuda:3"),
    ("prune-busy", "prune", lambda w: ["prune", w.teacher, w.busy_dir(), "--importance", str(w.base / "imp.safetensors")], "in use by another nas command (pid"),
    ("prune-readonly", "prune", lambda w: ["prune", w.teacher, str(w.readonly() / "p"), "--importance", str(w.base / "imp.safetensors")], "read-only"),
    ("prune-full-disk", "prune", lambda w: ["prune", w.teacher, str(w.full() / "p"), "--importance", str(w.base / "imp.safetensors")], "no space left"),
    # -- space
    ("space-budget-nan", "space", lambda w: ["space", w.teacher, "--budget", "nan"], "finite"),
    ("space-budget-inf", "space", lambda w: ["space", w.teacher, "--budget", "inf"], "finite"),
    ("space-budget-nan-share", "space", lambda w: ["space", w.teacher, "--budget", "nan%"], "budget share"),
    ("space-corrupt-config", "space", lambda w: ["space", w.model("config"), "--budget", "50%"], "config"),
    ("space-missing-teacher", "space", lambda w: ["space", str(w.root / "nope"), "--budget", "50%"], "does not exist"),
    # -- distill
    ("distill-truncated-student", D, lambda w: [D, w.teacher, w.model("truncated"), str(w.root / "o"), *w.data(), "--steps", "2"], "truncated"),
    ("distill-missing-tensor", D, lambda w: [D, w.teacher, w.model("missing"), str(w.root / "o"), *w.data(), "--steps", "2"], "lacks 1 tensor"),
    ("distill-extra-tensor", D, lambda w: [D, w.model("extra"), w.teacher, str(w.root / "o"), *w.data(), "--steps", "2"], "does not have"),
    ("distill-corrupt-tokenizer", D, lambda w: [D, w.model("tokenizer"), w.teacher, str(w.root / "o"), *w.data(), "--steps", "2"], "tokenizer"),
    ("distill-binary-data", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(w.binary()), "--steps", "2"], "not UTF-8 text"),
    ("distill-seq-len", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(), "--seq-len", "1024", "--steps", "2"], "max_position_embeddings"),
    ("distill-out-is-student", D, lambda w: [D, w.teacher, str(w.base / "teacher"), w.teacher, *w.data(), "--steps", "2"], "is the input"),
    ("distill-out-contains-inputs", D, lambda w: [D, w.teacher, w.teacher, str(w.base), *w.data(), "--steps", "2"], "contains the input"),
    ("distill-out-is-file", D, lambda w: [D, w.teacher, w.teacher, w.file(), *w.data(), "--steps", "2"], "existing file"),
    ("distill-bad-device", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(), "--device", "cuda:1"], "--device cuda:1"),
    ("distill-unknown-device", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(), "--device", "gpu0"], "not a device name"),
    ("distill-busy", D, lambda w: [D, w.teacher, w.teacher, w.busy_dir(), *w.data(), "--steps", "2"], "in use by another nas command (pid"),
    ("distill-readonly", D, lambda w: [D, w.teacher, w.teacher, str(w.readonly() / "o"), *w.data(), "--steps", "2"], "read-only"),
    ("distill-full-disk", D, lambda w: [D, w.teacher, w.teacher, str(w.full() / "o"), *w.data(), "--steps", "2", "--batch-size", "2", "--eval-sequences", "2"], "no space left"),
    # -- correct
    ("correct-truncated-teacher", "correct", lambda w: ["correct", w.model("truncated"), str(w.root / "o"), *w.data(), "--steps", "2"], "truncated"),
    ("correct-garbage-weights", "correct", lambda w: ["correct", w.model("garbage"), str(w.root / "o"), *w.data(), "--steps", "2"], "unreadable"),
    ("correct-corrupt-tokenizer", "correct", lambda w: ["correct", w.model("tokenizer"), str(w.root / "o"), *w.data(), "--steps", "2"], "tokenizer"),
    ("correct-out-is-teacher", "correct", lambda w: ["correct", w.teacher, w.teacher, *w.data(), "--steps", "2"], "is the input"),
    ("correct-binary-jsonl", "correct", lambda w: ["correct", w.teacher, str(w.root / "o"), *w.data(w.binary(".jsonl")), "--steps", "2"], "not UTF-8 text"),
    ("correct-seq-len", "correct", lambda w: ["correct", w.teacher, str(w.root / "o"), *w.data(), "--seq-len", "600", "--steps", "2"], "max_position_embeddings"),
    ("correct-bad-device", "correct", lambda w: ["correct", w.teacher, str(w.root / "o"), *w.data(), "--device", "mps"], "--device mps"),
    ("correct-busy", "correct", lambda w: ["correct", w.teacher, w.busy_dir(), *w.data(), "--steps", "2"], "in use by another nas command (pid"),
    # -- eval
    ("eval-truncated-weights", "eval", lambda w: ["eval", w.model("truncated"), *w.data()], "truncated"),
    ("eval-missing-tensor", "eval", lambda w: ["eval", w.model("missing"), *w.data()], "lacks 1 tensor"),
    ("eval-extra-tensor", "eval", lambda w: ["eval", w.model("extra"), *w.data()], "does not have"),
    ("eval-no-val-sequences", "eval", lambda w: ["eval", w.teacher, *w.data(), "--val-sequences", "0", "--out", str(w.root / "e.json")], "--val-sequences"),
    ("eval-seq-len", "eval", lambda w: ["eval", w.teacher, *w.data(), "--seq-len", "513", "--out", str(w.root / "e.json")], "max_position_embeddings"),
    ("eval-binary-data", "eval", lambda w: ["eval", w.teacher, *w.data(w.binary()), "--out", str(w.root / "e.json")], "not UTF-8 text"),
    ("eval-out-is-dir", "eval", lambda w: ["eval", w.teacher, *w.data(), "--out", str(w.root)], "is a directory"),
    ("eval-out-is-model-file", "eval", lambda w: ["eval", w.teacher, *w.data(), "--out", w.teacher + "/config.json"], "inside the input"),
    ("eval-bad-device", "eval", lambda w: ["eval", w.teacher, *w.data(), "--device", "cuda:0", "--out", str(w.root / "e.json")], "--device cuda:0"),
    ("eval-busy", "eval", lambda w: ["eval", w.teacher, *w.data(), "--out", w.busy_dir("e.json", False)], "in use by another nas command (pid"),
    ("eval-readonly", "eval", lambda w: ["eval", w.teacher, *w.data(), "--out", str(w.readonly() / "e.json")], "read-only"),
    # -- search
    ("search-unknown-scheme", "search", lambda w: ["search", w.study(), "--storage", "redis://localhost/0"], "unknown study storage"),
    ("search-unreachable-postgres", "search", lambda w: ["search", w.study(), "--storage", w.closed_postgres()], "Connection refused"),
    ("search-corrupt-sqlite", "search", lambda w: ["search", w.study(), "--storage", w.sqlite("garbage")], "not a readable SQLite database"),
    ("search-truncated-sqlite", "search", lambda w: ["search", w.study(), "--storage", w.sqlite("truncated")], "not a readable SQLite database"),
    ("search-out-dir-is-file", "search", lambda w: ["search", w.study(out_dir=w.file())], "existing file"),
    ("search-out-dir-is-teacher", "search", lambda w: ["search", w.study(out_dir=w.teacher)], "is the input"),
    ("search-truncated-teacher", "search", lambda w: ["search", w.study(teacher=w.model("truncated"))], "truncated"),
    ("search-binary-data", "search", lambda w: ["search", w.study(data={"sources": [{"path": w.binary()}]})], "not UTF-8 text"),
    ("search-seq-len", "search", lambda w: ["search", w.study(data={"seq_len": 2048})], "max_position_embeddings"),
    ("search-bad-device", "search", lambda w: ["search", w.study(device="cuda:3")], "--device cuda:3"),
    ("search-busy", "search", lambda w: ["search", w.study(out_dir=w.busy_dir())], "in use by another nas command (pid"),
    ("search-budget-nan", "search", lambda w: ["search", w.study(budget="nan")], "budget"),
    ("search-budget-inf", "search", lambda w: ["search", w.study(budget="inf")], "budget"),
    ("search-readonly", "search", lambda w: ["search", w.study(out_dir=str(w.readonly() / "s"))], "read-only"),
    # -- run
    ("run-corrupt-sqlite", "run", lambda w: ["run", w.study(), "--storage", w.sqlite("garbage")], "not a readable SQLite database"),
    ("run-unknown-scheme", "run", lambda w: ["run", w.study(), "--storage", "file:///tmp/x"], "unknown study storage"),
    ("run-unreachable-postgres", "run", lambda w: ["run", w.study(), "--storage", w.closed_postgres()], "Connection refused"),
    ("run-busy", "run", lambda w: ["run", w.study(out_dir=w.busy_dir())], "in use by another nas command (pid"),
    ("run-out-dir-inside-teacher", "run", lambda w: ["run", w.study(out_dir=w.teacher + "/study")], "inside the input"),
    ("run-missing-tensor", "run", lambda w: ["run", w.study(teacher=w.model("missing"))], "lacks 1 tensor"),
    # -- worker
    ("worker-unreachable-postgres", "worker", lambda w: ["worker", "--storage", w.closed_postgres(), "--study", "fault"], "Connection refused"),
    ("worker-unknown-scheme", "worker", lambda w: ["worker", "--storage", "mongodb://x/y", "--study", "fault"], "unknown study storage"),
    ("worker-corrupt-sqlite", "worker", lambda w: ["worker", "--storage", w.sqlite("garbage"), "--study", "s"], "not a readable SQLite database"),
    ("worker-truncated-sqlite", "worker", lambda w: ["worker", "--storage", w.sqlite("truncated"), "--study", "s"], "not a readable SQLite database"),
    ("worker-missing-study", "worker", lambda w: ["worker", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "nope"], "no study 'nope'"),
    ("worker-not-a-nas-study", "worker", lambda w: ["worker", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s"], "not created by nas"),
    ("worker-importance-missing", "worker", lambda w: ["worker", "--storage", w.nas_study(importance=False), "--study", "fault"], "importance file"),
    # -- report
    ("report-unreachable-postgres", "report", lambda w: ["report", "--storage", w.closed_postgres(), "--study", "s", "--out", str(w.root / "r.html")], "Connection refused"),
    ("report-unknown-scheme", "report", lambda w: ["report", "--storage", "sqlite:/relative.db", "--study", "s", "--out", str(w.root / "r.html")], "unknown study storage"),
    ("report-corrupt-sqlite", "report", lambda w: ["report", "--storage", w.sqlite("garbage"), "--study", "s", "--out", str(w.root / "r.html")], "not a readable SQLite database"),
    ("report-truncated-sqlite", "report", lambda w: ["report", "--storage", w.sqlite("truncated"), "--study", "s", "--out", str(w.root / "r.html")], "not a readable SQLite database"),
    ("report-missing-sqlite", "report", lambda w: ["report", "--storage", f"sqlite:///{w.root / 'none.db'}", "--study", "s", "--out", str(w.root / "r.html")], "no SQLite file"),
    ("report-out-is-dir", "report", lambda w: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", str(w.root)], "is a directory"),
    ("report-busy", "report", lambda w: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", w.busy_dir("r.html", False)], "in use by another nas command (pid"),
    ("report-readonly", "report", lambda w: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", str(w.readonly() / "r.html")], "read-only"),
    # -- demo
    ("demo-out-is-file", "demo", lambda w: ["demo", "--out", w.file()], "existing file"),
    ("demo-readonly", "demo", lambda w: ["demo", "--out", str(w.readonly() / "demo")], "read-only"),
    ("demo-busy", "demo", lambda w: ["demo", "--out", w.busy_dir()], "in use by another nas command (pid"),
    ("demo-bad-device", "demo", lambda w: ["demo", "--out", str(w.root / "demo"), "--device", "cuda:2"], "--device cuda:2"),
    ("demo-minutes-nan", "demo", lambda w: ["demo", "--out", str(w.root / "demo"), "--minutes", "nan"], "--minutes"),
    ("demo-minutes-inf", "demo", lambda w: ["demo", "--out", str(w.root / "demo"), "--minutes", "inf"], "--minutes"),
    # -- issue 25: a numerically broken teacher (non-finite or non-floating weights)
    ("importance-inf-weight", "importance", lambda w: ["importance", w.broken("inf", "model.layers.3.mlp.down_proj.weight"), *w.data(), "--out", str(w.root / "i.st")], "tensor model.layers.3.mlp.down_proj.weight holds 1 NaN/inf"),
    ("search-nan-embedding", "search", lambda w: ["search", w.study(teacher=w.broken("nan", "model.embed_tokens.weight"))], "tensor model.embed_tokens.weight holds 1 NaN/inf"),
    ("distill-nan-student", D, lambda w: [D, w.teacher, w.broken("nan", "lm_head.weight"), str(w.root / "o"), *w.data(), "--steps", "2"], "tensor lm_head.weight holds"),
    ("prune-int16-weight", "prune", lambda w: ["prune", w.broken("dtype", "model.layers.0.input_layernorm.weight:int16"), str(w.root / "p"), "--importance", str(w.base / "imp.safetensors")], "tensor model.layers.0.input_layernorm.weight is I16, not floating point"),
    ("eval-uint8-weight", "eval", lambda w: ["eval", w.broken("dtype", "model.layers.2.self_attn.v_proj.weight:uint8"), *w.data(), "--out", str(w.root / "e.json")], "is U8, not floating point"),
    ("importance-overflowing-teacher", "importance", lambda w: ["importance", w.broken("huge", "model.layers.1.self_attn.k_proj.weight"), *w.data(), "--num-samples", "4", "--val-sequences", "2", "--out", str(w.root / "i.st")], "the teacher's outputs are not finite"),
    # -- a tokenizer with more tokens than the embedding
    ("importance-big-tokenizer", "importance", lambda w: ["importance", w.broken("big-tokenizer"), *w.data(), "--out", str(w.root / "i.st")], "but its vocab_size (the embedding) is 320"),
    ("correct-big-tokenizer", "correct", lambda w: ["correct", w.broken("big-tokenizer"), str(w.root / "o"), *w.data(), "--steps", "2"], "has 325 tokens"),
    ("eval-big-tokenizer", "eval", lambda w: ["eval", w.broken("big-tokenizer"), *w.data(), "--out", str(w.root / "e.json")], "has 325 tokens"),
    # -- files and databases that are not nas's: refused, read-only
    ("report-foreign-sqlite", "report", lambda w: ["report", "--storage", w.foreign_db(), "--study", "s", "--out", str(w.root / "r.html")], "not an Optuna study storage"),
    ("worker-foreign-sqlite", "worker", lambda w: ["worker", "--storage", w.foreign_db(), "--study", "s"], "database of other tables (notes)"),
    ("report-empty-sqlite-file", "report", lambda w: ["report", "--storage", f"sqlite:///{w.users_file('empty.db', '')}", "--study", "s", "--out", str(w.root / "r.html")], "is an empty file"),
    ("search-foreign-sqlite", "search", lambda w: ["search", w.study(), "--storage", w.foreign_db()], "nas never writes into it"),
    ("report-out-users-html", "report", lambda w: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", w.users_file("mine.html", "<html>mine</html>")], "nas did not write; pass --overwrite"),
    ("eval-out-users-json", "eval", lambda w: ["eval", w.teacher, *w.data(), "--out", w.users_file("results.json", '{"mine": 1}')], "nas did not write; pass --overwrite"),
    ("importance-out-users-safetensors", "importance", lambda w: ["importance", w.teacher, *w.data(), "--out", str(shutil.copy(w.base / "teacher" / "model.safetensors", w.root / "w.safetensors"))], "nas did not write"),
    ("distill-out-holds-users-model", D, lambda w: [D, w.teacher, w.teacher, str(Path(w.file("runs/model/notes.txt")).parent.parent), *w.data(), "--steps", "2"], "holds model that nas did not write"),
    ("correct-out-holds-users-metrics", "correct", lambda w: ["correct", w.teacher, str(Path(w.file("mine/metrics.jsonl")).parent), *w.data(), "--steps", "2", "--restart"], "holds metrics.jsonl that nas did not write"),
    # -- records without usable text: counted, refused past max_skipped_share
    ("importance-records-other-field", "importance", lambda w: ["importance", w.teacher, *w.data(w.lossy_jsonl(lambda r: {"body": r["text"]})), "--out", str(w.root / "i.st")], "42 of 125 records"),
    ("distill-records-text-list", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(w.lossy_jsonl(lambda r: {"text": [r["text"]]}, every=10)), "--steps", "2"], "lossy.jsonl:2 (list)"),
    ("eval-parquet-nulls", "eval", lambda w: ["eval", w.teacher, *w.data(w.lossy_jsonl(lambda r: {"text": None}, suffix=".parquet")), "--out", str(w.root / "e.json")], "lossy.parquet row 1 (NoneType)"),
    ("search-records-all-numbers", "search", lambda w: ["search", w.study(data={"sources": [{"path": w.lossy_jsonl(lambda r: {"text": 3.5}, every=1)}]})], "125 records skipped"),
    ("correct-share-too-small", "correct", lambda w: ["correct", w.teacher, str(w.root / "o"), *w.data(w.lossy_jsonl(lambda r: {"text": True}, every=50)), "--max-skipped-share", "0.001", "--steps", "2"], "more than max_skipped_share"),
    # -- library errors turned into one line where nas calls the library
    ("distill-negative-beta", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(), "--betas", "-0.1", "0.9", "--steps", "2"], "--betas must each be in [0, 1)"),
    ("correct-beta-one", "correct", lambda w: [ "correct", w.teacher, str(w.root / "o"), *w.data(), "--betas", "0.9", "1.0", "--steps", "2"], "--betas must each be in [0, 1)"),
    ("distill-batch-not-multiple", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(), "--batch-size", "3", "--nproc-per-node", "2"], "--batch-size 3 must be a multiple of --nproc-per-node 2"),
    ("correct-batch-not-multiple", "correct", lambda w: ["correct", w.teacher, str(w.root / "o"), *w.data(), "--batch-size", "6", "--nproc-per-node", "4"], "use 4 or 8"),
    ("run-final-batch-not-multiple", "run", lambda w: ["run", w.study(final={"batch_size": 5}), "--nproc-per-node", "2"], "final distillation's batch_size 5"),
    ("worker-old-optuna-schema", "worker", lambda w: ["worker", "--storage", w.old_optuna_db(), "--study", "s"], "schema of another Optuna version"),
    ("report-old-optuna-schema", "report", lambda w: ["report", "--storage", w.old_optuna_db(), "--study", "s", "--out", str(w.root / "r.html")], "optuna storage upgrade"),
    # -- every study setting checked before anything is computed, naming the TOML field
    ("search-max-memory-unreadable", "search", lambda w: ["search", w.study(constraints={"max_memory": "12 parsecs"})], "constraints.max_memory"),
    ("run-max-memory-too-small", "run", lambda w: ["run", w.study(constraints={"max_memory": "2KB"})], "constraints.max_memory = '2KB'"),
    ("search-budget-above-teacher", "search", lambda w: ["search", w.study(budget="3B")], "budget = '3B'"),
    ("run-budget-too-small", "run", lambda w: ["run", w.study(budget=["75%", "40"])], "budget = ['75%', '40']"),
    ("search-tpe-two-budgets", "search", lambda w: ["search", w.study(budget=["50%", "75%"], search={"strategy": "tpe"})], "search.strategy = tpe"),
    # -- messages that name the real cause
    ("importance-config-no-heads", "importance", lambda w: ["importance", w.broken("no-field", "num_attention_heads"), *w.data(), "--out", str(w.root / "i.st")], "lacks num_attention_heads"),
    ("distill-student-config-no-ffn", D, lambda w: [D, w.teacher, w.broken("no-field", "intermediate_size"), str(w.root / "o"), *w.data(), "--steps", "2"], "lacks intermediate_size"),
    ("space-config-no-vocab", "space", lambda w: ["space", w.broken("no-field", "vocab_size"), "--budget", "50%"], "lacks vocab_size"),
    ("search-study-is-dir", "search", lambda w: ["search", str(w.root)], "is a directory"),
    ("run-study-is-dir", "run", lambda w: ["run", str(w.base)], "is a directory; give the study's TOML file"),
    # -- noticed in passing
    ("worker-max-trials-negative", "worker", lambda w: ["worker", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--max-trials", "-2"], "--max-trials must be at least 1"),
    ("worker-max-trials-zero", "worker", lambda w: ["worker", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--max-trials", "0"], "--max-trials must be at least 1"),
    # -- issue 33: special files (a device, a FIFO) as outputs and inputs, one line before any read
    *[(f"importance-out-{k}", "importance", lambda w, o=o: ["importance", w.teacher, *w.data(), "--out", o(w)], m) for k, o, m in SPECIAL],
    *[(f"prune-out-{k}", "prune", lambda w, o=o: ["prune", w.teacher, o(w), "--importance", str(w.base / "imp.safetensors")], m) for k, o, m in SPECIAL],
    *[(f"distill-out-{k}", D, lambda w, o=o: [D, w.teacher, w.teacher, o(w), *w.data(), "--steps", "2"], m) for k, o, m in SPECIAL],
    *[(f"eval-out-{k}", "eval", lambda w, o=o: ["eval", w.teacher, *w.data(), "--out", o(w)], m) for k, o, m in SPECIAL],
    *[(f"report-out-{k}", "report", lambda w, o=o: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", o(w)], m) for k, o, m in SPECIAL],
    ("prune-importance-fifo", "prune", lambda w: ["prune", w.teacher, str(w.root / "p"), "--importance", w.fifo("i.safetensors")], "importance file " ),
    ("importance-data-fifo", "importance", lambda w: ["importance", w.teacher, *w.data(w.fifo("c.jsonl")), "--out", str(w.root / "i.st")], "is a FIFO (named pipe)"),
    ("eval-config-fifo", "eval", lambda w: ["eval", w.model("fifo-config"), *w.data(), "--out", str(w.root / "e.json")], "config.json is a FIFO (named pipe)"),
    ("search-study-fifo", "search", lambda w: ["search", w.fifo("s.toml")], "study file"),
    ("report-storage-fifo", "report", lambda w: ["report", "--storage", f"sqlite:///{w.fifo('storage-pipe')}", "--study", "s", "--out", str(w.root / "r.html")], "study storage"),
    ("report-storage-dev-zero", "report", lambda w: ["report", "--storage", "sqlite:////dev/zero", "--study", "s", "--out", str(w.root / "r.html")], "/dev/zero is a character device"),
    # -- issue 33: weights that do not fit the config; a checkpoint with pickled RNG states
    ("importance-wrong-shape", "importance", lambda w: ["importance", w.model("shape"), *w.data(), "--out", str(w.root / "i.st")], "tensor model.layers.1.mlp.up_proj.weight has shape [98, 64] in the file but [96, 64] in the config"),
    ("eval-wrong-shape", "eval", lambda w: ["eval", w.model("shape"), *w.data(), "--out", str(w.root / "e.json")], "has shape [98, 64] in the file but [96, 64]"),
    ("distill-wrong-shape-student", D, lambda w: [D, w.teacher, w.model("shape"), str(w.root / "o"), *w.data(), "--steps", "2"], "tensor model.layers.1.mlp.up_proj.weight has shape [98, 64]"),
    ("distill-previous-format-checkpoint", D, lambda w: w.previous_format_run(), "a pickle nas no longer reads; convert it once with `python -m nas.train.checkpoint"),
]  # fmt: skip


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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fault_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch):
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


def test_the_table_covers_every_sub_command():
    from collections import Counter

    counts = Counter(c[1] for c in CASES)
    assert set(counts) == {"importance", "prune", "space", "search", "run", "worker", "report", "distill",
                           "correct", "eval", "demo"}  # fmt: skip
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_changed_settings_are_refused_until_restart(workspace, capsys):
    """A finished distillation re-run with the same settings returns it; with another --lr it is refused
    (naming the setting and the ways out) and nothing changes; --restart runs it afresh."""
    w = workspace
    out = w.root / "run"
    argv = [
        D,
        w.teacher,
        w.teacher,
        str(out),
        *w.data(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-sequences",
        "2",
    ]
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["training"]["lr"] == 1e-4
    assert main(argv) == 0  # same settings: the finished result
    before = tree_digest(out)
    line = one_line_error(capsys, [*argv, "--lr", "3e-4"])
    assert "training.lr: 0.0001 -> 0.0003" in line and "new output directory" in line and "--restart" in line
    assert tree_digest(out) == before
    other_student = w.model("extra").replace("extra", "student")
    shutil.copytree(w.teacher, other_student)
    line = one_line_error(capsys, [D, w.teacher, other_student, *argv[3:]])
    assert "student.from" in line
    assert main([*argv, "--lr", "3e-4", "--restart"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["training"]["lr"] == 3e-4


@pytest.mark.slow
def test_a_study_with_another_budget_or_teacher_never_reuses_its_trials(workspace, capsys):
    w = workspace
    assert main(["search", w.study(search={"n_trials": 1})]) == 0
    before = tree_digest(w.root / "studies")
    line = one_line_error(capsys, ["search", w.study(budget="60%", search={"n_trials": 1})])
    assert 'budget: "75%" -> "60%"' in line and "new name" in line and "--restart" in line
    teacher = w.root / "other-teacher"
    write_tiny_teacher(teacher, seed=1, num_layers=3)
    line = one_line_error(capsys, ["search", w.study(teacher=str(teacher), search={"n_trials": 1})])
    assert "teacher_arch.num_layers: 4 -> 3" in line
    assert tree_digest(w.root / "studies") == before
    # raising n_trials continues the same study
    assert main(["search", w.study(search={"n_trials": 2})]) == 0
    study = optuna.load_study(study_name="fault", storage=f"sqlite:///{w.root / 'studies/fault/study.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) >= 2
    assert main(["search", w.study(budget="60%", search={"n_trials": 1}), "--restart"]) == 0


def lock_holder_pid(lock: Path, deadline: float) -> int:
    while time.time() < deadline:
        if lock.is_file() and lock.read_text().strip():
            return int(lock.read_text())
        time.sleep(0.1)
    raise AssertionError(f"no lock at {lock}")


@pytest.mark.slow
def test_a_second_command_is_refused_and_kill_9_leaves_no_stale_lock(workspace, capsys):
    w = workspace
    out = w.root / "run"
    argv = [D, w.teacher, w.teacher, str(out), *w.data(), "--steps", "100000", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", *argv], env=env, stderr=subprocess.DEVNULL)
    try:
        pid = lock_holder_pid(out / ".nas.lock", time.time() + 120)
        assert pid == proc.pid
        line = one_line_error(capsys, argv)
        assert f"in use by another nas command (pid {proc.pid})" in line
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    from nas.lock import own_output

    with own_output(out):  # the kernel dropped the dead process's lock
        pass
    assert main([*argv[:-4], "--steps", "2", "--batch-size", "2", "--restart"]) == 0


# A writer of metrics.jsonl killed by SIGKILL halfway through a line: the real loop, with the one append
# of (step, kind) written half (flushed to disk) before the process kills itself.
KILL_MID_LINE = """
import json, os, signal, sys
import nas.train.loop as loop
real, step, kind = loop.append_log, int(sys.argv[1]), sys.argv[2]
def torn(path, record):
    if record["step"] == step and (record["loss"] is None) == (kind == "val"):
        line = json.dumps(record).encode()
        with open(path, "ab") as f:
            f.write(line[: len(line) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, record)
loop.append_log = torn
from nas.cli.main import main
sys.exit(main(sys.argv[3:]))
"""


def losses(out: Path) -> list[tuple]:
    """(step, train loss, val loss) of every line of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["val_loss"]) for r in records]


@pytest.mark.slow
@pytest.mark.parametrize(("command", "kind", "step"), [("distill", "train", 3), ("correct", "val", 4)])
def test_a_writer_killed_mid_line_resumes_to_the_same_loss(workspace, caplog, command, kind, step):
    w = workspace
    models = [w.teacher, w.teacher] if command == D else [w.teacher]
    run = ["--steps", "6", "--batch-size", "2", "--eval-every", "2", "--eval-sequences", "2"]
    run += ["--checkpoint-every", "2", "--log-every", "1"]
    assert main([command, *models, str(w.root / "whole"), *w.data(), *run]) == 0
    cut = w.root / "cut"
    argv = [command, *models, str(cut), *w.data(), *run]
    child = subprocess.run([sys.executable, "-c", KILL_MID_LINE, str(step), kind, *argv], capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert not (cut / "metrics.jsonl").read_bytes().endswith(b"\n")  # torn mid-line
    assert main(argv) == 0  # resumes from the last checkpoint (before `step`)
    assert "dropped a torn last line" in caplog.text
    assert losses(cut) == losses(w.root / "whole")
    whole = safetensors.torch.load_file(str(w.root / "whole" / "model" / "model.safetensors"))
    resumed = safetensors.torch.load_file(str(cut / "model" / "model.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole) and whole.keys() == resumed.keys()


def test_eval_takes_the_models_length_when_it_has_fewer_positions_than_the_default(base, tmp_path, capsys):
    short = tmp_path / "short"
    write_tiny_teacher(short, max_position_embeddings=48)
    argv = ["eval", str(short), "--data", str(base / "corpus.jsonl"), "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--val-sequences", "2"]) == 0
    assert "fewer than the default --seq-len 512: using --seq-len 48" in capsys.readouterr().out
    record = json.loads((short / "eval.json").read_text())
    assert [p["seq_len"] for p in record["perplexity"].values()] == [48]
    assert (
        main([*argv, "--seq-len", "64"]) == 2
    )  # a length given explicitly is still refused past the model's


def test_overwrite_replaces_a_file_nas_did_not_write_and_then_owns_it(base, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("user notes, not JSON\n")
    argv = ["eval", str(base / "teacher"), "--data", str(base / "corpus.jsonl"), *SEQ, "--val-sequences", "2"]
    argv += ["--cache-dir", str(base / "cache"), "--out", str(out)]
    assert main(argv) == 2 and out.read_text() == "user notes, not JSON\n"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(out.read_text())["generator"] == "nas"
    assert main(argv) == 0  # nas's file now: updated without --overwrite


def test_a_few_skipped_records_are_a_warning_with_their_count_and_first_place(workspace, caplog, tmp_path):
    lossy = workspace.lossy_jsonl(lambda r: {"title": "Genesis"}, every=100)  # 2 of 125 records
    argv = [
        "importance",
        workspace.teacher,
        *workspace.data(lossy),
        "--num-samples",
        "4",
        "--val-sequences",
        "2",
    ]
    assert (
        main(
            [
                *argv,
                "--max-skipped-share",
                "0.05",
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "i.st"),
            ]
        )
        == 0
    )
    assert f"2 of 125 records of {lossy} have no usable text field 'text'" in caplog.text
    assert f"the first at {lossy}:2 (missing)" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize(("command", "line"), [("distill", 1), ("correct", 3)])
def test_a_log_changed_before_its_last_line_is_refused_on_resume(workspace, capsys, command, line):
    """Only a torn last line is a crash's; a bad line before it was written by something else: the resume
    is refused (one line naming the file and line), and nothing changes."""
    w = workspace
    models = [w.teacher, w.teacher] if command == D else [w.teacher]
    argv = [command, *models, str(w.root / "run"), *w.data(), "--steps", "4", "--batch-size", "2"]
    argv += ["--eval-every", "2", "--eval-sequences", "2", "--checkpoint-every", "2", "--log-every", "1"]
    assert main(argv) == 0
    metrics = w.root / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1][:10] + "\n"
    metrics.write_text("".join(lines))
    before = tree_digest(w.root)
    message = one_line_error(capsys, argv)
    assert f"metrics.jsonl:{line} is not a JSON object" in message and "repair or delete that line" in message
    assert tree_digest(w.root) == before


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_a_special_output_ends_the_real_command_at_once(workspace, kind):
    """The installed entry point (transformers' own log handlers and all) given a never-ending output:
    one line and exit code 2, long before the 60 s a command that read it would still be running at."""
    out = workspace.fifo() if kind == "fifo" else kind
    argv = ["importance", workspace.teacher, *workspace.data(), "--out", out]
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "nas.cli", *argv], capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.startswith("nas:")]
    assert done.returncode == 2 and len(lines) == 1 and "not a regular file" in lines[0], done.stderr[-2000:]
    assert time.monotonic() - start < 60
