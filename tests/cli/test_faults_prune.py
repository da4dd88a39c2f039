"""Faults of `nas prune`: each case one line on stderr, exit code 2, nothing changed (the
runner and the faulty inputs: `tests/cli/faults.py`)."""

from __future__ import annotations

from pathlib import Path

from tests.cli.faults import SPECIAL, check_fault, fault_table

# (case id, sub-command, argv builder, what the one line must say)
CASES = [
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
    # -- issue 25: a numerically broken teacher (non-finite or non-floating weights)
    ("prune-int16-weight", "prune", lambda w: ["prune", w.broken("dtype", "model.layers.0.input_layernorm.weight:int16"), str(w.root / "p"), "--importance", str(w.base / "imp.safetensors")], "tensor model.layers.0.input_layernorm.weight is I16, not floating point"),
    # -- issue 33: special files (a device, a FIFO) as outputs and inputs, one line before any read
    *[(f"prune-out-{k}", "prune", lambda w, o=o: ["prune", w.teacher, o(w), "--importance", str(w.base / "imp.safetensors")], m) for k, o, m in SPECIAL],
    ("prune-importance-fifo", "prune", lambda w: ["prune", w.teacher, str(w.root / "p"), "--importance", w.fifo("i.safetensors")], "importance file " ),
]  # fmt: skip


@fault_table(CASES)
def test_fault_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch):
    check_fault(case, workspace, capsys, monkeypatch)
