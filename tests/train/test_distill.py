import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nas.data.kjv import kjv_verses
from nas.errors import ConfigError, ModelError
from nas.evaluate.loss import lm_loss
from nas.model.arch import Arch
from nas.settings import DistillConfig
from nas.testing import CONFIG_CLASSES, tiny_model
from nas.train.checkpoint import convert_legacy, latest_checkpoint, load_rng, save_rng
from nas.train.kd import kd_loss, kl_to_teacher, model_kd_loss
from nas.train.loop import NonFiniteLossError, distill, lr_at
from nas.train.optimizer_files import load_optimizer_state

VOCAB = 320
SEQ_LEN = 32


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, tokenizer):
    """Real text (King James Bible verses) through the real data pipeline."""
    from nas.data.tokens import prepare
    from nas.settings import DataConfig

    root = tmp_path_factory.mktemp("data")
    text = root / "kjv.txt"
    text.write_text("\n\n".join(kjv_verses(3000)), encoding="utf-8")
    cfg = DataConfig.single(str(text), seq_len=SEQ_LEN, cache_dir=str(root / "cache"))
    return prepare(cfg, tokenizer)


def sharp_teacher(seed: int = 0, **sizes):
    """A tiny random teacher with a scaled-up head, so its next-token distributions are far from uniform
    (a random init gives near-uniform ones and a near-zero KL to any student)."""
    teacher = tiny_model("llama", seed=seed, vocab_size=VOCAB, **sizes)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    return teacher


def random_ids(n: int = 3, t: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def small_cfg(**kw) -> DistillConfig:
    base = dict(steps=6, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=2, eval_sequences=8)
    return DistillConfig(**(base | dict(checkpoint_every=2, log_every=1) | kw))


# ---- the loss


def test_kl_of_a_model_against_itself_is_zero():
    model = sharp_teacher()
    result = model_kd_loss(model, model, random_ids())
    result.loss.backward()
    assert abs(result.kl.item()) < 1e-6
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-6


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("temperature", "ce_weight"), [(1.0, 0.0), (2.0, 0.3)])
def test_chunked_loss_and_gradients_equal_plain_kl_div(tied, temperature, ce_weight):
    teacher = sharp_teacher(seed=1, tie_word_embeddings=False).double()
    student = tiny_model("llama", seed=2, vocab_size=VOCAB, num_layers=2, tie_word_embeddings=tied).double()
    ids = random_ids()
    ours = model_kd_loss(student, teacher, ids, temperature=temperature, ce_weight=ce_weight, chunk_tokens=7)
    ours.loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    logits = student(input_ids=ids).logits
    s = logits.flatten(0, 1)
    with torch.no_grad():
        t = teacher(input_ids=ids).logits.flatten(0, 1)
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="sum",
    ) / len(s)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    plain = (1 - ce_weight) * kl + ce_weight * ce
    plain.backward()
    assert abs(ours.loss.item() - plain.item()) < 1e-6 and abs(ours.kl.item() - kl.item()) < 1e-6
    assert ours.loss.item() > 1e-3  # a real, non-trivial KL was compared
    for name, p in student.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-6, atol=1e-9), name


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma4_text", "ministral3", "gpt_oss"])
def test_soft_capped_logits_are_distilled_and_scored_as_hf_computes_them(model_type, ce_weight):
    """Gemma's final_logit_softcapping is applied after the head, inside HF's forward; the chunked losses
    apply the head themselves and must cap too (a small cap, so that it changes the numbers). Families whose
    forward does nothing after the head (Ministral 3, gpt-oss) must get the plain logits."""
    from nas.train.teacher_cache import teacher_topk

    capped = model_type.startswith("gemma")

    def model_of(seed):
        cap = {"final_logit_softcapping": 2.0} if capped else {}
        model = tiny_model(model_type, seed=seed, vocab_size=VOCAB, **cap).double()
        model.config._experts_implementation = "eager"  # the grouped-matmul expert kernels have no float64
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)  # logits well beyond the cap
        return model

    teacher, student, ids = model_of(1), model_of(2), random_ids()
    ours = model_kd_loss(student, teacher, ids, ce_weight=ce_weight, chunk_tokens=7)
    grads = torch.autograd.grad(ours.loss, list(student.parameters()))
    s = student(input_ids=ids).logits
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    assert (s.abs().max() < 2.0 and s.abs().max() > 1.5) == capped  # HF capped them, and the cap binds
    log_q, log_p = F.log_softmax(s.flatten(0, 1), -1), F.log_softmax(t.flatten(0, 1), -1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / len(log_q)
    plain = (1 - ce_weight) * kl + ce_weight * F.cross_entropy(s[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(ours.kl.item() - kl.item()) < 1e-9 and kl.item() > 1e-2
    for ours_grad, plain_grad in zip(
        grads, torch.autograd.grad(plain, list(student.parameters())), strict=True
    ):
        torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-6, atol=1e-10)
    ce = F.cross_entropy(t[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(lm_loss(teacher, ids, batch_size=2) - ce) < 1e-6  # lm_loss scores in float32
    top_ids, top_logp, _ = teacher_topk(teacher, ids, 5, 1.0, chunk=7)
    torch.testing.assert_close(
        top_logp.double(), log_p.view(*ids.shape, -1).gather(-1, top_ids), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
def test_the_head_nas_applies_gives_the_logits_of_the_familys_own_forward(model_type):
    """The chunked losses take the decoder's last hidden state and apply the head themselves: for every family
    they must reproduce what its `forward` does to the logits (a soft-cap, a scale), so the KL and the held-out
    loss are those of HF's full logits."""
    from nas.train.teacher_cache import teacher_topk

    teacher, student = (tiny_model(model_type, seed=s, vocab_size=VOCAB) for s in (1, 2))  # fp32: expert kernels
    ids = random_ids()
    with torch.no_grad():
        t, s = teacher(input_ids=ids).logits, student(input_ids=ids).logits
    log_p, log_q = F.log_softmax(t.flatten(0, 1), -1), F.log_softmax(s.flatten(0, 1), -1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / len(log_q)
    assert model_kd_loss(student, teacher, ids, chunk_tokens=7).kl.item() == pytest.approx(kl.item(), rel=1e-4)
    ce = F.cross_entropy(t[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    assert lm_loss(teacher, ids, batch_size=2) == pytest.approx(ce, rel=1e-5)
    top_ids, top_logp, _ = teacher_topk(teacher, ids, 5, 1.0, chunk=7)
    torch.testing.assert_close(top_logp, log_p.view(*ids.shape, -1).gather(-1, top_ids), rtol=1e-4, atol=1e-5)


def test_no_teacher_is_the_shared_lm_loss():
    model = tiny_model("llama", vocab_size=VOCAB)
    ids = random_ids()
    assert abs(model_kd_loss(model, None, ids, chunk_tokens=5).loss.item() - lm_loss(model, ids)) < 1e-5


def test_upstream_gradient_scales_the_stored_gradients():
    """Backward only rescales the gradients computed in forward, so the chain rule must still hold."""
    hidden = torch.randn(10, 4, requires_grad=True)
    weight = torch.randn(VOCAB, 4, requires_grad=True)
    teacher = torch.randn(10, 6), torch.randn(VOCAB, 6)
    kd_loss(hidden, weight, *teacher, chunk_tokens=3).loss.backward()
    once = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (-2.5 * kd_loss(hidden, weight, *teacher, chunk_tokens=4).loss).backward()
    assert torch.allclose(hidden.grad, -2.5 * once[0], atol=1e-7)
    assert torch.allclose(weight.grad, -2.5 * once[1], atol=1e-7)


# ---- the schedule


def test_schedules_warm_up_then_reach_min_lr():
    cosine = DistillConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, cosine) == pytest.approx(1e-4) and lr_at(9, cosine) == pytest.approx(1e-3)
    assert lr_at(99, cosine) == pytest.approx(1e-4)
    assert lr_at(10, cosine) > lr_at(50, cosine) > lr_at(90, cosine)
    wsd = DistillConfig(steps=100, lr=1e-3, min_lr=1e-4, schedule="wsd", decay_fraction=0.2)
    assert lr_at(79, wsd) == pytest.approx(1e-3) and lr_at(80, wsd) < 1e-3
    assert lr_at(99, wsd) == pytest.approx(1e-4)
    assert lr_at(99, DistillConfig(steps=100, schedule="constant")) == pytest.approx(1e-4)


# ---- the loop


@pytest.fixture(scope="module")
def corrected(token_data, tmp_path_factory):
    """Teacher correction: a random tiny model trained on the LM loss (teacher=None); returns
    (model, val loss before, Result). A trained teacher has a distribution a student can learn."""
    model = tiny_model("llama", vocab_size=VOCAB)
    before = lm_loss(model, token_data.val(8))
    cfg = small_cfg(steps=20, eval_every=10, lr=1e-2, checkpoint_every=0)
    return model, before, distill(None, model, token_data, cfg, tmp_path_factory.mktemp("correct"))


def test_teacher_correction_without_teacher_lowers_lm_loss(corrected):
    _, before, result = corrected
    assert result.val_kl is None and result.val_loss < before - 0.5
    assert [c["step"] for c in result.curve] == [10, 20]


def test_distilling_a_pruned_student_lowers_its_kl(token_data, corrected, tmp_path):
    from nas.prune.cut import prune
    from nas.prune.importance import compute_importance

    teacher = corrected[0]
    importance = compute_importance(teacher, token_data.calib(8), token_data.val(4))
    arch = Arch.from_hf_config(teacher.config).replace(num_layers=2, hidden_size=32, ffn_hidden_size=48)
    student = prune(teacher, arch, importance)
    before = kl_to_teacher(student, teacher, token_data.val(8))
    result = distill(teacher, student, token_data, small_cfg(steps=12, eval_every=4), tmp_path)
    assert [c["step"] for c in result.curve] == [4, 8, 12]
    assert before > result.curve[0]["val_kl"] > result.curve[-1]["val_kl"]
    assert result.val_kl < 0.2 * before
    assert result.tokens == 12 * 4 * SEQ_LEN


def test_outputs_metrics_and_saved_model(token_data, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, student = sharp_teacher(), tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2)
    seen = []
    result = distill(
        teacher, student, token_data, small_cfg(), tmp_path, on_eval=lambda s, v: seen.append((s, v))
    )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["loss"] is not None] == [1, 2, 3, 4, 5, 6]
    assert (
        seen
        == [(c["step"], c["val_loss"]) for c in result.curve]
        == [(line["step"], line["val_loss"]) for line in lines if line["val_loss"] is not None]
    )
    assert set(lines[0]) == {"step", "loss", "kl", "val_loss", "val_kl", "lr", "tokens", "tokens_per_s"}
    assert result.val_loss == pytest.approx(lm_loss(student, token_data.val(8)))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = token_data.val(2)
    assert torch.equal(saved(input_ids=ids).logits, student(input_ids=ids).logits)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]


def test_resumed_run_ends_with_the_same_weights(token_data, tmp_path):
    teacher = sharp_teacher()
    cfg = small_cfg(steps=6, eval_every=5, checkpoint_every=3, grad_accum=2)
    whole = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2, tie_word_embeddings=True)
    expected = distill(teacher, whole, token_data, cfg, tmp_path / "whole")

    def interrupt(step, _):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        student = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2, tie_word_embeddings=True)
        distill(teacher, student, token_data, cfg, tmp_path / "cut", on_eval=interrupt)
    checkpoint = latest_checkpoint(tmp_path / "cut")
    assert checkpoint.name == "step-0000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == [  # nothing pickled: no .pt file to read
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors", "state.json"
    ]
    fresh = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2, tie_word_embeddings=True)
    resumed = distill(teacher, fresh, token_data, cfg, tmp_path / "cut")
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.curve == expected.curve and resumed.tokens == expected.tokens
    metrics = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    uncut = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"], m["kl"]) for m in metrics] == [(m["step"], m["loss"], m["kl"]) for m in uncut]


def test_a_run_started_from_a_checkpoint_continues_its_optimizer_state(token_data, tmp_path):
    """`start` (nas.search.wsd's continued stable phase): 3 + 3 constant-LR steps end where 6 in one go
    do, since the AdamW moments go on; the same 3 steps with fresh moments (a restart) do not."""
    teacher = sharp_teacher()
    cfg = small_cfg(steps=6, schedule="constant", warmup_steps=0, eval_every=0, checkpoint_every=3)

    def student():
        return tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2, tie_word_embeddings=True)

    whole = student()
    distill(teacher, whole, token_data, cfg, tmp_path / "whole")
    first = student()
    distill(teacher, first, token_data, cfg.replace(steps=3), tmp_path / "first")
    second = cfg.replace(steps=3, data_offset=3, checkpoint_every=0)
    continued, restarted = student(), student()
    distill(teacher, continued, token_data, second, tmp_path / "continued", start=latest_checkpoint(tmp_path / "first"))
    restarted.load_state_dict(first.state_dict())
    distill(teacher, restarted, token_data, second, tmp_path / "restarted")
    for (name, a), b in zip(whole.state_dict().items(), continued.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name)
    assert any(not torch.allclose(a, c) for a, c in zip(whole.parameters(), restarted.parameters(), strict=True))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(token_data, tmp_path):
    teacher, student = sharp_teacher(), tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2)

    def poison(step, _):
        if step == 4:
            student.model.norm.weight.data.fill_(math.nan)

    with pytest.raises(NonFiniteLossError, match="step 5.*step-0000004"):
        distill(teacher, student, token_data, small_cfg(), tmp_path, on_eval=poison)
    assert latest_checkpoint(tmp_path).name == "step-0000004"
    assert not (tmp_path / "model").exists()


def test_corrupt_checkpoint_is_a_model_error_naming_it(token_data, tmp_path):
    teacher, student = sharp_teacher(), tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2)
    distill(teacher, student, token_data, small_cfg(steps=2), tmp_path)
    (latest_checkpoint(tmp_path) / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="step-0000002.*delete"):
        distill(teacher, student, token_data, small_cfg(steps=2), tmp_path)


def draws() -> tuple:
    """One draw of each generator a run uses: torch, numpy, Python (and numpy's cached Gaussian)."""
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), np.random.randn(3).tolist(), random.random()


def test_rng_states_round_trip_through_safetensors_and_json(tmp_path):
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and one in Python's
    save_rng(tmp_path)
    first = draws()
    load_rng(tmp_path)
    assert draws() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng.json", "rng.safetensors"]


def previous_format(checkpoint) -> None:
    """Rewrite a checkpoint as nas wrote it before issue 33: the RNG states and the optimizer state pickled
    (rng.pt, optimizer.pt by torch.save)."""
    load_rng(checkpoint)
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(state, checkpoint / "rng.pt")
    torch.save(load_optimizer_state(checkpoint), checkpoint / "optimizer.pt")
    for name in ("rng.json", "rng.safetensors", "optimizer.json", "optimizer.safetensors"):
        (checkpoint / name).unlink()


def test_a_previous_format_checkpoint_is_refused_then_converted_resumes_the_same(token_data, tmp_path):
    """A checkpoint with a pickled rng.pt and optimizer.pt is refused with the command that converts it;
    converted (a weights_only load), it resumes to the same weights and curve as an uninterrupted run."""
    teacher = sharp_teacher()
    cfg = small_cfg(steps=6, eval_every=5, checkpoint_every=3)
    whole = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2)
    expected = distill(teacher, whole, token_data, cfg, tmp_path / "whole")

    def interrupt(step, _):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        student = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2)
        distill(teacher, student, token_data, cfg, tmp_path / "cut", on_eval=interrupt)
    checkpoint = latest_checkpoint(tmp_path / "cut")
    previous_format(checkpoint)
    fresh = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2)
    refused = f"rng.pt and optimizer.pt, each a pickle.*python -m nas.train.checkpoint {checkpoint}"
    with pytest.raises(ModelError, match=refused):
        distill(teacher, fresh, token_data, cfg, tmp_path / "cut")
    assert convert_legacy(checkpoint) == ["rng.pt", "optimizer.pt"]
    assert not list(checkpoint.glob("*.pt"))
    assert convert_legacy(checkpoint) == []  # once: a converted checkpoint has nothing left to convert
    resumed = distill(teacher, fresh, token_data, cfg, tmp_path / "cut")
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.curve == expected.curve


def test_nothing_in_nas_unpickles():
    """No module of nas imports pickle or loads with weights_only=False (a pickle runs code), and torch.load
    (a checked unpickler) runs only in the one-off conversion of a previous-format checkpoint."""
    import ast

    import nas

    root = Path(nas.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if re.search(r"^\s*(import|from)\s+c?pickle\b|weights_only\s*=\s*False", path.read_text(), re.M)
    ]
    assert offenders == []
    loads = []
    for path in root.rglob("*.py"):
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, ast.FunctionDef) and any(
                isinstance(n, ast.Attribute) and n.attr == "load" and getattr(n.value, "id", "") == "torch"
                for n in ast.walk(function)
            ):
                loads.append(f"{path.relative_to(root)}:{function.name}")
    assert sorted(loads) == ["train/checkpoint.py:convert_legacy_optimizer", "train/checkpoint.py:convert_legacy_rng"]


def test_gradient_checkpointing_gives_the_same_weights(token_data, tmp_path):
    teacher = sharp_teacher()
    students = [tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2) for _ in range(2)]
    for flag, student in zip((False, True), students, strict=True):
        cfg = small_cfg(steps=3, checkpoint_every=0, gradient_checkpointing=flag)
        distill(teacher, student, token_data, cfg, tmp_path / str(flag))
    for a, b in zip(students[0].parameters(), students[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # transformers 5.25 says activation checkpointing, the releases before it gradient checkpointing
    name = "is_activation_checkpointing" if hasattr(students[1], "activation_checkpointing_enable") else "is_gradient_checkpointing"
    assert not getattr(students[1], name)  # switched off again once the run ends


@pytest.mark.parametrize(("model_type", "block"), [("qwen3_5_text", "linear_attention"), ("nemotron_h", "mamba")])
def test_checkpointing_one_block_type_gives_the_same_loss_and_recomputes_only_those_layers(
    token_data, tmp_path, model_type, block
):
    """Per-type checkpointing (what `nas plan` chooses for a hybrid on its reference path): the same losses and
    weights as without, and only the layers of that type run their forward again in the backward."""
    from nas.model.families import decoder_layers, layer_units

    teacher = tiny_model(model_type, seed=0, vocab_size=VOCAB, num_layers=4)
    runs = {}
    for setting in (False, (block,)):
        student = tiny_model(model_type, seed=1, vocab_size=VOCAB, num_layers=3)
        types = [units[0] for units in layer_units(student.config)]
        calls = [0] * len(types)
        for i, layer in enumerate(decoder_layers(student)):  # its submodules: transformers checkpoints `forward`
            for child in layer.children():
                child.register_forward_pre_hook(lambda *_, i=i, c=calls: c.__setitem__(i, c[i] + 1))
        cfg = small_cfg(steps=2, eval_every=0, checkpoint_every=0, gradient_checkpointing=setting)
        result = distill(teacher, student, token_data, cfg, tmp_path / str(bool(setting)))
        runs[bool(setting)] = (result.val_loss, student, calls)
    (loss, plain, calls), (ckpt_loss, ckpt, ckpt_calls) = runs[False], runs[True]
    assert ckpt_loss == pytest.approx(loss, rel=1e-6)
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    recomputed = [t for t, a, b in zip(types, calls, ckpt_calls, strict=True) if b > a]
    assert recomputed and set(recomputed) == {block}, (types, calls, ckpt_calls)
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(ckpt))


def test_checkpointing_a_block_type_the_model_lacks_is_refused(token_data, tmp_path):
    student = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2)
    cfg = small_cfg(steps=1, checkpoint_every=0, gradient_checkpointing=["mamba"])
    with pytest.raises(ConfigError, match="mamba.*true or false"):
        distill(sharp_teacher(), student, token_data, cfg, tmp_path)


def test_cli_correct_then_distill_then_resume(tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nas.cli.main import main

    text = tmp_path / "kjv.txt"
    text.write_text("\n\n".join(kjv_verses(1500)), encoding="utf-8")
    tiny_model("llama", vocab_size=VOCAB).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=2).save_pretrained(tmp_path / "student")
    common = [
        "--data",
        str(text),
        "--seq-len",
        "32",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--batch-size",
        "2",
    ]
    common += ["--eval-every", "2", "--checkpoint-every", "2", "--eval-sequences", "4", "--device", "cpu"]
    assert (
        main(["correct", str(tmp_path / "teacher"), str(tmp_path / "corrected"), "--steps", "2", *common])
        == 0
    )
    teacher = str(tmp_path / "corrected" / "model")
    args = ["distill", teacher, str(tmp_path / "student"), str(tmp_path / "kd"), "--steps", "4", *common]
    assert main(args) == 0
    assert "4 steps" in capsys.readouterr().out
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "kd" / "model").state_dict()
    assert AutoTokenizer.from_pretrained(tmp_path / "kd" / "model").vocab_size == tokenizer.vocab_size
    assert main(args) == 0  # rerun: resumes from the final checkpoint, nothing to redo
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "kd" / "model").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (
        main(["distill", teacher, str(tmp_path / "student"), str(tmp_path / "x"), "--steps", "0", *common])
        == 2
    )
