"""Memory-lean settings vs fp32 AdamW on the demo's search trial: validation loss at the same steps.

The demo's teacher (trained, or reused from --out), its largest 50% candidate pruned with the
teacher's importance, then the demo's trial (60 steps of KD, batch 8 x 256 tokens, lr 1e-3) once
per setting from the same start and data. The settings are the GPU policies of `nas.device` and
torchao's optimizers, run on this CPU (bf16 autocast on the CPU; torchao's update in eager mode).
CPU offload needs CUDA and is not run. Goal: every setting within 0.02 nats of fp32 AdamW.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.lean_optimizers   # ~6-10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from benchmarks import _smoke as smoke  # noqa: E402  # --smoke
from nas.demo.run import DemoPlan, train_demo_teacher
from nas.model.arch import Arch
from nas.model.load import load_model, load_teacher_and_student
from nas.model.size import count_params
from nas.prune.cut import prune, save_pruned
from nas.prune.importance import compute_importance
from nas.prune.space import enumerate_candidates
from nas.search.horizon_plan import resolve
from nas.train.loop import distill

SETTINGS = [  # (precision, optimizer); the first is the reference
    ("fp32", "adamw"),
    ("fp32", "adamw-8bit"),
    ("bf16-mixed", "adamw"),
    ("bf16-mixed", "adamw-8bit"),
    ("bf16", "adamw"),
    ("bf16", "adamw-8bit"),
]


def setup(out: Path, teacher_steps: int | None, tiny: bool = False):
    """The demo's data, trained teacher and the largest candidate's pruned start (saved)."""
    plan = smoke.tiny_plan(DemoPlan()) if tiny else DemoPlan()
    if teacher_steps:  # a shorter teacher training on a busy machine (the trial settings stay the demo's)
        plan = dataclasses.replace(plan, teacher=dataclasses.replace(plan.teacher, steps=teacher_steps))
    cfg, data, info = train_demo_teacher(out, plan, "cpu")
    teacher = load_model(info.path)
    imp = cfg.importance
    importance = compute_importance(
        teacher, data.calib(imp.num_samples), data.val(imp.val_sequences), imp.batch_size
    )
    arch = max(
        enumerate_candidates(Arch.from_hf_config(teacher.config), plan.final_budget, cfg.space), key=count_params
    )
    save_pruned(prune(teacher, arch, importance), out / "lean-start")
    return cfg, data, info.path, arch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="studies/lean-bench", help="work directory (the teacher is reused)")
    parser.add_argument("--steps", type=int, help="override the trial's steps (default: the demo's horizon)")
    parser.add_argument("--teacher-steps", type=int, help="override the demo teacher's training steps (210)")
    parser.add_argument("--batch-size", type=int, help="override the trial's micro-batch (the demo's: 8)")
    args = smoke.parse(parser, steps=2, batch_size=2)
    out = Path(args.out)
    cfg, data, teacher_dir, arch = setup(out, args.teacher_steps, args.smoke)
    trial = resolve(cfg).short_distill(cfg)
    steps = args.steps or trial.steps
    batch = args.batch_size or trial.batch_size
    every = min(trial.eval_every, max(1, steps // 2))
    trial = trial.replace(steps=steps, batch_size=batch, eval_every=every, checkpoint_every=0, device="cpu")
    print(
        f"trial: {arch.describe()} ({count_params(arch):,} params), {trial.steps} steps, batch {trial.batch_size} x {data.seq_len}"
    )
    rows = []
    with torch.compiler.set_stance("force_eager"):
        for precision, optimizer in SETTINGS:
            teacher, student = load_teacher_and_student(
                teacher_dir, out / "lean-start", torch.device("cpu"), precision
            )
            start = time.perf_counter()
            run = trial.replace(precision=precision, optimizer=optimizer)
            result = distill(teacher, student, data, run, out / f"lean-{precision}-{optimizer}")
            rows.append((precision, optimizer, result.curve, time.perf_counter() - start))
    reference = rows[0][2]
    steps = [c["step"] for c in reference]
    print(
        f"\n{'precision':<11}{'optimizer':<12}"
        + "".join(f"{'step ' + str(s):>11}" for s in steps)
        + f"{'max |diff|':>12}{'seconds':>9}"
    )
    for precision, optimizer, curve, seconds in rows:
        diff = max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(curve, reference, strict=True))
        cells = "".join(f"{c['val_loss']:>11.4f}" for c in curve)
        print(f"{precision:<11}{optimizer:<12}{cells}{diff:>12.4f}{seconds:>9.0f}")


if __name__ == "__main__":
    main()
