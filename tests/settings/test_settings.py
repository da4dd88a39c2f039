"""One settings schema: every field documented, bad values rejected at load time with one line, the CLI
flags generated from the schema, and the recorded config read back unchanged."""

import pydantic
import pytest

import nas.settings as settings
from nas.cli.main import build_parser, main
from nas.errors import ConfigError
from nas.search.horizon_plan import resolve
from nas.settings import DistillConfig, RunConfig, run_config_from_dict
from nas.testing import tiny_study_config

MODELS = [
    cls
    for cls in vars(settings).values()
    if isinstance(cls, type) and issubclass(cls, settings.Settings) and cls is not settings.Settings
]
STUDY = {"name": "s", "teacher": "no/such/teacher/dir", "data": {"sources": [{"path": "no-such.jsonl"}]}}


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_has_a_description(model):
    undocumented = [name for name, info in model.model_fields.items() if not info.description]
    assert undocumented == []


@pytest.mark.parametrize(
    "table, message",
    [
        ({"search": {"reduction_factor": 1}}, "search.reduction_factor must be >= 2, got 1"),
        ({"space": {"steps": {"hidden_size": 0}}}, "space.steps.hidden_size must be >= 1, got 0"),
        ({"distill": {"steps": 0}}, "distill.steps must be >= 1, got 0"),
        ({"final": {"steps": 0}}, "final.steps must be >= 1, got 0"),
        ({"search": {"horizon": 10}}, "unknown field(s) horizon in [search]; known: adaptive"),
        ({"search": {"pruner": "median"}}, "search.pruner must be one of 'successive-halving'"),
        ({"distill": {"lr": 1e-4, "min_lr": 1e-3}}, "min_lr (0.001) must be <= lr (0.0001)"),
        ({"search": {"min_horizon_factor": 4, "max_horizon_factor": 2}},
         "search.min_horizon_factor (4) must be <= search.max_horizon_factor (2)"),
        ({"budget": "nan"}, "cannot read budget 'nan'"),
        ({"budget": "-4B"}, "cannot read budget '-4B'"),
        ({"data": {"sources": [{"path": "x", "weight": 0}]}}, "data.phases[0].sources[0].weight must be > 0"),
        ({"importance": {"num_samples": True}}, "importance.num_samples: input should be a valid integer"),
        ({"search": 3}, "[search] must be a table, got 3"),
    ],
)
def test_bad_values_fail_at_load_time_with_one_line(tmp_path, capsys, table, message):
    with pytest.raises(ConfigError, match=None) as error:
        run_config_from_dict({**STUDY, **table})
    assert message in str(error.value) and "\n" not in str(error.value)
    # the same from the command line: exit 2, one line, before the (missing) teacher is looked at
    top = {key: value for key, value in {**STUDY, **table}.items() if not isinstance(value, dict)}
    tables = {key: value for key, value in {**STUDY, **table}.items() if isinstance(value, dict)}
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    lines += [
        f"[{key}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in value.items())
        for key, value in tables.items()
    ]
    (tmp_path / "s.toml").write_text("\n".join(lines) + "\n")
    assert main(["search", str(tmp_path / "s.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def toml_value(value):
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value) if not isinstance(value, str) else f'"{value}"'


def test_the_recorded_config_reads_back_equal(tmp_path):
    cfg = run_config_from_dict(tiny_study_config(tmp_path, final={"steps": 7}))
    again = run_config_from_dict(cfg.to_dict())
    assert again == cfg
    assert again.final_distill().steps == 7 and resolve(again).short_distill(again).steps == 4


def test_cli_flags_come_from_the_schema():
    parser = build_parser()
    distill = parser._subparsers._group_actions[0].choices["distill"]
    flags = {a.dest: a for a in distill._actions}
    for name, info in DistillConfig.model_fields.items():
        assert name in flags, f"--{name} is missing from nas distill"
        assert info.description.replace("%", "%%") in flags[name].help
        assert "(default: " in flags[name].help
    assert "(default: 400)" in flags["steps"].help


def test_bad_flag_values_are_one_line_naming_the_flag(tmp_path, capsys):
    base = ["distill", "t", "s", str(tmp_path / "out"), "--data", "x.jsonl"]
    assert main([*base, "--steps", "0"]) == 2
    assert capsys.readouterr().err == "nas: error: --steps must be >= 1, got 0\n"
    with pytest.raises(SystemExit) as exit_code:
        main([*base, "--steps", "many"])
    assert exit_code.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert main(["space", "t", "--budget", "50%", "--tolerance", "1.5"]) == 2
    assert "--tolerance must be < 1.0, got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_settings_are_frozen_and_positional_like_dataclasses():
    cfg = DistillConfig(steps=5)
    with pytest.raises(pydantic.ValidationError):
        cfg.steps = 6
    assert cfg.replace(steps=6).steps == 6 and cfg.steps == 5
    assert settings.Source("a.txt", 2.0).weight == 2.0
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        cfg.replace(steps=0)
    assert RunConfig.model_fields["budget"].default == "50%"


def test_the_documented_example_study_loads():
    from pathlib import Path

    cfg = settings.load_run_config(Path(__file__).resolve().parents[2] / "studies" / "example.toml")
    assert cfg.name == "example" and cfg.teacher and len(cfg.budgets) >= 1


def test_the_final_stage_takes_tokens():
    cfg = run_config_from_dict({**STUDY, "data": {"seq_len": 10, "sources": [{"path": "x.jsonl"}]},
                                "distill": {"batch_size": 2}, "final": {"tokens": 1000}})  # fmt: skip
    assert cfg.final_distill().steps == 50 and cfg.final_tokens == 1000
    with pytest.raises(ConfigError, match="tokens"):
        run_config_from_dict({**STUDY, "final": {"tokens": 1000, "steps": 3}})
    with pytest.raises(ConfigError, match="not both"):
        run_config_from_dict({**STUDY, "search": {"horizon_tokens": 1000, "horizon_steps": 3}})
