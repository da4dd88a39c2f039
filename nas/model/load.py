"""Loading a supported model: its config (validated against its family's declaration), its weights (strict:
complete, readable, finite) and its tokenizer. The families themselves are declared in `nas.model.families`."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.device import precision_for
from nas.errors import ModelError, first_line
from nas.io import check_kind
from nas.model.families import FAMILIES, family_of
from nas.model.validate import check_config_fields, check_finite, check_tokenizer_fits, check_weight_dtypes

log = logging.getLogger(__name__)


def load_config(name_or_path: str | Path) -> Any:
    """The config of a supported causal LM (local directory or hub id), without loading weights; of a
    multimodal checkpoint (`nas.model.multimodal`), its text model's config. Parsed once per process while
    its config.json is unchanged (a command asks for it several times)."""
    name = str(name_or_path)
    check_model_files(Path(name).expanduser())
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise ModelError(f"model directory {name} does not exist; pass a local model directory or a hub id")
    file = Path(name).expanduser() / "config.json"
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    return copy.deepcopy(_parsed_config(name, stamp))  # a copy: callers may change theirs


def check_model_files(local: Path) -> None:
    """ModelError when a local model path, or a file in its directory, is a special file (a device, FIFO
    or socket): transformers would read it without end or wait on it."""
    check_kind(local, "model", ModelError)
    if local.is_dir():
        for entry in local.iterdir():
            check_kind(entry, "model file", ModelError)


@functools.lru_cache(maxsize=16)
def _parsed_config(name: str, stamp: tuple[int, int] | None) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    from nas.model.multimodal import text_config

    try:
        config = AutoConfig.from_pretrained(name)
        raw, _ = PretrainedConfig.get_config_dict(name)  # the file itself, without transformers' defaults
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a model config from {name!r}: {first_line(e)}") from e
    text = text_config(config)
    if text is not config and text.model_type not in FAMILIES:
        raise ModelError(
            f"unsupported model_type {text.model_type!r} (the text model of a {config.model_type!r} checkpoint); "
            f"nas supports {', '.join(sorted(FAMILIES))}"
        )
    raw = raw.get("text_config", raw) if text is not config else raw
    check_config_fields(name, raw, family_of(text), aliases=dict(getattr(text, "attribute_map", {})))
    return text


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    kernels: str = "off",
) -> nn.Module:
    """Load a supported causal LM from a local directory or a hub id, in eval mode. Strict: unreadable
    weights, or weights that lack tensors the config needs or hold tensors it does not have, are a
    ModelError naming the file (`from_pretrained` alone initialises missing tensors at random).
    `kernels` (the study's `kernels` setting): "off" loads with `use_kernels=False` whatever transformers'
    default (5.25 turns Hub kernels on); "hub" kernelizes the model on `device` (`set_use_kernels`)."""
    from transformers import AutoModelForCausalLM

    from nas.model.multimodal import load_text_model, wrapper_type

    config = load_config(name_or_path)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_readable(local)
    with load_report_to_debug():
        if wrapper_type(name_or_path):  # a multimodal checkpoint: its text model
            model, info = load_text_model(str(name_or_path), dtype)
        else:
            try:  # a tensor of another shape than the config's is reported in `info`, refused below
                model, info = AutoModelForCausalLM.from_pretrained(
                    str(name_or_path), config=config, dtype=dtype, output_loading_info=True,
                    ignore_mismatched_sizes=True, use_kernels=False,
                )  # fmt: skip
            except Exception as e:  # safetensors, torch and transformers each raise their own types
                raise ModelError(
                    f"cannot load model weights from {str(name_or_path)!r} (corrupt or incomplete?): {first_line(e)}"
                ) from e
    where = _weights_name(local) if local.is_dir() else str(name_or_path)
    check_complete(info, where)
    check_finite(model, where)
    model = model.to(device).eval()
    if kernels == "hub":
        use_hub_kernels(model, str(name_or_path))
    return model


def use_hub_kernels(model: nn.Module, name: str) -> None:
    """Kernelize `model` with transformers' Hub kernels (the `kernels` package; fetched once from the Hub)."""
    import importlib.util

    if importlib.util.find_spec("kernels") is None:
        raise ModelError("kernels = \"hub\" needs the kernels package: pip install kernels (or set kernels = \"off\")")
    try:
        model.set_use_kernels(True)
    except Exception as e:  # kernels raises its own types, the Hub network errors
        raise ModelError(f"cannot load the Hub kernels for {name!r} (offline?): {first_line(e)}; "
                         "set kernels = \"off\"") from e
    log.info("%s: transformers' Hub kernels on", name)


def check_complete(info: dict[str, Any], where: str) -> None:
    """ModelError unless `from_pretrained`'s loading info (names after transformers' own checkpoint
    conversions, e.g. per-expert tensors fused into one) shows every tensor present and none extra."""
    missing, extra = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or extra:
        what = f"lacks {len(missing)} tensor(s) the config needs (e.g. {missing[0]})" if missing else ""
        what += " and " if missing and extra else ""
        what += f"has {len(extra)} tensor(s) the model does not have (e.g. {extra[0]})" if extra else ""
        raise ModelError(f"weights {where} {what}: incomplete or not this model's weights")
    if mismatched:
        name, in_file, in_config = sorted(mismatched)[0]
        raise ModelError(
            f"weights {where}: tensor {name} has shape {list(in_file)} in the file but {list(in_config)} in "
            f"the config ({len(mismatched)} tensor(s) differ): the weights are not this config's"
        )


@contextmanager
def load_report_to_debug() -> Iterator[None]:
    """transformers logs a load report (a table of missing, unexpected and mismatched tensors) as a
    warning on stderr; `check_complete` says what matters in one line, so the table goes to the debug log."""
    source = logging.getLogger("transformers.modeling_utils")

    def to_debug(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in str(record.msg):
            return True
        log.debug("%s", record.getMessage())
        return False

    source.addFilter(to_debug)
    try:
        yield
    finally:
        source.removeFilter(to_debug)


def _weights_name(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors"))
    return str(files[0] if len(files) == 1 else directory)


def check_readable(directory: Path) -> None:
    """Every safetensors file of a model directory must be readable and whole (ModelError naming it)."""
    for file in sorted(directory.glob("*.safetensors")):
        _tensor_shapes(file)


def _tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors in a safetensors file; ModelError when it is truncated or not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118
            dtypes = {name: s.get_dtype() for name, s in slices.items()}
            shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
    except Exception as e:  # SafetensorError (no public base), OSError
        raise ModelError(f"weights {file} are unreadable (corrupt or truncated): {first_line(e)}") from e
    check_weight_dtypes(file, dtypes)
    return shapes


def load_teacher_and_student(
    teacher: str | Path, student: str | Path, device: torch.device, precision: str = "auto", kernels: str = "off"
):
    """The frozen teacher and the trainable student on `device`, in the dtypes of the precision
    policy (`nas.device`; auto: bf16 teacher and fp32 student on CUDA, both fp32 on CPU)."""
    policy = precision_for(precision, device)
    return (
        load_model(teacher, dtype=policy.teacher_dtype, device=device, kernels=kernels),
        load_model(student, dtype=policy.student_dtype, device=device, kernels=kernels),
    )


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer saved with a model (local directory or hub id)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:  # tokenizers, json and transformers each raise their own types
        raise ModelError(
            f"cannot load a tokenizer from {str(name_or_path)!r} (tokenizer files corrupt or missing?): "
            f"{type(e).__name__}: {first_line(e)}"
        ) from e
    check_tokenizer_fits(tokenizer, load_config(name_or_path), str(name_or_path))
    return tokenizer
