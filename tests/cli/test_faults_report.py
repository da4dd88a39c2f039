"""Faults of `nas report`: each case one line on stderr, exit code 2, nothing changed (the
runner and the faulty inputs: `tests/cli/faults.py`)."""

from __future__ import annotations

from tests.cli.faults import SPECIAL, check_fault, fault_table

# (case id, sub-command, argv builder, what the one line must say)
CASES = [
    # -- report
    ("report-unreachable-postgres", "report", lambda w: ["report", "--storage", w.closed_postgres(), "--study", "s", "--out", str(w.root / "r.html")], "Connection refused"),
    ("report-unknown-scheme", "report", lambda w: ["report", "--storage", "sqlite:/relative.db", "--study", "s", "--out", str(w.root / "r.html")], "unknown study storage"),
    ("report-corrupt-sqlite", "report", lambda w: ["report", "--storage", w.sqlite("garbage"), "--study", "s", "--out", str(w.root / "r.html")], "not a readable SQLite database"),
    ("report-truncated-sqlite", "report", lambda w: ["report", "--storage", w.sqlite("truncated"), "--study", "s", "--out", str(w.root / "r.html")], "not a readable SQLite database"),
    ("report-missing-sqlite", "report", lambda w: ["report", "--storage", f"sqlite:///{w.root / 'none.db'}", "--study", "s", "--out", str(w.root / "r.html")], "no SQLite file"),
    ("report-out-is-dir", "report", lambda w: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", str(w.root)], "is a directory"),
    ("report-busy", "report", lambda w: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", w.busy_dir("r.html", False)], "in use by another nas command (pid"),
    ("report-readonly", "report", lambda w: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", str(w.readonly() / "r.html")], "read-only"),
    # -- files and databases that are not nas's: refused, read-only
    ("report-foreign-sqlite", "report", lambda w: ["report", "--storage", w.foreign_db(), "--study", "s", "--out", str(w.root / "r.html")], "not an Optuna study storage"),
    ("report-empty-sqlite-file", "report", lambda w: ["report", "--storage", f"sqlite:///{w.users_file('empty.db', '')}", "--study", "s", "--out", str(w.root / "r.html")], "is an empty file"),
    ("report-out-users-html", "report", lambda w: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", w.users_file("mine.html", "<html>mine</html>")], "nas did not write; pass --overwrite"),
    # -- library errors turned into one line where nas calls the library
    ("report-old-optuna-schema", "report", lambda w: ["report", "--storage", w.old_optuna_db(), "--study", "s", "--out", str(w.root / "r.html")], "optuna storage upgrade"),
    # -- issue 33: special files (a device, a FIFO) as outputs and inputs, one line before any read
    *[(f"report-out-{k}", "report", lambda w, o=o: ["report", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--out", o(w)], m) for k, o, m in SPECIAL],
    ("report-storage-fifo", "report", lambda w: ["report", "--storage", f"sqlite:///{w.fifo('storage-pipe')}", "--study", "s", "--out", str(w.root / "r.html")], "study storage"),
    ("report-storage-dev-zero", "report", lambda w: ["report", "--storage", "sqlite:////dev/zero", "--study", "s", "--out", str(w.root / "r.html")], "/dev/zero is a character device"),
]  # fmt: skip


@fault_table(CASES)
def test_fault_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch):
    check_fault(case, workspace, capsys, monkeypatch)
