"""Evaluation: the fixed held-out LM-loss / perplexity protocol (also used to rank candidates).

Protocol: the text is tokenized with the teacher's tokenizer (no BOS added), documents are joined
with EOS and packed into non-overlapping blocks of `seq_len` tokens (stride = seq_len). Each block
is scored on its own: every position but the first predicts the next token, and the loss is the
token-weighted mean cross-entropy over all scored positions of all blocks. Perplexity = exp(loss).
`nas eval --data` scores the validation split of each source (`nas.data`: documents assigned by a
content hash, `val_fraction` of them), so its numbers equal the ones the search and distillation
report for the same data, tokenizer and `seq_len`.

Benchmarks: lm-evaluation-harness tasks run on the in-memory model (`run_tasks`). The offline task set
in `nas/evaluate/tasks/` (always on the include path) holds `kjv_cloze`, a 4-way cloze over verses of the
King James Bible's `HELD_OUT_BOOKS`, and `kjv_lastword`, a 4-way choice of the same verses' last words
(easier: small models trained on the rest of the Bible beat chance on it); hub tasks (hellaswag,
winogrande, arc_easy, mmlu, ...) need network.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from nas.data.tokens import prepare
from nas.device import resolve_device
from nas.errors import ConfigError, DataError, first_line
from nas.evaluate.loss import lm_loss
from nas.io import GENERATOR, package_versions, read_json, write_text_atomic, written_by_nas
from nas.model.load import load_model, load_tokenizer
from nas.settings import Phase

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"  # the offline task set, always on the include path
OFFLINE_TASKS: tuple[str, ...] = ("kjv_cloze", "kjv_lastword")
HUB_EXAMPLES = ("hellaswag", "winogrande", "arc_easy", "arc_challenge", "mmlu")  # the Minitron papers' set


# ---- lm-evaluation-harness ------------------------------------------------------------------------


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | os.PathLike] = ()) -> Any:
    """An lm-eval TaskManager that knows every name in `tasks`: the offline set plus `include_paths`
    alone when that suffices (indexing lm-eval's ~15k built-in tasks takes seconds), else with the
    built-in (hub) tasks too. Raises ConfigError for a missing include path or an unknown task."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR]
    for path in include_paths:
        if not Path(path).expanduser().is_dir():
            raise ConfigError(
                f"--include-path {path} is not a directory; give a folder of lm-eval task YAML files"
            )
        paths.append(Path(path).expanduser())
    with quiet_lm_eval():
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
        manager = TaskManager(include_path=[str(p) for p in paths])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        close = [m for t in unknown for m in difflib.get_close_matches(t, manager.all_tasks, n=3)]
        examples = ", ".join(dict.fromkeys([*OFFLINE_TASKS, *close, *HUB_EXAMPLES]))
        raise ConfigError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; available include {examples} "
            f"({len(manager.all_tasks)} in all); for your own tasks pass --include-path DIR with task YAML files"
        )
    return manager


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    include_paths: Sequence[str | os.PathLike] = (),
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the in-memory `model` through `lm_eval.simple_evaluate`.

    Returns {task: {metric: value}} with every numeric metric (e.g. acc, acc_stderr, acc_norm) and
    `samples`, the number of items scored (`limit` caps it per task; None: all).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include_paths)
    results: dict[str, dict[str, float]] = {}
    with quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # One task per evaluation: lm-eval's logits cache groups requests by context + continuation
        # minus its last token across all tasks, and scores the shorter continuation of a group with
        # the wrong positions, so kjv_cloze and kjv_lastword (the same verses, split at different
        # points) would corrupt each other's true choices when run together.
        for task in tasks:
            try:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=False
                )
            except OSError as e:  # datasets' ConnectionError / missing files: hub task data not reachable
                raise DataError(
                    f"cannot load the data of lm-eval task {task}: {first_line(e)}; hub tasks need network "
                    f"(or a filled HF datasets cache); offline tasks: {', '.join(OFFLINE_TASKS)}"
                ) from e
            for name, metrics in out["results"].items():
                results[name] = task_metrics(metrics, out["n-samples"].get(name))
    return results


def task_metrics(raw: dict[str, Any], n_samples: dict[str, int] | None) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.4, "alias": ...} as {"acc": 0.4, ..., "samples": n}: numbers only, the
    default filter ("none") dropped from the names."""
    metrics: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len":
            metric, _, filt = key.partition(",")
            metrics[metric if filt in ("", "none") else key] = float(value)
    if n_samples:
        metrics["samples"] = n_samples.get("effective", n_samples.get("original"))
    return metrics


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's info and advisory warnings (e.g. about passing a model object) unless nas
    logs at DEBUG (`nas -v`); its errors still show."""
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    if not log.isEnabledFor(logging.DEBUG):
        lm_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lm_log.setLevel(level)


# ---- whole models: perplexity + tasks -> eval.json ------------------------------------------------


def data_perplexity(
    model: nn.Module, tokenizer: Any, data_cfg: Any, num_sequences: int | None = None, batch_size: int = 8
) -> dict[str, dict[str, Any]]:
    """Held-out loss and perplexity on the validation split of each source of `data_cfg` (a
    `nas.settings.DataConfig`), scored on its own: {source path: {"loss", "perplexity", "sequences",
    "tokens", "seq_len", "fingerprint"}}. `num_sequences` caps the sequences of each source."""

    out = {}
    for source in data_cfg.sources:
        data = prepare(data_cfg.replace(phases=(Phase((source,)),)), tokenizer)
        n = None if num_sequences is None else min(num_sequences, sum(data.sizes("val")))
        val = data.val(n)
        loss = lm_loss(model, val, batch_size)
        out[source.path] = {
            "loss": loss,
            "perplexity": math.exp(loss),
            "sequences": len(val),
            "tokens": int(val[:, 1:].numel()),  # scored positions
            "seq_len": data.seq_len,
            "fingerprint": data.fingerprint,
        } | ({"chat_template": data.chat_templates[source.path]} if data.chat_templates else {})
    return out


def evaluate_model(
    name_or_path: str | os.PathLike,
    tasks: Sequence[str] = (),
    data_cfg: Any = None,
    include_paths: Sequence[str | os.PathLike] = (),
    limit: int | None = None,
    batch_size: int = 8,
    num_sequences: int | None = None,
    device: str = "auto",
    kernels: str = "off",
) -> dict[str, Any]:
    """Load a model (local directory or hub id) and its tokenizer, and score it: perplexity on
    `data_cfg` (if given) and the lm-eval `tasks`. Returns the record `save_results` writes.
    `kernels`: transformers' Hub kernels at load (`nas.model.load.load_model`)."""
    if not tasks and data_cfg is None:
        raise ConfigError("nothing to evaluate: give --data for perplexity and/or --tasks for lm-eval")
    model = load_model(name_or_path, device=resolve_device(device), kernels=kernels)
    tokenizer = load_tokenizer(name_or_path)
    record: dict[str, Any] = {
        "model": str(name_or_path),
        "params": sum(p.numel() for p in model.parameters()),
        "versions": package_versions(("nas", "torch", "transformers", "kernels", "lm_eval"))
        | {"hub_kernels": kernels},
        "perplexity": {},
        "tasks": {},
    }
    if data_cfg is not None:
        record["perplexity"] = data_perplexity(model, tokenizer, data_cfg, num_sequences, batch_size)
    if tasks:
        record["tasks"] = run_tasks(model, tokenizer, tasks, include_paths, limit, batch_size)
        for metrics in record["tasks"].values():
            metrics["limit"] = limit
    return record


def evaluate_models(paths: Sequence[str | os.PathLike], tasks: Sequence[str] = (), **kw: Any):
    """`evaluate_model` on each of `paths` (e.g. a study's top-k candidates), as a DataFrame with one
    row per model: model, params, then `ppl:<source>` and `<task>:<metric>` columns (no stderr)."""
    import pandas as pd

    rows = []
    for path in paths:
        record = evaluate_model(path, tasks, **kw)
        row = {"model": record["model"], "params": record["params"]}
        row |= {f"ppl:{src}": r["perplexity"] for src, r in record["perplexity"].items()}
        for task, metrics in record["tasks"].items():
            row |= {
                f"{task}:{m}": v for m, v in metrics.items() if m in ("acc", "acc_norm", "exact_match", "f1")
            }
        rows.append(row)
    return pd.DataFrame(rows)


def eval_json_path(name_or_path: str | os.PathLike) -> Path:
    """Where `nas eval` writes its results: `eval.json` inside a local model directory; for a hub id,
    `eval-<owner>--<name>.json` in the current directory."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / "eval.json"
    return Path(f"eval-{str(name_or_path).replace('/', '--')}.json")


def save_results(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Merge `record` into the JSON at `path` when nas wrote it (new perplexity sources and tasks replace
    old entries of the same name, others are kept; a file of someone else's, replaced with --overwrite,
    is not merged) and write it atomically, marked as nas's."""
    path = Path(path)
    merged = read_json(path) if path.exists() and written_by_nas(path) else {}
    for key in ("perplexity", "tasks"):
        merged[key] = merged.get(key, {}) | record.get(key, {})
    identity = {k: v for k, v in record.items() if k not in ("perplexity", "tasks")}
    identity = {"generator": GENERATOR} | identity
    merged = identity | merged | identity  # the model's identity first, so the file reads top-down
    return write_text_atomic(path, json.dumps(merged, indent=2) + "\n")


def format_results(record: dict[str, Any]) -> str:
    """A plain-text table of one `evaluate_model` record."""
    lines = [f"{record['model']}  ({record['params'] / 1e6:.2f}M params)", ""]
    lines.append(f"{'what':<28} {'metric':<10} {'value':>10} {'± stderr':>10}  n")
    for source, r in record["perplexity"].items():
        n = f"{r['sequences']} x {r['seq_len']} tokens"
        lines.append(f"{'ppl ' + source:<28.28} {'loss':<10} {r['loss']:>10.4f} {'':>10}  {n}")
        lines.append(f"{'':<28} {'perplexity':<10} {r['perplexity']:>10.3f}")
    for task, metrics in record["tasks"].items():
        for metric, value in metrics.items():
            if metric in ("samples", "limit") or metric.endswith("_stderr") or "_stderr," in metric:
                continue
            stderr = metrics.get(f"{metric}_stderr")
            err = f"{stderr:>10.4f}" if isinstance(stderr, float) else f"{'':>10}"
            lines.append(f"{task:<28.28} {metric:<10} {value:>10.4f} {err}  {metrics.get('samples', '')}")
            task = ""
    return "\n".join(lines)
