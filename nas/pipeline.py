"""`nas run`: importance -> space -> search -> full distillation of the winner -> report.

Every stage is resumable: the importance file, the study and the distillation checkpoints live
under the study's directory, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from transformers import AutoModelForCausalLM

from nas.data.tokens import check_tokenizer, prepare
from nas.device import precision_for, resolve_device
from nas.errors import ConfigError
from nas.evaluate.loss import lm_loss
from nas.io import save_model_atomic
from nas.model.arch import Arch, count_params
from nas.model.families import load_model, load_tokenizer
from nas.plan import STAGES, check_plan
from nas.prune.cut import plan_cut, prune, save_pruned
from nas.prune.importance import Importance, compute_importance
from nas.prune.space import enumerate_candidates, parse_budget
from nas.report.html import write_report
from nas.search.study import arch_key, best_trial, keep_top_models, load_existing_study, ranking_stability
from nas.search.trial import SearchContext, follow_trials, open_study, run_trials
from nas.settings import RunConfig, run_config_from_dict
from nas.train import dist
from nas.train.launch import distill_in_processes
from nas.train.loop import distill

log = logging.getLogger(__name__)
PACKAGES = ("nas", "torch", "transformers", "optuna", "datasets", "lm_eval", "plotly", "pandas")


@dataclass
class RunResult:
    study_name: str
    storage: str
    winner_dir: Path
    teacher_val_loss: float
    winner_val_loss: float
    report: Path | None
    stability: dict[str, Any]


def load_teacher(cfg: RunConfig, data: Any):
    """The teacher, corrected first when `correct_steps` > 0 (once per study; workers reuse it)."""
    device = dist.local_device(cfg.device)  # cuda:LOCAL_RANK in a trial group
    dtype = precision_for(cfg.distill.precision, device).teacher_dtype  # the one policy (nas.device)
    if not cfg.correct_steps:
        return load_model(cfg.teacher, dtype=dtype, device=device)
    corrected = cfg.root / "corrected"
    if not (corrected / "model" / "config.json").is_file():
        run = dataclasses.replace(cfg.distill, steps=cfg.correct_steps, seed=cfg.seed)
        log.info("teacher correction: %d steps of LM loss on the distillation data", cfg.correct_steps)
        distill(None, load_model(cfg.teacher, device=device), data, run, corrected)
    return AutoModelForCausalLM.from_pretrained(corrected / "model", dtype=dtype).to(device).eval()


def load_or_compute_importance(cfg: RunConfig, teacher, data) -> Importance:
    """The teacher's importance, computed once per study and reused (also by every worker)."""
    path = cfg.root / "importance.safetensors"
    teacher_arch = Arch.from_hf_config(teacher.config)
    if path.is_file():
        importance = Importance.load(path)
        importance.check_matches(teacher_arch)
        return importance
    imp = cfg.importance
    importance = compute_importance(
        teacher, data.calib(imp.num_samples), data.val(imp.val_sequences), imp.batch_size
    )
    importance.save(path)
    return importance


def order_candidates(
    cfg: RunConfig, teacher, importance: Importance, data, candidates: list[Arch]
) -> list[Arch]:
    """Priority order of an exhaustive search: best zero-shot (pruned, no KD) loss first, so successive
    halving meets strong candidates early and stops weak ones sooner. Largest first for `params`."""
    if cfg.search.order == "params" or len(candidates) > cfg.search.max_exhaustive:
        return candidates
    val = data.val(min(16, cfg.distill.eval_sequences))
    losses = {}
    for arch in candidates:
        losses[arch_key(arch)] = lm_loss(prune(teacher, arch, importance, cfg.depth_strategy), val)
    return sorted(candidates, key=lambda a: losses[arch_key(a)])


def prepare_context(cfg: RunConfig, candidate_keys: list[list[int]] | None = None) -> SearchContext:
    """Load teacher, data, importance and the ordered candidates (the order from the study if given)."""
    tokenizer = load_tokenizer(cfg.teacher)
    data = prepare(cfg.data_config(), tokenizer)
    teacher = load_teacher(cfg, data)
    check_tokenizer(tokenizer, teacher.config)
    importance = load_or_compute_importance(cfg, teacher, data)
    teacher_arch = Arch.from_hf_config(teacher.config)
    candidates = enumerate_candidates(teacher_arch, cfg.budget, cfg.space)
    if candidate_keys:
        by_key = {arch_key(a): a for a in candidates}
        candidates = [by_key[tuple(k)] for k in candidate_keys if tuple(k) in by_key]
    else:
        candidates = order_candidates(cfg, teacher, importance, data, candidates)
    return SearchContext(cfg, teacher, tokenizer, data, importance, candidates)


def record_study_attrs(study: optuna.Study, ctx: SearchContext) -> None:
    """Write the study's settings once, so workers and the report need only the storage and name."""
    if "config" in study.user_attrs:
        return
    cfg, teacher_arch = ctx.cfg, ctx.teacher_arch
    attrs = {
        "config": cfg.to_dict(),
        "teacher": cfg.teacher,
        "teacher_arch": teacher_arch.to_dict(),
        "teacher_params": count_params(teacher_arch),
        "teacher_val_loss": lm_loss(ctx.teacher, ctx.data.val(cfg.distill.eval_sequences)),
        "budget": parse_budget(cfg.budget, teacher_arch),
        "importance_path": str((cfg.root / "importance.safetensors").resolve()),
        "data_fingerprint": ctx.data.fingerprint,
        "data": ", ".join(s["path"] for p in _phases(cfg.data) for s in p["sources"]),
        "versions": package_versions(),
        "seed": cfg.seed,
        "horizon_steps": cfg.search.horizon_steps,
        "tokens_per_step": cfg.distill.batch_size * cfg.distill.grad_accum * ctx.data.seq_len,
        "candidates": [list(arch_key(a)) for a in ctx.candidates],
        "sampler": "exhaustive, best zero-shot loss first"
        if ctx.exhaustive
        else "TPE with a budget constraint",
        "pruner": cfg.search.pruner,
    }
    plan = cfg.root / "plan.json"
    if plan.is_file():  # the memory plan (`nas plan`, or the check before this run)
        attrs["plan"] = json.loads(plan.read_text())
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def _phases(data: dict[str, Any]) -> list[dict[str, Any]]:
    return data.get("phases") or [{"sources": data.get("sources", [])}]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def gpu_memory_of(cfg: RunConfig) -> int | None:
    """Bytes of the study's CUDA device; None on the CPU, where no memory plan applies."""
    device = resolve_device(cfg.device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def search(
    cfg: RunConfig, stages: tuple[str, ...] = ("importance", "trial", "evaluation")
) -> tuple[SearchContext, optuna.Study]:
    """Check the memory plan of `stages`, run (or continue) the study's trials, then record the
    ranking stability."""
    check_plan(cfg, stages, gpu_memory_of(cfg))
    ctx = prepare_context(cfg)
    study = open_study(ctx)
    record_study_attrs(study, ctx)
    log.info(
        "space: %d candidates; %s search", len(ctx.candidates), "exhaustive" if ctx.exhaustive else "TPE"
    )
    run_trials(ctx, study)
    study.set_user_attr("stability", ranking_stability(study, cfg.search.top_k, cfg.search.horizon_steps))
    keep_top_models(study, cfg.search.top_k)
    return ctx, study


def worker(storage: str, study_name: str, max_trials: int | None = None) -> optuna.Study | None:
    """Join a study created by `nas search`/`nas run` and pull trials until it is done. Under torchrun
    the processes are one trial group: rank 0 pulls the trials, all train each one as an FSDP2 job
    (`nas worker --nproc-per-node N`); the other ranks return None."""
    stored = load_existing_study(storage, study_name)
    if "config" not in stored.user_attrs:
        raise ConfigError(f"study {study_name!r} was not created by nas (no config attribute)")
    data = dict(stored.user_attrs["config"])
    data["search"] = {**data["search"], "storage": storage}
    importance = Path(stored.user_attrs.get("importance_path", ""))
    if not importance.is_file():  # computed once by the study's creator; workers share it, never recompute
        raise ConfigError(
            f"study {study_name!r}: its importance file {importance} is not on this machine; put the "
            "study's out_dir on storage that every worker mounts at the same path"
        )
    data["out_dir"] = str(importance.parent)  # so a relative out_dir works from any working directory
    cfg = run_config_from_dict(data)
    group = dist.setup(dist.local_device(cfg.distill.device))
    with dist.rank_zero_first():  # rank 0 fills the token cache, the others read it
        ctx = prepare_context(cfg, stored.user_attrs.get("candidates"))
    if not group.main:
        follow_trials(ctx)
        return None
    study = open_study(ctx, create=False)
    try:
        run_trials(ctx, study, max_trials)
    finally:
        dist.from_rank_zero(None)  # the group's other processes stop
    return study


def finalize(ctx: SearchContext, study: optuna.Study, nproc_per_node: int = 1) -> dict[str, Any]:
    """Fully distill the best trial's student (from its short-run checkpoint) and export the winner;
    `nproc_per_node` > 1: in that many torchrun processes (`nas.train.launch.distill_in_processes`)."""
    cfg = ctx.cfg
    best = best_trial(study)
    arch = Arch.from_dict(best.user_attrs["arch"])
    checkpoint = Path(best.user_attrs.get("checkpoint", ""))
    if (checkpoint / "config.json").is_file():
        student = AutoModelForCausalLM.from_pretrained(checkpoint).to(next(ctx.teacher.parameters()).device)
    else:
        log.warning(
            "trial %d's checkpoint %s is missing; distilling the winner from a fresh cut",
            best.number,
            checkpoint,
        )
        student = prune(ctx.teacher, arch, ctx.importance, cfg.depth_strategy)
    if nproc_per_node > 1:
        student, result = _distill_in_processes(ctx, student, checkpoint, nproc_per_node)
    else:
        result = distill(ctx.teacher, student, ctx.data, cfg.final_distill(), cfg.root / "final")
    student.nas_cut = plan_cut(ctx.teacher_arch, arch, ctx.importance, cfg.depth_strategy)
    winner_dir = save_pruned(student, cfg.root / "winner", ctx.tokenizer, teacher=cfg.teacher)
    winner = {
        "trial": best.number,
        "arch": arch.to_dict(),
        "params": count_params(arch),
        "val_loss": best.value,
        "final_val_loss": result.val_loss,
        "dir": str(winner_dir.resolve()),
        "curve": result.curve,
        "tokens": result.tokens + int(best.user_attrs.get("tokens", 0)),
    }
    study.set_user_attr("winner", winner)
    log.info(
        "winner %s: val loss %.4f after full distillation -> %s", arch.describe(), result.val_loss, winner_dir
    )
    return winner


def _distill_in_processes(ctx: SearchContext, student, checkpoint: Path, nproc: int):
    """The final distillation as a torchrun job over model directories; the teacher leaves the GPU
    meanwhile. Returns (the distilled student, its Result)."""
    cfg = ctx.cfg
    start = checkpoint
    if not (checkpoint / "config.json").is_file():  # a fresh cut: give the workers a directory
        start = save_model_atomic(student, cfg.root / "final-start")
    teacher_dir = cfg.root / "corrected" / "model" if cfg.correct_steps else cfg.teacher
    device = next(ctx.teacher.parameters()).device
    student.to("cpu")  # replaced by the workers' result
    ctx.teacher.to("cpu")
    try:
        result = distill_in_processes(
            nproc, str(teacher_dir), str(start), cfg.data, cfg.final_distill(), cfg.root / "final"
        )
    finally:
        ctx.teacher.to(device)
    return AutoModelForCausalLM.from_pretrained(cfg.root / "final" / "model").to(device), result


def run(cfg: RunConfig, report: bool = True, nproc_per_node: int = 1) -> RunResult:
    """The whole pipeline for one study TOML; the final distillation in `nproc_per_node` processes."""
    ctx, study = search(cfg, STAGES if nproc_per_node == 1 else ("importance", "trial", "evaluation"))
    winner = finalize(ctx, study, nproc_per_node)
    path = None
    if report:
        path = write_report(cfg.storage_url, cfg.name, Path("reports") / f"{cfg.name}.html")
    return RunResult(
        study_name=cfg.name,
        storage=cfg.storage_url,
        winner_dir=Path(winner["dir"]),
        teacher_val_loss=study.user_attrs["teacher_val_loss"],
        winner_val_loss=winner["final_val_loss"],
        report=path,
        stability=study.user_attrs.get("stability", {}),
    )
