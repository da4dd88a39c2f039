"""Multimodal checkpoints as users download them (`gemma4`, `mistral3`, `qwen3_5`, `qwen3_5_moe` wrapper configs with the text
model in `text_config`): nas reads the text model's shape, loads the text model exactly, prunes it, and exports
it text-only (vision dropped, the default) or inside the teacher's wrapper (vision kept), loadable by plain
transformers, with `nas_pruning.json` saying which."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from nas.cli import main
from nas.model.arch import Arch
from nas.model.load import load_config, load_model
from nas.model.size import count_params
from nas.prune.cut import prune, save_pruned
from nas.prune.importance import compute_importance
from nas.testing import write_tiny_wrapper

G = torch.Generator().manual_seed(3)
TOKENS = torch.randint(2, 320, (2, 20), generator=G)
CASES = [
    pytest.param("gemma4", True, id="gemma4-tied"),
    pytest.param("mistral3", False, id="mistral3-untied"),
    pytest.param("qwen3_5", True, id="qwen3_5-tied"),
    pytest.param("qwen3_5_moe", False, id="qwen3_5_moe-untied"),
]
SMALL = {"num_layers": 3, "hidden_size": 48, "ffn_hidden_size": 64, "num_attention_heads": 2, "num_query_groups": 1}


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def student_of(teacher_dir):
    teacher = load_model(teacher_dir)
    importance = compute_importance(teacher, TOKENS[:, :16], TOKENS[:1, :16])
    return teacher, prune(teacher, Arch.from_hf_config(teacher.config).replace(**SMALL), importance)


@pytest.mark.parametrize("wrapper,tied", CASES)
def test_the_text_model_of_a_wrapper_checkpoint_is_loaded_exactly(wrapper, tied, tmp_path):
    path = write_tiny_wrapper(tmp_path / wrapper, wrapper, tied)
    arch = Arch.from_hf_config(load_config(path))
    text = load_model(path)
    assert arch.tie_word_embeddings == tied and count_params(arch) == sum(p.numel() for p in text.parameters())
    whole = AutoModelForImageTextToText.from_pretrained(path)
    assert (logits(text) - logits(whole)).abs().max() < 1e-5  # the text path of the wrapper, unchanged


@pytest.mark.parametrize("wrapper,tied", CASES)
def test_a_pruned_wrapper_exports_text_only_or_with_its_vision_tower(wrapper, tied, tmp_path):
    path = write_tiny_wrapper(tmp_path / wrapper, wrapper, tied)
    _, student = student_of(path)
    dropped = save_pruned(student, tmp_path / "text", teacher=str(path))
    loaded = AutoModelForCausalLM.from_pretrained(dropped)  # plain transformers, a text-only causal LM
    assert loaded.config.model_type == student.config.model_type
    assert (logits(loaded) - logits(student)).abs().max() < 1e-5
    assert loaded.generate(TOKENS[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
    record = json.loads((dropped / "nas_pruning.json").read_text())["multimodal"]
    assert record["wrapper"] == wrapper and record["vision"].startswith("dropped")

    kept = save_pruned(student, tmp_path / "vlm", teacher=str(path), vision="keep")
    vlm = AutoModelForImageTextToText.from_pretrained(kept)
    assert vlm.config.model_type == wrapper and vlm.config.text_config.hidden_size == SMALL["hidden_size"]
    assert (logits(vlm) - logits(student)).abs().max() < 1e-5  # its text path is the student
    assert vlm.generate(TOKENS[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
    towers = sum(p.numel() for n, p in vlm.named_parameters() if not n.startswith(("model.language_model", "lm_head")))
    assert towers > 0 and json.loads((kept / "nas_pruning.json").read_text())["multimodal"]["vision"].startswith("kept")


def test_cli_prune_of_a_wrapper_checkpoint_says_what_became_of_the_vision_tower(tmp_path, capsys):
    path = write_tiny_wrapper(tmp_path / "gemma4", "gemma4")
    teacher = load_model(path)
    imp = compute_importance(teacher, TOKENS[:, :16], TOKENS[:1, :16]).save(tmp_path / "imp.safetensors")
    args = ["prune", str(path), str(tmp_path / "out"), "--importance", str(imp), "--num-layers", "2"]
    assert main(args) == 0
    assert "gemma4 checkpoint: pruned its text model; vision tower dropped" in capsys.readouterr().out
    assert main([*args[:2], str(tmp_path / "out-vlm"), *args[3:], "--vision", "keep"]) == 0
    assert "vision tower kept" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:  # argparse: one line naming the choices, exit code 2
        main([*args, "--vision", "maybe"])
    assert bad.value.code == 2
