"""The data of a study's report as plain DataFrames and dicts (no plotting here; see `nas.report`).

Everything is read from the Optuna study (trials, states, intermediate values, and what the study and
each trial record: `nas.search.study.StudyRecord` / `TrialRecord`) and from the importance file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from nas.errors import NasError
from nas.model.arch import KNOBS, Arch
from nas.search.study import StudyRecord, TrialRecord, kendall_tau, load_existing_study, ranking_stability

log = logging.getLogger(__name__)

# name -> (trials column, axis title, lower is better); val loss is always minimised on the other axis
OBJECTIVES = {
    "params": ("params", "parameters", True),
    "kv_cache": ("kv_cache_bytes_per_token", "KV-cache bytes per token (bf16)", True),
    "latency": ("latency_tokens_per_s", "throughput, tokens/s (higher is better)", False),
}
LEAD_COLUMNS = ["number", "state", "value", "budget", "screen_rank", "screen_loss", "label", "params",
                "kv_cache_bytes_per_token", "latency_tokens_per_s", "tokens", "last_step", "candidate", *KNOBS,
                "kd_tokens_per_s", "kd_mfu", "duration_s"]  # fmt: skip
SCREEN_COLUMNS = ["budget", "rank", "loss", "label", "params", "kv_cache_bytes_per_token", "memory_bytes",
                  "tokens_per_s", "rejected", "trial", "state", "kd_loss"]  # fmt: skip


@dataclass
class ReportData:
    """Everything the HTML report shows, computed before any rendering."""

    study_name: str
    trials: pd.DataFrame  # one row per trial: LEAD_COLUMNS, user attrs flattened, pareto_<objective> flags
    curves: pd.DataFrame  # long format: trial, step, val_loss, val_kl, state, label
    stability: pd.DataFrame  # trial, label, half_loss, full_loss, half_rank, full_rank
    stability_facts: dict[str, Any]  # k, kendall_tau, half_step, full_step, winner_stable, source
    header: dict[str, Any]  # teacher, budget, data, tokens_spent, trial counts, winner facts
    reproducibility: dict[str, Any]  # config, seed, versions, data fingerprint, ...
    winner_curve: pd.DataFrame  # step, val_loss, val_kl of the winner's full distillation (may be empty)
    screen: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SCREEN_COLUMNS))
    screen_facts: dict[str, Any] = field(default_factory=dict)  # budget -> screened, rejected, trained, tau
    importance_heads: pd.DataFrame | None = None  # [layer x head] head scores
    importance_layers: pd.DataFrame | None = None  # layer, block_importance, drop_one_loss
    importance_base_loss: float | None = None
    notes: dict[str, str] = field(default_factory=dict)  # section id -> why it is empty or partial
    horizon: pd.DataFrame = field(default_factory=pd.DataFrame)  # budget, trial, label, tokens, loss, rank
    horizon_facts: dict[str, Any] = field(default_factory=dict)  # budget -> stop, tokens, pick, within noise


load_study = load_existing_study  # the report opens studies the same way workers do


def pareto_mask(df: pd.DataFrame, x: str, y: str = "value", x_lower_is_better: bool = True) -> pd.Series:
    """True for the non-dominated rows (minimise `y`; minimise `x`, or maximise it when
    `x_lower_is_better` is False). Rows with a missing or infinite x or y are never on the front;
    identical points are all on it (neither dominates the other)."""
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    xs = xs if x_lower_is_better else -xs
    valid = np.isfinite(xs) & np.isfinite(ys)
    mask = np.zeros(len(df), dtype=bool)
    idx = np.flatnonzero(valid)
    order = idx[np.lexsort((ys[idx], xs[idx]))]  # by x, then y
    best_before = math.inf  # lowest y among points with a strictly better x
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and xs[order[j]] == xs[order[i]]:
            j += 1
        group = order[i:j]
        group_min = ys[group].min()
        if group_min < best_before:
            mask[group[ys[group] == group_min]] = True
            best_before = group_min
        i = j
    return pd.Series(mask, index=df.index, name=f"pareto_{x}")


def report_frames(study: optuna.Study, importance: Any = None) -> ReportData:
    """All of the report's data from `study`; `importance` (an `nas.prune.importance.Importance`) defaults to
    the file named by the study's `importance_path` (omitted with a note when missing)."""
    record = StudyRecord.read(study)
    all_trials = study.get_trials(deepcopy=False)
    trials = trials_frame(all_trials, record.tokens_per_step)
    add_rerank(trials, record.rerank or {})
    for name, (column, _, lower) in OBJECTIVES.items():
        trials[f"pareto_{name}"] = False
        eligible = trials[front_eligible(trials) & trials[column].notna()]
        trials.loc[eligible.index, f"pareto_{name}"] = pareto_mask(eligible, column, "value", lower)
    screen, screen_facts = screen_frames(record.screen or [], trials)
    notes: dict[str, str] = {}
    if screen.empty:
        notes["screen"] = "This study has no screen (it was searched exhaustively or with TPE)."
    if not front_eligible(trials).any():
        notes["pareto"] = "No completed trial yet: there is no front to draw."
    stability, facts = stability_frames(study, record, trials)
    if max((f["k"] for f in facts["budgets"].values()), default=0) < 2:
        notes["stability"] = "Ranking stability needs at least two completed trials with a half-horizon loss."
    data = ReportData(
        study_name=study.study_name,
        trials=trials,
        curves=curves_frame(all_trials),
        stability=stability,
        stability_facts=facts,
        header=header_facts(study.study_name, record, trials),
        reproducibility=reproducibility(study, record),
        winner_curve=pd.DataFrame(
            (record.winner or {}).get("curve") or [], columns=["step", "val_loss", "val_kl"]
        ),
        screen=screen,
        screen_facts=screen_facts,
        notes=notes,
        horizon=horizon_frame(record.horizon or {}),
        horizon_facts=horizon_facts(record.horizon or {}),
    )
    if data.horizon.empty:
        notes["horizon"] = "This study has no adaptive horizon (search.adaptive off, TPE, or not searched yet)."
    add_importance(data, importance, record.importance_path)
    if not record.winners:
        notes["winner"] = "The winner has not been fully distilled yet (no 'winner' attribute in the study)."
    return data


def horizon_frame(horizon: dict[str, dict]) -> pd.DataFrame:
    """The adaptive horizon's rank trajectories: one row per budget, rung and trial (rank 1 = best)."""
    rows = []
    for budget, record in horizon.items():
        for rung in record.get("rungs", []):
            for position, number in enumerate(rung["order"]):
                key = str(number)
                rows.append({"budget": budget, "trial": int(number), "label": record.get("labels", {}).get(key, key),
                             "tokens": rung["tokens"], "loss": rung["losses"][key],
                             "predicted": rung.get("predicted", {}).get(key), "rank": position + 1})  # fmt: skip
    return pd.DataFrame(rows, columns=["budget", "trial", "label", "tokens", "loss", "predicted", "rank"])


def horizon_facts(horizon: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per budget: why the horizon stopped, where, the tau and noise of its last rung, the pick."""
    facts = {}
    for budget, record in horizon.items():
        if not record.get("rungs"):
            continue
        last = record["rungs"][-1]
        facts[budget] = {"stop": record.get("stop"), "tokens": last["tokens"], "rungs": len(record["rungs"]),
                         "first_tokens": record["rungs"][0]["tokens"], "tau": last["tau"],
                         "crossing_tau": last.get("crossing_tau"), "margin": last["margin"],
                         "noise": last["noise"], "within_noise": last["within_noise"], "pick": record.get("pick"),
                         "extra_tokens": record.get("tokens")}  # fmt: skip
    return facts


def add_rerank(trials: pd.DataFrame, rerank: dict[str, dict[str, float]]) -> None:
    """One "rerank.<task>" column per re-rank task (accuracy; blank for trials not scored): the study stores
    the scores by trial number, as a finished trial's own attributes cannot change."""
    tasks = sorted({task for scores in rerank.values() for task in scores})
    for task in tasks:
        trials[f"rerank.{task}"] = [rerank.get(str(n), {}).get(task) for n in trials["number"]]


def screen_frames(screened: list[dict], trials: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The stored screen, one row a candidate, joined to the trial that trained it (if any), and per
    budget: how many were screened, rejected by a constraint and trained, and the Kendall tau between
    the screen loss and the short-KD loss of the completed ones."""
    rows = [{k: v for k, v in s.items() if k != "arch"} | {"key": s.get("label")} for s in screened]
    frame = pd.DataFrame(
        rows, columns=[c for c in SCREEN_COLUMNS if c not in ("trial", "state", "kd_loss")] + ["key"]
    )
    # by label (unique per architecture); a failed attempt never hides the trial that ran the candidate
    records = sorted(trials.to_dict("records"), key=lambda r: r["state"] != "FAIL")
    keyed = {r["label"]: r for r in records if isinstance(r.get("label"), str)}
    for column, source in (("trial", "number"), ("state", "state"), ("kd_loss", "value")):
        frame[column] = [keyed.get(k, {}).get(source) for k in frame["key"]]
    facts: dict[str, Any] = {}
    for budget, group in frame.groupby("budget", sort=False):
        done = group[(group["state"] == "COMPLETE") & group["loss"].notna()]
        tau = kendall_tau(list(done["loss"]), list(done["kd_loss"])) if len(done) >= 2 else None
        facts[str(budget)] = {"screened": len(group), "rejected": int((group["rejected"].fillna("") != "").sum()),
                              "trained": int(group["trial"].notna().sum()), "completed": len(done), "kendall_tau": tau}  # fmt: skip
    return frame.drop(columns="key"), facts


def front_eligible(trials: pd.DataFrame) -> pd.Series:
    """Completed, feasible trials with a finite value: the only ones a Pareto front may contain."""
    finite = pd.to_numeric(trials["value"], errors="coerce").apply(lambda v: math.isfinite(v))
    infeasible = trials["infeasible"].fillna(False).astype(bool) if "infeasible" in trials else False
    return (trials["state"] == "COMPLETE") & finite & ~infeasible


def trials_frame(trials: list[FrozenTrial], tokens_per_step: int | None = None) -> pd.DataFrame:
    """One row per trial: the lead columns, then every other user attribute flattened (dicts as a.b)."""
    rows = [trial_row(t, tokens_per_step) for t in trials]
    frame = pd.DataFrame(rows)
    for column in LEAD_COLUMNS:
        if column not in frame:
            frame[column] = pd.Series([None] * len(frame), dtype=object)
    rest = sorted(c for c in frame.columns if c not in LEAD_COLUMNS)
    return frame[LEAD_COLUMNS + rest].reset_index(drop=True)


def trial_row(t: FrozenTrial, tokens_per_step: int | None) -> dict[str, Any]:
    row: dict[str, Any] = {"number": t.number, "state": t.state.name}
    steps = sorted(t.intermediate_values)
    row["last_step"] = steps[-1] if steps else None
    # a pruned trial's value is its last reported loss; a running one's is its latest so far
    row["value"] = t.value if t.value is not None else (t.intermediate_values[steps[-1]] if steps else None)
    arch = TrialRecord.read(t).arch or {}
    knobs = Arch.from_dict(arch).knobs if arch else KNOBS  # experts, per-type layer counts: knobs of some students
    for knob in knobs:
        row[knob] = t.params.get(knob, arch.get(knob))
    if t.datetime_start and t.datetime_complete:
        row["duration_s"] = (t.datetime_complete - t.datetime_start).total_seconds()
    for key, value in t.user_attrs.items():
        if isinstance(value, dict):
            row.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, dict | list)})
        elif not isinstance(value, list):
            row[key] = value
    if row.get("tokens") is None and tokens_per_step and row["last_step"] is not None:
        row["tokens"] = row["last_step"] * tokens_per_step
    return row


def curves_frame(trials: list[FrozenTrial]) -> pd.DataFrame:
    """Every trial's validation curve (its intermediate values, else its "curve" attribute), long format."""
    rows = []
    for t in trials:
        record = TrialRecord.read(t)
        kl = {p["step"]: p.get("val_kl") for p in record.curve or []}
        points = t.intermediate_values or {p["step"]: p["val_loss"] for p in record.curve or []}
        label = record.label or f"trial {t.number}"
        for step in sorted(points):
            rows.append((t.number, step, points[step], kl.get(step), t.state.name, label))
    return pd.DataFrame(rows, columns=["trial", "step", "val_loss", "val_kl", "state", "label"])


def stability_frames(
    study: optuna.Study, record: StudyRecord, trials: pd.DataFrame
) -> tuple[pd.DataFrame, dict]:
    """Half- vs full-horizon ranks (within each budget): from the "stability" attribute written after
    the search, else computed now from the completed trials (a partial study), marked as provisional."""
    recorded = {b: stab for b, stab in (record.stability or {}).items() if stab.get("trials")}
    source = "recorded after the search"
    if not recorded:
        top_k = int((record.config or {}).get("search", {}).get("top_k", 10))
        done = trials[front_eligible(trials)]
        last = pd.to_numeric(done["last_step"], errors="coerce").max() if len(done) else math.nan
        horizon = record.short_run_steps or (int(last) if math.isfinite(last) else 0)
        budgets = sorted({str(b) for b in done.get("budget", pd.Series(dtype=object)).dropna()}) or [None]
        recorded = {
            b or "": ranking_stability(study, top_k, horizon, b) if len(done) else {"k": 0} for b in budgets
        }
        source = "computed from the trials finished so far (provisional)"
    frames, per_budget = [], {}
    for budget, stab in recorded.items():
        frame = pd.DataFrame({"trial": stab.get("trials", []), "half_loss": stab.get("half_losses", []),
                              "full_loss": stab.get("full_losses", [])})  # fmt: skip
        frame["budget"] = budget
        frame["half_rank"] = frame["half_loss"].rank(method="min")
        frame["full_rank"] = frame["full_loss"].rank(method="min")
        frames.append(frame)
        keys = ("kendall_tau", "half_step", "full_step", "winner_stable")
        per_budget[budget] = {key: stab.get(key) for key in keys} | {"k": len(frame)}
    frame = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["trial", "half_loss", "full_loss", "budget", "half_rank", "full_rank"])
    )
    labels = trials.set_index("number")["label"]
    frame["label"] = [labels.get(n) for n in frame["trial"]]
    first = next((f for f in per_budget.values() if f["k"] >= 2), next(iter(per_budget.values()), {}))
    facts = {**first, "k": len(frame), "source": source, "budgets": per_budget}
    return frame, facts


def header_facts(study_name: str, record: StudyRecord, trials: pd.DataFrame) -> dict[str, Any]:
    """Teacher, budget, data, tokens spent, trial counts, and the winner's loss vs the teacher's."""
    winner = record.winner or {}  # the first distilled
    tokens_by_trial = pd.to_numeric(trials.set_index("number")["tokens"], errors="coerce").fillna(0)
    # the pipeline's winner "tokens" counts its short run too (already in its trial's tokens)
    finals = {w.get("trial"): w for w in (record.winners or {}).values()}
    final_tokens = sum(
        max(0, int(w.get("tokens", 0)) - int(tokens_by_trial.get(n, 0))) for n, w in finals.items()
    )
    facts = {
        "study": study_name,
        "teacher": record.teacher,
        "teacher_params": record.teacher_params,
        "teacher_val_loss": record.teacher_val_loss,
        "budget": record.budget,
        "budgets": record.budgets or {},
        "data": record.data,
        "trial_counts": trials["state"].value_counts().to_dict(),
        "tokens_spent": int(tokens_by_trial.sum()) + final_tokens,
        "winner": winner_facts(winner, trials),
        # a study of several budgets names each budget's winner; a one-budget study has the one
        "winners": {b: winner_facts(w, trials) for b, w in (record.winners or {}).items()}
        if len(record.budgets or {}) > 1
        else {},
    }
    teacher_loss, loss = facts["teacher_val_loss"], facts["winner"].get("loss")
    if teacher_loss is not None and loss is not None:
        facts["winner"]["loss_vs_teacher"] = loss - teacher_loss
    return facts


def winner_facts(winner: dict, trials: pd.DataFrame) -> dict[str, Any]:
    """The fully distilled winner if there is one, else the best completed trial so far."""
    if winner:
        label = next(iter(trials.loc[trials["number"] == winner.get("trial"), "label"]), None)
        loss = winner.get("final_val_loss", winner.get("val_loss"))
        return {"trial": winner.get("trial"), "label": label, "params": winner.get("params"), "loss": loss,
                "short_run_loss": winner.get("val_loss"), "dir": winner.get("dir"), "source": "full distillation",
                "kd_tokens_per_s": winner.get("tokens_per_s"), "kd_mfu": winner.get("mfu"),
                "write_seconds": (winner.get("speed") or {}).get("write_seconds"),
                "kernel_paths": winner.get("kernel_paths") or {}}  # fmt: skip
    done = trials[front_eligible(trials)]
    if done.empty:
        return {}
    best = done.loc[pd.to_numeric(done["value"]).idxmin()]
    return {"trial": int(best["number"]), "label": best["label"], "params": best["params"], "loss": float(best["value"]),
            "short_run_loss": float(best["value"]), "source": "best short run so far (not yet fully distilled)"}  # fmt: skip


def reproducibility(study: optuna.Study, record: StudyRecord) -> dict[str, Any]:
    """What is needed to re-run the study: its config, seeds, package versions, data fingerprint."""
    return {
        "study": study.study_name,
        "teacher": record.teacher,
        "seed": record.seed,
        "data": record.data,
        "data_fingerprint": record.data_fingerprint,
        "chat_templates": record.chat_templates,
        "importance_path": record.importance_path,
        **record.horizon_summary(),
        "final_tokens": record.final_tokens,
        "tokens_per_step": record.tokens_per_step,
        "sampler": record.sampler or type(study.sampler).__name__,
        "versions": record.versions or {},
        "config": record.config or {},
    }


def add_importance(data: ReportData, importance: Any, path: str | None) -> None:
    """Fill the importance frames from `importance`, else from the file at `path`; a note when neither."""
    if importance is None:
        if not path:
            data.notes["importance"] = "The study names no importance file (no 'importance_path' attribute)."
            return
        if not Path(path).is_file():
            data.notes["importance"] = (
                f"The importance file {path} is missing (computed on another machine?)."
            )
            return
        from nas.prune.importance import Importance

        try:
            importance = Importance.load(path)
        except NasError as e:
            data.notes["importance"] = str(e)
            return
    heads = importance.heads.float().cpu().numpy()
    data.importance_heads = pd.DataFrame(heads, index=pd.RangeIndex(len(heads), name="layer"))
    data.importance_heads.columns.name = "head"
    data.importance_layers = pd.DataFrame(
        {
            "layer": range(len(heads)),
            "block_importance": importance.layer_bi.float().cpu().numpy(),
            "drop_one_loss": importance.layer_loss.float().cpu().numpy(),
        }
    )
    data.importance_base_loss = float(importance.base_loss)
