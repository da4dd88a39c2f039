"""Which stored study a command continues: a study's identity (the settings that decide its trials and
winner), the check that refuses to mix a changed study's trials with its old ones, and `--restart`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna

from nas.data.corpus import source_fingerprint
from nas.data.tokens import config_dict
from nas.io import require_same
from nas.model.arch import Arch
from nas.model.load import load_config
from nas.prune.space import parse_budget
from nas.search.horizon_plan import HORIZON_SETTINGS, resolve
from nas.search.study import StudyRecord, make_storage, storage_errors
from nas.settings import RunConfig, SearchConfig
from nas.settings.legacy import identity_in_tokens
from nas.train.run_files import NOT_IDENTITY

log = logging.getLogger(__name__)
STUDY_WAYS_OUT = (
    "rerun with the study's settings, give the study a new name (and a new out_dir if you set one), "
    "or pass --restart to delete the study's trials and outputs and start over"
)
# the search settings that decide the trials (not n_trials: raise it to continue a search; not top_k,
# storage, heartbeats: they change nothing a trial computes)
SEARCH_IDENTITY = (*HORIZON_SETTINGS, "pruner", "reduction_factor", "strategy", "order", "screen_sequences",
                   "screen_top", "finalists", "per_class", "adaptive", "max_horizon_factor", "stable_top", "stable_tau", "extrapolate",
                   "bootstrap_samples")  # fmt: skip
STORED_AS = {"strategy": "sampler"}  # the key every stored identity has for it (a rename must not refuse a resume)


def study_identity(cfg: RunConfig, teacher_config: Any = None) -> dict[str, Any]:
    """The settings that decide a study's trials and winner (from the TOML and the teacher's config
    alone, so a changed study is refused before anything is loaded). Not: n_trials, top_k, storage,
    device, heartbeats, the final distillation (`final/` records its own)."""
    teacher = Path(cfg.teacher).expanduser()
    teacher_arch = Arch.from_hf_config(teacher_config or load_config(cfg.teacher))
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
        "data": {
            "settings": config_dict(cfg.data),
            "sources": [source_fingerprint(s) for s in cfg.data.sources],
        },
        "depth_strategy": cfg.depth_strategy,
        "correct_steps": cfg.correct_steps,
        **({"distill_teacher": cfg.distill_teacher} if cfg.distill_teacher else {}),  # older studies: none
        "seed": cfg.seed,
        "distill": {k: v for k, v in resolve(cfg, teacher_arch).short_distill(cfg).to_dict().items()
                    if k not in NOT_IDENTITY},
        "search": search_identity(cfg.search)
        # older studies (restart, the only schedule then) record none: only another schedule is a change
        | ({"rung_schedule": cfg.search.rung_schedule} if cfg.search.rung_schedule != "restart" else {}),
    }


def search_identity(search: SearchConfig) -> dict[str, Any]:
    """The search settings of a study's identity, under the keys stored identities have."""
    return {STORED_AS.get(k, k): getattr(search, k) for k in SEARCH_IDENTITY}


def check_study(cfg: RunConfig, restart: bool = False, teacher_config: Any = None) -> dict[str, Any]:
    """The study's identity, after refusing to continue a stored study made with other settings (its old
    trials would be mixed with new ones; a study of an older record version is upgraded first,
    `nas.search.record.upgrade`). `restart`: delete the stored study and its outputs first."""
    identity = study_identity(cfg, teacher_config)
    url = cfg.storage_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        if restart:
            cfg.paths.clear()  # outputs of a study whose database was deleted by hand
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
        require_same_study(recorded, identity, f"study {cfg.name!r} in {cfg.storage_url}")
    return identity


def require_same_study(recorded: dict[str, Any], identity: dict[str, Any], what: str) -> None:
    """Refuse to continue `what` when its `recorded` identity is not `identity`; an older study's identity
    is first read as this nas computes it (its horizon in tokens: `nas.settings.legacy`)."""
    require_same(identity_in_tokens(recorded), identity, what, STUDY_WAYS_OUT)


def clear_study(cfg: RunConfig, storage: optuna.storages.BaseStorage) -> None:
    """`--restart`: delete the stored study and its outputs under out_dir (`StudyPaths.outputs`)."""
    log.info("restart: deleting study %s and its outputs under %s", cfg.name, cfg.root)
    with storage_errors(cfg.storage_url):
        if cfg.name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            optuna.delete_study(study_name=cfg.name, storage=storage)
    cfg.paths.clear()
