"""The adaptive horizon: after the trials, each budget's finalists keep distilling in rungs until the order of
the best ones holds between consecutive rungs, or a token cap is spent (Minitron §4.3: rankings "undergo
significant changes up to ~300 steps, and then stabilize"; our own ground truth needed 8x the horizon).

Rung 0 is the horizon itself (compared with the trials' losses at half the horizon). Rung r continues each
remaining finalist from its rung r-1 model for as many tokens as it has had (so rung r ends at 2^r
horizons), on the batches after the ones it saw (`DistillConfig.data_offset`): with `search.rung_schedule`
"restart", a fresh warmup-free schedule of the distill settings from its weights (as the winner's final
distillation then also starts afresh); with "wsd", its stable phase resumed with its optimizer state and
read after a decay branch (`nas.search.wsd`), one schedule from the trial to the final distillation.
After every rung the per-sequence validation losses give the noise of the top-1 margin (a paired
bootstrap), and `nas.search.ranking` decides: stable, cap, or one candidate left. Stable needs two
agreements (`search.predict_crossings`): the order of the best with the rung before, and with the order
that each finalist's power law in tokens predicts at the final distillation's tokens, since a ranking can
hold between two short rungs and still flip later (slow, steady crossings: Minitron §4.2's flip "around
200 steps"); and it needs a rung past the horizon (`search.min_horizon_factor`), since the trials' own
half vs full horizon cannot see a ranking still moving at a longer scale. Only the best
`stable_top` go on to the next rung. A budget whose whole space is no larger than the funnel's shortlist
(`nas.search.funnel.whole_space`) has every candidate at the horizon, and rung 0 judges them all (the record's
`small_space`; studies before this stored the stop "small space" there, with no rungs after it). The record (one per budget, written to the study after every rung,
so a killed search resumes at its last rung) holds each rung's tokens, losses, predicted final losses,
Kendall tau, margin and noise, why it stopped, and the pick with its model directory.

Runs in the process that created the study, after every trial finished (workers only run trials).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from nas.evaluate.loss import sequence_losses
from nas.model.load import load_model
from nas.search import ranking
from nas.search.funnel import whole_space
from nas.search.record import StudyRecord, TrialRecord
from nas.search.study import _nearest_step
from nas.search.wsd import distill_and_read, stable_state
from nas.train.loop import distill, trial_write_dtype
from nas.train.teacher_cache import teacher_source

if TYPE_CHECKING:
    from nas.search.search_context import SearchContext
    from nas.settings import RunConfig

log = logging.getLogger(__name__)


class AdaptiveHorizon:
    """A strategy's after-the-trials step (`nas.search.strategy.Strategy.horizon`): `extend` runs (or
    resumes) the rungs of one budget and returns its record."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def extend(self, ctx: SearchContext, study: optuna.Study, budget: str | None) -> dict[str, Any]:
        return extend_horizon(ctx, study, budget)


def finalists(study: optuna.Study, budget: str | None, count: int) -> list[optuna.trial.FrozenTrial]:
    """The best `count` completed trials of `budget` with a kept short-run model, best first."""
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if budget in (None, TrialRecord.read(t).budget)
        and (Path(TrialRecord.read(t).checkpoint or "") / "config.json").is_file()
    ]
    return sorted(done, key=lambda t: t.value)[:count]


def curve_points(trial: optuna.trial.FrozenTrial, tokens_per_step: int) -> list[tuple[int, float]]:
    """The trial's validation curve as (tokens, loss)."""
    return [(int(s) * tokens_per_step, float(v)) for s, v in sorted(trial.intermediate_values.items())]


def first_rung(ctx: SearchContext, trials: list, record: dict) -> dict:
    """Rung 0, the horizon: the trials' own losses there, tau against half the horizon, and the noise."""
    cfg, h = ctx.cfg, ctx.horizon
    half = _nearest_step(trials, h.steps // 2)
    previous = {t.number: t.intermediate_values[half] for t in trials if half in t.intermediate_values}
    if cfg.search.rung_schedule == "wsd":  # the reads alone: the stable phase's losses lie above every read
        record["curves"] = {str(t.number): [(h.tokens, float(t.value))] for t in trials}
    else:
        record["curves"] = {str(t.number): curve_points(t, h.tokens_per_step) for t in trials}
    record["dirs"] = {str(t.number): TrialRecord.read(t).checkpoint for t in trials}
    record["labels"] = {str(t.number): TrialRecord.read(t).label for t in trials}
    return judge(ctx, {t.number: float(t.value) for t in trials}, previous, h.tokens, record)


def judge(ctx: SearchContext, losses: dict[int, float], previous: dict, tokens: int, record: dict) -> dict:
    """One rung's row: its losses (and the extrapolated ones), the top-1 margin and its noise, the tau
    against the previous rung, and the stop reason (None: extend)."""
    s, cfg = ctx.cfg.search, ctx.cfg
    predicted = {
        n: ranking.predict(ranking.fit_curve(*zip(*record["curves"][str(n)], strict=True)), cfg.final_tokens, v)
        for n, v in losses.items()
    }
    rank_by = predicted if s.extrapolate else losses
    order = sorted(rank_by, key=rank_by.get)
    noise = 0.0
    if len(order) >= 2:
        val = ctx.data.val(cfg.distill.eval_sequences)
        device = next(ctx.teacher.parameters()).device
        per_seq = [sequence_losses(load_model(record["dirs"][str(n)], device=device, kernels=cfg.kernels), val,
                                   cfg.distill.eval_batch_size) for n in order[:2]]  # fmt: skip
        noise = ranking.margin_noise(per_seq[0], per_seq[1], s.bootstrap_samples, cfg.seed)
    tau = ranking.top_tau(previous, rank_by, s.stable_top, noise)
    # will the curves cross before the final distillation? the pairs their power laws tell apart at the final
    # tokens, against the order now
    ahead = ranking.top_tau(losses, predicted, s.stable_top, noise)
    held = ranking.weakest(tau, ahead if s.predict_crossings else None)
    # the cap, and the floor: a rung past the horizon first (the trials' own rungs alone cannot see a ranking
    # moving at longer scales)
    stop = ranking.stop_reason(len(order), held, s.stable_tau, tokens, tokens, ctx.horizon.cap, ctx.horizon.floor)
    margin = rank_by[order[1]] - rank_by[order[0]] if len(order) >= 2 else None
    return {"tokens": tokens, "losses": {str(n): v for n, v in losses.items()},
            "predicted": {str(n): v for n, v in predicted.items()}, "order": order, "tau": tau, "crossing_tau": ahead,
            "margin": margin, "noise": noise, "within_noise": ranking.within_noise(rank_by, noise),
            "stop": stop}  # fmt: skip


def continued(ctx: SearchContext, done_steps: int):
    """The KD settings of the rung after `done_steps`: as many steps again, on the batches after them, a
    fresh schedule without warmup (the student is already trained; wsd: the stable phase goes on at
    constant LR with its optimizer state, `continue_rung`)."""
    return ctx.horizon.short_distill(ctx.cfg).replace(steps=done_steps, data_offset=done_steps, warmup_steps=0,
                                       eval_every=0, checkpoint_every=0)  # fmt: skip


def continue_rung(ctx: SearchContext, start: Path, run, out: Path) -> tuple[float, int]:
    """One finalist's next rung from its model `start` into `out` (`search.rung_schedule`): a fresh
    schedule from those weights, or (wsd) its stable phase resumed with its optimizer state and read by a
    decay branch. Returns (the loss it is ranked by, the tokens of the read beyond the rung's own)."""
    student = load_model(start, device=next(ctx.teacher.parameters()).device, kernels=ctx.cfg.kernels)
    if ctx.cfg.search.rung_schedule == "wsd" and (state := stable_state(start)) is not None:
        _, read = distill_and_read(ctx, student, run.replace(schedule="constant"), out, start=state)
        return read.val_loss, read.tokens
    result = distill(teacher_source(ctx.distill_from, ctx.teacher_cache, run, ctx.data), student, ctx.data,
                     run, out, fresh_on_change=True, write_dtype=trial_write_dtype(run))  # fmt: skip
    return result.val_loss, 0


def next_rung(ctx: SearchContext, record: dict, budget_label: str) -> dict:
    """Distill the best `stable_top` of the last rung for as many tokens again, and judge the new rung."""
    cfg, last = ctx.cfg, record["rungs"][-1]
    run = continued(ctx, last["tokens"] // ctx.horizon.tokens_per_step)
    losses = {}
    for n in last["order"][: cfg.search.stable_top]:
        start = Path(record["dirs"][str(n)])
        out = cfg.root / "horizon" / budget_label / f"trial-{n}-{2 * last['tokens']}"
        loss, read_tokens = continue_rung(ctx, start, run, out)
        record["read_tokens"] = record.get("read_tokens", 0) + read_tokens
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if start.parent.parent == cfg.root / "horizon" / budget_label:  # an earlier rung's model: superseded
            shutil.rmtree(start.parent, ignore_errors=True)
        record["dirs"][str(n)] = str(out / "model")
        record["curves"][str(n)].append((2 * last["tokens"], loss))
        losses[n] = loss
    previous = {n: last["losses"][str(n)] for n in losses}
    return judge(ctx, losses, previous, 2 * last["tokens"], record)


def extend_horizon(ctx: SearchContext, study: optuna.Study, budget: str | None) -> dict[str, Any]:
    """Run (or resume) the adaptive horizon of `budget` and return its record (also written to the
    study's `horizon` attribute, keyed by budget)."""
    label = budget or ctx.cfg.budgets[0]
    records = dict(StudyRecord.read(study).horizon or {})
    record = records.get(label) or {"rungs": []}
    if not record["rungs"]:
        s = ctx.cfg.search
        small = whole_space(list(ctx.screen.values()), budget, s.screen_top) if s.small_space else None
        trials = finalists(study, budget, small or max(s.finalists, s.stable_top))
        if not trials:
            return record
        record["rungs"].append(first_rung(ctx, trials, record))
        if small and len(trials) > 1:  # the funnel would distill every candidate anyway: brute force is cheaper
            record["small_space"] = small
            log.info("budget %s: its space has %d candidates, no more than the funnel's shortlist (screen_top %d): "
                     "every candidate ran to the horizon with no halving; the adaptive horizon goes on from all of "
                     "them", label, small, ctx.cfg.search.screen_top)  # fmt: skip
    while (reason := record["rungs"][-1]["stop"]) is None:
        last = record["rungs"][-1]
        held = ranking.holds(ranking.weakest(last["tau"], last.get("crossing_tau")), ctx.cfg.search.stable_tau)
        log.info("budget %s: %s at %s tokens (Kendall tau with the rung before %s, with the order their fitted "
                 "curves predict at the final tokens %s); extending the horizon to %s", label,
                 "the order held but only over the trials' own rungs" if held else "the best are still reordering",
                 f"{last['tokens']:,}", _fmt(last["tau"]), _fmt(last.get("crossing_tau")),
                 f"{2 * last['tokens']:,}")  # fmt: skip
        record["rungs"].append(next_rung(ctx, record, label))
        _write(study, records, label, record)
    last = record["rungs"][-1]
    pick = last["order"][0]
    record |= {"stop": reason, "pick": pick, "checkpoint": record["dirs"][str(pick)], "tokens": _spent(record)}
    _write(study, records, label, record)
    log.info("budget %s: horizon stopped at %s tokens (%s); pick trial %d%s", label, f"{last['tokens']:,}", reason,
             pick, "; the top two are within the validation noise" if last["within_noise"] else "")  # fmt: skip
    return record


def _fmt(tau: float | None) -> str:
    return "undefined (within noise)" if tau is None else f"{tau:.2f}"


def _spent(record: dict) -> int:
    """KD tokens the extension rungs spent (beyond the trials' own), their decay branches too (wsd)."""
    rungs = record["rungs"]
    pairs = zip(rungs, rungs[1:], strict=False)
    return sum(len(r["losses"]) * (r["tokens"] - prev["tokens"]) for prev, r in pairs) + record.get("read_tokens", 0)


def _write(study: optuna.Study, records: dict, label: str, record: dict) -> None:
    records[label] = record
    StudyRecord(horizon=records).write(study)
