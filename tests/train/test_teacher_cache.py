"""The teacher cache: cached KD == dense KD where the cache holds the whole distribution, analytic
gradients == autograd of the bucketed KL, cache write and reuse (also by two processes at once), and
every bad state (another teacher, tokenizer, data or horizon; a truncated file; a killed writer) is an
error or a rewrite, never a silent mismatch."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.data.kjv import kjv_verses
from nas.data.tokens import prepare
from nas.errors import TeacherCacheError
from nas.settings import DataConfig, DistillConfig, load_run_config
from nas.testing import tiny_model, tiny_study_config, tiny_tokenizer
from nas.train.kd import cached_kd_loss, model_cached_kd_loss, model_kd_loss
from nas.train.loop import distill
from nas.train.teacher_cache import (
    DIRNAME,
    ensure_teacher_cache,
    open_teacher_cache,
    teacher_source,
    teacher_topk,
)

VOCAB = 320
SEQ_LEN = 32


def make_data(root: Path, tokenizer, verses: int = 3000):
    root.mkdir(parents=True, exist_ok=True)
    text = root / f"kjv-{verses}.txt"
    text.write_text("\n\n".join(kjv_verses(verses)), encoding="utf-8")
    return prepare(DataConfig.single(str(text), seq_len=SEQ_LEN, cache_dir=str(root / "cache")), tokenizer)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, tokenizer):
    return make_data(tmp_path_factory.mktemp("data"), tokenizer)


def sharp_teacher(seed: int = 0) -> torch.nn.Module:
    """A tiny teacher with a scaled-up head, so its distributions are far from uniform."""
    teacher = tiny_model("llama", seed=seed, vocab_size=VOCAB)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    return teacher


def run_cfg(**kw) -> DistillConfig:
    base = dict(steps=4, batch_size=2, lr=3e-3, min_lr=3e-4, eval_every=0, eval_sequences=4)
    return DistillConfig(**(base | dict(checkpoint_every=0, log_every=1, chunk_tokens=24) | kw))


# ---- the loss


@pytest.mark.parametrize("temperature,ce_weight", [(1.0, 0.0), (2.0, 0.3)])
def test_full_distribution_cache_gives_the_dense_loss_and_gradients(temperature, ce_weight):
    teacher, student = sharp_teacher(), tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2)
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    kw = dict(temperature=temperature, ce_weight=ce_weight, chunk_tokens=20)
    dense = model_kd_loss(student, teacher, ids, **kw)
    dense_grads = torch.autograd.grad(dense.loss, list(student.parameters()))
    targets = teacher_topk(teacher, ids, VOCAB, temperature, chunk=20)
    assert torch.isinf(targets[2]).all()  # k = vocab: no rest mass
    cached = model_cached_kd_loss(student, ids, targets, **kw)
    cached_grads = torch.autograd.grad(cached.loss, list(student.parameters()))
    torch.testing.assert_close(cached.loss, dense.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.kl, dense.kl, rtol=1e-5, atol=1e-6)
    for a, b in zip(cached_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_top_k_gradient_is_autograd_of_the_bucketed_kl_in_float64(k):
    gen = torch.Generator().manual_seed(k)
    n, h, v, temperature = 11, 8, 50, 1.5
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    log_p = torch.log_softmax(3 * torch.randn(n, v, generator=gen), -1)
    top, ids = log_p.topk(k, -1)
    log_rest = torch.logsumexp(log_p.scatter(1, ids, -math.inf), -1)
    loss = cached_kd_loss(hidden, weight, ids, top, log_rest, temperature=temperature, chunk_tokens=4).loss
    grads = torch.autograd.grad(loss, (hidden, weight))
    # the reference: KL over (top-k tokens, one rest bucket), written plainly, differentiated by autograd
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    log_q = torch.log_softmax(h64 @ w64.t() / temperature, -1)
    log_q_rest = torch.logsumexp(log_q.scatter(1, ids, -math.inf), -1)
    top64, rest64 = top.double(), log_rest.double()
    kl = (top64.exp() * (top64 - log_q.gather(1, ids))).sum(1) + rest64.exp() * (rest64 - log_q_rest)
    reference = kl.mean()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, torch.autograd.grad(reference, (h64, w64)), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)
    assert reference <= (log_p.exp().double() * (log_p.double() - log_q)).sum(1).mean() + 1e-9  # lower bound


# ---- write, reuse, train


def test_distilling_from_a_full_vocab_cache_equals_dense_distillation(token_data, tokenizer, tmp_path):
    teacher, cfg = sharp_teacher(), run_cfg()
    cache, written = ensure_teacher_cache(tmp_path, teacher, tokenizer, token_data, cfg, VOCAB + 5)
    assert written and cache.settings.topk == VOCAB and cache.settings.value_dtype == "float32"
    students = [tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2) for _ in range(2)]
    dense = distill(teacher, students[0], token_data, cfg, tmp_path / "dense")
    cached = distill(cache, students[1], token_data, cfg, tmp_path / "cached")
    assert cached.val_kl is None and dense.val_kl is not None  # the teacher stayed out of the cached run
    assert cached.val_loss == pytest.approx(dense.val_loss, rel=1e-4)
    for a, b in zip(students[0].parameters(), students[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_cache_is_written_once_then_reused_and_chosen_only_for_its_own_run(token_data, tokenizer, tmp_path):
    teacher, cfg = sharp_teacher(), run_cfg()
    cache, written = ensure_teacher_cache(tmp_path, teacher, tokenizer, token_data, cfg, 16)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / DIRNAME).iterdir()}
    again, written_again = ensure_teacher_cache(tmp_path, teacher, tokenizer, token_data, cfg, 16)
    assert written and not written_again
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / DIRNAME).iterdir()}
    # 16 ids (uint16) + 16 log-probs (fp16) + the rest (fp32) per token
    sizes = sum((tmp_path / DIRNAME / n).stat().st_size for n in ("ids.bin", "logp.bin", "rest.bin"))
    assert sizes == cfg.steps * cfg.batch_size * SEQ_LEN * (16 * 2 + 16 * 2 + 4)
    ids, logp, rest = again.targets(3, token_data.train_batch(3, cfg.batch_size, cfg.steps))
    fresh = teacher_topk(teacher, token_data.train_batch(3, cfg.batch_size, cfg.steps), 16, 1.0, 24)
    mass = logp.exp().sum(-1) + rest.exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=3e-3, rtol=0)  # fp16 log-probs
    torch.testing.assert_close(torch.sort(ids, -1).values, torch.sort(fresh[0], -1).values)
    assert teacher_source(teacher, cache, cfg, token_data) is cache
    final = run_cfg(steps=8)  # e.g. the winner's final distillation: other batches, dense KD
    assert teacher_source(teacher, cache, final, token_data) is teacher
    with pytest.raises(TeacherCacheError, match="steps 4"):
        distill(cache, tiny_model("llama", vocab_size=VOCAB, num_layers=2), token_data, final, tmp_path / "x")


# ---- bad states


def test_a_cache_for_another_teacher_tokenizer_data_or_horizon_is_an_error(token_data, tokenizer, tmp_path):
    teacher, cfg = sharp_teacher(), run_cfg()
    ensure_teacher_cache(tmp_path, teacher, tokenizer, token_data, cfg, 8)
    other_tokenizer = tiny_tokenizer(VOCAB - 20)
    other_data = make_data(tmp_path / "other", tokenizer, verses=2500)
    cases = [
        ("another teacher", dict(teacher=sharp_teacher(seed=5))),
        ("another tokenizer", dict(tokenizer=other_tokenizer)),
        ("other data", dict(data=other_data)),
        ("steps = 4 \\(now 6\\)", dict(cfg=run_cfg(steps=6))),
        ("topk = 8 \\(now 9\\)", dict(topk=9)),
    ]
    base = dict(teacher=teacher, tokenizer=tokenizer, data=token_data, cfg=cfg, topk=8)
    for message, change in cases:
        with pytest.raises(TeacherCacheError, match=message):
            ensure_teacher_cache(tmp_path, **(base | change))


def test_a_batch_from_other_data_is_refused(token_data, tokenizer, tmp_path):
    cache, _ = ensure_teacher_cache(tmp_path, sharp_teacher(), tokenizer, token_data, run_cfg(), 8)
    with pytest.raises(TeacherCacheError, match="micro-batch 2 differs"):
        cache.targets(2, token_data.train_batch(3, 2, 4))


def test_a_truncated_or_altered_file_is_an_error_and_is_rewritten(token_data, tokenizer, tmp_path, caplog):
    teacher, cfg = sharp_teacher(), run_cfg()
    ensure_teacher_cache(tmp_path, teacher, tokenizer, token_data, cfg, 8)
    directory = tmp_path / DIRNAME
    logp = directory / "logp.bin"
    before = logp.read_bytes()
    logp.write_bytes(before[: len(before) // 2])
    with pytest.raises(TeacherCacheError, match="truncated"):
        open_teacher_cache(directory)
    cache, written = ensure_teacher_cache(tmp_path, teacher, tokenizer, token_data, cfg, 8)
    assert written and logp.read_bytes() == before and "damaged" in caplog.text
    rest = directory / "rest.bin"
    rest.write_bytes(b"\0" * rest.stat().st_size)  # same size, other content
    with pytest.raises(TeacherCacheError, match="digest"):
        open_teacher_cache(directory)
    _, written = ensure_teacher_cache(tmp_path, teacher, tokenizer, token_data, cfg, 8)
    assert written and open_teacher_cache(directory).settings == cache.settings


# ---- processes


def cache_script(root: Path, teacher_dir: Path, corpus: Path, topk: int, steps: int) -> str:
    """A process that builds (or waits for) the cache and prints whether it wrote it."""
    return textwrap.dedent(f"""
        import json, logging, sys
        logging.basicConfig(level=logging.INFO)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from nas.data.tokens import prepare
        from nas.settings import DataConfig, DistillConfig
        from nas.train.teacher_cache import ensure_teacher_cache
        tokenizer = AutoTokenizer.from_pretrained({str(teacher_dir)!r})
        data = prepare(DataConfig.single({str(corpus)!r}, seq_len={SEQ_LEN}, cache_dir={str(root / "cache")!r}),
                       tokenizer)
        teacher = AutoModelForCausalLM.from_pretrained({str(teacher_dir)!r})
        cfg = DistillConfig(steps={steps}, batch_size=8, chunk_tokens=256)
        cache, written = ensure_teacher_cache({str(root)!r}, teacher, tokenizer, data, cfg, {topk})
        print(json.dumps({{"written": written, "meta": cache.meta["files"]}}))
    """)


def start(script: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)  # fmt: skip


@pytest.fixture
def saved_teacher(tmp_path, tokenizer):
    """A teacher directory (weights + tokenizer) and a corpus, as the workers of a study see them."""
    teacher_dir = tmp_path / "teacher"
    sharp_teacher().save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    corpus = tmp_path / "kjv.txt"
    corpus.write_text("\n\n".join(kjv_verses(3000)), encoding="utf-8")
    return teacher_dir, corpus


@pytest.mark.slow
def test_two_processes_starting_at_once_write_the_cache_once(tmp_path, saved_teacher):
    script = cache_script(tmp_path, *saved_teacher, topk=32, steps=150)
    workers = [start(script, tmp_path / f"worker{i}.log") for i in range(2)]
    outputs = [json.loads(w.communicate(timeout=240)[0].strip().splitlines()[-1]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    assert sorted(o["written"] for o in outputs) == [False, True]  # one wrote, the other read it
    assert outputs[0]["meta"] == outputs[1]["meta"]
    logs = "".join((tmp_path / f"worker{i}.log").read_text() for i in range(2))
    assert "waiting for another process" in logs  # the reader started while the writer was writing


@pytest.mark.slow
def test_a_writer_killed_midway_leaves_nothing_that_passes_for_a_cache(tmp_path, saved_teacher):
    script = cache_script(tmp_path, *saved_teacher, topk=32, steps=3000)
    writer = start(script, tmp_path / "writer.log")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".tmp-{DIRNAME}-*/ids.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert list(tmp_path.glob(f".tmp-{DIRNAME}-*")) and not (tmp_path / DIRNAME).exists()
    finisher = start(cache_script(tmp_path, *saved_teacher, topk=32, steps=20), tmp_path / "finisher.log")
    output = json.loads(finisher.communicate(timeout=240)[0].strip().splitlines()[-1])
    assert output["written"] and not list(tmp_path.glob(f".tmp-{DIRNAME}-*"))
    assert open_teacher_cache(tmp_path / DIRNAME).settings.steps == 20


# ---- the study setting


@pytest.mark.slow
def test_one_study_setting_makes_every_trial_train_from_the_cache(tmp_path):
    from nas.pipeline import search

    config = tiny_study_config(tmp_path, search={"pruner": "none"})
    toml = tmp_path / "study.toml"
    toml.write_text(
        textwrap.dedent(f"""
        teacher = {json.dumps(config["teacher"])}
        out_dir = {json.dumps(config["out_dir"])}
        budget = "75%"
        [data]
        seq_len = 32
        cache_dir = {json.dumps(config["data"]["cache_dir"])}
        sources = [{{ path = {json.dumps(config["data"]["sources"][0]["path"])} }}]
        [space]
        tolerance = 0.1
        steps = {{ hidden_size = 16, ffn_hidden_size = 32 }}
        [importance]
        num_samples = 16
        val_sequences = 4
        [search]
        horizon_steps = 4
        eval_every = 2
        pruner = "none"
        n_trials = 2
        teacher_cache = true
        teacher_cache_topk = 24
        [distill]
        batch_size = 2
        eval_sequences = 4
        checkpoint_every = 2
        """)
    )
    cfg = load_run_config(toml)
    assert not cfg.teacher_resident_in_trials
    ctx, study = search(cfg)
    cache = ctx.teacher_cache
    assert cache is not None and cache.settings.topk == 24 and cache.settings.steps == 4
    assert next(ctx.teacher.parameters()).device.type == "cpu"
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 2
    for t in trials:  # trained from the cache: no teacher, so no validation KL
        assert all(point["val_kl"] is None for point in t.user_attrs["curve"])
        assert np.isfinite(t.value)
