"""The study report: data frames from a real Optuna study (real SQLite, tiny models really trained),
the Pareto fronts against a brute-force check, and a self-contained HTML file."""

import math
import re

import numpy as np
import optuna
import pandas as pd
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from optuna.trial import TrialState

from nas.cli.main import main
from nas.errors import ConfigError
from nas.evaluate.loss import lm_loss
from nas.model.arch import KNOBS, Arch
from nas.model.size import count_params, kv_cache_bytes
from nas.prune.importance import compute_importance
from nas.report.frames import OBJECTIVES, load_study, pareto_mask, report_frames
from nas.report.html import SECTIONS, render_html, write_report
from nas.search.study import ranking_stability
from nas.search.trial import measure_latency
from nas.testing import tiny_model

TEACHER = dict(
    vocab_size=96, hidden_size=64, ffn_hidden_size=96, num_layers=4, num_attention_heads=4, num_query_groups=2
)
SHAPES = [  # num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups
    (4, 64, 64, 4, 2), (3, 64, 96, 4, 2), (4, 48, 96, 2, 2), (2, 64, 96, 4, 2),
    (3, 48, 64, 2, 1), (4, 32, 96, 4, 2), (3, 64, 32, 2, 2), (2, 48, 64, 4, 1),
]  # fmt: skip
PRUNED, FAILED = {3, 6}, {5}
HORIZON, BATCH, SEQ = 4, 4, 16


def brute_force_front(xs, ys):
    """Indices not dominated by any other point (minimise both)."""
    return {i for i in range(len(xs)) if not any(
        xs[j] <= xs[i] and ys[j] <= ys[i] and (xs[j] < xs[i] or ys[j] < ys[i]) for j in range(len(xs)))}  # fmt: skip


def student_of(shape):
    sizes = dict(zip(KNOBS, shape, strict=True))
    return tiny_model("llama", seed=sum(shape), **{**TEACHER, **sizes}, head_dim=16)


def train_steps(model, train, steps, start=0):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(start, start + steps):
        batch = train[(step * BATCH) % len(train) :][:BATCH]
        loss = F.cross_entropy(model(input_ids=batch).logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_objective(train, val, models, failed=FAILED, pruned=PRUNED):
    def objective(trial):
        model = student_of(SHAPES[trial.number % len(SHAPES)])
        arch = Arch.from_hf_config(model.config)
        for knob, value in zip(KNOBS, SHAPES[trial.number % len(SHAPES)], strict=True):
            trial.suggest_int(knob, value, value)
        for key, value in {"arch": arch.to_dict(), "label": arch.describe(), "params": count_params(arch), "candidate": trial.number,
                           "kv_cache_bytes_per_token": kv_cache_bytes(arch), "latency_tokens_per_s": measure_latency(model, 16, 1)}.items():  # fmt: skip
            trial.set_user_attr(key, value)
        if trial.number in failed:
            raise RuntimeError("worker crashed")  # a real failed trial
        curve = []
        for step in (2, 4):
            train_steps(model, train, 2, start=step - 2)
            curve.append({"step": step, "val_loss": lm_loss(model, val)})
            trial.report(curve[-1]["val_loss"], step)
            trial.set_user_attr("curve", curve)
            trial.set_user_attr("tokens", step * BATCH * SEQ)
            if trial.number in pruned:
                raise optuna.TrialPruned()
        models[trial.number] = model
        return curve[-1]["val_loss"]

    return objective


def study_attrs(study, teacher, val, importance_path, winner):
    arch = Arch.from_hf_config(teacher.config)
    attrs = {
        "config": {"name": study.study_name, "search": {"top_k": 4, "horizon_steps": HORIZON}, "distill": {"batch_size": BATCH}},
        "teacher": "tiny-llama (random)", "teacher_arch": arch.to_dict(), "teacher_params": count_params(arch),
        "teacher_val_loss": lm_loss(teacher, val), "budget": count_params(arch) * 3 // 4, "importance_path": str(importance_path),
        "data_fingerprint": "random-tokens-seed-0", "data": "uniform random tokens", "versions": {"optuna": optuna.__version__},
        "seed": 0, "horizon_steps": HORIZON, "tokens_per_step": BATCH * SEQ, "winner": winner,
    }  # fmt: skip
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    study.set_user_attr("stability", ranking_stability(study, 4, HORIZON))


def fully_distill(study, teacher, models, train, val):
    """The best trial's student trained further: the winner attribute, as the pipeline writes it."""
    best = min(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    model, curve = models[best.number], []
    for step in (6, 8):
        train_steps(model, train, 2, start=step - 2)
        with torch.no_grad():
            kl = F.kl_div(
                model(input_ids=val).logits.log_softmax(-1),
                teacher(input_ids=val).logits.log_softmax(-1),
                log_target=True,
                reduction="batchmean",
            )
        curve.append({"step": step, "val_loss": lm_loss(model, val), "val_kl": kl.item() / SEQ})
    return {"trial": best.number, "arch": best.user_attrs["arch"], "params": best.user_attrs["params"], "val_loss": best.value,
            "final_val_loss": curve[-1]["val_loss"], "dir": "/nowhere/winner", "curve": curve, "tokens": 8 * BATCH * SEQ}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second torch thread only adds sync cost (100x slower steps on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real_study(tmp_path_factory, one_thread):
    """8 trials (2 pruned, 1 failed) + 1 still running, with the whole study schema; returns (url, name)."""
    root = tmp_path_factory.mktemp("report")
    gen = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, 96, (16, SEQ), generator=gen), torch.randint(0, 96, (4, SEQ), generator=gen)
    teacher = tiny_model("llama", **TEACHER)
    importance_path = compute_importance(teacher, train, val, batch_size=8).save(
        root / "importance.safetensors"
    )
    url = f"sqlite:///{root / 'study.db'}"
    study = optuna.create_study(study_name="real", storage=url, direction="minimize")
    models = {}
    study.optimize(make_objective(train, val, models), n_trials=len(SHAPES), catch=(RuntimeError,))
    running = study.ask()  # a worker still busy: reported once, not finished
    running.set_user_attr("label", "L4 H64 F96 A4/G2")
    running.report(lm_loss(student_of((4, 64, 96, 4, 2)), val), 2)
    study_attrs(study, teacher, val, importance_path, fully_distill(study, teacher, models, train, val))
    return url, "real"


def test_pareto_mask_is_exactly_the_non_dominated_points():
    rng = np.random.default_rng(0)
    for case in range(30):
        n = int(rng.integers(1, 40))
        df = pd.DataFrame(
            {"x": rng.integers(0, 8, n).astype(float), "y": rng.integers(0, 8, n).astype(float)}
        )  # many ties
        df.loc[rng.random(n) < 0.1, "y"] = np.nan
        lower = bool(case % 2)
        mask = pareto_mask(df, "x", "y", x_lower_is_better=lower)
        ok = df.dropna()
        xs = list(ok["x"] if lower else -ok["x"])
        expected = {ok.index[i] for i in brute_force_front(xs, list(ok["y"]))}
        assert set(df.index[mask]) == expected


def test_report_frames_of_a_real_study(real_study):
    study = load_study(*real_study)
    data = report_frames(study)
    trials = data.trials.set_index("number")
    assert trials["state"].value_counts().to_dict() == {"COMPLETE": 5, "PRUNED": 2, "FAIL": 1, "RUNNING": 1}
    assert list(trials.loc[sorted(PRUNED), "last_step"]) == [2, 2]  # where they stopped
    assert (
        trials.loc[8, "value"] == study.trials[8].intermediate_values[2] and trials.loc[8, "last_step"] == 2
    )  # running
    assert list(trials.loc[0, ["num_layers", "hidden_size", "ffn_hidden_size"]]) == [4, 64, 64]
    assert trials.loc[0, "arch.head_dim"] == 16 and trials.loc[0, "params"] == count_params(
        Arch.from_dict(study.trials[0].user_attrs["arch"])
    )
    assert len(data.curves) == sum(len(t.intermediate_values) for t in study.trials)
    done = trials[trials["state"] == "COMPLETE"]
    for name, (column, _, lower) in OBJECTIVES.items():
        xs = [v if lower else -v for v in done[column]]
        expected = {done.index[i] for i in brute_force_front(xs, list(done["value"]))}
        assert set(trials.index[trials[f"pareto_{name}"]]) == expected
    winner = study.user_attrs["winner"]
    running_so_far = 2 * BATCH * SEQ  # the running trial, up to its last report
    short_runs = sum(t.user_attrs.get("tokens", 0) for t in study.trials) + running_so_far
    assert (
        data.header["tokens_spent"] == short_runs + winner["tokens"] - trials.loc[winner["trial"], "tokens"]
    )
    assert data.header["winner"]["loss_vs_teacher"] == pytest.approx(
        winner["final_val_loss"] - study.user_attrs["teacher_val_loss"]
    )
    assert data.importance_heads.shape == (4, 4) and len(data.importance_layers) == 4
    assert list(data.winner_curve["step"]) == [6, 8]
    assert data.stability_facts["k"] == 4
    half, full = data.stability["half_loss"], data.stability["full_loss"]
    assert data.stability_facts["kendall_tau"] == pytest.approx(scipy.stats.kendalltau(half, full).statistic)
    assert sorted(data.stability["full_rank"]) == [1, 2, 3, 4]


def external_references(text):
    """Every attribute, CSS import or url() that would make a browser fetch from the network."""
    pattern = r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//|@import|url\(\s*["']?\s*(?:https?:)?//"""
    return re.findall(pattern, text, flags=re.I)


def test_html_has_every_section_and_fetches_nothing(real_study):
    import plotly.offline

    text = render_html(report_frames(load_study(*real_study)))
    plotlyjs = plotly.offline.get_plotlyjs()
    assert text.count(plotlyjs) == 1 and text.count("plotly.js v") == 1  # the library, once
    page = text.replace(
        plotlyjs, ""
    )  # its own strings (e.g. map attributions) are never loaded by the report
    assert external_references(page) == []
    assert not re.search(r"<(?:script|img|iframe)[^>]*\bsrc=|<link\b", page, flags=re.I)
    for sid in (*SECTIONS, "header"):
        assert f'id="{sid}"' in page
    assert "L4 H64 F64 A4/G2" in page and "Kendall tau" in page and "worker crashed" not in page
    assert len(text) < 10e6


def test_report_command_writes_the_file(real_study, tmp_path, capsys):
    url, name = real_study
    out = tmp_path / "r" / "real.html"
    assert main(["report", "--storage", url, "--study", name, "--out", str(out)]) == 0
    assert out.is_file() and list(out.parent.iterdir()) == [out]  # atomic: no temp file left
    assert str(out) in capsys.readouterr().out


def test_missing_study_names_those_in_the_storage(real_study, tmp_path, capsys):
    url, _ = real_study
    with pytest.raises(ConfigError, match="studies there: real"):
        write_report(url, "nope", tmp_path / "x.html")
    assert main(["report", "--storage", f"sqlite:///{tmp_path / 'none.db'}", "--study", "real"]) == 2
    assert "no SQLite file" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def small_study(tmp_path, n_trials, fail_all=False):
    gen = torch.Generator().manual_seed(1)
    train, val = torch.randint(0, 96, (8, SEQ), generator=gen), torch.randint(0, 96, (2, SEQ), generator=gen)
    study = optuna.create_study(study_name="small", storage=f"sqlite:///{tmp_path / 's.db'}")
    failed = set(range(n_trials)) if fail_all else set()
    study.optimize(make_objective(train, val, {}, failed, set()), n_trials=n_trials, catch=(RuntimeError,))
    study.set_user_attr("importance_path", str(tmp_path / "gone.safetensors"))
    return study


def test_one_trial_study(tmp_path):
    study = small_study(tmp_path, 1)
    data = report_frames(study)
    assert data.trials["pareto_params"].tolist() == [True] and data.header["winner"]["trial"] == 0
    assert "best short run so far" in data.header["winner"]["source"]
    text = render_html(data)
    assert all(f'id="{sid}"' in text for sid in SECTIONS)
    assert "gone.safetensors is missing" in text  # the importance section is a note, not a crash


def test_study_with_no_completed_trial_says_so(tmp_path):
    study = small_study(tmp_path, 2, fail_all=True)
    study.ask().report(5.5, 2)  # running
    data = report_frames(study)
    assert not data.trials["pareto_params"].any() and data.header["winner"] == {}
    text = render_html(data)
    assert "No completed trial yet" in text and "none yet: no trial has completed" in text
    assert all(f'id="{sid}"' in text for sid in SECTIONS)
    assert math.isnan(data.trials.set_index("number").loc[0, "value"])
    empty = render_html(report_frames(optuna.create_study(storage=f"sqlite:///{tmp_path / 'e.db'}")))
    assert "The study has no trial yet" in empty and all(f'id="{sid}"' in empty for sid in SECTIONS)


@pytest.mark.slow
def test_report_of_a_study_made_by_the_search(tmp_path):
    from nas.pipeline import finalize, search
    from nas.settings import run_config_from_dict
    from nas.testing import tiny_study_config

    cfg = run_config_from_dict(tiny_study_config(tmp_path, search={"n_trials": 3, "pruner": "none"}))
    ctx, study = search(cfg)
    finalize(ctx, study)
    out = write_report(cfg.storage_url, cfg.name, tmp_path / "tiny.html")
    data = report_frames(load_study(cfg.storage_url, cfg.name))
    assert (data.trials["state"] == "COMPLETE").sum() == 3 and data.trials["pareto_params"].any()
    assert (
        data.importance_heads is not None and not data.winner_curve.empty and "importance" not in data.notes
    )
    assert data.header["winner"]["source"] == "full distillation"
    # every trial and the winner carry their steady KD speed (train steps alone) and their kernels
    done = data.trials[data.trials["state"] == "COMPLETE"]
    assert (pd.to_numeric(done["kd_tokens_per_s"]) > 0).all() and done["kd_mfu"].isna().all()  # CPU: no peak
    assert (done["kd_speed.write_seconds"] > 0).all() and set(done["kernel_paths.attention"]) == {"sdpa"}
    assert data.header["winner"]["kd_tokens_per_s"] > 0 and "Steady KD speed" in out.read_text()
    assert (
        external_references(out.read_text().replace(__import__("plotly.offline").offline.get_plotlyjs(), ""))
        == []
    )
