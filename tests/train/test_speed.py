"""Honest trial speed (`nas.train.speed`) and the kernel paths of hybrid layers (`nas.model.kernels`)."""

import json
import logging

import pytest
import safetensors.torch
import torch

from nas.model.kernels import FAST_PATHS, HUB, REFERENCE, forget_notices, hub_kernels, kernel_paths
from nas.settings import DistillConfig
from nas.testing import tiny_model
from nas.train.loop import distill
from nas.train.speed import WARMUP_STEPS, Speed, model_flops_per_token

VOCAB, SEQ_LEN = 320, 32


class RandomTokens:
    """Seeded random token batches with `TokenData`'s interface (speed does not see the values)."""

    fingerprint, seq_len = "random", SEQ_LEN

    def train_batch(self, index: int, batch_size: int, total: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (batch_size, SEQ_LEN), generator=torch.Generator().manual_seed(index))

    def val(self, n: int) -> torch.Tensor:
        return self.train_batch(10**6, n, 0)


def cfg(**kw) -> DistillConfig:
    base = dict(steps=6, batch_size=2, eval_every=2, eval_sequences=4, checkpoint_every=3, log_every=1)
    return DistillConfig(**(base | kw))


def test_steady_speed_leaves_out_warmup_evaluation_checkpoints_and_the_final_write(tmp_path):
    teacher = tiny_model("llama", vocab_size=VOCAB)
    student = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=1)
    result = distill(teacher, student, RandomTokens(), cfg(), tmp_path)
    speed = result.speed
    steady_steps = 6 - WARMUP_STEPS
    assert speed["steady_steps"] == steady_steps
    # tokens/s is the steady steps' tokens over their own time: the write, the 3 evaluations and the
    # 2 checkpoints are in the wall time only
    assert result.tokens_per_s == pytest.approx(steady_steps * 2 * SEQ_LEN / speed["train_seconds"])
    assert speed["write_seconds"] > 0
    assert speed["train_seconds"] + speed["write_seconds"] < result.seconds
    assert result.tokens_per_s > result.tokens / result.seconds  # the old whole-call figure reads lower
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert speed["flops_per_token"] == 2 * n_teacher + 6 * n_student
    assert speed["mfu"] is None  # no datasheet peak for a CPU
    assert (tmp_path / "model" / "config.json").is_file()


def test_mfu_is_model_flops_over_the_peak_and_a_short_run_says_it_had_only_warmup():
    speed = Speed(flops_per_token=6e9, peak_flops=989e12)
    for seconds in (5.0, 2.0, 0.5, 0.5):  # two warm-up steps, then two steady ones of 4096 tokens
        speed.add_step(4096, seconds)
    assert speed.steady and speed.tokens_per_s == 8192 / 1.0
    assert speed.mfu == pytest.approx(8192 * 6e9 / 989e12)
    short = Speed(flops_per_token=1.0)
    short.add_step(100, 2.0)
    assert not short.steady and short.tokens_per_s == 50 and short.record()["steady_steps"] == 0
    assert model_flops_per_token(tiny_model("llama", num_layers=1), None) == 6 * sum(
        p.numel() for p in tiny_model("llama", num_layers=1).parameters()
    )


@pytest.mark.parametrize("tied", [False, True])
def test_a_trial_writes_its_student_in_the_dtype_asked_and_it_loads(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    teacher = tiny_model("llama", vocab_size=VOCAB, tie_word_embeddings=tied)
    student = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=1, tie_word_embeddings=tied)
    distill(teacher, student, RandomTokens(), cfg(steps=2, eval_every=0, checkpoint_every=0), tmp_path,
            write_dtype=torch.bfloat16)  # fmt: skip
    tensors = safetensors.torch.load_file(tmp_path / "model" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert student.model.embed_tokens.weight.dtype == torch.float32  # the run's own weights are untouched
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    for name, value in saved.state_dict().items():
        assert torch.equal(value, student.state_dict()[name].to(torch.bfloat16).float()), name


def test_kernel_paths_follow_the_device_the_packages_and_the_hub_setting():
    types = ("linear_attention", "mamba", "attention", "mlp")
    assert kernel_paths(types, "cpu", hub=True, have={"fla", "mamba_ssm", "causal_conv1d"}) == {
        "attention": "sdpa", "linear_attention": REFERENCE, "mamba": REFERENCE,
    }  # fmt: skip  (no fused kernel on CPU tensors, whatever is installed)
    assert kernel_paths(types, "cuda", hub=False, have={"fla", "mamba_ssm"}, attention="eager") == {
        "attention": "eager", "linear_attention": "fla", "mamba": REFERENCE,
    }  # fmt: skip  (Mamba2's fast path needs both of its packages)
    assert kernel_paths(types, "cuda", hub=True, have=set())["mamba"] == HUB
    assert set(FAST_PATHS) == {"linear_attention", "mamba"}
    assert not hub_kernels(tiny_model("llama"), None)  # loaded without the study's kernels = "hub"


@pytest.mark.parametrize("model_type, slow", [("qwen3_5_text", "linear_attention"), ("nemotron_h", "mamba")])
def test_the_slow_path_notice_appears_once_over_several_trials(tmp_path, caplog, model_type, slow):
    forget_notices()
    teacher = tiny_model(model_type, vocab_size=VOCAB)
    with caplog.at_level(logging.WARNING, logger="nas.model.kernels"):
        for seed in (1, 2):  # two trials of one search, in one process
            student = tiny_model(model_type, seed=seed, vocab_size=VOCAB)
            result = distill(teacher, student, RandomTokens(), cfg(steps=1, eval_every=0, checkpoint_every=0),
                             tmp_path / str(seed))  # fmt: skip
            assert result.kernel_paths[slow] == REFERENCE
    notices = [r.getMessage() for r in caplog.records if r.name == "nas.model.kernels"]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert f"the {slow} layers run transformers' reference PyTorch code" in notices[0]
    assert FAST_PATHS[slow][1] in notices[0]
    json.dumps(result.kernel_paths)  # recorded as is in trial records and winners


def _trained(tmp_path, **settings):
    teacher = tiny_model("llama", vocab_size=VOCAB)
    student = tiny_model("llama", seed=1, vocab_size=VOCAB, num_layers=1)
    run = cfg(steps=3, eval_every=0, checkpoint_every=0, **settings)
    result = distill(teacher, student, RandomTokens(), run, tmp_path, write=False)
    return student, teacher, result


def test_attention_setting_changes_the_kernels_not_what_is_learned(tmp_path):
    sdpa, _, plain = _trained(tmp_path / "sdpa", attention="sdpa")
    eager, teacher, result = _trained(tmp_path / "eager", attention="eager")
    assert eager.config._attn_implementation == teacher.config._attn_implementation == "eager"
    assert result.kernel_paths == {"attention": "eager"} and plain.kernel_paths == {"attention": "sdpa"}
    assert result.val_loss == pytest.approx(plain.val_loss, abs=1e-5)
    for (name, a), b in zip(sdpa.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert not (tmp_path / "eager" / "model").exists()  # write=False: no model written


def test_auto_attention_keeps_the_models_own(tmp_path):
    teacher, student = tiny_model("gpt_oss", vocab_size=VOCAB), tiny_model("gpt_oss", seed=1, vocab_size=VOCAB)
    result = distill(teacher, student, RandomTokens(), cfg(steps=1, eval_every=0, checkpoint_every=0), tmp_path,
                     write=False)  # fmt: skip
    assert student.config._attn_implementation == "eager" and result.kernel_paths["attention"] == "eager"

