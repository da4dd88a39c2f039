"""Faults of `nas demo`: each case one line on stderr, exit code 2, nothing changed (the
runner and the faulty inputs: `tests/cli/faults.py`)."""

from __future__ import annotations

from tests.cli.faults import check_fault, fault_table

# (case id, sub-command, argv builder, what the one line must say)
CASES = [
    # -- demo
    ("demo-out-is-file", "demo", lambda w: ["demo", "--out", w.file()], "existing file"),
    ("demo-readonly", "demo", lambda w: ["demo", "--out", str(w.readonly() / "demo")], "read-only"),
    ("demo-busy", "demo", lambda w: ["demo", "--out", w.busy_dir()], "in use by another nas command (pid"),
    ("demo-bad-device", "demo", lambda w: ["demo", "--out", str(w.root / "demo"), "--device", "cuda:2"], "--device cuda:2"),
    ("demo-minutes-nan", "demo", lambda w: ["demo", "--out", str(w.root / "demo"), "--minutes", "nan"], "--minutes"),
    ("demo-minutes-inf", "demo", lambda w: ["demo", "--out", str(w.root / "demo"), "--minutes", "inf"], "--minutes"),
]  # fmt: skip


@fault_table(CASES)
def test_fault_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch):
    check_fault(case, workspace, capsys, monkeypatch)
