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
[distill]    # DistillConfig of every short run (steps come from search.horizon_steps)
[final]      # DistillConfig overrides for the winner's full distillation (e.g. steps = 20000)
```

Every model is frozen, rejects unknown fields, keeps bounds and choices in its types and has a description
on every field. An invalid value raises `ConfigError` with one line naming the field (e.g.
`search.reduction_factor must be >= 2, got 1`), before any model or data is loaded.
"""

from __future__ import annotations

import math
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nas.device import PRECISIONS
from nas.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "adamw-8bit")  # torch AdamW | torchao AdamW8bit (https://arxiv.org/abs/2110.02861)
DEPTH_STRATEGIES = ("drop-lowest", "contiguous")
PRUNERS = ("successive-halving", "hyperband", "none")
SAMPLERS = ("auto", "funnel", "exhaustive", "tpe")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
SIZE_KNOBS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups", "num_experts")  # with steps
BUDGET_KINDS = ("total", "active")  # a budget on all parameters, or on those one token uses (MoE)
_WHERE: ContextVar[str] = ContextVar("settings_where", default="")  # the TOML table being loaded
_NESTED: ContextVar[bool] = ContextVar("settings_nested", default=False)


class Settings(BaseModel):
    """Base of every settings model: validated on construction (positional arguments allowed, in field
    order, as with a dataclass); an invalid value raises `ConfigError` with one line."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    def __init__(self, *args: Any, **data: Any) -> None:
        if args:
            data = dict(zip(type(self).model_fields, args, strict=False)) | data
        if _NESTED.get():  # pydantic calls this for nested models too: let the outermost one report
            super().__init__(**data)
            return
        token = _NESTED.set(True)
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(one_line(e, type(self), _WHERE.get())) from None
        finally:
            _NESTED.reset(token)

    @classmethod
    def load(cls, data: Any, where: str = "") -> Any:
        """Build from a TOML table (`where` names it in errors, e.g. "data")."""
        if not isinstance(data, dict):
            raise ConfigError(f"[{where or 'top level'}] must be a table, got {type(data).__name__}")
        token = _WHERE.set(where)
        try:
            return cls(**data)
        finally:
            _WHERE.reset(token)

    def replace(self, **changes: Any) -> Any:
        """A validated copy with some fields changed."""
        return type(self)(**{**dict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples as lists), as a study records them."""
        return self.model_dump(mode="json")


def one_line(error: ValidationError, cls: type[BaseModel], where: str = "") -> str:
    """The first problem of a pydantic ValidationError as one line in nas's words."""
    e = error.errors()[0]
    path = ".".join([where] * bool(where) + [str(k) for k in e["loc"]]).replace(".[", "[")
    path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)
    got, ctx, kind = e.get("input"), e.get("ctx") or {}, e["type"]
    if kind == "extra_forbidden":
        parent = path.rpartition(".")[0] or "top level"
        known = ", ".join(sorted(_model_at(cls, e["loc"][:-1]).model_fields))
        return f"unknown field(s) {e['loc'][-1]} in [{parent}]; known: {known}"
    if kind == "missing":
        return f"missing required field {path}"
    if kind == "literal_error":
        return f"{path} must be one of {ctx['expected']}, got {got!r}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        return f"{path} must be {bounds[kind]} {next(iter(ctx.values()))}, got {got!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"[{path or 'top level'}] must be a table, got {got!r}"
    if kind == "value_error":
        return f"{path}: {ctx['error']}" if path else str(ctx["error"])
    return f"{path}: {e['msg'].lower()}, got {got!r}"


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The settings model that a location inside `cls` points into (for its list of known fields)."""
    for key in loc:
        if isinstance(key, int):
            continue
        annotation = cls.model_fields[key].annotation
        candidates = [annotation, *get_args(annotation)]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), cls)
    return cls


def _described(default: Any, description: str, **bounds: Any) -> Any:
    return Field(default, description=description, **bounds)


# ---- data ------------------------------------------------------------------------------------------


class Source(Settings):
    """One corpus: a local .txt/.jsonl/.parquet file or directory, or a Hugging Face datasets id."""

    path: str = Field(
        min_length=1, description="local .txt/.jsonl/.parquet file or directory, or a hub dataset id"
    )
    weight: float = _described(
        1.0, "relative share of the phase's train sequences", gt=0, allow_inf_nan=False
    )
    text_field: str = _described("text", "JSON key / parquet column / hub column holding the text")
    config: str | None = _described(None, "hub dataset config name (e.g. en)")
    split: str = _described("train", "hub dataset split")
    streaming: bool = _described(False, "stream the hub dataset instead of downloading the split")
    max_documents: int | None = _described(None, "read at most this many (non-empty) documents", ge=1)


class Phase(Settings):
    """A blend of sources used from `start` (a fraction of the train steps) on."""

    sources: Annotated[tuple[Source, ...], Field(strict=False, min_length=1)] = Field(
        description="the weighted sources of this phase"
    )
    start: float = _described(0.0, "fraction of the train steps at which this phase begins", ge=0, lt=1)


class DataConfig(Settings):
    """Where the text comes from (phases of weighted sources) and how it is cut into sequences."""

    phases: Annotated[tuple[Phase, ...], Field(strict=False, min_length=1)] = Field(
        description="blends of sources by training progress; `sources = [...]` is one phase"
    )
    seq_len: int = _described(512, "tokens per packed sequence", ge=2)
    val_fraction: float = _described(
        0.05, "share of documents (by content hash) held out for validation", gt=0, lt=1
    )
    calib_fraction: float = _described(
        0.05, "share of documents (by content hash) for importance calibration", gt=0, lt=1
    )
    cache_dir: str = _described(".nas_cache/data", "directory of the tokenized, packed token cache")
    seed: int = _described(0, "seed of the train batch sampling (data order)")

    @model_validator(mode="before")
    @classmethod
    def _sources_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sources" in data:
            if "phases" in data:
                raise ValueError(
                    "[data] needs exactly one of `sources = [...]` or `phases = [{start, sources}, ...]`"
                )
            data = {**data, "phases": [{"sources": data["sources"]}]}
            del data["sources"]
        elif isinstance(data, dict) and "phases" not in data:
            raise ValueError(
                "[data] needs exactly one of `sources = [...]` or `phases = [{start, sources}, ...]`"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        starts = [p.start for p in self.phases]
        if starts[0] != 0.0 or starts != sorted(set(starts)):
            raise ValueError(f"data phases must start at 0.0 and have increasing starts, got {starts}")
        if self.val_fraction + self.calib_fraction >= 1:
            raise ValueError(
                f"val_fraction ({self.val_fraction}) and calib_fraction ({self.calib_fraction}) must sum to less than 1"
            )
        return self

    @classmethod
    def single(cls, path: str, **kw: Any) -> DataConfig:
        """One source, one phase; `kw` may hold fields of Source and of DataConfig."""
        source = Source(path, **{k: v for k, v in kw.items() if k in Source.model_fields})
        return cls((Phase((source,)),), **{k: v for k, v in kw.items() if k not in Source.model_fields})

    @property
    def sources(self) -> tuple[Source, ...]:
        """The distinct corpora of all phases (weights aside), in order of first use."""
        seen: dict[Source, None] = {}
        for phase in self.phases:
            for s in phase.sources:
                seen.setdefault(s.replace(weight=1.0))
        return tuple(seen)


def data_config_from_dict(data: dict[str, Any]) -> DataConfig:
    """A DataConfig from a study TOML's [data] table: `sources = [...]` (one blend) or
    `phases = [{start, sources}, ...]`, plus seq_len, val_fraction, calib_fraction, cache_dir, seed."""
    return DataConfig.load(data, "data")


# ---- what to search ----------------------------------------------------------------------------------


class SpaceConfig(Settings):
    """Which architectures are valid candidates (besides the budget)."""

    tolerance: float = _described(
        0.05, "candidates have budget*(1-tolerance) <= params <= budget", ge=0, lt=1
    )
    max_width_prune: float = _described(0.5, "at most this fraction of any width knob is cut", ge=0, lt=1)
    max_depth_prune: float = _described(0.5, "at most this fraction of the layers is cut", ge=0, lt=1)
    steps: dict[Literal[SIZE_KNOBS], Annotated[int, Field(ge=1)]] = _described(  # type: ignore[valid-type]
        {},
        "per-knob step of the sizes (num_layers, hidden_size, ffn_hidden_size, num_query_groups, "
        "num_experts); missing knobs get hardware-friendly defaults",
    )
    budget_kind: Literal[BUDGET_KINDS] = _described(  # type: ignore[valid-type]
        "total", "what the budget counts: all parameters, or those active per token (mixture of experts)"
    )


class ImportanceConfig(Settings):
    """The importance pass (Minitron: activations on ~1024 calibration sequences, no gradients)."""

    num_samples: int = _described(1024, "calibration sequences", ge=1)
    val_sequences: int = _described(64, "held-out sequences for the loss with each layer removed", ge=1)
    batch_size: int = _described(8, "sequences per forward of the importance pass", ge=1)


class SearchConfig(Settings):
    """The Optuna study: one trial = one candidate, pruned and distilled for a short horizon."""

    horizon_steps: int = _described(
        400, "KD steps per candidate (Minitron: ~400; rankings settle by ~300)", ge=1
    )
    eval_every: int = _described(50, "steps between validations (and trial.report, the pruner's rungs)", ge=1)
    pruner: Literal[PRUNERS] = _described("successive-halving", "how losing trials are stopped early")  # type: ignore[valid-type]
    reduction_factor: int = _described(3, "keep the best 1/reduction_factor of the trials at each rung", ge=2)
    sampler: Literal[SAMPLERS] = _described(  # type: ignore[valid-type]
        "auto",
        "auto/funnel: screen every candidate, short-KD each budget's best screen_top; exhaustive: every "
        "candidate, best screen first; tpe: sample one budget's space",
    )
    screen_sequences: int = _described(
        8, "validation sequences of the screen (every candidate's loss right after pruning)", ge=1
    )
    screen_top: int = _described(
        8, "funnel: candidates per budget, best screen first, that get short KD", ge=1
    )
    finalists: int = _described(
        3, "candidates per budget never stopped before the horizon (the first ones, best screen first)", ge=1
    )
    rerank_tasks: list[str] = _described(
        [], "lm-eval tasks (e.g. kjv_lastword) scored on the completed trials, shown beside the loss"
    )
    rerank_limit: int = _described(0, "items per re-rank task (0: all)", ge=0)
    max_exhaustive: int = _described(
        64, "unused since the funnel screens spaces of any size (kept so older study files load)", ge=1
    )
    n_trials: int = _described(
        0, "finished trials wanted; 0: every candidate (exhaustive) or 20 (sampled)", ge=0
    )
    order: Literal["pruned-loss", "params"] = _described(
        "pruned-loss", "exhaustive order: best zero-shot loss first (pruned-loss) or largest first (params)"
    )
    top_k: int = _described(
        5, "trials re-ranked at half vs full horizon; their short-run models are kept", ge=1
    )
    storage: str = _described("", "Optuna storage URL (default sqlite:///<out_dir>/study.db)")
    latency_tokens: int = _described(128, "sequence length of the latency measurement", ge=1)
    heartbeat_interval: int = _described(30, "seconds between a running trial's heartbeats", ge=1)
    grace_period: int = _described(120, "seconds of silence after which a trial is failed and retried", ge=1)
    max_retry: int = _described(2, "retries of a failed candidate before it is given up", ge=0)
    teacher_cache: bool = _described(
        False,
        "trials train from a per-study cache of the teacher's top-k outputs on the horizon's batches, "
        "written once before the trials; the teacher is not resident on the GPU during trials",
    )
    teacher_cache_topk: int = _described(
        64,
        "teacher tokens kept per position in the teacher cache (the rest as one bucket; >= vocab: exact)",
        ge=1,
    )


# ---- how to train ------------------------------------------------------------------------------------


class DistillConfig(Settings):
    """One distillation (or, with no teacher, LM fine-tuning) run."""

    steps: int = _described(400, "optimizer steps", ge=1)
    batch_size: int = _described(
        8, "sequences per micro-batch, in all (split across torchrun processes)", ge=1
    )
    grad_accum: int = _described(1, "micro-batches per optimizer step", ge=1)
    lr: float = _described(1e-4, "peak learning rate", gt=0, allow_inf_nan=False)
    min_lr: float = _described(1e-5, "learning rate at the end of the decay", ge=0, allow_inf_nan=False)
    warmup_steps: int = _described(0, "linear warmup steps", ge=0)
    schedule: Literal[SCHEDULES] = _described("cosine", "learning-rate decay after the warmup")  # type: ignore[valid-type]
    decay_fraction: float = _described(
        0.2, "wsd: the last fraction of steps decays linearly to min_lr", gt=0, le=1
    )
    weight_decay: float = _described(0.0, "AdamW weight decay of matrices (never norms or biases)", ge=0)
    grad_clip: float = _described(1.0, "max global gradient norm (0: no clipping)", ge=0)
    betas: Annotated[tuple[float, float], Field(strict=False)] = _described((0.9, 0.95), "AdamW betas")
    ce_weight: float = _described(
        0.0, "loss = (1 - w) * KL + w * CE on the labels (0: pure KD, Minitron)", ge=0, le=1
    )
    temperature: float = _described(
        1.0, "softmax temperature of the KL (see nas.train.kd)", gt=0, allow_inf_nan=False
    )
    chunk_tokens: int = _described(1024, "tokens per chunk of the fused LM head + loss", ge=1)
    eval_every: int = _described(50, "steps between validations (0: only at the end)", ge=0)
    eval_sequences: int = _described(64, "validation sequences (the first n of the validation split)", ge=1)
    eval_batch_size: int = _described(8, "sequences per validation forward", ge=1)
    checkpoint_every: int = _described(100, "steps between checkpoints (0: none)", ge=0)
    keep_checkpoints: int = _described(2, "how many of the latest checkpoints stay on disk", ge=1)
    gradient_checkpointing: bool = _described(False, "recompute activations in backward to save memory")
    fsdp: bool = _described(
        False, "with several processes: shard student and teacher layers with FSDP2, not DDP"
    )
    precision: Literal[PRECISIONS] = _described(  # type: ignore[valid-type]
        "auto", "dtypes (nas.device): auto = bf16-mixed on CUDA, fp32 on CPU; bf16 = bf16 student weights"
    )
    optimizer: Literal[OPTIMIZERS] = _described(  # type: ignore[valid-type]
        "adamw", "adamw (fp32 states) or adamw-8bit (torchao block-quantized states, a quarter of the memory)"
    )
    offload_optimizer: bool = _described(False, "CUDA only: optimizer states and update on the CPU (torchao)")
    seed: int = _described(0, "torch seed of the run (the data order is data.seed)")
    device: str = _described(
        "auto", "auto (CUDA if available; cuda:LOCAL_RANK under torchrun), cpu, cuda, cuda:1 ..."
    )
    log_every: int = _described(10, "steps between train lines in metrics.jsonl", ge=0)

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.offload_optimizer and self.optimizer != "adamw":
            raise ValueError("offload_optimizer keeps fp32 AdamW states on the CPU; set optimizer = 'adamw'")
        return self


class Launch(Settings):
    """How many processes a command trains in."""

    nproc_per_node: int = _described(
        1,
        "processes (GPUs) to train on: reruns itself under torchrun; --batch-size is the global batch",
        ge=1,
    )


class PlanConfig(Settings):
    """`nas plan`: the GPUs a study's memory plan is made for."""

    gpu_memory: str | None = _described(
        None, "memory of one GPU, e.g. 80GB or 79.6GiB (default: the visible GPU's)"
    )
    gpus_per_trial: int = _described(1, "processes (GPUs) per trial", ge=1)
    as_json: bool = _described(False, "print the plan as a JSON list of stages")


class EvalConfig(Settings):
    """`nas eval`: held-out perplexity and lm-evaluation-harness tasks."""

    tasks: list[str] = _described([], "lm-eval tasks, comma-separated (offline: kjv_cloze, kjv_lastword)")
    include_paths: list[str] = _described([], "folders of lm-eval task YAML files (repeatable)")
    limit: int | None = _described(None, "score at most N items of each task (default all)", ge=1)
    val_sequences: int | None = _described(None, "score at most N validation sequences per data source", ge=1)
    batch_size: int = _described(8, "sequences per forward", ge=1)


# ---- a study -----------------------------------------------------------------------------------------

BUDGET = re.compile(r"^\s*(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*([kKmMbBgGtT%]?)\s*$")


class ConstraintsConfig(Settings):
    """Deployment limits besides the parameter budget; a candidate outside any is never trained."""

    max_memory: str = _described(
        "", "weights + KV cache limit in bytes: 2GB, 512MB, 2GiB, 3.5e9, or a share of the teacher's (60%)"
    )
    seq_len: int = _described(4096, "KV-cache tokens per sequence counted in the memory", ge=1)
    batch: int = _described(1, "sequences whose KV cache counts in the memory", ge=1)
    dtype: Literal[tuple(DTYPE_BYTES)] = _described(  # type: ignore[valid-type]
        "bfloat16", "dtype of the weights and the cache in the memory"
    )
    min_throughput: float = _described(
        0.0, "tokens/s of a forward pass on this machine, measured in the screen (0: no limit)", ge=0
    )
    throughput_tokens: int = _described(128, "sequence length of the throughput measurement", ge=1)


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
    correct_steps: int = _described(0, "teacher correction: LM fine-tune steps before pruning (0: off)", ge=0)
    seed: int = _described(0, "seed of every short run")
    device: str = _described("auto", "auto (CUDA if available), cpu, cuda, cuda:1 ...")
    space: SpaceConfig = _described(SpaceConfig(), "which architectures are candidates")
    importance: ImportanceConfig = _described(ImportanceConfig(), "the importance pass")
    search: SearchConfig = _described(SearchConfig(), "the Optuna search")
    constraints: ConstraintsConfig = _described(
        ConstraintsConfig(), "memory and throughput limits a candidate must meet to be trained"
    )
    distill: DistillConfig = _described(
        DistillConfig(), "KD settings of every run (trials use search.horizon_steps)"
    )
    final: dict[str, Any] = _described(
        {"steps": 2000}, "DistillConfig overrides for the winner's full distillation"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or "/" in value or value.strip() != value:
            raise ValueError(f"must be a plain non-empty study name (no '/'), got {value!r}")
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

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        unknown = [b for b in self.final_budgets if b not in self.budgets]
        if unknown:
            raise ValueError(f"final_budgets {unknown} are not among the budgets {self.budgets}")
        if self.search.finalists > self.search.screen_top:
            raise ValueError(
                f"search.finalists ({self.search.finalists}) must be <= search.screen_top ({self.search.screen_top})"
            )
        self.final_distill()  # the overrides are validated now, not after the search
        return self

    @property
    def budgets(self) -> list[str]:
        """The budgets as written (the labels of the funnels), one or several."""
        return [str(b) for b in self.budget] if isinstance(self.budget, list) else [str(self.budget)]

    @property
    def root(self) -> Path:
        return Path(self.out_dir or Path("studies") / self.name)

    @property
    def teacher_resident_in_trials(self) -> bool:
        """Whether the teacher sits on the trial's GPU (not with `search.teacher_cache`; for `nas plan`)."""
        return not self.search.teacher_cache

    @property
    def storage_url(self) -> str:
        return self.search.storage or f"sqlite:///{self.root / 'study.db'}"

    def short_distill(self) -> DistillConfig:
        """The KD settings of one trial: `distill` with the search horizon."""
        return self.distill.replace(
            steps=self.search.horizon_steps, eval_every=self.search.eval_every, seed=self.seed
        )

    def final_distill(self) -> DistillConfig:
        """The winner's full distillation: `distill` with the `final` overrides."""
        where, nested = _WHERE.set("final"), _NESTED.set(False)  # report it as the [final] table
        try:
            return DistillConfig(**{**dict(self.distill), **self.final})
        finally:
            _WHERE.reset(where)
            _NESTED.reset(nested)


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a study TOML file; `name` defaults to the file's stem."""
    path = Path(path)
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


def annotation_choices(annotation: Any) -> tuple | None:
    """The allowed values of a Literal field (for CLI choices), else None."""
    return get_args(annotation) if get_origin(annotation) is Literal else None
