"""Every setting of nas, defined once: pydantic models that the study TOML loader, the config a study
records and the CLI flags (`nas.cli.flags`) all come from.

```toml
name = "mystudy"                 # outputs go to studies/mystudy/ (out_dir)
teacher = "Qwen/Qwen3-1.7B"      # local directory or hub id
budget = "50%"                   # 4B, 350M, 1.5e9 or a share of the teacher

[data]       # DataConfig: seq_len, sources = [...] (one blend) or phases = [{start, sources}, ...]
[space]      # SpaceConfig
[importance] # ImportanceConfig
[search]     # SearchConfig
[distill]    # DistillConfig of every short run (steps come from search.horizon_tokens)
[final]      # DistillConfig overrides for the winner's full distillation (e.g. steps = 20000)
```

Every model is frozen, rejects unknown fields, keeps bounds and choices in its types and has a description
on every field. An invalid value raises `ConfigError` with one line naming the field (e.g.
`search.reduction_factor must be >= 2, got 1`), before any model or data is loaded.
"""

from nas.settings.base import (
    BUDGET_KINDS,
    DEPTH_STRATEGIES,
    DTYPE_BYTES,
    OPTIMIZERS,
    PRUNERS,
    SCHEDULES,
    SIZE_KNOBS,
    STRATEGIES,
    VISION,
    Settings,
    annotation_choices,
    one_line,
)
from nas.settings.data import DataConfig, Phase, Source, data_config_from_dict
from nas.settings.paths import StudyPaths, default_report, default_storage
from nas.settings.run_config import BUDGET, RunConfig, load_run_config, run_config_from_dict
from nas.settings.search import ConstraintsConfig, ImportanceConfig, SearchConfig, SpaceConfig
from nas.settings.train import DistillConfig, EvalConfig, Launch, PlanConfig

__all__ = [
    "BUDGET",
    "BUDGET_KINDS",
    "DEPTH_STRATEGIES",
    "DTYPE_BYTES",
    "OPTIMIZERS",
    "PRUNERS",
    "SCHEDULES",
    "SIZE_KNOBS",
    "STRATEGIES",
    "VISION",
    "ConstraintsConfig",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ImportanceConfig",
    "Launch",
    "Phase",
    "PlanConfig",
    "RunConfig",
    "SearchConfig",
    "Settings",
    "Source",
    "StudyPaths",
    "SpaceConfig",
    "annotation_choices",
    "data_config_from_dict",
    "default_report",
    "default_storage",
    "load_run_config",
    "one_line",
    "run_config_from_dict",
]
