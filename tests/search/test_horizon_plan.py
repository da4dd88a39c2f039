"""The search horizon, resolved once (`nas.search.horizon_plan`): tokens in the settings, steps from the batch,
older studies' steps as given, and the default per parameter once the teacher is known."""

import pytest

from nas.errors import ConfigError
from nas.model.arch import Arch
from nas.search.horizon_plan import fix_horizon, resolve, tokens_per_step
from nas.settings import run_config_from_dict
from nas.testing import tiny_config

STUDY = {"name": "s", "teacher": "no/such/teacher/dir", "data": {"sources": [{"path": "no-such.jsonl"}]}}


def test_the_horizon_is_in_tokens_and_steps_come_from_the_batch():
    data = {"seq_len": 64, "sources": [{"path": "x.jsonl"}]}
    cfg = run_config_from_dict({**STUDY, "data": data, "distill": {"batch_size": 4, "grad_accum": 2},
                                "search": {"horizon_tokens": 10_000, "rung_tokens": 1_000}})  # fmt: skip
    horizon = resolve(cfg)
    assert tokens_per_step(cfg) == horizon.tokens_per_step == 512
    assert horizon.steps == 20 and horizon.rung_steps == 2  # ceil(10000 / 512), ceil(1000 / 512)
    assert horizon.short_distill(cfg).steps == 20 and horizon.tokens == 20 * 512
    assert horizon.cap == 8 * horizon.tokens and horizon.floor == 4 * horizon.tokens  # the factors' defaults
    lower_cap = cfg.replace(search=cfg.search.replace(max_horizon_factor=2))
    assert resolve(lower_cap).floor == 2 * horizon.tokens  # the default floor is never above the cap
    assert resolve(cfg.replace(search=cfg.search.replace(min_horizon_factor=1))).floor == horizon.tokens
    old = run_config_from_dict({**STUDY, "data": data, "search": {"horizon_steps": 7, "eval_every": 3}})
    trial = resolve(old).short_distill(old)
    assert trial.steps == 7 and trial.eval_every == 3  # older studies load


def test_the_default_horizon_is_minitrons_tokens_per_parameter():
    cfg = run_config_from_dict({**STUDY, "budget": "8B", "data": {"seq_len": 100, "sources": [{"path": "x.jsonl"}]}})
    with pytest.raises(ConfigError, match="horizon_tokens"):
        resolve(cfg)  # unknown until the teacher (hence the budget's parameters) is
    teacher = Arch.from_hf_config(tiny_config("llama"))
    fixed = fix_horizon(cfg, teacher)
    assert fixed.search.horizon_tokens == 1_800_000_000  # Minitron §4: 1.8B tokens per 8B candidate
    horizon = resolve(cfg, teacher)
    assert horizon == resolve(fixed) and horizon.rung_steps == horizon.steps // 8
