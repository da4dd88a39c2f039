"""Tiny in-process models for tests, benchmarks and the demo (no hub access)."""

from __future__ import annotations

import torch
from torch import nn

from nas.data.bpe import train_bpe
from nas.data.kjv import kjv_conversations, kjv_verses
from nas.data.tokens import prepare
from nas.settings import DataConfig, DistillConfig
from nas.train.loop import distill

CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "ministral3": "Ministral3Config",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma3_text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
    "olmo2": "Olmo2Config",
    "olmo3": "Olmo3Config",
    "smollm3": "SmolLM3Config",
    "qwen3_moe": "Qwen3MoeConfig",
    "mixtral": "MixtralConfig",
    "qwen3_5_text": "Qwen3_5TextConfig",
    "qwen3_5_moe_text": "Qwen3_5MoeTextConfig",
    "nemotron_h": "NemotronHConfig",
    "gpt_oss": "GptOssConfig",
    "gemma4_text": "Gemma4TextConfig",
}
SLIDING = ("sliding_attention", "full_attention")
HYBRID = ("linear_attention", "full_attention")
# Nemotron-H's layer types as Nemotron Nano 2 has them: Mamba2, attention, MLP (4 layers: M * - M, so that every
# shorter prefix of 3 keeps each type); Nemotron 3 Nano's MoE layers: pass `layers_block_type` with "moe"
NEMOTRON_BLOCKS = ("linear_attention", "full_attention", "mlp")
NEMOTRON_SIZES = {
    "mamba_num_heads": 8, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 8, "conv_kernel": 4,
    "chunk_size": 8,  # shorter than the test sequences: the chunked scan carries state across chunks
    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_shared_expert_intermediate_size": 32,
}  # fmt: skip


def family_extras(model_type: str, num_layers: int, head_dim: int = 16) -> dict:
    """Settings that make a tiny model exercise its family's extras: alternating sliding-window layers with a
    window shorter than the test sequences, soft-capping, NoPE layers (SmolLM3's default), experts."""
    sliding = {"sliding_window": 8, "layer_types": [SLIDING[i % 2] for i in range(num_layers)]}
    # Gated DeltaNet layers with 2 value heads per key head, a full-attention layer every 2nd (3.5: 4th)
    deltanet = {"linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                "linear_value_head_dim": 8, "layer_types": [HYBRID[i % 2] for i in range(num_layers)]}  # fmt: skip
    return {
        "gemma3_text": {**sliding, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                        "query_pre_attn_scalar": 24},
        "olmo3": sliding,
        # Gemma 4 text as the dense 31B has it, without the features nas refuses (per-layer embeddings, KV
        # sharing): full-attention layers of twice the head_dim over one KV head whose keys are the values; the
        # last layer is full attention, as transformers makes it
        "gemma4_text": {"sliding_window": 8, "layer_types": [SLIDING[1 - (num_layers - 1 - i) % 2]
                                                                    for i in range(num_layers)],
                        "final_logit_softcapping": 30.0, "hidden_size_per_layer_input": 0,
                        "global_head_dim": 2 * head_dim, "attention_k_eq_v": True, "num_global_key_value_heads": 1},
        "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen3_5_text": deltanet,
        # Qwen3.5-MoE: a shared expert narrower than the routed ones, so that a count mixing them up is wrong
        "qwen3_5_moe_text": {**deltanet, "num_experts": 4, "num_experts_per_tok": 2,
                             "shared_expert_intermediate_size": 32},
        "nemotron_h": {**NEMOTRON_SIZES, "layers_block_type": [NEMOTRON_BLOCKS[i % 3] for i in range(num_layers)]},
        # gpt-oss: sliding layers first (its default pattern), a clamp the random init reaches (limit 0.5)
        "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "swiglu_limit": 0.5, "sliding_window": 8,
                    "layer_types": [SLIDING[i % 2] for i in range(num_layers)],
                    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                        "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                        "original_max_position_embeddings": 16}},
        # Ministral 3: Llama 4 query scaling that changes every 8 positions, inside the test sequences
        "ministral3": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 64.0,
                       "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                       "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}},
    }.get(model_type, {})  # fmt: skip


def tiny_config(
    model_type: str = "llama",
    *,
    vocab_size: int = 96,
    hidden_size: int = 64,
    ffn_hidden_size: int = 96,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    num_query_groups: int = 2,
    head_dim: int = 16,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    **extra,
):
    """A transformers config of `model_type` with small sizes in nas's vocabulary (a MoE's `ffn_hidden_size`
    is each expert's FFN width)."""
    import transformers

    from nas.model.families import FAMILIES

    cls = getattr(transformers, CONFIG_CLASSES[model_type])
    experts = FAMILIES[model_type].experts
    extra = {**family_extras(model_type, num_layers, head_dim), **extra}
    if "intermediate_size" in cls.__dataclass_fields__:  # the MLPs' (Nemotron-H: beside its MoE layers)
        extra.setdefault("intermediate_size", ffn_hidden_size)
    if experts:
        extra.setdefault(experts.ffn_attr, ffn_hidden_size)
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_query_groups,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        **extra,
    )


def tiny_model(model_type: str = "llama", seed: int = 0, **kwargs) -> nn.Module:
    """A randomly initialised tiny causal LM in fp32 eval mode; norms get random weights too,
    so that pruning hidden channels is exercised on non-trivial values."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kwargs), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias", "proj_bias")):  # gpt-oss's experts: `gate_up_proj_bias`
                p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.1)
            elif name.endswith(("mlp.gate.weight", "mlp.router.weight", "mixer.gate.weight")):  # a router:
                p.normal_(0, 0.5)  # distinct logits, so routing is not a tie
            elif name.endswith("shared_expert_gate.weight"):  # Qwen3.5-MoE: a gate that differs by token
                p.normal_(0, 0.5)
            elif name.endswith("self_attn.sinks"):  # gpt-oss: sinks that matter
                p.normal_(0, 1.0)
            elif name.endswith("gate_up_proj") and model_type == "gpt_oss":  # gate and up that reach its clamp
                p.normal_(0, 0.2)
            elif name.endswith("mixer.D"):  # Mamba2's skip: one value per head (1.0 in every head at init)
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # Nemotron-H's router bias (zeros at init)
                b.normal_(0, 0.1)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 320, texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained in-process on real text (BOS id 0, EOS id 1), as a transformers
    tokenizer; all 256 bytes are in its alphabet, so `vocab_size` must be above 258."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(texts or kjv_verses(2000), vocab_size, ["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# ChatML (the template of the Qwen chat models), as a tokenizer's chat_template carries it
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_chat_tokenizer(vocab_size: int = 320):
    """`tiny_tokenizer` with ChatML's two special tokens and the ChatML chat template: an instruct
    teacher's tokenizer, trained in-process on real text."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(kjv_verses(2000), vocab_size, ["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def write_kjv_chat(path, limit: int = 6000):
    """A local chat .jsonl of real text (`nas.data.kjv.kjv_conversations`, one `messages` per line)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in kjv_conversations(limit)))
    return path


def write_tiny_teacher(out, model_type: str = "llama", seed: int = 0, chat: bool = False, **sizes):
    """Save a tiny random teacher with a real-text tokenizer (with a chat template: `chat`) to `out`."""
    from pathlib import Path

    tokenizer = tiny_chat_tokenizer() if chat else tiny_tokenizer()
    model = tiny_model(model_type, seed=seed, vocab_size=len(tokenizer), **sizes)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_kjv_corpus(path, verses_per_document: int = 12, limit: int = 6000):
    """A local .jsonl corpus of real text: consecutive KJV verses grouped into documents."""
    import json
    from pathlib import Path

    verses = kjv_verses(limit)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for start in range(0, len(verses), verses_per_document):
            f.write(json.dumps({"text": " ".join(verses[start : start + verses_per_document])}) + "\n")
    return path


def tiny_study_config(root, name: str = "tiny", **overrides) -> dict:
    """A complete study config (as a dict, like a parsed TOML) over a tiny teacher and real text,
    sized so that a whole search runs in seconds on a CPU."""
    from pathlib import Path

    root = Path(root)
    teacher = root / "teacher"
    if not (teacher / "config.json").is_file():
        write_tiny_teacher(teacher)
    corpus = root / "corpus.jsonl"
    if not corpus.is_file():
        write_kjv_corpus(corpus)
    config = {
        "name": name,
        "teacher": str(teacher),
        "out_dir": str(root / "studies" / name),
        "budget": "75%",
        "data": {"seq_len": 32, "cache_dir": str(root / "cache"), "sources": [{"path": str(corpus)}]},
        "space": {"tolerance": 0.1, "steps": {"hidden_size": 16, "ffn_hidden_size": 32}},
        "importance": {"num_samples": 16, "val_sequences": 4, "batch_size": 8},
        "search": {
            "adaptive": False,  # tests of the adaptive horizon turn it on
            "small_space": False,  # the tiny spaces would skip the halving and the horizon (tests of it turn it on)
            "top_k": 3,
            "heartbeat_interval": 1,
            "grace_period": 3,
        },
        "distill": {
            "batch_size": 2,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "eval_sequences": 4,
            "checkpoint_every": 2,
            "log_every": 1,
        },
        "final": {"steps": 4},
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    # a short KD of 4 optimizer steps validated every 2, whatever batch and seq_len the overrides give
    per_step = config["distill"]["batch_size"] * config["distill"].get("grad_accum", 1) * config["data"]["seq_len"]
    config["search"] = {"horizon_tokens": 4 * per_step, "rung_tokens": 2 * per_step, **config["search"]}
    return config


def train_tiny_teacher(root, steps: int = 300, seq_len: int = 64):
    """`root/teacher`: the tiny teacher of `tiny_study_config`, trained with LM loss on `root/corpus.jsonl`
    (real text), so that rankings of its pruned students mean something. Returns its directory."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(root)
    corpus = write_kjv_corpus(root / "corpus.jsonl")
    teacher = write_tiny_teacher(root / "teacher")
    model = AutoModelForCausalLM.from_pretrained(teacher, use_kernels=False)
    data = prepare(
        DataConfig.single(str(corpus), seq_len=seq_len, cache_dir=str(root / "cache")),
        AutoTokenizer.from_pretrained(teacher),
    )
    settings = DistillConfig(
        steps=steps, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=0, checkpoint_every=0
    )
    distill(None, model, data, settings, root / "teacher-training")
    model.save_pretrained(teacher)
    return teacher


WRAPPERS = {"gemma4": "gemma4_text", "mistral3": "ministral3", "qwen3_5": "qwen3_5_text",
            "qwen3_5_moe": "qwen3_5_moe_text"}  # wrapper -> text  # fmt: skip


def tiny_wrapper_config(wrapper: str = "gemma4", tie_word_embeddings: bool = False, **sizes):
    """A multimodal wrapper config as released checkpoints carry it (`gemma4`, `mistral3`, `qwen3_5`,
    `qwen3_5_moe`): a tiny text model of the wrapper's text family in `text_config` and a one-layer vision
    tower."""
    import transformers

    text_type = WRAPPERS[wrapper]
    if text_type in CONFIG_CLASSES:
        text = tiny_config(text_type, tie_word_embeddings=tie_word_embeddings, **sizes)
    else:  # a text family of another branch: its transformers defaults at tiny sizes
        text = transformers.AutoConfig.for_model(
            text_type, vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie_word_embeddings,
        )  # fmt: skip
    text.pad_token_id = 2  # Gemma 4 puts it where image tokens were
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    if wrapper == "gemma4":
        vision = transformers.Gemma4VisionConfig(**tower, num_key_value_heads=2, head_dim=16, global_head_dim=16)
        return transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                                         tie_word_embeddings=tie_word_embeddings)  # fmt: skip
    if wrapper == "mistral3":
        vision = transformers.PixtralVisionConfig(**tower, image_size=32, patch_size=8, head_dim=16)
        return transformers.Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2,
                                           tie_word_embeddings=tie_word_embeddings)  # fmt: skip
    vision = {**tower, "depth": 1, "num_heads": 2, "out_hidden_size": text.hidden_size, "patch_size": 8}
    cls = transformers.Qwen3_5MoeConfig if wrapper == "qwen3_5_moe" else transformers.Qwen3_5Config
    return cls(text_config=text.to_dict(), vision_config=vision, tie_word_embeddings=tie_word_embeddings)


def write_tiny_wrapper(out, wrapper: str = "gemma4", tie_word_embeddings: bool = False, seed: int = 0):
    """Save a tiny random multimodal checkpoint (the whole wrapper model) with a real-text tokenizer to `out`."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_wrapper_config(wrapper, tie_word_embeddings, vocab_size=len(tokenizer))
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial norms, as `tiny_model`
                p.uniform_(0.5, 1.5)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
