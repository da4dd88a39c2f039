"""What a search loads once per process (creator or worker) before its trials: the teacher (corrected
first when asked), its importance, the candidates the study's strategy chooses, the teacher cache; and
what the study records about itself."""

from __future__ import annotations

import logging
from typing import Any

import optuna
import torch

from nas.data.tokens import check_seq_len, prepare
from nas.device import precision_for, resolve_device
from nas.errors import ConfigError
from nas.evaluate.loss import lm_loss
from nas.io import package_versions as installed_versions
from nas.io import read_json
from nas.model.arch import Arch
from nas.model.load import load_config, load_model, load_tokenizer
from nas.model.size import count_params
from nas.model.validate import check_tokenizer_fits
from nas.pipeline.identity import STUDY_WAYS_OUT
from nas.prune.importance import Importance, ensure_importance, importance_identity
from nas.prune.space import enumerate_budgets, parse_budget
from nas.search.horizon_plan import resolve
from nas.search.search_context import SearchContext
from nas.search.strategy import SearchInputs, Strategy, strategy_for
from nas.search.study import StudyRecord, arch_key
from nas.settings import RunConfig
from nas.train import dist
from nas.train.loop import distill
from nas.train.teacher_cache import ensure_teacher_cache

log = logging.getLogger(__name__)
PACKAGES = ("nas", "torch", "transformers", "kernels", "optuna", "datasets", "lm_eval", "plotly", "pandas",
            "flash_linear_attention", "mamba_ssm", "causal_conv1d")  # fmt: skip (the last three: `nas.model.kernels`)


def prepare_context(
    cfg: RunConfig,
    candidate_keys: list[list[int]] | None = None,
    screened: list[dict] | None = None,
    *,
    teacher_config: Any = None,
    strategy: Strategy | None = None,
) -> SearchContext:
    """Load teacher, data, importance and the ordered candidates: the study's own when given
    (`candidate_keys`, `screened`: a worker), else the ones `strategy` (default: `search.strategy`'s)
    chooses now. `teacher_config`: the teacher's, when the caller has read it already."""
    strategy = strategy or strategy_for(cfg)
    horizon = resolve(cfg)  # once per process: `cfg` has the horizon in tokens (`nas.pipeline.search`)
    teacher_config = teacher_config or load_config(cfg.teacher)
    tokenizer = load_tokenizer(cfg.teacher)
    check_seq_len(cfg.data.seq_len, teacher_config, cfg.teacher)
    data = prepare(cfg.data, tokenizer)
    teacher = load_teacher(cfg, data)
    check_tokenizer_fits(tokenizer, teacher.config, cfg.teacher)  # the loaded teacher's embedding
    importance = study_importance(cfg, teacher, data)
    kd_teacher = load_kd_teacher(cfg, teacher)
    spaces = enumerate_budgets(Arch.from_hf_config(teacher.config), cfg.budgets, cfg.space)
    if candidate_keys:
        by_key = {arch_key(a): a for space in spaces.values() for a in space}
        candidates = [by_key[tuple(k)] for k in candidate_keys if tuple(k) in by_key]
    else:
        chosen = strategy.candidates(SearchInputs(cfg, teacher, importance, data, spaces))
        candidates, screened = chosen.archs, chosen.screen
    screen_by_key = {tuple(arch_key(x["arch"])): x for x in screened or []}
    cache = None
    if cfg.search.teacher_cache:  # once per study: the first process writes it, the others wait and read
        topk = cfg.search.teacher_cache_topk
        kd = kd_teacher or teacher
        cache, _ = ensure_teacher_cache(cfg.root, kd, tokenizer, data, horizon.short_distill(cfg), topk)
    return SearchContext(
        cfg, strategy, teacher, tokenizer, data, importance, candidates, cache, screen_by_key, kd_teacher,
        horizon=horizon,
    )


def load_teacher(cfg: RunConfig, data: Any):
    """The teacher, corrected first when `correct_steps` > 0 (once per study; workers reuse it)."""
    device = dist.local_device(cfg.device)  # cuda:LOCAL_RANK in a trial group
    dtype = precision_for(cfg.distill.precision, device).teacher_dtype  # the one policy (nas.device)
    if not cfg.correct_steps:
        return load_model(cfg.teacher, dtype=dtype, device=device, kernels=cfg.kernels)
    corrected = cfg.paths.corrected
    if not (corrected / "model" / "config.json").is_file():
        run = cfg.distill.replace(steps=cfg.correct_steps, seed=cfg.seed)
        log.info("teacher correction: %d steps of LM loss on the distillation data", cfg.correct_steps)
        distill(None, load_model(cfg.teacher, device=device, kernels=cfg.kernels), data, run, corrected)
    return load_model(corrected / "model", dtype=dtype, device=device, kernels=cfg.kernels)


def load_kd_teacher(cfg: RunConfig, teacher):
    """The students' KD teacher when `distill_teacher` names one (on the teacher's device, in its dtype),
    else None (they are distilled from the teacher they are cut from)."""
    if not cfg.distill_teacher:
        return None
    param = next(teacher.parameters())
    kd = load_model(cfg.distill_teacher, dtype=param.dtype, device=param.device, kernels=cfg.kernels)
    if kd.config.vocab_size != teacher.config.vocab_size:
        raise ConfigError(
            f"distill_teacher {cfg.distill_teacher} has a vocabulary of {kd.config.vocab_size}, the teacher "
            f"{teacher.config.vocab_size}; distill from a model with the teacher's tokenizer"
        )
    return kd


def study_importance(cfg: RunConfig, teacher, data) -> Importance:
    """The teacher's importance, computed once per study and reused (also by every worker), unless it was
    computed with other settings (another teacher, data, or sample counts)."""
    imp = cfg.importance
    identity = importance_identity(
        cfg.teacher, Arch.from_hf_config(teacher.config), data.fingerprint, imp.num_samples,
        imp.val_sequences, correct_steps=cfg.correct_steps,
    )  # fmt: skip
    importance, _ = ensure_importance(
        cfg.paths.importance, teacher, data, identity, imp.batch_size, STUDY_WAYS_OUT
    )
    return importance


def teacher_off_device(ctx: SearchContext, off: bool) -> None:
    """With a teacher cache the trials need no teacher on the GPU: move it to the CPU for them (`off`),
    and back to the run's device for the final distillation."""
    if ctx.teacher_cache is not None:
        for model in {id(m): m for m in (ctx.teacher, ctx.distill_from)}.values():
            model.to("cpu" if off else resolve_device(ctx.cfg.device))


def record_study_attrs(study: optuna.Study, ctx: SearchContext) -> None:
    """Write the study's settings once, so workers and the report need only the storage and name."""
    if StudyRecord.read(study).config is not None:
        return
    cfg, teacher_arch = ctx.cfg, ctx.teacher_arch
    StudyRecord(
        config=cfg.to_dict(),
        teacher=cfg.teacher,
        teacher_arch=teacher_arch.to_dict(),
        teacher_params=count_params(teacher_arch),
        teacher_val_loss=lm_loss(ctx.teacher, ctx.data.val(cfg.distill.eval_sequences)),
        budget_kind=cfg.space.budget_kind,
        budgets={b: parse_budget(b, teacher_arch, cfg.space.budget_kind) for b in cfg.budgets},
        screen=list(ctx.screen.values()),
        importance_path=str(cfg.paths.importance.resolve()),
        data_fingerprint=ctx.data.fingerprint,
        data=", ".join(s.path for p in cfg.data.phases for s in p.sources),
        chat_templates=ctx.data.chat_templates or None,
        versions=package_versions() | {"hub_kernels": cfg.kernels},
        seed=cfg.seed,
        **ctx.horizon.record_fields(),  # horizon steps and tokens, tokens a step
        final_tokens=cfg.final_tokens,
        candidates=[list(arch_key(a)) for a in ctx.candidates],
        sampler=ctx.strategy.description(),
        strategy=ctx.strategy.record(),
        pruner=cfg.search.pruner,
        plan=read_json(cfg.paths.plan) if cfg.paths.plan.is_file() else None,
    ).write(study)


def package_versions() -> dict[str, str]:
    return installed_versions(PACKAGES)


def gpu_memory_of(cfg: RunConfig) -> int | None:
    """Bytes of the study's CUDA device; None on the CPU, where no memory plan applies."""
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory
