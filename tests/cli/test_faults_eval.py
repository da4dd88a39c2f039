"""Faults of `nas eval`: each case one line on stderr, exit code 2, nothing changed (the
runner and the faulty inputs: `tests/cli/faults.py`)."""

from __future__ import annotations

import json

from nas.cli.main import main
from nas.testing import write_tiny_teacher
from tests.cli.faults import SEQ, SPECIAL, check_fault, fault_table

# (case id, sub-command, argv builder, what the one line must say)
CASES = [
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
    # -- issue 25: a numerically broken teacher (non-finite or non-floating weights)
    ("eval-uint8-weight", "eval", lambda w: ["eval", w.broken("dtype", "model.layers.2.self_attn.v_proj.weight:uint8"), *w.data(), "--out", str(w.root / "e.json")], "is U8, not floating point"),
    # -- a tokenizer with more tokens than the embedding
    ("eval-big-tokenizer", "eval", lambda w: ["eval", w.broken("big-tokenizer"), *w.data(), "--out", str(w.root / "e.json")], "has 325 tokens"),
    # -- files and databases that are not nas's: refused, read-only
    ("eval-out-users-json", "eval", lambda w: ["eval", w.teacher, *w.data(), "--out", w.users_file("results.json", '{"mine": 1}')], "nas did not write; pass --overwrite"),
    # -- records without usable text: counted, refused past max_skipped_share
    ("eval-parquet-nulls", "eval", lambda w: ["eval", w.teacher, *w.data(w.lossy_jsonl(lambda r: {"text": None}, suffix=".parquet")), "--out", str(w.root / "e.json")], "lossy.parquet row 1 (NoneType)"),
    # -- issue 33: special files (a device, a FIFO) as outputs and inputs, one line before any read
    *[(f"eval-out-{k}", "eval", lambda w, o=o: ["eval", w.teacher, *w.data(), "--out", o(w)], m) for k, o, m in SPECIAL],
    ("eval-config-fifo", "eval", lambda w: ["eval", w.model("fifo-config"), *w.data(), "--out", str(w.root / "e.json")], "config.json is a FIFO (named pipe)"),
    # -- issue 33: weights that do not fit the config; a checkpoint with pickled RNG states
    ("eval-wrong-shape", "eval", lambda w: ["eval", w.model("shape"), *w.data(), "--out", str(w.root / "e.json")], "has shape [98, 64] in the file but [96, 64]"),
]  # fmt: skip


@fault_table(CASES)
def test_fault_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch):
    check_fault(case, workspace, capsys, monkeypatch)


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
