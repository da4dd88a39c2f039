"""Memory plan of real teachers on 80 GB GPUs: today's default policy vs the plan's recommendation.

Reads only the shipped `config.json` files (benchmarks/configs/, the published values of
meta-llama/Llama-3.1-8B, Qwen/Qwen3-8B, mistralai/Mistral-Nemo-Base-2407, openai/gpt-oss-20b, the text model of
Qwen/Qwen3.5-9B and nvidia/NVIDIA-Nemotron-Nano-9B-v2 (sources in its SOURCE.md)); no weights,
no GPU. gpt-oss-20b's is the hub config.json of openai/gpt-oss-20b without its `quantization_config` (the
published weights are MXFP4; nas trains bf16 weights), its shape cross-checked with NVIDIA Megatron-Bridge's
GPT-OSS page (https://docs.nvidia.com/nemo/megatron-bridge/nightly/models/llm/gpt-oss.html: 24 layers, hidden
2880, 32 experts top-4 of FFN 2880, 64 query heads, 8 KV groups, head dim 64, vocab 201,088, window 128);
`count_params` gives 20,914,757,184, OpenAI's model card 20.9B.
"Today's default" is how nas trained before the precision policy: fp32 teacher and student (as
`nas.pipeline.load_teacher` loaded them on CUDA) and torch's AdamW, with the issue's micro-batch of
4 x 1024 tokens and gradient checkpointing on. The recommendation is `nas.plan.recommend`'s.

    .venv/bin/python -m benchmarks.memory_plan            # ~2-4 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.memory_plan --smoke    # one tiny teacher, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks import _smoke as smoke  # --smoke
from nas.model.arch import Arch
from nas.model.load import load_config
from nas.plan import format_plan, plan_study, to_json
from nas.settings import run_config_from_dict

CONFIGS = Path(__file__).parent / "configs"
GPU = 80 * 10**9  # an 80 GB H100 / A100
CASES = {  # name -> (teacher, budget, fixed student knobs or None for the space's largest candidate)
    "Llama-3.1-8B -> Minitron-4B-Width": (
        "Llama-3.1-8B",
        "4.5B",
        {
            "num_layers": 32,
            "hidden_size": 3072,
            "ffn_hidden_size": 9216,
            "num_attention_heads": 32,
            "num_query_groups": 8,
        },
    ),
    "Qwen3-8B -> 50%": ("Qwen3-8B", "50%", None),
    "Mistral-NeMo-12B -> 50%": ("Mistral-Nemo-Base-2407", "50%", None),
    "gpt-oss-20b -> 50%": ("gpt-oss-20b", "50%", None),
    "Qwen3.5-9B -> 50%": ("Qwen3.5-9B", "50%", None),  # hybrid: Gated DeltaNet + gated attention layers
    # a Mamba2 / MLP / attention hybrid; the largest 50% candidate of `nas space ... --budget 50% --max-width-prune
    # 0.4 --max-depth-prune 0.2 --steps hidden_size=256,ffn_hidden_size=512,num_query_groups=1` (4,615 candidates;
    # NVIDIA's steps and limits, the attention widths searched too)
    "Nemotron-Nano-9B-v2 -> 50%": (
        "NVIDIA-Nemotron-Nano-9B-v2",
        "50%",
        {
            "num_mamba_layers": 27, "num_mlp_layers": 22, "num_attention_layers": 4, "hidden_size": 3840,
            "num_mamba_heads": 80, "mamba_head_dim": 48, "ffn_hidden_size": 11264, "num_attention_heads": 24,
            "num_query_groups": 6,
        },
    ),  # fmt: skip
}


# transformers' grouped-matmul expert kernels take bf16 inputs only (torch's _grouped_mm checks it), so a
# mixture-of-experts teacher cannot run today's fp32 default: its plan starts from bf16 weights
PRECISION = {"gpt-oss-20b": "bf16"}


def study(teacher: str, budget: str) -> dict:
    """Today's defaults, with the issue's micro-batch and checkpointing."""
    return {
        "name": Path(teacher).name,
        "teacher": teacher,
        "budget": budget,
        "data": {"seq_len": 1024, "sources": [{"path": "unused.txt"}]},
        "distill": {"batch_size": 4, "gradient_checkpointing": True, "precision": PRECISION.get(Path(teacher).name, "fp32")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write every plan to this JSON file")
    parser.add_argument("--only", help="plan only the cases whose name contains this text")
    args = smoke.parse(parser)
    everything = {}
    with tempfile.TemporaryDirectory() as tmp:
        shipped = {name: (str(CONFIGS / teacher), b, k) for name, (teacher, b, k) in CASES.items()}
        cases = smoke_cases(Path(tmp)) if args.smoke else shipped
        for name, (teacher, budget, knobs) in cases.items():
            if not args.only or args.only in name:
                everything[name] = plan_case(name, teacher, budget, knobs)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


def smoke_cases(tmp: Path) -> dict:
    """--smoke: one tiny Llama teacher at 50%."""
    from nas.testing import tiny_config

    tiny_config("llama").save_pretrained(tmp / "tiny")
    return {"tiny llama -> 50%": (str(tmp / "tiny"), "50%", None)}


def plan_case(name: str, teacher: str, budget: str, knobs: dict | None) -> list:
    start = time.perf_counter()
    student = Arch.from_hf_config(load_config(teacher)).replace(**knobs) if knobs else None
    plans = plan_study(run_config_from_dict(study(teacher, budget)), GPU, student=student)
    print(f"\n## {name} (planned in {time.perf_counter() - start:.0f} s)")
    print(format_plan(plans, GPU))
    return to_json(plans)


if __name__ == "__main__":
    main()
