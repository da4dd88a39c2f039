"""`nas run`: importance -> space -> search -> full distillation of the winner -> report.

Every stage is resumable: the importance file, the study and the distillation checkpoints live
under the study's directory, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from nas.data.corpus import source_fingerprint
from nas.data.tokens import check_seq_len, check_tokenizer, config_dict, prepare
from nas.device import precision_for, resolve_device
from nas.errors import ConfigError, InfeasibleError
from nas.evaluate.harness import run_tasks
from nas.evaluate.loss import lm_loss
from nas.io import own_output, require_same, save_model_atomic
from nas.model.arch import Arch, count_params
from nas.model.families import load_config, load_model, load_tokenizer
from nas.plan import STAGES, check_plan
from nas.prune.cut import plan_cut, prune, save_pruned
from nas.prune.importance import Importance, compute_importance, importance_identity
from nas.prune.space import enumerate_budgets, parse_budget, with_horizon, within_memory
from nas.report.html import write_report
from nas.search.funnel import screen, search_order
from nas.search.horizon import extend_horizon
from nas.search.study import (
    StudyRecord,
    TrialRecord,
    arch_key,
    best_trial,
    keep_top_models,
    load_existing_study,
    make_storage,
    ranking_stability,
    storage_errors,
)
from nas.search.trial import SearchContext, enqueue_candidates, follow_trials, open_study, run_trials
from nas.settings import RunConfig, run_config_from_dict
from nas.train import dist
from nas.train.launch import distill_in_processes
from nas.train.loop import NOT_IDENTITY, distill
from nas.train.teacher_cache import ensure_teacher_cache, teacher_source

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
    winners: dict[str, Path] = field(default_factory=dict)  # budget -> winner directory


def load_teacher(cfg: RunConfig, data: Any):
    """The teacher, corrected first when `correct_steps` > 0 (once per study; workers reuse it)."""
    device = dist.local_device(cfg.device)  # cuda:LOCAL_RANK in a trial group
    dtype = precision_for(cfg.distill.precision, device).teacher_dtype  # the one policy (nas.device)
    if not cfg.correct_steps:
        return load_model(cfg.teacher, dtype=dtype, device=device)
    corrected = cfg.root / "corrected"
    if not (corrected / "model" / "config.json").is_file():
        run = cfg.distill.replace(steps=cfg.correct_steps, seed=cfg.seed)
        log.info("teacher correction: %d steps of LM loss on the distillation data", cfg.correct_steps)
        distill(None, load_model(cfg.teacher, device=device), data, run, corrected)
    return load_model(corrected / "model", dtype=dtype, device=device)


def load_or_compute_importance(cfg: RunConfig, teacher, data) -> Importance:
    """The teacher's importance, computed once per study and reused (also by every worker), unless it was
    computed with other settings (another teacher, data, or sample counts)."""
    path = cfg.root / "importance.safetensors"
    teacher_arch = Arch.from_hf_config(teacher.config)
    imp = cfg.importance
    identity = importance_identity(
        cfg.teacher, teacher_arch, data.fingerprint, imp.num_samples, imp.val_sequences,
        correct_steps=cfg.correct_steps,
    )  # fmt: skip
    if path.is_file():
        importance = Importance.load(path)
        importance.check_matches(teacher_arch)
        if importance.identity:  # files written before identities were recorded have none
            require_same(importance.identity, identity, f"importance file {path}", STUDY_WAYS_OUT)
        return importance
    importance = compute_importance(
        teacher, data.calib(imp.num_samples), data.val(imp.val_sequences), imp.batch_size
    )
    importance.identity = identity
    importance.save(path)
    return importance


STUDY_WAYS_OUT = (
    "rerun with the study's settings, give the study a new name (and a new out_dir if you set one), "
    "or pass --restart to delete the study's trials and outputs and start over"
)
STUDY_OUTPUTS = ("importance.safetensors", "corrected", "trials", "final", "final-start", "winner")


def study_identity(cfg: RunConfig) -> dict[str, Any]:
    """The settings that decide a study's trials and winner (read from the TOML and the teacher's config
    alone, so a changed study is refused before anything is loaded). Not: n_trials (raise it to continue
    a search), top_k, storage, device, heartbeats, the final distillation (`final/` records its own)."""
    data = cfg.data
    teacher = Path(cfg.teacher).expanduser()
    teacher_arch = Arch.from_hf_config(load_config(cfg.teacher))
    search_keys = (
        "horizon_tokens",
        "horizon_tokens_per_param",
        "rung_tokens",
        "horizon_steps",
        "eval_every",
        "adaptive",
        "max_horizon_factor",
        "stable_top",
        "stable_tau",
        "extrapolate",
        "bootstrap_samples",
        "per_class",
        "pruner",
        "reduction_factor",
        "sampler",
        "max_exhaustive",
        "order",
        "screen_sequences",
        "screen_top",
        "finalists",
    )
    return {
        "teacher": str(teacher.resolve()) if teacher.exists() else cfg.teacher,
        "teacher_arch": teacher_arch.to_dict(),
        "budget": cfg.budget,
        "budget_params": [parse_budget(b, teacher_arch, cfg.space.budget_kind) for b in cfg.budgets],
        "constraints": cfg.constraints.to_dict(),
        "space": cfg.space.to_dict(),
        "importance": {
            "num_samples": cfg.importance.num_samples,
            "val_sequences": cfg.importance.val_sequences,
        },
        "data": {"settings": config_dict(data), "sources": [source_fingerprint(s) for s in data.sources]},
        "depth_strategy": cfg.depth_strategy,
        "correct_steps": cfg.correct_steps,
        "seed": cfg.seed,
        "distill": {k: v for k, v in cfg.short_distill().to_dict().items() if k not in NOT_IDENTITY},
        "search": {k: getattr(cfg.search, k) for k in search_keys},
    }


def check_study(cfg: RunConfig, restart: bool = False) -> dict[str, Any]:
    """The study's identity, after refusing to continue a stored study made with other settings (its old
    trials would be mixed with new ones). `restart`: delete the stored study and its outputs first."""
    identity = study_identity(cfg)
    url = cfg.storage_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return identity  # no study yet (and no empty database file left behind if loading fails)
    storage = make_storage(url, cfg)
    if restart:
        clear_study(cfg, storage)
    with storage_errors(cfg.storage_url):
        try:
            study_id = storage.get_study_id_from_name(cfg.name)
        except KeyError:
            return identity
        recorded = StudyRecord.from_attrs(storage.get_study_user_attrs(study_id)).identity
    if recorded:
        require_same(recorded, identity, f"study {cfg.name!r} in {cfg.storage_url}", STUDY_WAYS_OUT)
    return identity


def clear_study(cfg: RunConfig, storage) -> None:
    """`--restart`: delete the stored study and its outputs under out_dir (nothing else there)."""
    log.info("restart: deleting study %s and its outputs under %s", cfg.name, cfg.root)
    with storage_errors(cfg.storage_url):
        if cfg.name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            optuna.delete_study(study_name=cfg.name, storage=storage)
    per_budget = [*cfg.root.glob("winner-*"), *cfg.root.glob("final-*")]  # several budgets' outputs
    for path in [cfg.root / name for name in STUDY_OUTPUTS] + per_budget:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def plan_candidates(
    cfg: RunConfig, teacher, importance: Importance, data, spaces: dict[str, list[Arch]]
) -> tuple[list[Arch], list[dict]]:
    """(the candidates to distill in order, the screen of every candidate). Funnel and exhaustive: the
    zero-shot screen of every candidate of every budget under the constraints, best first; TPE samples one
    budget's space (within the memory limit) and screens nothing."""
    s, constraints = cfg.search, cfg.constraints
    by_key = {arch_key(a): a for space in spaces.values() for a in space}
    if s.sampler == "tpe":
        if len(spaces) > 1 or constraints.min_throughput:
            raise ConfigError(
                "search.sampler = tpe searches one budget with no throughput floor; use the funnel (auto)"
            )
        kept, _ = within_memory(next(iter(spaces.values())), constraints, Arch.from_hf_config(teacher.config))
        return kept, []
    screened = screen(
        teacher, importance, spaces, data.val(s.screen_sequences), constraints, cfg.depth_strategy
    )
    for budget in spaces:
        if not any(x.budget == budget and not x.rejected for x in screened):
            reasons = {x.rejected.split(" ")[0] for x in screened if x.budget == budget}
            raise InfeasibleError(
                f"every candidate of budget {budget} breaks a constraint ({', '.join(sorted(reasons))}); "
                "relax [constraints] or raise the budget"
            )
    teacher_arch = Arch.from_hf_config(teacher.config).to_dict()
    chosen = search_order(screened, s.sampler, s.screen_top, s.order, s.per_class, teacher_arch)
    return [by_key[x.key] for x in chosen], [x.to_dict() for x in screened]


def prepare_context(
    cfg: RunConfig, candidate_keys: list[list[int]] | None = None, screened: list[dict] | None = None
) -> SearchContext:
    """Load teacher, data, importance and the ordered candidates (order and screen from the study if given)."""
    tokenizer = load_tokenizer(cfg.teacher)
    check_seq_len(cfg.data.seq_len, load_config(cfg.teacher), cfg.teacher)
    data = prepare(cfg.data, tokenizer)
    teacher = load_teacher(cfg, data)
    check_tokenizer(tokenizer, teacher.config)
    importance = load_or_compute_importance(cfg, teacher, data)
    spaces = enumerate_budgets(Arch.from_hf_config(teacher.config), cfg.budgets, cfg.space)
    if candidate_keys:
        by_key = {arch_key(a): a for space in spaces.values() for a in space}
        candidates = [by_key[tuple(k)] for k in candidate_keys if tuple(k) in by_key]
    else:
        candidates, screened = plan_candidates(cfg, teacher, importance, data, spaces)
    screen_by_key = {tuple(arch_key(x["arch"])): x for x in screened or []}
    cache = None
    if cfg.search.teacher_cache:  # once per study: the first process writes it, the others wait and read
        topk = cfg.search.teacher_cache_topk
        cache, _ = ensure_teacher_cache(cfg.root, teacher, tokenizer, data, cfg.short_distill(), topk)
    return SearchContext(cfg, teacher, tokenizer, data, importance, candidates, cache, screen_by_key)


def teacher_off_device(ctx: SearchContext, off: bool) -> None:
    """With a teacher cache the trials need no teacher on the GPU: move it to the CPU for them (`off`),
    and back to the run's device for the final distillation."""
    if ctx.teacher_cache is not None:
        ctx.teacher.to("cpu" if off else resolve_device(ctx.cfg.device))


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
        budget=parse_budget(cfg.budgets[0], teacher_arch, cfg.space.budget_kind),
        budget_kind=cfg.space.budget_kind,
        budgets={b: parse_budget(b, teacher_arch, cfg.space.budget_kind) for b in cfg.budgets},
        screen=list(ctx.screen.values()),
        importance_path=str((cfg.root / "importance.safetensors").resolve()),
        data_fingerprint=ctx.data.fingerprint,
        data=", ".join(s.path for p in cfg.data.phases for s in p.sources),
        versions=package_versions(),
        seed=cfg.seed,
        horizon_steps=cfg.horizon_steps,
        horizon_tokens=cfg.horizon_tokens,
        final_tokens=cfg.final_tokens,
        tokens_per_step=cfg.tokens_per_step,
        candidates=[list(arch_key(a)) for a in ctx.candidates],
        sampler={
            "tpe": "TPE with a budget constraint",
            "exhaustive": "every candidate, best screen first",
        }.get(
            cfg.search.sampler,
            f"funnel: the best {cfg.search.screen_top} of each budget's screen, best first",
        ),
        pruner=cfg.search.pruner,
        plan=json.loads(plan.read_text()) if (plan := cfg.root / "plan.json").is_file() else None,
    ).write(study)


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
    cfg: RunConfig, restart: bool = False, stages: tuple[str, ...] = ("importance", "trial", "evaluation")
) -> tuple[SearchContext, optuna.Study]:
    """Check the memory plan of `stages`, run (or continue) the study's trials, then record the ranking
    stability. The study's out_dir is held (`nas.io.own_output`) meanwhile: workers join through the
    storage, a second search is refused. A stored study made with other settings is refused
    (`restart`: deleted first)."""
    cfg = with_horizon(cfg, Arch.from_hf_config(load_config(cfg.teacher)))  # a horizon in tokens, fixed
    with own_output(cfg.root):
        identity = check_study(cfg, restart)
        check_plan(cfg, stages, gpu_memory_of(cfg))
        ctx = prepare_context(cfg)
        study = open_study(ctx)
        if ctx.exhaustive:  # before the config is recorded: a worker that sees the config sees the queue
            enqueue_candidates(study, ctx)
        record_study_attrs(study, ctx)
        if StudyRecord.read(study).identity is None:
            StudyRecord(identity=identity).write(study)
        return _search(ctx, study)


def _search(ctx: SearchContext, study: optuna.Study) -> tuple[SearchContext, optuna.Study]:
    cfg = ctx.cfg
    log.info("search: %d candidates to distill; %s", len(ctx.candidates), StudyRecord.read(study).sampler)
    teacher_off_device(ctx, True)
    run_trials(ctx, study)
    s = cfg.search
    # a search without a screen (TPE) has one budget and no budget labels on its trials
    labels = {b: b or cfg.budgets[0] for b in ctx.budget_sizes()}
    by_budget = {label: ranking_stability(study, s.top_k, cfg.horizon_steps, b) for b, label in labels.items()}
    StudyRecord(stability_by_budget=by_budget, stability=next(iter(by_budget.values()))).write(study)
    if s.adaptive and ctx.exhaustive:  # the finalists distill on until their order holds
        teacher_off_device(ctx, False)  # later batches than the teacher cache holds: the teacher itself
        for budget in labels:
            extend_horizon(ctx, study, budget)
    for budget in labels:
        keep_top_models(study, s.top_k, budget)
    if s.rerank_tasks:
        rerank(ctx, study)
    return ctx, study


def rerank(ctx: SearchContext, study: optuna.Study) -> None:
    """Score every completed trial whose short-run model is kept on `search.rerank_tasks` (lm-eval), so the
    report shows task accuracy beside LM loss (once per trial: a continued study skips scored ones)."""
    s = ctx.cfg.search
    scored = {int(k): v for k, v in (StudyRecord.read(study).rerank or {}).items()}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        path = Path(TrialRecord.read(trial).checkpoint or "")
        if trial.number in scored or not (path / "config.json").is_file():
            continue
        model = load_model(path, device=resolve_device(ctx.cfg.device))
        scores = run_tasks(model, ctx.tokenizer, list(s.rerank_tasks), limit=s.rerank_limit or None)
        scored[trial.number] = {task: metrics.get("acc") for task, metrics in scores.items()}
        log.info(
            "re-rank of trial %d (%s): %s", trial.number, TrialRecord.read(trial).label, scored[trial.number]
        )
    # a finished trial's attributes are frozen in Optuna: the scores live on the study, by trial number
    StudyRecord(rerank={str(n): v for n, v in scored.items()}).write(study)


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
    group = dist.setup(dist.local_device(cfg.distill.device))
    with dist.rank_zero_first():  # rank 0 fills the token cache, the others read it
        ctx = prepare_context(cfg, record.candidates, record.screen)
    teacher_off_device(ctx, True)
    if not group.main:
        follow_trials(ctx)
        return None
    study = open_study(ctx, create=False)
    try:
        run_trials(ctx, study, max_trials)
    finally:
        dist.from_rank_zero(None)  # the group's other processes stop
    return study


def final_budgets(cfg: RunConfig) -> list[str]:
    """The budgets whose winners `nas run` distills fully: `final_budgets`, or every budget."""
    return [str(b) for b in cfg.final_budgets] or cfg.budgets


def output_suffix(cfg: RunConfig, budget: str) -> str:
    """ "" for a one-budget study (winner/, final/), else e.g. "-25pct" (winner-25pct/)."""
    if len(cfg.budgets) == 1:
        return ""
    return "-" + budget.replace("%", "pct").replace("/", "-").replace(" ", "")


def finalize(
    ctx: SearchContext, study: optuna.Study, nproc_per_node: int = 1, budget: str | None = None
) -> dict[str, Any]:
    """Fully distill the best trial's student of `budget` (default: the first of `final_budgets`) from its
    short-run checkpoint and export the winner; `nproc_per_node` > 1: in that many torchrun processes
    (`nas.train.launch.distill_in_processes`)."""
    cfg = ctx.cfg
    teacher_off_device(ctx, False)
    budget = budget or final_budgets(cfg)[0]
    suffix = output_suffix(cfg, budget)
    best = best_trial(study, budget if ctx.screen else None)
    horizon = (StudyRecord.read(study).horizon or {}).get(budget, {})
    if "pick" in horizon:  # the adaptive horizon's pick, from its longest-distilled model
        best = study.trials[horizon["pick"]]
    trial = TrialRecord.read(best)
    arch = Arch.from_dict(trial.arch)
    checkpoint = Path(horizon.get("checkpoint") or trial.checkpoint or "")
    if (checkpoint / "config.json").is_file():
        student = load_model(checkpoint, device=next(ctx.teacher.parameters()).device)
    else:
        log.warning(
            "trial %d's checkpoint %s is missing; distilling the winner from a fresh cut",
            best.number,
            checkpoint,
        )
        student = prune(ctx.teacher, arch, ctx.importance, cfg.depth_strategy)
    final = cfg.root / f"final{suffix}"
    if nproc_per_node > 1:
        student, result = _distill_in_processes(ctx, student, checkpoint, nproc_per_node, final)
    else:
        run = cfg.final_distill()  # dense KD unless the teacher cache holds exactly its batches
        teacher = teacher_source(ctx.teacher, ctx.teacher_cache, run, ctx.data)
        result = distill(teacher, student, ctx.data, run, final)
    student.nas_cut = plan_cut(ctx.teacher_arch, arch, ctx.importance, cfg.depth_strategy)
    winner_dir = save_pruned(student, cfg.root / f"winner{suffix}", ctx.tokenizer, teacher=cfg.teacher)
    winner = {
        "budget": budget,
        "trial": best.number,
        "arch": arch.to_dict(),
        "params": count_params(arch),
        "val_loss": best.value,
        "final_val_loss": result.val_loss,
        "dir": str(winner_dir.resolve()),
        "curve": result.curve,
        "tokens": result.tokens + int(trial.tokens or 0) + extension_tokens(horizon, best.number),
        "horizon_stop": horizon.get("stop"),
    }
    if budget == final_budgets(cfg)[0]:
        StudyRecord(winner=winner).write(study)
    if len(cfg.budgets) > 1:
        StudyRecord(winners={**(StudyRecord.read(study).winners or {}), budget: winner}).write(study)
    log.info(
        "winner %s: val loss %.4f after full distillation -> %s", arch.describe(), result.val_loss, winner_dir
    )
    return winner


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
    teacher_dir = cfg.root / "corrected" / "model" if cfg.correct_steps else cfg.teacher
    device = next(ctx.teacher.parameters()).device
    student.to("cpu")  # replaced by the workers' result
    ctx.teacher.to("cpu")
    try:
        result = distill_in_processes(
            nproc, str(teacher_dir), str(start), cfg.data.to_dict(), cfg.final_distill(), final
        )
    finally:
        ctx.teacher.to(device)
    return load_model(final / "model", device=device), result


def run(cfg: RunConfig, report: bool = True, nproc_per_node: int = 1, restart: bool = False) -> RunResult:
    """The whole pipeline for one study TOML; the final distillation in `nproc_per_node` processes.
    `restart`: delete a stored study of the same name and its outputs first."""
    with own_output(cfg.root):
        stages = STAGES if nproc_per_node == 1 else ("importance", "trial", "evaluation")
        ctx, study = search(cfg, restart, stages)
        winners = {b: finalize(ctx, study, nproc_per_node, b) for b in final_budgets(cfg)}
        winner = next(iter(winners.values()))
        path = None
        if report:
            path = write_report(cfg.storage_url, cfg.name, Path("reports") / f"{cfg.name}.html")
    record = StudyRecord.read(study)
    return RunResult(
        study_name=cfg.name,
        storage=cfg.storage_url,
        winner_dir=Path(winner["dir"]),
        teacher_val_loss=record.teacher_val_loss,
        winner_val_loss=winner["final_val_loss"],
        report=path,
        stability=record.stability or {},
        winners={b: Path(w["dir"]) for b, w in winners.items()},
    )
