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

from nas.device import PRECISIONS
from nas.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "adamw-8bit")  # torch AdamW | torchao AdamW8bit (https://arxiv.org/abs/2110.02861)


DEPTH_STRATEGIES = ("drop-lowest", "contiguous")


PRUNERS = ("successive-halving", "hyperband", "none")


SAMPLERS = ("auto", "exhaustive", "tpe")


def positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def one_of(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class Source:
    """One corpus: a local .txt/.jsonl/.parquet file or directory, or a Hugging Face datasets id."""

    path: str
    weight: float = 1.0  # relative share of the phase's train sequences
    text_field: str = "text"  # .jsonl key / .parquet column / hub column holding the text
    config: str | None = None  # hub dataset config name (e.g. "en")
    split: str = "train"  # hub split
    streaming: bool = False  # hub: stream instead of downloading the whole split
    max_documents: int | None = None  # read at most this many (non-empty) documents

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("a data source needs a path (local file/directory or hub dataset id)")
        if not self.weight > 0:
            raise ConfigError(f"data source {self.path!r}: weight must be > 0, got {self.weight!r}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(
                f"data source {self.path!r}: max_documents must be >= 1, got {self.max_documents!r}"
            )


@dataclass(frozen=True)
class Phase:
    """A blend of sources used from `start` (a fraction of the train steps) on."""

    sources: tuple[Source, ...]
    start: float = 0.0

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("a data phase needs at least one source")
        if not 0.0 <= self.start < 1.0:
            raise ConfigError(f"a data phase's start must be in [0, 1), got {self.start!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from (phases of weighted sources) and how it is cut into sequences."""

    phases: tuple[Phase, ...]  # one phase = a plain blend
    seq_len: int = 512
    val_fraction: float = 0.05  # of documents, by a content hash
    calib_fraction: float = 0.05
    cache_dir: str = ".nas_cache/data"
    seed: int = 0

    def __post_init__(self) -> None:
        starts = [p.start for p in self.phases]
        if not starts or starts[0] != 0.0 or starts != sorted(set(starts)):
            raise ConfigError(f"data phases must start at 0.0 and have increasing starts, got {starts}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if not (
            0 < self.val_fraction and 0 < self.calib_fraction and self.val_fraction + self.calib_fraction < 1
        ):
            raise ConfigError(
                f"val_fraction ({self.val_fraction}) and calib_fraction ({self.calib_fraction}) must be > 0 "
                "and sum to less than 1"
            )

    @classmethod
    def single(cls, path: str, **kw: Any) -> DataConfig:
        """One source, one phase; `kw` may hold fields of Source and of DataConfig."""
        source_fields = {f.name for f in dataclasses.fields(Source)}
        source = Source(path, **{k: v for k, v in kw.items() if k in source_fields})
        return cls((Phase((source,)),), **{k: v for k, v in kw.items() if k not in source_fields})

    @property
    def sources(self) -> tuple[Source, ...]:
        """The distinct corpora of all phases (weights aside), in order of first use."""
        seen: dict[Source, None] = {}
        for phase in self.phases:
            for s in phase.sources:
                seen.setdefault(dataclasses.replace(s, weight=1.0))
        return tuple(seen)


def data_config_from_dict(data: dict[str, Any]) -> DataConfig:
    """A DataConfig from a study TOML's [data] table: `sources = [...]` (one blend) or
    `phases = [{start, sources}, ...]`, plus seq_len, val_fraction, calib_fraction, cache_dir, seed."""
    data = dict(data)
    if ("sources" in data) == ("phases" in data):
        raise ConfigError(
            "[data] needs exactly one of `sources = [...]` or `phases = [{start, sources}, ...]`"
        )
    phases = data.pop("phases", None) or [{"sources": data.pop("sources")}]
    built = []
    for i, phase in enumerate(phases):
        if not isinstance(phase, dict) or not isinstance(phase.get("sources"), list):
            raise ConfigError(f"data.phases[{i}] must be a table with a list `sources`")
        sources = tuple(
            from_mapping(Source, s, f"data.phases[{i}].sources[{j}]") for j, s in enumerate(phase["sources"])
        )
        built.append(from_mapping(Phase, {**phase, "sources": sources}, f"data.phases[{i}]"))
    return from_mapping(DataConfig, {**data, "phases": tuple(built)}, "data")


@dataclass(frozen=True)
class SpaceConfig:
    """Which architectures are valid candidates (besides the budget)."""

    tolerance: float = 0.05  # candidates have budget*(1-tolerance) <= params <= budget
    max_width_prune: float = 0.5  # at most this fraction of any width knob is cut
    max_depth_prune: float = 0.5  # at most this fraction of the layers is cut
    steps: dict[str, int] = field(default_factory=dict)  # per-knob step; missing knobs get default_steps

    def __post_init__(self) -> None:
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"tolerance must be in [0, 1), got {self.tolerance}")
        for name in ("max_width_prune", "max_depth_prune"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        unknown = set(self.steps) - {"num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups"}
        if unknown:
            raise ConfigError(
                f"unknown step knob(s) {sorted(unknown)}; steps apply to num_layers, hidden_size, ffn_hidden_size, num_query_groups"
            )


@dataclass
class DistillConfig:
    """Settings of one distillation (or, with no teacher, LM fine-tuning) run."""

    steps: int = 400  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch, in all (split across torchrun processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 1e-5  # learning rate at the end of the decay
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant"
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.0  # AdamW decay of matrices (never norms or biases)
    grad_clip: float = 1.0  # max global grad norm (0: no clipping)
    betas: tuple = (0.9, 0.95)
    ce_weight: float = 0.0  # mix in CE on the labels: (1 - w) * KL + w * CE (0: pure KD, Minitron)
    temperature: float = 1.0  # softmax temperature of the KL (see nas.train.kd for the scaling)
    chunk_tokens: int = 1024  # tokens per chunk of the fused head + loss
    eval_every: int = 50  # steps between validations (0: only at the end)
    eval_sequences: int = 64  # validation sequences (the first n of data.val)
    eval_batch_size: int = 8
    checkpoint_every: int = 100  # steps between checkpoints (0: none)
    keep_checkpoints: int = 2  # how many of the latest checkpoints stay on disk
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    fsdp: bool = False  # under torchrun: shard student and teacher layers with FSDP2 (else DDP)
    precision: str = "auto"  # nas.device policy: auto | fp32 | bf16-mixed | bf16 (bf16 student weights)
    optimizer: str = "adamw"  # adamw (fp32 states) | adamw-8bit (torchao block-quantized states)
    offload_optimizer: bool = False  # CUDA only: optimizer states and update on the CPU (torchao)
    seed: int = 0
    device: str = "auto"  # auto: CUDA if available (cuda:LOCAL_RANK under torchrun)
    log_every: int = 10  # steps between train lines in metrics.jsonl

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        positive = ("steps", "batch_size", "grad_accum", "chunk_tokens", "eval_sequences", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name, choices in (("precision", PRECISIONS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.offload_optimizer and self.optimizer != "adamw":
            raise ConfigError("offload_optimizer keeps fp32 AdamW states on the CPU; set optimizer = 'adamw'")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ConfigError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.temperature <= 0 or self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("need temperature > 0 and 0 <= min_lr <= lr")
        if min(self.warmup_steps, self.eval_every, self.checkpoint_every, self.log_every) < 0:
            raise ConfigError("warmup_steps, eval_every, checkpoint_every and log_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


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
