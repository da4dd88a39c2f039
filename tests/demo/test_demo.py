"""The embedded demo: real corpus, cached teacher, and the whole pipeline at a tiny size."""

import dataclasses
import json
import math

import numpy as np
import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nas.data.corpus import document_hash
from nas.data.kjv import HELD_OUT_BOOKS
from nas.demo.run import DemoPlan, closing_table, demo_plan, run_config, run_demo
from nas.demo.teacher import (
    MARKER,
    TeacherSpec,
    build_teacher,
    corpus_documents,
    load_teacher_info,
    teacher_key,
    train_texts,
    unigram_loss,
)
from nas.search.record import RECORD_VERSION, StudyRecord

TINY = DemoPlan(
    minutes=0.05,
    seq_len=32,
    max_documents=150,
    eval_sequences=4,
    teacher=TeacherSpec(
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        ffn_hidden_size=128,
        vocab_size=384,
        steps=6,
        batch_size=4,
        warmup_steps=1,
    ),
    budgets=("40%", "60%"),
    final_budget="60%",
    space={"tolerance": 0.15, "steps": {"hidden_size": 32, "ffn_hidden_size": 64}},
    importance={"num_samples": 8, "val_sequences": 4, "batch_size": 8},
    screen_top=3,
    finalists=2,
    horizon_tokens=4 * 2 * 32,  # 4 steps of batch_size x seq_len
    rung_tokens=2 * 2 * 32,
    batch_size=2,
    final_steps=2,
)


def test_corpus_is_kjv_chapters_without_held_out_books():
    docs = list(corpus_documents())
    assert docs[0]["book"] == "Genesis" and docs[0]["chapter"] == 1
    assert docs[0]["text"].startswith("In the beginning God created the heaven and the earth.\n")
    assert len(docs[0]["text"].splitlines()) == 31  # Genesis 1 has 31 verses
    assert sum(d["book"] == "Genesis" for d in docs) == 50
    assert docs[-1]["book"] == "Revelation" and docs[-1]["chapter"] == 22
    assert HELD_OUT_BOOKS and not {d["book"] for d in docs} & set(HELD_OUT_BOOKS)
    assert [d["chapter"] for d in corpus_documents(max_documents=3)] == [1, 2, 3]


def test_unigram_loss_of_uniform_counts_is_log_vocab():
    vocab = 16
    train = torch.arange(vocab).repeat(10)
    val = torch.randint(0, vocab, (3, 9))
    assert unigram_loss(train, val, vocab) == pytest.approx(math.log(vocab))


def test_demo_plan_scales_steps_with_minutes():
    base, half = demo_plan(10.0), demo_plan(5.0)
    assert half.teacher.steps == round(base.teacher.steps / 2)
    assert half.final_steps == round(base.final_steps / 2)
    assert sum(half.estimates().values()) < sum(base.estimates().values())


@pytest.mark.slow
def test_tiny_demo_writes_every_artifact_and_a_second_demo_searches_afresh(tmp_path, monkeypatch):
    """The whole demo at a tiny size writes every artifact; then `nas demo --minutes 3` then `--minutes 4`
    (at a reduced size): the longer demo trains another teacher, and its search starts over (new study,
    importance and teacher cache) instead of refusing the first run's outputs. One test, so that the first
    demo runs once for both (the longest test of this file)."""
    monkeypatch.chdir(tmp_path)  # the report goes to ./reports/
    out = tmp_path / "demo"
    result = run_demo(out, plan=TINY, device="cpu")

    teacher = out / "teacher"
    info = json.loads((teacher / MARKER).read_text())
    assert info["unigram_loss"] > 0 and math.isfinite(info["val_loss"])
    assert len(AutoTokenizer.from_pretrained(teacher)) == TINY.teacher.vocab_size
    # the tokenizer saw exactly the documents nas.data put in the train split
    corpus = out / "corpus" / "kjv.jsonl"
    cfg = run_config(out, corpus, TINY, "cpu")
    seen = {document_hash(t) for t in train_texts(corpus, cfg.data)}
    assert seen == set(np.load(next((out / "cache").glob("*/train.hashes.npy"))).tolist())
    assert (out / "importance.safetensors").is_file()
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{out / 'study.db'}")
    record = StudyRecord.read(study)
    assert record.record_version == RECORD_VERSION and record.winner["dir"] == str(
        result.winner_dir.resolve()
    )
    assert record.winner["budget"] == "60%" and list(study.user_attrs["winners"]) == ["60%"]
    assert [line.split(":")[0] for line in result.search] == ["budget 40%", "budget 60%"]
    assert all("2 to the horizon" in line or "3 to the horizon" in line for line in result.search)
    winner = AutoModelForCausalLM.from_pretrained(result.winner_dir)
    assert sum(p.numel() for p in winner.parameters()) == result.winner_params
    assert result.report is not None and result.report.is_file()
    assert (out / "scratch" / "model" / "config.json").is_file()
    table = closing_table(result)
    assert f"{result.winner_val_loss:.4f}" in table and f"{result.scratch_val_loss:.4f}" in table
    assert set(result.stage_seconds) == set(TINY.estimates())

    # every output of the study is one StudyPaths owns (what the next run clears), or the demo's own
    first = study.trials
    demo_own = {"teacher", "corpus", "cache", "scratch", "study.db"}
    written = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert written - demo_own == {p.name for p in cfg.paths.outputs()}
    assert {"teacher_cache", "winner-60pct", "final-60pct", "importance.safetensors"} <= written
    first_importance = (out / "importance.safetensors").stat().st_mtime_ns

    longer = dataclasses.replace(
        TINY, teacher=dataclasses.replace(TINY.teacher, steps=TINY.teacher.steps + 2)
    )
    result = run_demo(out, plan=longer, device="cpu")
    assert json.loads((teacher / MARKER).read_text()) != info  # another teacher
    assert (out / "importance.safetensors").stat().st_mtime_ns != first_importance
    study = optuna.load_study(study_name="demo", storage=f"sqlite:///{out / 'study.db'}")
    assert first and len(study.trials) == len(first)  # this run's trials only, every one finished
    assert all(t.state.is_finished() for t in study.trials)
    assert StudyRecord.read(study).winner["dir"] == str(result.winner_dir.resolve())

    # the complete teacher is found again; another spec or a missing marker is not
    key = teacher_key(longer.teacher, longer.seq_len, corpus)
    assert load_teacher_info(teacher, key).reused
    other = teacher_key(
        dataclasses.replace(longer.teacher, steps=longer.teacher.steps + 1), longer.seq_len, corpus
    )
    assert load_teacher_info(teacher, other) is None
    (teacher / MARKER).unlink()
    assert load_teacher_info(teacher, key) is None


def test_teacher_key_of_another_family_and_of_the_default_llama(tmp_path):
    """The demo's Llama keeps the key its teachers were saved under before `model_type`/`extras` existed (so
    they are reused), while another model type, or other extras, is another teacher; `build_teacher` builds
    that type."""
    corpus = tmp_path / "kjv.jsonl"
    corpus.write_text('{"text": "In the beginning"}\n')
    llama = TeacherSpec()
    assert set(teacher_key(llama, 32, corpus)["spec"]) == {f.name for f in dataclasses.fields(TeacherSpec)} - {
        "model_type", "extras"}
    hybrid = dataclasses.replace(llama, model_type="nemotron_h", num_layers=2,
                                 extras={"layers_block_type": ["linear_attention", "mlp"], "mamba_num_heads": 4})
    keys = [teacher_key(s, 32, corpus) for s in (llama, hybrid, dataclasses.replace(hybrid, extras={}))]
    assert keys[0] != keys[1] != keys[2]
    model = build_teacher(dataclasses.replace(hybrid, hidden_size=32, vocab_size=64), seq_len=16)
    assert model.config.model_type == "nemotron_h" and model.config.layers_block_type == ["linear_attention", "mlp"]
    assert model.config.mamba_num_heads == 4
