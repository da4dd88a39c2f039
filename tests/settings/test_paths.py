"""One owner of a study's paths (`RunConfig.paths`), and the teacher's config parsed once per command."""

import json

import transformers

from nas.model.load import load_config
from nas.settings import default_report, default_storage, run_config_from_dict
from nas.testing import tiny_config

OUTPUTS = ("importance.safetensors", "corrected", "trials", "teacher_cache", "winner-50pct", "final-50pct",
           "winner-75pct", "final-75pct", "final-50pct-start")  # fmt: skip
KEPT = ("study.db", "plan.json", "teacher", "cache")  # the storage, the user's plan, inputs


def test_study_paths_name_every_output_and_clear_only_those(tmp_path):
    cfg = run_config_from_dict({"name": "s", "teacher": "t", "out_dir": str(tmp_path), "budget": ["50%", "75%"],
                                "data": {"sources": [{"path": "c.jsonl"}]}})  # fmt: skip
    paths = cfg.paths
    assert paths.winner("50%") == tmp_path / "winner-50pct" and paths.final("75%") == tmp_path / "final-75pct"
    assert cfg.storage_url == f"sqlite:///{tmp_path / 'study.db'}" and paths.report == default_report("s")
    for name in OUTPUTS + KEPT:
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("x")
    assert sorted(p.name for p in paths.outputs()) == sorted(OUTPUTS)
    paths.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(KEPT)
    paths.clear(database=True)
    assert not (tmp_path / "study.db").exists() and (tmp_path / "plan.json").is_file()
    one = run_config_from_dict({"name": "one", "teacher": "t", "data": {"sources": [{"path": "c.jsonl"}]}})
    assert one.paths.winner("50%").name == "winner" and one.storage_url == default_storage("one")


def test_the_teacher_config_is_parsed_once_until_it_changes(tmp_path, monkeypatch):
    tiny_config("llama").save_pretrained(tmp_path)
    parsed = []
    real = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(
        transformers.AutoConfig, "from_pretrained", lambda *a, **k: parsed.append(a) or real(*a, **k)
    )
    first, second = load_config(tmp_path), load_config(tmp_path)
    assert len(parsed) == 1 and first is not second and first.to_dict() == second.to_dict()
    first.num_hidden_layers = 99  # a caller's change stays its own
    assert load_config(tmp_path).num_hidden_layers != 99
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_hidden_layers": 3}))
    assert load_config(tmp_path).num_hidden_layers == 3 and len(parsed) == 2
