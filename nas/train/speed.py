"""Steady-state training speed of a run: tokens/s and MFU of its train steps alone.

A run's wall time also holds its warm-up (CUDA and cuBLAS set-up, the allocator growing, torch.compile's
compilation, AdamW making its states at the first update), its evaluations, checkpoints and the final
model write; a short trial spends a large share of its time there (a 4B fp32 student takes ~24 s to
write: issue 31). `Speed` times only the optimizer steps after the first `WARMUP_STEPS`, so tokens/s and
MFU say what the step itself costs; the final write is timed apart (`write_seconds`).

MFU = tokens/s x model FLOPs per token / the peak of the run's GPUs, with model FLOPs per token =
2 N_teacher (the teacher's forward, when a teacher model runs: none with a teacher cache) + 6 N_student
(forward and backward), as Kaplan et al. 2020 (arXiv 2001.08361, §2.1) count them and PaLM's MFU does
(arXiv 2204.02311, App. B): recomputation by gradient checkpointing is not model FLOPs and attention's
score FLOPs are left out, so the figure is a lower bound. The peak is the datasheet's dense bf16
(`nas.device.PEAK_BF16_TFLOPS`); None where it is unknown (the CPU, an unlisted GPU).

`use_speed_settings` puts the step-speed settings of `DistillConfig` on the models (`attention`, `compile`;
`fused_optimizer` is read by `nas.train.optim`); `benchmarks/trial_speed.py` measures what each changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from nas.errors import ConfigError

# steps left out of the steady figures: the first pays the device's set-up and allocator growth (and
# compilation), the second AdamW's lazily made states (torch.optim.AdamW creates them at the first step)
WARMUP_STEPS = 2


@dataclass
class Speed:
    """The timing of one `distill` call's train steps (see the module docstring); filled as it runs,
    so a trial stopped early reads it too."""

    flops_per_token: float = 0.0  # model FLOPs: 2 N_teacher + 6 N_student
    peak_flops: float | None = None  # FLOP/s of all the run's devices together (None: unknown)
    steps: int = 0  # train steps timed (this call)
    tokens: int = 0  # tokens of the steady steps (after the warm-up)
    seconds: float = 0.0  # their time
    warmup_tokens: int = 0
    warmup_seconds: float = 0.0
    write_seconds: float | None = None  # the final model write (None: not written yet)

    def add_step(self, tokens: int, seconds: float) -> None:
        self.steps += 1
        if self.steps > WARMUP_STEPS:
            self.tokens += tokens
            self.seconds += seconds
        else:
            self.warmup_tokens += tokens
            self.warmup_seconds += seconds

    @property
    def steady(self) -> bool:
        """Whether any step after the warm-up ran (else the figures include the warm-up steps)."""
        return self.tokens > 0

    @property
    def tokens_per_s(self) -> float:
        tokens, seconds = (
            (self.tokens, self.seconds) if self.steady else (self.warmup_tokens, self.warmup_seconds)
        )
        return tokens / seconds if seconds > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        if not self.peak_flops:
            return None
        return self.tokens_per_s * self.flops_per_token / self.peak_flops

    def describe(self) -> str:
        """The steady speed in words, for the log."""
        mfu = f", MFU {self.mfu:.1%}" if self.mfu is not None else ""
        warm = "" if self.steady else " (warm-up steps only)"
        write = f"; model written in {self.write_seconds:.1f} s" if self.write_seconds is not None else ""
        return f"{self.tokens_per_s:,.0f} tokens/s steady{warm}{mfu}{write}"

    def record(self) -> dict[str, Any]:
        """What a trial record, a winner and `Result.speed` carry."""
        return {
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "train_seconds": self.seconds if self.steady else self.warmup_seconds,
            "steady_steps": self.steps - min(self.steps, WARMUP_STEPS) if self.steady else 0,
            "flops_per_token": self.flops_per_token,
            "write_seconds": self.write_seconds,
        }


def model_flops_per_token(student: nn.Module, teacher: nn.Module | None) -> float:
    """2 N_teacher + 6 N_student (no teacher model, e.g. a teacher cache: 6 N_student)."""
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    return float(2 * n_teacher + 6 * n_student)


def use_speed_settings(student: nn.Module, teacher: nn.Module | None, cfg: Any) -> None:
    """`cfg.attention` as both models' attention implementation, and with `cfg.compile` each of their
    decoder layers compiled (`nn.Module.compile`: once; the shared teacher of a search stays compiled)."""
    for model in (student, teacher):
        if not isinstance(model, nn.Module):
            continue
        if cfg.attention != "auto" and getattr(model.config, "_attn_implementation", None) != cfg.attention:
            try:
                model.set_attn_implementation(cfg.attention)
            except (ImportError, ValueError) as e:  # flash_attention_2 without flash-attn, an unsupported model
                raise ConfigError(f"distill.attention = {cfg.attention!r} is not available here: {e}") from None
        if cfg.compile:
            for layer in model.model.layers:
                if getattr(layer, "_compiled_call_impl", None) is None:
                    layer.compile()
