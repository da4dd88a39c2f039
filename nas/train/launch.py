"""Distillation in several processes: re-running a command under torchrun, and the final distillation of a
study as a torchrun job over model directories (`distill_in_processes`; its workers run `run_job`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nas.data.tokens import prepare
from nas.errors import NasError
from nas.io import write_text_atomic
from nas.model.families import load_teacher_and_student, load_tokenizer
from nas.settings import DistillConfig, data_config_from_dict
from nas.train.dist import local_device, rank_zero_first, setup, teardown, world
from nas.train.loop import Result, distill


def inside_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def torchrun_command(nproc: int, module_args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m <module_args>`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
    ] + [*module_args]


def relaunch(nproc: int, module_args: list[str]) -> int:
    """Run `module_args` (e.g. ["nas.cli", "distill", ...]) under torchrun; returns its exit code."""
    return subprocess.run(torchrun_command(nproc, module_args), check=False).returncode


def distill_in_processes(
    nproc: int, teacher: str, student: str, data: dict, cfg, out: Path, kernels: str = "off"
):
    """Run `distill` of the model directories `teacher` and `student` on the study's `[data]` table
    in `nproc` torchrun processes; returns rank 0's `nas.train.loop.Result` (the weights are in out/model)."""
    out.mkdir(parents=True, exist_ok=True)
    job = {"teacher": teacher, "student": student, "data": data, "distill": cfg.to_dict(), "out": str(out),
           "kernels": kernels}  # fmt: skip
    _write_json(out / "job.json", job)
    code = relaunch(nproc, ["nas.train.launch", str(out / "job.json")])
    if code != 0:
        raise NasError(f"the distillation in {nproc} processes failed (exit code {code}); see its log above")
    return Result(**json.loads((out / "result.json").read_text()))


def run_job(path: str) -> int:
    """One torchrun worker of `distill_in_processes`: load, distill, rank 0 writes result.json."""
    job = json.loads(Path(path).read_text())
    cfg = DistillConfig(**job["distill"])
    device = local_device(cfg.device)
    setup(device)
    teacher, student = load_teacher_and_student(
        job["teacher"], job["student"], device, cfg.precision, job.get("kernels", "off")
    )
    with rank_zero_first():
        data = prepare(data_config_from_dict(job["data"]), load_tokenizer(job["teacher"]))
    result = distill(teacher, student, data, cfg, job["out"])
    if world().main:
        _write_json(Path(job["out"]) / "result.json", asdict(result))
    teardown()
    return 0


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO if world().main else logging.WARNING)
    sys.exit(run_job(sys.argv[1]))
