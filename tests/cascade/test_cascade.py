"""A chain of models from one teacher (`nas.cascade`): the stage plan, the chain run end to end on tiny models,
a kill in stage 2, iterative pruning through an intermediate cut, and the model card of every winner."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import tomli_w

from nas.cascade.chain import cascade_stages
from nas.cascade.report import stored_cascade
from nas.cascade.runner import cascade_worker, record_cascade_study, run_cascade
from nas.cascade.stored import CASCADE_ATTR, CASCADE_FILE, OLD_CASCADE_ATTR, OLD_CASCADE_FILE
from nas.cli.main import main
from nas.errors import ConfigError
from nas.model.arch import Arch
from nas.model.card import CARD_FILE, CardFacts, model_card, read_front_matter
from nas.model.load import load_config
from nas.model.size import count_params
from nas.prune.importance import Importance
from nas.prune.space import parse_budget
from nas.settings import run_config_from_dict
from nas.testing import tiny_config, tiny_study_config

SMALL = {"screen_top": 2, "finalists": 1, "top_k": 1, "horizon_tokens": 2 * 2 * 32, "rung_tokens": 2 * 2 * 32}  # 2 steps


def plan_of(**overrides):
    base = {"name": "f", "teacher": "t", "data": {"sources": [{"path": "a.txt"}]}}
    teacher = Arch.from_hf_config(tiny_config(hidden_size=256, ffn_hidden_size=512, num_layers=8))
    return cascade_stages(run_config_from_dict({**base, **overrides}), teacher), count_params(teacher)


def test_iterative_step_cuts_a_deep_budget_in_equal_ratios_no_deeper_than_the_step():
    stages, total = plan_of(budget="25%", iterative_step="30%")
    assert [round(s.share, 3) for s in stages] == [0.707, 0.5, 0.354, 0.25]  # 100% -> 25% in 4 equal cuts
    sizes = [total] + [s.params for s in stages]
    assert all(b / a >= 0.7 - 1e-3 for a, b in zip(sizes, sizes[1:], strict=False))
    assert [s.named for s in stages] == [False, False, False, True] and stages[-1].label == "25%"
    assert [s.source for s in stages] == [0, 1, 2, 3]
    stages, _ = plan_of(budget="25%", iterative_step="50%", intermediate_share=0.25)
    assert [(s.label, s.named, s.token_share) for s in stages] == [("50%", False, 0.25), ("25%", True, 1.0)]


def test_a_cascade_takes_the_budgets_largest_first_each_from_the_previous_one():
    stages, total = plan_of(budget=["25%", "75%", "50%"], cascade=True)
    assert [(s.label, s.source) for s in stages] == [("75%", 0), ("50%", 1), ("25%", 2)]
    assert [s.params for s in stages] == [int(total * f) for f in (0.75, 0.5, 0.25)]  # of the ORIGINAL teacher
    with pytest.raises(ConfigError, match="cascade"):
        plan_of(budget=["50%", "25%"], iterative_step="30%")
    with pytest.raises(ConfigError, match="same size"):
        plan_of(budget=["50%", f"{total // 2}"], cascade=True)


def test_model_card_front_matter_is_yaml_naming_the_teacher():
    teacher = Arch.from_hf_config(tiny_config())
    arch = teacher.replace(num_layers=3, ffn_hidden_size=64)
    cut = {"layers": [0, 1, 3], "hidden": list(range(64)), "heads": [[0, 1, 2, 3]] * 3, "groups": [[0, 1]] * 3,
           "mlp": [list(range(64))] * 3, "depth_strategy": "drop-lowest"}  # fmt: skip
    facts = CardFacts(teacher="org/Teacher: 7B", teacher_arch=teacher, arch=arch, study="s", budget="75%",
                      tokens=1234, val_loss=2.5, teacher_val_loss=2.0, evals={"kjv_cloze": 0.5}, cut=cut)  # fmt: skip
    text = model_card(facts)
    meta = read_front_matter(text)
    assert meta["base_model"] == "org/Teacher: 7B" and {"pruned", "distilled"} <= set(meta["tags"])
    assert "removed [2]" in text and "2407.14679" in text and "2408.11796" in text and "1,234" in text


def stage_records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "stages").glob("*/stage.json"))]


def check_card(winner: Path, teacher: str) -> None:
    meta = read_front_matter((winner / CARD_FILE).read_text())
    assert meta["base_model"] == teacher and "pruned" in meta["tags"]


@pytest.mark.slow
def test_a_cascade_of_three_budgets_cuts_each_stage_from_the_previous_winner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_study_config(tmp_path, name="fam", budget=["75%", "25%", "50%"], cascade=True, search=SMALL)
    cfg = run_config_from_dict(config)
    result = run_cascade(cfg)
    stages = result.stages
    teacher = Arch.from_hf_config(load_config(cfg.teacher))
    assert [s["label"] for s in stages] == ["75%", "50%", "25%"]
    for k, stage in enumerate(stages):
        source = cfg.teacher if k == 0 else stages[k - 1]["winner"]["dir"]
        assert stage["teacher"] == source and stage["kd_teacher"] == source  # default: the previous winner
        importance = Importance.load(stage["importance"])  # recomputed on the model it cuts
        assert importance.identity["teacher"] == str(Path(source).resolve())
        assert importance.hidden.numel() == Arch.from_hf_config(load_config(source)).hidden_size
        budget = parse_budget(stage["label"], teacher)  # relative to the ORIGINAL teacher
        assert budget * (1 - cfg.space.tolerance) <= stage["winner"]["params"] <= budget
        winner = Path(stage["winner"]["dir"])
        assert count_params(Arch.from_hf_config(load_config(winner))) == stage["winner"]["params"]
        check_card(winner, cfg.teacher)
    assert len({s["importance"] for s in stages}) == 3
    page = result.report.read_text()
    assert "The chain" in page and "each member one-shot from the teacher" in page
    assert set(result.winners) == {"75%", "50%", "25%"}
    out = tmp_path / "again.html"  # `nas report` of the cascade's name draws the cascade view again
    assert main(["report", "--study", "fam", "--storage", cfg.storage_url, "--out", str(out)]) == 0
    assert "The chain" in out.read_text()


@pytest.mark.slow
def test_iterative_step_reaches_25_percent_through_a_50_percent_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_study_config(tmp_path, name="deep", budget="25%", iterative_step="50%", search=SMALL,
                               cascade_teacher="teacher", final={"steps": 4})  # fmt: skip
    cfg = run_config_from_dict(config)
    stages = run_cascade(cfg).stages
    total = count_params(Arch.from_hf_config(load_config(cfg.teacher)))
    assert [(s["label"], s["named"]) for s in stages] == [("50%", False), ("25%", True)]
    assert stages[0]["params"] == round(total * 0.5) and stages[1]["teacher"] == stages[0]["winner"]["dir"]
    assert stages[0]["final_tokens"] * 2 == stages[1]["final_tokens"]  # intermediate_share = 0.5 of final.steps
    assert stages[1]["kd_teacher"] == cfg.teacher  # cascade_teacher = teacher: cut from 50%, distilled from 100%
    stage2 = optuna.load_study(study_name=stages[1]["study"], storage=cfg.storage_url)
    assert stage2.user_attrs["config"]["distill_teacher"] == cfg.teacher
    for s in stages:
        assert s["winner"]["params"] <= s["params"]
        check_card(Path(s["winner"]["dir"]), cfg.teacher)
    # the same run as nas up to 229d8a6 left it (its record under the older names) resumes: moved to the new
    cascade = optuna.load_study(study_name="deep", storage=cfg.storage_url)
    record = cascade.user_attrs[CASCADE_ATTR]
    cascade.set_user_attr(OLD_CASCADE_ATTR, record)
    cascade.set_user_attr(CASCADE_ATTR, None)  # Optuna cannot delete an attribute; None reads as unset
    (cfg.root / CASCADE_FILE).rename(cfg.root / OLD_CASCADE_FILE)
    assert stored_cascade(cfg.storage_url, "deep") == record
    assert run_cascade(cfg, report=False).stages == stages  # every stage done: skipped
    attrs = optuna.load_study(study_name="deep", storage=cfg.storage_url).user_attrs
    assert attrs[CASCADE_ATTR] == record and attrs[OLD_CASCADE_ATTR] is None
    assert json.loads((cfg.root / CASCADE_FILE).read_text()) == record and not (cfg.root / OLD_CASCADE_FILE).exists()


def trial_digest(storage: str, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [(t.number, t.state.name, t.datetime_complete) for t in study.trials]


def mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_kill_in_stage_2_resumes_without_redoing_stage_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_study_config(tmp_path, name="kill", budget=["75%", "50%"], cascade=True, search=SMALL)
    study_file = tmp_path / "kill.toml"
    study_file.write_text(tomli_w.dumps(config))
    cfg = run_config_from_dict(config)
    stage2 = cfg.root / "stages" / "2-50pct"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", "run", str(study_file)], env=env, cwd=tmp_path,
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (stage2 / "importance.safetensors").is_file():  # stage 2's search has begun
            assert proc.poll() is None and time.time() < deadline, "stage 2 never started"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    assert not (stage2 / "stage.json").is_file()
    stage1 = cfg.root / "stages" / "1-75pct"
    before, trials = mtimes(stage1), trial_digest(cfg.storage_url, "kill.1-75pct")
    importance2 = (stage2 / "importance.safetensors").stat().st_mtime_ns
    resumed = subprocess.Popen([sys.executable, "-m", "nas.cli", "run", str(study_file)], env=env, cwd=tmp_path,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    assert cascade_worker(cfg.storage_url, "kill", poll=0.2) == 2  # a worker given the cascade's name serves both
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    assert mtimes(stage1) == before and trial_digest(cfg.storage_url, "kill.1-75pct") == trials
    assert (stage2 / "importance.safetensors").stat().st_mtime_ns == importance2  # resumed, not recomputed
    records = stage_records(cfg.root)
    assert [r["label"] for r in records] == ["75%", "50%"]
    assert records[1]["teacher"] == records[0]["winner"]["dir"]
    assert not math.isnan(records[1]["winner"]["final_val_loss"])
    stage2_study = optuna.load_study(study_name="kill.2-50pct", storage=cfg.storage_url)
    finished = [t for t in stage2_study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == len(finished)  # none run twice


def view_record() -> dict:
    """A cascade record of two stages (50% cut from a 1000-parameter teacher, then 25%), as runs store it."""

    def stage(index, label, named, params, kd, search, final):
        return {"index": index, "label": label, "named": named, "source": index - 1, "study": f"f.{index}",
                "teacher_val_loss": 2.0, "kd_teacher_params": kd, "search_tokens": search, "final_tokens": final,
                "winner": {"params": params, "final_val_loss": 2.0 + index / 10}}  # fmt: skip

    stages = [stage(1, "50%", False, 500, 1000, 100, 50), stage(2, "25%", True, 250, 500, 100, 100)]
    return {"name": "f", "teacher": "t", "teacher_params": 1000, "teacher_tokens": 10_000,
            "cascade_teacher": "previous", "iterative_step": "50%", "plan": stages, "stages": stages}  # fmt: skip


def test_the_cascade_view_counts_tokens_and_flops_each_way():
    from nas.cascade.report import cascade_costs, cascade_frame, render_cascade

    record = view_record()
    costs = cascade_costs(record, cascade_frame(record))
    assert costs["cascade_tokens"] == 350 and costs["one_shot_tokens"] == 200 and costs["intermediate"] == 1
    cascade = 150 * (2 * 1000 + 6 * 500) + 200 * (2 * 500 + 6 * 250)
    assert costs["cascade_flops"] == cascade and costs["one_shot_flops"] == 200 * (2 * 1000 + 6 * 250)
    assert costs["scratch_tokens"] == 10_000 and costs["tokens_vs_scratch"] == 0.035
    page = render_cascade(record)
    assert 'href="f.2.html"' in page and "intermediate cuts" in page


def test_a_cascade_never_takes_over_a_one_shot_study_of_its_name(tmp_path):
    from nas.cascade.runner import record_cascade_study

    base = {"name": "f", "teacher": "t", "data": {"sources": [{"path": "a.txt"}]}, "out_dir": str(tmp_path)}
    cfg = run_config_from_dict({**base, "cascade": True, "budget": ["50%", "25%"]})
    study = optuna.create_study(study_name="f", storage=cfg.storage_url)
    study.set_user_attr("config", {"name": "f"})  # what a one-shot nas study records
    with pytest.raises(ConfigError, match="one-shot study"):
        record_cascade_study(cfg, {"plan": []})
    assert CASCADE_ATTR not in study.user_attrs and OLD_CASCADE_ATTR not in study.user_attrs


def test_a_cascade_stored_under_the_older_names_is_read_and_moved_to_the_new_ones(tmp_path):
    from nas.cascade.stored import migrate_record_file

    base = {"name": "f", "teacher": "t", "data": {"sources": [{"path": "a.txt"}]}, "out_dir": str(tmp_path)}
    cfg = run_config_from_dict({**base, "cascade": True, "budget": ["50%", "25%"]})
    record = view_record()
    # what nas up to 229d8a6 stored: the study attribute and the file under the older names, nothing else
    study = optuna.create_study(study_name="f", storage=cfg.storage_url)
    study.set_user_attr(OLD_CASCADE_ATTR, record)
    (tmp_path / OLD_CASCADE_FILE).write_text(json.dumps(record, indent=1))
    assert stored_cascade(cfg.storage_url, "f") == record  # what `nas report` and `nas worker` read
    out = tmp_path / "f.html"
    assert main(["report", "--study", "f", "--storage", cfg.storage_url, "--out", str(out)]) == 0
    assert "nas cascade: f" in out.read_text() and 'href="f.2.html"' in out.read_text()
    # a resume (`run_cascade`'s first steps) keeps the record under the new names only
    migrate_record_file(tmp_path)
    record_cascade_study(cfg, record)
    assert json.loads((tmp_path / CASCADE_FILE).read_text()) == record and not (tmp_path / OLD_CASCADE_FILE).exists()
    attrs = optuna.load_study(study_name="f", storage=cfg.storage_url).user_attrs
    assert attrs[CASCADE_ATTR] == record and attrs[OLD_CASCADE_ATTR] is None
    assert stored_cascade(cfg.storage_url, "f") == record
