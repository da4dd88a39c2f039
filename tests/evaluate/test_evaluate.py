"""Evaluation: the perplexity protocol, the offline `kjv_cloze` and `kjv_lastword` tasks through the
real lm-eval harness, and `nas eval`."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas.cli.main import main
from nas.data.kjv import HELD_OUT_BOOKS, kjv_path
from nas.errors import ConfigError
from nas.evaluate.harness import TASKS_DIR, eval_json_path, evaluate_models, run_tasks
from nas.evaluate.loss import lm_loss, perplexity
from nas.settings import DistillConfig
from nas.testing import tiny_model, write_kjv_corpus
from nas.train.loop import distill

CLOZE = TASKS_DIR / "kjv_cloze" / "kjv_cloze.jsonl"
LASTWORD = TASKS_DIR / "kjv_lastword" / "kjv_lastword.jsonl"
MEMORISED_ITEMS = 16  # the first cloze items, whose verses the trained model learns by heart
SEQ_LEN = 64
SIZES = dict(hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4, num_query_groups=2)


def cloze_items() -> list[dict]:
    return [json.loads(line) for line in CLOZE.read_text(encoding="utf-8").splitlines()]


class FixedSequences:
    """The same packed sequences as training batches and as validation: data to learn by heart."""

    def __init__(self, sequences: torch.Tensor) -> None:
        self.sequences = sequences

    def val(self, n: int | None = None) -> torch.Tensor:
        return self.sequences[:n]

    def train_batch(self, step: int, batch_size: int, total_steps: int) -> torch.Tensor:
        return self.sequences


@pytest.fixture(scope="module")
def memorised(tokenizer, tmp_path_factory):
    """A tiny model trained (plain LM loss through `nas.train.loop`) on the verses of the first cloze items
    until it knows them by heart, and those verses packed into [N, SEQ_LEN] sequences."""
    ids: list[int] = []
    for item in cloze_items()[:MEMORISED_ITEMS]:
        verse = f"{item['context']} {item['endings'][item['label']]}"
        ids += tokenizer(verse)["input_ids"] + [tokenizer.eos_token_id]
    rows = len(ids) // SEQ_LEN
    sequences = torch.tensor(ids[: rows * SEQ_LEN]).view(rows, SEQ_LEN)
    model = tiny_model(vocab_size=len(tokenizer), **SIZES)
    steps = 60
    cfg = DistillConfig(
        steps=steps, batch_size=rows, lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_every=steps,
        eval_sequences=rows, checkpoint_every=10**6, log_every=10**6, device="cpu",
    )  # fmt: skip
    distill(None, model, FixedSequences(sequences), cfg, tmp_path_factory.mktemp("memorise"))
    return model.eval(), sequences


# ---- the perplexity protocol


def test_memorised_text_has_perplexity_near_one(memorised, tokenizer):
    model, sequences = memorised
    untrained = tiny_model(vocab_size=len(tokenizer), **SIZES)
    assert perplexity(model, sequences) < 1.2
    # a random model is close to uniform over the vocabulary
    assert perplexity(untrained, sequences) > 0.5 * len(tokenizer)


def test_protocol_is_token_weighted_and_independent_of_batch_size(memorised, tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), **SIZES)
    _, sequences = memorised
    whole = lm_loss(model, sequences, batch_size=len(sequences))
    assert lm_loss(model, sequences, batch_size=3) == pytest.approx(whole, rel=1e-6)
    # one sequence scored alone: the mean of its T - 1 next-token losses
    logits = model(input_ids=sequences[:1]).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, sequences[0, 1:]).item()
    assert lm_loss(model, sequences[:1]) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, sequences, batch_size=len(sequences)) == pytest.approx(
        math.exp(whole), rel=1e-12
    )


def test_same_numbers_in_memory_and_after_save_and_load(memorised, tmp_path):
    model, sequences = memorised
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert lm_loss(loaded, sequences, batch_size=5) == lm_loss(model, sequences, batch_size=5)


# ---- the offline task


def test_kjv_cloze_is_rebuilt_identically_from_the_held_out_book():
    from nas.evaluate.tasks.make_kjv_cloze import held_out_verses, make_items

    verses = {v["citation"]: v for v in held_out_verses()}
    items = cloze_items()
    assert make_items(list(verses.values())) == items  # the committed file is the generator's output
    assert 250 <= len(items) <= 400 and CLOZE.stat().st_size < 200_000
    assert HELD_OUT_BOOKS == ("Hebrews",) and kjv_path().exists()
    for item in items:
        verse = verses[item["citation"]]
        assert verse["book"] in HELD_OUT_BOOKS
        assert f"{item['context']} {item['endings'][item['label']]}" == " ".join(verse["text"].split())
        assert len(set(item["endings"])) == 4
    # the answer's position is balanced, so no position bias can win
    positions = [sum(item["label"] == k for item in items) / len(items) for k in range(4)]
    assert all(0.15 < p < 0.35 for p in positions)


def test_kjv_lastword_is_rebuilt_identically_from_the_held_out_book():
    from nas.evaluate.tasks.make_kjv_cloze import held_out_verses
    from nas.evaluate.tasks.make_kjv_lastword import make_items

    verses = {v["citation"]: v for v in held_out_verses()}
    items = [json.loads(line) for line in LASTWORD.read_text(encoding="utf-8").splitlines()]
    assert make_items(list(verses.values())) == items  # the committed file is the generator's output
    assert 250 <= len(items) <= 303 and LASTWORD.stat().st_size < 100_000
    finals = {" ".join(v["text"].split()).split()[-1].rstrip(".,;:?!)") for v in verses.values()}
    for item in items:
        truth = item["endings"][item["label"]]
        assert f"{item['context']} {truth}" == " ".join(verses[item["citation"]]["text"].split())
        words = [e.rstrip(".,;:?!)") for e in item["endings"]]
        assert len({w.lower() for w in words}) == 4 and set(words) <= finals  # real verse-final words
        assert all(w.isalpha() and len(w) >= 3 for w in words)
        punct = truth[len(words[item["label"]]) :]  # the verse's own final punctuation, on every choice
        assert item["endings"] == [w + punct for w in words]
    positions = [sum(item["label"] == k for item in items) / len(items) for k in range(4)]
    assert all(0.15 < p < 0.35 for p in positions)


@pytest.mark.slow  # the real lm-eval harness: seconds per task run
def test_kjv_lastword_runs_through_the_harness(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), **SIZES)
    metrics = run_tasks(model, tokenizer, ["kjv_lastword"], limit=8, batch_size=32)["kjv_lastword"]
    assert metrics["samples"] == 8
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0


@pytest.mark.slow  # the real lm-eval harness: seconds per task run
def test_kjv_cloze_through_the_harness_random_vs_trained(memorised, tokenizer):
    trained, _ = memorised
    random_model = tiny_model(vocab_size=len(tokenizer), **SIZES)
    scores = {}
    for name, model in (("random", random_model), ("trained", trained)):
        result = run_tasks(model, tokenizer, ["kjv_cloze"], limit=MEMORISED_ITEMS, batch_size=16)
        metrics = result["kjv_cloze"]
        assert metrics["samples"] == MEMORISED_ITEMS
        assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
        scores[name] = metrics["acc"]
    assert scores["random"] <= 0.5
    assert scores["trained"] >= 0.75 and scores["trained"] > scores["random"]


@pytest.mark.slow  # the real lm-eval harness: seconds per task run
def test_tasks_sharing_verses_score_the_same_together_as_alone(memorised, tokenizer):
    # kjv_cloze and kjv_lastword split the same verses at different points; lm-eval's logits cache
    # would score one task's true choice with the other's logits if both ran in one evaluation
    trained, _ = memorised
    together = run_tasks(
        trained, tokenizer, ["kjv_cloze", "kjv_lastword"], limit=MEMORISED_ITEMS, batch_size=32
    )
    alone = run_tasks(trained, tokenizer, ["kjv_lastword"], limit=MEMORISED_ITEMS, batch_size=32)
    assert together["kjv_lastword"] == alone["kjv_lastword"]
    assert alone["kjv_lastword"]["acc"] >= 0.5  # it knows most of these verses by heart


def test_missing_include_path_is_a_config_error(tokenizer, tmp_path):
    model = tiny_model(vocab_size=len(tokenizer), **SIZES)
    with pytest.raises(ConfigError, match="not a directory"):
        run_tasks(model, tokenizer, ["kjv_cloze"], include_paths=[tmp_path / "nope"])


@pytest.mark.slow  # indexes lm-eval's ~15k built-in tasks to be sure the name is nowhere
def test_unknown_task_names_available_ones(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), **SIZES)
    with pytest.raises(ConfigError, match="kjv_cloze.*--include-path"):
        run_tasks(model, tokenizer, ["kjv_clozee"])


# ---- nas eval


def test_nas_eval_prints_a_table_and_writes_eval_json(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model(vocab_size=len(tokenizer), **SIZES).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = write_kjv_corpus(tmp_path / "corpus.jsonl", limit=2000)
    data = ["--data", str(corpus), "--seq-len", "32", "--cache-dir", str(tmp_path / "cache")]
    argv = ["eval", str(model_dir), *data, "--val-sequences", "6", "--tasks", "kjv_cloze", "--limit", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kjv_cloze" in out and "perplexity" in out and "eval.json" in out
    record = json.loads((model_dir / "eval.json").read_text())
    assert eval_json_path(model_dir) == model_dir / "eval.json"
    assert eval_json_path("Qwen/Qwen3-0.6B").name == "eval-Qwen--Qwen3-0.6B.json"
    ppl = record["perplexity"][str(corpus)]
    assert ppl["sequences"] == 6 and ppl["perplexity"] == pytest.approx(math.exp(ppl["loss"]))
    assert record["tasks"]["kjv_cloze"]["samples"] == 4 and 0 <= record["tasks"]["kjv_cloze"]["acc"] <= 1


def test_nas_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "kjv_cloze"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2  # nothing to evaluate is reported before loading anything
    assert "--data" in capsys.readouterr().err


@pytest.mark.slow  # the real lm-eval harness: seconds per task run
def test_evaluate_models_gives_one_row_per_model(tokenizer, tmp_path):
    dirs = []
    for seed in (0, 1):
        dirs.append(tmp_path / f"m{seed}")
        tiny_model(vocab_size=len(tokenizer), seed=seed, **SIZES).save_pretrained(dirs[-1])
        tokenizer.save_pretrained(dirs[-1])
    table = evaluate_models(dirs, ["kjv_cloze"], limit=4, batch_size=16)
    assert list(table["model"]) == [str(d) for d in dirs]
    assert {"params", "kjv_cloze:acc", "kjv_cloze:acc_norm"} <= set(table.columns)
    assert table["kjv_cloze:acc"].between(0, 1).all()
