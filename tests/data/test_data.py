"""The data layer on real text (King James Bible verses) with a real BPE tokenizer trained in-process."""

import argparse
import json
import os
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nas.cli.train_commands import add_data_args, data_config_from_args
from nas.data.corpus import load_documents
from nas.data.kjv import kjv_verses
from nas.data.tokens import TokenData, check_disjoint, prepare
from nas.errors import ConfigError, DataError
from nas.settings import DataConfig, Phase, Source, data_config_from_dict, run_config_from_dict
from nas.testing import tiny_config

SEQ_LEN = 32


@pytest.fixture(scope="module")
def verses():
    return kjv_verses(3000)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, verses):
    """Three real-text sources of different formats; the .jsonl repeats the .txt's first 500 verses."""
    root = tmp_path_factory.mktemp("corpora")
    txt = root / "genesis.txt"
    txt.write_text("\n\n".join(verses[:1500]), encoding="utf-8")
    jsonl = root / "exodus.jsonl"
    lines = [json.dumps({"text": v, "n": i}) for i, v in enumerate(verses[1500:2500] + verses[:500])]
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parquet = root / "leviticus.parquet"
    pq.write_table(pa.table({"body": verses[2500:3000]}), parquet)
    return SimpleNamespace(txt=txt, jsonl=jsonl, parquet=parquet, root=root)


def blend(corpora, tmp_path, *phases, **kw) -> DataConfig:
    """A DataConfig of phases given as (start, [(source, weight), ...])."""
    built = tuple(
        Phase(tuple(Source(str(p), w, **extra) for p, w, extra in sources), start)
        for start, sources in phases
    )
    return DataConfig(built, seq_len=SEQ_LEN, cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def blend_cfg(corpora, tmp_path_factory) -> DataConfig:
    """Phase 0: the .txt and the .jsonl at 0.8 / 0.2; from 75% of the steps on: the .parquet alone."""
    return blend(
        corpora,
        tmp_path_factory.mktemp("blend"),
        (0.0, [(corpora.txt, 0.8, {}), (corpora.jsonl, 0.2, {})]),
        (0.75, [(corpora.parquet, 1.0, {"text_field": "body"})]),
    )


@pytest.fixture(scope="module")
def data(blend_cfg, tokenizer) -> TokenData:
    return prepare(blend_cfg, tokenizer)


def documents_in(rows: np.ndarray, tokenizer) -> list[str]:
    """The whole documents in a packed split (pieces between EOS; the cut-off last one dropped)."""
    stream = np.asarray(rows).reshape(-1).tolist()
    pieces, start = [], 0
    for i, token in enumerate(stream):
        if token == tokenizer.eos_token_id:
            pieces.append(tokenizer.decode(stream[start:i], clean_up_tokenization_spaces=False))
            start = i + 1
    return pieces


# ---- splits


def test_splits_hold_whole_documents_and_no_document_is_in_two(data, tokenizer, verses):
    docs = {split: set() for split in ("calib", "val", "train")}
    for split in docs:
        for rows in data.splits[split]:
            pieces = documents_in(rows, tokenizer)
            assert set(pieces) <= set(verses[:3000])  # packing kept documents intact
            docs[split] |= set(pieces)
    assert (
        not docs["calib"] & docs["val"]
        and not docs["calib"] & docs["train"]
        and not docs["val"] & docs["train"]
    )
    # the .jsonl repeats 500 of the .txt's verses: by content they still land in one split each
    assert sum(len(d) for d in docs.values()) > 0.95 * len(set(verses))
    assert 0.02 < len(docs["val"]) / len(set(verses)) < 0.08


def test_disjointness_check_reports_a_shared_document():
    hashes = {
        "calib": np.array([1, 2], np.uint64),
        "val": np.array([3], np.uint64),
        "train": np.array([4, 2], np.uint64),
    }
    with pytest.raises(DataError, match="1 documents are in both the calib and train"):
        check_disjoint(hashes)


def test_val_and_calib_are_fixed_and_cover_every_source(data):
    assert torch.equal(data.val(10), data.val()[:10])
    assert torch.equal(data.calib(7), data.calib(7))
    assert data.val(4).shape == (4, SEQ_LEN) and data.val(4).dtype == torch.int64
    # interleaved row by row: the first three rows are the first rows of the three sources
    firsts = torch.stack([torch.from_numpy(rows[0].astype(np.int64)) for rows in data.splits["val"]])
    assert torch.equal(data.val(3), firsts)


# ---- blends, phases, determinism


def test_blend_weights_are_honoured_over_10k_sequences(data):
    sources = np.concatenate([data.train_batch_sources(step, 100, 1000) for step in range(100)])
    assert len(sources) == 10_000
    assert abs(np.mean(sources == 0) - 0.8) < 0.05
    assert abs(np.mean(sources == 1) - 0.2) < 0.05
    # and each sequence really is a train row of the source it was drawn from
    batch, ids = data.train_batch(3, 16, 1000), data.train_batch_sources(3, 16, 1000)
    for row, source in zip(batch.numpy(), ids, strict=True):
        assert (data.splits["train"][source] == row).all(axis=1).any()


def test_phases_switch_at_their_start(data):
    total = 40
    phase_of = [data.phase_at(step, total) for step in range(total)]
    assert phase_of == [0] * 30 + [1] * 10
    assert set(np.concatenate([data.train_batch_sources(s, 8, total) for s in range(30)])) == {0, 1}
    assert set(np.concatenate([data.train_batch_sources(s, 8, total) for s in range(30, 40)])) == {2}


def test_a_resumed_run_sees_the_same_batches(data, blend_cfg, tokenizer):
    again = prepare(
        blend_cfg, tokenizer
    )  # what a resumed process does: batches depend on (config, seed, step)
    assert again.from_cache
    for step in (0, 17, 35):
        assert torch.equal(again.train_batch(step, 8, 40), data.train_batch(step, 8, 40))
    assert not torch.equal(data.train_batch(1, 8, 40), data.train_batch(2, 8, 40))
    other_seed = prepare(blend_cfg.replace(seed=1), tokenizer)
    assert other_seed.from_cache and other_seed.fingerprint != data.fingerprint
    assert not torch.equal(other_seed.train_batch(1, 8, 40), data.train_batch(1, 8, 40))


# ---- cache


def test_second_prepare_is_served_from_the_cache(corpora, tokenizer, tmp_path, verses):
    source = tmp_path / "ruth.txt"
    source.write_text("\n\n".join(verses[:800]), encoding="utf-8")
    cfg = DataConfig.single(str(source), seq_len=SEQ_LEN, cache_dir=str(tmp_path / "cache"))
    first = prepare(cfg, tokenizer)
    bins = sorted((tmp_path / "cache").rglob("*.bin"))
    mtimes = [p.stat().st_mtime_ns for p in bins]
    second = prepare(cfg, tokenizer)
    assert not first.from_cache and second.from_cache
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").rglob("*.bin"))] == mtimes
    assert torch.equal(first.val(), second.val()) and first.fingerprint == second.fingerprint
    assert next(iter(first.splits["train"])).dtype == np.uint16  # vocab < 65536
    # a changed file, or another seq_len, is tokenized anew
    source.write_text("\n\n".join(verses[:900]), encoding="utf-8")
    os.utime(source, ns=(mtimes[0] + 10**9, mtimes[0] + 10**9))
    assert not prepare(cfg, tokenizer).from_cache
    assert not prepare(
        DataConfig.single(str(source), seq_len=16, cache_dir=cfg.cache_dir), tokenizer
    ).from_cache


# ---- reading


def test_documents_of_each_format_and_of_a_directory(corpora, verses, tmp_path, caplog):
    assert list(load_documents(Source(str(corpora.txt)))) == verses[:1500]  # one per blank-line block
    assert list(load_documents(Source(str(corpora.jsonl), max_documents=3))) == verses[1500:1503]
    assert list(load_documents(Source(str(corpora.parquet), text_field="body"))) == verses[2500:3000]
    nested = tmp_path / "books" / "b"
    nested.mkdir(parents=True)
    (tmp_path / "books" / "a.txt").write_text(verses[0])
    (nested / "c.jsonl").write_text(json.dumps({"text": verses[1]}) + "\n" + json.dumps({"other": 1}) + "\n")
    (nested / "notes.md").write_text("skipped")
    assert list(load_documents(Source(str(tmp_path / "books"), max_skipped_share=0.5))) == verses[:2]
    assert f"1 of 3 records of {tmp_path / 'books'}" in caplog.text and "c.jsonl:2 (missing)" in caplog.text


# ---- errors


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: Source(str(d / "missing.jsonl")), "does not exist"),
        (lambda d: Source(str(d / "empty_dir")), "has no .txt, .jsonl, .parquet files"),
        (lambda d: Source(str(d / "table.csv")), "file type must be one of"),
        (lambda d: Source(str(d / "records.jsonl")), "text field 'text' is missing or empty in every record"),
        (lambda d: Source(str(d / "broken.jsonl")), "broken.jsonl:2 is not valid JSON"),
        (lambda d: Source(str(d / "cols.parquet")), "no column 'text'"),
        (lambda d: Source("allenai/c4", config="en"), "cannot load hub dataset allenai/c4 .*local"),
    ],
)
def test_bad_sources_raise_data_errors(tmp_path, make, message):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "table.csv").write_text("text\nIn the beginning\n")
    (tmp_path / "records.jsonl").write_text('{"body": "In the beginning"}\n{"text": ""}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "In the beginning"}\nnot json\n')
    pq.write_table(pa.table({"body": ["In the beginning"]}), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=message):
        list(load_documents(make(tmp_path)))


def test_a_corpus_too_small_says_how_many_tokens(tmp_path, tokenizer, verses):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(verses[:10]), encoding="utf-8")
    with pytest.raises(
        DataError, match=r"split has \d+ documents and \d+ tokens, fewer than one sequence of 32"
    ):
        prepare(DataConfig.single(str(small), seq_len=SEQ_LEN, cache_dir=str(tmp_path / "c")), tokenizer)


def test_asking_for_more_than_the_data_holds(data):
    n_val = len(data.val())
    with pytest.raises(DataError, match=f"asked for {n_val + 1} val sequences but the data has {n_val}"):
        data.val(n_val + 1)
    with pytest.raises(DataError, match="fewer than one batch of 100000"):
        data.train_batch(0, 100_000, 10)


def test_tokenizer_must_fit_the_teacher_embedding(tokenizer):
    """One rule wherever a tokenizer meets a model: a padded embedding is fine, ids past it are refused unless the
    only one is a pad/unk token (nas packs without padding; transformers' Qwen2/Qwen3.5 tokenizers add one at load
    to a tokenizer that lacks it)."""
    import copy

    from nas.errors import ModelError
    from nas.model.validate import check_tokenizer_fits

    check_tokenizer_fits(tokenizer, tiny_config(vocab_size=384), "t")  # padded embedding: fine
    with pytest.raises(ModelError, match="has 320 tokens but its vocab_size \\(the embedding\\) is 96"):
        check_tokenizer_fits(tokenizer, tiny_config(vocab_size=96), "t")
    padded = copy.deepcopy(tokenizer)
    padded.add_special_tokens({"pad_token": "<|endoftext|>"})  # id 320, one past a 320-row embedding
    check_tokenizer_fits(padded, tiny_config(vocab_size=320), "t")
    padded.add_tokens(["<extra>"])
    with pytest.raises(ModelError, match="1 id\\(s\\) from 321 on cannot be embedded"):
        check_tokenizer_fits(padded, tiny_config(vocab_size=320), "t")


# ---- configuration


def test_data_config_from_a_study_table(corpora):
    table = {
        "seq_len": 64,
        "phases": [
            {"start": 0.0, "sources": [{"path": str(corpora.txt)}]},
            {
                "start": 0.8,
                "sources": [{"path": "allenai/c4", "config": "en", "weight": 0.3, "streaming": True}],
            },
        ],
    }
    cfg = data_config_from_dict(table)
    assert cfg.seq_len == 64 and [p.start for p in cfg.phases] == [0.0, 0.8]
    assert cfg.phases[1].sources[0] == Source("allenai/c4", 0.3, config="en", streaming=True)
    assert data_config_from_dict({"sources": [{"path": "x.txt"}]}).phases[0].sources == (Source("x.txt"),)
    for bad, message in [
        ({"sources": [{"path": "x.txt", "wieght": 2}]}, "unknown field"),
        ({"phases": [{"start": 0.5, "sources": [{"path": "x.txt"}]}]}, "must start at 0.0"),
        ({"sources": [{"path": "x.txt", "weight": 0}]}, "weight must be > 0"),
        ({"sources": [], "phases": []}, "exactly one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            data_config_from_dict(bad)
    with pytest.raises(ConfigError, match="val_fraction"):
        run_config_from_dict(
            {"name": "s", "teacher": "t", "data": {"val_fraction": 0.0, "sources": [{"path": "x"}]}}
        )


def test_cli_data_flags_build_a_blend():
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    args = parser.parse_args(
        ["--data", "a.jsonl:0.7", "--data", "allenai/c4", "--data-config", "en", "--seq-len", "64"]
    )
    cfg = data_config_from_args(args)
    assert cfg.seq_len == 64
    assert [(s.path, s.weight, s.config) for s in cfg.phases[0].sources] == [
        ("a.jsonl", 0.7, "en"),
        ("allenai/c4", 1.0, "en"),
    ]
    with pytest.raises(ConfigError, match="--data"):
        data_config_from_args(parser.parse_args([]))
