"""Streaming a study to the experiment trackers its users watch (`report_to`, the convention of
transformers' Trainer): TensorBoard, Weights & Biases, MLflow. Each is an optional extra.

What is sent is what `metrics.jsonl` holds, line by line, for every trial and the final distillation
(tag `<run>/<field>` at the line's step, null fields left out), plus the study's progress (`study/...` at
the number of finished trials). Lines are read back from the run's own `metrics.jsonl` at each
evaluation and at the end of each run, so a tracker shows exactly what the file holds, also for runs
trained in other processes; a file cut back by a resume is followed from its new end.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from nas.errors import ConfigError
from nas.io import read_log

log = logging.getLogger(__name__)

# tracker -> (the module it needs, the pip command that installs it)
EXTRAS = {
    "tensorboard": ("tensorboard", "pip install 'nas[tensorboard]'"),
    "wandb": ("wandb", "pip install 'nas[wandb]'"),
    "mlflow": ("mlflow", "pip install 'nas[mlflow]'"),
}
FIELDS = ("loss", "kl", "val_loss", "val_kl", "lr", "tokens", "tokens_per_s")  # metrics.jsonl's numbers


def check_trackers(report_to: list[str] | tuple[str, ...]) -> None:
    """ConfigError naming the pip command when a tracker's package is not installed."""
    for name in report_to:
        module, command = EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to = {name!r} needs the {module} package: {command}")


class Trackers:
    """The trackers of one study (none: every call does nothing)."""

    def __init__(
        self, report_to: list[str] | tuple[str, ...], log_dir: Path, name: str, config: dict
    ) -> None:
        check_trackers(report_to)
        self.sinks = [_open(kind, Path(log_dir), name, config) for kind in report_to]
        self.sent: dict[Path, int] = {}  # metrics file -> lines already sent

    def stream(self, run: str, metrics: str | Path) -> None:
        """Send the lines of `metrics` (a run's metrics.jsonl) not sent yet, under `run/`."""
        path = Path(metrics)
        if not self.sinks or not path.is_file():
            return
        records = read_log(path)
        start = self.sent.get(path, 0)
        start = start if start <= len(records) else len(records)  # cut back by a resume: follow its new end
        for record in records[start:]:
            values = {f"{run}/{k}": float(record[k]) for k in FIELDS if record.get(k) is not None}
            self._send(values, int(record["step"]))
        self.sent[path] = len(records)

    def progress(self, trials_done: int, values: dict[str, float | None]) -> None:
        """The study's progress (`study/<name>`) at `trials_done` finished trials."""
        self._send({f"study/{k}": float(v) for k, v in values.items() if v is not None}, trials_done)

    def _send(self, values: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.send(values, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _open(kind: str, log_dir: Path, name: str, config: dict):
    return {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}[kind](log_dir, name, config)


class _TensorBoard:
    """Event files under `log_dir/tensorboard/` (`tensorboard --logdir` that folder)."""

    def __init__(self, log_dir: Path, name: str, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
        self.writer.add_text("config", f"study {name}", 0)

    def send(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a study runs for days: its charts should not wait for a buffer

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """One W&B run per study (project `nas`, run name = study name); each run's metrics have their own
    step axis (`<run>/step`), since W&B's own step must only grow."""

    def __init__(self, log_dir: Path, name: str, config: dict) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="nas", name=name, config=config, dir=str(log_dir))
        self.axes: set[str] = set()

    def send(self, values: dict[str, float], step: int) -> None:
        for prefix in {tag.split("/", 1)[0] for tag in values} - self.axes:
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.axes.add(prefix)
        prefixes = {tag.split("/", 1)[0] for tag in values}
        self.run.log(values | {f"{p}/step": step for p in prefixes})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """One MLflow run per study (experiment `nas`), at the tracking URI MLflow is configured with
    (MLFLOW_TRACKING_URI; default ./mlruns)."""

    def __init__(self, log_dir: Path, name: str, config: dict) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment("nas")
        self.run = mlflow.start_run(run_name=name)
        mlflow.log_dict(config, "config.json")

    def send(self, values: dict[str, float], step: int) -> None:
        # MLflow's metric names allow only letters, digits, _ - . / and spaces: "final_50%" -> "final_50pct"
        names = {re.sub(r"[^\w\-./ ]", "_", tag.replace("%", "pct")): v for tag, v in values.items()}
        self.mlflow.log_metrics(names, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


NO_TRACKERS = Trackers((), Path("."), "", {})
