"""The adaptive horizon: its statistics (pure), and on a tiny teacher a study whose finalists are still
reordering extends its horizon and says so, and one whose top two are within noise says that."""

import logging
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch

from nas.evaluate.loss import lm_loss, sequence_losses
from nas.model.arch import Arch
from nas.model.load import load_model
from nas.pipeline import prepare_context
from nas.prune.cut import prune
from nas.search import ranking
from nas.search.horizon import continue_rung, continued, extend_horizon
from nas.search.horizon_plan import resolve, tokens_per_step
from nas.settings import run_config_from_dict
from nas.testing import tiny_study_config
from nas.train.loop import distill


def test_tau_counts_swaps_beyond_noise_only():
    previous = {1: 3.0, 2: 3.1, 3: 3.2}
    assert ranking.top_tau(previous, {1: 2.0, 2: 2.1, 3: 2.2}, 3) == pytest.approx(1.0)
    assert ranking.top_tau(previous, {1: 2.2, 2: 2.1, 3: 2.0}, 3) == pytest.approx(-1.0)
    swapped = {1: 2.101, 2: 2.1, 3: 2.5}  # 1 and 2 swap by 0.001
    assert ranking.top_tau(previous, swapped, 3) < 1
    assert ranking.top_tau(previous, swapped, 3, noise=0.01) == pytest.approx(1.0)  # a swap within noise
    assert ranking.top_tau(previous, {1: 2.0, 2: 2.001}, 3, noise=0.01) is None  # all tied: undefined
    # the benchmark's 30% finalists, observed at the horizon and predicted at 10x: all three are within the
    # noise now, but the fits tell the third from the second at the final tokens, and it passes it
    observed, predicted = {"a": 4.2134, "b": 4.2251, "c": 4.2398}, {"a": 4.1654, "b": 4.2214, "c": 4.1764}
    assert ranking.top_tau(predicted, observed, 3, noise=0.0127) is None  # no pair resolved now
    assert ranking.top_tau(observed, predicted, 3, noise=0.0127) == pytest.approx(0.0)  # one agrees, one swaps
    assert ranking.top_tau(observed, predicted, 3, noise=0.005) == pytest.approx(1 / 3)  # a, c resolved too


def test_stop_reasons():
    assert ranking.stop_reason(1, -1.0, 1.0, 10, 10, 100) == ranking.ONE_LEFT
    assert ranking.stop_reason(3, 1.0, 1.0, 10, 10, 100) == ranking.STABLE
    assert ranking.stop_reason(3, None, 1.0, 10, 10, 100) == ranking.STABLE  # everything within noise
    assert ranking.stop_reason(3, 0.3, 1.0, 10, 10, 100) is None  # reordering: extend
    assert ranking.stop_reason(3, 0.3, 1.0, 80, 80, 100) == ranking.CAP
    assert ranking.stop_reason(3, 1.0, 1.0, 10, 10, 100, floor=20) is None  # held, but not past the floor
    assert ranking.stop_reason(3, 1.0, 1.0, 20, 20, 100, floor=20) == ranking.STABLE
    assert ranking.stop_reason(3, 1.0, 1.0, 20, 20, 30, floor=30) == ranking.CAP  # the cap still binds


def test_bootstrap_noise_shrinks_with_sequences_and_pairing():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(4, 1, 400)  # the sequences' own difficulty, shared by both candidates
    a, b = difficulty + rng.normal(0, 0.05, 400), difficulty + 0.02 + rng.normal(0, 0.05, 400)
    paired = ranking.margin_noise(a, b, 500)
    assert 0.002 < paired < 0.01  # ~ 0.05 * sqrt(2) / sqrt(400) = 0.0035, not the 1 / 20 of the difficulty
    assert ranking.margin_noise(a[:40], b[:40], 500) > paired


def test_power_law_recovers_a_curve_and_predicts_far_out():
    tokens = np.array([1, 2, 4, 8, 16]) * 1000.0
    truth = 2.0 + 3.0 * (tokens / 16000) ** -0.4
    fit = ranking.fit_curve(tokens, truth)
    assert ranking.predict(fit, 160_000, 0.0) == pytest.approx(2.0 + 3.0 * 10**-0.4, rel=1e-3)
    assert ranking.fit_curve(tokens[:2], truth[:2]) is None
    assert ranking.predict(None, 1e9, 5.0) == 5.0


def test_sequence_losses_average_to_the_protocol_loss():
    from nas.testing import tiny_model

    model, val = tiny_model("llama"), torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(1))
    assert np.mean(sequence_losses(model, val, 2)) == pytest.approx(lm_loss(model, val), abs=1e-6)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("horizon")
    search = {"adaptive": True, "stable_top": 2, "max_horizon_factor": 2, "bootstrap_samples": 200}
    cfg = run_config_from_dict(tiny_study_config(root, search=search))
    return prepare_context(cfg)


def add_trial(study, ctx, number: int, model_dir, value: float, half: float, curve: dict | None = None) -> None:
    attrs = {"budget": ctx.cfg.budgets[0], "checkpoint": str(model_dir), "label": f"candidate {number}",
             "arch": ctx.candidates[0].to_dict()}  # fmt: skip
    study.add_trial(optuna.trial.create_trial(
        value=value, intermediate_values=curve or {2: half, 4: value}, user_attrs=attrs))  # fmt: skip


def saved(ctx, name: str, scale: float = 0.0):
    """The first candidate cut from the teacher (its weights perturbed by `scale`), saved; its val loss."""
    student = prune(ctx.teacher, ctx.candidates[0], ctx.importance)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn_like(p))
    out = ctx.cfg.root / name
    student.save_pretrained(out)
    return out, lm_loss(student, ctx.data.val(ctx.cfg.distill.eval_sequences))


def test_finalists_still_reordering_extend_the_horizon_and_say_so(ctx, caplog):
    good, good_loss = saved(ctx, "good")
    bad, bad_loss = saved(ctx, "bad", scale=0.05)
    assert bad_loss > good_loss + 0.1
    study = optuna.create_study()
    add_trial(study, ctx, 0, good, good_loss, half=9.0)  # the best at the horizon was worst at half of it
    add_trial(study, ctx, 1, bad, bad_loss, half=8.0)
    with caplog.at_level(logging.INFO, logger="nas.search.horizon"):
        record = extend_horizon(ctx, study, ctx.cfg.budgets[0])
    first, second = record["rungs"]
    assert first["tau"] == pytest.approx(-1.0) and first["stop"] is None and not first["within_noise"]
    assert second["tokens"] == 2 * first["tokens"] == 2 * ctx.horizon.tokens
    assert second["stop"] in (ranking.STABLE, ranking.CAP) and record["stop"] == second["stop"]
    assert all(second["losses"][k] != first["losses"][k] for k in second["losses"])  # they trained on
    assert record["tokens"] == 2 * ctx.horizon.tokens  # two finalists, one horizon more each
    assert (ctx.cfg.root / "horizon").is_dir() and Arch.from_hf_config  # the extended models
    assert any("still reordering" in r.message and "extending the horizon" in r.message for r in caplog.records)
    assert study.user_attrs["horizon"][ctx.cfg.budgets[0]]["pick"] == record["pick"]
    from nas.report.frames import report_frames
    from nas.report.html import render_html

    data = report_frames(study)  # the report shows the rank trajectories and where and why it stopped
    assert sorted(set(data.horizon["tokens"])) == [256, 512] and set(data.horizon["trial"]) == {0, 1}
    assert data.horizon.groupby("tokens")["rank"].apply(sorted).tolist() == [[1, 2], [1, 2]]
    page = render_html(data)
    assert "Adaptive horizon" in page and f"<b>{record['stop']}</b>" in page and "512 tokens" in page


def test_a_continued_rung_learns_from_the_kd_teacher(ctx, tmp_path):
    """A study that cuts one model and distills from another (`distill_teacher`, a cascade's later stage): a
    restart rung past the horizon learns from the KD teacher, as its trials and the final distillation do."""
    kd = prune(ctx.teacher, ctx.candidates[-1], ctx.importance).eval()  # another model than the one cut
    kd_ctx = replace(ctx, kd_teacher=kd, teacher_cache=None)
    start, _ = saved(ctx, "rung-start")
    run = continued(kd_ctx, ctx.horizon.steps)
    loss, _ = continue_rung(kd_ctx, start, run, tmp_path / "rung")
    by_teacher = {name: distill(teacher, load_model(start), ctx.data, run, tmp_path / name).val_loss
                  for name, teacher in (("kd", kd), ("cut", ctx.teacher))}  # fmt: skip
    assert abs(by_teacher["kd"] - by_teacher["cut"]) > 1e-4  # the two teachers teach apart
    assert loss == pytest.approx(by_teacher["kd"], abs=1e-6)


def test_an_order_that_held_but_whose_curves_will_cross_extends_the_horizon(ctx, caplog):
    torch.manual_seed(0)
    good, good_loss = saved(ctx, "steady")
    bad, bad_loss = saved(ctx, "steep", scale=0.1)
    study = optuna.create_study()  # the same order at half and at the full horizon: stable by the rungs alone
    add_trial(study, ctx, 0, good, good_loss, 0, {1: good_loss + 0.03, 2: good_loss + 0.01, 3: good_loss + 0.005,
                                                  4: good_loss})  # fmt: skip
    add_trial(study, ctx, 1, bad, bad_loss, 0, {1: bad_loss + 1.5, 2: bad_loss + 0.6, 3: bad_loss + 0.3,
                                                 4: bad_loss})  # fmt: skip
    one = ctx.cfg.search.replace(min_horizon_factor=1)  # the rungs alone would stop at the horizon
    far_cfg = ctx.cfg.replace(final={"tokens": 100 * ctx.horizon.tokens}, search=one)
    far = replace(ctx, cfg=far_cfg, horizon=resolve(far_cfg))
    with caplog.at_level(logging.INFO, logger="nas.search.horizon"):
        record = extend_horizon(far, study, ctx.cfg.budgets[0])
    first = record["rungs"][0]
    assert first["tau"] == pytest.approx(1.0)  # the rungs agree
    assert first["predicted"]["1"] < first["predicted"]["0"]  # the steep curve is predicted to win at the end
    assert first["crossing_tau"] == pytest.approx(-1.0) and first["stop"] is None
    assert len(record["rungs"]) == 2 and record["tokens"] == 2 * ctx.horizon.tokens
    assert any("predict at the final tokens -1.00" in r.message for r in caplog.records)
    plain = optuna.create_study()  # the same study without the crossing check stops at the horizon
    for t in study.trials[:2]:
        plain.add_trial(t)
    off = far.cfg.replace(search=one.replace(predict_crossings=False))
    record = extend_horizon(replace(ctx, cfg=off, horizon=resolve(off)), plain, ctx.cfg.budgets[0])
    assert len(record["rungs"]) == 1 and record["stop"] == ranking.STABLE


def test_top_two_within_noise_say_so(ctx, caplog):
    same, loss = saved(ctx, "same")
    study = optuna.create_study()
    add_trial(study, ctx, 0, same, loss, half=9.0)  # two trials, one model: a margin of zero
    add_trial(study, ctx, 1, same, loss, half=8.0)
    with caplog.at_level(logging.INFO, logger="nas.search.horizon"):
        record = extend_horizon(ctx, study, ctx.cfg.budgets[0])
    first, last = record["rungs"]  # one rung past the horizon (search.min_horizon_factor), then no order to resolve
    assert first["within_noise"] and first["stop"] is None and last["tokens"] == 2 * first["tokens"]
    assert last["within_noise"] and record["stop"] == ranking.STABLE
    assert any("within the validation noise" in r.message for r in caplog.records)



@pytest.mark.slow
def test_a_run_with_the_adaptive_horizon_distills_its_pick(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from nas.pipeline import run

    monkeypatch.chdir(tmp_path)  # the report goes to ./reports
    search = {"adaptive": True, "max_horizon_factor": 2, "stable_top": 2, "screen_top": 3, "finalists": 2,
              "per_class": 0, "bootstrap_samples": 100}  # fmt: skip
    cfg = run_config_from_dict(tiny_study_config(tmp_path, search=search))
    result = run(cfg)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    horizon = study.user_attrs["horizon"][cfg.budgets[0]]
    winner = study.user_attrs["winners"][cfg.budgets[0]]
    assert horizon["stop"] in (ranking.STABLE, ranking.CAP, ranking.ONE_LEFT)
    assert winner["trial"] == horizon["pick"] and winner["horizon_stop"] == horizon["stop"]
    extra = horizon["rungs"][-1]["tokens"] - horizon["rungs"][0]["tokens"]
    assert winner["tokens"] >= extra + cfg.final_distill().steps * tokens_per_step(cfg)
    assert AutoModelForCausalLM.from_pretrained(result.winner_dir) is not None
    assert "Adaptive horizon" in result.report.read_text()


@pytest.mark.slow
def test_a_space_no_larger_than_the_shortlist_runs_every_candidate_to_the_horizon(tmp_path, caplog):
    from optuna.trial import TrialState

    from nas.pipeline import search

    settings = {"adaptive": True, "small_space": True, "screen_top": 8, "finalists": 2, "bootstrap_samples": 100}
    cfg = run_config_from_dict(tiny_study_config(tmp_path, search=settings))
    with caplog.at_level(logging.INFO, logger="nas.search.horizon"):
        ctx, study = search(cfg)
    assert 2 <= len(ctx.candidates) <= 8  # the tiny space: no larger than the shortlist
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(done) == len(ctx.candidates) and not study.get_trials(states=(TrialState.PRUNED,))
    horizon = study.user_attrs["horizon"][cfg.budgets[0]]
    assert horizon["small_space"] == len(ctx.candidates)
    assert len(horizon["rungs"][0]["losses"]) == len(done)  # rung 0 judges every candidate, then the horizon goes on
    assert horizon["stop"] in (ranking.STABLE, ranking.CAP, ranking.ONE_LEFT)
    last = horizon["rungs"][-1]
    assert horizon["pick"] == last["order"][0]
    assert len(horizon["rungs"]) == 1 or len(last["losses"]) <= cfg.search.stable_top  # only the best go on
    assert f"its space has {len(ctx.candidates)} candidates" in caplog.text


@pytest.mark.slow
def test_wsd_rungs_continue_one_schedule_to_the_final_distillation(tmp_path, monkeypatch, caplog):
    import json
    from pathlib import Path

    from nas.pipeline import run
    from nas.pipeline.identity import study_identity
    from nas.search.wsd import stable_state

    monkeypatch.chdir(tmp_path)
    search = {"adaptive": True, "rung_schedule": "wsd", "max_horizon_factor": 2, "stable_top": 2, "screen_top": 3,
              "finalists": 2, "per_class": 0, "bootstrap_samples": 100}  # fmt: skip
    cfg = run_config_from_dict(tiny_study_config(tmp_path, search=search))
    assert study_identity(cfg)["search"]["rung_schedule"] == "wsd"
    restart = cfg.replace(search=cfg.search.replace(rung_schedule="restart"))
    assert "rung_schedule" not in study_identity(restart)["search"]  # what older studies recorded
    with caplog.at_level(logging.INFO):
        run(cfg)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    horizon = study.user_attrs["horizon"][cfg.budgets[0]]
    assert len(horizon["rungs"]) == 2 and horizon["read_tokens"] > 0  # min_horizon_factor 2: a rung at 2x
    assert stable_state(horizon["checkpoint"]) is not None  # the pick's rung kept its stable state


    def lrs(run_dir):
        return [m["lr"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m["lr"]]

    trial = study.trials[horizon["pick"]]  # its stable phase at constant LR, read after a decay to min_lr
    read = Path(trial.user_attrs["checkpoint"]).parent
    assert set(lrs(read / "stable")) == {cfg.distill.lr} and lrs(read)[-1] == pytest.approx(cfg.distill.min_lr)
    assert "continuing the stable phase of" in caplog.text
    final = lrs(cfg.paths.final(cfg.budgets[0]))  # no new warmup: the stable LR, then the decay
    assert final[0] == pytest.approx(cfg.distill.lr) and final[-1] == pytest.approx(cfg.distill.min_lr)
