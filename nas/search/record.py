"""What a study and each of its trials record (their Optuna user attributes), and the one upgrade
from older record formats.

`StudyRecord` is keyed by budget everywhere (`budgets`, `stability`, `winners`: budget as written ->
its value) and carries `record_version`. Studies written before versions were recorded (version 1)
kept each of those twice, once for the first budget (`budget`, `stability`, `winner`) and once by
budget (`budgets`, `stability_by_budget`, `winners`), and recorded `search.max_exhaustive`;
`upgrade(attrs)` reads any of them as the current version, and the first write to such a study
stores the upgraded record, so an old study resumes as a current one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from nas.errors import ConfigError
from nas.model.arch import Arch

RECORD_VERSION = 2  # 2: keyed by budget only, no search.max_exhaustive; 1: before versions were recorded
V1_ONLY = ("budget", "stability_by_budget", "winner")  # version 1's duplicates, dropped by `upgrade`


class _Record:
    """Read and write a dataclass as Optuna user attributes, one attribute per field (None: not written)."""

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]):
        return cls(**{f.name: attrs[f.name] for f in dataclasses.fields(cls) if f.name in attrs})

    def attrs(self) -> dict[str, Any]:
        """The fields that are not None, as user attributes."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


@dataclass
class StudyRecord(_Record):
    """What a study records (its user attributes): written once by `nas search`/`nas run` so that workers and
    the report need only the storage and the study name; `stability` after the search, `winners` after
    the full distillation. A field is None when the study has not recorded it (yet)."""

    record_version: int = RECORD_VERSION
    config: dict[str, Any] | None = None  # the RunConfig as a dict (what every worker runs)
    teacher: str | None = None
    teacher_arch: dict[str, int] | None = None
    teacher_params: int | None = None
    teacher_val_loss: float | None = None
    budgets: dict[str, int] | None = None  # budget as written -> parameters (a funnel each)
    budget_kind: str | None = None  # total or active (mixture of experts: parameters one token uses)
    importance_path: str | None = None  # absolute; shared by every worker
    data_fingerprint: str | None = None
    data: str | None = None  # the data sources, comma-separated
    chat_templates: dict[str, str] | None = None  # chat source path -> its template's name and hash
    versions: dict[str, str] | None = None  # package -> version
    seed: int | None = None
    horizon_steps: int | None = None
    horizon_tokens: int | None = None  # KD tokens of one candidate's short run (the first rung)
    final_tokens: int | None = None  # KD tokens of the winner's full distillation
    tokens_per_step: int | None = None
    candidates: list[list[int]] | None = None  # arch keys (`Arch.knobs` order) in priority order
    sampler: str | None = None  # the search strategy in words (`nas.search.strategy`)
    strategy: dict[str, Any] | None = None  # what the strategy records (`Strategy.record`)
    pruner: str | None = None
    identity: dict[str, Any] | None = None  # the settings that decide its trials (`nas.pipeline.identity`)
    plan: list[dict[str, Any]] | dict[str, Any] | None = (
        None  # the memory plan (`nas plan`) checked before it
    )
    screen: list[dict[str, Any]] | None = None  # every candidate's screen (`nas.search.funnel.Screened`)
    stability: dict[str, dict[str, Any]] | None = None  # budget -> `ranking_stability` of the search
    winners: dict[str, dict[str, Any]] | None = (
        None  # budget -> winner: trial, arch, params, losses, dir, ...
    )
    rerank: dict[str, dict[str, float]] | None = None  # trial number -> {task: accuracy}
    horizon: dict[str, dict[str, Any]] | None = None  # budget -> the adaptive horizon (`nas.search.horizon`)

    @property
    def winner(self) -> dict[str, Any] | None:
        """The first winner distilled (`nas run`: of the first of `final_budgets`)."""
        return next(iter((self.winners or {}).values()), None)

    @property
    def short_run_steps(self) -> int | None:
        """The steps of one candidate's short run, as recorded (None: not recorded)."""
        return self.horizon_steps

    def horizon_summary(self) -> dict[str, int | None]:
        """The recorded horizon (steps, tokens, tokens a step) under the record's names; the tokens from
        the steps where a study recorded none."""
        tokens = self.horizon_tokens or (self.horizon_steps or 0) * (self.tokens_per_step or 0) or None
        return {"horizon_steps": self.horizon_steps, "horizon_tokens": tokens}

    @property
    def budget(self) -> int | None:
        """The first budget's parameters."""
        return next(iter((self.budgets or {}).values()), None)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StudyRecord:
        return super().from_attrs(upgrade(attrs))

    @classmethod
    def read(cls, study: optuna.Study) -> StudyRecord:
        return cls.from_attrs(study.user_attrs)

    def write(self, study: optuna.Study) -> None:
        """Set the fields that are not None (others stay as they are); an older study is first stored
        in the current format."""
        attrs = study.user_attrs
        if attrs and attrs.get("record_version") != RECORD_VERSION:
            for key in V1_ONLY:
                study.set_user_attr(key, None)  # Optuna cannot delete an attribute; None reads as unset
            for key, value in StudyRecord.from_attrs(attrs).attrs().items():
                study.set_user_attr(key, value)
        for key, value in self.attrs().items():
            study.set_user_attr(key, value)


def upgrade(attrs: dict[str, Any]) -> dict[str, Any]:
    """A study's user attributes in the current format (`RECORD_VERSION`), from any older one."""
    version = attrs.get("record_version") or (1 if attrs else RECORD_VERSION)
    if version > RECORD_VERSION:
        raise ConfigError(
            f"the study was written by a newer nas (record version {version}, this one reads up to "
            f"{RECORD_VERSION}); upgrade nas"
        )
    if version == RECORD_VERSION:
        return attrs
    out = {k: v for k, v in attrs.items() if k not in V1_ONLY and v is not None}
    config = attrs.get("config") or {}
    budget = config.get("budget", "")
    first = str(budget[0] if isinstance(budget, list) else budget)  # RunConfig.budgets[0]
    if attrs.get("budget") is not None and not attrs.get("budgets"):
        out["budgets"] = {first: attrs["budget"]}
    out.pop("stability", None)  # version 1's: the first budget's alone
    if stability := attrs.get("stability_by_budget") or (
        {first: attrs["stability"]} if attrs.get("stability") else None
    ):
        out["stability"] = stability
    if (winner := attrs.get("winner")) and not attrs.get("winners"):
        out["winners"] = {winner.get("budget") or first: winner}
    for key in ("config", "identity"):  # search.max_exhaustive: unused since the funnel, removed in 2
        if isinstance(out.get(key), dict) and isinstance(out[key].get("search"), dict):
            search = {k: v for k, v in out[key]["search"].items() if k != "max_exhaustive"}
            out[key] = {**out[key], "search": search}
    return out | {"record_version": RECORD_VERSION}


@dataclass
class TrialRecord(_Record):
    """What each trial records (its user attributes). Enqueued candidates start with `arch`, `label` and
    `candidate`; the rest is written as the trial runs. None: not recorded (yet)."""

    arch: dict[str, int] | None = None  # the candidate (`Arch.to_dict`)
    label: str | None = None  # `Arch.describe`
    candidate: int | None = None  # index in the study's priority order
    params: int | None = None
    active_params: int | None = None  # mixture of experts: parameters one token uses
    kv_cache_bytes_per_token: int | None = None
    latency_tokens_per_s: float | None = None
    curve: list[dict[str, float]] | None = None  # [{step, val_loss, val_kl?}]
    tokens: int | None = None  # training tokens spent
    checkpoint: str | None = None  # the short run's model directory
    infeasible: bool | None = None  # a sampled shape outside the space: no training, not counted
    duplicate_of: int | None = None  # a sampled candidate another trial already evaluates (TPE only)
    budget: str | None = None  # the budget (as written) whose funnel the candidate is in
    screen_rank: int | None = None  # 0 = the best screen loss of its budget
    screen_loss: float | None = None  # LM loss right after pruning, no training
    kd_tokens_per_s: float | None = None  # steady-state KD speed, its train steps alone (`nas.train.speed`)
    kd_mfu: float | None = None  # model FLOPs utilisation of those steps (None: no datasheet peak, e.g. CPU)
    kd_speed: dict[str, Any] | None = None  # `Speed.record()`: train seconds, write seconds, FLOPs per token
    kernel_paths: dict[str, str] | None = None  # block type -> the kernels it ran (`nas.model.kernels`)

    @classmethod
    def read(cls, trial: FrozenTrial | optuna.Trial) -> TrialRecord:
        return cls.from_attrs(trial.user_attrs)

    def write(self, trial: optuna.Trial) -> None:
        """Set the fields that are not None (others stay as they are)."""
        for key, value in self.attrs().items():
            trial.set_user_attr(key, value)


def arch_key(arch: Arch | dict) -> tuple[int, ...]:
    """The candidate's knob values (`Arch.knobs` order): its identity in a study."""
    arch = arch if isinstance(arch, Arch) else Arch.from_dict(arch)
    return tuple(int(getattr(arch, k)) for k in arch.knobs)
