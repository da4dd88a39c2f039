"""Faults of `nas importance`: each case one line on stderr, exit code 2, nothing changed (the
runner and the faulty inputs: `tests/cli/faults.py`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from nas.cli.main import main
from tests.cli.faults import SPECIAL, check_fault, fault_table

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
    # -- issue 25: a numerically broken teacher (non-finite or non-floating weights)
    ("importance-inf-weight", "importance", lambda w: ["importance", w.broken("inf", "model.layers.3.mlp.down_proj.weight"), *w.data(), "--out", str(w.root / "i.st")], "tensor model.layers.3.mlp.down_proj.weight holds 1 NaN/inf"),
    ("importance-overflowing-teacher", "importance", lambda w: ["importance", w.broken("huge", "model.layers.1.self_attn.k_proj.weight"), *w.data(), "--num-samples", "4", "--val-sequences", "2", "--out", str(w.root / "i.st")], "the teacher's outputs are not finite"),
    # -- a tokenizer with more tokens than the embedding
    ("importance-big-tokenizer", "importance", lambda w: ["importance", w.broken("big-tokenizer"), *w.data(), "--out", str(w.root / "i.st")], "but its vocab_size (the embedding) is 320"),
    # -- files and databases that are not nas's: refused, read-only
    ("importance-out-users-safetensors", "importance", lambda w: ["importance", w.teacher, *w.data(), "--out", str(shutil.copy(w.base / "teacher" / "model.safetensors", w.root / "w.safetensors"))], "nas did not write"),
    # -- records without usable text: counted, refused past max_skipped_share
    ("importance-records-other-field", "importance", lambda w: ["importance", w.teacher, *w.data(w.lossy_jsonl(lambda r: {"body": r["text"]})), "--out", str(w.root / "i.st")], "42 of 125 records"),
    # -- messages that name the real cause
    ("importance-config-no-heads", "importance", lambda w: ["importance", w.broken("no-field", "num_attention_heads"), *w.data(), "--out", str(w.root / "i.st")], "lacks num_attention_heads"),
    # -- issue 33: special files (a device, a FIFO) as outputs and inputs, one line before any read
    *[(f"importance-out-{k}", "importance", lambda w, o=o: ["importance", w.teacher, *w.data(), "--out", o(w)], m) for k, o, m in SPECIAL],
    ("importance-data-fifo", "importance", lambda w: ["importance", w.teacher, *w.data(w.fifo("c.jsonl")), "--out", str(w.root / "i.st")], "is a FIFO (named pipe)"),
    # -- issue 33: weights that do not fit the config; a checkpoint with pickled RNG states
    ("importance-wrong-shape", "importance", lambda w: ["importance", w.model("shape"), *w.data(), "--out", str(w.root / "i.st")], "tensor model.layers.1.mlp.up_proj.weight has shape [98, 64] in the file but [96, 64] in the config"),
]  # fmt: skip


@fault_table(CASES)
def test_fault_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch):
    check_fault(case, workspace, capsys, monkeypatch)


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
