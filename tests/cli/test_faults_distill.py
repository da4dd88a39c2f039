"""Faults of `nas distill` and `nas correct`: each case one line on stderr, exit code 2, nothing changed
(the runner and the faulty inputs: `tests/cli/faults.py`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nas.cli.main import main
from tests.cli.faults import SPECIAL, D, check_fault, fault_table, one_line_error, tree_digest

# (case id, sub-command, argv builder, what the one line must say)
CASES = [
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
    # -- issue 25: a numerically broken teacher (non-finite or non-floating weights)
    ("distill-nan-student", D, lambda w: [D, w.teacher, w.broken("nan", "lm_head.weight"), str(w.root / "o"), *w.data(), "--steps", "2"], "tensor lm_head.weight holds"),
    # -- a tokenizer with more tokens than the embedding
    ("correct-big-tokenizer", "correct", lambda w: ["correct", w.broken("big-tokenizer"), str(w.root / "o"), *w.data(), "--steps", "2"], "has 325 tokens"),
    # -- files and databases that are not nas's: refused, read-only
    ("distill-out-holds-users-model", D, lambda w: [D, w.teacher, w.teacher, str(Path(w.file("runs/model/notes.txt")).parent.parent), *w.data(), "--steps", "2"], "holds model that nas did not write"),
    ("correct-out-holds-users-metrics", "correct", lambda w: ["correct", w.teacher, str(Path(w.file("mine/metrics.jsonl")).parent), *w.data(), "--steps", "2", "--restart"], "holds metrics.jsonl that nas did not write"),
    # -- records without usable text: counted, refused past max_skipped_share
    ("distill-records-text-list", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(w.lossy_jsonl(lambda r: {"text": [r["text"]]}, every=10)), "--steps", "2"], "lossy.jsonl:2 (list)"),
    ("correct-share-too-small", "correct", lambda w: ["correct", w.teacher, str(w.root / "o"), *w.data(w.lossy_jsonl(lambda r: {"text": True}, every=50)), "--max-skipped-share", "0.001", "--steps", "2"], "more than max_skipped_share"),
    # -- library errors turned into one line where nas calls the library
    ("distill-negative-beta", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(), "--betas", "-0.1", "0.9", "--steps", "2"], "--betas must each be in [0, 1)"),
    ("correct-beta-one", "correct", lambda w: [ "correct", w.teacher, str(w.root / "o"), *w.data(), "--betas", "0.9", "1.0", "--steps", "2"], "--betas must each be in [0, 1)"),
    ("distill-batch-not-multiple", D, lambda w: [D, w.teacher, w.teacher, str(w.root / "o"), *w.data(), "--batch-size", "3", "--nproc-per-node", "2"], "--batch-size 3 must be a multiple of --nproc-per-node 2"),
    ("correct-batch-not-multiple", "correct", lambda w: ["correct", w.teacher, str(w.root / "o"), *w.data(), "--batch-size", "6", "--nproc-per-node", "4"], "use 4 or 8"),
    # -- messages that name the real cause
    ("distill-student-config-no-ffn", D, lambda w: [D, w.teacher, w.broken("no-field", "intermediate_size"), str(w.root / "o"), *w.data(), "--steps", "2"], "lacks intermediate_size"),
    # -- issue 33: special files (a device, a FIFO) as outputs and inputs, one line before any read
    *[(f"distill-out-{k}", D, lambda w, o=o: [D, w.teacher, w.teacher, o(w), *w.data(), "--steps", "2"], m) for k, o, m in SPECIAL],
    # -- issue 33: weights that do not fit the config; a checkpoint with pickled RNG states
    ("distill-wrong-shape-student", D, lambda w: [D, w.teacher, w.model("shape"), str(w.root / "o"), *w.data(), "--steps", "2"], "tensor model.layers.1.mlp.up_proj.weight has shape [98, 64]"),
    ("distill-previous-format-checkpoint", D, lambda w: w.previous_format_run(), "a pickle nas no longer reads; convert it once with `python -m nas.train.checkpoint"),
]  # fmt: skip


@fault_table(CASES)
def test_fault_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch):
    check_fault(case, workspace, capsys, monkeypatch)


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
