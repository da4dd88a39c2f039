"""Row 5 of `benchmarks/gpu_acceptance.py` (2+ GPUs): DDP and an FSDP2 trial group against one process.

The tiny models and study of `tests/train/test_parallel.py` and `tests/search/test_workers.py` (the figures check
nccl and FSDP2 plumbing on CUDA, not speed), through nas's CLI as a user runs it. The same code runs on
the CPU over gloo (2 processes; 4.5 minutes on 2 busy cores, too long for the test suite, which covers
these nas paths in tests/train/test_parallel.py and tests/search/test_workers.py):

    python -m benchmarks._gpu_parallel /tmp/row5      # prints the row (verdict "smoke" on CPU)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import Context

PARALLEL_TOLERANCE = 0.01  # nats; bf16 autocast with another reduction order moves the 3rd decimal


def nas_cli(*argv: str, timeout: float = 200) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parents[1])  # this checkout's nas, also in torchrun's processes
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "nas.cli", *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"nas {argv[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done


def val_curve(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(m["step"], m["val_loss"]) for m in lines if m["val_loss"] is not None]


def max_gap(a: list, b: list) -> float:
    if [s for s, _ in a] != [s for s, _ in b]:
        return math.inf
    return max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))


def ddp_gap(ctx: Context) -> tuple[float, float]:
    """`nas distill` on 1 process and on 2 (DDP over nccl); the largest val-loss gap and the DDP run's
    tokens/s over the single one's (the tiny student of tests/train/test_parallel.py: plumbing, not speed)."""
    from nas.testing import tiny_model, write_kjv_corpus, write_tiny_teacher

    root = ctx.work
    write_tiny_teacher(root / "teacher")
    write_kjv_corpus(root / "corpus.jsonl", limit=3000)
    tiny_model("llama", seed=1, vocab_size=320, num_layers=2, tie_word_embeddings=True).save_pretrained(
        root / "student"
    )
    common = [*("--data", str(root / "corpus.jsonl"), "--seq-len", "32", "--cache-dir", str(root / "cache")),
              *("--batch-size", "4", "--steps", "6", "--eval-every", "3", "--checkpoint-every", "0"),
              *("--eval-sequences", "8", "--lr", "3e-3", "--min-lr", "3e-4", "--device", ctx.device.type)]  # fmt: skip
    seconds = {}
    for name, extra in (("one", []), ("ddp", ["--nproc-per-node", "2"])):
        start = time.perf_counter()
        nas_cli("distill", str(root / "teacher"), str(root / "student"), str(root / name), *common, *extra)
        seconds[name] = time.perf_counter() - start
    return max_gap(val_curve(root / "one"), val_curve(root / "ddp")), seconds["one"] / seconds["ddp"]


def fsdp_group_gap(ctx: Context) -> float:
    """One trial of the tiny study in one process and as an FSDP2 group of 2 (`nas worker
    --nproc-per-node 2`), as tests/search/test_workers.py; the largest gap between their val-loss curves."""
    import optuna
    from optuna.trial import TrialState

    from nas.pipeline import prepare_context, record_study_attrs, search
    from nas.search.trial import enqueue_candidates, open_study
    from nas.settings import run_config_from_dict
    from nas.testing import tiny_study_config

    search_cfg = {"n_trials": 1, "pruner": "none"}
    device = {"device": ctx.device.type, "distill": {"device": ctx.device.type}}
    one = run_config_from_dict(tiny_study_config(ctx.work / "group", name="one", search=search_cfg, **device))
    _, single = search(one)
    group = run_config_from_dict(
        tiny_study_config(ctx.work / "group", name="group", search=search_cfg, **device)
    )
    gctx = prepare_context(group)
    study = open_study(gctx)
    enqueue_candidates(study, gctx)
    record_study_attrs(study, gctx)
    nas_cli(
        "worker",
        "--storage",
        group.storage_url,
        "--study",
        "group",
        "--nproc-per-node",
        "2",
        "--max-trials",
        "1",
    )
    (a,) = single.get_trials(states=(TrialState.COMPLETE,))
    (b,) = optuna.load_study(study_name="group", storage=group.storage_url).get_trials(
        states=(TrialState.COMPLETE,)
    )
    curve = [[(c["step"], c["val_loss"]) for c in t.user_attrs["curve"]] for t in (a, b)]
    return max_gap(*curve)


def parallel_row(ctx: Context) -> dict:
    ddp, speed = ddp_gap(ctx)
    fsdp = fsdp_group_gap(ctx)
    backend = "nccl" if ctx.cuda else "gloo"
    return {
        "figure": f"2 processes ({backend}): DDP val-loss gap {ddp:.2e} ({speed:.2f}x the 1-process wall time), "
        f"FSDP2 trial group gap {fsdp:.2e}",
        "threshold": f"both gaps <= {PARALLEL_TOLERANCE} nats",
        "verdict": ctx.verdict(max(ddp, fsdp) <= PARALLEL_TOLERANCE),
        "measured": {"ddp_gap": ddp, "fsdp_group_gap": fsdp, "ddp_speed": speed, "backend": backend},
    }


if __name__ == "__main__":  # the row on this machine: CUDA with 2+ GPUs, else the CPU over gloo
    import torch

    device = torch.device("cuda" if torch.cuda.device_count() >= 2 else "cpu")
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "row5")
    work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(parallel_row(Context(device, device.type == "cpu", work.resolve(), 3.0)), indent=1))
