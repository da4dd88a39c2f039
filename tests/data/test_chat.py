"""Chat data: conversations rendered with the teacher tokenizer's chat template, alone and in blends, in
the data layer and through `nas run`, `nas importance` and `nas eval --data` (real KJV conversations)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tomli_w
import torch

from nas.cli.main import main
from nas.data.corpus import document_hash
from nas.data.kjv import kjv_conversations
from nas.data.tokens import prepare, split_of
from nas.errors import DataError
from nas.settings import DataConfig, Phase, Source
from nas.testing import CHATML, tiny_chat_tokenizer, tiny_study_config, write_kjv_chat, write_kjv_corpus

PLAIN = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def chat_config(tmp_path, path, **source) -> DataConfig:
    return DataConfig.single(
        str(path), messages_field="messages", seq_len=32, cache_dir=str(tmp_path / "c"), **source
    )


def cached_tokens(cache_dir) -> int:
    """Tokens the cache holds before packing, over every split and source (their meta.json)."""
    metas = [json.loads(p.read_text()) for p in cache_dir.glob("*/meta.json")]
    return sum(s["tokens"] for m in metas for s in m["splits"].values())


def test_a_chat_source_is_its_conversations_rendered_by_the_tokenizers_template(tmp_path, tokenizer):
    path = write_kjv_chat(tmp_path / "chat.jsonl", limit=3000)
    data = prepare(chat_config(tmp_path, path), tokenizer)
    conversations = kjv_conversations(3000)
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    assert rendered[0].startswith("<|im_start|>system\nYou know the King James Bible")
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in rendered)  # + EOS
    assert cached_tokens(tmp_path / "c") == expected
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    stream = data.train_batch(0, 64, 1).flatten().tolist()
    assert start in stream  # ChatML's special token is one token, not its characters
    assert data.chat_templates == {str(path): data.chat_templates[str(path)]}
    assert data.chat_templates[str(path)].startswith("tokenizer (sha1 ")


def test_a_named_or_jinja_template_renders_instead_and_changes_the_cache(tmp_path, tokenizer):
    path = write_kjv_chat(tmp_path / "chat.jsonl", limit=1000)
    tokenizer.chat_template = {"default": CHATML, "plain": PLAIN}
    try:
        default = prepare(chat_config(tmp_path, path), tokenizer)
        named = prepare(chat_config(tmp_path, path, chat_template="plain"), tokenizer)
        jinja = prepare(chat_config(tmp_path, path, chat_template=PLAIN), tokenizer)
    finally:
        tokenizer.chat_template = CHATML
    assert named.chat_templates[str(path)].startswith("plain (sha1 ")
    assert jinja.chat_templates[str(path)].startswith("jinja (sha1 ")
    assert named.chat_templates[str(path)][-14:] == jinja.chat_templates[str(path)][-14:]  # same text
    assert default.fingerprint != named.fingerprint
    assert (named.train_batch(0, 64, 1) == jinja.train_batch(0, 64, 1)).all()  # the same tokens
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert start not in named.train_batch(0, 64, 1).flatten().tolist()


def test_records_that_are_no_conversation_or_do_not_render_are_skipped_and_counted(
    tmp_path, tokenizer, caplog
):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}"
        + CHATML[len("{% for m in messages %}") :]
    )
    good = [{"messages": m} for m in kjv_conversations(600)]
    bad = [{"messages": [{"role": "tool", "content": "x"}]}, {"messages": "not a list"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    with caplog.at_level(logging.WARNING):
        prepare(chat_config(tmp_path, path, chat_template=strict, max_skipped_share=0.01), tokenizer)
    assert f"2 of 302 records of {path} have no renderable conversation in 'messages'" in caplog.text
    assert "chat.jsonl:301 (its chat template cannot render it: no tool turns)" in caplog.text
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:5] + bad[::-1]))
    with pytest.raises(DataError, match=r"2 of 7 records .*chat.jsonl:6 \(not a list of \{role, content\}"):
        prepare(chat_config(tmp_path, path, chat_template=strict), tokenizer)


def test_chat_data_needs_a_template_and_a_conversation_format(tmp_path):
    from nas.testing import tiny_tokenizer

    path = write_kjv_chat(tmp_path / "chat.jsonl", limit=200)
    with pytest.raises(DataError, match="chat data but .*chat_template"):
        prepare(chat_config(tmp_path, path), tiny_tokenizer())
    (tmp_path / "a.txt").write_text("In the beginning.\n")
    with pytest.raises(DataError, match="no conversations in it"):
        prepare(chat_config(tmp_path, tmp_path / "a.txt"), tiny_chat_tokenizer())
    with pytest.raises(Exception, match="set messages_field"):
        Source("x.jsonl", chat_template="plain")


def test_chat_parquet_and_a_blend_with_plain_text(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": kjv_conversations(3000)}), chat)
    text = write_kjv_corpus(tmp_path / "text.jsonl", limit=3000)
    sources = (Source(str(chat), 1.0, messages_field="messages"), Source(str(text), 1.0))
    data = prepare(DataConfig((Phase(sources),), seq_len=32, cache_dir=str(tmp_path / "c")), tokenizer)
    assert list(data.chat_templates) == [str(chat)]
    drawn = set(data.train_batch_sources(0, 64, 1).tolist())
    assert drawn == {0, 1}  # both sources feed the batches
    alone = prepare(chat_config(tmp_path, chat), tokenizer)
    assert alone.sizes("train") == data.sizes("train")[:1]  # the parquet conversations, as from .jsonl


def write_chat_study(tmp_path, blend: bool, mask: bool = False) -> str:
    """A tiny study TOML over a teacher whose tokenizer has a chat template, on KJV conversations
    (`blend`: and plain KJV text, half and half; `mask`: trained on the assistant turns only)."""
    from nas.testing import write_tiny_teacher

    write_tiny_teacher(tmp_path / "teacher", chat=True)
    chat = write_kjv_chat(tmp_path / "chat.jsonl")
    config = tiny_study_config(tmp_path, search={"n_trials": 2})
    sources = [{"path": str(chat), "messages_field": "messages"} | ({"mask_prompt": True} if mask else {})]
    if blend:
        sources.append({"path": config["data"]["sources"][0]["path"]})
    config["data"]["sources"] = sources
    path = tmp_path / "chat.toml"
    path.write_text(tomli_w.dumps(config))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "blend, mask", [(False, False), (True, False), (True, True)], ids=["chat", "blend", "masked"]
)
def test_a_study_runs_on_chat_data_and_records_its_template(tmp_path, capsys, monkeypatch, blend, mask):
    import optuna

    monkeypatch.chdir(tmp_path)  # the report goes to reports/ under the working directory

    from nas.search.record import StudyRecord

    toml = write_chat_study(tmp_path, blend, mask)
    assert main(["run", toml]) == 0
    assert "winner val loss" in capsys.readouterr().out
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/studies/tiny/study.db")
    templates = StudyRecord.read(study).chat_templates
    assert list(templates) == [str(tmp_path / "chat.jsonl")] and templates[
        str(tmp_path / "chat.jsonl")
    ].startswith("tokenizer (sha1 ")
    report = (tmp_path / "reports" / "tiny.html").read_text()
    assert "tokenizer (sha1 " in report


@pytest.mark.slow
def test_importance_and_eval_read_chat_data(tmp_path, capsys):
    from nas.testing import write_tiny_teacher

    teacher = write_tiny_teacher(tmp_path / "teacher", chat=True)
    chat = write_kjv_chat(tmp_path / "chat.jsonl", limit=3000)
    flags = [
        "--data",
        str(chat),
        "--messages-field",
        "messages",
        "--seq-len",
        "32",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    out = tmp_path / "imp.safetensors"
    assert (
        main(
            [
                "importance",
                str(teacher),
                "--out",
                str(out),
                *flags,
                "--num-samples",
                "8",
                "--val-sequences",
                "4",
            ]
        )
        == 0
    )
    assert main(["eval", str(teacher), "--out", str(tmp_path / "eval.json"), *flags]) == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["perplexity"][str(chat)]["chat_template"].startswith("tokenizer (sha1 ")


def test_a_plain_text_source_keeps_the_fingerprint_it_had_before_chat_data(tmp_path):
    """Studies, importance files and caches made before chat sources existed stay valid: an unset chat field
    is not part of the recorded data settings."""
    from nas.data.tokens import config_dict

    cfg = DataConfig.single("corpus.jsonl", seq_len=32)
    assert config_dict(cfg)["phases"][0]["sources"] == [
        {"path": "corpus.jsonl", "weight": 1.0, "text_field": "text", "config": None, "split": "train",
         "streaming": False, "max_documents": None, "max_skipped_share": 0.01}
    ]  # fmt: skip


def test_mask_prompt_trains_on_the_assistant_turns_only(tmp_path, tokenizer):
    path = write_kjv_chat(tmp_path / "chat.jsonl", limit=1000)
    data = prepare(chat_config(tmp_path, path, mask_prompt=True), tokenizer)
    tokens, mask = data.splits["train"][0], data.masks["train"][0]
    assert mask.shape == tokens.shape and 0 < mask.mean() < 1
    trained = tokenizer.decode(np.asarray(tokens)[np.asarray(mask) == 1].tolist())
    # the train split's conversations in order: each assistant turn with its end marker, then EOS
    answers = [c[-1]["content"] + "<|im_end|>\n</s>" for c in kjv_conversations(1000)]
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in kjv_conversations(1000)]
    splits = [split_of(document_hash(text), data_cfg(tmp_path)) for text in rendered]
    train = [a for a, split in zip(answers, splits, strict=True) if split == "train"]
    assert "".join(train).startswith(trained) and len(trained) > 1000  # the packed rows drop the tail
    batch, batch_mask = data.train_batch(3, 8, 10), data.train_mask(3, 8, 10)
    rows = data._draw(3, 8, 10)[1]
    assert (batch_mask.numpy() == np.asarray(mask)[rows]).all() and batch_mask.dtype == torch.bool
    unmasked = prepare(chat_config(tmp_path, path), tokenizer)
    assert unmasked.train_mask(3, 8, 10) is None  # every token trained on: no mask at all
    assert (unmasked.train_batch(3, 8, 10) == batch).all()  # the same tokens, only the loss differs


def data_cfg(tmp_path) -> DataConfig:
    return DataConfig.single("x.jsonl", seq_len=32, cache_dir=str(tmp_path / "c"))


def test_a_masked_loss_is_the_mean_over_the_trained_positions():
    from nas.testing import tiny_model
    from nas.train.kd import model_kd_loss

    torch.manual_seed(0)
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    mask = torch.rand(2, 12) < 0.5
    got = model_kd_loss(student, teacher, ids, loss_mask=mask).loss
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(ids).logits.float(), -1)
        log_q = torch.log_softmax(student(ids).logits.float(), -1)
        per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    positions = torch.cat([mask[:, 1:], mask[:, -1:]], 1)  # position t predicts token t + 1
    assert got.item() == pytest.approx(per_position[positions].mean().item(), rel=1e-5)
    assert model_kd_loss(student, teacher, ids, loss_mask=torch.ones_like(mask)).loss.item() == pytest.approx(
        model_kd_loss(student, teacher, ids).loss.item(), rel=1e-6
    )
    zero = model_kd_loss(student, teacher, ids, loss_mask=torch.zeros_like(mask)).loss
    zero.backward()  # a batch of prompts only: no loss, and backward still runs
    assert zero.item() == 0.0


def test_distill_on_masked_chat_data_trains_on_the_assistant_tokens(tmp_path, tokenizer):
    from nas.io import read_log
    from nas.settings import DistillConfig
    from nas.testing import tiny_model
    from nas.train.kd import model_kd_loss
    from nas.train.loop import distill

    path = write_kjv_chat(tmp_path / "chat.jsonl", limit=1000)
    data = prepare(chat_config(tmp_path, path, mask_prompt=True), tokenizer)
    teacher = tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    student = tiny_model("llama", seed=1, vocab_size=len(tokenizer))
    batch, mask = data.train_batch(0, 2, 1), data.train_mask(0, 2, 1)
    with torch.no_grad():
        want = model_kd_loss(student, teacher, batch, loss_mask=mask).loss.item()
        every = model_kd_loss(student, teacher, batch).loss.item()
    cfg = DistillConfig(steps=1, batch_size=2, eval_sequences=2, checkpoint_every=0, log_every=1)
    distill(teacher, student, data, cfg, tmp_path / "run")
    logged = next(r for r in read_log(tmp_path / "run" / "metrics.jsonl") if r["loss"] is not None)["loss"]
    assert logged == pytest.approx(want, rel=1e-5) and logged != pytest.approx(every, rel=1e-3)
