"""The [data] table: where the text comes from and how it is cut into sequences."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from nas.settings.base import (
    Settings,
    _described,
)


class Source(Settings):
    """One corpus: a local .txt/.jsonl/.parquet file or directory, or a Hugging Face datasets id."""

    path: str = Field(
        min_length=1, description="local .txt/.jsonl/.parquet file or directory, or a hub dataset id"
    )
    weight: float = _described(
        1.0, "relative share of the phase's train sequences", gt=0, allow_inf_nan=False
    )
    text_field: str = _described("text", "JSON key / parquet column / hub column holding the text")
    messages_field: str | None = _described(
        None,
        "JSON key / parquet column / hub column holding conversations (a list of {role, content}, the "
        "OpenAI/HF `messages` format); set, the source is chat data rendered with the tokenizer's chat "
        "template, and text_field is not read",
    )
    chat_template: str | None = _described(
        None,
        "for chat data: the name of one of the tokenizer's chat templates, or a Jinja template "
        "(default: the tokenizer's own)",
    )
    config: str | None = _described(None, "hub dataset config name (e.g. en)")
    split: str = _described("train", "hub dataset split")
    streaming: bool = _described(False, "stream the hub dataset instead of downloading the split")
    max_documents: int | None = _described(None, "read at most this many (non-empty) documents", ge=1)
    mask_prompt: bool = _described(
        False,
        "for chat data: train only on the assistant turns (the other turns stay as context, with no loss); "
        "default: every token of the rendered conversation",
    )
    # 1%: a stray bad record (or a conversation its template cannot render) or two is normal in a scraped corpus, but more means a wrong text_field or a
    # broken export (issue 25: half a corpus vanished silently); measured here: the KJV and demo corpora,
    # and every test corpus, skip 0 records
    max_skipped_share: float = _described(
        0.01,
        "error when more than this share of the records has no usable text (missing field, not a string)",
        ge=0,
        le=1,
        allow_inf_nan=False,
    )

    @model_validator(mode="after")
    def _chat(self) -> Source:
        if (self.chat_template is not None or self.mask_prompt) and self.messages_field is None:
            raise ValueError(
                "chat_template and mask_prompt are for chat data: set messages_field (e.g. messages) too"
            )
        return self

    @property
    def field(self) -> str:
        """The field read from each record: the conversation's for chat data, else the text's."""
        return self.messages_field or self.text_field


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
