"""`nas run` of a cascade: a chain of stages (`cascade = true`, `iterative_step`), each one a whole study.

The stages come from `nas.cascade.chain.cascade_stages` (budgets largest first, intermediate cuts). Stage k is
an ordinary nas study of its own, named `<name>.<k>-<budget>` in the cascade's storage with its files under
`<out_dir>/stages/<k>-<budget>/`: its teacher is the previous stage's distilled winner, so its importance is
recomputed on that model, and its screen, trials, winner and report are its own. Its budget is an absolute
parameter count computed from the ORIGINAL teacher, so "25%" means the same in a cascade and in a one-shot
study. `nas run` distills each winner before the next stage's search starts (the next stage is cut from it).

The distillation teacher of the later stages (`cascade_teacher`) is by default the previous winner, the
model the stage is cut from and its importance measured on: the chain as the Minitron paper builds it
(arXiv 2407.14679: its 4B starts from the distilled 8B, Table 14), one model per stage, and a cheaper
teacher (KD costs 2 N_teacher + 6 N_student FLOPs a token). `cascade_teacher = "teacher"` distills every
stage from the original (corrected) teacher instead (`distill_teacher` of the stage's study).

Resumable and kill-safe per stage: a stage is done once its winner is exported and `stage.json` is written
(atomically) in its directory; a rerun skips done stages (after checking that their settings are unchanged)
and resumes the first unfinished one where its own study stopped. Workers join a stage by its study name
(`nas worker --study <name>.<k>-<budget>`), or the whole cascade by its name (`nas worker --study <name>`:
`cascade_worker` serves each stage's trials in turn).
`<out_dir>/cascade.json` records the chain as it grows (`nas.cascade.stored`: older runs' names are read
too); the report (`reports/<name>.html`) draws it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from nas import pipeline
from nas.cascade.chain import CascadeStage, cascade_stages
from nas.cascade.report import stored_cascade, write_cascade_report
from nas.cascade.stored import CASCADE_FILE, migrate_record_file, remove_record_file, store_record
from nas.errors import ConfigError
from nas.io import read_json, write_text_atomic
from nas.lock import own_output
from nas.model.arch import Arch
from nas.model.load import load_config
from nas.model.size import count_params
from nas.search.study import (
    StudyRecord,
    TrialRecord,
    load_existing_study,
    make_storage,
    storage_errors,
)
from nas.settings import RunConfig, run_config_from_dict
from nas.settings.paths import default_report

log = logging.getLogger(__name__)
STAGE_FILE = "stage.json"


@dataclass
class CascadeResult:
    name: str
    storage: str
    stages: list[dict[str, Any]]  # `stage.json` of every stage, in order
    report: Path | None
    winners: dict[str, Path] = field(default_factory=dict)  # named budget -> winner directory


def stage_dir(cfg: RunConfig, stage: CascadeStage) -> Path:
    return cfg.root / "stages" / stage.slug


def stage_name(cfg: RunConfig, stage: CascadeStage) -> str:
    return f"{cfg.name}.{stage.slug}"


def original_teacher(cfg: RunConfig, plan: list[CascadeStage]) -> str:
    """The cascade's teacher as its first stage distils from it: corrected there when `correct_steps` > 0."""
    if not cfg.correct_steps:
        return cfg.teacher
    return str(stage_dir(cfg, plan[0]) / "corrected" / "model")


def stage_config(cfg: RunConfig, stage: CascadeStage, source: str, kd_teacher: str | None) -> RunConfig:
    """The study of one stage: the cascade's settings with the stage's teacher (`source`: the teacher or the
    previous winner), its absolute budget, its own name and directory, and the cascade's storage."""
    data = cfg.to_dict()
    final_steps = cfg.final_distill().steps
    data.update(
        name=stage_name(cfg, stage),
        out_dir=str(stage_dir(cfg, stage)),
        teacher=source,
        budget=str(stage.params),
        cascade=False,
        iterative_step="",
        final_budgets=[],
        correct_steps=cfg.correct_steps if stage.source == 0 else 0,  # the original teacher's correction only
        distill_teacher=kd_teacher or "",
        final={**cfg.final, "steps": max(1, round(final_steps * stage.token_share))},
    )
    data["search"] = {**data["search"], "storage": cfg.storage_url}
    return run_config_from_dict(data)


def read_stage(scfg: RunConfig) -> dict[str, Any] | None:
    """A finished stage's record, None if it has not finished; a finished stage made with other settings is
    refused (the later stages were cut from its winner)."""
    path = scfg.root / STAGE_FILE
    if not path.is_file():
        return None
    done = read_json(path)
    if not (Path(done["winner"]["dir"]) / "config.json").is_file():
        return None  # its winner was removed: run the stage again (its study resumes)
    pipeline.require_same_study(done["identity"], _plain(pipeline.study_identity(scfg)), f"stage {scfg.name!r}")
    return done


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def stage_tokens(study: optuna.Study, winner: dict[str, Any]) -> tuple[int, int]:
    """(tokens of every trial of the stage's search, tokens of its winner's full distillation)."""
    trials = study.get_trials(deepcopy=False)
    search = sum(int(TrialRecord.read(t).tokens or 0) for t in trials)
    short = next((int(TrialRecord.read(t).tokens or 0) for t in trials if t.number == winner["trial"]), 0)
    return search, int(winner["tokens"]) - short


def record_stage(scfg: RunConfig, stage: CascadeStage, kd_teacher: str) -> dict[str, Any]:
    """Write the finished stage's `stage.json` (atomically: it marks the stage done)."""
    study = load_existing_study(scfg.storage_url, scfg.name)
    record = StudyRecord.read(study)
    winner = (record.winners or {}).get(scfg.budgets[0]) or getattr(record, "winner", None) or {}
    search_tokens, final_tokens = stage_tokens(study, winner)
    done = {
        **stage.to_dict(),
        "study": scfg.name,
        "teacher": scfg.teacher,
        "teacher_params": record.teacher_params,
        "teacher_val_loss": record.teacher_val_loss,
        "kd_teacher": kd_teacher,
        "kd_teacher_params": count_params(Arch.from_hf_config(load_config(kd_teacher))),
        "importance": record.importance_path,
        "winner": {
            k: winner.get(k) for k in ("trial", "arch", "params", "val_loss", "final_val_loss", "dir")
        },
        "search_tokens": search_tokens,
        "final_tokens": final_tokens,
        "identity": _plain(pipeline.study_identity(scfg)),
    }
    write_text_atomic(scfg.root / STAGE_FILE, json.dumps(done, indent=1))
    return done


def cascade_record(cfg: RunConfig, plan: list[CascadeStage], done: list[dict[str, Any]]) -> dict[str, Any]:
    """`cascade.json`: the chain as planned, and every finished stage (what the report draws)."""
    teacher = Arch.from_hf_config(load_config(cfg.teacher))
    return {
        "name": cfg.name,
        "teacher": cfg.teacher,
        "teacher_arch": teacher.to_dict(),
        "teacher_params": count_params(teacher),
        "teacher_tokens": cfg.teacher_tokens,
        "cascade_teacher": cfg.cascade_teacher,
        "iterative_step": cfg.iterative_step,
        "plan": [s.to_dict() for s in plan],
        "stages": done,
    }


def clear_cascade(cfg: RunConfig, plan: list[CascadeStage]) -> None:
    """`--restart`: delete every stage's study, the cascade's, and the cascade's outputs under out_dir."""
    url = cfg.storage_url
    if not (url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file()):
        storage = make_storage(url, cfg)
        with storage_errors(url):
            names = set(optuna.study.get_all_study_names(storage))
            for name in ({stage_name(cfg, s) for s in plan} | {cfg.name}) & names:
                optuna.delete_study(study_name=name, storage=storage)
    shutil.rmtree(cfg.root / "stages", ignore_errors=True)
    remove_record_file(cfg.root)


def record_cascade_study(cfg: RunConfig, record: dict[str, Any]) -> None:
    """Keep the cascade record on an Optuna study named after the cascade (no trials), so a worker given the
    cascade's name serves every stage in turn (`cascade_worker`) and `nas report --study <name>` draws it."""
    with storage_errors(cfg.storage_url):
        storage = make_storage(cfg.storage_url, cfg)
        study = optuna.create_study(study_name=cfg.name, storage=storage, load_if_exists=True)
        if StudyRecord.read(study).config is not None:  # a one-shot study of the same name
            raise ConfigError(
                f"study {cfg.name!r} in {cfg.storage_url} is a one-shot study, not a cascade; "
                "give the cascade another name, or pass --restart to delete it"
            )
        store_record(study, record)


def cascade_worker(storage: str, name: str, poll: float = 2.0) -> int:
    """Serve the trials of every stage of cascade `name` in turn, as `nas.pipeline.worker` serves one study:
    a stage's study appears once the previous stage's winner is distilled. Returns the stages served."""
    served = 0
    record = stored_cascade(storage, name) or {}
    for stage in [f"{name}.{s['slug']}" for s in record.get("plan", [])]:
        while not stage_ready(storage, stage):
            time.sleep(poll)
        log.info("cascade %s: serving stage %s", name, stage)
        pipeline.worker(storage, stage)
        served += 1
    return served


def stage_ready(storage: str, stage: str) -> bool:
    """Whether a stage's study exists and records its config (its creator has planned its candidates)."""
    with storage_errors(storage):
        if stage not in optuna.study.get_all_study_names(storage):
            return False
        return (
            StudyRecord.from_attrs(optuna.load_study(study_name=stage, storage=storage).user_attrs).config
            is not None
        )


def run_cascade(
    cfg: RunConfig, report: bool = True, nproc_per_node: int = 1, restart: bool = False
) -> CascadeResult:
    """Run (or resume) every stage of a chained study in order; each stage's winner is fully distilled
    before the next stage's search is cut from it."""
    with own_output(cfg.root):
        plan = cascade_stages(cfg, Arch.from_hf_config(load_config(cfg.teacher)))
        if restart:
            clear_cascade(cfg, plan)
        migrate_record_file(cfg.root)  # an older run's record under the current name
        record_cascade_study(cfg, cascade_record(cfg, plan, []))
        done: list[dict[str, Any]] = []
        for stage in plan:
            source = cfg.teacher if stage.source == 0 else done[stage.source - 1]["winner"]["dir"]
            kd_teacher = original_teacher(cfg, plan) if cfg.cascade_teacher == "teacher" else source
            scfg = stage_config(cfg, stage, source, None if kd_teacher == source else kd_teacher)
            finished = read_stage(scfg)
            if finished is None:
                log.info("cascade stage %d of %d: %s from %s", stage.index, len(plan), stage.label, source)
                pipeline.run(scfg, report=report, nproc_per_node=nproc_per_node)
                finished = record_stage(scfg, stage, kd_teacher)
            else:
                log.info("cascade stage %d (%s) is done: skipped", stage.index, stage.label)
            done.append(finished)
            record = cascade_record(cfg, plan, done)
            write_text_atomic(cfg.root / CASCADE_FILE, json.dumps(record, indent=1))
            record_cascade_study(cfg, record)
        path = None
        if report:
            path = write_cascade_report(record, default_report(cfg.name))
    winners = {s["label"]: Path(s["winner"]["dir"]) for s in done if s["named"]}
    return CascadeResult(cfg.name, cfg.storage_url, done, path, winners)
