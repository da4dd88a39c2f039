"""Every setting of a run as validated dataclasses, loaded from a study TOML file.

```toml
name = "mystudy"                 # outputs go to studies/mystudy/ (out_dir)
teacher = "Qwen/Qwen3-1.7B"      # local directory or hub id
budget = "50%"                   # 4B, 350M, 1.5e9 or a share of the teacher

[data]
seq_len = 1024
sources = [{ path = "allenai/c4", config = "en", streaming = true }]
# or blends with phases: phases = [{ start = 0.0, sources = [...] }, { start = 0.8, sources = [...] }]

[space]      # SpaceConfig:      tolerance, max_width_prune, max_depth_prune, steps
[importance] # ImportanceConfig: num_samples, val_sequences, batch_size
[search]     # SearchConfig:     horizon_steps, pruner, sampler, n_trials, storage, ...
[distill]    # DistillConfig of every short run (steps come from search.horizon_steps)
[final]      # DistillConfig overrides for the winner's full distillation (e.g. steps = 20000)
```
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.distill import DistillConfig
from nas.errors import ConfigError
from nas.space import SpaceConfig

PRUNERS = ("successive-halving", "hyperband", "none")
SAMPLERS = ("auto", "exhaustive", "tpe")


@dataclass(frozen=True)
class ImportanceConfig:
    num_samples: int = 1024  # calibration sequences
    val_sequences: int = 64  # held-out sequences for the layer-drop loss
    batch_size: int = 8

    def __post_init__(self) -> None:
        positive(self, "num_samples", "val_sequences", "batch_size")


@dataclass(frozen=True)
class SearchConfig:
    horizon_steps: int = 400  # short KD per candidate (Minitron: ~400 steps; rankings settle by ~300)
    eval_every: int = 50  # validation (and trial.report) interval in steps
    pruner: str = "successive-halving"  # successive-halving | hyperband | none
    reduction_factor: int = 3  # keep the best 1/reduction_factor at each rung
    sampler: str = "auto"  # auto: exhaustive when the space has <= max_exhaustive candidates, else TPE
    max_exhaustive: int = 64
    n_trials: int = 0  # 0: every candidate (exhaustive) or 20 (sampled)
    order: str = "pruned-loss"  # exhaustive order: pruned-loss (best first, cheap) or params
    top_k: int = 5  # trials re-ranked at half vs full horizon for the stability check
    storage: str = ""  # Optuna storage URL; default sqlite:///<out_dir>/study.db
    latency_tokens: int = 128  # forward length for the latency measurement
    heartbeat_interval: int = 30  # seconds; a trial silent for grace_period is failed and retried
    grace_period: int = 120
    max_retry: int = 2

    def __post_init__(self) -> None:
        positive(self, "horizon_steps", "eval_every", "reduction_factor", "max_exhaustive", "top_k")
        one_of(self, "pruner", PRUNERS)
        one_of(self, "sampler", SAMPLERS)
        one_of(self, "order", ("pruned-loss", "params"))
        if self.n_trials < 0:
            raise ConfigError(f"search.n_trials must be >= 0, got {self.n_trials}")


@dataclass(frozen=True)
class RunConfig:
    """One study: teacher, data, budget, and how to search and distill."""

    name: str
    teacher: str
    data: dict[str, Any]
    budget: str = "50%"
    out_dir: str = ""  # default studies/<name>
    depth_strategy: str = "drop-lowest"
    correct_steps: int = 0  # teacher correction (plain LM fine-tune) before pruning; 0: off
    seed: int = 0
    device: str = "auto"
    space: SpaceConfig = field(default_factory=SpaceConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    final: dict[str, Any] = field(default_factory=lambda: {"steps": 2000})

    def __post_init__(self) -> None:
        from nas.prune import DEPTH_STRATEGIES

        if not self.name or "/" in self.name:
            raise ConfigError(f"name must be a plain non-empty study name, got {self.name!r}")
        one_of(self, "depth_strategy", DEPTH_STRATEGIES)
        self.final_distill()  # validate the overrides now, not after the search
        self.data_config()

    @property
    def root(self) -> Path:
        return Path(self.out_dir or Path("studies") / self.name)

    @property
    def storage_url(self) -> str:
        return self.search.storage or f"sqlite:///{self.root / 'study.db'}"

    def short_distill(self) -> DistillConfig:
        """The KD settings of one trial: `distill` with the search horizon."""
        return dataclasses.replace(
            self.distill, steps=self.search.horizon_steps, eval_every=self.search.eval_every, seed=self.seed
        )

    def final_distill(self) -> DistillConfig:
        """The winner's full distillation: `distill` with the `final` overrides."""
        return from_mapping(DistillConfig, {**dataclasses.asdict(self.distill), **self.final}, "final")

    def data_config(self):
        from nas.data import data_config_from_dict

        return data_config_from_dict(self.data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a study TOML file; `name` defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    data.setdefault("name", path.stem)
    return run_config_from_dict(data)


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    return from_mapping(RunConfig, data, "top level")


def from_mapping(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a mapping, with one clear error per unknown field or wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(unknown)} in [{where}]; known: {', '.join(sorted(known))}"
        )
    kwargs = {
        name: _coerce(value, hints[name], f"{where}.{name}" if where != "top level" else name)
        for name, value in data.items()
    }
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _required(f)]
    if missing:
        raise ConfigError(f"missing required field(s) {', '.join(missing)} in [{where}]")
    return cls(**kwargs)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_mapping(hint, value, where)
    origin = typing.get_origin(hint) or hint
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (int, float, str, bool, dict, list, tuple) and not _isinstance(value, origin):
        raise ConfigError(f"{where} must be {origin.__name__}, got {value!r}")
    return value


def _isinstance(value: Any, origin: type) -> bool:
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def one_of(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(obj, name)!r}")
