"""`nas plan`: will each stage of a study fit its GPUs, and with which settings?

For each stage (the importance pass, one search trial at the largest candidate of the space, the
final distillation of that candidate, the evaluation of the teacher) the plan reports the peak memory
per GPU split into weights / gradients / optimizer states / activations / teacher / loss temporaries,
measured by dry-running nas's own code on fake tensors (`nas.dryrun`; only `config.json` is read).
It does so for the study as configured and, when that does not fit, for the first settings of a
ladder of memory-lean changes that fit (`recommend`): gradient checkpointing, bf16 mixed precision,
8-bit AdamW states, bf16 weights with stochastic rounding, smaller micro- and validation batches,
optimizer states on the CPU, and finally more GPUs per trial (FSDP2), each at the cost of speed.

A stage fits when its peak is at most `HEADROOM` of the GPU's memory: the rest is for the CUDA
context, the caching allocator's fragmentation and collective buffers, which no dry run sees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nas.device import precision_for
from nas.errors import ConfigError
from nas.io import read_json, write_text_atomic
from nas.model.arch import Arch
from nas.model.families import layer_units
from nas.model.load import load_config
from nas.model.size import count_params
from nas.plan import dryrun
from nas.prune.space import enumerate_budgets
from nas.settings import DistillConfig, RunConfig

log = logging.getLogger(__name__)

STAGES = ("importance", "trial", "final", "evaluation")
HEADROOM = 0.92  # share of a GPU's memory a stage may plan to use
KNOBS = ("precision", "optimizer", "offload_optimizer", "gradient_checkpointing", "batch_size", "grad_accum")
CUDA = torch.device("cuda")
MIXERS = ("mamba", "linear_attention")  # the block types `_mixer_checkpointing` recomputes first


@dataclass
class StagePlan:
    """One stage under one set of settings: its planned peak per GPU and whether it fits."""

    stage: str
    policy: str  # "configured" | "recommended"
    peak_bytes: int
    breakdown: dict[str, int]  # bytes per dryrun.CATEGORIES at the peak
    phase: str  # the part of the stage where the peak is (e.g. "backward", "validation")
    train_bytes: int  # the peak of the stage without the in-loop validation (its own knob)
    gpus: int
    fits: bool
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Job:
    """What a stage runs, in the terms the dry run needs."""

    stage: str
    teacher: Any  # HF config
    student: Any | None  # HF config (training stages)
    seq_len: int
    settings: dict[str, Any]  # KNOBS + eval_batch_size (+ gpus)
    cache: dict = field(default_factory=dict)


def plan_study(
    cfg: RunConfig, gpu_memory: int, gpus_per_trial: int = 1, student: Arch | None = None
) -> list[StagePlan]:
    """The configured and the recommended plan of every stage of `cfg` on GPUs of `gpu_memory` bytes;
    the training stages at `student` (default: the largest candidate of the study's space)."""
    if gpu_memory <= 0 or gpus_per_trial < 1:
        raise ConfigError("the GPU memory must be positive and gpus_per_trial >= 1")
    teacher = load_config(cfg.teacher)
    teacher_arch = Arch.from_hf_config(teacher)
    if student is None:  # the largest candidate of every budget of the study (a given student needs no space)
        spaces = enumerate_budgets(teacher_arch, cfg.budgets, cfg.space)
        student = max((a for space in spaces.values() for a in space), key=count_params)
    largest = student
    student = largest.to_hf_config(teacher)  # the first layers' per-layer types: memory is the same
    seq_len = int(cfg.data.seq_len)
    cache: dict = {}
    plans = []
    for stage, settings in stage_settings(cfg, gpus_per_trial).items():
        job = _Job(stage, teacher, student if stage in ("trial", "final") else None, seq_len, settings, cache)
        configured = measure(job, settings, gpu_memory)
        plans.append(configured)
        plans.append(recommend(job, gpu_memory) if not configured.fits else _as_recommended(configured))
    log.info(
        "planned %s on %.1f GiB GPUs (largest candidate %s)", cfg.name, gpu_memory / 2**30, largest.describe()
    )
    return plans


def stage_settings(cfg: RunConfig, gpus_per_trial: int) -> dict[str, dict[str, Any]]:
    """The memory-relevant settings of each stage as the study configures them."""

    def train(d: DistillConfig) -> dict[str, Any]:
        knobs = {k: getattr(d, k) for k in KNOBS} | {"eval_batch_size": d.eval_batch_size}
        return knobs | {"precision": precision_for(d.precision, CUDA).name, "gpus": gpus_per_trial}

    teacher_only = {"precision": precision_for(cfg.distill.precision, CUDA).name, "gpus": 1}
    return {
        "importance": teacher_only | {"batch_size": cfg.importance.batch_size},
        "trial": train(cfg.distill),  # a trial's memory knobs (its steps are the horizon's: nas.search)
        "final": train(cfg.final_distill()),
        "evaluation": teacher_only | {"batch_size": cfg.distill.eval_batch_size},
    }


def measure(job: _Job, settings: dict[str, Any], gpu_memory: int, policy: str = "configured") -> StagePlan:
    """Dry-run `job` with `settings` (cached per settings) and judge it against `gpu_memory`."""
    # trial and final run the same code (one entry); importance and evaluation do not, even at equal settings
    key = ("train" if job.student is not None else job.stage, tuple(sorted(settings.items())))
    if key not in job.cache:
        phases = _phases(job, settings)
        rest = {k: v for k, v in phases.items() if k != "validation"} or phases
        job.cache[key] = (dryrun.peak_of(phases), dryrun.peak_of(rest)["peak_bytes"])
    peak, train = dict(job.cache[key][0]), job.cache[key][1]
    phase, total = peak.pop("phase"), peak.pop("peak_bytes")
    fits = total <= HEADROOM * gpu_memory
    return StagePlan(job.stage, policy, total, peak, phase, train, settings["gpus"], fits, dict(settings))


def _phases(job: _Job, s: dict[str, Any]) -> dict[str, dict[str, int]]:
    dtype = precision_for(s["precision"], CUDA).teacher_dtype
    if job.student is None:
        fn = dryrun.measure_importance if job.stage == "importance" else dryrun.measure_eval

        axes = dryrun.depth_axes(job.teacher)

        def one(depths):
            config = dryrun.at_axes(job.teacher, axes, depths)
            return fn(config, dtype, s["batch_size"], job.seq_len, s["precision"])

        return dryrun.extrapolate(one, tuple(n for _, n in axes))
    dcfg = DistillConfig(
        **{k: s[k] for k in KNOBS}, eval_batch_size=s["eval_batch_size"], fsdp=s["gpus"] > 1, device="cuda"
    )

    t_axes, s_axes = dryrun.depth_axes(job.teacher), dryrun.depth_axes(job.student)

    def pair(depths):
        t = dryrun.at_axes(job.teacher, t_axes, depths[: len(t_axes)])
        st = dryrun.at_axes(job.student, s_axes, depths[len(t_axes) :])
        with dryrun.fake_world(s["gpus"]):
            return dryrun.measure_train(t, st, dcfg, job.seq_len)

    return dryrun.extrapolate(pair, tuple(n for _, n in t_axes + s_axes))


def _as_recommended(plan: StagePlan) -> StagePlan:
    return dataclasses.replace(plan, policy="recommended")


def recommend(job: _Job, gpu_memory: int) -> StagePlan:
    """The first settings on the ladder (see the module docstring) under which `job` fits; the last
    tried (not fitting) when none does. Each rung keeps the ones before it."""
    s, plan = _fit_validation(job, dict(job.settings), gpu_memory)
    for change in _ladder(job):
        if plan.fits:
            break
        nxt = change(dict(s), plan)
        if nxt is not None and nxt != s:
            s, plan = _fit_validation(job, nxt, gpu_memory)
    return _least_recompute(job, plan, gpu_memory) if plan.fits else plan


def _least_recompute(job: _Job, plan: StagePlan, gpu_memory: int) -> StagePlan:
    """`plan`, or, when it checkpoints every layer of a hybrid, the same settings with only the Mamba /
    linear-attention layers checkpointed if that fits too (a later rung may have made room), else with that
    and half the micro-batch (twice the accumulation: the same step). Both trade speed, not the result; a
    half micro-batch of 2048-token sequences keeps the matmuls large, where recomputing every layer costs a
    third more FLOPs (issue 31: with 8-bit states at 4 x 2048, Nemotron-Nano-9B-v2's and Qwen3.5-9B's largest
    50% students plan 74.1 and 70.8 GiB with only their mixers checkpointed, over an 80 GB GPU's 68.5)."""
    mixers = _mixer_types(job)
    s = plan.settings
    if (
        not mixers
        or s.get("gradient_checkpointing") is not True
        or job.settings.get("gradient_checkpointing") is True
    ):
        return plan
    lighter = s | {"gradient_checkpointing": mixers}
    tries = [lighter]
    if s["batch_size"] // 2 >= s["gpus"]:
        tries.append(lighter | {"batch_size": s["batch_size"] // 2, "grad_accum": s["grad_accum"] * 2})
    for settings in tries:
        _, candidate = _fit_validation(job, settings, gpu_memory)
        if candidate.fits:
            return candidate
    return plan


def _fit_validation(job: _Job, s: dict[str, Any], gpu_memory: int) -> tuple[dict[str, Any], StagePlan]:
    """Measure `s`; when training fits but the in-loop validation does not, halve its batch (its
    logits are [batch, seq, vocab]) until it fits."""
    plan = measure(job, s, gpu_memory, "recommended")
    while not plan.fits and plan.train_bytes <= HEADROOM * gpu_memory and s.get("eval_batch_size", 1) > 1:
        s = s | {"eval_batch_size": s["eval_batch_size"] // 2}
        plan = measure(job, s, gpu_memory, "recommended")
    return s, plan


def _ladder(job: _Job) -> list:
    def setting(key, value):
        return lambda s, plan: s | {key: value}

    def halve_batch(s, plan):
        if s["batch_size"] // 2 < s["gpus"]:
            return None
        out = s | {"batch_size": s["batch_size"] // 2}
        return out | ({"grad_accum": s["grad_accum"] * 2} if "grad_accum" in s else {})

    def offload(s, plan):  # single-GPU only (torchao); fp32 AdamW states on the host
        return s | {"optimizer": "adamw", "offload_optimizer": True} if s["gpus"] == 1 else None

    def more_gpus(s, plan):
        gpus = s["gpus"] * 2
        if gpus > 8 or s["batch_size"] % gpus:
            return None
        return s | {"gpus": gpus, "offload_optimizer": False, "optimizer": "adamw-8bit"}

    if job.student is None:
        return [setting("precision", "bf16-mixed")] + [halve_batch] * 8
    # a mixture of experts skips bf16-mixed: transformers' grouped-matmul experts are not autocast-enabled, so
    # fp32 master weights reach torch's grouped_mm, whose fake-tensor (meta) kernel takes bf16 only
    mixed = [] if Arch.from_hf_config(job.student).num_experts else [setting("precision", "bf16-mixed")]
    train = [
        *_mixer_checkpointing(job),
        setting("gradient_checkpointing", True),
        *mixed,
        setting("optimizer", "adamw-8bit"),
        setting("precision", "bf16"),
    ]
    return train + [halve_batch] * 3 + [offload] + [more_gpus] * 3


def _mixer_types(job: _Job) -> tuple[str, ...]:
    """The student's Mamba / linear-attention block types (a hybrid's; none for other stacks). Their reference
    PyTorch scans (what runs without mamba-ssm / flash-linear-attention) save several times an attention
    layer's activations per layer (Nemotron-Nano-9B-v2, Qwen3.5-9B: issue 31's trials), so recomputing them
    frees the most memory per recomputed FLOP: the ladder checkpoints them first."""
    if job.student is None:
        return ()
    types = {units[0] for units in layer_units(job.student)}
    return tuple(t for t in MIXERS if t in types)


def _mixer_checkpointing(job: _Job) -> list:
    """The first rung for a hybrid student: checkpoint only its Mamba / linear-attention layers."""
    chosen = _mixer_types(job)
    if not chosen or job.settings.get("gradient_checkpointing") is True:
        return []
    return [lambda s, plan: s | {"gradient_checkpointing": chosen}]


def to_json(plans: list[StagePlan]) -> list[dict[str, Any]]:
    """The plan as a JSON-ready list of stages (`stage`, `peak_bytes`, `gpus`, `fits`, `settings`, ...)."""
    return [p.to_dict() for p in plans]


def format_plan(plans: list[StagePlan], gpu_memory: int) -> str:
    """A table in GiB: one row per stage and policy, the breakdown, the peak and whether it fits."""
    head = f"{'stage':<11}{'policy':<12}" + "".join(f"{c[:9]:>10}" for c in dryrun.CATEGORIES)
    lines = [
        f"GPU memory {gpu_memory / 2**30:.1f} GiB; a stage fits at <= {HEADROOM:.0%} "
        f"({HEADROOM * gpu_memory / 2**30:.1f} GiB)",
        head + f"{'peak':>9}{'gpus':>5}  fits  settings",
    ]
    for p in plans:
        cells = "".join(f"{p.breakdown[c] / 2**30:>10.2f}" for c in dryrun.CATEGORIES)
        lines.append(
            f"{p.stage:<11}{p.policy:<12}{cells}{p.peak_bytes / 2**30:>9.2f}{p.gpus:>5}  "
            f"{'yes ' if p.fits else 'NO  '}  {describe(p.settings)}"
        )
    return "\n".join(lines)


def describe(settings: dict[str, Any]) -> str:
    """Settings as TOML-like `key=value` pairs (the gpus are their own column)."""
    return " ".join(
        f"{k}={json.dumps(v) if isinstance(v, bool | tuple | list) else v}"
        for k, v in settings.items()
        if k != "gpus"
    )


def write_plan(cfg: RunConfig, plans: list[StagePlan], gpu_memory: int) -> Path:
    """Record the plan in the study's directory (`plan.json`, atomically); `nas run` reads it back."""
    path = cfg.root / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"gpu_memory": gpu_memory, "headroom": HEADROOM, "stages": to_json(plans)}
    write_text_atomic(path, json.dumps(record, indent=1))
    return path


def _recorded(cfg: RunConfig, gpu_memory: int, gpus_per_trial: int) -> list[StagePlan] | None:
    """The recorded plan when it was made for these settings and this GPU, else None."""
    path = cfg.root / "plan.json"
    if not path.is_file():
        return None
    record = read_json(path)
    plans = [StagePlan(**row) for row in record.get("stages", [])]
    wanted = stage_settings(cfg, gpus_per_trial)
    configured = {p.stage: p.settings for p in plans if p.policy == "configured"}
    wanted = json.loads(json.dumps(wanted))  # as recorded: tuples are lists
    return plans if record.get("gpu_memory") == gpu_memory and configured == wanted else None


def check_plan(
    cfg: RunConfig, stages: tuple[str, ...], gpu_memory: int | None, gpus_per_trial: int = 1
) -> None:
    """Refuse (ConfigError, one line naming the settings to change) a study whose `stages` will not
    fit GPUs of `gpu_memory` bytes; the plan is read from the study when recorded for these
    settings, else made and recorded now. `gpu_memory=None` (a CPU run) checks nothing."""
    if gpu_memory is None:
        return
    plans = _recorded(cfg, gpu_memory, gpus_per_trial)
    if plans is None:
        log.info("planning the memory of %s (once per settings; `nas plan` shows it)", cfg.name)
        plans = plan_study(cfg, gpu_memory, gpus_per_trial)
        write_plan(cfg, plans, gpu_memory)
    by = {(p.stage, p.policy): p for p in plans}
    for stage in stages:
        configured, recommended = by[(stage, "configured")], by[(stage, "recommended")]
        if not configured.fits:
            raise ConfigError(
                f"the {stage} stage needs {configured.peak_bytes / 2**30:.1f} GiB per GPU but fits at "
                f"{HEADROOM * gpu_memory / 2**30:.1f} GiB; set {_change(stage, configured, recommended)} "
                f"in {cfg.name}'s TOML (`nas plan` prints the whole plan)"
            )


def _change(stage: str, configured: StagePlan, recommended: StagePlan) -> str:
    """The settings that differ, as TOML keys of the table that holds them."""
    table = "final" if stage == "final" else "distill"
    names = {k: f"{table}.{k}" for k in recommended.settings}
    names |= {"precision": "distill.precision", "gpus": "--nproc-per-node"}
    if stage == "importance":
        names["batch_size"] = "importance.batch_size"
    if stage == "evaluation":
        names["batch_size"] = "distill.eval_batch_size"
    diff = {k: v for k, v in recommended.settings.items() if configured.settings.get(k) != v}
    parts = [f"{names[k]} = {json.dumps(v)}" for k, v in diff.items()]
    if not recommended.fits or not parts:
        return "more GPU memory per process (no setting the plan tries fits)"
    return ", ".join(parts)
