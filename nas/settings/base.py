"""The base of every settings model (validation errors as one line), the choices the settings offer,
and the helpers the CLI flags use."""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nas.errors import ConfigError

SCHEDULES = ("cosine", "wsd", "constant")
ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")  # auto: the model's own; else attn_implementation
OPTIMIZERS = ("adamw", "adamw-8bit")  # torch AdamW | torchao AdamW8bit (https://arxiv.org/abs/2110.02861)
DEPTH_STRATEGIES = ("drop-lowest", "contiguous")
PRUNERS = ("successive-halving", "hyperband", "none")
# the built-in search strategies (`nas.search.strategy.STRATEGIES` maps each to its class)
STRATEGIES = ("auto", "funnel", "exhaustive", "tpe")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
SIZE_KNOBS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups", "num_experts",  # with steps
              # hybrid stacks (nas.model.blocks): layers per type, Gated DeltaNet key heads, Mamba2 heads
              "num_attention_layers", "num_global_attention_layers", "num_linear_attention_layers", "num_mamba_layers", "num_mlp_layers",
              "num_moe_layers", "num_linear_key_heads", "num_mamba_heads", "mamba_head_dim")  # fmt: skip
# transformers >= 5.25 turns on Hub kernels at load unless told (a network fetch, another code path); nas
# decides: off (torch / installed packages only, reproducible and offline) or hub (transformers' `use_kernels`)
HUB_KERNELS = ("off", "hub")
VISION = ("drop", "keep")  # a multimodal teacher's vision tower in the export (nas.model.multimodal says why drop)
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


def annotation_choices(annotation: Any) -> tuple | None:
    """The allowed values of a Literal field (for CLI choices), else None."""
    return get_args(annotation) if get_origin(annotation) is Literal else None
