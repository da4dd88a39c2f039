"""Memory-lean training (8-bit AdamW states, bf16 weights with stochastic rounding) and the GPU
precision policy, run on the CPU: same loss as fp32 AdamW, and the dtypes the policy promises."""

import shutil

import pytest
import torch

from nas.data.kjv import kjv_verses
from nas.device import precision_for
from nas.errors import ConfigError
from nas.model.arch import Arch
from nas.model.load import load_teacher_and_student
from nas.prune.cut import prune, save_pruned
from nas.prune.importance import compute_importance
from nas.settings import DistillConfig
from nas.testing import tiny_model, tiny_tokenizer
from nas.train.loop import build_optimizer, distill

VOCAB = 320
SEQ_LEN = 32
LEAN = [  # (precision, optimizer): the GPU policies and each lean optimizer
    ("fp32", "adamw-8bit"),
    ("bf16-mixed", "adamw"),
    ("bf16-mixed", "adamw-8bit"),
    ("bf16", "adamw"),
    ("bf16", "adamw-8bit"),
]


@pytest.fixture(autouse=True)
def eager_torchao():
    """torchao compiles its update per parameter shape (a minute of inductor on this CPU); eager
    runs the same arithmetic."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    """A search trial in miniature: a teacher trained on real text, a pruned student, both saved."""
    from nas.data.tokens import prepare
    from nas.settings import DataConfig

    root = tmp_path_factory.mktemp("lean")
    text = root / "kjv.txt"
    text.write_text("\n\n".join(kjv_verses(3000)), encoding="utf-8")
    data = prepare(
        DataConfig.single(str(text), seq_len=SEQ_LEN, cache_dir=str(root / "cache")), tiny_tokenizer(VOCAB)
    )
    teacher = tiny_model("llama", vocab_size=VOCAB)
    distill(None, teacher, data, _cfg(steps=30, lr=1e-2, eval_every=0), root / "correct")
    importance = compute_importance(teacher, data.calib(8), data.val(4))
    arch = Arch.from_hf_config(teacher.config).replace(num_layers=2, hidden_size=32, ffn_hidden_size=64)
    save_pruned(teacher, root / "teacher")
    save_pruned(prune(teacher, arch, importance), root / "student")
    return root, data


def _cfg(**kw) -> DistillConfig:
    base = dict(
        steps=20, batch_size=4, lr=3e-3, min_lr=3e-4, eval_every=10, eval_sequences=8, checkpoint_every=0
    )
    return DistillConfig(**(base | kw))


def _run(trial, precision: str, optimizer: str, name: str):
    root, data = trial
    teacher, student = load_teacher_and_student(
        root / "teacher", root / "student", torch.device("cpu"), precision
    )
    torch.manual_seed(0)
    return (
        teacher,
        student,
        distill(teacher, student, data, _cfg(precision=precision, optimizer=optimizer), root / name),
    )


@pytest.mark.slow
@pytest.mark.parametrize("precision,optimizer", LEAN, ids=[f"{p}-{o}" for p, o in LEAN])
def test_lean_setting_matches_fp32_adamw(trial, precision, optimizer):
    *_, reference = _run(trial, "fp32", "adamw", "fp32")
    teacher, student, lean = _run(trial, precision, optimizer, f"{precision}-{optimizer}")
    policy = precision_for(precision, torch.device("cpu"))
    assert next(teacher.parameters()).dtype == policy.teacher_dtype
    assert {p.dtype for p in student.parameters()} == {policy.student_dtype}
    for ref, got in zip(reference.curve, lean.curve, strict=True):
        assert ref["step"] == got["step"] and abs(ref["val_loss"] - got["val_loss"]) < 0.02, (ref, got)


def test_gpu_policy_dtypes_and_lean_optimizers_build_on_cpu():
    student = tiny_model("llama", vocab_size=VOCAB)
    for precision, optimizer in LEAN:
        cfg = DistillConfig(precision=precision, optimizer=optimizer)
        opt = build_optimizer(student, cfg, torch.device("cpu"))
        torchao = type(opt).__module__.startswith("torchao")
        assert torchao == (optimizer == "adamw-8bit" or precision == "bf16")
        assert getattr(opt, "bf16_stochastic_round", False) == (precision == "bf16")
    with pytest.raises(ConfigError, match="CUDA"):
        build_optimizer(student, DistillConfig(offload_optimizer=True), torch.device("cpu"))
    with pytest.raises(ConfigError, match="optimizer"):
        DistillConfig(offload_optimizer=True, optimizer="adamw-8bit")
    with pytest.raises(ConfigError, match="precision"):
        DistillConfig(precision="fp16")


@pytest.mark.slow
def test_a_run_with_8bit_states_resumes_from_its_checkpoint(trial):
    root, data = trial
    teacher, student = load_teacher_and_student(
        root / "teacher", root / "student", torch.device("cpu"), "bf16"
    )
    cfg = _cfg(precision="bf16", optimizer="adamw-8bit", steps=6, eval_every=2, checkpoint_every=2)
    whole = distill(teacher, student, data, cfg, root / "whole")
    assert not list((root / "whole" / "checkpoints").rglob("*.pt"))  # the 8-bit states without pickle
    # a run stopped after its step-4 checkpoint: the same settings resume it from there
    shutil.copytree(root / "whole", root / "resume")
    shutil.rmtree(root / "resume" / "checkpoints" / "step-0000006")
    shutil.rmtree(root / "resume" / "model")
    teacher, student = load_teacher_and_student(
        root / "teacher", root / "student", torch.device("cpu"), "bf16"
    )
    again = distill(teacher, student, data, cfg, root / "resume")
    assert [c["step"] for c in again.curve] == [2, 4, 6]
    assert again.val_loss == whole.val_loss  # 8-bit states restored exactly: the same end
