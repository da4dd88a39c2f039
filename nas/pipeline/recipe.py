"""`nas run` as a recipe: `run` = `search` -> `finalize` (each final budget) -> the report. The stages
follow in the order they run; `worker` joins a search from another process."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

from nas.device import resolve_device
from nas.errors import ConfigError, NasError
from nas.evaluate.harness import run_tasks
from nas.io import save_model_atomic
from nas.lock import own_output
from nas.model.arch import Arch
from nas.model.card import CardFacts, lineage_of, model_card
from nas.model.load import load_config, load_model
from nas.model.size import count_params
from nas.pipeline.context import (
    gpu_memory_of,
    package_versions,
    prepare_context,
    record_study_attrs,
    teacher_off_device,
)
from nas.pipeline.identity import check_study
from nas.plan import STAGES, check_plan
from nas.prune.cut import plan_cut, prune, save_pruned
from nas.report.html import write_report
from nas.search.horizon import AdaptiveHorizon
from nas.search.horizon_plan import fix_horizon
from nas.search.search_context import SearchContext
from nas.search.strategy import Strategy
from nas.search.study import (
    StudyRecord,
    TrialRecord,
    best_trial,
    done_trials,
    keep_top_models,
    load_existing_study,
    ranking_stability,
)
from nas.search.trial import enqueue_candidates, follow_trials, open_study, run_trials
from nas.search.wsd import final_run, stable_state
from nas.settings import DistillConfig, RunConfig, run_config_from_dict
from nas.train import dist
from nas.train.launch import distill_in_processes
from nas.train.loop import distill
from nas.train.teacher_cache import teacher_source
from nas.train.trackers import Trackers, check_trackers

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    study_name: str
    storage: str
    winner_dir: Path
    teacher_val_loss: float
    winner_val_loss: float
    report: Path | None
    stability: dict[str, Any]  # the first budget's ranking stability
    winners: dict[str, Path] = field(default_factory=dict)  # budget -> winner directory


def run(cfg: RunConfig, report: bool = True, nproc_per_node: int = 1, restart: bool = False) -> RunResult:
    """The whole pipeline for one study TOML; the final distillation in `nproc_per_node` processes.
    `restart`: delete a stored study of the same name and its outputs first."""
    check_trackers(cfg.report_to)  # a missing extra before any work
    with own_output(cfg.root):
        stages = STAGES if nproc_per_node == 1 else ("importance", "trial", "evaluation")
        ctx, study = search(cfg, restart, stages)
        try:
            winners = {b: finalize(ctx, study, nproc_per_node, b) for b in final_budgets(cfg)}
        finally:
            ctx.trackers.close()
        path = write_report(cfg.storage_url, cfg.name, cfg.paths.report) if report else None
    record, winner = StudyRecord.read(study), next(iter(winners.values()))
    return RunResult(
        study_name=cfg.name,
        storage=cfg.storage_url,
        winner_dir=Path(winner["dir"]),
        teacher_val_loss=record.teacher_val_loss,
        winner_val_loss=winner["final_val_loss"],
        report=path,
        stability=next(iter((record.stability or {}).values()), {}),
        winners={b: Path(w["dir"]) for b, w in winners.items()},
    )


def search(
    cfg: RunConfig,
    restart: bool = False,
    stages: tuple[str, ...] = ("importance", "trial", "evaluation"),
    strategy: Strategy | None = None,
) -> tuple[SearchContext, optuna.Study]:
    """Check the memory plan of `stages`, run (or continue) the study's trials, then record the ranking
    stability. The study's out_dir is held (`nas.lock.own_output`) meanwhile: workers join through the
    storage, a second search is refused. A stored study made with other settings is refused
    (`restart`: deleted first). `strategy`: default `search.strategy`'s (`nas.search.strategy`)."""
    check_trackers(cfg.report_to)  # a missing extra before any work
    teacher_config = load_config(cfg.teacher)  # read once for the whole command
    cfg = fix_horizon(cfg, Arch.from_hf_config(teacher_config))  # the horizon in tokens, fixed
    with own_output(cfg.root):
        identity = check_study(cfg, restart, teacher_config)
        check_plan(cfg, stages, gpu_memory_of(cfg))
        ctx = prepare_context(cfg, teacher_config=teacher_config, strategy=strategy)
        ctx.trackers = Trackers(cfg.report_to, cfg.root, cfg.name, cfg.to_dict())
        study = open_study(ctx)
        if ctx.queued:  # before the config is recorded: a worker that sees the config sees the queue
            enqueue_candidates(study, ctx)
        record_study_attrs(study, ctx)
        if StudyRecord.read(study).identity is None:
            StudyRecord(identity=identity).write(study)
        log.info("search: %d candidates to distill; %s", len(ctx.candidates), ctx.strategy.description())
        teacher_off_device(ctx, True)
        run_trials(ctx, study)
        extend_horizons(ctx, study)
        record_stability(ctx, study)
        if cfg.search.rerank_tasks:
            rerank(ctx, study)
        return ctx, study


def extend_horizons(ctx: SearchContext, study: optuna.Study) -> None:
    """The strategy's adaptive horizon (if any) over each budget's finalists, after every trial."""
    if not ctx.strategy.extends_horizon():
        return
    horizon = AdaptiveHorizon(ctx.cfg)
    teacher_off_device(ctx, False)  # later batches than the teacher cache holds: the teacher itself
    for budget in ctx.budget_sizes():
        record = horizon.extend(ctx, study, budget)
        if record.get("rungs"):  # where the horizon stopped, to the trackers
            last, label = record["rungs"][-1], budget or ctx.cfg.budgets[0]
            ctx.trackers.progress(done_trials(study), {f"horizon_tokens/{label}": last["tokens"],
                                  f"horizon_best_val_loss/{label}": min(last["losses"].values())})  # fmt: skip


def record_stability(ctx: SearchContext, study: optuna.Study) -> None:
    """Each budget's half- vs full-horizon ranking (`ranking_stability`) into the study; then only each
    budget's top_k short-run models are kept."""
    s = ctx.cfg.search
    # a search without a screen (TPE) has one budget and no budget labels on its trials
    labels = {b: b or ctx.cfg.budgets[0] for b in ctx.budget_sizes()}
    stability = {label: ranking_stability(study, s.top_k, ctx.horizon.steps, b) for b, label in labels.items()}
    StudyRecord(stability=stability).write(study)
    for budget in labels:
        keep_top_models(study, s.top_k, budget)


def rerank(ctx: SearchContext, study: optuna.Study) -> None:
    """Score every completed trial whose short-run model is kept on `search.rerank_tasks` (lm-eval), so the
    report shows task accuracy beside LM loss (once per trial: a continued study skips scored ones)."""
    s = ctx.cfg.search
    scored = {int(k): v for k, v in (StudyRecord.read(study).rerank or {}).items()}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        path = Path(TrialRecord.read(trial).checkpoint or "")
        if trial.number in scored or not (path / "config.json").is_file():
            continue
        model = load_model(path, device=resolve_device(ctx.cfg.device), kernels=ctx.cfg.kernels)
        scores = run_tasks(model, ctx.tokenizer, list(s.rerank_tasks), limit=s.rerank_limit or None)
        scored[trial.number] = {task: metrics.get("acc") for task, metrics in scores.items()}
        log.info(
            "re-rank of trial %d (%s): %s", trial.number, TrialRecord.read(trial).label, scored[trial.number]
        )
    # a finished trial's attributes are frozen in Optuna: the scores live on the study, by trial number
    StudyRecord(rerank={str(n): v for n, v in scored.items()}).write(study)


def final_budgets(cfg: RunConfig) -> list[str]:
    """The budgets whose winners `nas run` distills fully: `final_budgets`, or every budget."""
    return [str(b) for b in cfg.final_budgets] or cfg.budgets


def finalize(
    ctx: SearchContext, study: optuna.Study, nproc_per_node: int = 1, budget: str | None = None
) -> dict[str, Any]:
    """Fully distill the best trial's student of `budget` (default: the first of `final_budgets`) from its
    short-run checkpoint and export the winner; `nproc_per_node` > 1: in that many torchrun processes
    (`nas.train.launch.distill_in_processes`)."""
    cfg = ctx.cfg
    teacher_off_device(ctx, False)
    budget = budget or final_budgets(cfg)[0]
    best = best_trial(study, budget if ctx.screen else None)
    horizon = (StudyRecord.read(study).horizon or {}).get(budget, {})
    if "pick" in horizon:  # the adaptive horizon's pick, from its longest-distilled model
        best = study.trials[horizon["pick"]]
    trial = TrialRecord.read(best)
    arch = Arch.from_dict(trial.arch)
    checkpoint = Path(horizon.get("checkpoint") or trial.checkpoint or "")
    if (checkpoint / "config.json").is_file():
        student = load_model(checkpoint, device=next(ctx.teacher.parameters()).device, kernels=cfg.kernels)
    else:
        log.warning("trial %d's checkpoint %s is missing; distilling the winner from a fresh cut",
                    best.number, checkpoint)  # fmt: skip
        student = prune(ctx.teacher, arch, ctx.importance, cfg.depth_strategy)
    final = cfg.paths.final(budget)
    if nproc_per_node > 1:
        student, result = _distill_in_processes(ctx, student, checkpoint, nproc_per_node, final)
    else:
        run, state = final_schedule(cfg, checkpoint)
        teacher = teacher_source(ctx.distill_from, ctx.teacher_cache, run, ctx.data)

        def stream(step: int, val_loss: float) -> None:  # at each evaluation, as it runs
            ctx.trackers.stream(f"final_{budget}", final / "metrics.jsonl")

        result = distill(teacher, student, ctx.data, run, final, on_eval=stream, start=state)
    ctx.trackers.stream(f"final_{budget}", final / "metrics.jsonl")
    student.nas_cut = plan_cut(ctx.teacher_arch, arch, ctx.importance, cfg.depth_strategy)
    tokens = result.tokens + int(trial.tokens or 0) + extension_tokens(horizon, best.number)
    card = winner_card(ctx, study, best.number, arch, student.nas_cut, budget, tokens, result.val_loss)
    winner_dir = save_pruned(
        student, cfg.paths.winner(budget), ctx.tokenizer, teacher=cfg.teacher, vision=cfg.vision, card=card
    )
    winner = {
        "budget": budget, "trial": best.number, "arch": arch.to_dict(), "params": count_params(arch),
        "val_loss": best.value, "final_val_loss": result.val_loss, "dir": str(winner_dir.resolve()),
        "curve": result.curve, "horizon_stop": horizon.get("stop"), "tokens": tokens,
        "tokens_per_s": result.tokens_per_s, "mfu": result.speed.get("mfu"), "speed": result.speed,
        "kernel_paths": result.kernel_paths,
    }  # fmt: skip
    StudyRecord(winners={**(StudyRecord.read(study).winners or {}), budget: winner}).write(study)
    log.info(
        "winner %s: val loss %.4f after full distillation -> %s", arch.describe(), result.val_loss, winner_dir
    )
    return winner


def final_schedule(cfg: RunConfig, checkpoint: Path) -> tuple[DistillConfig, Path | None]:
    """The final distillation's settings and the state it starts from: with `search.rung_schedule = "wsd"`
    the rest of the winner's one schedule (`nas.search.wsd.final_run`: its stable phase resumed with the
    optimizer state, then the decay), else `final_distill()` afresh from the weights."""
    state = stable_state(checkpoint) if cfg.search.rung_schedule == "wsd" else None
    if state is None:
        return cfg.final_distill(), None  # dense KD unless the teacher cache holds exactly its batches
    log.info("final distillation: continuing the stable phase of %s, then its decay", state)
    return final_run(cfg.final_distill()), state


def winner_card(
    ctx: SearchContext, study: optuna.Study, trial: int, arch: Arch, cut, budget: str, tokens: int, loss: float
) -> str:
    """The model card (`nas.model.card`) of a winner: base_model is the original teacher of its lineage (a
    cascade's later stages are cut from earlier winners, each of which records its teacher)."""
    record = StudyRecord.read(study)
    lineage = lineage_of(ctx.cfg.teacher)
    facts = CardFacts(
        teacher=lineage[0],
        teacher_arch=original_arch(lineage[0], ctx.teacher_arch),
        arch=arch,
        study=ctx.cfg.name,
        budget=budget,
        tokens=tokens,
        val_loss=loss,
        teacher_val_loss=record.teacher_val_loss,
        evals=dict((record.rerank or {}).get(str(trial), {})),
        cut=asdict(cut),
        lineage=lineage,
        source_arch=ctx.teacher_arch if len(lineage) > 1 else None,  # a later stage: cut from a winner
        trial=trial,
        nas_version=package_versions().get("nas", ""),
    )
    return model_card(facts)


def original_arch(teacher: str, fallback: Arch) -> Arch:
    """The Arch of the lineage's original teacher (`fallback` when its config cannot be read here)."""
    try:
        return Arch.from_hf_config(load_config(teacher))
    except NasError:
        return fallback


def extension_tokens(horizon: dict, number: int) -> int:
    """KD tokens trial `number` got in the adaptive horizon's rungs after its own horizon."""
    rungs = horizon.get("rungs", [])
    return sum(r["tokens"] - p["tokens"] for p, r in zip(rungs, rungs[1:], strict=False) if str(number) in r["losses"])


def _distill_in_processes(ctx: SearchContext, student, checkpoint: Path, nproc: int, final: Path):
    """The final distillation as a torchrun job over model directories; the teacher leaves the GPU
    meanwhile. Returns (the distilled student, its Result)."""
    cfg = ctx.cfg
    start = checkpoint
    if not (checkpoint / "config.json").is_file():  # a fresh cut: give the workers a directory
        start = save_model_atomic(student, final.with_name(final.name + "-start"))
    teacher_dir = cfg.paths.corrected / "model" if cfg.correct_steps else cfg.distill_teacher or cfg.teacher
    device = next(ctx.teacher.parameters()).device
    student.to("cpu")  # replaced by the workers' result
    ctx.teacher.to("cpu")
    try:
        result = distill_in_processes(
            nproc, str(teacher_dir), str(start), cfg.data.to_dict(), cfg.final_distill(), final, cfg.kernels
        )
    finally:
        ctx.teacher.to(device)
    return load_model(final / "model", device=device, kernels=cfg.kernels), result


def worker(storage: str, study_name: str, max_trials: int | None = None) -> optuna.Study | None:
    """Join a study created by `nas search`/`nas run` and pull trials until it is done. Under torchrun
    the processes are one trial group: rank 0 pulls the trials, all train each one as an FSDP2 job
    (`nas worker --nproc-per-node N`); the other ranks return None."""
    record = StudyRecord.read(load_existing_study(storage, study_name))
    if record.config is None:
        raise ConfigError(f"study {study_name!r} was not created by nas (no config attribute)")
    data = dict(record.config)
    data["search"] = {**data["search"], "storage": storage}
    importance = Path(record.importance_path or "")
    if not importance.is_file():  # computed once by the study's creator; workers share it, never recompute
        raise ConfigError(
            f"study {study_name!r}: its importance file {importance} is not on this machine; put the "
            "study's out_dir on storage that every worker mounts at the same path"
        )
    data["out_dir"] = str(importance.parent)  # so a relative out_dir works from any working directory
    cfg = run_config_from_dict(data)
    check_trackers(cfg.report_to)  # a missing extra before any work
    group = dist.setup(dist.local_device(cfg.distill.device))
    with dist.rank_zero_first():  # rank 0 fills the token cache, the others read it
        ctx = prepare_context(cfg, record.candidates, record.screen)
    teacher_off_device(ctx, True)
    if not group.main:
        follow_trials(ctx)
        return None
    study = open_study(ctx, create=False)
    ctx.trackers = Trackers(cfg.report_to, cfg.root, cfg.name, cfg.to_dict())  # this worker's trials
    try:
        run_trials(ctx, study, max_trials)
    finally:
        dist.from_rank_zero(None)  # the group's other processes stop
        ctx.trackers.close()
    return study
