"""A study: the whole TOML file (`RunConfig`), its loader, and its budgets."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from nas.errors import ConfigError
from nas.io import check_kind
from nas.settings.base import (
    _NESTED,
    _WHERE,
    DEPTH_STRATEGIES,
    HUB_KERNELS,
    VISION,
    Settings,
    _described,
)
from nas.settings.data import DataConfig
from nas.settings.legacy import study_in_tokens
from nas.settings.paths import StudyPaths, default_root
from nas.settings.search import ConstraintsConfig, ImportanceConfig, SearchConfig, SpaceConfig
from nas.settings.train import DistillConfig

BUDGET = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*([kKmMbBgGtT%]?)\s*$")


class RunConfig(Settings):
    """One study: teacher, data, budget, and how to search and distill."""

    name: str = Field(description="study name: outputs go to studies/<name>/")
    teacher: str = Field(min_length=1, description="the teacher: a local model directory or a hub id")
    data: DataConfig = Field(description="the text of importance, search, distillation and validation")
    budget: str | int | float | list[str | int | float] = _described(
        "50%", "parameter budget: 4B, 350M, 1.5e9 or a share such as 50%; a list: a funnel and a winner each"
    )
    final_budgets: list[str] = _described([], "budgets whose winners `nas run` distills fully (empty: all)")
    out_dir: str = _described("", "where the study's files go (default studies/<name>)")
    depth_strategy: Literal[DEPTH_STRATEGIES] = _described(  # type: ignore[valid-type]
        "drop-lowest",
        "which layers a shallower candidate keeps: drop the least important, or the best contiguous block",
    )
    distill_teacher: str = _described(
        "",
        "the model the students are distilled from, with the teacher's tokenizer (default: the teacher they "
        "are pruned from; a cascade with cascade_teacher = teacher sets it to the original teacher)",
    )
    vision: Literal[VISION] = _described(  # type: ignore[valid-type]
        "drop",
        "a multimodal teacher (gemma4, mistral3, qwen3_5 checkpoints): drop its vision tower (a text-only "
        "export; nas distills on text only) or keep it around the pruned text model",
    )
    correct_steps: int = _described(0, "teacher correction: LM fine-tune steps before pruning (0: off)", ge=0)
    seed: int = _described(0, "seed of every short run")
    device: str = _described("auto", "auto (CUDA if available), cpu, cuda, cuda:1 ...")
    # off by default: transformers 5.25 fetches Hub kernels at every load otherwise (issue 30), which an
    # offline cluster cannot and which runs a code path nas did not test; `hub` opts in (recorded per study)
    kernels: Literal[HUB_KERNELS] = _described(  # type: ignore[valid-type]
        "off",
        "transformers' Hub kernels when a model is loaded: off (torch and installed packages only) or hub "
        "(`use_kernels=True`; needs the `kernels` package and, once, the network)",
    )
    # none by default, as transformers' Trainer now defaults report_to to "none": a tracker is an extra
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _described(
        [],
        "experiment trackers that stream each trial's and the final distillation's metrics.jsonl and the "
        "study's progress (optional extras: pip install 'nas[tensorboard]')",
    )
    space: SpaceConfig = _described(SpaceConfig(), "which architectures are candidates")
    importance: ImportanceConfig = _described(ImportanceConfig(), "the importance pass")
    search: SearchConfig = _described(SearchConfig(), "the Optuna search")
    constraints: ConstraintsConfig = _described(
        ConstraintsConfig(), "memory and throughput limits a candidate must meet to be trained"
    )
    distill: DistillConfig = _described(
        DistillConfig(), "KD settings of every run (trials use search.horizon_tokens)"
    )
    final: dict[str, Any] = _described(
        {"steps": 2000}, "DistillConfig overrides for the winner's full distillation (tokens = N instead of steps)"
    )
    cascade: bool = _described(
        False,
        "a chain of models as Minitron builds it: budgets largest first, each later budget searched on the "
        "previous budget's distilled winner (budgets stay shares of the original teacher)",
    )
    # previous: the chain as the Minitron paper builds it (its 4B is pruned from the distilled 8B, arXiv
    # 2407.14679 Table 14), one model per stage: the stage's teacher is the model its importance is measured
    # on, and a smaller teacher costs less (KD FLOPs per token: 2 N_teacher + 6 N_student)
    cascade_teacher: Literal["previous", "teacher"] = _described(
        "previous",
        "the distillation teacher of a cascade's later stages: the previous winner, or the original teacher",
    )
    # NVIDIA's pruning guidance: beyond ~50% reduction prune iteratively, ~30% a cut (DESIGN.md, Minitron facts)
    iterative_step: str = _described(
        "",
        "iterative pruning: no stage cuts more than this share of the model it starts from (e.g. 30%); a deeper "
        "cut goes through unnamed intermediate stages, as even in size as possible (empty: off)",
    )
    # no published value: half of a named member's full distillation per intermediate cut (benchmarks/cascade.py)
    intermediate_share: float = _described(
        0.5, "an intermediate stage's full-distillation steps, as a share of final.steps", gt=0, le=1
    )
    teacher_tokens: int = _described(
        0,
        "tokens the teacher was trained on: the cascade view's cost of each member from scratch (0: unknown)",
        ge=0,
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or "/" in value or value.strip() != value:
            raise ValueError(f"must be a plain non-empty study name (no '/'), got {value!r}")
        return value

    @field_validator("iterative_step")
    @classmethod
    def _step(cls, value: str) -> str:
        if value and not 0 < step_fraction(value) < 1:
            raise ValueError(f"must be a share strictly between 0% and 100% such as 30%, got {value!r}")
        return value

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        for one in values:
            match = BUDGET.match(str(one))
            if (
                not match
                or not math.isfinite(float(match[1] + (match[3] or "")))
                or float(match[1] + (match[3] or "")) <= 0
            ):
                raise ValueError(f"cannot read budget {one!r}; write e.g. 4B, 350M, 1.5e9 or 50%")
        if not values or len({str(v) for v in values}) != len(values):
            raise ValueError(f"must be one budget or a list of distinct budgets, got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _older_steps(cls, data: Any) -> Any:
        """[search] step fields of older studies, in tokens (`nas.settings.legacy`)."""
        return study_in_tokens(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        unknown = [b for b in self.final_budgets if b not in self.budgets]
        if unknown:
            raise ValueError(f"final_budgets {unknown} are not among the budgets {self.budgets}")
        if self.search.finalists > self.search.screen_top:
            raise ValueError(
                f"search.finalists ({self.search.finalists}) must be <= search.screen_top ({self.search.screen_top})"
            )
        if (self.search.min_horizon_factor or 0) > self.search.max_horizon_factor:
            raise ValueError(
                f"search.min_horizon_factor ({self.search.min_horizon_factor}) must be <= "
                f"search.max_horizon_factor ({self.search.max_horizon_factor})"
            )
        if (self.cascade or self.iterative_step) and self.final_budgets:
            raise ValueError(
                "a cascade distills every stage's winner (the next stage starts from it); drop final_budgets"
            )
        if self.iterative_step and len(self.budgets) > 1 and not self.cascade:
            raise ValueError("iterative_step chains the budgets: set cascade = true, or give one budget")
        several = len(self.budgets) > 1 and not self.cascade  # a cascade's stages have one budget each
        if self.search.strategy == "tpe" and (several or self.constraints.min_throughput):
            raise ValueError(
                "search.strategy = tpe searches one budget with no constraints.min_throughput; use the "
                "funnel (strategy = auto)"
            )
        self.final_distill()  # the overrides are validated now, not after the search
        return self

    @property
    def chained(self) -> bool:
        """Whether `nas run` runs the study as a chain of stages (`nas.cascade`)."""
        return self.cascade or bool(self.iterative_step)

    @property
    def budgets(self) -> list[str]:
        """The budgets as written (the labels of the funnels), one or several."""
        return [str(b) for b in self.budget] if isinstance(self.budget, list) else [str(self.budget)]

    @property
    def root(self) -> Path:
        return Path(self.out_dir or default_root(self.name))

    @property
    def paths(self) -> StudyPaths:
        """Every file the study writes (`nas.settings.paths`)."""
        return StudyPaths(self.root, self.name, tuple(self.budgets))

    @property
    def teacher_resident_in_trials(self) -> bool:
        """Whether the teacher sits on the trial's GPU (not with `search.teacher_cache`; for `nas plan`)."""
        return not self.search.teacher_cache

    @property
    def storage_url(self) -> str:
        return self.search.storage or f"sqlite:///{self.paths.database}"

    def final_distill(self) -> DistillConfig:
        """The winner's full distillation: `distill` with the `final` overrides (`tokens` there is
        converted to steps with the final batch)."""
        where, nested = _WHERE.set("final"), _NESTED.set(False)  # report it as the [final] table
        try:
            overrides = dict(self.final)
            tokens = overrides.pop("tokens", None)
            cfg = DistillConfig(**{**dict(self.distill), **overrides})
        finally:
            _WHERE.reset(where)
            _NESTED.reset(nested)
        if tokens is None:
            return cfg
        if "steps" in overrides or not isinstance(tokens, int | float) or tokens < 1:
            raise ConfigError(f"[final] gives tokens ({tokens!r}) as a number >= 1, without steps")
        per_step = cfg.batch_size * cfg.grad_accum * self.data.seq_len
        return cfg.replace(steps=max(1, math.ceil(tokens / per_step)))

    @property
    def final_tokens(self) -> int:
        """Training tokens of the winner's full distillation (what the extrapolation predicts at)."""
        cfg = self.final_distill()
        return cfg.steps * cfg.batch_size * cfg.grad_accum * self.data.seq_len


def step_fraction(value: str) -> float:
    """`iterative_step` as a fraction: "30%" -> 0.3, "0.3" -> 0.3 (NaN when unreadable)."""
    text = str(value).strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return math.nan


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a study TOML file; `name` defaults to the file's stem."""
    path = Path(path)
    check_kind(path, "study file")
    if path.is_dir():
        raise ConfigError(
            f"study file {path} is a directory; give the study's TOML file (e.g. {path}/NAME.toml)"
        )
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    data.setdefault("name", path.stem)
    return run_config_from_dict(data)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a parsed study TOML (or the config a study recorded)."""
    return RunConfig.load(data)
