"""How to train: the [distill] / [final] tables, and the options of `nas plan`, `nas eval` and launching."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from nas.device import PRECISIONS
from nas.settings.base import (
    ATTENTIONS,
    OPTIMIZERS,
    SCHEDULES,
    Settings,
    _described,
)


class DistillConfig(Settings):
    """One distillation (or, with no teacher, LM fine-tuning) run."""

    steps: int = _described(400, "optimizer steps", ge=1)
    batch_size: int = _described(
        8, "sequences per micro-batch, in all (split across torchrun processes)", ge=1
    )
    grad_accum: int = _described(1, "micro-batches per optimizer step", ge=1)
    lr: float = _described(1e-4, "peak learning rate", gt=0, allow_inf_nan=False)
    min_lr: float = _described(1e-5, "learning rate at the end of the decay", ge=0, allow_inf_nan=False)
    warmup_steps: int = _described(0, "linear warmup steps", ge=0)
    schedule: Literal[SCHEDULES] = _described("cosine", "learning-rate decay after the warmup")  # type: ignore[valid-type]
    decay_fraction: float = _described(
        0.2, "wsd: the last fraction of steps decays linearly to min_lr", gt=0, le=1
    )
    weight_decay: float = _described(0.0, "AdamW weight decay of matrices (never norms or biases)", ge=0)
    grad_clip: float = _described(1.0, "max global gradient norm (0: no clipping)", ge=0)
    betas: Annotated[tuple[float, float], Field(strict=False)] = _described((0.9, 0.95), "AdamW betas")
    ce_weight: float = _described(
        0.0, "loss = (1 - w) * KL + w * CE on the labels (0: pure KD, Minitron)", ge=0, le=1
    )
    temperature: float = _described(
        1.0, "softmax temperature of the KL (see nas.train.kd)", gt=0, allow_inf_nan=False
    )
    chunk_tokens: int = _described(1024, "tokens per chunk of the fused LM head + loss", ge=1)
    eval_every: int = _described(50, "steps between validations (0: only at the end)", ge=0)
    eval_sequences: int = _described(64, "validation sequences (the first n of the validation split)", ge=1)
    eval_batch_size: int = _described(8, "sequences per validation forward", ge=1)
    checkpoint_every: int = _described(100, "steps between checkpoints (0: none)", ge=0)
    keep_checkpoints: int = _described(2, "how many of the latest checkpoints stay on disk", ge=1)
    gradient_checkpointing: bool | Annotated[tuple[str, ...], Field(strict=False)] = _described(
        False,
        "recompute activations in backward to save memory: true (every layer), or a hybrid stack's block types "
        'whose layers recompute, e.g. ["mamba"] or ["linear_attention"] (nas plan chooses them)',
    )
    fsdp: bool = _described(
        False, "with several processes: shard student and teacher layers with FSDP2, not DDP"
    )
    precision: Literal[PRECISIONS] = _described(  # type: ignore[valid-type]
        "auto", "dtypes (nas.device): auto = bf16-mixed on CUDA, fp32 on CPU; bf16 = bf16 student weights"
    )
    optimizer: Literal[OPTIMIZERS] = _described(  # type: ignore[valid-type]
        "adamw", "adamw (fp32 states) or adamw-8bit (torchao block-quantized states, a quarter of the memory)"
    )
    offload_optimizer: bool = _described(False, "CUDA only: optimizer states and update on the CPU (torchao)")
    seed: int = _described(0, "torch seed of the run (the data order is data.seed)")
    data_offset: int = _described(
        0, "the run's batches start at this step of the data order (a continued run sees new batches)", ge=0
    )
    device: str = _described(
        "auto", "auto (CUDA if available; cuda:LOCAL_RANK under torchrun), cpu, cuda, cuda:1 ..."
    )
    log_every: int = _described(10, "steps between train lines in metrics.jsonl", ge=0)
    # step speed (benchmarks/trial_speed.py measures each side by side; none changes what is learned)
    # auto: what transformers chose when the model was built: sdpa wherever the model supports it (its
    # default), on CUDA in bf16 PyTorch's SDPA runs the FlashAttention-2 kernel
    # (https://pytorch.org/docs/stable/generated/torch.nn.functional.scaled_dot_product_attention.html);
    # eager where it does not (gpt-oss: its attention sinks). flash_attention_2 needs the flash-attn package
    attention: Literal[ATTENTIONS] = _described(  # type: ignore[valid-type]
        "auto", "attention of teacher and student: auto (the model's default: sdpa where supported), sdpa, "
        "flash_attention_2 (flash-attn installed), eager"
    )
    # torch's docs: the fused AdamW implementation is the fastest on CUDA ("fused > foreach > for-loop",
    # https://pytorch.org/docs/stable/optim.html#algorithms)
    fused_optimizer: bool = _described(True, "CUDA: torch's fused AdamW kernel (off: its foreach one)")
    # off by default: compiling the layers costs minutes on an 8B model before the first step, which a
    # short trial may not win back; benchmarks/trial_speed.py (gpu_acceptance row speed) measures both
    compile: bool = _described(
        False, "torch.compile each decoder layer of student and teacher (pays on long runs; costs start-up)"
    )

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if not all(0 <= b < 1 for b in self.betas):  # AdamW's own rule (torch raises a bare ValueError)
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        if self.gradient_checkpointing == ():
            object.__setattr__(self, "gradient_checkpointing", False)  # no block type: none
        if self.offload_optimizer and self.optimizer != "adamw":
            raise ValueError("offload_optimizer keeps fp32 AdamW states on the CPU; set optimizer = 'adamw'")
        return self


class Launch(Settings):
    """How many processes a command trains in."""

    nproc_per_node: int = _described(
        1,
        "processes (GPUs) to train on: reruns itself under torchrun; --batch-size is the global batch",
        ge=1,
    )


class PlanConfig(Settings):
    """`nas plan`: the GPUs a study's memory plan is made for."""

    gpu_memory: str | None = _described(
        None, "memory of one GPU, e.g. 80GB or 79.6GiB (default: the visible GPU's)"
    )
    gpus_per_trial: int = _described(1, "processes (GPUs) per trial", ge=1)
    as_json: bool = _described(False, "print the plan as a JSON list of stages")
    memory: bool = _described(True, "plan the memory of each stage (dry runs); --no-memory: time and cost only")
    gpu: str | None = _described(
        None, "GPU model of the time table: H100, H200, A100, L40S, A10 (default: the visible GPU's name)"
    )
    gpus: int = _described(1, "GPUs the study runs on (workers run trials side by side)", ge=1)
    tokens_per_s: float | None = _described(
        None, "measured KD tokens/s of one GPU on a trial of this study (metrics.jsonl's tokens_per_s)", gt=0
    )
    mfu: float | None = _described(
        None, "model FLOPs utilization assumed without --tokens-per-s (default 0.335, measured by nas on an H200)",
        gt=0, le=1,
    )  # fmt: skip


class EvalConfig(Settings):
    """`nas eval`: held-out perplexity and lm-evaluation-harness tasks."""

    tasks: list[str] = _described([], "lm-eval tasks, comma-separated (offline: kjv_cloze, kjv_lastword)")
    include_paths: list[str] = _described([], "folders of lm-eval task YAML files (repeatable)")
    limit: int | None = _described(None, "score at most N items of each task (default all)", ge=1)
    val_sequences: int | None = _described(None, "score at most N validation sequences per data source", ge=1)
    batch_size: int = _described(8, "sequences per forward", ge=1)
